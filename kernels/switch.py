"""The ``SSLAM_KERNELS`` switch: decide whether a call runs a Triton kernel or its reference.

``SSLAM_KERNELS`` (environment variable):

* unset or ``auto`` -- kernels for CUDA tensors when Triton is importable, references otherwise;
* ``1`` -- always the kernels (on CPU tensors this needs ``TRITON_INTERPRET=1``, the Triton
  interpreter, which is how the test-suite checks every kernel without a GPU);
* ``0`` -- always the PyTorch references.
"""

from __future__ import annotations

import os

import torch
from torch._subclasses.fake_tensor import is_fake
from torch.utils._python_dispatch import is_in_torch_dispatch_mode

_VALUES = ("", "auto", "0", "1")


_triton_importable: bool | None = None


def triton_available() -> bool:
    # Remembered in a plain global rather than functools.cache: torch.compile traces this
    # function (through use_kernels) and warns about cache wrappers.
    global _triton_importable
    if _triton_importable is None:
        try:
            import triton  # noqa: F401

            _triton_importable = True
        except ImportError:
            _triton_importable = False
    return _triton_importable


def interpreting() -> bool:
    """True when Triton runs kernels on the CPU through its interpreter (TRITON_INTERPRET read
    as Triton reads it: 1, true, on, yes or y, in any case)."""
    return os.environ.get("TRITON_INTERPRET", "").lower() in ("1", "true", "on", "yes", "y")


# Triton reads TRITON_INTERPRET once, when a kernel is defined: the kernel modules are imported
# just after this one, so this is the mode they were built in.
_INTERPRETING_AT_IMPORT = interpreting()


def mode() -> str:
    value = os.environ.get("SSLAM_KERNELS", "auto").strip().lower()
    if value not in _VALUES:
        raise ValueError(f"SSLAM_KERNELS={value!r}: expected one of 'auto', '0' or '1'")
    return value or "auto"


def use_kernels(*tensors: torch.Tensor) -> bool:
    """Whether an op given ``tensors`` should take its Triton path (see the module docstring)."""
    value = mode()
    if value == "0":
        return False
    on_cuda = all(t.is_cuda for t in tensors)
    if value == "1":
        if not triton_available():
            raise RuntimeError("SSLAM_KERNELS=1 but Triton is not installed")
        if not on_cuda and not interpreting():
            raise RuntimeError(
                "SSLAM_KERNELS=1 with CPU tensors needs TRITON_INTERPRET=1 (the Triton interpreter)"
            )
        if not on_cuda and not _INTERPRETING_AT_IMPORT:
            raise RuntimeError(
                "TRITON_INTERPRET=1 was set after sslam.kernels was imported, but Triton reads it "
                "when the kernels are defined, so they were built for a GPU: set it before "
                "importing sslam (in the shell, say)"
            )
        return True
    return on_cuda and triton_available()


def call_custom_op() -> bool:
    """Whether a differentiable kernel call must go through its custom op rather than its eager
    ``autograd.Function``: under torch.compile, and under a dispatch mode (fake tensors for
    export or make_fx, where the Function would launch Triton on tensors without data;
    selective activation checkpointing, which keeps the op's outputs instead of running the
    kernel again in the backward). Each mode must see the op."""
    return torch.compiler.is_compiling() or is_in_torch_dispatch_mode()


def traced(*tensors) -> bool:
    """Whether the values of ``tensors`` cannot be read on the host to check them: under
    torch.compile, or when one is a fake tensor (FakeTensorMode, export, make_fx; other values,
    such as a list or None, never are). Checks of shapes still apply then; checks of values are
    skipped."""
    return torch.compiler.is_compiling() or any(is_fake(t) for t in tensors)


def builds_graph(*tensors: torch.Tensor) -> bool:
    """Whether autograd records a call on ``tensors`` (grad mode on and one requires grad):
    ops whose kernel has no backward then take their differentiable reference."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
