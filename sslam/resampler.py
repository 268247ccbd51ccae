"""Band-limited resampling between integer sample rates (windowed sinc, Hann window).

This computes the same linear map as the reference pipeline's resampler (``torchaudio``'s
``functional.resample`` with its defaults: ``lowpass_filter_width=6``, ``rolloff=0.99``,
``sinc_interp_hann``), without depending on it.

The math. Reduce both rates by their gcd to coprime ``orig`` and ``new``. Output sample ``m`` sits
at input time ``m * orig / new`` (in input samples). With the cutoff
``base = rolloff * min(orig, new)`` (in units of the reduced rates) and the time of input sample
``i`` relative to output ``m`` measured in cutoff periods, ``t = (i / orig - m / new) * base``,

    y[m] = sum_i x[i] * sinc(pi t) * cos(pi t / (2 L))**2 * base / orig     for |t| < L = 6,

with ``x`` taken as zero outside ``[0, N)``. There are ``M = ceil(new * N / orig)`` outputs, with
that quotient rounded to float32 before the ceiling as the reference does (see ``output_length``).
Output ``m = n * new + j`` depends on ``j`` (its *phase*) only through ``j / new``, so the filter
bank has ``new`` phases that slide by ``orig`` input samples per ``new`` outputs.

How it is applied. Two paths compute the same sums:

* ``exact=True`` (default): the dense filter bank, ``orig + 2 * width`` taps per phase, built with
  the reference's float arithmetic and applied as one strided ``conv1d``, exactly as the reference
  does -- its outputs are bit-identical on the CPU. Banks over 1 GiB (coprime rates such as
  383999 -> 16000 Hz, where the reference needs 25 GB) take the fast path instead, with a warning. Bit identity matters more than one would
  think: log-mel bins whose energy sits at Kaldi's float-epsilon floor (quiet low frequencies) turn
  1e-7 waveform differences into 1e-3 log-domain differences.
* ``exact=False``: only about ``2 * width`` of those taps are non-zero (for 44.1 kHz -> 16 kHz:
  475 taps, 34 non-zero). The outputs of a block are split into groups of consecutive phases;
  each group only reads the short window of input that its phases touch, and all groups run as
  ONE batched matmul over a strided (overlapping, copy-free) view of the padded input: 4-6x fewer
  multiply-adds, within ~1e-6 of the reference. The training data path uses it.

Faithfulness detail. The reference forms ``t`` in the waveform's dtype; in float32 that rounding
of ``t`` moves outputs by up to ~5e-5 from the exact float64 filter, more than our 1e-5 parity
tolerance. So ``t`` is formed with the same float32 (or float64) operations, and the window and
sinc are then evaluated in float64 and cast to the waveform's dtype.
"""

from __future__ import annotations

import math
import operator
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .cached import cached_constant

__all__ = ["resample", "inputs_needed", "output_length", "LOWPASS_FILTER_WIDTH", "ROLLOFF"]

LOWPASS_FILTER_WIDTH = 6
"""Half-width of the Hann window, in zero crossings of the low-pass sinc."""

ROLLOFF = 0.99
"""Cutoff as a fraction of the lower Nyquist frequency (leaves room for the transition band)."""

# Consecutive output phases computed by one matmul group: 16 float32 columns are two AVX2
# registers wide, small enough that a group's input window stays short.
_PHASES_PER_GROUP = 16

_SUPPORTED_DTYPES = (torch.float32, torch.float64)

# The exact path's dense bank has new * (orig + 2 * width) taps: tiny for common rate pairs
# (44.1 kHz -> 16 kHz: 76 k) but huge for coprime ones (383999 -> 16000 Hz: 6.1 G taps, 25 GB;
# the reference itself runs out of memory there). Banks up to _DENSE_CACHE_ELEMENTS taps are
# cached, of larger ones only the last; banks over _DENSE_MAX_BYTES (also several seconds just
# to build) are not built at all: those rate pairs take the sparse path, within ~1e-6 of the
# reference, even with exact=True.
_DENSE_CACHE_ELEMENTS = 1 << 24
_DENSE_MAX_BYTES = 1 << 30
_BUILD_SLICE_ELEMENTS = 1 << 22


