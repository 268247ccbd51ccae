"""Half-precision networks over fp32 master weights: the "pure" bf16/fp16 training mode.

Autocast keeps the weights and the residual stream in fp32 and casts at every matmul: per step
that is a cast of each matmul's input and of its gradient, fp32 LayerNorms and mixed-dtype
residual adds -- the largest share of a training step's copies. The official runs instead train
a ``.half()`` model with fp32 master weights in the optimizer (SPEC 5.6: fp16). Here the
optimizer, the EMA teacher and the checkpoints keep the fp32 parameters; for a step's forward
and backward each network reads a half copy of them, made once per step, so every activation
is half and the gradients reach the fp32 parameters through the casts (in fp32).

The weights are cast in one multi-tensor copy (a few launches on CUDA, not one per tensor), and
their gradients go back to fp32 in one as well, once the backward has reached every weight.

Under autocast the same helper, given ``only=MATMUL_MODULES``, casts the weights autocast would
cast at every use (an op and a backward node each) once per update instead: the values, and
so the losses and gradients, are the same bit for bit.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

HALF_DTYPES = (torch.bfloat16, torch.float16)

# The modules whose parameters autocast casts to its half type at every use (matmuls); the
# others (LayerNorm, the CLS token) it runs in fp32.
MATMUL_MODULES = (nn.Linear, nn.Conv1d, nn.Conv2d)

PRECISIONS = ("auto", "fp32", "bf16", "fp16")  # auto: bf16 on CUDA, fp32 on CPU
# Pretraining can also run its networks wholly in the half type over fp32 master weights
# (sslam.precision), as the official fp16 runs do, instead of autocast.
TRAIN_PRECISIONS = PRECISIONS + ("bf16-pure", "fp16-pure")
HALF = {"bf16": torch.bfloat16, "fp16": torch.float16}


def resolved_precision(precision: str, device_type: str) -> str:
    """``precision`` with ``auto`` made concrete: bf16 on CUDA, fp32 on the CPU."""
    if precision != "auto":
        return precision
    return "bf16" if device_type == "cuda" else "fp32"


def _copies(tensors: list[torch.Tensor], dtype: torch.dtype) -> list[torch.Tensor]:
    """``[t.to(dtype) for t in tensors]`` in one multi-tensor copy: on CUDA a few launches for
    all of them, when every tensor has the first one's dtype and its copy its strides (which
    ``empty_like`` keeps for dense tensors); one copy per tensor otherwise."""
    out = [torch.empty_like(t, dtype=dtype) for t in tensors]
    torch._foreach_copy_(out, tensors)
    return out


class _Cast(torch.autograd.Function):
    """Casts tensors of one dtype to another; the gradients come back in the inputs' dtype."""

    @staticmethod
    def forward(ctx, dtype: torch.dtype, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        ctx.set_materialize_grads(False)  # an unused cast has no gradient: None, not zeros
        ctx.source_dtype = tensors[0].dtype
        return tuple(_copies(list(tensors), dtype))

    @staticmethod
    def backward(ctx, *grads: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
        present = [i for i, g in enumerate(grads) if g is not None]
        if not present:
            return (None,) * (len(grads) + 1)
        out: list[torch.Tensor | None] = [None] * len(grads)
        for i, g in zip(present, _copies([grads[i] for i in present], ctx.source_dtype)):
            out[i] = g
        return (None, *out)


def _groups(params: Iterable[torch.Tensor]) -> list[list[torch.Tensor]]:
    """``params`` grouped by dtype and whether they require gradients: one cast for each."""
    groups: dict[tuple[torch.dtype, bool], list[torch.Tensor]] = {}
    for p in params:
        groups.setdefault((p.dtype, p.requires_grad), []).append(p)
    return list(groups.values())


@contextmanager
def half_weights(
    modules: Iterable[nn.Module], dtype: torch.dtype, only: tuple[type[nn.Module], ...] | None = None
) -> Iterator[None]:
    """Within the block, every floating parameter of ``modules`` (held by a module of a type in
    ``only``, when given) reads as its cast to ``dtype`` (differentiable where the parameter
    requires gradients); the parameters are back on exit.

    Keep the block open through the backward: blocks recomputed there (activation
    checkpointing) read the weights again. A parameter shared by several modules gets one cast.
    """
    if dtype not in HALF_DTYPES:
        raise ValueError(f"half_weights: dtype must be torch.bfloat16 or torch.float16, got {dtype}")
    slots: dict[int, list[tuple[nn.Module, str]]] = {}  # id(param) -> where it is held
    params: dict[int, nn.Parameter] = {}
    for module in modules:
        for owner in module.modules():
            if only is not None and not isinstance(owner, only):
                continue
            for name, param in owner._parameters.items():
                if param is not None and param.is_floating_point() and param.dtype != dtype:
                    params.setdefault(id(param), param)
                    slots.setdefault(id(param), []).append((owner, name))
    try:
        for group in _groups(params.values()):
            for param, cast in zip(group, _Cast.apply(dtype, *group)):
                for owner, name in slots[id(param)]:
                    # Written into the dict directly: nn.Module.__setattr__ accepts only
                    # Parameters there, and the cast is a plain (non-leaf) tensor.
                    owner._parameters[name] = cast
        yield
    finally:
        for key, param in params.items():
            for owner, name in slots[key]:
                owner._parameters[name] = param
