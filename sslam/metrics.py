"""Evaluation metrics: average precision per class, mAP, accuracy."""

from __future__ import annotations

import torch


def average_precision(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-class average precision (the area under the precision-recall step curve, as
    scikit-learn's ``average_precision_score``); 0 for a class without positives, as
    scikit-learn gives it since 1.1 (its recall is set to 1 at every threshold, so no step adds
    area) and as the official evaluation, pinned to scikit-learn 1.3.2, scores it.

    scores, targets: (N, C); targets are 0/1. Ties are broken as scikit-learn does: all items
    with the same score count together."""
    if scores.dim() != 2 or scores.shape != targets.shape:
        # Mismatched shapes would otherwise give NaN for every class or an IndexError.
        raise ValueError(
            f"scores and targets must both be (N, C), got {tuple(scores.shape)} and {tuple(targets.shape)}"
        )
    if scores.isnan().any():
        # argsort puts NaN somewhere arbitrary and a plausible AP would come out; scikit-learn
        # (the official evaluation) refuses NaN scores as well.
        column = int(scores.isnan().any(0).nonzero()[0, 0])
        raise ValueError(f"scores contain NaN (first in class {column})")
    scores, targets = scores.double(), (targets > 0.5).double()
    n, c = scores.shape
    ap = torch.zeros(c, dtype=torch.float64)
    for k in range(c):
        order = torch.argsort(scores[:, k], descending=True, stable=True)
        s, t = scores[order, k], targets[order, k]
        positives = t.sum()
        if positives == 0:
            continue
        tp = t.cumsum(0)
        # Only the last item of a run of equal scores is a threshold.
        threshold = torch.ones(n, dtype=torch.bool)
        threshold[:-1] = s[1:] != s[:-1]
        tp, rank = tp[threshold], (torch.arange(1, n + 1, dtype=torch.float64))[threshold]
        recall_steps = torch.diff(tp / positives, prepend=torch.zeros(1, dtype=torch.float64))
        ap[k] = (recall_steps * tp / rank).sum()
    return ap


def mean_average_precision(scores: torch.Tensor, targets: torch.Tensor) -> float:
    """mAP: the mean over classes of the average precision, a class without positives counting
    as 0, as in the official evaluation (the NaN-mean of scikit-learn 1.3.2's per-class scores,
    which are never NaN). On AudioSet's eval set every class has positives."""
    return float(average_precision(scores, targets).mean())


def accuracy(scores: torch.Tensor, targets: torch.Tensor) -> float:
    """Top-1 accuracy; ``targets`` is (N,) class indices or (N, C) one-hot."""
    if scores.isnan().any():  # argmax would pick the NaN: a diverged model would get a score
        raise ValueError(f"scores contain NaN (first in row {int(scores.isnan().any(1).nonzero()[0, 0])})")
    labels = targets.argmax(1) if targets.dim() == 2 else targets
    return float((scores.argmax(1) == labels).double().mean())
