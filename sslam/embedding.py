"""Embeddings of raw audio with an encoder: utterance (CLS), mean, frame and timestamp tokens.

Contract (default, ``padding="official"``): each clip is resampled to 16 kHz, turned into the
normalised log-mel of SPEC 1.1 and padded to ``target_length`` frames (1024 = 10.24 s), then
encoded whole -- the official feature extraction, so the outputs equal the official code's.

* Clips longer than the window are NOT silently cropped: the log-mel of the whole clip is cut
  into windows of ``target_length`` frames with a hop of ``hop`` frames (default half a window,
  a multiple of 16 so patch rows line up); the last window is padded like a short clip. Frame
  tokens seen by several windows are averaged, the utterance embedding is the mean of the
  windows' CLS tokens. ``crop=True`` instead keeps only the first window (the official crop).
* ``padding="mask"``: windows are padded only to the longest clip of the batch (rounded up to a
  patch row) and patch rows holding no real frame are excluded from attention and pooling, so a
  clip's embeddings do not depend on what it is batched with, up to float rounding (~1e-6: the
  masked softmax sums over a longer row). With ``padding="official"`` a clip's embeddings,
  logits and probabilities are bit-identical whatever the batch on the CPU (on a GPU the
  matmul kernels chosen for each batch size may differ in the last bits).

Token layout: patch token n = t * 8 + f (t = patch row, 16 frames = 160 ms; f = frequency band).
A patch row is *real* when it holds at least one real frame.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .audio import (
    AudioError,
    as_float_samples,
    check_waveform,
    integer_rate,
    is_open_file,
    load_audio,
    source_name,
)
from .features import (
    FRAME_LENGTH,
    FRAME_SHIFT,
    NUM_MEL_BINS,
    SAMPLE_RATE,
    check_min_length,
    layout_hint,
    norm_stats,
    normalize,
    num_frames,
    pad_clips,
    preprocess,
)
from .kernels.switch import use_kernels
from .model import Encoder, eval_mode
from .resampler import resample

PADDING_MODES = ("official", "mask")
FRAME_SECONDS = FRAME_SHIFT / SAMPLE_RATE  # 10 ms


@dataclass
class Embeddings:
    """Embeddings of B clips (D = embedding size, P = patch tokens, R = patch rows = P / 8).

    utterance: (B, D) CLS token (averaged over windows for long clips).
    mean: (B, D) mean of the real patch tokens.
    frames: (B, P, D) patch tokens, time-major; frame_mask (B, P) True where real.
    timestamps: (B, R, D) per patch row, the mean over its frequency patches;
        timestamp_mask (B, R) True where real; times (R,) centre of each row in seconds.
    num_rows: (B,) patch rows produced per clip (the rest of the padded batch is zeros): the
        whole window for a short clip with official padding, else its real rows.
    logits / probabilities: (B, C) for fine-tuned models, with label_names; None otherwise.
        probabilities is the logits' sigmoid, as the official evaluation computes it, for
        single-label heads too (their class is the argmax; logits.softmax(-1) gives their
        distribution).
    """

    utterance: torch.Tensor
    mean: torch.Tensor
    frames: torch.Tensor
    frame_mask: torch.Tensor
    timestamps: torch.Tensor
    timestamp_mask: torch.Tensor
    times: torch.Tensor
    num_rows: torch.Tensor
    logits: torch.Tensor | None = None
    probabilities: torch.Tensor | None = None
    label_names: list[str] | None = None

    def __len__(self) -> int:
        return self.utterance.shape[0]


def row_times(num_rows: int, patch: int = 16, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Centre time (s) of each patch row: frames 16r..16r+15, frame i centred at
    i * 10 ms + 12.5 ms."""
    centre_frame = torch.arange(num_rows, dtype=torch.float64) * patch + (patch - 1) / 2
    return (centre_frame * FRAME_SECONDS + FRAME_LENGTH / SAMPLE_RATE / 2).to(dtype)


