"""Half-precision networks over fp32 master weights: the "pure" bf16/fp16 training mode.

Autocast keeps the weights and the residual stream in fp32 and casts at every matmul: per step
that is a cast of each matmul's input and of its gradient, fp32 LayerNorms and mixed-dtype
residual adds -- the largest share of a training step's copies. The official runs instead train
a ``.half()`` model with fp32 master weights in the optimizer (SPEC 5.6: fp16). Here the
optimizer, the EMA teacher and the checkpoints keep the fp32 parameters; for a step's forward
and backward each network reads a half copy of them, made once per step, so every activation
is half and the gradients reach the fp32 parameters through the casts (in fp32).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

HALF_DTYPES = (torch.bfloat16, torch.float16)


@contextmanager
def half_weights(modules: Iterable[nn.Module], dtype: torch.dtype) -> Iterator[None]:
    """Within the block, every floating parameter of ``modules`` reads as its cast to ``dtype``
    (differentiable where the parameter requires gradients); the parameters are back on exit.

    Keep the block open through the backward: blocks recomputed there (activation
    checkpointing) read the weights again. A parameter shared by several modules gets one cast.
    """
    if dtype not in HALF_DTYPES:
        raise ValueError(f"half_weights: dtype must be torch.bfloat16 or torch.float16, got {dtype}")
    casts: dict[int, torch.Tensor] = {}
    swapped: list[tuple[nn.Module, str, nn.Parameter]] = []
    try:
        for module in modules:
            for owner in module.modules():
                for name, param in owner._parameters.items():
                    if param is None or not param.is_floating_point():
                        continue
                    if id(param) not in casts:
                        casts[id(param)] = param.to(dtype)
                    # Written into the dict directly: nn.Module.__setattr__ accepts only
                    # Parameters there, and the cast is a plain (non-leaf) tensor.
                    owner._parameters[name] = casts[id(param)]
                    swapped.append((owner, name, param))
        yield
    finally:
        for owner, name, param in reversed(swapped):
            owner._parameters[name] = param
