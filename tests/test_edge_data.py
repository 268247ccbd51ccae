"""Edge cases of the data side: masks, mixing windows, manifests, samplers, label files, metrics.

Each test names the general case it covers; the ones marked "regression" failed before the fix
described in their docstring.
"""

from __future__ import annotations

import itertools
import os
import time

import numpy as np
import pytest
import soundfile as sf
import torch

from sslam import native
from sslam.audio import AudioError, load_audio
from sslam.augment import spec_augment
from sslam.data import GlobalBatchSampler, build_dataset, collate, folder_paths, manifest_paths
from sslam.evaluate import read_weights
from sslam.labels import (
    LabelError,
    read_csv_split,
    read_descriptors,
    read_fairseq_split,
    read_split,
    split_labels,
)
from sslam.masking import MaskConfig, block_masks, block_masks_ref, clone_masks, kept_indices
from sslam.metrics import accuracy, average_precision, mean_average_precision
from sslam.mixing import MixWindows, mix_spectrograms, sample_windows

needs_native = pytest.mark.skipif(not native.built(), reason="sslam._native is not built")


@pytest.fixture
def native_on(monkeypatch):
    """Use the C++ extension whatever SSLAM_NATIVE says in the environment."""
    monkeypatch.setenv("SSLAM_NATIVE", "1")


# ---- masks -----------------------------------------------------------------------------------


def _check_mask(mask: torch.Tensor, config: MaskConfig, rows: int) -> None:
    assert mask.dtype == torch.bool and mask.shape == (rows, config.num_patches)
    assert ((~mask).sum(1) == config.num_kept).all()
    keep, restore = kept_indices(mask)
    assert keep.shape == (rows, config.num_kept)
    if config.num_kept > 1:
        assert (keep[:, 1:] > keep[:, :-1]).all()  # ascending, hence unique
    assert ((keep >= 0) & (keep < config.num_patches)).all()
    assert not mask.gather(1, keep).any()  # kept positions really are unmasked
    # restore undoes "kept first, then masked": a permutation of 0..L-1 per row
    assert torch.equal(restore.sort(1).values, torch.arange(config.num_patches).expand(rows, -1))


@pytest.mark.parametrize("grid", [(1, 2), (1, 8), (7, 3), (64, 8), (62, 8), (3, 1)])
@pytest.mark.parametrize("mask_prob", [0.01, 0.5, 0.8, 0.99])
@pytest.mark.parametrize("mask_length", [1, 5, 100])
def test_masks_on_odd_grids_keep_exactly_k(grid, mask_prob, mask_length):
    """Any grid / probability / block length (also blocks longer than the grid): every row of
    both implementations keeps exactly num_kept tokens, and kept_indices' invariants hold; a
    setting that would keep nothing or mask nothing is refused by name."""
    patches = grid[0] * grid[1]
    kept = int(patches * (1.0 - mask_prob))  # the official count: int(L * (1 - mask_prob))
    if kept in (0, patches):
        with pytest.raises(ValueError, match=f"keeps {kept} and masks {patches - kept} of {patches} patches"):
            MaskConfig(grid=grid, mask_prob=mask_prob, mask_length=mask_length)
        return
    config = MaskConfig(grid=grid, mask_prob=mask_prob, mask_length=mask_length)
    assert config.num_kept == kept
    _check_mask(block_masks(9, config, seed=3), config, 9)
    _check_mask(block_masks_ref(9, config, torch.Generator().manual_seed(3)), config, 9)


def test_one_patch_grid_is_refused_clearly():
    with pytest.raises(ValueError, match="keeps 0 and masks 1"):
        MaskConfig(grid=(1, 1))


@needs_native
def test_native_masks_do_not_depend_on_threads(native_on):
    config = MaskConfig(grid=(62, 8))
    rows = 1100  # > 4 chunks of 256 rows, so several workers really run
    one = block_masks(rows, config, 11, threads=1)
    for threads in (2, 3, 64):
        assert torch.equal(block_masks(rows, config, 11, threads=threads), one)
    # a prefix of the rows is the same draw (row r depends on (seed, r) only)
    assert torch.equal(block_masks(5, config, 11, threads=2), one[:5])


@pytest.mark.parametrize("mode", ["auto", "0"])
def test_masks_deterministic_and_seed_dependent(monkeypatch, mode):
    monkeypatch.setenv("SSLAM_NATIVE", mode)
    config = MaskConfig(grid=(7, 3), mask_prob=0.5, mask_length=2)
    a, b = block_masks(40, config, 5), block_masks(40, config, 5)
    assert torch.equal(a, b)
    assert not torch.equal(a, block_masks(40, config, 6))
    assert torch.equal(block_masks(8, config, -1), block_masks(8, config, 2**64 - 1))  # seeds wrap mod 2**64


@needs_native
def test_native_and_reference_agree_in_distribution(native_on):
    """Per-cell masking frequencies of the C++ masks and the torch reference agree (small grid,
    clamped blocks piling up on the borders), within 5 standard errors."""
    config = MaskConfig(grid=(7, 3), mask_prob=0.6, mask_length=3)
    rows = 6000
    fast = block_masks(rows, config, 1).double().mean(0)
    ref = block_masks_ref(rows, config, torch.Generator().manual_seed(1)).double().mean(0)
    p = (fast + ref) / 2
    se = (2 * p * (1 - p) / rows).sqrt().clamp_min(1e-3)
    assert ((fast - ref).abs() < 5 * se).all(), (fast - ref).abs().max()
    assert not torch.allclose(fast, fast.mean().expand_as(fast), atol=0.02)  # borders differ from the centre


@needs_native
@pytest.mark.parametrize(
    "kwargs",
    [{}, {"grid": (1, 8)}, {"grid": (7, 3), "mask_length": 9}, {"grid": (62, 8), "mask_dropout": 0.5},
     {"mask_prob": 0.3, "inverse": False}, {"grid": (64, 8), "mask_length": 2**31}],
)
def test_native_counts_match_config(native_on, kwargs):
    config = MaskConfig(**kwargs)
    assert native.extension().mask_counts(*config.native_args) == (config.num_centres, config.num_marked)


