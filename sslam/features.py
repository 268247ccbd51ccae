"""The official input pipeline (SPEC section 1.1), batched: waveform -> normalised log-mel.

Chain, per clip: resample to 16 kHz -> subtract the waveform mean -> Kaldi fbank (25 ms Hann
frames every 10 ms, pre-emphasis 0.97, per-frame DC removal, 512-point power spectrum, 128 Kaldi
mel bins from 20 Hz to 8 kHz, natural log floored at float32 epsilon) -> zero-pad in the log
domain or crop to ``target_length`` frames -> ``(x - mean) / (2 * std)``.

Everything here is plain PyTorch on any device; clips of different lengths share one call and
each clip's result equals what ``torchaudio.compliance.kaldi.fbank`` gives for it alone: on the
CPU bit for bit (the same float32 mel bank and the same operations; 0 difference on the golden
clips and on noise, tones, square waves and DC at 8 to 48 kHz, 0.03 to 12 s), elsewhere to
float rounding. The fused Triton version of the same chain is :func:`sslam.kernels.fbank_patch`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .audio import AudioError, as_float_samples, check_samples, integer_rate
from .cached import cached_constant
from .resampler import resample

SAMPLE_RATE = 16000
FRAME_LENGTH = 400  # 25 ms at 16 kHz
FRAME_SHIFT = 160  # 10 ms
FFT_SIZE = 512  # the frame length rounded up to a power of two
NUM_MEL_BINS = 128
LOW_FREQ = 20.0
HIGH_FREQ = SAMPLE_RATE / 2
PREEMPHASIS = 0.97
LOG_FLOOR = torch.finfo(torch.float32).eps  # Kaldi floors mel energies at float epsilon
PATCH = 16
CPU_CHUNK_FRAMES = 128

# (mean, std) of the log-mel features of each dataset, on the [-1, 1] waveform scale.
NORM_STATS: dict[str, tuple[float, float]] = {
    "audioset": (-4.268, 4.569),
    "esc50": (-6.627, 5.359),
    "spcv2": (-6.846, 5.565),
    "spass": (-5.275, 3.268),
}

Norm = str | tuple[float, float] | None


def norm_stats(norm: Norm) -> tuple[float, float] | None:
    """Resolve a normalisation preset name, a custom ``(mean, std)`` pair, or ``None``."""
    if norm is None:
        return None
    if isinstance(norm, str):
        try:
            return NORM_STATS[norm]
        except KeyError:
            raise ValueError(
                f"norm={norm!r}: unknown preset; choose one of {sorted(NORM_STATS)} "
                "or pass a (mean, std) pair"
            ) from None
    try:
        mean, std = (float(v) for v in norm)
    except (TypeError, ValueError, OverflowError):  # OverflowError: an int too large for a float
        raise ValueError(f"norm={norm!r}: expected a preset name, a (mean, std) pair of numbers, or None") from None
    if not std > 0 or not math.isfinite(mean) or not math.isfinite(std):
        raise ValueError(f"norm=({mean}, {std}): std must be positive and both finite")
    return mean, std


def parse_norm(text: str) -> Norm:
    """A ``--norm=`` value: a preset name, or ``MEAN,STD`` (the official extraction's
    ``--norm_mean`` and ``--norm_std``; written with ``=``, since a negative mean would read as
    an option)."""
    try:
        norm = tuple(float(part) for part in text.split(",")) if "," in text else text
        norm_stats(norm)
    except ValueError:
        raise ValueError(f"--norm={text}: expected a preset ({', '.join(NORM_STATS)}) or MEAN,STD with a "
                         "positive STD") from None
    return norm


def num_frames(num_samples: int | torch.Tensor) -> int | torch.Tensor:
    """Kaldi frame count with ``snip_edges=True``: 1 + (N - 400) // 160 (0 if N < 400)."""
    if isinstance(num_samples, torch.Tensor):
        return torch.where(
            num_samples >= FRAME_LENGTH, 1 + (num_samples - FRAME_LENGTH) // FRAME_SHIFT, 0
        )
    return 0 if num_samples < FRAME_LENGTH else 1 + (num_samples - FRAME_LENGTH) // FRAME_SHIFT