def checked_batch_size(batch_size) -> int:
    """``batch_size`` as an int: a positive integer (numpy's too), never a bool."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r}: must be a positive integer")
    return int(batch_size)


def _is_file(item) -> bool:
    """Whether ``item`` names an audio file (a path) or is one (open, or ``io.BytesIO``)."""
    return isinstance(item, (str, bytes, os.PathLike)) or is_open_file(item)


def _as_clips(audio, sample_rate: int | None) -> list[torch.Tensor]:
    """Normalise the accepted inputs into a list of 1-D float32 clips at 16 kHz.

    Files are decoded and resampled from their own rate straight to 16 kHz (``sample_rate``
    describes arrays only: applying it to files too would resample them twice). Arrays are at
    ``sample_rate`` and are resampled one clip at a time, as the reference does.
    """
    if sample_rate is not None:
        sample_rate = integer_rate(sample_rate)  # 44100.0 is 44100, as for preprocess
    if isinstance(audio, np.ndarray) and audio.dtype.kind in "USO":  # paths in an array (pandas' .values)
        audio = audio.tolist()
    if _is_file(audio):
        audio = [audio]
    hint = ""
    if isinstance(audio, (torch.Tensor, np.ndarray)) and audio.ndim == 2:
        hint = layout_hint(audio.shape)
        audio = list(audio)
    elif isinstance(audio, (torch.Tensor, np.ndarray)):
        audio = [audio]
    if not isinstance(audio, Sequence) or len(audio) == 0:
        got = type(audio).__name__ if not isinstance(audio, Sequence) else "no clips"
        raise ValueError(f"audio: expected a clip, a (B, N) tensor, a list of clips or paths; got {got}")
    clips = []
    for i, item in enumerate(audio):
        if _is_file(item):
            name = source_name(item)
            wave, _ = load_audio(item, sample_rate=SAMPLE_RATE)
        else:
            name = f"audio[{i}]"
            wave = as_float_samples(item, name)  # what is not samples is named so, not asked for a rate
            if sample_rate is None:
                raise ValueError("sample_rate is required for waveforms given as arrays")
            wave = check_waveform(wave, sample_rate, name=name)
            wave = resample(wave, sample_rate, SAMPLE_RATE)
        try:
            check_min_length(wave, name)
        except AudioError as exc:
            raise AudioError(f"{exc}{hint}") from None
        clips.append(wave)
    return clips


def with_preprocessing(encoder: Encoder, *, norm=None, target_length: int | None = None) -> Encoder:
    """``encoder`` set to a task's input where it differs from the checkpoint's (SPEC 6.2:
    ESC-50 takes 512 frames and its own statistics, Speech Commands 128 frames and its own; the
    official feature extraction takes a window and statistics too):
    ``norm`` a preset of :data:`sslam.features.NORM_STATS` or a (mean, std) pair,
    ``target_length`` frames, whole patches that the position table covers. Returns ``encoder``."""
    prep = dict(encoder.preprocessing)
    if norm is not None:
        norm_stats(norm)  # raises, naming the value, for an unknown preset or a bad pair
        prep["norm"] = norm
    if target_length is not None:
        cfg = encoder.cfg
        if isinstance(target_length, bool) or not isinstance(target_length, int) or not cfg.fits_window(target_length):
            raise ValueError(f"target_length={target_length!r}: must be a positive multiple of {cfg.patch_size} "
                             f"frames, at most the {cfg.max_frames} the position table covers")
        prep["target_length"] = target_length
    encoder.preprocessing = prep
    return encoder


def window_hop(model, hop) -> int:
    """Frames between the starts of a long clip's windows: ``hop``, checked (a positive
    multiple of the patch, at most the window), or by default half the model's window."""
    window, patch = model.input_window()[0], model.cfg.patch_size
    if hop is None:
        return max(patch, window // 2 // patch * patch)
    if isinstance(hop, bool) or not isinstance(hop, (int, np.integer)) or hop % patch or hop <= 0 or hop > window:
        raise ValueError(f"hop={hop!r}: must be a positive multiple of {patch} frames, at most {window}")
    return int(hop)


def check_crop_hop(crop: bool, hop) -> None:
    """A hop with ``crop`` is refused: one window is kept, so the hop would be ignored."""
    if crop and hop is not None:
        raise ValueError(f"hop={hop!r}: crop keeps only the first window, so no hop applies; give one or the other")


def _windows(num_frames: int, window: int, hop: int, crop: bool) -> list[int]:
    """Start frames of the windows that cover ``num_frames`` frames."""
    if crop or num_frames <= window:
        return [0]
    starts = list(range(0, num_frames - window, hop))
    starts.append(starts[-1] + hop)
    return starts


def _autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None or dtype == torch.float32:
        return contextlib.nullcontext()
    if device.type != "cuda":
        raise ValueError(f"autocast dtype {dtype} is only supported on CUDA (device is {device})")
    return torch.autocast("cuda", dtype=dtype)


def length_groups(lengths: list[int]) -> list[list[int]]:
    """Indices of clips grouped by similar length: each group's padded size (members x its
    longest) stays within twice its real samples, so one long clip is not padded onto many
    short ones (16 clips beside a 1-hour file would otherwise take 16 hours of memory)."""
    groups, total = [], 0
    for i in sorted(range(len(lengths)), key=lengths.__getitem__):
        n = lengths[i]
        if groups and (len(groups[-1]) + 1) * n <= 2 * (total + n):
            groups[-1].append(i)
            total += n
        else:
            groups.append([i])
            total = n
    return groups


def _log_mels(clips: list[torch.Tensor], device, max_frames: int | None = None) -> list[torch.Tensor]:
    """Unnormalised log-mel of every 16 kHz clip (of at least one frame), (F_b, 128) each: in
    full, or its first ``max_frames`` frames (the clip's mean is still the whole clip's, as
    the official crop has it). Clips of similar length share a batch (see :func:`length_groups`)."""
    logmels = [None] * len(clips)
    cap = lambda n: min(num_frames(n), max_frames or num_frames(n))  # noqa: E731
    for group in length_groups([c.numel() for c in clips]):
        # The clips were checked when loaded (load_audio, check_waveform).
        logmel = preprocess([clips[i].to(device, non_blocking=True) for i in group], SAMPLE_RATE,
                            target_length=max(cap(clips[i].numel()) for i in group), norm=None, check_finite=False)
        for row, i in enumerate(group):
            logmels[i] = logmel[row, 0, : cap(clips[i].numel())]
    return logmels


def _plan(frames: torch.Tensor, window: int, hop: int, crop: bool) -> list[tuple[int, int, int]]:
    """(clip, start frame, real frames) of every window to encode."""
    plan = []
    for b, n in enumerate(frames.tolist()):
        for start in _windows(n, window, hop, crop):
            plan.append((b, start, min(window, n - start)))
    return plan


def _fused_patches(clips: list[torch.Tensor], window: int, norm, device) -> torch.Tensor:
    """Official-contract model inputs from the fused kernel, for 16 kHz clips of at least one
    frame (as :func:`_as_clips` returns them): (B, window / 16 * 8, 256) patches. Each launch
    takes clips of similar length: a cropped clip's DC removal still reads all of it."""
    from .kernels.fbank_patch import fbank_patch

    patches = [None] * len(clips)
    for group in length_groups([c.numel() for c in clips]):
        # The lengths stay on the CPU, where the kernel checks them (a GPU copy would be read back).
        batch, lengths = pad_clips([clips[i] for i in group], device)
        for i, clip_patches in zip(group, fbank_patch(batch, lengths, target_length=window, norm=norm)):
            patches[i] = clip_patches
    return torch.stack(patches)


def _window_batch(logmels, plan, length: int, norm, patch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised windows (W, 1, length, 128) of the clips' log-mels (F_b, 128), padded with the
    official padding value, and which patch rows hold a real frame (W, length / patch)."""
    device = logmels[0].device
    pad_value = normalize(torch.zeros(()), norm).item()
    specs = torch.full((len(plan), 1, length, logmels[0].shape[-1]), pad_value, device=device)
    for i, (b, start, real) in enumerate(plan):
        specs[i, 0, :real] = normalize(logmels[b][start : start + real], norm)
    real_rows = torch.tensor([math.ceil(real / patch) for _, _, real in plan], device=device)
    return specs, torch.arange(length // patch, device=device)[None] < real_rows[:, None]


@torch.no_grad()  # not inference_mode: its tensors could not feed a model being trained
def embed(
    model,
    audio,
    sample_rate: int | None = None,
    *,
    padding: str = "official",
    crop: bool = False,
    hop: int | None = None,
    batch_size: int = 16,
    autocast: torch.dtype | None = None,
) -> Embeddings:
    """Embeddings of one clip, a list of clips (any lengths), a (B, N) tensor, or file paths,
    computed without gradients (for gradients, call the model on :func:`sslam.preprocess`'s
    output).

    Args:
        model: a :class:`sslam.model.Encoder` (its ``preprocessing`` gives target_length/norm).
        audio: samples on the [-1, 1] scale at ``sample_rate``, or paths, files opened in binary
            mode or ``io.BytesIO`` contents (decoded and resampled from the file's own rate;
            ``sample_rate`` does not apply to them). Every clip needs at
            least one 25 ms frame (400 samples at 16 kHz), else ``AudioError`` names it. A file's
            channels, and those of a (channels, N) clip in a list, are averaged to mono before
            resampling (the reference resamples each first: the CLS ~1e-7 apart, patch tokens
            ~1e-5); a (B, N) tensor is B clips.
        padding: 'official' (pad every window to target_length) or 'mask' (see module doc).
        crop: keep only the first ``target_length`` frames (the official behaviour).
        hop: frames between window starts for long clips (default: half the window in whole
            patches, at least one; see :func:`window_hop`); refused with ``crop``.
        batch_size: windows encoded per forward pass.
        autocast: torch.bfloat16 / torch.float16 to run the encoder under autocast on CUDA.
    """
    if not isinstance(getattr(model, "preprocessing", None), dict):  # e.g. sslam.embed(path, audio)
        raise TypeError(f"model: expected an sslam Encoder (sslam.load_encoder(path)), got {type(model).__name__}")
    if padding not in PADDING_MODES:
        raise ValueError(f"padding={padding!r}: choose one of {PADDING_MODES}")
    if model.cfg.mel_bins != NUM_MEL_BINS:
        raise ValueError(f"model: takes {model.cfg.mel_bins} mel bins; embed computes the official {NUM_MEL_BINS}-bin "
                         "log-mel (call the model on spectrograms of your own)")
    window, norm_name = model.input_window()
    norm = norm_stats(norm_name)
    patch, freq = model.cfg.patch_size, model.cfg.freq_patches
    check_crop_hop(crop, hop)
    hop = window_hop(model, hop)
    batch_size = checked_batch_size(batch_size)
    param = next(model.parameters())
    if param.is_meta:  # refused by name: copying meta weights fails deep inside torch
        raise ValueError("model: its weights are on the meta device (shapes, no values); load them first")
    clips = _as_clips(audio, sample_rate)  # at 16 kHz, each at least one frame long
    frames = num_frames(torch.tensor([c.numel() for c in clips]))  # (B,), each clip's own
    one_window = crop or bool((frames <= window).all())
    if padding == "official" and one_window and use_kernels(param):
        # The fused Triton kernel: waveforms straight to normalised patches (GPU extraction).
        specs = _fused_patches(clips, window, norm_name, param.device)
        plan, length = [(b, 0, min(window, int(f))) for b, f in enumerate(frames)], window
        windows = lambda i, j: (specs[i:j], None)  # noqa: E731
    else:
        logmels = _log_mels(clips, param.device, window if crop else None)
        plan = _plan(frames, window, hop, crop)
        if padding == "official":
            length = window
        else:
            length = min(window, math.ceil(max(real for _, _, real in plan) / patch) * patch)
        # Built batch by batch: a long clip's windows, all at once, would be twice its log-mel.
        windows = lambda i, j: _window_batch(logmels, plan[i:j], length, norm, patch)  # noqa: E731

    real_frames = frames.clamp(max=window) if crop else frames
    real_rows = (real_frames + patch - 1) // patch
    num_rows = real_rows.clamp(min=length // patch) if padding == "official" else real_rows
    # Each batch's patch tokens are added to their clips' rows as they come: kept for every
    # window, a long clip's tokens would be some ten times its embeddings.
    sums = torch.zeros(len(clips), int(num_rows.max()), freq, model.cfg.embed_dim, device=param.device)
    counts = torch.zeros(len(clips), int(num_rows.max()), device=param.device)
    cls_out = []
    with _autocast(param.device, autocast), eval_mode(model):
        for i in range(0, len(plan), batch_size):
            spec, row_valid = windows(i, i + batch_size)
            mask = None if padding == "official" else ~row_valid.repeat_interleave(freq, dim=1)
            x = model(spec.to(param.dtype), key_padding_mask=mask).x.float()
            cls_out.append(x[:, 0])
            _add_rows(sums, counts, x[:, 1:], plan[i : i + batch_size], num_rows, patch)
    return _merge(model, torch.cat(cls_out), sums, counts, plan, real_frames, num_rows, patch)


def _add_rows(sums, counts, tokens, plan, num_rows, patch: int) -> None:
    """Add windows' patch tokens (W, rows * freq, D) to their clips' row sums (B, R, freq, D)
    and counts (B, R), up to each clip's ``num_rows``."""
    rows, freq = tokens.shape[1] // sums.shape[2], sums.shape[2]
    grid = tokens.view(tokens.shape[0], rows, freq, -1)
    for w, (b, start, _) in enumerate(plan):
        r0 = start // patch
        take = min(rows, int(num_rows[b]) - r0)
        sums[b, r0 : r0 + take] += grid[w, :take]
        counts[b, r0 : r0 + take] += 1


def _merge(model, cls_out, sums, counts, plan, real_frames, num_rows, patch) -> Embeddings:
    """Per-clip embeddings from the windows' CLS outputs (W, D) and row sums (B, R, freq, D) with
    their counts (B, R): overlapping rows averaged, CLS (and logits) averaged over a clip's
    windows. A clip keeps ``num_rows`` rows: with official padding a short clip keeps its padded
    rows too (the official 'frame' output), marked not real."""
    (num_clips, total_rows, freq, dim), device = sums.shape, sums.device
    owners = torch.tensor([b for b, _, _ in plan], device=device)
    per_window = torch.bincount(owners, minlength=num_clips).to(sums.dtype)[:, None]
    utterance = sums.new_zeros(num_clips, dim).index_add_(0, owners, cls_out) / per_window

    frames_grid = sums.div_(counts.clamp(min=1)[..., None, None])  # in place: the sums are not needed after
    real_rows = torch.arange(total_rows, device=device)[None] * patch < real_frames.to(device)[:, None]
    frame_mask = real_rows[..., None].expand(-1, -1, freq).reshape(num_clips, -1)
    flat = frames_grid.reshape(num_clips, total_rows * freq, -1)
    mean = (flat * frame_mask[..., None]).sum(1) / frame_mask.sum(1, keepdim=True).clamp(min=1)
    out = Embeddings(
        utterance=utterance,
        mean=mean,
        frames=flat,
        frame_mask=frame_mask,
        timestamps=frames_grid.mean(dim=2),
        timestamp_mask=real_rows,
        times=row_times(total_rows, patch),
        num_rows=num_rows.clone(),
    )
    if model.cfg.num_classes > 0:
        dtype = next(model.parameters()).dtype
        # One window at a time: a matmul's rounding depends on its row count, and a clip's
        # logits must not depend on what it is batched with.
        window_logits = torch.cat([model.classify(row[None]) for row in cls_out.to(dtype)]).float()
        out.logits = sums.new_zeros(num_clips, window_logits.shape[1]).index_add_(0, owners, window_logits) / per_window
        # Row by row too: the vectorised sigmoid rounds by an element's place in the tensor.
        out.probabilities = torch.stack([row.sigmoid() for row in out.logits])
        out.label_names = None if model.label_names is None else list(model.label_names)  # the model's stay its own
    return out