@pytest.mark.parametrize("length", [2**31 + 1, 2**63 - 1, 2**64, 2**600])
def test_huge_mask_length_refused_by_name(length):
    """Regression: mask_length was unbounded. 2**63 - 1 squared overflowed int64 in C++
    (1 block cell -> 138 centres where Python computed 0), 2**64 gave a pybind TypeError and
    2**600 an OverflowError in num_centres; the reference would build a tuple of mask_length
    offsets. Now MaskConfig refuses anything above 2**31."""
    with pytest.raises(ValueError, match="mask_length"):
        MaskConfig(mask_length=length)


def test_block_far_longer_than_grid_is_cheap_in_reference():
    """Regression: mark_blocks built all mask_length offsets (2**31 of them here); offsets past
    the grid are now dropped, which marks the same cells."""
    config = MaskConfig(grid=(7, 3), mask_length=2**31, mask_prob_adjust=1.0, mask_dropout=0.9)
    start = time.perf_counter()
    _check_mask(block_masks_ref(4, config, torch.Generator().manual_seed(0)), config, 4)
    assert time.perf_counter() - start < 5
    # a block longer than twice the grid covers the whole grid from any centre: same as l = 14
    small = MaskConfig(grid=(7, 3), mask_length=14, mask_prob_adjust=1.0, mask_dropout=0.9)
    from sslam.masking import mark_blocks

    centres = torch.tensor([[0, 20], [10, 10]])
    assert torch.equal(mark_blocks(centres, config), mark_blocks(centres, small))


@pytest.mark.parametrize("rows", [2**62, 2**64])
def test_huge_row_counts_refused_before_allocating(rows):
    """Regression: 2**62 rows x 512 patches overflow int64; numpy said "array is too big"
    (not naming the argument) and 2**64 gave a pybind TypeError. Both paths now raise a
    ValueError naming num_rows before allocating anything."""
    config = MaskConfig()
    with pytest.raises(ValueError, match="num_rows"):
        block_masks(rows, config, 0)
    with pytest.raises(ValueError, match="num_rows"):
        block_masks_ref(rows, config, torch.Generator())
    with pytest.raises(ValueError, match="num_rows"):
        clone_masks(2**60, 8, config, 0)


@pytest.mark.parametrize(
    "kwargs, name",
    [({"grid": 5}, "grid"), ({"grid": (0, 8)}, "grid"), ({"grid": (64, 8, 1)}, "grid"),
     ({"grid": (64.0, 8)}, "grid"), ({"mask_prob": float("nan")}, "mask_prob"), ({"mask_prob": 1.0}, "mask_prob"),
     ({"mask_prob_adjust": float("inf")}, "mask_prob_adjust"), ({"mask_length": 0}, "mask_length"),
     ({"mask_length": 5.0}, "mask_length"), ({"mask_dropout": -0.1}, "mask_dropout"), ({"inverse": 1}, "inverse")],
)
def test_mask_config_hostile_arguments(kwargs, name):
    """Regression for grid=5 (was TypeError "'int' object is not iterable")."""
    with pytest.raises(ValueError, match=name):
        MaskConfig(**kwargs)


@pytest.mark.parametrize("call", [lambda c: block_masks(-1, c, 0), lambda c: block_masks(2.0, c, 0),
                                  lambda c: block_masks(2, c, 0, threads=0), lambda c: clone_masks(2, 0, c, 0)])
def test_mask_call_hostile_arguments(call):
    with pytest.raises(ValueError):
        call(MaskConfig())


def test_kept_indices_edge_shapes():
    keep, restore = kept_indices(torch.zeros(0, 5, dtype=torch.bool))
    assert keep.shape == (0, 0) and restore.shape == (0, 5)
    mask = torch.tensor([[True, False, True], [False, True, True]])
    keep, restore = kept_indices(mask)
    assert keep.tolist() == [[1], [0]]
    with pytest.raises(ValueError, match="row 1 keeps 2"):
        kept_indices(torch.tensor([[True, False, True], [False, False, True]]))


# ---- mixing windows ----------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs", [{"starts": (0, 300), "width": 240.5}, {"starts": (0.7, 300)},
                                    {"starts": (0, 300), "width": True}, {"starts": (0, 300), "width": None},
                                    {"starts": 5}])
def test_mix_windows_refuse_non_integer_frames(kwargs):
    """Regression: a float width (240.5) was kept and covered 241 frames, float starts were
    truncated silently, width None / starts 5 raised TypeError."""
    with pytest.raises(ValueError, match="MixWindows"):
        MixWindows(**kwargs)


def test_mix_windows_accept_numpy_and_torch_ints():
    w = MixWindows(starts=(np.int64(16), torch.tensor(400)), width=np.int32(240))
    assert w.starts == (16, 400) and w.width == 240 and type(w.width) is int


@pytest.mark.parametrize("frames, width, align", [(1000, 250, 16), (998, 240, 16), (482, 240, 16), (4, 1, 1),
                                                  (777, 100, 7)])
def test_sample_windows_unaligned_lengths(frames, width, align):
    """Lengths and widths that are not multiples of 16: every draw fits, is aligned, does not
    overlap, and the draws are a function of the generator."""
    g = torch.Generator().manual_seed(0)
    draws = [sample_windows(frames, width, align, g) for _ in range(200)]
    for w in draws:
        # the first start is aligned, the second one lies a multiple of align after the first window
        assert w.starts[0] % align == 0 and (w.starts[1] - w.starts[0] - width) % align == 0
        assert w.starts[1] >= w.starts[0] + width and w.end <= frames
    again = torch.Generator().manual_seed(0)
    assert [sample_windows(frames, width, align, again) for _ in range(200)] == draws
    spec = torch.randn(3, 1, frames, 4)
    mixed = mix_spectrograms(spec, draws[0])
    for start, stop in draws[0].ranges():
        assert torch.equal(mixed[:, :, start:stop], spec[:, :, start:stop])


@pytest.mark.parametrize("frames, width", [(1024, 1024), (1024, 2000), (481, 240), (3, 1)])
def test_sample_windows_too_wide(frames, width):
    with pytest.raises(ValueError, match="too short"):
        sample_windows(frames, width)


def test_sample_windows_non_integer_arguments():
    with pytest.raises(ValueError, match="num_frames must be a positive int, got 1024.0"):
        sample_windows(1024.0, 240)


