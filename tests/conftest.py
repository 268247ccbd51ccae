"""Shared fixtures: golden data of the official implementation, devices, seeds."""

from __future__ import annotations

import os
from pathlib import Path

# Kernels are checked on the CPU through Triton's interpreter, which must be chosen before the
# first `triton.jit` runs (module import time). The model and trainer still take the PyTorch
# references on CPU tensors unless SSLAM_KERNELS=1 forces the kernels.
import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

GOLDEN = Path(__file__).resolve().parent / "data" / "golden"


def load_golden(name: str):
    """Load ``tests/data/golden/<name>`` (plain tensors and dicts; safe to load)."""
    return torch.load(GOLDEN / name, weights_only=True)


@pytest.fixture(scope="session")
def golden_fbank():
    return load_golden("fbank.pt")


@pytest.fixture(scope="session")
def golden_tiny_out():
    return load_golden("tiny_out.pt")


@pytest.fixture(scope="session")
def golden_masked_forward():
    return load_golden("masked_forward.pt")


@pytest.fixture(scope="session")
def tiny_ckpt_path() -> Path:
    return GOLDEN / "tiny_ckpt.pt"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def cuda_available() -> bool:
    return torch.cuda.is_available()


requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def interpret_kernels(monkeypatch, module, names):
    """Run ``module``'s kernels in the Triton interpreter even when they, or Triton's own
    library functions (``tl.zeros``, ``tl.sum``, ...), were decorated for a GPU: ``triton.jit``
    decides at decoration time, so this covers imports that happened before the flag was set.
    On a GPU machine the test is skipped: the CUDA tests cover the compiled kernels."""
    if torch.cuda.is_available():
        pytest.skip("kernels are compiled for the GPU here; the CUDA tests cover them")
    import triton.language as tl
    from sslam.kernels import switch
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    for owner in (tl, tl.standard):
        for name in dir(owner):
            fn = getattr(owner, name)
            if isinstance(fn, JITFunction):
                monkeypatch.setattr(owner, name, InterpretedFunction(fn.fn))
    for name in names:
        kernel = getattr(module, name)
        if not isinstance(kernel, InterpretedFunction):
            monkeypatch.setattr(module, name, InterpretedFunction(kernel.fn))
    monkeypatch.setattr(switch, "_INTERPRETING_AT_IMPORT", True)  # rebuilt for the interpreter above
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("SSLAM_KERNELS", "1")


def poison_buffers(monkeypatch, module):
    """Make the buffers a kernel module's host code allocates (``module._new_buffer``) start as
    NaN, so any element a kernel does not write shows."""

    def nan_buffer(shape, dtype, device):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    monkeypatch.setattr(module, "_new_buffer", nan_buffer)