@dataclass(frozen=True)
class _ResamplePlan:
    """How one (orig, new, dtype, device) resampling is laid out as a batched matmul.

    A *block* is ``block_inputs`` input samples producing ``block_outputs`` outputs. Its outputs
    are split into ``groups`` groups of ``phases_per_group`` consecutive outputs (the last group
    padded with zero columns). Group ``g`` of the block starting at input ``b * block_inputs``
    reads the ``window`` inputs starting at ``b * block_inputs + window_start + g * group_shift``.
    ``weights`` is ``(groups, window, phases_per_group)``.
    """

    orig: int
    new: int
    block_inputs: int
    block_outputs: int
    group_shift: int
    window_start: int
    weights: Tensor

    @property
    def groups(self) -> int:
        return self.weights.shape[0]

    @property
    def window(self) -> int:
        return self.weights.shape[1]

    @property
    def phases_per_group(self) -> int:
        return self.weights.shape[2]


def _check_rate(name: str, value) -> int:
    """Return ``value`` as a Python int, or raise ``ValueError`` naming ``name``."""
    if isinstance(value, bool):
        raise ValueError(f"{name} must be a positive integer sample rate, got {value!r}")
    try:
        rate = operator.index(value)
    except TypeError:
        raise ValueError(
            f"{name} must be a positive integer sample rate, got {value!r} ({type(value).__name__})"
        ) from None
    if rate <= 0:
        raise ValueError(f"{name} must be a positive integer sample rate, got {rate}")
    return rate


def _reduced(orig_freq: int, new_freq: int) -> tuple[int, int]:
    """Both rates divided by their gcd."""
    divisor = math.gcd(orig_freq, new_freq)
    return orig_freq // divisor, new_freq // divisor