# ---- augmentation ------------------------------------------------------------------------------


def test_spec_augment_masks_fewer_bins_than_param():
    """Regression: the end bin was int(start + width) instead of int(start) + int(width)
    (torchaudio's rule), so a width of 5.6 starting at 2.7 masked 6 bins for param 6."""
    spec = torch.ones(16, 1, 40, 20)
    widest_f = widest_t = 0
    for seed in range(40):
        out = spec_augment(spec, 6, 10, np.random.default_rng(seed))
        widest_f = max(widest_f, int((out[:, 0] == 0).all(1).sum(-1).max()))
        widest_t = max(widest_t, int((out[:, 0] == 0).all(2).sum(-1).max()))
    assert widest_f == 5 and widest_t == 9


# ---- manifests, folders, collate ---------------------------------------------------------------


def test_manifest_bom_crlf_blank_lines_spaces_unicode_absolute(tmp_path):
    """Regression: a UTF-8 byte-order mark ended up in the root folder ('\\ufeff/data/root')."""
    text = "\ufeff/data/root\r\na b.wav\t32000\r\n\r\n  \r\nsub/ü 1.flac\t100\r\n/abs/x.wav\t32000\r\nnosize.wav\r\n"
    (tmp_path / "m.tsv").write_bytes(text.encode("utf-8"))
    paths = manifest_paths(tmp_path / "m.tsv")
    assert [str(p) for p in paths] == ["/data/root/a b.wav", "/data/root/sub/ü 1.flac", "/abs/x.wav",
                                       "/data/root/nosize.wav"]
    assert [p.name for p in manifest_paths(tmp_path / "m.tsv", min_samples=1000)] == ["a b.wav", "x.wav",
                                                                                      "nosize.wav"]
    assert str(manifest_paths(tmp_path / "m.tsv", root="/other")[0]) == "/other/a b.wav"


def test_manifest_paths_in_another_encoding_keep_their_bytes(tmp_path):
    latin1 = "caf\xe9.wav".encode("latin-1")  # b"caf\xe9.wav": not UTF-8
    sf.write(os.fsencode(tmp_path) + b"/" + latin1, np.zeros(16000), 16000)
    (tmp_path / "m.tsv").write_bytes(os.fsencode(str(tmp_path)) + b"\n" + latin1 + b"\t16000\n")
    (path,) = manifest_paths(tmp_path / "m.tsv")
    assert os.fsencode(path.name) == latin1 and path.is_file()
    assert build_dataset(str(tmp_path / "m.tsv"))[0][2] == []  # decoded, not skipped


def test_manifest_missing_root_line(tmp_path):
    """Regression: without the root line the first clip was taken as the root folder: that clip
    was dropped and every other path became 'a.wav\\t32000/b.wav'."""
    (tmp_path / "m.tsv").write_text("a.wav\t32000\nb.wav\t32000\n")
    with pytest.raises(ValueError, match=r"m.tsv:1: .*root"):
        manifest_paths(tmp_path / "m.tsv")


@pytest.mark.parametrize("body, match", [("/r\na.wav\t3.2e4\n", r"m.tsv:2: size column '3.2e4'"),
                                         ("/r\n\n\n", "no clips"), ("", "first line"), ("\n/r\na\t1\n", "first line")])
def test_manifest_bad_contents_name_the_line(tmp_path, body, match):
    (tmp_path / "m.tsv").write_text(body)
    with pytest.raises(ValueError, match=match):
        manifest_paths(tmp_path / "m.tsv")


def test_folder_paths_skip_non_audio_and_symlink_loops(tmp_path):
    """Audio files are listed, with a link to nowhere and a pipe named as audio (reading them
    says what they are; they used to vanish from a run without a word)."""
    sf.write(tmp_path / "a.WAV", np.zeros(800), 16000)
    (tmp_path / "notes.txt").write_text("hi")
    (tmp_path / "sub").mkdir()
    sf.write(tmp_path / "sub" / "b.flac", np.zeros(800), 16000)
    (tmp_path / "sub" / "loop").symlink_to(tmp_path, target_is_directory=True)
    (tmp_path / "dangling.wav").symlink_to(tmp_path / "missing.wav")
    os.mkfifo(tmp_path / "sub" / "pipe.wav")
    listed = folder_paths(tmp_path)
    assert [p.relative_to(tmp_path).as_posix() for p in listed] == ["a.WAV", "dangling.wav", "sub/b.flac",
                                                                   "sub/pipe.wav"]
    with pytest.raises(AudioError, match="dangling.wav: file not found"):
        load_audio(listed[1])
    with pytest.raises(AudioError, match="pipe.wav: is not a regular file"):
        load_audio(listed[3])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no audio files"):
        folder_paths(tmp_path / "empty")


def test_folder_paths_follow_links_to_folders_once(tmp_path):
    """Regression: audio under a linked folder was left out without a word (Path.rglob does not
    follow links to folders; fairseq's manifest script does). A folder reached twice counts once."""
    shared = tmp_path / "shared"
    shared.mkdir()
    for name in ("x.wav", "y.wav"):
        sf.write(shared / name, np.zeros(800), 16000)
    data = tmp_path / "data"
    (data / "own").mkdir(parents=True)
    sf.write(data / "own" / "a.wav", np.zeros(800), 16000)
    (data / "linked").symlink_to(shared, target_is_directory=True)
    (data / "own" / "again").symlink_to(shared, target_is_directory=True)  # the same folder twice
    (data / "own" / "up").symlink_to(data, target_is_directory=True)  # a loop
    listed = [p.relative_to(data).as_posix() for p in folder_paths(data)]
    assert listed == ["linked/x.wav", "linked/y.wav", "own/a.wav"]  # "linked" before "own/again"
    # A folder of the tree, also reached through a link, is listed under its own path.
    (data / "alias").symlink_to(data / "own", target_is_directory=True)
    assert "own/a.wav" in [p.relative_to(data).as_posix() for p in folder_paths(data)]


