"""Fine-tuning augmentations of the official recipe (SPEC 6.1), each drawing from an explicit
``numpy.random.Generator`` (it samples Beta distributions, which torch Generators do not).

Order in a training step: waveform roll (+ gain) -> crop to the window -> features (+ Speech
Commands' spectrogram noise, which the official loader adds per clip) -> mixup -> SpecAugment
(which the official model applies to the batch, so masked cells stay exactly 0).
"""

from __future__ import annotations

import numpy as np
import torch


def roll_crop(clips, rng: np.random.Generator, window: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Roll each whole clip by a uniform offset in [0, length), scale it by a gain drawn from
    Beta(10, 10) + 0.5, and keep its first ``window`` samples: ``torch.roll(clip, shift)[:window]
    * gain``, computed for those samples only, so a long clip costs no more than the window.
    clips: B 1-D tensors -> waves (B, min(window, longest)) zero-padded, lengths (B,)."""
    lengths = torch.tensor([min(clip.numel(), window) for clip in clips])
    out = torch.zeros(len(clips), int(lengths.max()))
    for i, clip in enumerate(clips):
        n = clip.numel()
        shift = int(rng.integers(0, max(1, n)))
        gain = float(rng.beta(10.0, 10.0)) + 0.5
        kept = (torch.arange(int(lengths[i])) - shift) % max(1, n)  # torch.roll: out[j] = x[j - shift]
        out[i, : kept.numel()] = clip[kept] * gain
    return out, lengths


def mixup(x: torch.Tensor, y: torch.Tensor, rng: np.random.Generator, alpha: float = 0.8,
          prob: float = 0.9) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch mixup: with probability ``prob``, lam ~ Beta(alpha, alpha), then
    x <- lam x + (1 - lam) flip(x) and y <- lam y + (1 - lam) flip(y) (flip along the batch)."""
    if alpha <= 0 or rng.random() >= prob:
        return x, y
    lam = float(rng.beta(alpha, alpha))
    return lam * x + (1 - lam) * x.flip(0), lam * y + (1 - lam) * y.flip(0)


def spec_augment(spec: torch.Tensor, freq_mask: float, time_mask: float, rng: np.random.Generator) -> torch.Tensor:
    """One frequency mask and one time mask per example (independent across the batch), filled
    with 0 (in normalised units). A mask's width is uniform in [0, param) and its start uniform
    over the positions where it fits, both truncated to whole bins as torchaudio's
    ``mask_along_axis_iid`` does (end = int(start) + int(width)), so at most ``ceil(param) - 1``
    bins are masked. spec (B, 1, T, F)."""
    b, _, t, f = spec.shape
    out = spec
    for axis, param, size in ((3, freq_mask, f), (2, time_mask, t)):
        if param <= 0:
            continue
        width = rng.random(b) * param
        start = rng.random(b) * (size - width)
        lo = torch.from_numpy(start.astype(np.int64))
        # Truncate the width on its own, not start + width: the latter can mask one bin more
        # than the drawn width (e.g. start 2.7, width 5.6 -> bins 2..7, six bins for param 6).
        hi = lo + torch.from_numpy(width.astype(np.int64))
        pos = torch.arange(size)
        mask = (pos[None] >= lo[:, None]) & (pos[None] < hi[:, None])  # (B, size)
        shape = (b, 1, 1, size) if axis == 3 else (b, 1, size, 1)
        out = out.masked_fill(mask.view(shape).to(out.device, non_blocking=True), 0.0)
    return out


def spectrogram_noise(spec: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """Speech Commands' ``noise`` augmentation (SPEC 6.2): per example, uniform [0, 1) noise
    scaled by u / 10 with u ~ U(0, 1) is added, then the frames are rolled by a whole number in
    [-10, 10). spec (B, 1, T, F) normalised -> same shape."""
    out = torch.empty_like(spec)
    for i in range(spec.shape[0]):
        noise = torch.from_numpy(rng.random(tuple(spec.shape[2:]), dtype=np.float32)).to(spec.device, non_blocking=True)
        scale = float(rng.random()) / 10
        out[i, 0] = torch.roll(spec[i, 0] + noise * scale, int(rng.integers(-10, 10)), dims=0)
    return out