@cached_constant(maxsize=1)
def _mel_banks_cpu() -> torch.Tensor:
    # Triangles spaced evenly on the Kaldi mel scale between 20 Hz and Nyquist, computed as the
    # official fbank computes them (torchaudio's get_mel_banks): the scale's ends in double, the
    # rest in float32, op for op, so the bank is its bits (one built in float64 and rounded
    # differs by up to 1.6e-3 relative, 1.45e-4 in the features of a 5638 Hz tone). The
    # Nyquist bin of the 257-bin spectrum gets weight 0, as in Kaldi.
    def mel_scale(hz):
        return 1127.0 * math.log(1.0 + hz / 700.0)

    low, high = mel_scale(LOW_FREQ), mel_scale(HIGH_FREQ)
    delta = (high - low) / (NUM_MEL_BINS + 1)
    rows = torch.arange(NUM_MEL_BINS, dtype=torch.float32)[:, None]
    left, centre, right = low + rows * delta, low + (rows + 1.0) * delta, low + (rows + 2.0) * delta
    hz = (SAMPLE_RATE / FFT_SIZE) * torch.arange(FFT_SIZE // 2, dtype=torch.float32)[None]
    mel = 1127.0 * (1.0 + hz / 700.0).log()
    up = (mel - left) / (centre - left)
    down = (right - mel) / (right - centre)
    return F.pad(torch.clamp(torch.minimum(up, down), min=0.0), (0, 1))  # (128, 257)


def mel_banks(device: torch.device | str = "cpu") -> torch.Tensor:
    """Kaldi mel filterbank, float32 ``(128, 257)``: rows are mel bins, columns FFT bins."""
    return _mel_banks_cpu().to(device)


@cached_constant(maxsize=1)
def _window_cpu() -> torch.Tensor:
    return torch.hann_window(FRAME_LENGTH, periodic=False, dtype=torch.float32)


def frame_window(device: torch.device | str = "cpu") -> torch.Tensor:
    """The symmetric Hann window Kaldi calls 'hanning', float32 ``(400,)``."""
    return _window_cpu().to(device)


def integer_counts(lengths) -> torch.Tensor:
    """``lengths`` (a tensor, array or sequence) as a tensor of an integer dtype, where it is;
    floating-point (400.9) or boolean values are an error rather than truncated."""
    try:
        raw = lengths if isinstance(lengths, torch.Tensor) else torch.as_tensor(np.asarray(lengths))
    except (TypeError, ValueError, RuntimeError):  # text, None, ragged lists
        raise ValueError(f"lengths: expected integer sample counts, got {lengths!r}") from None
    if raw.is_floating_point() or raw.is_complex() or raw.dtype == torch.bool:
        raise ValueError(f"lengths: expected integer sample counts, got {raw.dtype}")
    return raw


def integer_lengths(lengths) -> torch.Tensor:
    """Per-clip sample counts as int64 on the CPU (:func:`integer_counts`; a GPU tensor costs
    one device sync)."""
    return integer_counts(lengths).detach().to("cpu", torch.int64)


def _as_batch(
    waveforms: torch.Tensor | np.ndarray | Sequence, lengths: torch.Tensor | Sequence[int] | None,
    finite: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pack one clip, a list of clips or a (B, N) tensor into (B, N_max) float32 + lengths (B,)
    int64 on the CPU (checks on them then need no wait for a GPU).

    Samples must be floating point, and finite when ``finite`` (``AudioError`` naming
    ``waveforms`` or ``waveforms[i]`` otherwise): integer PCM or NaN would give
    plausible-looking features."""
    if isinstance(waveforms, (torch.Tensor, np.ndarray)):
        waveforms = as_float_samples(waveforms, "waveforms")
        if waveforms.dim() == 1:
            waveforms = waveforms[None]
        if waveforms.dim() != 2 or waveforms.shape[0] == 0:
            raise ValueError(
                f"waveforms: expected a 1-D clip or a (batch, samples) tensor with at least one "
                f"clip, got shape {tuple(waveforms.shape)}"
            )
        if finite:  # before the cast: 1e300 in float64 is too large, not Inf
            check_samples("waveforms", waveforms)
        batch = waveforms.to(torch.float32)
        if lengths is None:
            lens = torch.full((batch.shape[0],), batch.shape[1], dtype=torch.long)
        else:
            lens = integer_lengths(lengths)
            if lens.shape != (batch.shape[0],) or (lens < 0).any() or (lens > batch.shape[1]).any():
                raise ValueError(
                    f"lengths: expected {batch.shape[0]} values in [0, {batch.shape[1]}], "
                    f"got {lens.tolist()}"
                )
        return batch, lens
    if isinstance(waveforms, (str, bytes)) or not isinstance(waveforms, Sequence):
        raise ValueError(
            f"waveforms: expected a tensor, an array or a list of clips, got {type(waveforms).__name__}"
        )
    if not waveforms:
        raise ValueError("waveforms: empty list")
    if lengths is not None:
        raise ValueError("lengths: only meaningful with a padded (batch, samples) tensor")
    clips = []
    for i, clip in enumerate(waveforms):
        name = f"waveforms[{i}]"
        if not isinstance(clip, (torch.Tensor, np.ndarray)):
            clip = np.asarray(clip)
        clip = as_float_samples(clip, name)
        if clip.dim() == 0:
            raise ValueError(f"{name}: a single number, not a clip; a list of samples is one clip "
                             "when given as an array: np.asarray(samples)")
        if clip.dim() != 1:
            raise ValueError(f"{name}: expected a 1-D clip, got shape {tuple(clip.shape)}")
        if finite:
            check_samples(name, clip)
        clips.append(clip.to(torch.float32))
    return pad_clips(clips, clips[0].device)


def pad_clips(clips: Sequence[torch.Tensor], device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """B 1-D clips -> (B, longest) float32 zero-padded on ``device`` (default: the CPU), and
    their lengths (B,) int64 on the CPU."""
    lengths = torch.tensor([c.numel() for c in clips], dtype=torch.long)
    batch = torch.zeros(len(clips), int(lengths.max()), dtype=torch.float32, device=device)
    for i, clip in enumerate(clips):
        batch[i, : clip.numel()] = clip
    return batch, lengths


def _resample_each(
    batch: torch.Tensor, lengths: torch.Tensor, sample_rate: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Resample each clip's own samples to 16 kHz on its own, as the reference does, and re-pack.

    (B, N) float32 + CPU lengths (B,) -> (B, M) float32 right-padded with zeros + 16 kHz CPU
    lengths (B,).
    Resampling the padded batch at once gives the same values only up to float rounding (conv1d
    rounds differently for other batch shapes), and log-mel bins with next to no energy -- all
    bins above the original Nyquist frequency of a low-rate clip -- turn those 1e-7 differences
    into 1e-3 in the log domain.
    """
    clips = [
        resample(batch[i, :n], sample_rate, SAMPLE_RATE) if n else batch.new_zeros(0)
        for i, n in enumerate(lengths.tolist())
    ]
    return pad_clips(clips, batch.device)


def remove_dc(waveforms: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Subtract each clip's mean over its own samples; padding stays zero. (B, N) -> (B, N).

    On the CPU each mean is taken over the clip's own slice, as the reference's ``x.mean()``: a
    masked sum over the padded row reduces in another order for long clips (1e-9 apart), so the
    same clip would not give the same features in every batch. On CUDA, where the batched fbank
    is not bit-identical anyway, one masked reduction avoids a host sync and a loop."""
    valid = torch.arange(waveforms.shape[1], device=waveforms.device) < lengths[:, None]
    if waveforms.is_cuda:
        mean = torch.where(valid, waveforms, 0).sum(dim=1) / lengths.clamp(min=1).to(waveforms.dtype)
    else:
        mean = torch.stack([waveforms[i, :n].mean() if n else waveforms.new_zeros(())
                            for i, n in enumerate(lengths.tolist())])
    return torch.where(valid, waveforms - mean[:, None], 0)


def fbank(
    waveforms: torch.Tensor, lengths: torch.Tensor | None = None, max_frames: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Kaldi log-mel filterbank of 16 kHz clips, as ``torchaudio.compliance.kaldi.fbank`` with
    the official arguments (SPEC 1.1), for a batch.

    Args:
        waveforms: (B, N) float32, 16 kHz, already mean-removed if the official chain is wanted.
        lengths: (B,) number of valid samples per clip (default: all N).
        max_frames: compute at most this many frames per clip (later ones would be cropped).

    Returns:
        features (B, F, 128) float32 with F = the frames of the padded width N (at most
        ``max_frames``; rows past a clip's own frame count are 0), and frames (B,) int64, each
        clip's own frame count.
    """
    batch, n = waveforms.shape
    if lengths is None:
        lengths = torch.full((batch,), n, dtype=torch.long, device=waveforms.device)
    frames = num_frames(lengths)
    n_out = num_frames(n)
    if max_frames is not None:
        n_out = min(n_out, max_frames)
        frames = frames.clamp(max=max_frames)
    out = waveforms.new_zeros(batch, n_out, NUM_MEL_BINS)
    if n_out == 0:
        return out, frames
    used = (n_out - 1) * FRAME_SHIFT + FRAME_LENGTH
    windows = waveforms[:, :used].unfold(1, FRAME_LENGTH, FRAME_SHIFT)  # (B, F, 400), a view
    if waveforms.is_cuda:
        out = log_mel_of_frames(windows)
    else:
        # On the CPU the intermediates of a whole batch (25 MB per 16 clips) fall out of cache;
        # chunks of ~128 frames (200 kB) stay in it and run about twice as fast. Each clip is
        # chunked over its own frames only, so a clip gets the same chunk shapes (hence the same
        # float rounding) in any batch as alone, and no time goes to frames that are dropped.
        for b, clip_frames in enumerate(frames.tolist()):
            for f0 in range(0, clip_frames, CPU_CHUNK_FRAMES):
                f1 = min(clip_frames, f0 + CPU_CHUNK_FRAMES)
                out[b, f0:f1] = log_mel_of_frames(windows[b, f0:f1])
    valid = torch.arange(n_out, device=out.device) < frames[:, None]
    return torch.where(valid[..., None], out, 0), frames


def log_mel_of_frames(x: torch.Tensor) -> torch.Tensor:
    """Kaldi log-mel of 400-sample frames (..., 400) -> (..., 128): per-frame DC removal,
    pre-emphasis with the first sample repeated, Hann window, 512-point power spectrum, mel
    filterbank, log floored at float32 epsilon."""
    x = x - x.mean(dim=-1, keepdim=True)
    previous = torch.cat([x[..., :1], x[..., :-1]], dim=-1)  # Kaldi: y[0] = x[0] - 0.97 x[0]
    x = (x - PREEMPHASIS * previous) * frame_window(x.device)
    power = torch.fft.rfft(x, n=FFT_SIZE).abs().pow(2)  # (..., 257)
    mel = torch.matmul(power, mel_banks(x.device).T)
    return mel.clamp(min=LOG_FLOOR).log()


def pad_or_crop(features: torch.Tensor, target_length: int) -> torch.Tensor:
    """Zero-pad at the end (log domain) or keep the first ``target_length`` frames.
    (B, F, C) -> (B, target_length, C)."""
    have = features.shape[1]
    if have >= target_length:
        return features[:, :target_length]
    return F.pad(features, (0, 0, 0, target_length - have))


def normalize(features: torch.Tensor, norm: Norm = "audioset") -> torch.Tensor:
    """``(x - mean) / (2 * std)`` with a preset name or a ``(mean, std)`` pair; None = identity."""
    stats = norm_stats(norm)
    if stats is None:
        return features
    mean, std = stats
    return (features - mean) / (2 * std)


def layout_hint(shape) -> str:
    """For a 2-D input of ``shape`` with more rows than columns, which reads as many tiny clips:
    the hint that it may be a (samples, channels) array ("" otherwise)."""
    if len(shape) != 2 or shape[0] <= shape[1] or shape[1] == 0:
        return ""
    return (
        f"; shape {tuple(shape)} reads as {shape[0]} clips of {shape[1]} samples: for a "
        "(samples, channels) array pass its channel mean, or its transpose for one clip per channel"
    )


def check_min_length(wave: torch.Tensor, name: str) -> None:
    """Raise ``AudioError`` naming the input when a 16 kHz clip ``(N,)`` has no whole frame."""
    if wave.shape[-1] < FRAME_LENGTH:
        raise AudioError(
            f"{name}: too short: {wave.shape[-1]} samples at 16 kHz, less than one 25 ms frame "
            f"({FRAME_LENGTH} samples)"
        )


def _too_short_message(short: list[int], lens: torch.Tensor, shape: torch.Size) -> str:
    """Error text for clips under one frame (``lens`` at 16 kHz): the first few of them, and
    :func:`layout_hint` of the input's ``shape``."""
    shown = ", ".join(f"{i} ({int(lens[i])} samples)" for i in short[:5])
    more = f" and {len(short) - 5} more" if len(short) > 5 else ""
    return (
        f"waveforms: clip(s) {shown}{more} at 16 kHz are shorter than one 25 ms frame "
        f"({FRAME_LENGTH} samples){layout_hint(shape)}"
    )


def preprocess(
    waveforms: torch.Tensor | np.ndarray | Sequence,
    sample_rate: int = SAMPLE_RATE,
    target_length: int = 1024,
    norm: Norm = "audioset",
    *,
    lengths: torch.Tensor | Sequence[int] | None = None,
    return_frames: bool = False,
    check_finite: bool = True,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """The official model input for a batch of clips (SPEC 1.1).

    Args:
        waveforms: one clip (N,), a list of clips of different lengths, or a (B, N) tensor
            (with ``lengths`` if it is right-padded); float samples on the [-1, 1] scale.
        sample_rate: rate of ``waveforms``; resampled to 16 kHz when different.
        target_length: frames after padding/cropping (1024 = 10.24 s for AudioSet).
        norm: 'audioset', 'esc50', 'spcv2', 'spass', a custom (mean, std), or None.
        return_frames: also return each clip's number of real (unpadded) frames.
        check_finite: scan the samples for NaN, Inf or magnitudes that would overflow the
            features (``AudioError``, see :func:`sslam.audio.check_samples`). ``False`` is for audio
            already checked when it was decoded, such as the training loop's: on CUDA the scan
            waits for the GPU.

    Returns:
        (B, 1, target_length, 128) float32 on the input's device, and with ``return_frames``
        also (B,) int64 real frame counts (capped at target_length).
    """
    if isinstance(target_length, bool) or not isinstance(target_length, (int, np.integer)) or target_length < 1:
        raise ValueError(f"target_length must be a positive number of frames, got {target_length!r}")
    sample_rate = integer_rate(sample_rate)
    norm_stats(norm)  # a bad norm fails before any work
    batch, lens = _as_batch(waveforms, lengths, check_finite)
    shape = batch.shape
    if sample_rate != SAMPLE_RATE:
        batch, lens = _resample_each(batch, lens, sample_rate)
    short = (lens < FRAME_LENGTH).nonzero().flatten().tolist()  # on the CPU: no wait for the GPU
    if short:
        raise AudioError(_too_short_message(short, lens, shape))
    # Asynchronous: a blocking host-to-device copy would wait for the GPU's queue.
    lens = lens.to(batch.device, non_blocking=True)
    centred = remove_dc(batch, lens)
    feats, frames = fbank(centred, lens, max_frames=target_length)
    # Padded rows are 0 in the log domain before normalisation, as in the official code.
    x = normalize(pad_or_crop(feats, target_length), norm).unsqueeze(1)
    return (x, frames) if return_frames else x


def patchify(x: torch.Tensor, patch: int = PATCH) -> torch.Tensor:
    """(B, 1, T, 128) -> (B, T/16 * 8, 256): 16x16 patches, time-major token order
    (token = t * 8 + f) and row-major pixels inside a patch (pixel = dt * 16 + df), the layout
    of the patch-embedding convolution's weight viewed as (D, 256)."""
    b, c, t, f = x.shape
    if c != 1 or t % patch or f % patch:
        raise ValueError(f"patchify: expected (B, 1, T, F) with T, F multiples of {patch}, got {tuple(x.shape)}")
    x = x.reshape(b, t // patch, patch, f // patch, patch)
    return x.permute(0, 1, 3, 2, 4).reshape(b, (t // patch) * (f // patch), patch * patch)


def unpatchify(patches: torch.Tensor, num_freq_patches: int = NUM_MEL_BINS // PATCH, patch: int = PATCH) -> torch.Tensor:
    """Inverse of :func:`patchify`: (B, N, 256) -> (B, 1, N / 8 * 16, 128)."""
    b, n, _ = patches.shape
    t = n // num_freq_patches
    x = patches.reshape(b, t, num_freq_patches, patch, patch).permute(0, 1, 3, 2, 4)
    return x.reshape(b, 1, t * patch, num_freq_patches * patch)