def test_folders_list_every_container_libsndfile_reads(tmp_path):
    """NIST Sphere (.sph, .nist: TIMIT and other speech corpora), RF64 and .snd decode; a folder
    search left them out without a word."""
    for name, kind in [("a.sph", "NIST"), ("b.nist", "NIST"), ("c.rf64", "RF64"), ("d.snd", "AU")]:
        sf.write(tmp_path / name, np.full(800, 0.1), 16000, format=kind, subtype="PCM_16")
    listed = folder_paths(tmp_path)
    assert [p.name for p in listed] == ["a.sph", "b.nist", "c.rf64", "d.snd"]
    assert all(load_audio(p)[0].shape == (800,) for p in listed)


def test_a_folder_that_cannot_be_listed_is_an_error_not_left_out(tmp_path, monkeypatch):
    """Regression: os.walk skips a folder it cannot list without a word, so the audio of an
    unreadable subfolder vanished from a run (and an unreadable top folder read as empty)."""
    sf.write(tmp_path / "a.wav", np.zeros(800), 16000)
    (tmp_path / "locked").mkdir()
    sf.write(tmp_path / "locked" / "b.wav", np.zeros(800), 16000)
    scandir = os.scandir

    def refusing(path="."):  # as for a folder without read permission (tests run as root)
        if os.fspath(path).endswith("locked"):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return scandir(path)

    monkeypatch.setattr(os, "scandir", refusing)
    for top in (tmp_path, tmp_path / "locked"):
        with pytest.raises(ValueError, match=r"locked: cannot list this folder \(Permission denied\)"):
            folder_paths(top)


def test_a_missing_data_source_says_so(tmp_path):
    for name in ("nowhere", "nowhere.tsv"):
        with pytest.raises(ValueError, match=rf"data source '.*{name}': no such file or folder"):
            build_dataset(str(tmp_path / name))


def test_a_nul_byte_in_a_path_is_named(tmp_path):
    """No file name holds a NUL byte: a manifest with one is damaged (it stopped a whole
    extraction with a bare 'embedded null byte'), and load_audio names the path."""
    (tmp_path / "m.tsv").write_text(f"{tmp_path}\ngood.wav\t16000\nba\x00d.wav\t16000\n")
    with pytest.raises(ValueError, match=r"m\.tsv:3: the path holds a NUL byte"):
        manifest_paths(tmp_path / "m.tsv")
    with pytest.raises(AudioError, match=r"ba\x00d\.wav: the path holds a NUL byte"):
        load_audio(str(tmp_path / "ba\x00d.wav"))


def test_manifest_lines_end_at_line_ends_only_and_hold_two_columns(tmp_path):
    """Regression: a path holding U+2028 (or NEL, form feed) was split into two entries, the
    first without a size; a line of three columns was read as if it had two."""
    (tmp_path / "m.tsv").write_text(f"{tmp_path}\r\na\u2028b.wav\t16000\rc\x0cd.wav\t16000\n")
    assert [p.name for p in manifest_paths(tmp_path / "m.tsv")] == ["a\u2028b.wav", "c\x0cd.wav"]
    (tmp_path / "m.tsv").write_text(f"{tmp_path}\na.wav\t16000\t\n")  # a trailing tab holds nothing
    assert [p.name for p in manifest_paths(tmp_path / "m.tsv")] == ["a.wav"]
    (tmp_path / "m.tsv").write_text(f"{tmp_path}\na.wav\t16000\t7\n")
    with pytest.raises(ValueError, match=r"m.tsv:2: 3 tab-separated columns; expected 'path<TAB>size'"):
        manifest_paths(tmp_path / "m.tsv")


def test_entries_under_min_samples_are_counted_and_named_when_none_is_left(tmp_path):
    """Regression: a manifest whose every entry was under min_samples was called an "empty
    split (no clips listed)"; the entries skipped were reported nowhere."""
    (tmp_path / "m.tsv").write_text(f"{tmp_path}\na.wav\t5000\nb.wav\t5000\n")
    with pytest.raises(ValueError, match="m.tsv: empty split: all 2 entries have a size column under 10000 samples"):
        build_dataset(str(tmp_path / "m.tsv"), min_samples=10000)
    (tmp_path / "m.tsv").write_text(f"{tmp_path}\na.wav\t5000\nb.wav\t20000\n")
    assert build_dataset(str(tmp_path / "m.tsv"), min_samples=10000).skipped == 1


def test_build_dataset_upper_case_tsv(tmp_path):
    """Regression: 'M.TSV' was not recognised as a manifest (audio suffixes are case-blind)."""
    sf.write(tmp_path / "a.wav", np.zeros(1600, dtype=np.float32), 16000)
    (tmp_path / "M.TSV").write_text(f"{tmp_path}\na.wav\t1600\n")
    dataset = build_dataset(str(tmp_path / "M.TSV"), target_length=16)
    wave, index, failures = dataset[0]
    assert len(dataset) == 1 and index == 0 and not failures and wave.numel() == 1600


def test_collate_very_different_lengths():
    items = [(torch.ones(3), 4, []), (torch.full((50_000,), 2.0), 7, [("x.wav", "bad")]), (torch.ones(0), 1, [])]
    batch = collate(items)
    assert batch.waveforms.shape == (3, 50_000) and batch.lengths.tolist() == [3, 50_000, 0]
    assert batch.waveforms[0, 3:].abs().sum() == 0 and batch.waveforms[1].eq(2).all()
    assert batch.indices.tolist() == [4, 7, 1] and batch.failures == [("x.wav", "bad")]


# ---- GlobalBatchSampler --------------------------------------------------------------------------


def _take(sampler: GlobalBatchSampler, steps: int) -> list[list[list[int]]]:
    """``steps`` optimizer steps of micro-batches: [step][micro-step] -> indices."""
    it = iter(sampler)
    return [[next(it) for _ in range(sampler.accum_steps)] for _ in range(steps)]


@pytest.mark.parametrize("size, batch, world, accum", [(10, 1, 3, 1), (23, 2, 3, 2), (24, 4, 3, 2), (7, 1, 7, 1),
                                                       (50, 3, 2, 4)])
