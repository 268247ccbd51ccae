"""Edge cases of the user-facing embedding side: ``embed()`` on batches of very different
lengths, rates and dtypes; the HEAR 2021 API contract; encoders of other sizes round-tripping
through our export, ``load_encoder``, HEAR and ``sslam extract``; hostile inputs, resume and
output problems of ``sslam extract``; ``sslam convert`` overwriting; resuming and balanced
sampling of the fine-tuner. A test whose docstring starts with "Regression" failed before the
fix it describes."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf
import torch
import torchaudio
from conftest import GOLDEN

from sslam import hear
from sslam.audio import AudioError
from sslam.checkpoint import CheckpointError, convert, load_encoder, save_encoder
from sslam.cli import main
from sslam.evaluate import FinetuneConfig, Finetuner, read_weights
from sslam.labels import LabeledSplit, synth_split
from sslam.model import Encoder, EncoderConfig

CKPT = str(GOLDEN / "tiny_ckpt.pt")
WINDOW_SAMPLES = 400 + 1023 * 160  # exactly 1024 frames: one whole window


@pytest.fixture(scope="module")
def tiny():
    return load_encoder(CKPT)


def noise(n: int, seed: int = 0) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).uniform(-0.3, 0.3, n).astype(np.float32))


def frames_of(n: int) -> int:
    return 1 + (n - 400) // 160


def quiet(*args, **kwargs):
    pass


# ------------------------------------------------------------------------------ embed()


def test_embeddings_of_a_model_in_training_mode_are_deterministic():
    """A model with stochastic depth, left in training mode (create_model's), embeds in eval
    mode, as the official extraction does, and is handed back in training mode."""
    model = Encoder(EncoderConfig(embed_dim=32, depth=3, num_heads=2, max_length=8, drop_path_rate=0.5))
    model.preprocessing = {"sample_rate": 16000, "target_length": 128, "norm": "audioset"}
    clip = noise(16000)
    first, second = model.embed(clip, 16000), model.embed(clip, 16000)
    assert torch.equal(first.utterance, second.utterance) and model.training
    model.eval()
    assert torch.equal(model.embed(clip, 16000).utterance, first.utterance)


@pytest.mark.parametrize("padding", ["official", "mask"])
@torch.inference_mode()
def test_batch_of_very_different_lengths_equals_each_clip_alone(tiny, padding):
    """0.5 s, 10 s, 25 s (5 windows), exactly one window, one sample and one frame over it, and
    the 400-sample minimum, in one call with a batch size that splits a clip's windows across
    forward passes: every clip gets what it gets alone."""
    lengths = [8000, 160000, 400000, WINDOW_SAMPLES, WINDOW_SAMPLES + 1, WINDOW_SAMPLES + 160, 400]
    clips = [noise(n, seed=i) for i, n in enumerate(lengths)]
    together = tiny.embed(clips, 16000, padding=padding, batch_size=3)
    for i, (n, clip) in enumerate(zip(lengths, clips)):
        alone = tiny.embed(clip, 16000, padding=padding)
        rows = math.ceil(frames_of(n) / 16)
        expected_rows = max(rows, 64) if padding == "official" else rows
        assert int(alone.num_rows[0]) == int(together.num_rows[i]) == expected_rows, n
        r = expected_rows
        assert alone.frames.shape == (1, 8 * r, 64) and alone.timestamps.shape == (1, r, 64)
        assert int(together.timestamp_mask[i].sum()) == rows and int(together.frame_mask[i].sum()) == 8 * rows
        torch.testing.assert_close(together.utterance[i], alone.utterance[0], atol=1e-5, rtol=0)
        torch.testing.assert_close(together.mean[i], alone.mean[0], atol=1e-5, rtol=0)
        torch.testing.assert_close(together.frames[i, : 8 * r], alone.frames[0], atol=1e-5, rtol=0)
        torch.testing.assert_close(together.timestamps[i, :r], alone.timestamps[0], atol=1e-5, rtol=0)
        assert torch.equal(together.frame_mask[i, : 8 * r], alone.frame_mask[0])
        assert not together.frame_mask[i, 8 * r :].any()


@torch.inference_mode()
def test_frame_counts_and_row_times_for_odd_lengths(tiny):
    """Patch rows = ceil(frames / 16) with frames = 1 + (N - 400) // 160; each row's time is the
    centre of its 16 frames, (16 r + 7.5) * 10 ms + 12.5 ms, 160 ms apart."""
    lengths = [401, 559, 560, 2959, 16001, WINDOW_SAMPLES + 17, 16000 * 12 + 159]
    emb = tiny.embed([noise(n, seed=n) for n in lengths], 16000, padding="mask")
    rows = [math.ceil(frames_of(n) / 16) for n in lengths]
    assert emb.num_rows.tolist() == rows
    assert emb.timestamp_mask.sum(1).tolist() == rows
    assert emb.frame_mask.sum(1).tolist() == [8 * r for r in rows]
    assert emb.frames.shape == (len(lengths), 8 * max(rows), 64)
    expected = (torch.arange(max(rows), dtype=torch.float64) * 16 + 7.5) * 0.010 + 0.0125
    torch.testing.assert_close(emb.times, expected.float())
    official = tiny.embed([noise(n, seed=n) for n in lengths[:3]], 16000)
    assert official.num_rows.tolist() == [64, 64, 64] and official.timestamp_mask.sum(1).tolist() == rows[:3]


@pytest.mark.parametrize("rate", [8000, 22050, 44100, 48000])
@torch.inference_mode()
def test_other_rates_and_numpy_dtypes(tiny, rate):
    """Arrays at any rate equal the same audio resampled by torchaudio to 16 kHz first; float64
    numpy equals float32 torch; a batch at that rate equals each clip alone."""
    clips = [noise(int(rate * s), seed=rate + i) for i, s in enumerate((0.5, 3.3, 11.0))]
    batch = tiny.embed(clips, rate, padding="mask")
    for i, clip in enumerate(clips):
        at16k = tiny.embed(torchaudio.functional.resample(clip, rate, 16000), 16000, padding="mask")
        as_f64 = tiny.embed(clip.double().numpy(), rate, padding="mask")
        assert int(batch.num_rows[i]) == int(at16k.num_rows[0])
        torch.testing.assert_close(batch.utterance[i], at16k.utterance[0], atol=1e-5, rtol=0)
        assert torch.equal(as_f64.utterance, tiny.embed(clip, rate, padding="mask").utterance)


def test_integer_and_too_short_inputs_are_clear_errors_naming_the_clip(tiny):
    with pytest.raises(AudioError, match=r"audio\[1\]: samples must be floating point.*int16"):
        tiny.embed([noise(16000).numpy(), (noise(16000).numpy() * 32767).astype(np.int16)], 16000)
    # 0.02 s at 44.1 kHz is 320 samples at 16 kHz: less than one 25 ms frame
    with pytest.raises(AudioError, match=r"audio\[2\]: too short: 320 samples"):
        tiny.embed([noise(44100), noise(30000), noise(882)], 44100)


# ------------------------------------------------------------------------------ HEAR API


@pytest.fixture(scope="module")
def hear_model():
    return hear.load_model(CKPT, device="cpu")


@pytest.mark.parametrize("seconds", [0.1, 2.74, WINDOW_SAMPLES / 16000, 12.0])
@pytest.mark.parametrize("n_sounds", [1, 3])
def test_hear_contract_shapes_dtypes_and_batches(hear_model, n_sounds, seconds):
    model = hear_model
    assert model.sample_rate in (16000, 22050, 32000, 44100, 48000)
    assert isinstance(model.scene_embedding_size, int) and isinstance(model.timestamp_embedding_size, int)
    n = int(round(seconds * model.sample_rate))
    audio = torch.stack([noise(n, seed=s) for s in range(n_sounds)])
    scene = hear.get_scene_embeddings(audio, model)
    assert scene.shape == (n_sounds, model.scene_embedding_size) and scene.dtype == torch.float32
    emb, ts = hear.get_timestamp_embeddings(audio, model)
    rows = math.ceil(frames_of(n) / 16)
    assert emb.shape == (n_sounds, rows, model.timestamp_embedding_size) and emb.dtype == torch.float32
    assert ts.shape == (n_sounds, rows) and ts.dtype == torch.float32
    assert scene.device == emb.device == ts.device == next(model.parameters()).device
    assert torch.isfinite(scene).all() and torch.isfinite(emb).all()
    assert bool((ts == ts[:1]).all())  # the same timestamps for every sound
    if rows > 1:
        # milliseconds in float32: 160 ms apart up to rounding (hear-validator allows 1 ms)
        torch.testing.assert_close(ts.diff(dim=1), torch.full((n_sounds, rows - 1), 160.0), atol=1e-3, rtol=0)
    assert ts[0, 0] == 87.5
    # a sound gets the same embeddings whatever it is batched with
    last_scene = hear.get_scene_embeddings(audio[-1:], model)
    last_emb, last_ts = hear.get_timestamp_embeddings(audio[-1:], model)
    torch.testing.assert_close(scene[-1:], last_scene, atol=1e-5, rtol=0)
    torch.testing.assert_close(emb[-1:], last_emb, atol=1e-5, rtol=0)
    assert torch.equal(ts[-1:], last_ts)


def test_hear_timestamps_stay_within_the_audio(hear_model):
    """Regression: the centre of a partial last patch row used to be reported past the end of
    the audio (1.98 s -> 2007.5 ms), which the HEAR validator rejects. Its timestamp checks,
    for the lengths it uses (1.07 s, 1.98 s, 4.0 s):
    regular spacing, the last timestamp at most the audio's duration and at least two hops
    before its end. At 1.98 s the last patch row holds 4 real frames of 16 and its centre,
    2007.5 ms, is past the end of the audio."""
    for seconds in (1.07, 1.98, 4.0):
        n = int(seconds * hear_model.sample_rate)
        _, ts = hear.get_timestamp_embeddings(torch.rand(2, n) * 2 - 1, hear_model)
        duration_ms = 1000 * n / hear_model.sample_rate
        hop = float(ts.diff(dim=1).mean())
        assert float((ts.diff(dim=1) - hop).abs().max()) <= 1
        assert duration_ms - 2 * hop <= float(ts.max()) <= duration_ms, seconds


def test_hear_timestamps_are_exactly_spaced_and_inside_even_a_25_ms_sound(hear_model):
    _, ts = hear.get_timestamp_embeddings(torch.rand(1, 10 * 16000) * 0.2 - 0.1, hear_model)
    assert torch.equal(ts.diff(dim=1), torch.full_like(ts[:, 1:], 160.0))
    for n in (400, 1000, 1400):  # 25, 62.5 and 87.5 ms: shorter than the first row's centre
        _, ts = hear.get_timestamp_embeddings(torch.rand(1, n) * 0.2 - 0.1, hear_model)
        duration_ms = 1000 * n / 16000
        assert ts.shape == (1, 1) and 0 < float(ts[0, 0]) <= duration_ms, n


def test_hear_timestamps_at_a_finer_hop(hear_model):
    """hop_ms=40 (HEAR suggests 50 ms or less for event detection): the rows of the sound
    started 0, 40, 80 and 120 ms later, interleaved, evenly spaced and inside the audio."""
    assert hear.load_model(CKPT, device="cpu", hop_ms=160 / 32).hear_hop_ms == 5  # 80 samples
    model = hear.load_model(CKPT, device="cpu", hop_ms=40)
    for n in (1000, 16000, 44_123):
        audio = torch.stack([noise(n, seed=s) for s in range(2)])
        emb, ts = hear.get_timestamp_embeddings(audio, model)
        duration_ms = 1000 * n / 16000
        expected = torch.arange(87.5, duration_ms + 1e-9, 40.0) if duration_ms >= 87.5 else torch.tensor([n / 32])
        assert torch.equal(ts, expected.expand(2, -1)) and emb.shape == (2, len(expected), model.timestamp_embedding_size)
        coarse, _ = hear.get_timestamp_embeddings(audio, hear_model)
        torch.testing.assert_close(emb[:, ::4], coarse[:, : emb[:, ::4].shape[1]], atol=1e-5, rtol=0)
        if n > 2000:  # the row at 127.5 ms is the first row of the sound from 40 ms on
            later = hear_model.embed(audio[:, 640:], 16000).timestamps[:, 0]
            torch.testing.assert_close(emb[:, 1], later, atol=1e-5, rtol=0)
    for bad in (50, 0, -40, 320, float("nan"), 160 / 3, True):  # 160/3 ms is 853.3 samples: uneven starts
        with pytest.raises(ValueError, match="hop_ms"):
            hear.load_model(CKPT, device="cpu", hop_ms=bad)
    # numpy numbers are numbers (hop_ms=True was a 1 ms hop; np.int64(40) was refused)
    assert hear.load_model(CKPT, device="cpu", hop_ms=np.int64(40)).hear_hop_ms == 40.0
    assert hear.load_model(CKPT, device="cpu", hop_ms=np.float32(40)).hear_hop_ms == 40.0
    for bad in (0, True, 2.5):  # checked when the model is loaded, not at its first call
        with pytest.raises(ValueError, match="batch_size"):
            hear.load_model(CKPT, device="cpu", batch_size=bad)


def test_hear_refuses_integer_pcm_instead_of_embedding_it_at_its_scale(hear_model):
    pcm = (torch.rand(2, 16000) * 2000 - 1000).to(torch.int16)
    with pytest.raises(AudioError, match="samples must be floating point on the \\[-1, 1\\] scale"):
        hear.get_scene_embeddings(pcm, hear_model)


def test_embed_arguments_are_checked_as_preprocess_checks_them(tiny):
    clip = noise(16000)
    expected = tiny.embed(clip, 16000).utterance
    assert torch.equal(tiny.embed(clip, 16000.0).utterance, expected)
    assert torch.equal(tiny.embed(clip, 16000, hop=np.int64(16)).utterance, expected)
    for rate in (16000.5, 999, True):
        with pytest.raises(ValueError, match="sample_rate must be an integer in 1000..384000 Hz"):
            tiny.embed(clip, rate)
    for hop in (0, 16.0, 8, True):
        with pytest.raises(ValueError, match="hop="):
            tiny.embed(clip, 16000, hop=hop)
    stereo = np.stack([clip.numpy()] * 2, axis=1)  # (samples, channels), as soundfile.read gives
    with pytest.raises(AudioError, match=r"reads as 16000 clips of 2 samples.*channel mean"):
        tiny.embed(stereo, 16000)
    assert torch.equal(tiny.embed(clip, 16000, batch_size=np.int64(2)).utterance, expected)
    with torch.device("meta"):
        shapes_only = Encoder(tiny.cfg)
    shapes_only.preprocessing = tiny.preprocessing
    with pytest.raises(ValueError, match="model: its weights are on the meta device"):
        shapes_only.embed(clip, 16000)


@pytest.mark.parametrize("device", ["bogus", "cuda:99"] + ([] if torch.cuda.is_available() else ["cuda"]))
def test_unusable_devices_are_one_line_errors(tmp_path, capsys, device):
    args = ["extract", str(tmp_path), "--checkpoint", CKPT, "--out", str(tmp_path / "e.npz"), "--device", device]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"sslam: error: device={device!r}") and err.count("\n") == 1, err
    with pytest.raises(ValueError, match=f"device={device!r}"):
        hear.load_model(CKPT, device=device)


def test_hear_too_short_and_malformed_audio_are_clear_errors(hear_model):
    with pytest.raises(AudioError, match=r"audio\[0\]: too short"):
        hear.get_scene_embeddings(torch.zeros(2, 100), hear_model)
    with pytest.raises(ValueError, match=r"\(n_sounds, n_samples\)"):
        hear.get_timestamp_embeddings(torch.zeros(16000), hear_model)
    with pytest.raises(ValueError, match=r"\(n_sounds, n_samples\)"):
        hear.get_scene_embeddings(np.zeros((2, 16000), np.float32), hear_model)


# ------------------------------------------------------------------------- other model sizes

SIZES = {
    "dim48-depth3-heads3-mlp2": (EncoderConfig(embed_dim=48, depth=3, num_heads=3, mlp_ratio=2.0, max_length=80), {}),
    "dim32-depth1-heads4-patch8": (EncoderConfig(embed_dim=32, depth=1, num_heads=4, patch_size=8, max_length=200), {}),
    "dim40-heads5-patch32-no-qkv-bias": (
        EncoderConfig(embed_dim=40, depth=2, num_heads=5, patch_size=32, qkv_bias=False, max_length=40), {}),
    "head3-esc50-512": (EncoderConfig(embed_dim=32, depth=2, num_heads=8, num_classes=3, max_length=40),
                        {"preprocessing": {"sample_rate": 16000, "target_length": 512, "norm": "esc50"},
                         "label_names": ["x", "y", "z"]}),
}


@pytest.mark.parametrize("name", list(SIZES))
@torch.inference_mode()
def test_other_model_sizes_round_trip_bit_identically(tmp_path, name):
    """An encoder of another width / depth / heads / patch size, exported with our functions
    (save_encoder, then convert of that export), gives bit-identical outputs through
    load_encoder, the HEAR API and `sslam extract` (short clip and a clip of several windows)."""
    cfg, extra = SIZES[name]
    torch.manual_seed(3)
    model = Encoder(cfg).eval()
    model.preprocessing = extra.get("preprocessing", model.preprocessing)
    model.label_names = extra.get("label_names")
    exported = save_encoder(model, tmp_path / "ours")
    reconverted = convert(exported, tmp_path / "again")
    short, long = noise(16000 * 3, seed=1), noise(16000 * 23, seed=2)
    sf.write(tmp_path / "short.wav", short.numpy(), 16000, subtype="FLOAT")
    sf.write(tmp_path / "long.wav", long.numpy(), 16000, subtype="FLOAT")
    expected = model.embed([short, long], 16000)
    for path in (exported, reconverted):
        loaded = load_encoder(path)
        assert loaded.cfg == model.cfg and loaded.preprocessing == model.preprocessing
        assert loaded.label_names == model.label_names
        for key, value in model.state_dict().items():
            assert torch.equal(loaded.state_dict()[key], value), key
        got = loaded.embed([short, long], 16000)
        for field in ("utterance", "mean", "frames", "timestamps", "times"):
            assert torch.equal(getattr(got, field), getattr(expected, field)), field
        if cfg.num_classes:
            assert torch.equal(got.probabilities, expected.probabilities) and got.label_names == ["x", "y", "z"]
    h = hear.load_model(str(reconverted), device="cpu")
    assert h.scene_embedding_size == h.timestamp_embedding_size == cfg.embed_dim
    assert torch.equal(hear.get_scene_embeddings(long[None], h)[0], expected.utterance[1])
    emb, ts = hear.get_timestamp_embeddings(long[None], h)
    # the patch rows whose centre (frame centres 10 ms apart, the first at 12.5 ms) lies within the audio
    centres = [(r * cfg.patch_size + (cfg.patch_size - 1) / 2) * 10 + 12.5
               for r in range(math.ceil(frames_of(long.numel()) / cfg.patch_size))]
    rows = sum(c <= 1000 * long.numel() / 16000 for c in centres)
    assert emb.shape == (1, rows, cfg.embed_dim) and torch.equal(emb[0], expected.timestamps[1, :rows])
    torch.testing.assert_close(ts[0, 1] - ts[0, 0], torch.tensor(cfg.patch_size * 10.0))
    out = tmp_path / "emb.npz"
    assert main(["extract", str(tmp_path / "short.wav"), str(tmp_path / "long.wav"), "--checkpoint", str(exported),
                 "--out", str(out), "--granularity", "all", "--no-progress"]) == 0
    with np.load(out) as data:
        i = data["keys"].tolist().index("long.wav")
        assert np.array_equal(data["utterance"][i], expected.utterance[1].numpy())
        r = int(data["num_rows"][i])
        assert np.array_equal(data["frames"][i, : r * cfg.freq_patches], expected.frames[1, : r * cfg.freq_patches].numpy())


# ------------------------------------------------------------------------------ sslam extract


def _write(path, seconds: float, rate: int = 16000, seed: int = 0):
    sf.write(path, np.random.default_rng(seed).uniform(-0.3, 0.3, int(seconds * rate)), rate)
    return path


def test_extract_hostile_inputs_are_named_one_per_line(tmp_path, capsys):
    """An empty file, a text file named .wav, a file with no samples and a folder named like
    audio next to good files (one with a unicode name with spaces): each bad file is one line
    naming it, the good ones are embedded, exit status 1 (0 with --skip-errors, which resumes)."""
    root = tmp_path / "in"
    root.mkdir()
    _write(root / "ok.wav", 1.0)
    _write(root / "héllo wörld ☃.flac", 1.3, rate=22050, seed=1)
    (root / "empty.wav").write_bytes(b"")
    (root / "notes.wav").write_text("not audio at all\n")
    sf.write(root / "silent.wav", np.zeros(0), 16000)
    (root / "folder.wav").mkdir()
    _write(root / "folder.wav" / "inner.wav", 0.5, seed=2)
    args = ["extract", str(root), "--checkpoint", CKPT, "--out", str(tmp_path / "o.npz"), "--no-progress"]
    assert main(args) == 1
    text = capsys.readouterr()
    assert "Traceback" not in text.err
    failed = [line[len("  FAILED "):] for line in text.out.splitlines() if line.startswith("  FAILED ")]
    assert sorted(line.split(":")[0] for line in failed) == ["empty.wav", "notes.wav", "silent.wav"]
    assert "3 embedded, 0 already done, 3 failed" in text.out
    with np.load(tmp_path / "o.npz") as data:
        assert sorted(data["keys"].tolist()) == ["folder.wav/inner.wav", "héllo wörld ☃.flac", "ok.wav"]
    assert main(args + ["--skip-errors"]) == 0
    assert "3 already done" in capsys.readouterr().out
    out = tmp_path / "per-file"
    assert main(["extract", str(root / "héllo wörld ☃.flac"), "--checkpoint", CKPT, "--out", str(out), "--no-progress"]) == 0
    assert (out / "héllo wörld ☃.flac.npz").exists()


def test_regression_the_same_file_twice_is_embedded_once(tmp_path, capsys):
    """Regression (extract.collect_inputs): a file named twice (or by a folder and a manifest)
    was embedded twice, the second time under its absolute path as key (and, with a folder
    output, written to a mirrored absolute path)."""
    root = tmp_path / "in"
    root.mkdir()
    _write(root / "a.wav", 1.0)
    manifest = tmp_path / "list.TSV"  # manifests are recognised whatever the suffix's case
    manifest.write_text(f"{root}\na.wav\t16000\n")
    out = tmp_path / "o.npz"
    assert main(["extract", str(root / "a.wav"), str(root), str(manifest), str(root / "." / "a.wav"),
                 "--checkpoint", CKPT, "--out", str(out), "--no-progress"]) == 0
    assert "1 embedded" in capsys.readouterr().out
    with np.load(out) as data:
        assert data["keys"].tolist() == ["a.wav"]


def test_extract_reads_manifests_as_training_does(tmp_path, capsys):
    """One manifest reader for extraction and training: a missing root line is refused (it
    used to be taken as the root, dropping a clip) and a byte-order mark is not in the root."""
    _write(tmp_path / "a.wav", 1.0)
    _write(tmp_path / "b.wav", 1.0, seed=1)
    (tmp_path / "noroot.tsv").write_text(f"{tmp_path / 'a.wav'}\t16000\n{tmp_path / 'b.wav'}\t16000\n")
    common = ["--checkpoint", CKPT, "--no-progress"]
    assert main(["extract", str(tmp_path / "noroot.tsv"), "--out", str(tmp_path / "o1.npz"), *common]) == 2
    assert "is the root line missing?" in capsys.readouterr().err
    (tmp_path / "bom.tsv").write_text(f"\ufeff{tmp_path}\na.wav\t16000\n", encoding="utf-8")
    assert main(["extract", str(tmp_path / "bom.tsv"), "--out", str(tmp_path / "o2.npz"), *common]) == 0
    assert "1 embedded" in capsys.readouterr().out


def test_regression_resume_with_another_model_is_refused(tmp_path, capsys):
    """Regression (extract.run_extract): resuming an output with another checkpoint, or the
    teacher instead of the student, silently mixed rows of two models (another width failed
    only at the end, after all the work, with "all input arrays must have the same shape")."""
    _write(tmp_path / "a.wav", 1.0)
    _write(tmp_path / "b.wav", 1.0, seed=1)
    narrow = save_encoder(Encoder(EncoderConfig(embed_dim=32, depth=1, num_heads=2)).eval(), tmp_path / "narrow")
    for out in (tmp_path / "o.npz", tmp_path / "folder"):
        base = [str(tmp_path / "a.wav"), str(tmp_path / "b.wav"), "--out", str(out), "--no-progress"]
        assert main(["extract", str(tmp_path / "a.wav"), "--checkpoint", CKPT, "--out", str(out), "--no-progress"]) == 0
        capsys.readouterr()
        for other in (["--checkpoint", CKPT, "--weights", "teacher"], ["--checkpoint", str(narrow)]):
            assert main(["extract", *base, *other]) == 2
            err = capsys.readouterr().err
            assert "'encoder'" in err and "choose another --out" in err and len(err.strip().splitlines()) == 1
        assert not (tmp_path / "folder" / "b.wav.npz").exists()
        assert main(["extract", *base, "--checkpoint", CKPT]) == 0
        assert "1 embedded, 1 already done" in capsys.readouterr().out


@pytest.mark.parametrize("record", ["removed", "emptied"])
def test_a_folder_output_without_its_record_still_refuses_another_encoder(tmp_path, capsys, record):
    """The settings were kept only in the folder's sslam_extract.json: with it gone (or holding
    nothing), a run with another checkpoint skipped the first run's files as done and wrote
    its own beside them, one folder holding two encoders' embeddings, exit 0."""
    _write(tmp_path / "a.wav", 1.0)
    _write(tmp_path / "b.wav", 1.0, seed=1)
    narrow = save_encoder(Encoder(EncoderConfig(embed_dim=32, depth=1, num_heads=2)).eval(), tmp_path / "narrow")
    out = tmp_path / "folder"
    assert main(["extract", str(tmp_path / "a.wav"), "--checkpoint", CKPT, "--out", str(out), "--no-progress"]) == 0
    if record == "removed":
        (out / "sslam_extract.json").unlink()
    else:
        (out / "sslam_extract.json").write_text("{}\n")
    capsys.readouterr()
    both = [str(tmp_path / "a.wav"), str(tmp_path / "b.wav")]
    assert main(["extract", *both, "--checkpoint", str(narrow), "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"{out / 'a.wav.npz'}: was written with" in err and "'encoder'" in err and "choose another --out" in err
    assert not (out / "b.wav.npz").exists()
    # The refused run wrote no record of its own, which would then refuse the encoder that
    # wrote every file there.
    assert main(["extract", *both, "--checkpoint", CKPT, "--out", str(out), "--no-progress"]) == 0
    assert "1 embedded, 1 already done" in capsys.readouterr().out


def test_folder_outputs_from_before_files_recorded_settings_resume(tmp_path, capsys):
    """A file without its own record of the settings has only the folder's, already checked:
    it was read as one recording the defaults, so a folder written with --hop 256 refused to
    resume with --hop 256."""
    _write(tmp_path / "a.wav", 1.0)
    _write(tmp_path / "b.wav", 1.0, seed=1)
    out = tmp_path / "folder"
    common = ["--checkpoint", CKPT, "--out", str(out), "--hop", "256", "--no-progress"]
    assert main(["extract", str(tmp_path / "a.wav"), *common]) == 0
    with np.load(out / "a.wav.npz") as data:
        older = {k: data[k] for k in data.files if k != "settings"}
    np.savez(out / "a.wav.npz", **older)
    capsys.readouterr()
    assert main(["extract", str(tmp_path / "a.wav"), str(tmp_path / "b.wav"), *common]) == 0
    assert "1 embedded, 1 already done" in capsys.readouterr().out


def test_regression_folder_output_resume_with_other_settings_is_refused(tmp_path, capsys):
    """Regression (extract.FolderSink): a folder output resumed with another --granularity
    (or --padding / --crop) kept the old files and wrote new ones with other arrays beside
    them; a .npz output already refused this."""
    _write(tmp_path / "a.wav", 1.0)
    _write(tmp_path / "b.wav", 1.0, seed=1)
    out = tmp_path / "feats"
    common = ["--checkpoint", CKPT, "--out", str(out), "--no-progress"]
    assert main(["extract", str(tmp_path / "a.wav"), "--granularity", "mean", *common]) == 0
    both = [str(tmp_path / "a.wav"), str(tmp_path / "b.wav")]
    assert main(["extract", *both, "--granularity", "frames", *common]) == 2
    assert "granularity" in capsys.readouterr().err and not (out / "b.wav.npz").exists()
    assert main(["extract", *both, "--granularity", "mean", "--padding", "mask", *common]) == 2
    assert "padding" in capsys.readouterr().err
    assert main(["extract", *both, "--granularity", "mean", *common]) == 0
    assert "1 embedded, 1 already done" in capsys.readouterr().out
    with np.load(out / "b.wav.npz") as data:
        assert "mean" in data.files and "frames" not in data.files


def test_regression_unusable_output_location_is_one_line_before_any_work(tmp_path, capsys, monkeypatch):
    """Regression (cli.cmd_extract): --out under a regular file raised FileExistsError /
    NotADirectoryError as a traceback; for a .npz output only when the results were flushed,
    after every input had been decoded and embedded."""
    import sslam.extract

    _write(tmp_path / "a.wav", 1.0)
    blocker = tmp_path / "file.txt"
    blocker.write_text("a file, not a folder")

    def no_decoding(*args, **kwargs):
        raise AssertionError("inputs were decoded before the output location was checked")

    monkeypatch.setattr(sslam.extract, "_prefetched", no_decoding)
    for out in (blocker, blocker / "sub", blocker / "emb.npz"):
        assert main(["extract", str(tmp_path / "a.wav"), "--checkpoint", CKPT, "--out", str(out), "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"sslam: error: --out {out}: ") and len(err.strip().splitlines()) == 1
    assert main(["extract", str(tmp_path / "a.wav"), "--checkpoint", CKPT, "--out", str(tmp_path / "o.npz"),
                 "--workers", "0", "--no-progress"]) == 2
    assert "workers=0" in capsys.readouterr().err


# ------------------------------------------------------------------------------ sslam convert


def test_regression_convert_refuses_to_overwrite_unless_asked(tmp_path, capsys):
    """Regression (checkpoint.convert): converting into a folder that already held an exported
    encoder replaced it silently. Official -> ours -> reload stays bit-identical."""
    out = tmp_path / "ours"
    assert main(["convert", CKPT, str(out)]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert main(["convert", CKPT, str(out), "--weights", "teacher"]) == 2
    assert "already holds an exported encoder" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    with pytest.raises(CheckpointError, match="overwrite=True"):
        convert(CKPT, out)
    assert main(["convert", CKPT, str(out), "--weights", "teacher", "--overwrite"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ours"]  # no temporary leftovers
    teacher, converted = load_encoder(CKPT, weights="teacher"), load_encoder(out)
    for key, value in teacher.state_dict().items():
        assert torch.equal(converted.state_dict()[key], value), key
    clip = noise(16000 * 3)
    assert torch.equal(converted.embed(clip, 16000).frames, teacher.embed(clip, 16000).frames)


def test_convert_never_replaces_a_config_json_that_is_not_an_export(tmp_path, capsys):
    """A training run's (or a Hugging Face model's) config.json where the export would go: it
    was called an exported encoder, and --overwrite replaced it beside the run's checkpoints."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text('{"model": {"variant": "tiny"}, "optim": {"lr": 0.0005}}\n')
    (run / "checkpoint_00000002.pt").write_bytes(b"a run's checkpoint")
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    for extra in ([], ["--overwrite"]):
        assert main(["convert", CKPT, str(run), *extra]) == 2
        err = capsys.readouterr().err
        assert "config.json: not the config of an exported encoder; it is kept: choose another folder" in err
        assert {p.name: p.read_bytes() for p in run.iterdir()} == before
    with pytest.raises(CheckpointError, match="not the config of an exported encoder"):
        save_encoder(load_encoder(CKPT), run)
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before
    # Nested deeper than the JSON parser recurses: the same refusal (a RecursionError before).
    (run / "config.json").write_text("[" * 200_000 + "]" * 200_000)
    with pytest.raises(CheckpointError, match="not the config of an exported encoder"):
        save_encoder(load_encoder(CKPT), run)


# ------------------------------------------------------------------------------ fine-tuning


def tiny_encoder() -> Encoder:
    torch.manual_seed(0)
    enc = Encoder(EncoderConfig(embed_dim=32, depth=2, num_heads=2, max_length=16)).eval()
    enc.preprocessing = {"sample_rate": 16000, "target_length": 128, "norm": "audioset"}
    return enc


@pytest.fixture(scope="module")
def splits():
    return synth_split("poly", True, 8, seconds=1.0), synth_split("poly", False, 4, seconds=1.0)


def test_regression_finetune_resume_with_changed_settings_is_refused(tmp_path, splits):
    """Regression (evaluate.Finetuner): resuming a fine-tuning run with another lr, batch size,
    seed, classes, label kind or encoder silently continued from the checkpoint with the new
    settings (sslam.train refuses this for pretraining). ``steps`` may change."""
    train, test = splits
    cfg = FinetuneConfig(steps=1, warmup=0, batch_size=4, eval_every=1, ckpt_every=1, out=str(tmp_path), workers=0)
    Finetuner(tiny_encoder(), train, test, cfg, log=quiet).fit()
    saved = {p.name: p.read_bytes() for p in tmp_path.glob("checkpoint_*.pt")}
    for field, value in (("lr", 1e-3), ("batch_size", 2), ("seed", 1), ("mixup", 0.0), ("precision", "bf16")):
        changed = FinetuneConfig(**{**cfg.__dict__, field: value})
        with pytest.raises(ValueError, match=rf"cannot resume fine-tuning with changed settings: {field}: "):
            Finetuner(tiny_encoder(), train, test, changed, log=quiet)
    renamed = LabeledSplit(train.name, train.items, train.targets, [f"new_{c}" for c in train.class_names], True)
    with pytest.raises(ValueError, match=r"classes: 12 in the checkpoint"):
        Finetuner(tiny_encoder(), renamed, LabeledSplit(test.name, test.items, test.targets, renamed.class_names, True),
                  cfg, log=quiet)

    def one_label(split):  # a single-label task of the same clips and classes
        targets = torch.zeros_like(split.targets)
        targets[torch.arange(len(split)), split.targets.argmax(1)] = 1
        return LabeledSplit(split.name, split.items, targets, split.class_names, False)

    single, test_single = one_label(train), one_label(test)
    with pytest.raises(ValueError, match=r"multilabel: True in the checkpoint, False now"):
        Finetuner(tiny_encoder(), single, test_single, cfg, log=quiet)
    wider = Encoder(EncoderConfig(embed_dim=64, depth=2, num_heads=2, max_length=16)).eval()
    wider.preprocessing = tiny_encoder().preprocessing
    with pytest.raises(ValueError, match=r"encoder.embed_dim: 32 in the checkpoint, 64 now"):
        Finetuner(wider, train, test, cfg, log=quiet)
    # Another starting encoder of the same shape (another --checkpoint, or --weights teacher).
    other = tiny_encoder()
    torch.nn.init.normal_(other.cls_token)
    with pytest.raises(ValueError, match=r"starting encoder: other weights than the checkpoint's \("):
        Finetuner(other, train, test, cfg, log=quiet)
    renormed = tiny_encoder()  # the same weights, other preprocessing: only that is named
    renormed.preprocessing = {**renormed.preprocessing, "norm": "esc50"}
    with pytest.raises(ValueError, match="preprocessing") as refused:
        Finetuner(renormed, train, test, cfg, log=quiet)
    assert "starting encoder" not in str(refused.value)
    assert {p.name: p.read_bytes() for p in tmp_path.glob("checkpoint_*.pt")} == saved
    longer = FinetuneConfig(**{**cfg.__dict__, "steps": 2, "eval_every": 2, "keep_last": 3})
    resumed = Finetuner(tiny_encoder(), train, test, longer, log=quiet)
    assert resumed.step == 1
    resumed.fit()
    assert resumed.step == 2


def test_regression_finetune_out_folder_with_a_pretraining_checkpoint_is_refused(tmp_path, splits):
    """Regression: a fine-tuning --out that holds another kind of checkpoint failed deep in
    load_state_dict (or with a KeyError) instead of saying what the file is."""
    torch.save({"format": "sslam-train", "model": {}, "step": 5}, tmp_path / "checkpoint_00000005.pt")
    cfg = FinetuneConfig(steps=1, warmup=0, batch_size=4, out=str(tmp_path), workers=0)
    with pytest.raises(CheckpointError, match=r"not an sslam fine-tuning checkpoint \(format 'sslam-train'\)"):
        Finetuner(tiny_encoder(), *splits, cfg, log=quiet)


def test_regression_balanced_sampling_epoch_size_is_checked(tmp_path, splits):
    """Regression (evaluate.Finetuner): with balanced sampling, an epoch_size above the number
    of clips failed inside torch.multinomial ("cannot sample n_sample > prob_dist.size(-1)
    samples without replacement"), one above the clips of positive weight silently drew
    zero-weight clips, and a negative or NaN weight failed as "probability tensor contains
    either inf, nan or element < 0"."""
    train, test = splits
    weights = tmp_path / "weights.txt"

    def finetuner(values, **changes):
        weights.write_text("\n".join(map(str, values)) + "\n")
        cfg = FinetuneConfig(**{"steps": 1, "warmup": 0, "batch_size": 2, "out": str(tmp_path / "run"), "workers": 0,
                                "balanced_weights": str(weights), **changes})
        return Finetuner(tiny_encoder(), train, test, cfg, log=quiet)

    with pytest.raises(ValueError, match=r"epoch_size=20: balanced sampling draws clips without replacement, but "
                                         r"only 8 of the 8 training clips have a positive weight"):
        finetuner([1.0] * 8, epoch_size=20)
    with pytest.raises(ValueError, match=r"epoch_size=8: .* only 6 of the 8 .* use --epoch_size=6 or less"):
        finetuner([1.0] * 6 + [0.0, 0.0], epoch_size=8)
    # Drawing as many clips as there are is no balancing; an epoch size without weights is unused.
    with pytest.raises(ValueError, match=r"weights.txt: balanced sampling needs epoch_size"):
        finetuner([1.0] * 8)
    with pytest.raises(ValueError, match=r"epoch_size=4: used only with balanced_weights"):
        finetuner([1.0] * 8, epoch_size=4, balanced_weights="")
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match=r"sampling weights must be finite and >= 0; weight\(s\) number \[8\]"):
            finetuner([1.0] * 7 + [bad])
    with pytest.raises(ValueError, match=r"epoch_size=-4: must be a finite number >= 0"):
        finetuner([1.0] * 8, epoch_size=-4)
    weights.write_text("\ufeff" + "\n".join(["1.0"] * 8))  # a byte-order mark is not part of the number
    assert read_weights(str(weights), 8).tolist() == [1.0] * 8
    ft = finetuner([1.0] * 6 + [0.0, 0.0], epoch_size=6)
    for epoch in range(5):  # zero-weight clips are never drawn
        drawn = ft._epoch_indices(epoch)
        assert len(drawn) == 6 and not {6, 7} & set(drawn.tolist())
    assert ft.fit() is not None and ft.step == 1


def test_finetuning_with_recomputed_blocks_trains_as_the_plain_run(tmp_path, splits):
    """checkpoint_blocks (drop-path 0.1 on: its draws are replayed) leaves the fine-tuned
    weights as they are without it, bit for bit; bad values are refused by name."""
    train, test = splits
    weights = {}
    for mode in ("off", "selective", "full"):
        cfg = FinetuneConfig(steps=2, warmup=0, batch_size=4, eval_every=2, ckpt_every=2, out=str(tmp_path / mode),
                             workers=0, checkpoint_blocks=mode)
        tuner = Finetuner(tiny_encoder(), train, test, cfg, log=quiet)
        assert tuner.model.checkpoint_blocks == mode
        tuner.fit()
        weights[mode] = {k: v.clone() for k, v in tuner.model.state_dict().items()}
    for mode in ("selective", "full"):
        assert all(torch.equal(weights["off"][k], weights[mode][k]) for k in weights["off"]), mode
    for field, value in (("checkpoint_blocks", "yes"), ("precision", "fp64")):
        bad = FinetuneConfig(out=str(tmp_path / "bad"), workers=0, **{field: value})
        with pytest.raises(ValueError, match=rf"{field}='{value}'"):
            Finetuner(tiny_encoder(), train, test, bad, log=quiet)


def test_distributed_finetune_exits_without_the_interpreter_shutdown(tmp_path):
    """With a process group, `sslam evaluate finetune` destroys it and leaves by os._exit, as
    `sslam pretrain` does (see test_train), with status 0 and its result printed."""
    import subprocess
    import sys

    import soundfile as sf

    from sslam.checkpoint import save_encoder

    save_encoder(tiny_encoder(), tmp_path / "encoder")
    rng = np.random.default_rng(0)
    for split, labels in (("train", ["a", "b", "a;b", "b"]), ("test", ["a", "b"])):
        lines = ["path,labels"]
        for i, label in enumerate(labels):
            sf.write(tmp_path / f"{split}{i}.wav", 0.1 * rng.standard_normal(16000), 16000)
            lines.append(f'{split}{i}.wav,"{label}"')
        (tmp_path / f"{split}.csv").write_text("\n".join(lines) + "\n")
    argv = ["evaluate", "finetune", "--checkpoint", str(tmp_path / "encoder"), "--train", str(tmp_path / "train.csv"),
            "--test", str(tmp_path / "test.csv"), "--out", str(tmp_path / "run"), "--steps=1", "--warmup=0",
            "--batch_size=4", "--eval_every=1", "--ckpt_every=1"]
    script = tmp_path / "one_rank.py"
    script.write_text(
        "import atexit, sys, torch.distributed as dist\n"
        "from sslam.cli import main\n"
        "atexit.register(print, 'interpreter shutdown ran')\n"
        f"dist.init_process_group('gloo', init_method={(tmp_path / 'store').as_uri()!r}, rank=0, world_size=1)\n"
        f"sys.exit(main({argv!r}))\n"
    )
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "interpreter shutdown ran" not in result.stdout
    assert json.loads(result.stdout.splitlines()[-1])["step"] == 1  # the result line was flushed


def test_package_exports_stay_themselves_after_every_submodule_is_imported():
    # A submodule named like an export would replace it on the package once imported.
    code = (
        "import importlib, pkgutil, types, sslam\n"
        "for info in pkgutil.iter_modules(sslam.__path__):\n"
        "    importlib.import_module('sslam.' + info.name)\n"
        "bad = [n for n in sslam.__all__ if isinstance(getattr(sslam, n), types.ModuleType)]\n"
        "assert not bad, bad\n"
        "assert callable(sslam.resample) and callable(sslam.embed)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
