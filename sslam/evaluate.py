"""Downstream evaluation (SPEC 6): linear probe and fine-tuning, multi-label (mAP) or
single-label (accuracy).

* :func:`linear_probe` -- frozen encoder, CLS -> LayerNorm -> Linear. The fast path extracts the
  CLS features once and trains the head on them; the full path re-encodes every batch with the
  official augmentations (roll, mixup, SpecAugment) and the frozen encoder's drop-path. Several
  seeds give a mean and a spread.
* :class:`Finetuner` -- the whole encoder with layer-wise lr decay 0.65, drop-path 0.1, mixup,
  SpecAugment, roll, optional balanced sampling, warm-up + cosine, atomic checkpoints with exact
  resume, JSONL metrics, and torchrun (DDP).

Clips are padded or cropped to the encoder's ``target_length`` as in the official recipes.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .audio import AudioError, claimed_samples, load_audio
from .augment import mixup, roll_crop, spec_augment, spectrogram_noise
from .checkpoint import CheckpointError, check_state, encoder_fingerprint, load_encoder
from .data import (
    MAX_WORKERS,
    MIN_SAMPLES,
    add_file_names,
    samples_for_frames,
    text_lines,
)
from .embedding import with_preprocessing
from .features import pad_clips, parse_norm, preprocess
from .files import (
    atomic_write,
    check_output_folder,
    checkpoints_in,
    read_json_object,
    remove_temporaries,
)
from .labels import (
    LabeledSplit,
    LabelError,
    SplitAudio,
    clip_id_key,
    clip_names,
    read_split,
    read_text,
    shared_clips,
)
from .metrics import accuracy, mean_average_precision
from .model import BLOCK_CHECKPOINTING, HEAD_NAMES, Encoder, eval_mode, stochastic_depth
from .precision import HALF, PRECISIONS, resolved_precision
from .runs import (
    FINETUNING_PARTS,
    StopTraining,
    changed_settings,
    check_record,
    check_same_start,
    finish_distributed,
    init_distributed,
    load_newest,
    loading_parts,
    metrics_line,
    open_metrics,
    rng_state,
    save_checkpoint,
    set_rng_state,
    stop_distributed,
)
from .schedule import cosine, decays, param_groups
from .train_config import parse_option, split_override


class LinearHead(nn.Module):
    """LayerNorm (eps 1e-6) + Linear on the CLS embedding; weight trunc-normal(0.02), bias 0."""

    def __init__(self, dim: int, num_classes: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.linear = nn.Linear(dim, num_classes)
        nn.init.trunc_normal_(self.linear.weight, std=0.02)
        nn.init.zeros_(self.linear.bias)

    def forward(self, x):
        return self.linear(self.norm(x))


def classification_loss(logits: torch.Tensor, targets: torch.Tensor, multilabel: bool, smoothing: float = 0.1,
                        label_sum: torch.Tensor | None = None) -> torch.Tensor:
    """Multi-label: BCE summed and divided by the sum of the (possibly mixed) targets, as the
    official criterion (``label_sum`` replaces that sum, e.g. the processes' mean of theirs).
    Single-label: cross-entropy with label smoothing on (soft) targets."""
    if multilabel:
        label_sum = targets.sum() if label_sum is None else label_sum
        return F.binary_cross_entropy_with_logits(logits.float(), targets, reduction="sum") / label_sum.clamp(min=1)
    soft = targets * (1 - smoothing) + smoothing / targets.shape[1]
    return -(soft * F.log_softmax(logits.float(), dim=1)).sum(1).mean()


def augmented_smoothing(cfg) -> float:
    """The label smoothing of a run that augments its batches: none where mixup is on, as the
    official loss then takes the (mixed) targets as they are, in every batch (SPEC 6.1)."""
    return 0.0 if cfg.mixup > 0 else cfg.label_smoothing


def default_metric(multilabel: bool) -> str:
    """The metric a task is scored with: mAP when multi-label, accuracy when single-label."""
    return "mAP" if multilabel else "accuracy"


def score(logits: torch.Tensor, targets: torch.Tensor, multilabel: bool, metric: str | None = None) -> tuple[str, float]:
    """mAP for multi-label heads (sigmoid scores), accuracy for single-label ones; ``metric``
    forces 'mAP' (softmax scores for a single-label head) or 'accuracy'."""
    metric = metric or default_metric(multilabel)
    if metric == "mAP":
        scores = logits.sigmoid() if multilabel else logits.softmax(1)
        return "mAP", mean_average_precision(scores, targets)
    if metric == "accuracy":
        return "accuracy", accuracy(logits, targets)
    raise ValueError(f"metric={metric!r}: 'mAP' or 'accuracy'")


def _window_samples(encoder: Encoder) -> int:
    """The samples that fill the encoder's input window (more would be cropped anyway)."""
    return samples_for_frames(encoder.input_window()[0])


def _train_samples(encoder: Encoder, cfg) -> int | None:
    """What a training loader keeps of each clip: all of it when the waveform roll is on (the
    roll comes before the crop, SPEC 1.1, so any part of a long clip can reach the window),
    else the window."""
    return None if cfg.roll else _window_samples(encoder)


def _loader(split: LabeledSplit, batch_size: int, max_samples: int | None, workers: int, shuffle: bool = False,
            generator: torch.Generator | None = None, collate_fn=None):
    from torch.utils.data import DataLoader

    # A generator of its own even unshuffled: the loader draws its workers' seed from it, and
    # from the global stream without one, which drop-path and the fine-tuning draws also use.
    return DataLoader(SplitAudio(split, max_samples), batch_size=batch_size, shuffle=shuffle,
                      generator=generator or torch.Generator(), num_workers=workers, collate_fn=collate_fn or _collate)


def _check_splits(train: LabeledSplit, test: LabeledSplit) -> None:
    """Both splits hold clips and share the classes (an empty one would fail later as an empty
    torch.cat, or never yield a training batch), and a single-label task is well posed."""
    for split in (train, test):
        if len(split) == 0:
            raise ValueError(f"split {split.name!r} is empty: no clips to {'train on' if split is train else 'score'}")
    if train.class_names != test.class_names:
        raise ValueError(f"{train.name} and {test.name} have different classes")
    if not train.class_names:
        raise ValueError(f"split {train.name!r} names no classes: its labels column is empty")
    # Classes from descriptors can be named by no clip: a split without any label leaves nothing
    # to learn, or (to score) an mAP of 0 whatever the encoder. (Single-label splits are checked
    # clip by clip below.)
    if train.multilabel or test.multilabel:
        for split, purpose in ((train, "nothing to learn"),
                               (test, "its mAP is 0 whatever the encoder")):
            if not bool(split.targets.any()):
                raise ValueError(f"split {split.name!r}: no clip has a label; {purpose}")
        scored = test.targets.bool()[:, test.targets.bool().any(0)]  # the classes with positives
        if bool(scored.all()):
            raise ValueError(f"split {test.name!r}: every clip carries every class it holds; its mAP is the same "
                             "whatever the encoder (a detection test needs clips without the class)")
    else:
        # Single-label: softmax over the classes and accuracy. One class leaves nothing to learn
        # (accuracy 1.0 whatever the encoder), and a clip without a label would count as class 0.
        if len(train.class_names) < 2:
            raise ValueError(f"split {train.name!r} has one class ({train.class_names[0]!r}): a single-label "
                             "task needs at least two (detecting one class is multi-label: --task multilabel)")
        for split in (train, test):
            counts = split.targets.sum(1)
            for count, problem in ((int((counts == 0).sum()), "without a label"),
                                   (int((counts > 1).sum()), "with several labels")):
                if count:
                    raise ValueError(f"split {split.name!r}: {count} clip(s) {problem}; a single-label split "
                                     "needs one label per clip")


def _check_readable(split: LabeledSplit) -> None:
    """Every clip of ``split`` has a header that reads (fast: no decoding): an evaluation that
    meets an unreadable clip ends a fine-tuning run, losing the steps since its last checkpoint
    (all of them, at the first evaluation), so such clips are named before any training."""
    if not isinstance(split.items, list):  # synthetic splits
        return
    bad = [path for path in split.items if claimed_samples(path, 16000) == 0]
    if bad:
        try:
            load_audio(bad[0])
            reason = "its header claims no samples"
        except AudioError as exc:
            reason = str(exc)
        raise LabelError(f"split {split.name!r}: {len(bad)} clip(s) cannot be read, e.g. {reason}; each evaluation "
                         "reads them all: fix or remove them first")


def _collate(items):
    """An evaluation batch: waves (B, N) zero-padded, lengths (B,), targets (B, C)."""
    waves, targets = zip(*items)
    return *pad_clips(waves), torch.stack(targets)


def _collate_clips(items):
    """A training batch: the clips unpadded (list of B 1-D tensors), targets (B, C). They are
    padded after the roll has cropped them, so a long clip does not pad the whole batch."""
    waves, targets = zip(*items)
    return list(waves), torch.stack(targets)


def _features(encoder: Encoder, waves, lengths) -> torch.Tensor:
    frames, norm = encoder.input_window()
    device = next(encoder.parameters()).device
    # The lengths stay on the CPU, where preprocess reads them without waiting for the GPU; a
    # blocking copy of the waves would wait for the GPU's queued work too.
    return preprocess(waves.to(device, non_blocking=True), 16000, frames, norm, lengths=lengths,
                      check_finite=False)  # checked when decoded


def _cls_batches(encoder: Encoder, split: LabeledSplit, batch_size: int, workers: int):
    """The split's CLS embeddings, (B, D) per batch in order, each clip padded/cropped to the
    encoder's window (in the encoder's current mode)."""
    for waves, lengths, _ in _loader(split, batch_size, _window_samples(encoder), workers):
        yield encoder(_features(encoder, waves, lengths)).x[:, 0]


@torch.inference_mode()
def extract_cls(encoder: Encoder, split: LabeledSplit, batch_size: int = 32, workers: int = 0) -> torch.Tensor:
    """CLS embeddings (N, D) of a split, each clip padded/cropped to the encoder's window (in
    eval mode; the encoder is handed back in the mode it had)."""
    with eval_mode(encoder):
        return torch.cat([cls.float().cpu() for cls in _cls_batches(encoder, split, batch_size, workers)])


# ---- linear probe -------------------------------------------------------------------------


@dataclass
class ProbeConfig:
    """Linear evaluation (SPEC 6.2, SPASS linear eval): lr 1e-3 -> 1e-6 cosine, no warm-up,
    batch 48, weight decay 0.05 on the weight matrix."""

    epochs: int = 50  # run as floor(n * epochs / batch_size) updates, as the official scripts (probe_updates)
    lr: float = 1e-3
    min_lr: float = 1e-6
    batch_size: int = 48
    weight_decay: float = 0.05
    label_smoothing: float = 0.1
    fast: bool = True  # cached features; False re-encodes every batch with augmentations
    mixup: float = 0.8
    mixup_prob: float = 0.9
    mask_ratio: float = 0.2
    roll: bool = True
    noise: bool = False  # Speech Commands' spectrogram noise and time roll (SPEC 6.2)
    # Full path only: the frozen encoder keeps stochastic depth while the head trains, as the
    # official linear evaluation leaves it in train mode (SPEC 9.10); 0 gives fixed features.
    drop_path: float = 0.1
    # last: the head after its last update. best: its best score on the test split at an epoch's
    # end or the run's, the official model selection (SPEC 9.12), a choice made on the test data.
    select: str = "last"


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Every group's learning rate: ``lr`` times its ``lr_scale`` (layer decay) if it has one."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def _head_optimizer(head: LinearHead, cfg: ProbeConfig):
    return torch.optim.AdamW(param_groups(head, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.95))


def probe_updates(n: int, cfg: ProbeConfig) -> int:
    """A probe's updates over ``n`` training clips, counted as the official scripts set
    max_update: floor(n * epochs / batch) (SPEC 6.2: 3,906 for SPASS's 3,750 clips in 50 epochs
    of 79 batches), so the run stops inside its last epoch, where the cosine ends."""
    return max(1, n * cfg.epochs // cfg.batch_size)


def _ends_epoch(update: int, per_epoch: int, total: int) -> bool:
    """Whether a probe's ``update``-th update (from 1) closes an epoch of ``per_epoch`` updates
    or the run: where the official runs validate."""
    return update % per_epoch == 0 or update == total


def _epoch_orders(n: int, epochs: int, generator: torch.Generator):
    """A fresh random order of ``n`` items per epoch, drawn as each epoch starts."""
    for _ in range(epochs):
        yield torch.randperm(n, generator=generator)


def train_probe_on_features(features: torch.Tensor, targets: torch.Tensor, multilabel: bool, cfg: ProbeConfig,
                            seed: int, at_epoch_end=None) -> LinearHead:
    """The fast path: the head trained on cached CLS features (no augmentation).
    ``at_epoch_end(head)``, if given, is called at each epoch's end and the run's."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    head = LinearHead(features.shape[1], targets.shape[1])
    opt = _head_optimizer(head, cfg)
    n = features.shape[0]
    total = probe_updates(n, cfg)
    batches = (perm[i : i + cfg.batch_size] for perm in _epoch_orders(n, cfg.epochs, g)
               for i in range(0, n, cfg.batch_size))
    for step, idx in zip(range(total), batches):  # the last epoch cut at `total` updates
        set_lr(opt, cosine(step, total, 0, cfg.lr, cfg.min_lr))
        loss = classification_loss(head(features[idx]), targets[idx], multilabel, cfg.label_smoothing)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if at_epoch_end is not None and _ends_epoch(step + 1, math.ceil(n / cfg.batch_size), total):
            at_epoch_end(head)
    return head.eval()


def _augmented_spec(encoder, clips, targets, cfg, rng):
    """A training batch's augmented features and targets, in the official order: roll each whole
    clip, crop it to the window, features (and Speech Commands' noise, which the official
    loader adds to each clip's), then mixup and SpecAugment (which its model applies to the
    batch). clips: B 1-D tensors (cropped to the window on load when the roll is off), targets
    (B, C); cfg: a ProbeConfig or a FinetuneConfig (its mixup, mixup_prob, mask_ratio, roll and
    noise)."""
    waves, lengths = roll_crop(clips, rng, _window_samples(encoder)) if cfg.roll else pad_clips(clips)
    spec = _features(encoder, waves, lengths)
    if cfg.noise:
        spec = spectrogram_noise(spec, rng)
    targets = targets.to(spec.device, non_blocking=True)  # a blocking copy would wait for the features
    spec, targets = mixup(spec, targets, rng, cfg.mixup, cfg.mixup_prob)
    spec = spec_augment(spec, spec.shape[3] * cfg.mask_ratio, spec.shape[2] * cfg.mask_ratio, rng)
    return spec, targets


def train_probe_full(encoder: Encoder, train: LabeledSplit, cfg: ProbeConfig, seed: int, workers: int = 0, *,
                     multilabel: bool, at_epoch_end=None) -> LinearHead:
    """The full path: every batch is augmented and re-encoded by the frozen encoder.
    ``at_epoch_end(head)``, if given, is called at each epoch's end and the run's."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    device = next(encoder.parameters()).device
    head = LinearHead(encoder.cfg.embed_dim, train.targets.shape[1]).to(device)
    opt = _head_optimizer(head, cfg)
    loader = _loader(train, cfg.batch_size, _train_samples(encoder, cfg), workers, shuffle=True,
                     generator=torch.Generator().manual_seed(seed), collate_fn=_collate_clips)
    total = probe_updates(len(train), cfg)
    batches = (batch for _ in range(cfg.epochs) for batch in loader)
    for step, (clips, targets) in zip(range(total), batches):  # the last epoch cut at `total` updates
        spec, targets = _augmented_spec(encoder, clips, targets, cfg, rng)
        with torch.no_grad(), stochastic_depth(encoder, cfg.drop_path):  # then as it was
            cls = encoder(spec).x[:, 0].float()
        set_lr(opt, cosine(step, total, 0, cfg.lr, cfg.min_lr))
        loss = classification_loss(head(cls), targets, multilabel, augmented_smoothing(cfg))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if at_epoch_end is not None and _ends_epoch(step + 1, len(loader), total):
            at_epoch_end(head)
    return head.eval()


def linear_probe(encoder: Encoder, train: LabeledSplit, test: LabeledSplit, cfg: ProbeConfig | None = None,
                 seeds=(0,), workers: int = 0, cache: dict | None = None, metric: str | None = None) -> dict:
    """Train a linear head per seed and score it on ``test``: {'metric', 'mean', 'std',
    'per_seed', 'seconds'}, and 'per_seed_epoch' (the epoch scored, from 1) with
    ``cfg.select == 'best'``. ``cache`` may carry extracted features between calls with the same
    encoder, keyed by split object (two splits may share a name: fold1/labels.csv and
    fold2/labels.csv); ``metric`` overrides the split's natural metric (see :func:`score`)."""
    _check_splits(train, test)
    cfg = cfg or ProbeConfig()
    check_settings(cfg)
    seeds = list(seeds)
    if not seeds:  # checked before the features are extracted, not after
        raise ValueError("seeds: at least one seed is needed")
    if isinstance(workers, bool) or not isinstance(workers, int) or not 0 <= workers <= MAX_WORKERS:
        raise ValueError(f"workers={workers!r}: must be an int in [0, {MAX_WORKERS}]")
    # As the fine-tuner decides: a train split whose clips happen to carry one label each is
    # still multi-label when the test split is (BCE and mAP, not softmax and accuracy).
    multilabel = train.multilabel or test.multilabel
    start = time.perf_counter()
    cache = {} if cache is None else cache
    for split in (train, test) if cfg.fast else (test,):  # the full path encodes its own batches
        cached = cache.get(id(split))
        if cached is None or cached[0] is not split:  # the entry keeps its split, so its id is unique
            cache[id(split)] = (split, extract_cls(encoder, split, workers=workers))
    test_x = cache[id(test)][1]
    results, epochs = [], []
    for seed in seeds:
        scores = []

        def score_head(head, scores=scores):  # on the test split's cached features; this seed's list
            with torch.no_grad():
                name, value = score(head(test_x.to(head.norm.weight.device)).cpu(), test.targets, multilabel, metric)
            scores.append((name, value))

        at_epoch_end = score_head if cfg.select == "best" else None
        if cfg.fast:
            head = train_probe_on_features(cache[id(train)][1], train.targets, multilabel, cfg, seed, at_epoch_end)
        else:
            head = train_probe_full(encoder, train, cfg, seed, workers, multilabel=multilabel, at_epoch_end=at_epoch_end)
        if at_epoch_end is None:
            score_head(head)
        # A tie picks the later epoch, as fairseq's is_better (a >= b) does.
        chosen = max(range(len(scores)), key=lambda i: (scores[i][1], i))
        name, value = scores[chosen]
        results.append(value)
        epochs.append(chosen + 1)
    values = torch.tensor(results, dtype=torch.float64)
    result = {"metric": name, "mean": float(values.mean()),
              "std": float(values.std()) if len(results) > 1 else 0.0, "per_seed": results,
              "seconds": time.perf_counter() - start}
    return result | ({"per_seed_epoch": epochs} if cfg.select == "best" else {})


# ---- fine-tuning --------------------------------------------------------------------------


@dataclass
class FinetuneConfig:
    """Fine-tuning (SPEC 6.1-6.2; defaults: the AS-20K / SPASS recipe scaled by ``steps``)."""

    steps: int = 4000
    warmup: int | None = None  # None: 10 % of the steps, as every recipe of SPEC 6.2
    lr: float = 5e-5
    min_lr: float = 1e-6
    batch_size: int = 48
    weight_decay: float = 0.05
    layer_decay: float = 0.65
    drop_path: float = 0.1
    label_smoothing: float = 0.1
    mixup: float = 0.8
    mixup_prob: float = 0.9
    mask_ratio: float = 0.2
    roll: bool = True
    noise: bool = False  # Speech Commands' spectrogram noise and time roll (SPEC 6.2)
    # auto: BCE for multi-label tasks, cross-entropy for single-label ones; bce: BCE for these
    # too, as the Speech Commands recipe with mixup (SPEC 6.1; BCE takes the targets as they
    # are, without label smoothing)
    loss: str = "auto"
    balanced_weights: str = ""  # a file with one sampling weight per training clip
    epoch_size: int = 0  # clips drawn per epoch with balanced sampling (needed with balanced_weights)
    eval_every: int = 0  # 0: at the end of every epoch, as the official runs validate (SPEC 6.1)
    ckpt_every: int = 500
    keep_last: int = 2
    out: str = "runs/finetune"
    precision: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | fp32 | bf16 | fp16
    checkpoint_blocks: str = "off"  # off | selective | full: recompute block activations in the backward
    workers: int = 2
    seed: int = 0

    @property
    def warmup_steps(self) -> int:
        return warmup_steps(self.steps, self.warmup)


def warmup_steps(steps: int, warmup: int | None) -> int:
    """The warm-up a fine-tuning run uses: ``warmup``, or 10 % of its steps when None."""
    return steps // 10 if warmup is None else warmup


# Ranges of the probe's and the fine-tuner's settings; a field either config lacks is skipped.
_SETTING_RANGES = {
    "epochs": (1, math.inf), "steps": (1, math.inf), "batch_size": (1, math.inf),
    "eval_every": (0, math.inf), "ckpt_every": (1, math.inf), "keep_last": (1, math.inf),
    "warmup": (0, math.inf), "epoch_size": (0, math.inf), "workers": (0, MAX_WORKERS), "seed": (0, 2**63 - 1),
    "lr": (0, math.inf), "min_lr": (0, math.inf), "weight_decay": (0, math.inf), "mixup": (0, math.inf),
    "layer_decay": (0, 1), "mixup_prob": (0, 1), "drop_path": (0, 0.999), "label_smoothing": (0, 0.999),
    "mask_ratio": (0, 0.999),
}


def _finite(value: int | float) -> bool:
    try:
        return math.isfinite(value)
    except OverflowError:  # an int past any float
        return False


def check_settings(cfg: ProbeConfig | FinetuneConfig) -> None:
    """Refuse a setting outside its range, naming it: a zero ckpt_every divides by zero after
    the first step, a negative layer_decay gives some blocks negative learning rates. A
    fine-tuning run's choices must be known ones and its ``out`` must be able to be a folder."""
    for name, (low, high) in _SETTING_RANGES.items():
        if not hasattr(cfg, name):
            continue
        value = getattr(cfg, name)
        if name == "warmup" and value is None:  # 10 % of the steps
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not _finite(value) or not low <= value <= high:
            span = f"a finite number >= {low}" if high == math.inf else f"in [{low}, {high}]"
            raise ValueError(f"{name}={value!r}: must be {span}")
    if isinstance(cfg, ProbeConfig) and cfg.select not in ("last", "best"):
        raise ValueError(f"select={cfg.select!r}: 'last' (the head after its last update) or 'best' (its best "
                         "epoch on the test split, the official model selection)")
    if cfg.min_lr > cfg.lr:
        raise ValueError(f"min_lr={cfg.min_lr} must be at most lr={cfg.lr}")
    if hasattr(cfg, "warmup") and cfg.warmup_steps >= cfg.steps:  # the lr would never reach its peak
        raise ValueError(f"warmup={cfg.warmup} must be below steps={cfg.steps} (SPEC 6.2 warms up for 10% of them)")
    if getattr(cfg, "layer_decay", 1) == 0:
        raise ValueError("layer_decay=0 would give every block a learning rate of 0 (1 is no decay)")
    if isinstance(cfg, FinetuneConfig):
        if cfg.precision not in PRECISIONS:
            raise ValueError(f"precision={cfg.precision!r}: auto, fp32, bf16 or fp16")
        if cfg.checkpoint_blocks not in BLOCK_CHECKPOINTING:
            raise ValueError(f"checkpoint_blocks={cfg.checkpoint_blocks!r}: one of {BLOCK_CHECKPOINTING}")
        if cfg.loss not in ("auto", "bce"):
            raise ValueError(f"loss={cfg.loss!r}: 'auto' (BCE for multi-label tasks, cross-entropy otherwise) or "
                             "'bce' (also for single-label ones)")
        check_output_folder(cfg.out)


def layer_decay_groups(model: Encoder, cfg: FinetuneConfig) -> list[dict]:
    """Block i (0-based) gets lr x decay^(depth - i); the patch embedding, CLS, pre-LN and the
    head get x1 (the official grouping). No weight decay on 1-D parameters and biases."""
    depth = model.cfg.depth
    groups: dict[tuple[float, float], list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        scale = cfg.layer_decay ** (depth - int(name.split(".")[1])) if name.startswith("blocks.") else 1.0
        wd = cfg.weight_decay if decays(name, p) else 0.0
        groups.setdefault((scale, wd), []).append(p)
    return [{"params": ps, "lr_scale": s, "weight_decay": wd} for (s, wd), ps in groups.items()]


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def read_weights(path: str, n: int, items=None) -> torch.Tensor:
    """Per-clip sampling weights of the n training clips, in their order: one number per line,
    or ``path,weight`` lines (the last column is the weight). Where lines name files and
    ``items`` lists the split's files, each line must name the clip at its position: weights
    in another order would go to other clips."""
    values = []
    for number, line in enumerate(text_lines(read_text(Path(path))), start=1):
        if not line.strip():
            continue
        fields = next(csv.reader([line]))
        try:
            values.append(float(fields[-1]))
        except ValueError:
            raise LabelError(f"{path}:{number}: {line!r} is not a number") from None
        named = fields[0].strip() if len(fields) > 1 and not _is_number(fields[0]) else None
        if named and isinstance(items, list) and len(values) <= len(items):
            clip = Path(items[len(values) - 1])
            if clip_id_key(named) not in clip_names(clip):
                raise LabelError(f"{path}:{number}: the weight of {named} where the training split has {clip.name}; "
                                 "the weights must follow the split's order")
    if len(values) != n:
        raise LabelError(f"{path}: {len(values)} weights for {n} training clips")
    bad = [i + 1 for i, v in enumerate(values) if not (math.isfinite(v) and v >= 0)]
    if bad:  # torch.multinomial would fail with "probability tensor contains inf, nan or < 0"
        raise LabelError(f"{path}: sampling weights must be finite and >= 0; weight(s) number {bad[:10]} "
                         "(counting from 1) are not")
    return torch.tensor(values, dtype=torch.float64)


# Fine-tuning settings a resumed run may change: where it writes, how often it evaluates, saves
# and logs, its loader processes, its block checkpointing (memory, not results), and ``steps``
# (extending or shortening a run stretches the rest of the schedule), as
# sslam.train.RESUME_MAY_CHANGE allows for pretraining.
FINETUNE_RESUME_MAY_CHANGE = frozenset({"steps", "eval_every", "ckpt_every", "keep_last", "out", "workers",
                                        "checkpoint_blocks"})


def split_fingerprint(split: LabeledSplit) -> str:
    """What identifies a split's data for a resume: its labels and its files' names (not their
    folders: the data may move), as a short hash."""
    digest = hashlib.sha256(split.targets.numpy().tobytes())
    if isinstance(split.items, list):
        add_file_names(digest, split.items)
    else:
        digest.update(split.name.encode())
    return digest.hexdigest()[:16]


def finetune_resume_conflicts(saved: dict, now: dict, where: str = "checkpoint") -> list[str]:
    """What differs between the fine-tuning checkpoint ``saved`` (or a run's record, ``where``)
    and this run's identity ``now`` (see ``Finetuner._identity``) in a way a resumed run cannot
    follow: settings, training and test data (their :func:`split_fingerprint`; the best so far
    was measured on the test split), classes and label kind (the loss), encoder architecture,
    the input's preprocessing, number of processes (which splits every epoch's clips and sets
    the global batch). As ``key: <saved> in the <where>, <now> now``."""
    def effective(config: dict) -> dict:  # the warm-up in effect, compared
        return {**config, "warmup": warmup_steps(config.get("steps", 0), config.get("warmup", 0))}

    before, after = effective(saved.get("config") or {}), effective(now["config"])
    conflicts = changed_settings(before, after, FINETUNE_RESUME_MAY_CHANGE, f"the {where}")
    if now["config"].get("warmup") is None:  # a warm-up that other --steps changed: said how to keep it
        conflicts = [f"{c} (without --warmup it is 10 % of --steps: give --warmup={before['warmup']} to keep it)"
                     if c.startswith("warmup:") else c for c in conflicts]
    for kind, key in (("training", "train_split"), ("test", "test_split")):
        if saved.get(key) not in (None, now[key]):  # (older checkpoints hold no fingerprint)
            conflicts.append(f"{kind} split: other clips or labels than the {where}'s ({saved[key]} in the "
                             f"{where}, {now[key]} now)")
    if saved.get("start_encoder") not in (None, now["start_encoder"]):  # (older checkpoints hold none)
        conflicts.append(f"starting encoder: other weights than the {where}'s ({saved['start_encoder']} in the "
                         f"{where}, {now['start_encoder']} now): resume with the same --checkpoint and --weights")
    old_names, class_names = saved.get("class_names"), now["class_names"]
    if old_names is not None and list(old_names) != list(class_names):
        conflicts.append(f"classes: {len(old_names)} in the {where} ({', '.join(map(str, old_names[:4]))}, ...), "
                         f"{len(class_names)} now ({', '.join(map(str, class_names[:4]))}, ...)")
    if saved.get("multilabel", now["multilabel"]) != now["multilabel"]:
        conflicts.append(f"multilabel: {saved['multilabel']!r} in the {where}, {now['multilabel']!r} now")
    encoder = lambda config: {f"encoder.{key}": value for key, value in config.items()}  # noqa: E731
    # drop-path is a fine-tuning setting and the head size follows the classes: both reported above
    conflicts += changed_settings(encoder(saved.get("encoder_config") or {}), encoder(now["encoder_config"]),
                                  {"encoder.drop_path_rate", "encoder.num_classes"}, f"the {where}")
    old_prep = saved.get("preprocessing")
    as_json = lambda prep: json.loads(json.dumps(dict(prep)))  # noqa: E731  a (mean, std) norm is a tuple or a list
    if old_prep is not None and as_json(old_prep) != as_json(now["preprocessing"]):
        conflicts.append(f"preprocessing: {dict(old_prep)} in the {where}, {dict(now['preprocessing'])} now")
    old_world = int(saved.get("world_size", now["world_size"]))
    if old_world != now["world_size"]:
        conflicts.append(f"processes: {old_world} in the {where}, {now['world_size']} now")
    return conflicts


class Classifier(nn.Module):
    """An encoder with its fine-tuning head, as one module (what DDP wraps)."""

    def __init__(self, encoder: Encoder):
        super().__init__()
        self.encoder = encoder

    def forward(self, spec: torch.Tensor) -> torch.Tensor:
        return self.encoder.classify(self.encoder(spec).x[:, 0])


def with_head(encoder: Encoder, class_names: list[str], drop_path: float) -> Encoder:
    """A copy of ``encoder`` with a fresh classification head for ``class_names`` and drop-path."""
    # fc_norm with the official fine-tuning eps, 1e-6, whatever head the encoder came with.
    cfg = encoder.cfg.replace(num_classes=len(class_names), drop_path_rate=drop_path, head_norm_eps=1e-6)
    model = Encoder(cfg).to(next(encoder.parameters()).device)
    # An already fine-tuned encoder (e.g. the AS-2M model) brings its own head: drop it, or a
    # head for another number of classes fails to load (and one of the same size is not fresh).
    body = {k: v for k, v in encoder.state_dict().items() if k not in HEAD_NAMES}
    missing, unexpected = model.load_state_dict(body, strict=False)
    if unexpected or set(missing) - set(HEAD_NAMES):
        raise ValueError(f"encoder weights do not fit: missing {missing}, unexpected {unexpected}")
    model.preprocessing = dict(encoder.preprocessing)
    model.label_names = list(class_names)
    return model


class Finetuner:
    """Fine-tune an encoder on a labelled split (see :class:`FinetuneConfig`). A run whose output
    folder holds checkpoints resumes from the newest one; the result is also exported in the
    sslam format (``out/model``) with its label names, ready for ``sslam extract``."""

    def __init__(self, encoder: Encoder, train: LabeledSplit, test: LabeledSplit, cfg: FinetuneConfig, log=print):
        _check_splits(train, test)
        check_settings(cfg)
        _check_readable(test)
        self.cfg, self.train_split, self.test_split = cfg, train, test
        self.split_prints = split_fingerprint(train), split_fingerprint(test)  # fixed for the run: hashed once
        # The weights it starts from (--checkpoint, --weights); architecture and preprocessing
        # are compared on their own.
        self.start_print = encoder_fingerprint(encoder, weights_only=True)
        self.multilabel = train.multilabel or test.multilabel
        device = next(encoder.parameters()).device
        self.dist = init_distributed(device.type)
        self.log = log if self.dist.rank == 0 else (lambda *a, **k: None)
        self.out = Path(cfg.out)
        torch.manual_seed(cfg.seed)
        self.bce = self.multilabel or cfg.loss == "bce"
        self.model = with_head(encoder, train.class_names, cfg.drop_path).train()
        self.model.set_block_checkpointing(cfg.checkpoint_blocks)
        self.module: nn.Module = Classifier(self.model)
        if self.dist.world_size > 1:
            from torch.nn.parallel import DistributedDataParallel

            self.module = DistributedDataParallel(self.module, device_ids=[device.index] if device.type == "cuda" else None)
        # fairseq's adam with the official recipes' betas (EAT fine-tuning: 0.9, 0.95).
        self.optimizer = torch.optim.AdamW(layer_decay_groups(self.model, cfg), lr=cfg.lr, betas=(0.9, 0.95))
        precision = resolved_precision(cfg.precision, device.type)
        self.amp = HALF.get(precision)  # None: fp32
        self.scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
        self.weights = read_weights(cfg.balanced_weights, len(train), train.items) if cfg.balanced_weights else None
        self._check_epochs()
        self.step, self.best = 0, None
        existing = checkpoints_in(self.out)
        if self.dist.rank == 0:  # what a killed run was writing
            remove_temporaries(self.out)
        if existing:
            self._load(existing[-1], load_newest(existing))
        else:
            self._check_no_other_record()
        check_same_start(self.dist.world_size, self.step if existing else None, device, self.out)

    RECORD = "finetune.json"  # what a fresh start is: a restart of the same run may go on over it

    def _check_epochs(self) -> None:
        """An epoch is a pass over the training clips, or with balanced weights ``epoch_size``
        clips drawn without replacement (fewer than there are); either way at least one batch
        for every process."""
        cfg, train = self.cfg, self.train_split
        if self.weights is None and cfg.epoch_size:
            raise ValueError(f"epoch_size={cfg.epoch_size}: used only with balanced_weights; without them an epoch "
                             "is one pass over the training clips")
        if self.weights is not None and not cfg.epoch_size:  # drawing all of them is no balancing
            raise ValueError(f"balanced_weights={cfg.balanced_weights}: balanced sampling needs epoch_size, the clips "
                             f"drawn per epoch, fewer than the {len(train)} training clips (AS-2M: 200,000 of ~2M)")
        if self.weights is not None:
            # Balanced epochs draw without replacement: torch.multinomial fails for more draws
            # than clips, and silently draws zero-weight clips once the positive ones run out.
            drawable = int((self.weights > 0).sum())
            if self._epoch_size() > drawable:
                raise ValueError(f"epoch_size={self._epoch_size()}: balanced sampling draws clips without replacement, "
                                 f"but only {drawable} of the {len(train)} training clips have a positive weight in "
                                 f"{cfg.balanced_weights}; use --epoch_size={drawable} or less")
        per_rank = self._epoch_size() // self.dist.world_size
        if per_rank < cfg.batch_size:
            # Batches drop the incomplete last one: with fewer clips than a batch, an epoch
            # yields nothing and the loop would wait for a batch forever.
            raise ValueError(f"{train.name}: {per_rank} training clip(s) per process per epoch, fewer than "
                             f"batch_size={cfg.batch_size}, so an epoch yields no batch; batch_size must lie in "
                             f"[1, {per_rank}] (or use more clips / fewer processes)")

    def _identity(self) -> dict:
        """What a resumed run must share with this one (see :func:`finetune_resume_conflicts`)."""
        return {"format": "sslam-finetune", "config": asdict(self.cfg), "encoder_config": self.model.cfg.to_dict(),
                "class_names": self.train_split.class_names, "preprocessing": dict(self.model.preprocessing),
                "train_split": self.split_prints[0], "test_split": self.split_prints[1],
                "start_encoder": self.start_print, "world_size": self.dist.world_size, "multilabel": self.multilabel}

    def _check_no_other_record(self) -> None:
        """A fresh start cuts metrics.jsonl and replaces best/ and model/: over another run's
        (a pretraining run's, a fine-tuning's with other settings) left without a checkpoint,
        that is refused. The same run started again (stopped before its first checkpoint) goes on."""
        left = [name for name in ("metrics.jsonl", "best", "model") if (self.out / name).exists()
                and not (name == "metrics.jsonl" and (self.out / name).stat().st_size == 0)]
        if not left:
            return
        record = read_json_object(self.out / self.RECORD)
        if record is not None and record.get("format") == "sslam-finetune":
            conflicts = finetune_resume_conflicts(record, self._identity(), "record")
        else:
            conflicts = [f"no {self.RECORD} says they are this fine-tuning's"]
        if conflicts:
            raise ValueError(f"{self.out} holds files of another run and no checkpoint ({', '.join(left)}): "
                             f"{'; '.join(conflicts)}; starting here would overwrite them: choose another --out, "
                             "or remove them")

    def _keep_started_warmup(self, state: dict) -> bool:
        """A run extended or shortened without --warmup keeps the warm-up it started with (10 %
        of the new steps would move the lr schedule under the steps already taken): sets it from
        the checkpoint ``state``'s settings, and says whether it did."""
        saved = state.get("config") or {}
        if self.cfg.warmup is not None or "steps" not in saved:
            return False
        self.cfg = replace(self.cfg, warmup=warmup_steps(saved["steps"], saved.get("warmup")))
        return True

    def _check_resume(self, path: Path, state: dict, warmup_kept: bool) -> None:
        """Refuse to resume from ``path`` when it was written with settings this run changes (the
        run would silently continue with a mix of both)."""
        conflicts = finetune_resume_conflicts(state, self._identity())
        if conflicts:
            raise ValueError(f"{path}: cannot resume fine-tuning with changed settings: " + "; ".join(conflicts)
                             + ". Run with the checkpoint's settings, or choose another out folder.")
        if state["step"] > self.cfg.steps:  # as pretraining: it would stop at once, having done nothing
            raise ValueError(f"{path}: the run is at step {state['step']}, past steps={self.cfg.steps}: give a "
                             "larger one to train on")
        if warmup_kept:  # (otherwise __init__ checked the settings)
            if self.cfg.warmup >= self.cfg.steps:
                raise ValueError(f"{path}: the run's warm-up of {self.cfg.warmup} steps, kept on resume, is not "
                                 f"below steps={self.cfg.steps}: give more steps, or --warmup")
            check_settings(self.cfg)

    def _epoch_size(self) -> int:
        return self.cfg.epoch_size if self.weights is not None else len(self.train_split)

    def _steps_per_epoch(self) -> int:
        return max(1, self._epoch_size() // self.dist.world_size // self.cfg.batch_size)

    def _epoch_indices(self, epoch: int) -> torch.Tensor:
        """This rank's clips of an epoch: a permutation, or a balanced draw without replacement,
        cut to whole steps so that every process runs the same number of batches."""
        # Modulo 2**64, the generator's seed range: every seed the settings allow works.
        g = torch.Generator().manual_seed((self.cfg.seed * 7919 + epoch) % 2**64)
        if self.weights is None:
            order = torch.randperm(len(self.train_split), generator=g)
        else:
            order = torch.multinomial(self.weights, self._epoch_size(), replacement=False, generator=g)
        used = self._steps_per_epoch() * self.dist.world_size * self.cfg.batch_size
        return order[:used][self.dist.rank :: self.dist.world_size]

    def _mean_label_sum(self, targets: torch.Tensor) -> torch.Tensor | None:
        """Under several processes, the mean over them of their batches' label sums: each divides
        its BCE sum by it, and DDP's mean of their gradients is then the gradient of all the
        processes' BCE over all their labels, as fairseq divides the summed loss by the total
        sample size. None in one process (its own sum) and for the cross-entropy."""
        if not self.bce or self.dist.world_size == 1:
            return None
        import torch.distributed as dist

        total = targets.sum().detach().float()
        dist.all_reduce(total)  # queued on the device: no wait for the host
        return total / self.dist.world_size

    def _batches(self):
        """Training batches from the current step on (an exact resume skips what was seen)."""
        from torch.utils.data import DataLoader, Subset

        epoch, skip = divmod(self.step, self._steps_per_epoch())
        audio = SplitAudio(self.train_split, _train_samples(self.model, self.cfg))
        while True:
            indices = self._epoch_indices(epoch)[skip * self.cfg.batch_size :].tolist()
            # Its own generator: a loader without one seeds its workers from the global stream,
            # and drawing there at a resume (not at the epoch's start, as the run did) would
            # shift the stochastic depth of every later step.
            seeds = torch.Generator().manual_seed((self.cfg.seed * 1_000_003 + epoch) % 2**64)
            yield from DataLoader(Subset(audio, indices), batch_size=self.cfg.batch_size, num_workers=self.cfg.workers,
                                  collate_fn=_collate_clips, drop_last=True, generator=seeds)
            epoch, skip = epoch + 1, 0

    @torch.no_grad()
    def evaluate(self) -> tuple[str, float]:
        """(metric name, value) of the model on the test split, in eval mode."""
        with eval_mode(self.model):
            logits = [self.model.classify(cls).float().cpu()
                      for cls in _cls_batches(self.model, self.test_split, self.cfg.batch_size, 0)]
        return score(torch.cat(logits), self.test_split.targets, self.multilabel)

    def fit(self) -> dict:
        cfg = self.cfg
        self.out.mkdir(parents=True, exist_ok=True)
        metrics = None
        if self.dist.rank == 0:
            if self.step == 0:
                text = json.dumps(self._identity(), indent=2) + "\n"
                atomic_write(self.out / self.RECORD, lambda tmp: Path(tmp).write_text(text))
            metrics = open_metrics(self.out, self.step)  # less what was logged after the checkpoint resumed from
        # A finished run, run again, has nothing left to do: it reports its best metric.
        last, start = ({"step": self.step, "best": self.best} if self.step else {}), time.perf_counter()
        batches = self._batches()
        # The steps' losses stay on the device until an evaluation or a checkpoint reads them
        # all at once: reading each would make the host wait for the GPU at every step. (Those
        # after the last checkpoint are logged again by a resumed run anyway.)
        pending: list[torch.Tensor] = []
        eval_every = cfg.eval_every or self._steps_per_epoch()  # 0: at every epoch's end
        try:
            while self.step < cfg.steps:
                clips, targets = next(batches)
                rng = np.random.default_rng([cfg.seed, self.dist.rank, self.step])  # per step: exact resume
                spec, targets = _augmented_spec(self.model, clips, targets, cfg, rng)
                set_lr(self.optimizer, cosine(self.step, cfg.steps, cfg.warmup_steps, cfg.lr, cfg.min_lr))
                with torch.autocast(spec.device.type, dtype=self.amp) if self.amp else nullcontext():
                    logits = self.module(spec)
                loss = classification_loss(logits, targets, self.bce, augmented_smoothing(cfg),
                                           self._mean_label_sum(targets))
                self.optimizer.zero_grad(set_to_none=True)
                self.scaler.scale(loss).backward()
                self.scaler.step(self.optimizer)
                self.scaler.update()
                self.step += 1
                pending.append(loss.detach())
                evaluating = self.step % eval_every == 0 or self.step == cfg.steps
                saving = self.step % cfg.ckpt_every == 0 or self.step == cfg.steps
                if not (evaluating or saving):
                    continue
                first = self.step - len(pending) + 1
                records = [{"step": first + i, "loss": value} for i, value in enumerate(self._global_losses(pending))]
                pending.clear()
                self._stop_if_diverged(records, metrics)
                if evaluating:
                    name, value = self.evaluate()
                    # A tie replaces the best, as fairseq's is_better (a >= b) does.
                    if self.best is None or value >= self.best:
                        self.best = value
                        self._export("best", {name: value})  # the official runs' checkpoint_best.pt
                    last = records[-1]
                    last.update({name: value, "best": self.best, "seconds": time.perf_counter() - start})
                    self.log(" | ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in last.items()))
                if metrics:
                    metrics.writelines(map(metrics_line, records))
                    metrics.flush()
                if saving:
                    self.save()
        finally:
            if metrics:
                metrics.close()
        self._export("model")
        return last

    def _export(self, folder: str, metric: dict | None = None) -> None:
        """The encoder with its head, labels and preprocessing, as ``out/folder`` (main process)."""
        if self.dist.rank == 0:
            from .checkpoint import save_encoder

            source = {"format": "sslam-finetune", "steps": self.step, **(metric or {})}
            save_encoder(self.model, self.out / folder, source=source)

    def _global_losses(self, pending: list[torch.Tensor]) -> list[float]:
        """The steps' losses (each a scalar tensor) averaged over the processes, as the update
        averages their gradients, in one read; a NaN of any process reaches every one."""
        losses = torch.stack(pending)
        if self.dist.world_size > 1:
            import torch.distributed as dist

            dist.all_reduce(losses)
            losses = losses / self.dist.world_size
        return losses.tolist()

    def _stop_if_diverged(self, records: list[dict], metrics) -> None:
        """Stop, saving nothing, after a non-finite loss (``records`` hold the processes' mean,
        so any process's): its update made the weights NaN (an fp16 run's scaler skips such
        steps instead). The losses are logged first."""
        if self.scaler.is_enabled():
            return
        bad = [record["step"] for record in records if not math.isfinite(record["loss"])]
        if not bad:
            return
        if metrics:
            metrics.writelines(map(metrics_line, records))
        kept = checkpoints_in(self.out)
        raise StopTraining(f"step {bad[0]}: the loss is not finite and its update made the weights NaN; nothing was saved "
                           f"after {kept[-1] if kept else 'the start'}. Try a lower lr"
                           + (" or --precision=fp32." if self.amp is not None else "."))

    def save(self) -> None:
        if self.dist.rank != 0:
            return
        state = {**self._identity(), "model": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
                 "optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict(),
                 "step": self.step, "best": self.best, "rng": rng_state()}
        save_checkpoint(self.out, self.step, state, self.cfg.keep_last)

    def _exported_best(self) -> float | None:
        """The metric of the weights in ``OUT/best`` (what :meth:`_export` recorded), or None."""
        source = (read_json_object(self.out / "best" / "config.json") or {}).get("source")
        if not isinstance(source, dict):
            return None
        value = source.get(default_metric(self.multilabel))  # the metric evaluate() gives
        return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None

    def _load(self, path: Path, state: dict) -> None:
        """Resume from ``state``, read from ``path``."""
        if state.get("format") != "sslam-finetune":
            raise CheckpointError(f"{path}: not an sslam fine-tuning checkpoint (format {state.get('format')!r}); "
                                  "choose another out folder")
        check_record(state, path, FINETUNING_PARTS)
        self._check_resume(path, state, warmup_kept=self._keep_started_warmup(state))
        self.model.load_state_dict(check_state(self.model, state["model"], f"{path} (model)"))
        with loading_parts(path, "its optimizer, loss scale or random streams"):
            self.optimizer.load_state_dict(state["optimizer"])
            self.scaler.load_state_dict(state["scaler"])
            set_rng_state(state["rng"])
        self.step, self.best = state["step"], state["best"]
        exported = self._exported_best()
        if exported is not None and (self.best is None or exported > self.best):
            self.best = exported  # found after this checkpoint, before the run stopped: OUT/best holds it
        self.log(f"resumed fine-tuning from {path} at step {self.step}")


# ---- command line -------------------------------------------------------------------------


def apply_overrides(cfg, overrides: list[str]):
    """``--key=value`` onto a flat dataclass; unknown keys are errors."""
    known = {f.name: f for f in fields(cfg)}
    for item in overrides:
        key, value = split_override(item, "--key=value")
        if key not in known:
            raise ValueError(f"--{key}: unknown option; known: {sorted(known)}")
        parsed = parse_option(value, str(known[key].type), key)
        setattr(cfg, key, parsed)
    return cfg


# What only the full linear probe reads: the default one trains its head on cached features.
_FULL_PROBE_ONLY = frozenset({"mixup", "mixup_prob", "mask_ratio", "roll", "noise", "drop_path"})


def _check_options_are_used(args, overrides: list[str], cfg) -> None:
    """Refuse options that this mode or these splits do not read: they were silently ignored.
    ``cfg``: the mode's settings with ``overrides`` (``--key=value`` items) applied."""
    linear, splits = args.mode == "linear", (args.train, args.test)
    unused = []
    given = {item[2:].split("=", 1)[0] for item in overrides}
    if linear and cfg.fast and given & _FULL_PROBE_ONLY:
        names = ", ".join(f"--{key}" for key in sorted(given & _FULL_PROBE_ONLY))
        unused.append(f"{names} (the augmentations and stochastic depth of --full; the default probe trains a head "
                      "on cached features)")
    if linear and args.out is not None:
        unused.append("--out (fine-tuning's run folder; a linear probe writes none)")
    if not linear and args.seeds != 1:
        unused.append("--seeds (linear probes; fine-tuning takes --seed=N)")
    if not linear and args.full:
        unused.append("--full (linear probes)")
    if args.full and any(item.startswith("--fast=") for item in overrides):
        unused.append("--fast with --full (--full is --fast=false)")
    if args.root is not None and not any(Path(s).suffix.lower() == ".tsv" for s in splits):
        unused.append("--root (the root of .tsv manifests; neither split is one)")
    if args.label_descriptors is not None and all(s.startswith("synth:") for s in splits):
        unused.append("--label-descriptors (synthetic splits name their own classes)")
    if unused:
        raise ValueError(f"not used by evaluate {args.mode} with these splits: {'; '.join(unused)}")


def run_evaluate(args) -> int:
    if args.seeds < 1:  # before the checkpoint and the splits are read, as the settings
        raise ValueError(f"--seeds={args.seeds}: must be >= 1")
    overrides = getattr(args, "overrides", [])
    if args.mode == "linear":
        cfg = apply_overrides(ProbeConfig(fast=not args.full), overrides)
    else:
        cfg = apply_overrides(FinetuneConfig(out=FinetuneConfig.out if args.out is None else args.out, workers=args.workers), overrides)
    _check_options_are_used(args, overrides, cfg)
    check_settings(cfg)
    norm = None if args.norm is None else parse_norm(args.norm)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and "LOCAL_RANK" in os.environ:
        # Under torchrun each process takes its own GPU, as the trainer does (DDP needs them
        # distinct; every process would otherwise load onto the first).
        device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
        torch.cuda.set_device(device)
    # The label files first: a typo in one is named before a checkpoint is read (or downloaded).
    train = read_split(args.train, train=True, descriptors=args.label_descriptors, root=args.root)
    test = read_split(args.test, train=False, descriptors=args.label_descriptors, root=args.root,
                      class_names=train.class_names)
    if args.task != "auto":  # else multi-label when a clip of either split has several labels
        train, test = (replace(split, multilabel=args.task == "multilabel") for split in (train, test))
    main_process = int(os.environ.get("RANK", "0")) == 0  # notes once, not per process
    for split in (train, test) if main_process else ():
        if split.skipped:
            entries = "entry" if split.skipped == 1 else "entries"
            print(f"note: {split.name}: {split.skipped} manifest {entries} under {MIN_SAMPLES} samples skipped, as the "
                  "official min_sample_size skips them", file=sys.stderr)
    shared = shared_clips(train, test) if main_process else []
    if shared:
        print(f"note: {len(shared)} test clip(s) are also training clips (e.g. {shared[0]}): the score is not a "
              "held-out one", file=sys.stderr)
    encoder = with_preprocessing(load_encoder(args.checkpoint, device=device, weights=args.weights),
                                 norm=norm, target_length=args.target_length)
    if args.mode == "linear":
        result = linear_probe(encoder, train, test, cfg, seeds=range(args.seeds), workers=args.workers)
        spread = f" +- {result['std']:.4f} over {args.seeds} seeds" if args.seeds > 1 else ""
        chosen = f", best epochs {result['per_seed_epoch']} on the test split" if cfg.select == "best" else ""
        print(f"linear probe {train.name} -> {test.name}: {result['metric']} {result['mean']:.4f}{spread} "
              f"({result['seconds']:.1f} s{chosen})")
        print(json.dumps(result))
    else:
        finetuner = Finetuner(encoder, train, test, cfg)
        try:
            result = finetuner.fit()
        except StopTraining as exc:  # under torchrun: end as `sslam pretrain` does
            stop_distributed(exc)
        if finetuner.dist.rank == 0:  # one line for the run, not one per process
            print(json.dumps(result))
        finish_distributed()
    return 0


def _options(config: type, flags: set[str], only: set[str] | None = None) -> str:
    """``--key=default`` of each field of ``config`` that no flag of the command sets (of those
    in ``only``, when given)."""
    shown = lambda value: "none" if value is None else repr(value) if value == "" else str(value)  # noqa: E731
    return ", ".join(f"--{f.name}={shown(getattr(config(), f.name))}" for f in fields(config)
                     if f.name not in flags and (only is None or f.name in only))


def add_evaluate_command(sub) -> None:
    p = sub.add_parser("evaluate", help="linear probe or fine-tuning on a labelled split",
                       description="Splits: synth:mono, synth:poly, a fairseq .tsv (+ .lbl beside it and "
                       "--label-descriptors) or a path,labels .csv. Extra --key=value options set fields of "
                       "ProbeConfig (linear) or FinetuneConfig (finetune).",
                       epilog=f"linear options (defaults): {_options(ProbeConfig, {'fast'} | _FULL_PROBE_ONLY)}; "
                       f"with --full also: {_options(ProbeConfig, set(), only=_FULL_PROBE_ONLY)}. "
                       "finetune options (defaults; warmup none: 10% of the steps; eval_every 0: each epoch): "
                       f"{_options(FinetuneConfig, {'out', 'workers'})}.")
    p.add_argument("mode", choices=["linear", "finetune"])
    p.add_argument("--checkpoint", required=True, help="official fairseq .pt, Hugging Face folder, sslam folder "
                   "or fine-tuning run checkpoint, or hf-hub:OWNER/NAME[/PATH][@REVISION]")
    p.add_argument("--train", required=True)
    p.add_argument("--test", required=True)
    p.add_argument("--label-descriptors", default=None,
                   help="index,mid,display_name CSV: the classes of .tsv splits (needed) and .csv splits")
    p.add_argument("--root", default=None, help="override the root line of .tsv manifests")
    p.add_argument("--norm", default=None,
                   help="the task's normalisation statistics if not the checkpoint's: audioset, esc50, spass, spcv2 "
                        "or --norm=MEAN,STD")
    p.add_argument("--target-length", type=int, default=None,
                   help="the task's frames per clip if not the checkpoint's (ESC-50: 512 with --norm esc50, "
                        "Speech Commands: 128 with --norm spcv2)")
    p.add_argument("--weights", default="student", choices=["student", "teacher"])
    p.add_argument("--task", default="auto", choices=["auto", "multilabel", "single-label"],
                   help="multilabel: sigmoid, BCE and mAP; single-label: softmax, cross-entropy and accuracy; "
                   "auto: multilabel when a clip has several labels")
    p.add_argument("--seeds", type=int, default=1, help="linear probe: seeds to average")
    p.add_argument("--full", action="store_true", help="linear probe: re-encode every batch with augmentations")
    p.add_argument("--out", default=None, help=f"fine-tuning run folder (default {FinetuneConfig.out})")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--workers", type=int, default=0, help="audio-decoding processes of the loaders (0: this one)")
    p.set_defaults(func=run_evaluate, overrides=[])