@pytest.mark.parametrize("start", [(0, 0), (0, 1), (1, 0), (2, 1)])
def test_sampler_shards_are_disjoint_and_union_is_single_process(size, batch, world, accum, start):
    single = GlobalBatchSampler(size, batch, 1, 0, world * accum, seed=4, start=start)
    steps = single.steps_per_epoch * 2 + 1  # crosses at least two epoch boundaries
    reference = _take(single, steps)
    ranks = [_take(GlobalBatchSampler(size, batch, world, r, accum, seed=4, start=start), steps)
             for r in range(world)]
    for step in range(steps):
        for k in range(accum):
            for r in range(world):
                assert ranks[r][step][k] == reference[step][k * world + r]
                assert len(ranks[r][step][k]) == batch
        flat = list(itertools.chain.from_iterable(reference[step]))
        assert len(set(flat)) == len(flat) == batch * world * accum
        assert all(0 <= i < size for i in flat)


def test_sampler_epoch_covers_each_clip_once():
    samplers = [GlobalBatchSampler(12, 2, world_size=2, rank=r, accum_steps=3) for r in range(2)]
    assert samplers[0].steps_per_epoch == 1
    for epoch in range(2):  # each step is a whole epoch: every clip exactly once over the ranks
        taken = [i for s in samplers for batch in _take(s, 2)[epoch] for i in batch]
        assert sorted(taken) == list(range(12))


def test_sampler_dataset_smaller_than_global_batch():
    with pytest.raises(ValueError, match="more than the 5 of the data"):
        GlobalBatchSampler(5, 2, world_size=3)


@pytest.mark.parametrize("kwargs, match", [({"rank": 2, "world_size": 2}, "rank 2"), ({"rank": -1}, "rank"),
                                           ({"batch_size": 0}, "batch_size"), ({"world_size": 0}, "world_size"),
                                           ({"accum_steps": 0}, "accum_steps"), ({"start": (0, -1)}, "start"),
                                           ({"start": (0,)}, "start"), ({"batch_size": 2.0}, "batch_size")])
def test_sampler_rejects_bad_arguments(kwargs, match):
    """Regression: rank >= world_size was accepted (its micro-batches overlapped another
    step's, or came out short or empty at the end of an epoch), batch_size 0 raised
    ZeroDivisionError and a negative start step yielded an empty batch."""
    args = {"size": 10, "batch_size": 2, **kwargs}
    with pytest.raises(ValueError, match=match):
        GlobalBatchSampler(**args)


@pytest.mark.parametrize("start", [(0, 5), (0, 7), (1, 12), (3, 2)])
def test_sampler_resume_matches_position(start):
    """Regression: a start step past the end of its epoch (saved with a larger epoch) made the
    sampler restart at the next epoch's step 0, while position() counted it as carried over."""
    sampler = GlobalBatchSampler(10, 2, start=start)
    assert sampler.steps_per_epoch == 5
    epoch, step = sampler.position(0)
    assert 0 <= step < sampler.steps_per_epoch
    expected = GlobalBatchSampler(10, 2, start=(epoch, step))
    assert _take(sampler, 7) == _take(expected, 7)
    fresh = _take(GlobalBatchSampler(10, 2), epoch * 5 + step + 3)
    assert _take(sampler, 3) == fresh[-3:]


@pytest.mark.parametrize("seed", [2**60, -(2**70), -5])
def test_sampler_any_int_seed(seed):
    """Regression: seeds whose mixed value left int64 raised 'Overflow when unpacking long'."""
    first = _take(GlobalBatchSampler(10, 2, seed=seed), 5)
    assert sorted(itertools.chain.from_iterable(b for step in first for b in step)) == list(range(10))


# ---- label files ---------------------------------------------------------------------------------


@pytest.fixture
def audio(tmp_path):
    folder = tmp_path / "audio"
    folder.mkdir()
    for name in "abc":
        sf.write(folder / f"{name}.wav", np.zeros(800), 16000)
    (tmp_path / "desc.csv").write_text("index,mid,display_name\n0,/m/dog,Dog\n1,/m/cat,Cat\n2,/m/bird,Bird\n")
    return folder


def test_label_files_with_byte_order_mark_and_crlf(tmp_path, audio):
    """Regression: a BOM broke the descriptor and CSV headers ("expected a header") and the
    manifest root ('\\ufeff/…/audio/a.wav' not found)."""
    (tmp_path / "bom.csv").write_bytes("\ufeffindex,mid,display_name\r\n0,/m/dog,Dog\r\n1,/m/cat,Cat\r\n".encode())
    assert read_descriptors(tmp_path / "bom.csv") == [("/m/dog", "Dog"), ("/m/cat", "Cat")]
    (tmp_path / "s.tsv").write_bytes(f"\ufeff{audio}\r\na.wav\t32000\r\nb.wav\t32000\r\n".encode())
    (tmp_path / "s.lbl").write_bytes("\ufeffa\t/m/dog,Cat\r\nb\tBird\r\n".encode())
    split = read_fairseq_split(tmp_path / "s.tsv", tmp_path / "desc.csv")
    assert split.targets.tolist() == [[1, 1, 0], [0, 0, 1]] and split.multilabel
    (tmp_path / "p.csv").write_bytes(f'\ufeffpath,labels\r\n{audio}/a.wav,"dog;cat"\r\n'.encode())
    assert read_csv_split(tmp_path / "p.csv").class_names == ["cat", "dog"]


@pytest.mark.parametrize("rows, match", [("0,/m/dog,Dog\n1,/m/dog,Cat\n", "desc2.csv:3: duplicate mid '/m/dog'"),
                                         ("0,/m/dog,Dog\n0,/m/cat,Cat\n", "desc2.csv:3: duplicate index 0"),
                                         ("0,/m/dog,Dog\n2,/m/cat,Cat\n", "without gaps"),
                                         ("0,/m/dog\n", "desc2.csv:2: expected"),
                                         ("x,/m/dog,Dog\n", "desc2.csv:2: index 'x'")])
def test_descriptor_errors_name_file_and_line(tmp_path, rows, match):
    """Regression: a duplicate mid was accepted (two classes, one lookup entry) and a duplicate
    index gave "indices must be 0..n-1 without gaps" without a line."""
    (tmp_path / "desc2.csv").write_text("index,mid,display_name\n" + rows)
    with pytest.raises(LabelError, match=match):
        read_descriptors(tmp_path / "desc2.csv")


