"""The optimiser policy of the official recipes: fairseq's ``cosine`` learning-rate schedule
(SPEC 5.6, 6.2) and which parameters weight decay applies to."""

from __future__ import annotations

import math

import torch


def cosine(step: int, total: int, warmup: int, lr: float, min_lr: float) -> float:
    """The learning rate of update ``step``: linear warm-up from ``min_lr`` (fairseq's
    ``warmup_init_lr`` default) to ``lr`` over ``warmup`` updates, then one cosine half-period
    down to ``min_lr`` at ``total``."""
    if step < warmup:
        return min_lr + (lr - min_lr) * step / max(1, warmup)
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_lr + (lr - min_lr) * 0.5 * (1 + math.cos(math.pi * progress))


def decays(name: str, param: torch.Tensor) -> bool:
    """Whether weight decay applies: not to 1-D parameters (norms) and biases, as the official
    recipes group them (the CLS token, 3-D, decays)."""
    return param.ndim > 1 and not name.endswith(".bias")


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW's two groups of ``model``'s trainable parameters: those :func:`decays` names, with
    ``weight_decay``, and the rest, without."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if decays(name, p) else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
