"""Tests of sslam/mixing.py: window draws, the mixture rule in both layouts, partner bookkeeping."""

import pytest
import torch

from sslam.features import patchify, unpatchify
from sslam.mixing import (
    MixWindows,
    mix_patches,
    mix_spectrograms,
    mixed_row_ranges,
    partner_keep_indices,
    sample_windows,
    window_frame_mask,
)


def test_mix_windows_validates():
    with pytest.raises(ValueError, match="non-overlapping"):
        MixWindows(starts=(32, 40), width=16)
    with pytest.raises(ValueError, match="non-overlapping"):
        MixWindows(starts=(-16, 40), width=16)
    with pytest.raises(ValueError, match="width"):
        MixWindows(starts=(0, 16), width=0)
    touching = MixWindows(starts=(0, 16), width=16)
    assert touching.ranges() == ((0, 16), (16, 32)) and touching.end == 32


def test_sample_windows_official_ranges():
    """1024 frames: first in {0, ..., 496}, second in {first + 240, ..., <= 782}, all values hit."""
    gen = torch.Generator().manual_seed(1)
    firsts, seconds = set(), set()
    for _ in range(3000):
        w = sample_windows(generator=gen)
        first, second = w.starts
        assert w.width == 240
        assert first % 16 == 0 and 0 <= first <= 496
        assert second % 16 == 0 and first + 240 <= second <= 782
        firsts.add(first)
        seconds.add(second)
    assert firsts == set(range(0, 512, 16))
    assert seconds == set(range(240, 783, 16))


def test_sample_windows_reproducible_and_generalised():
    a = [sample_windows(64, 16, 16, torch.Generator().manual_seed(5)) for _ in range(2)]
    assert a[0] == a[1]
    gen = torch.Generator().manual_seed(0)
    for _ in range(200):
        w = sample_windows(64, 16, 16, gen)
        # 64 frames: first in {0, 16}, second in range(first + 16, 47, 16).
        assert w.starts[0] in (0, 16) and w.starts[1] in range(w.starts[0] + 16, 47, 16)
    # Unaligned starts reach the official bounds exactly: the first below min(T // 2,
    # T - 2 W - 1), the second up to T - W - 2 (the official randint's last value).
    draws = [sample_windows(40, 5, 1, gen).starts for _ in range(3000)]
    assert {first for first, _ in draws} == set(range(20))
    assert max(second for _, second in draws) == 40 - 5 - 2
    assert all(first + 5 <= second for first, second in draws)


def test_sample_windows_rejects_impossible_sizes():
    with pytest.raises(ValueError, match="too short"):
        sample_windows(num_frames=400, width=240)
    with pytest.raises(ValueError, match="positive"):
        sample_windows(num_frames=64, width=16, align=0)
    # Unsigned sizes: their differences wrapped around, and windows past the end were drawn.
    import numpy as np

    for unsigned in (lambda v: torch.tensor(v, dtype=torch.uint8), np.uint64):
        with pytest.raises(ValueError, match="too short"):
            sample_windows(unsigned(100), unsigned(100))


@pytest.mark.parametrize("width, align", [(240, 16), (128, 16), (16, 16), (5, 1)])
def test_too_short_names_the_frames_two_windows_need(width, align):
    """The refusal said "range(first + 128, 127, 16) is empty for first=None"."""
    with pytest.raises(ValueError, match=rf"num_frames={2 * width} is too short for two windows of {width} frames: "
                                         rf"they need at least {2 * width + 2}"):
        sample_windows(2 * width, width, align)
    # The bound is exact, and from it on every draw succeeds.
    for num_frames in range(2 * width + 2, 2 * width + 2 + 3 * align):
        for seed in range(20):
            w = sample_windows(num_frames, width, align, torch.Generator().manual_seed(seed))
            assert 0 <= w.starts[0] and w.starts[0] + width <= w.starts[1] and w.starts[1] + width < num_frames
    with pytest.raises(ValueError, match="too short"):
        sample_windows(2 * width + 1, width, align)


def test_window_frame_mask():
    mask = window_frame_mask(MixWindows((0, 32), 16), 64)
    expected = torch.zeros(64, dtype=torch.bool)
    expected[0:16] = True
    expected[32:48] = True
    assert torch.equal(mask, expected)
    with pytest.raises(ValueError, match="past the 40 frames"):
        window_frame_mask(MixWindows((0, 32), 16), 40)


def test_mix_spectrograms_hand_checked():
    """B=3, T=64, F=16, windows [0, 16) and [32, 48): clip i keeps itself there, else max."""
    spec = torch.randn(3, 1, 64, 16)
    windows = MixWindows(starts=(0, 32), width=16)
    mixed = mix_spectrograms(spec, windows)
    for i in range(3):
        partner = spec[i - 1]  # clip 0 pairs with clip 2
        for t in range(64):
            inside = t < 16 or 32 <= t < 48
            expected = spec[i, :, t] if inside else torch.maximum(spec[i, :, t], partner[:, t])
            assert torch.equal(mixed[i, :, t], expected), (i, t)