def test_descriptors_without_a_header_are_read_as_fairseq_reads_them(tmp_path):
    """The official SPASS label_descriptors.csv files have no header ('0,music,music'): the
    official task reads every line as index,mid and the rest. They were refused ("expected a
    header"). A row without a display name is named by its mid."""
    (tmp_path / "d.csv").write_text("0,music,music\n1,speech,speech\n\n2,/m/05zppz,Male speech, man speaking\n")
    assert read_descriptors(tmp_path / "d.csv") == [("music", "music"), ("speech", "speech"),
                                                    ("/m/05zppz", "Male speech, man speaking")]
    (tmp_path / "d.csv").write_text("1,/m/cat\n0,/m/dog\n")
    assert read_descriptors(tmp_path / "d.csv") == [("/m/dog", "/m/dog"), ("/m/cat", "/m/cat")]
    (tmp_path / "d.csv").write_text("0,/m/dog,Dog\n0,/m/cat,Cat\n")
    with pytest.raises(LabelError, match="d.csv:2: duplicate index 0"):
        read_descriptors(tmp_path / "d.csv")
    for text, match in (("id,mid\n0,/m/dog\n", "d.csv:1: expected a header 'index,mid,display_name' or rows"),
                        ("0\n", "d.csv:1: expected a header 'index,mid,display_name' or rows"),
                        ("0,/m/dog\n1\n", r"d.csv:2: expected index,mid\[,display_name\]"),
                        ("0,/m/dog\nx,/m/cat\n", "d.csv:2: index 'x' is not an integer")):
        (tmp_path / "d.csv").write_text(text)
        with pytest.raises(LabelError, match=match):
            read_descriptors(tmp_path / "d.csv")


def test_a_display_name_with_unquoted_commas_is_whole(tmp_path):
    """Its fields after the mid were dropped: 'Male speech, man speaking' became 'Male speech'
    (and its .lbl names an 'unknown label'). With more header columns it is refused."""
    (tmp_path / "d.csv").write_text("index,mid,display_name\n0,/m/09x0r,Speech\n1,/m/05zppz,Male speech, man speaking\n")
    assert read_descriptors(tmp_path / "d.csv") == [("/m/09x0r", "Speech"), ("/m/05zppz", "Male speech, man speaking")]
    (tmp_path / "d.csv").write_text("index,mid,display_name,group\n0,/m/05zppz,Male speech, man speaking,voice\n")
    with pytest.raises(LabelError, match="d.csv:2: 5 fields for the 4 columns of the header; quote"):
        read_descriptors(tmp_path / "d.csv")
    # A spreadsheet's trailing commas, on the rows or on the header, are no fields.
    for text in ('index,mid,display_name\n0,/m/09x0r,"Speech",\n1,/m/05zppz,Male speech, man speaking,\n',
                 "index,mid,display_name,\n0,/m/09x0r,Speech\n1,/m/05zppz,Male speech, man speaking\n"):
        (tmp_path / "d.csv").write_text(text)
        assert read_descriptors(tmp_path / "d.csv") == [("/m/09x0r", "Speech"),
                                                        ("/m/05zppz", "Male speech, man speaking")]


def test_fine_tuning_manifests_skip_short_entries_with_their_labels(tmp_path, audio):
    """The official fine-tuning splits skip entries whose size column is under 10000 samples
    (fairseq's min_sample_size) and the .lbl lines that go with them, as pretraining does; they
    were all kept."""
    (tmp_path / "s.tsv").write_text(f"{audio}\na.wav\t16000\nb.wav\t8000\n\nc.wav\t10000\n")
    (tmp_path / "s.lbl").write_text("a\t/m/dog\nb\t/m/cat\n\nc\tBird\n")
    split = read_fairseq_split(tmp_path / "s.tsv", tmp_path / "desc.csv")
    assert [p.name for p in split.items] == ["a.wav", "c.wav"] and split.skipped == 1
    assert split.targets.tolist() == [[1, 0, 0], [0, 0, 1]]
    (tmp_path / "s.lbl").write_text("a\t/m/dog\nc\tBird\n")  # one line per entry, skipped ones too
    with pytest.raises(LabelError, match=r"s.lbl: 2 label lines for the 3 entries of .*s.tsv"):
        read_fairseq_split(tmp_path / "s.tsv", tmp_path / "desc.csv")


def test_lbl_errors_count_blank_lines(tmp_path, audio):
    """Regression: .lbl line numbers in errors skipped blank lines (said :3 for line 4)."""
    (tmp_path / "s.tsv").write_text(f"{audio}\na.wav\t32000\n\nb.wav\t32000\nc.wav\t32000\n")
    (tmp_path / "s.lbl").write_text("a\t/m/dog\n\nb\tBird\nc\t/m/zzz\n")
    with pytest.raises(LabelError, match=r"s.lbl:4: unknown label '/m/zzz'"):
        read_fairseq_split(tmp_path / "s.tsv", tmp_path / "desc.csv")


def test_ambiguous_display_name(tmp_path, audio):
    """Regression: two classes with one display name: the name silently meant the last one."""
    (tmp_path / "d.csv").write_text("index,mid,display_name\n0,/m/a,Bass\n1,/m/b,Bass\n")
    (tmp_path / "s.tsv").write_text(f"{audio}\na.wav\t32000\nb.wav\t32000\n")
    (tmp_path / "s.lbl").write_text("a\t/m/a\nb\t/m/b\n")
    assert read_fairseq_split(tmp_path / "s.tsv", tmp_path / "d.csv").targets.tolist() == [[1, 0], [0, 1]]
    (tmp_path / "s.lbl").write_text("a\t/m/a\nb\tBass\n")
    with pytest.raises(LabelError, match=r"s.lbl:2: label 'Bass' .*several classes"):
        read_fairseq_split(tmp_path / "s.tsv", tmp_path / "d.csv")


def test_fairseq_split_missing_root_and_count_mismatch(tmp_path, audio):
    (tmp_path / "s.tsv").write_text("a.wav\t1\nb.wav\t1\n")
    (tmp_path / "s.lbl").write_text("a\tDog\n")
    with pytest.raises(LabelError, match=r"s.tsv:1: the first line must be the root"):
        read_fairseq_split(tmp_path / "s.tsv", tmp_path / "desc.csv")
    (tmp_path / "s.tsv").write_text(f"{audio}\na.wav\t32000\nb.wav\t32000\n")
    with pytest.raises(LabelError, match="1 label lines for the 2 entries of"):
        read_fairseq_split(tmp_path / "s.tsv", tmp_path / "desc.csv")