def output_length(length: int, orig_freq: int, new_freq: int) -> int:
    """Number of outputs for ``length`` inputs resampled from ``orig_freq`` to ``new_freq`` Hz.

    The reference takes the ceiling of ``new * length / orig`` (reduced rates) after rounding
    that float64 quotient to float32 (``torch.ceil(torch.as_tensor(...))``). The rounding
    matters: for 44.1 kHz clips over ~4 s it drops the quotient's fractional part in ~4% of
    lengths (724111 samples at 176400 -> 16000 Hz: 65679 outputs, where the exact ceiling is
    65680), and one sample can decide whether the spectrogram gets one more frame. The
    reference's convolution yields ``new * (length // orig + 1)`` outputs, which bounds the
    count where float32 rounds up.
    """
    orig, new = _reduced(orig_freq, new_freq)
    quotient = torch.tensor(new * length / orig, dtype=torch.float32).item()
    return min(math.ceil(quotient), new * (length // orig + 1))


def inputs_needed(outputs: int, orig_freq: int, new_freq: int) -> int:
    """How many leading input samples determine the first ``outputs`` samples resampled from
    ``orig_freq`` to ``new_freq`` Hz: output frame ``n`` (``new`` outputs, reduced rates) reads
    inputs ``n * orig - width .. n * orig + orig + width - 1``."""
    orig, new = _reduced(orig_freq, new_freq)
    last_frame = (outputs - 1) // new
    return (last_frame + 1) * orig + _dense_width(orig, new)


def _phase_taps(orig: int, new: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Non-zero filter taps of every output phase.

    Args:
        orig, new: coprime (gcd-reduced) input and output rates.
        dtype: waveform dtype; the time grid ``t`` is rounded in it like the reference does.

    Returns:
        offsets: int64 ``(new, T)``: input offset ``d`` of each candidate tap: phase ``j`` of
            frame ``n`` reads input ``n * orig + d``.
        weights: float64 ``(new, T)``: filter value, exactly 0 where the tap lies outside the
            window (|t| >= L) or outside the reference's tap range ``[-width, width + orig)``.
    """
    base = min(orig, new) * ROLLOFF
    width = math.ceil(LOWPASS_FILTER_WIDTH * orig / base)
    phase = torch.arange(new, dtype=torch.int64)
    # The support of phase j is |d - j * orig / new| < L * orig / base <= width.
    first = (phase * orig) // new - width
    offsets = first[:, None] + torch.arange(2 * width + 2, dtype=torch.int64)
    in_range = (offsets >= -width) & (offsets < width + orig)

    # Same rounding as the reference: (-j / new + d / orig) * base in the waveform's dtype.
    phase_time = (-phase).to(dtype) / new
    t = ((phase_time[:, None] + offsets.to(dtype) / orig) * base).to(torch.float64)

    inside = in_range & (t.abs() < LOWPASS_FILTER_WIDTH)
    pi_t = math.pi * t
    sinc = torch.where(pi_t == 0, torch.ones_like(pi_t), torch.sin(pi_t) / pi_t)
    hann = torch.cos(pi_t / (2 * LOWPASS_FILTER_WIDTH)) ** 2
    weights = torch.where(inside, sinc * hann * (base / orig), torch.zeros_like(t))
    return offsets, weights


def _block_layout(offsets: Tensor, weights: Tensor, orig: int, new: int, frames: int):
    """Group layout for blocks of ``frames`` reference frames (``frames * orig`` inputs).

    Returns ``(group_shift, window_start, window, phases_per_group, groups)``: the integers that
    make every non-zero tap of group ``g`` fall inside
    ``[window_start + g * group_shift, window_start + g * group_shift + window)``.
    """
    outputs = frames * new
    # A group must span at least one input sample (per_group * orig / new >= 1): otherwise
    # group_shift rounds to 0, the window grows with the block and the caller's doubling loop
    # never ends (upsampling by 32x or more, e.g. 1 kHz -> 384 kHz).
    per_group = min(max(_PHASES_PER_GROUP, -(-new // orig)), outputs)
    groups = -(-outputs // per_group)
    # Groups advance by the input time their phases span, rounded; the exact per-group extents
    # below absorb the rounding drift.
    group_shift = round(per_group * orig / new)

    nonzero = weights != 0
    first_tap = torch.where(nonzero, offsets, offsets.max() + 1).min(dim=1).values
    last_tap = torch.where(nonzero, offsets, offsets.min() - 1).max(dim=1).values
    frame_start = torch.arange(frames, dtype=torch.int64)[:, None] * orig
    first_in_block = (frame_start + first_tap).reshape(-1)  # (outputs,) output p = i * new + j
    last_in_block = (frame_start + last_tap).reshape(-1)

    group = torch.arange(groups, dtype=torch.int64)
    group_first = first_in_block[group * per_group] - group * group_shift
    group_last = last_in_block[torch.clamp((group + 1) * per_group, max=outputs) - 1]
    window_start = int(group_first.min())
    window = int((group_last - group * group_shift).max()) - window_start + 1
    return group_shift, window_start, window, per_group, groups


@cached_constant(maxsize=16)
def _plan(orig: int, new: int, dtype: torch.dtype, device: torch.device) -> _ResamplePlan:
    """Build (and cache) the grouped filter bank for coprime rates ``orig -> new``."""
    offsets, weights = _phase_taps(orig, new, dtype)

    # A block must be at least one window long: the view of overlapping windows has row stride
    # block_inputs, and a matmul operand needs a row stride >= its row length.
    frames = 1
    while True:
        shift, start, window, per_group, groups = _block_layout(offsets, weights, orig, new, frames)
        if window <= frames * orig:
            break
        frames *= 2

    taps = weights.shape[1]
    frame = torch.arange(frames, dtype=torch.int64)[:, None, None]
    phase = torch.arange(new, dtype=torch.int64)[None, :, None]
    output = (frame * new + phase).expand(frames, new, taps)
    group = output // per_group
    row = frame * orig + offsets[None] - start - group * shift
    column = output % per_group
    values = weights[None].expand(frames, new, taps)
    keep = values != 0

    bank = torch.zeros(groups, window, per_group, dtype=torch.float64)
    bank.index_put_((group[keep], row[keep], column[keep]), values[keep])
    return _ResamplePlan(
        orig=orig,
        new=new,
        block_inputs=frames * orig,
        block_outputs=frames * new,
        group_shift=shift,
        window_start=start,
        weights=bank.to(device=device, dtype=dtype),
    )


def _dense_width(orig: int, new: int) -> int:
    """Taps on each side of the reference's dense filter bank (coprime rates)."""
    return math.ceil(LOWPASS_FILTER_WIDTH * orig / (min(orig, new) * ROLLOFF))


def _dense_elements(orig: int, new: int) -> int:
    """Size of the reference's dense filter bank ``new * (orig + 2 * width)`` (coprime rates)."""
    return new * (orig + 2 * _dense_width(orig, new))


def _build_dense_bank(orig: int, new: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """The reference's dense filter bank ``(new, 1, orig + 2 * width)``, built with the same
    arithmetic in the waveform's dtype, so that one strided conv1d reproduces its outputs bit
    for bit (its tiny off-window taps included).

    Built on the CPU for every device, so it is the reference's bank bit for bit everywhere.
    Built on an H200, the 44.1 and 22.05 kHz outputs missed the CPU's by more than 1e-5 (the
    CUDA test, with the bank applied by conv1d and by matmul alike); a GPU's float32 sin and
    cos, which need not round as the CPU's do, are the likely cause."""
    cpu = torch.device("cpu")
    base = min(orig, new) * ROLLOFF
    width = _dense_width(orig, new)
    taps = torch.arange(-width, width + orig, dtype=dtype, device=cpu)[None, None] / orig
    bank = torch.empty(new, 1, taps.shape[-1], dtype=dtype, device=cpu)
    # Every tap is computed on its own, so building a slice of phases at a time gives the same
    # bits while the temporaries stay a slice's size (a whole 1 GiB bank at once peaks at ~5 GiB).
    step = max(1, _BUILD_SLICE_ELEMENTS // taps.shape[-1])
    for first in range(0, new, step):
        last = min(new, first + step)
        t = torch.arange(-first, -last, -1, dtype=dtype, device=cpu)[:, None, None] / new + taps
        t = (t * base).clamp(-LOWPASS_FILTER_WIDTH, LOWPASS_FILTER_WIDTH)
        window = torch.cos(t * math.pi / LOWPASS_FILTER_WIDTH / 2) ** 2
        t = t * math.pi
        sinc = torch.where(t == 0, torch.ones((), dtype=dtype), t.sin() / t)
        bank[first:last] = sinc * (window * (base / orig))
    return bank.to(device)


_cached_dense_bank = cached_constant(maxsize=16)(_build_dense_bank)
# Large banks (up to _DENSE_MAX_BYTES): only the last one is kept, so a folder of files at one
# odd rate builds it once (7999 Hz: 4 s) without pinning one such bank per rate ever seen.
_cached_large_dense_bank = cached_constant(maxsize=1)(_build_dense_bank)


def _apply_dense(rows: Tensor, orig: int, new: int, out_length: int) -> Tensor:
    """Resample ``rows`` (B, N) with the dense bank (the exact path).

    On the CPU: one strided conv1d, as the reference, so the outputs are its bits. Elsewhere:
    the same sums as one matmul over a strided view of the input frames, which accumulates
    each output in float32 multiply-adds whatever the sizes; cuDNN chooses a convolution
    algorithm per shape, FFT-based ones among them, whose rounding is not the direct sum's.

    Banks of up to ``_DENSE_CACHE_ELEMENTS`` taps are cached (at most 16 x 64 MiB in float32);
    of the larger ones (coprime rates such as 7999 -> 16000 Hz: 122 M taps) only the last is
    kept. (Applying a large bank a slice of phases at a time would bound memory further, but
    conv1d then rounds a few outputs differently from the reference.)
    """
    if _dense_elements(orig, new) <= _DENSE_CACHE_ELEMENTS:
        bank = _cached_dense_bank(orig, new, rows.dtype, rows.device)
    else:
        bank = _cached_large_dense_bank(orig, new, rows.dtype, rows.device)
    width = _dense_width(orig, new)
    padded = F.pad(rows, (width, width + orig))
    if rows.device.type == "cpu":
        out = F.conv1d(padded[:, None], bank, stride=orig).transpose(1, 2)  # (B, frames, new)
    else:
        out = _dense_matmul(padded, bank, orig)
    # output m = frame * new + phase
    return out.reshape(rows.shape[0], -1)[:, :out_length]


def _dense_matmul(padded: Tensor, bank: Tensor, stride: int) -> Tensor:
    """``F.conv1d(padded[:, None], bank, stride=stride).transpose(1, 2)`` as a matmul:
    padded (B, L), bank (new, 1, taps) -> (B, frames, new)."""
    frames = padded.unfold(1, bank.shape[-1], stride)  # (B, frames, taps), a view
    return frames @ bank[:, 0].T


def _apply_plan(rows: Tensor, plan: _ResamplePlan, out_length: int) -> Tensor:
    """Resample ``rows`` ``(B, N)`` with ``plan``; returns ``(B, out_length)``."""
    batch, length = rows.shape
    stride, per_block = plan.block_inputs, plan.block_outputs
    groups, window, per_group = plan.groups, plan.window, plan.phases_per_group
    blocks = -(-out_length // per_block)

    # Zero padding on both sides stands in for the signal being zero outside [0, N). Each row is
    # padded to a whole number of blocks so that all rows share one block grid in the flat buffer.
    pad_left = max(0, -plan.window_start)
    first_read = plan.window_start + pad_left
    needed = (blocks - 1) * stride + first_read + (groups - 1) * plan.group_shift + window
    row_length = -(-max(needed, pad_left + length) // stride) * stride
    padded = F.pad(rows, (pad_left, row_length - pad_left - length)).reshape(-1)

    # Blocks of all rows; those straddling two rows are computed and dropped (a few per row).
    blocks_per_row = row_length // stride
    total_blocks = (batch - 1) * blocks_per_row + blocks
    windows = padded.as_strided(
        (groups, total_blocks, window), (plan.group_shift, stride, 1), first_read
    )
    grouped = torch.bmm(windows, plan.weights)  # (groups, total_blocks, per_group)

    per_row = grouped.as_strided(
        (groups, batch, blocks, per_group),
        (total_blocks * per_group, blocks_per_row * per_group, per_group, 1),
    )
    interleaved = per_row.permute(1, 2, 0, 3).reshape(batch, blocks, groups * per_group)
    return interleaved[..., :per_block].reshape(batch, blocks * per_block)[:, :out_length]


def resample(waveform: Tensor, orig_freq: int, new_freq: int, *, exact: bool = True) -> Tensor:
    """Resample along the last dimension with a Hann-windowed sinc low-pass filter.

    Equals ``torchaudio.functional.resample(waveform, orig_freq, new_freq)`` with its default
    arguments: bit for bit on the CPU with ``exact=True``; to ~1e-6 in float32 with
    ``exact=False`` (the grouped-matmul path, 3-4x faster; see the module docstring). Rate pairs
    whose reduced rates make the reference's dense filter bank larger than 1 GiB (coprime pairs
    like 383999 -> 16000 Hz, where the reference needs 25 GB; but also 16777 or 22051 Hz ->
    16 kHz) take the fast path even with ``exact=True``, with a warning. On CUDA the
    matmul/convolution follows torch's float32 precision settings (TF32 costs ~5e-4).

    Args:
        waveform: float32 or float64 tensor ``(..., N)``, ``N >= 1``; leading dims are a batch.
        orig_freq: input sample rate in Hz (positive int).
        new_freq: output sample rate in Hz (positive int).
        exact: reproduce the reference bit for bit (dense filter bank) rather than fast.

    Returns:
        Tensor ``(..., M)`` of the input's dtype and device, ``M = output_length(N, orig_freq,
        new_freq)``: ``ceil(new * N / orig)`` in float32 with both rates reduced by their gcd.
        When the rates are equal the input itself is returned
        (no copy), as the reference does.

    Raises:
        ValueError: a rate is not a positive integer, or ``waveform`` has no samples.
        TypeError: ``waveform`` is not a float32/float64 tensor.
    """
    orig_freq = _check_rate("orig_freq", orig_freq)
    new_freq = _check_rate("new_freq", new_freq)
    if not isinstance(waveform, Tensor):
        raise TypeError(f"waveform must be a torch.Tensor, got {type(waveform).__name__}")
    if waveform.dtype not in _SUPPORTED_DTYPES:
        raise TypeError(f"waveform must be float32 or float64, got {waveform.dtype}")
    if waveform.dim() == 0 or waveform.shape[-1] == 0:
        raise ValueError(
            f"waveform must have at least 1 sample along its last dim, got shape "
            f"{tuple(waveform.shape)}"
        )
    if orig_freq == new_freq:
        return waveform

    orig, new = _reduced(orig_freq, new_freq)
    length = waveform.shape[-1]
    out_length = output_length(length, orig, new)  # the reduced rates give the same count
    rows = waveform.reshape(-1, length)
    if rows.shape[0] == 0:
        return waveform.new_empty(*waveform.shape[:-1], out_length)
    bank_bytes = _dense_elements(orig, new) * waveform.element_size()
    if exact and bank_bytes > _DENSE_MAX_BYTES:
        warnings.warn(
            f"resample {orig_freq} -> {new_freq} Hz: the reference's filter bank for these rates "
            f"takes {bank_bytes / 2**20:,.0f} MiB, over the {_DENSE_MAX_BYTES / 2**20:,.0f} MiB that "
            "exact=True builds; resampled with the fast path instead (within ~1e-6 of the "
            "reference, not bit for bit)",
            stacklevel=2,
        )
    if exact and bank_bytes <= _DENSE_MAX_BYTES:
        out = _apply_dense(rows, orig, new, out_length)
    else:
        out = _apply_plan(rows, _plan(orig, new, waveform.dtype, waveform.device), out_length)
    return out.reshape(*waveform.shape[:-1], out_length)