def test_mix_spectrograms_equals_official_minus_inf_rule():
    spec = torch.randn(5, 1, 80, 8, dtype=torch.float16)
    windows = MixWindows(starts=(3, 41), width=17)  # frame windows need no alignment here
    partner = torch.roll(spec, 1, 0).clone()
    for start, stop in windows.ranges():
        partner[:, :, start:stop] = float("-inf")
    assert torch.equal(mix_spectrograms(spec, windows), torch.maximum(spec, partner))


def test_mix_spectrograms_single_clip_is_identity():
    spec = torch.randn(1, 1, 48, 8)
    assert torch.equal(mix_spectrograms(spec, MixWindows((0, 16), 16)), spec)


def test_mix_patches_equals_spectrogram_layout():
    spec = torch.randn(3, 1, 112, 48)  # 7 time patches x 3 frequency patches
    windows = MixWindows(starts=(16, 64), width=32)
    via_spec = patchify(mix_spectrograms(spec, windows))
    via_patches = mix_patches(patchify(spec), windows, freq_patches=3)
    assert torch.equal(via_patches, via_spec)
    assert torch.equal(unpatchify(via_patches, 3), mix_spectrograms(spec, windows))


def test_mix_patches_validates():
    patches = torch.randn(2, 7 * 8, 256)
    with pytest.raises(ValueError, match="multiples of 16"):
        mix_patches(patches, MixWindows((8, 40), 16))
    with pytest.raises(ValueError, match="freq_patches"):
        mix_patches(torch.randn(2, 30, 256), MixWindows((0, 16), 16))
    with pytest.raises(ValueError, match="past the 112 frames"):
        mix_patches(patches, MixWindows((0, 96), 32))


def test_partner_keep_indices_official_shape():
    windows = MixWindows(starts=(32, 400), width=240)
    keep = partner_keep_indices(windows)
    assert keep.dtype == torch.int64 and keep.numel() == 272
    assert torch.all(keep[1:] > keep[:-1])
    rows = keep // 8
    dropped = set(range(2, 17)) | set(range(25, 40))
    assert set(rows.tolist()) == set(range(64)) - dropped
    assert torch.equal(keep[:16], torch.arange(16))  # rows 0 and 1, all 8 columns


def test_partner_keep_indices_small_case():
    keep = partner_keep_indices(MixWindows((16, 48), 16), time_patches=4, freq_patches=2)
    # Rows 1 and 3 are windows; rows 0 and 2 stay: tokens 0, 1, 4, 5.
    assert keep.tolist() == [0, 1, 4, 5]


def test_mixed_row_ranges():
    assert mixed_row_ranges(MixWindows((32, 400), 240)) == ((0, 2), (17, 25), (40, 64))
    # Window at the start, touching windows, a window reaching the end: only one range left.
    assert mixed_row_ranges(MixWindows((0, 240), 240), time_patches=32) == ((30, 32),)
    assert mixed_row_ranges(MixWindows((16, 272), 240)) == ((0, 1), (16, 17), (32, 64))
    total = sum(stop - start for start, stop in mixed_row_ranges(MixWindows((64, 496), 240)))
    assert total == 34  # 544 mixed frames


def test_mixed_rows_match_keep_indices():
    gen = torch.Generator().manual_seed(3)
    for _ in range(20):
        windows = sample_windows(generator=gen)
        rows = torch.cat([torch.arange(a, b) for a, b in mixed_row_ranges(windows)])
        keep = partner_keep_indices(windows)
        assert torch.equal(keep.view(-1, 8)[:, 0] // 8, rows)


def test_sizes_that_are_not_positive_ints_are_named():
    """They failed as a torch.arange, zeros() or modulo-by-zero error, or (a float patch) were
    taken in float arithmetic."""
    windows = MixWindows((0, 240))
    for kwargs, name in (({"freq_patches": -1}, "freq_patches"), ({"time_patches": -4}, "time_patches"),
                         ({"time_patches": 64.0}, "time_patches"), ({"patch": 0}, "patch"),
                         ({"patch": 16.0}, "patch")):
        with pytest.raises(ValueError, match=f"{name} must be a positive int"):
            partner_keep_indices(windows, **kwargs)
    with pytest.raises(ValueError, match="freq_patches must be a positive int"):
        mix_patches(torch.zeros(2, 512, 4), windows, 0)


def test_arguments_of_the_wrong_type_are_named():
    import numpy as np

    from sslam.masking import block_masks, clone_masks

    with pytest.raises(TypeError, match="spec: expected a torch.Tensor, got ndarray"):
        mix_spectrograms(np.zeros((2, 1, 64, 16)), MixWindows((0, 32), 16))
    with pytest.raises(TypeError, match="config: expected a MaskConfig, got NoneType"):
        block_masks(3, None, 0)
    with pytest.raises(TypeError, match="config: expected a MaskConfig, got dict"):
        clone_masks(3, 2, {}, 0)


def test_mix_patches_traces_for_symbolic_shapes():
    """torch.compile(dynamic=True, fullgraph=True): the patch side read from P is a symbolic
    integer there (math.isqrt of one does not trace)."""
    windows = MixWindows(starts=(16, 64), width=16)
    compiled = torch.compile(mix_patches, backend="eager", dynamic=True, fullgraph=True)
    for batch in (3, 5):
        patches = torch.randn(batch, 8 * 8, 256)
        assert torch.equal(compiled(patches, windows, 8), mix_patches(patches, windows, 8))