def test_csv_split_unknown_label_names_line(tmp_path, audio):
    (tmp_path / "t.csv").write_text(f"path,labels\n\n{audio}/a.wav,dog\n{audio}/b.wav,zebra\n")
    with pytest.raises(LabelError, match=r"t.csv:4: unknown label 'zebra'"):
        read_csv_split(tmp_path / "t.csv", class_names=["dog"])


@pytest.mark.parametrize("ids", [("b.wav", "a.wav"), ("audio/b", "audio/a"), ("B", "A")])
def test_lbl_ids_of_other_clips_in_any_spelling_are_refused(tmp_path, audio, ids):
    """Regression: only a bare stem ('b') was recognised as another clip's id; 'b.wav',
    'audio/b' or 'B' put each clip's labels on the other clip."""
    (tmp_path / "s.tsv").write_text(f"{audio}\na.wav\t32000\nb.wav\t32000\n")
    (tmp_path / "s.lbl").write_text(f"{ids[0]}\t/m/dog\n{ids[1]}\t/m/cat\n")
    with pytest.raises(LabelError, match=r"s.lbl:1: labels of .* where the manifest .* has a.wav"):
        read_fairseq_split(tmp_path / "s.tsv", tmp_path / "desc.csv")
    (tmp_path / "s.lbl").write_text(f"{ids[1]}\t/m/dog\n{ids[0]}\t/m/cat\n")  # the right order
    assert read_fairseq_split(tmp_path / "s.tsv", tmp_path / "desc.csv").targets.tolist() == [[1, 0, 0], [0, 1, 0]]


def test_lbl_ids_with_dots_spaces_or_label_names_pair_with_their_clips(tmp_path):
    """Ids are matched to clips by file name or stem: ids with dots ('x.1', 'A_30.000') in
    another order are refused, in the right order accepted; a trailing tab, an id with a space
    or one that is also a label's name, without labels, are ids."""
    folder = tmp_path / "audio"
    folder.mkdir()
    names = ["x.wav", "x.1.wav", "A_30.000.wav", "B_30.000.wav", "my clip.wav", "Dog.wav"]
    for name in names:
        sf.write(folder / name, np.zeros(800), 16000)
    (tmp_path / "d.csv").write_text("index,mid,display_name\n0,/m/dog,Dog\n1,/m/cat,Cat\n")
    (tmp_path / "s.tsv").write_text(f"{folder}\n" + "".join(f"{n}\t32000\n" for n in names))
    good = "x\t/m/dog\nx.1\t/m/cat\nA_30.000\t/m/dog\nB_30.000\t/m/cat\t\nmy clip\nDog\n"
    (tmp_path / "s.lbl").write_text(good)
    split = read_fairseq_split(tmp_path / "s.tsv", tmp_path / "d.csv")
    assert split.targets.tolist() == [[1, 0], [0, 1], [1, 0], [0, 1], [0, 0], [0, 0]]
    (tmp_path / "s.lbl").write_text(good.replace("A_30.000\t", "TMP\t").replace("B_30.000\t", "A_30.000\t")
                                    .replace("TMP\t", "B_30.000\t"))
    with pytest.raises(LabelError, match=r"s.lbl:3: labels of 'B_30.000' where the manifest .* has A_30.000.wav"):
        read_fairseq_split(tmp_path / "s.tsv", tmp_path / "d.csv")
    (tmp_path / "s.lbl").write_text(good.replace("my clip\n", "/m/dog,/m/cat\n"))
    with pytest.raises(LabelError, match="s.lbl:5: labels without an id"):
        read_fairseq_split(tmp_path / "s.tsv", tmp_path / "d.csv")
    # An id with a space naming another clip ('x.1 b' where x.1.wav is) is out of order, not
    # labels after x.1's id.
    sf.write(folder / "x.1 b.wav", np.zeros(800), 16000)
    (tmp_path / "s.tsv").write_text(f"{folder}\n" + "".join(f"{n}\t32000\n" for n in names[:-1] + ["x.1 b.wav"]))
    (tmp_path / "s.lbl").write_text(good.replace("x.1\t/m/cat", "x.1 b").replace("Dog\n", "x.1\t/m/cat\n"))
    with pytest.raises(LabelError, match=r"s.lbl:2: labels of 'x.1 b' where the manifest .* has x.1.wav"):
        read_fairseq_split(tmp_path / "s.tsv", tmp_path / "d.csv")


@pytest.mark.parametrize("line, match", [("a\t/m/dog\t/m/cat", "3 tab-separated fields"),
                                         ("a /m/dog", "labels without an id"),
                                         ("a /m/unknown", "labels without an id"),
                                         ("/m/dog", "labels without an id")])
def test_lbl_lines_that_would_lose_labels_are_refused(tmp_path, audio, line, match):
    """Regression: a tab between labels dropped all but the first, a space after the id (or no
    id) left the clip without labels, silently."""
    (tmp_path / "s.tsv").write_text(f"{audio}\na.wav\t32000\n")
    (tmp_path / "s.lbl").write_text(line + "\n")
    with pytest.raises(LabelError, match=f"s.lbl:1: {match}"):
        read_fairseq_split(tmp_path / "s.tsv", tmp_path / "desc.csv")


def test_label_files_that_are_not_utf8_are_named(tmp_path, audio):
    """Regression: a CSV split, descriptors or weights file with a Latin-1 byte raised a bare
    UnicodeDecodeError that named no file."""
    (tmp_path / "latin.csv").write_bytes(b"path,labels\n" + f"{audio}/a.wav,".encode() + b"caf\xe9\n")
    (tmp_path / "latin_desc.csv").write_bytes(b"index,mid,display_name\n0,/m/c,Caf\xe9\n")
    for read, name in ((lambda: read_csv_split(tmp_path / "latin.csv"), "latin.csv"),
                       (lambda: read_descriptors(tmp_path / "latin_desc.csv"), "latin_desc.csv"),
                       (lambda: read_weights(str(tmp_path / "latin.csv"), 1), "latin.csv")):
        with pytest.raises(LabelError, match=rf"{name}: not UTF-8 text \(byte 0xe9 at offset \d+\)"):
            read()


