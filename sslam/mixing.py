"""SSLAM mixture synthesis (SPEC section 5.1) and the partner pass's token bookkeeping (5.3, 5.4).

Every clip i of a batch is mixed with its predecessor i - 1 (clip 0 with clip B - 1, an in-batch
roll): the mixture is the element-wise maximum of the two normalised log-mel spectrograms, except
inside two windows of ``width`` frames where clip i is kept alone. One pair of windows is drawn
per step and shared by the whole batch. The max of normalised features equals the normalised max
of raw log-mel, because normalisation is a positive affine map.

The windows are aligned to 16 frames, so they cover whole patch rows; the teacher's second pass
runs on the clean partner with the tokens of those rows removed (:func:`partner_keep_indices`),
and the Source Retention target is stitched over the remaining row ranges
(:func:`mixed_row_ranges`).

Plain PyTorch: this is the reference of the Triton kernels in ``sslam.kernels.mixture`` and
``sslam.kernels.fbank_patch``, and what the trainer uses on CPU.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass

import torch

from .features import PATCH  # frames (and mel bins) per patch side


@dataclass(frozen=True)
class MixWindows:
    """The two non-mixed windows of one step: frames [s, s + width) for s in ``starts``.

    ``starts`` is ascending and the windows do not overlap (they may touch).
    """

    starts: tuple[int, int]
    width: int = 240

    def __post_init__(self) -> None:
        # Frame indices must be whole numbers: int() would silently truncate a start of 16.7,
        # and a width of 240.5 would make the windows cover 241 frames.
        try:
            starts = tuple(_frame_index(s) for s in self.starts)
        except TypeError:
            raise ValueError(f"MixWindows.starts: expected two int frame indices, got {self.starts!r}") from None
        if len(starts) != 2:
            raise ValueError(f"MixWindows.starts: expected two frame indices, got {self.starts!r}")
        try:
            width = _frame_index(self.width)
        except TypeError:
            raise ValueError(f"MixWindows.width: must be a positive int, got {self.width!r}") from None
        if width <= 0:
            raise ValueError(f"MixWindows.width: must be positive, got {self.width}")
        object.__setattr__(self, "width", width)
        first, second = starts
        if first < 0 or second < first + self.width:
            raise ValueError(
                f"MixWindows.starts={starts} with width {self.width}: expected 0 <= starts[0] and "
                "starts[0] + width <= starts[1] (ascending, non-overlapping windows)"
            )
        object.__setattr__(self, "starts", starts)

    @property
    def end(self) -> int:
        """One past the last frame of the second window: the spectrogram needs this many frames."""
        return self.starts[1] + self.width

    def ranges(self) -> tuple[tuple[int, int], tuple[int, int]]:
        """The two windows as half-open frame ranges ``((start, stop), (start, stop))``."""
        return tuple((s, s + self.width) for s in self.starts)  # type: ignore[return-value]


def _frame_index(value) -> int:
    """``value`` as an int (numpy and torch integers too); TypeError for bools, floats, etc."""
    if isinstance(value, bool):
        raise TypeError("bool")
    return operator.index(value)


def _size(name: str, value) -> int:
    """``value`` as a positive Python int; ValueError naming ``name`` otherwise (a float, a bool,
    0 or less would fail later as a torch or modulo error that names nothing)."""
    try:
        size = _frame_index(value)
    except TypeError:
        size = 0
    if size < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return size


def min_frames(width: int) -> int:
    """The shortest spectrogram :func:`sample_windows` draws two windows of ``width`` in: its
    first start range holds 0 from there on, and every first start is then below
    ``num_frames - 2 * width - 1``, so the second range is never empty."""
    return 2 * width + 2


def sample_windows(
    num_frames: int = 1024,
    width: int = 240,
    align: int = 16,
    generator: torch.Generator | None = None,
) -> MixWindows:
    """Draw the two non-mixed windows as the official code does, for any spectrogram length.

    The first start is uniform over ``range(0, min(num_frames // 2, num_frames - 2 * width - 1),
    align)``, the second uniform over ``range(first + width, num_frames - width - 1, align)``
    (for 1024 frames and width 240, the official ranges: first in {0, 16, ..., 496}, second in
    {first + 240, ..., <= 782}; the cap on the first start only matters for short spectrograms,
    where it keeps room for the second window).

    Args:
        num_frames: frames of the spectrogram (1024 for AudioSet).
        width: frames per window (240 = 15 patch rows).
        align: granularity of the starts (16 = one patch row).
        generator: the torch.Generator to draw from (the global one when None).
    """
    # Python ints: unsigned numpy or torch sizes would wrap around in the differences below.
    num_frames, width, align = (_size(name, value) for name, value in (
        ("num_frames", num_frames), ("width", width), ("align", align)))
    if num_frames < min_frames(width):
        raise ValueError(f"sample_windows: num_frames={num_frames} is too short for two windows of {width} frames: "
                         f"they need at least {min_frames(width)}")
    first_choices = range(0, min(num_frames // 2, num_frames - 2 * width - 1), align)
    first = first_choices[_uniform_index(len(first_choices), generator)]
    second_choices = range(first + width, num_frames - width - 1, align)
    second = second_choices[_uniform_index(len(second_choices), generator)]
    return MixWindows(starts=(first, second), width=width)


def _uniform_index(n: int, generator: torch.Generator | None) -> int:
    return int(torch.randint(n, (), generator=generator))


def window_frame_mask(windows: MixWindows, num_frames: int, device=None) -> torch.Tensor:
    """(num_frames,) bool: True on the frames inside either window (kept unmixed)."""
    _check_windows_fit(windows, num_frames, "frames")
    return _inside(windows.ranges(), num_frames, device)


def _inside(ranges, size: int, device=None) -> torch.Tensor:
    """(size,) bool: True on the indices within any ``(start, stop)`` of ``ranges``."""
    index = torch.arange(size, device=device)
    inside = torch.zeros(size, dtype=torch.bool, device=device)
    for start, stop in ranges:
        inside |= (index >= start) & (index < stop)
    return inside


def mix_spectrograms(spec: torch.Tensor, windows: MixWindows) -> torch.Tensor:
    """SSLAM mixtures of a batch of spectrograms.

    Args:
        spec: (B, 1, T, F) normalised log-mel, any float dtype.
        windows: the two non-mixed windows (frames), within T.

    Returns:
        (B, 1, T, F) like ``spec``: max(spec[i], spec[i - 1]) except on the windows' frames,
        where it is spec[i]. (The official code sets the partner to -inf there and takes the max,
        which is the same.)
    """
    if not isinstance(spec, torch.Tensor):
        raise TypeError(f"spec: expected a torch.Tensor, got {type(spec).__name__}")
    if spec.dim() != 4:
        raise ValueError(f"spec: expected (B, 1, T, F), got shape {tuple(spec.shape)}")
    partner = torch.roll(spec, shifts=1, dims=0)
    inside = window_frame_mask(windows, spec.shape[2], spec.device)[None, None, :, None]
    return torch.where(inside, spec, torch.maximum(spec, partner))


def window_patch_rows(windows: MixWindows, patch: int = PATCH) -> tuple[tuple[int, int], ...]:
    """The windows as half-open ranges of patch rows; they must be aligned to ``patch`` frames."""
    _check_type(windows)
    if windows.width % patch or any(s % patch for s in windows.starts):
        raise ValueError(
            f"windows {windows}: starts and width must be multiples of {patch} frames to cover "
            "whole patch rows"
        )
    return tuple((start // patch, stop // patch) for start, stop in windows.ranges())


def _check_type(windows) -> None:
    """A tuple or None where windows belong would fail on a missing attribute, naming nothing."""
    if not isinstance(windows, MixWindows):
        raise TypeError(f"windows: expected a MixWindows (two starts and a width, in frames), got {windows!r}")


def _check_windows_fit(windows: MixWindows, length: int, unit: str) -> None:
    _check_type(windows)
    if windows.end > length:
        raise ValueError(
            f"windows {windows}: the second window ends at {windows.end}, past the {length} "
            f"{unit} of the input"
        )


def patch_side(patches: torch.Tensor, freq_patches: int, name: str = "patches") -> int:
    """The height (= width) of the square patches (B, N, P), P = patch x patch, after checking
    that N is whole rows of ``freq_patches``."""
    side = round(math.sqrt(patches.shape[-1])) if patches.dim() == 3 else 0  # (isqrt does not trace symbolically)
    if patches.dim() != 3 or patches.shape[1] % freq_patches or side < 1 or side * side != patches.shape[-1]:
        raise ValueError(
            f"{name}: expected (B, N, P) with N a multiple of freq_patches={freq_patches} and P = patch x patch "
            f"(256 for 16 x 16 patches), got shape {tuple(patches.shape)}"
        )
    return side


def mix_patches(patches: torch.Tensor, windows: MixWindows, freq_patches: int = 8) -> torch.Tensor:
    """:func:`mix_spectrograms` in the patch layout of :func:`sslam.features.patchify`.

    Args:
        patches: (B, N, P) with N = time_patches * freq_patches, tokens time-major (token n lies
            in patch row n // freq_patches), P = patch x patch (256 for 16 x 16 patches).
        windows: aligned to the patch height, so each window is a set of whole patch rows.
        freq_patches: patches per row (8 for 128 mel bins).

    Returns:
        (B, N, P) like ``patches``, equal to patchify(mix_spectrograms(unpatchify(patches))).
    """
    freq_patches = _size("freq_patches", freq_patches)
    patch = patch_side(patches, freq_patches)
    time_patches = patches.shape[1] // freq_patches
    rows = _window_row_mask(windows, time_patches, patches.device, patch)
    inside = rows.repeat_interleave(freq_patches)[None, :, None]
    partner = torch.roll(patches, shifts=1, dims=0)
    return torch.where(inside, patches, torch.maximum(patches, partner))


def _window_row_mask(windows: MixWindows, time_patches: int, device=None, patch: int = PATCH):
    """(time_patches,) bool: True on the patch rows inside either window."""
    row_ranges = window_patch_rows(windows, patch)
    _check_windows_fit(windows, time_patches * patch, "frames")
    return _inside(row_ranges, time_patches, device)


def partner_keep_indices(
    windows: MixWindows, time_patches: int = 64, freq_patches: int = 8, patch: int = PATCH
) -> torch.Tensor:
    """(K,) int64, ascending: the patch tokens outside both windows (272 of 512 for ViT-B).

    The teacher's second pass on the clean partner keeps exactly these tokens, after positions
    are added, so each keeps its own position. Token index = row * freq_patches + column.
    """
    time_patches, freq_patches, patch = (_size(name, value) for name, value in (
        ("time_patches", time_patches), ("freq_patches", freq_patches), ("patch", patch)))
    inside = _window_row_mask(windows, time_patches, patch=patch)
    tokens = torch.arange(time_patches * freq_patches).view(time_patches, freq_patches)
    return tokens[~inside].flatten()


def mixed_row_ranges(
    windows: MixWindows, time_patches: int = 64, patch: int = PATCH
) -> tuple[tuple[int, int], ...]:
    """The non-empty half-open ranges of patch rows outside both windows, in order.

    For 1024 frames these are [0, r1), [r1 + 15, r2) and [r2 + 15, 64) with r = start / 16,
    minus any that are empty (a window at frame 0, touching windows, a window at the end). The
    Source Retention target consumes the partner pass's rows over these ranges in order.
    """
    time_patches, patch = _size("time_patches", time_patches), _size("patch", patch)
    (a_start, a_stop), (b_start, b_stop) = window_patch_rows(windows, patch)
    _check_windows_fit(windows, time_patches * patch, "frames")
    candidates = ((0, a_start), (a_stop, b_start), (b_stop, time_patches))
    return tuple((start, stop) for start, stop in candidates if stop > start)