def test_csv_split_details(tmp_path, audio):
    """Regression: an unquoted comma inside a known display name split it (the README says it
    does not); a quoted label spanning two lines lost its line break; a row with labels but
    no path was skipped silently; an upper-case .CSV suffix was not recognised; one field of
    many commas took seconds (cubic)."""
    (tmp_path / "d.csv").write_text('index,mid,display_name\n0,/m/ms,"Male speech, man speaking"\n1,/m/dog,Dog\n')
    (tmp_path / "u.csv").write_text(f"path,labels\n{audio}/a.wav,Male speech, man speaking\n{audio}/b.wav,Dog\n")
    assert read_csv_split(tmp_path / "u.csv", descriptors=tmp_path / "d.csv").targets.tolist() == [[1, 0], [0, 1]]
    (tmp_path / "m.csv").write_text(f'path,labels\n{audio}/a.wav,"dog\ncat"\n{audio}/b.wav,bird\n')
    with pytest.raises(LabelError, match=r"m.csv:2: a labels field spans lines"):
        read_csv_split(tmp_path / "m.csv")
    (tmp_path / "e.csv").write_text(f"path,labels\n{audio}/a.wav,dog\n,cat\n")
    with pytest.raises(LabelError, match=r"e.csv:3: labels without a path"):
        read_csv_split(tmp_path / "e.csv")
    (tmp_path / "UP.CSV").write_text(f"path,labels\n{audio}/a.wav,dog\n")
    assert read_split(str(tmp_path / "UP.CSV"), train=True).class_names == ["dog"]
    many = ",".join(f"l{i}" for i in range(3000))
    assert split_labels(many, {"x, y"}) == [f"l{i}" for i in range(3000)]


def test_balanced_weights_in_another_order_than_the_split_are_refused(tmp_path, audio):
    """Regression: a path,weight file was read by its last column only, so weights listed in
    another order than the training split went to the wrong clips."""
    items = [audio / f"{name}.wav" for name in "abc"]
    (tmp_path / "w.csv").write_text("c.wav,0\nb.wav,1\na.wav,1\n")
    with pytest.raises(LabelError, match=r"w.csv:1: the weight of c.wav where the training split has a.wav"):
        read_weights(str(tmp_path / "w.csv"), 3, items)
    (tmp_path / "w.csv").write_text("a.wav,0\nb.wav,1\nc.wav,1\n")
    assert read_weights(str(tmp_path / "w.csv"), 3, items).tolist() == [0.0, 1.0, 1.0]
    (tmp_path / "plain.csv").write_text("0\n1\n1\n")
    assert read_weights(str(tmp_path / "plain.csv"), 3, items).tolist() == [0.0, 1.0, 1.0]
    (tmp_path / "indexed.csv").write_text("0,0\n1,1\n2,1\n")  # index,weight: no names to check
    assert read_weights(str(tmp_path / "indexed.csv"), 3, items).tolist() == [0.0, 1.0, 1.0]
    (tmp_path / "ids.csv").write_text('A,0\n"b.wav",1\naudio/c,1\n')  # stems, quotes, folders, case
    assert read_weights(str(tmp_path / "ids.csv"), 3, items).tolist() == [0.0, 1.0, 1.0]


# ---- metrics ---------------------------------------------------------------------------------------


def test_average_precision_small_and_tied_inputs_match_sklearn():
    sklearn_metrics = pytest.importorskip("sklearn.metrics")
    g = torch.Generator().manual_seed(0)
    for n in (1, 2, 3, 7):
        for _ in range(20):
            scores = torch.randint(0, 3, (n, 3), generator=g).float()  # many ties
            targets = (torch.rand(n, 3, generator=g) < 0.5).float()
            ours = average_precision(scores, targets)
            for k in range(3):
                if targets[:, k].sum() == 0:
                    assert ours[k].item() == 0.0
                else:
                    ref = sklearn_metrics.average_precision_score(targets[:, k].numpy(), scores[:, k].numpy())
                    assert ours[k].item() == pytest.approx(ref, abs=1e-12)


def test_all_zero_predictions_and_classes_without_positives():
    targets = torch.tensor([[1.0, 0, 0], [0, 0, 1], [1, 0, 0], [0, 0, 0]])
    ap = average_precision(torch.zeros(4, 3), targets)
    # all scores tie: one threshold, AP = precision over everything = positives / N
    assert ap[0].item() == pytest.approx(0.5) and ap[2].item() == pytest.approx(0.25) and ap[1].item() == 0.0
    # mAP counts the class without positives as 0, as the official evaluation (scikit-learn
    # 1.3.2) does: (0.5 + 0 + 0.25) / 3
    assert mean_average_precision(torch.zeros(4, 3), targets) == pytest.approx(0.25)
    assert mean_average_precision(torch.zeros(4, 3), torch.zeros(4, 3)) == 0.0
    assert mean_average_precision(torch.tensor([[0.3]]), torch.tensor([[1.0]])) == 1.0


@pytest.mark.parametrize("scores, targets", [(torch.zeros(4, 2), torch.zeros(4, 3)), (torch.zeros(4, 2), torch.zeros(3, 2)),
                                             (torch.zeros(4), torch.zeros(4))])
def test_average_precision_shape_mismatch(scores, targets):
    """Regression: (4, 2) scores with (4, 3) targets silently gave NaN for every class; (3, 2)
    targets gave an IndexError; 1-D inputs a tuple-unpacking error."""
    with pytest.raises(ValueError, match="scores and targets"):
        average_precision(scores, targets)


def test_average_precision_nan_scores_refused():
    """Regression: NaN scores (a diverged model) produced a plausible AP (0.83 here);
    scikit-learn, which the official evaluation uses, refuses them."""
    with pytest.raises(ValueError, match="NaN"):
        mean_average_precision(torch.tensor([[float("nan")], [1.0], [0.0]]), torch.tensor([[1.0], [0], [1]]))


def test_accuracy_index_and_one_hot_targets():
    scores = torch.tensor([[0.1, 0.9, 0.0], [0.5, 0.2, 0.3]])
    assert accuracy(scores, torch.tensor([1, 2])) == 0.5
    assert accuracy(scores, torch.tensor([[0, 1.0, 0], [1.0, 0, 0]])) == 1.0
