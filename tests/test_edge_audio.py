"""Edge cases of the audio path: odd rates and bit depths, hostile files, tiny and long inputs,
resampler corner cases, batched-vs-alone parity, embeddings of mixed inputs, `sslam extract`
failure and resume policies. Each ``regression`` test failed before the fix it names."""

from __future__ import annotations

import math
import os
import struct
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import soundfile
import torch
from conftest import GOLDEN
from test_features import official

from sslam import audio
from sslam.audio import AudioError, check_waveform, load_audio
from sslam.cli import main
from sslam.features import preprocess
from sslam.model import VARIANTS, Encoder
from sslam.resampler import inputs_needed, resample

torchaudio = pytest.importorskip("torchaudio")
CKPT = str(GOLDEN / "tiny_ckpt.pt")


def noise(n: int, seed: int = 0, amplitude: float = 0.3) -> torch.Tensor:
    return torch.randn(n, generator=torch.Generator().manual_seed(seed)) * amplitude


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return Encoder(VARIANTS["tiny"]).eval()


# ------------------------------------------------------------------------------ load_audio


@pytest.mark.parametrize("rate", [8000, 11025, 22050, 24000, 32000, 44100, 48000, 96000, 12345])
def test_six_channels_every_rate_downmixed_then_resampled(tmp_path, rate):
    """Integer PCM equals soundfile's float32 read exactly; the mono mix equals torch's channel
    mean of it, and is resampled after mixing like torchaudio would resample the mix."""
    data = np.random.default_rng(rate).uniform(-1, 1, (rate // 5 + 3, 6))
    path = tmp_path / f"six_{rate}.wav"
    soundfile.write(path, data, rate, subtype="PCM_24")
    theirs = torch.from_numpy(soundfile.read(path, dtype="float32", always_2d=True)[0].T.copy())

    channels, file_rate = load_audio(path, mono=False)
    assert file_rate == rate and torch.equal(channels, theirs)
    mono, _ = load_audio(path)
    torch.testing.assert_close(mono, theirs.mean(dim=0), atol=1e-7, rtol=0)
    at_16k, out_rate = load_audio(path, sample_rate=16000)
    expected = torchaudio.functional.resample(theirs.mean(dim=0), rate, 16000)
    assert out_rate == 16000 and at_16k.shape == expected.shape
    torch.testing.assert_close(at_16k, expected, atol=1e-5, rtol=0)


def _flac_claiming_2_36_samples(tmp_path):
    path = tmp_path / "claims_256GiB.flac"
    soundfile.write(path, np.random.default_rng(0).uniform(-0.5, 0.5, (3000, 2)), 16000, subtype="PCM_16")
    data = bytearray(path.read_bytes())
    assert data[:4] == b"fLaC"
    # STREAMINFO: the 64-bit big-endian word at byte 18 ends with the 36-bit total sample count.
    (word,) = struct.unpack(">Q", bytes(data[18:26]))
    data[18:26] = struct.pack(">Q", word | ((1 << 36) - 1))
    path.write_bytes(bytes(data))
    return path


def _wav_bytes(tmp_path) -> bytes:
    path = tmp_path / "source.wav"
    soundfile.write(path, np.random.default_rng(1).uniform(-0.5, 0.5, (2000, 2)), 16000, subtype="PCM_16")
    return path.read_bytes()


def _hostile(tmp_path, kind: str):
    """(path, words the AudioError message must contain) of one kind of bad input."""
    rng = np.random.default_rng(7)
    path = tmp_path / f"{kind}.wav"
    if kind == "missing":
        return path, ["not found"]
    if kind == "directory":
        path.mkdir()
        return path, ["directory"]
    if kind == "empty":
        path.write_bytes(b"")
        return path, ["is empty (0 bytes)"]
    if kind == "random_wav":
        path.write_bytes(rng.bytes(4000))
        return path, ["cannot decode"]
    if kind == "random_flac":
        path = tmp_path / "random.flac"
        path.write_bytes(rng.bytes(4000))
        return path, ["cannot decode"]
    if kind == "random_mp3":  # libsndfile: "not a regular file (possibly a pipe?)"
        path = tmp_path / "random.mp3"
        path.write_bytes(rng.bytes(4000))
        return path, ["cannot decode audio (not audio in a format libsndfile reads, or damaged)"]
    if kind == "header_only":
        path.write_bytes(_wav_bytes(tmp_path)[:44])
        return path, ["no audio samples"]
    if kind == "zero_channels":
        data = bytearray(_wav_bytes(tmp_path))
        data[22:24] = struct.pack("<H", 0)
        path.write_bytes(bytes(data))
        return path, ["cannot decode"]
    if kind == "zero_length":
        soundfile.write(path, np.zeros((0, 2)), 16000, subtype="PCM_16")
        return path, ["no audio samples"]
    if kind == "unfinished_header":  # a recorder stopped before writing the data chunk's size
        data = bytearray(_wav_bytes(tmp_path))
        data[40:44] = struct.pack("<I", 0)
        path.write_bytes(bytes(data))
        return path, [f"its header declares no samples, though the file holds {len(data)} bytes"]
    if kind == "nan_float":
        data = rng.uniform(-0.5, 0.5, (500, 2)).astype(np.float32)
        data[10, 1] = np.nan
        soundfile.write(path, data, 16000, subtype="FLOAT")
        return path, ["not finite", "1 NaN"]
    if kind == "inf_double":
        data = rng.uniform(-0.5, 0.5, (500, 1))
        data[3] = -np.inf
        soundfile.write(path, data, 16000, subtype="DOUBLE")
        return path, ["not finite", "1 Inf"]
    if kind == "flac_huge_claim":
        return _flac_claiming_2_36_samples(tmp_path), ["cannot decode"]
    if kind == "fifo":  # reading it would wait forever for a writer
        os.mkfifo(path)
        return path, ["not a regular file"]
    if kind == "symlink_loop":
        path.symlink_to(path)
        return path, ["cannot open", "symbolic links"]
    raise AssertionError(kind)


HOSTILE = ["missing", "directory", "empty", "random_wav", "random_flac", "random_mp3", "header_only", "zero_channels",
           "zero_length", "unfinished_header", "nan_float", "inf_double", "flac_huge_claim", "fifo", "symlink_loop"]


@pytest.mark.parametrize("kind", HOSTILE)
def test_hostile_files_raise_audio_error_naming_the_file(tmp_path, kind):
    path, words = _hostile(tmp_path, kind)
    with pytest.raises(AudioError) as excinfo:
        load_audio(path, sample_rate=16000)
    message = str(excinfo.value)
    assert message.startswith(f"{os.fspath(path)}: "), message
    for word in words:
        assert word in message, message
    assert "Error opening" not in message, message  # soundfile's prefix repeats the path, as bytes


def test_regression_header_frame_count_is_not_trusted_for_allocation(tmp_path):
    """Regression (audio._read_all): soundfile allocated the header's claimed 2**36 frames
    (256 GiB) before decoding and raised a bare MemoryError."""
    path = _flac_claiming_2_36_samples(tmp_path)
    with pytest.raises(AudioError, match="cannot decode"):
        load_audio(path)


def test_damaged_ogg_decodes_as_soundfile_read_does(tmp_path):
    # A run of garbage bytes in the middle: the Vorbis decoder stops short there. The reference
    # reads with soundfile.read, which keeps what came before; so must we (reading on would
    # append the audio after the damage).
    path = tmp_path / "damaged.ogg"
    soundfile.write(path, np.random.default_rng(0).uniform(-0.5, 0.5, 3 * 44100), 44100, format="OGG")
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 200] = np.random.default_rng(1).integers(0, 256, 200, dtype=np.uint8).tobytes()
    path.write_bytes(bytes(data))
    expected, rate = soundfile.read(path, dtype="float32", always_2d=True)
    assert rate == 44100 and 0 < len(expected) < 3 * 44100  # the damage cut it short
    waveform, _ = load_audio(path, mono=False)
    assert torch.equal(waveform, torch.from_numpy(expected.T))


def test_damaged_ogg_longer_than_a_read_block_decodes_as_soundfile_read_does(tmp_path, monkeypatch):
    """Regression: the file was read in blocks, and after the damage libsndfile re-delivered
    frames at the next block's start (here 4992 frames too many; 469 ms twice in a 25-s file
    with the real 2**20-frame blocks). soundfile.read reads it in one call; so do we now."""
    monkeypatch.setattr(audio, "_READ_BLOCK_FRAMES", 1 << 15)
    path = tmp_path / "damaged.ogg"
    noise = 0.2 * np.random.default_rng(0).standard_normal(10 * 16000)
    soundfile.write(path, noise.astype(np.float32), 16000, format="OGG", subtype="VORBIS")
    data = bytearray(path.read_bytes())
    start = len(data) // 4
    data[start : start + 300] = bytes(b ^ 0x3C for b in data[start : start + 300])
    path.write_bytes(bytes(data))
    expected, _ = soundfile.read(path, dtype="float32", always_2d=True)
    waveform, _ = load_audio(path, mono=False)
    assert torch.equal(waveform, torch.from_numpy(expected.T))


def test_mp3_decodes_as_soundfile_read_does(tmp_path):
    """soundfile.read seeks to the start before reading, and libsndfile's MP3 decoder gives
    other last bits without that seek (11025 of 48000 samples of a 16 kHz file)."""
    path = tmp_path / "clip.mp3"
    t = np.arange(48000) / 16000
    wave = 0.3 * np.sin(2 * np.pi * 440 * t) + 0.05 * np.random.default_rng(0).standard_normal(t.size)
    soundfile.write(path, wave, 16000, format="MP3")
    expected, _ = soundfile.read(path, dtype="float32", always_2d=True)
    waveform, _ = load_audio(path, mono=False)
    assert torch.equal(waveform, torch.from_numpy(expected.T))


@pytest.mark.parametrize("frames", [999, 1000, 1001, 3000, 3001])
def test_files_longer_than_one_read_block_decode_whole(tmp_path, monkeypatch, frames):
    monkeypatch.setattr(audio, "_ONE_READ_BYTES", 0)  # every file in blocks
    monkeypatch.setattr(audio, "_READ_BLOCK_FRAMES", 1000)
    path = tmp_path / "long.wav"
    soundfile.write(path, np.random.default_rng(2).uniform(-0.5, 0.5, (frames, 2)), 16000, subtype="FLOAT")
    expected, _ = soundfile.read(path, dtype="float32", always_2d=True)
    waveform, _ = load_audio(path, mono=False)
    assert torch.equal(waveform, torch.from_numpy(expected.T))


def test_huge_claimed_wav_data_chunk_reads_what_is_there(tmp_path):
    data = bytearray(_wav_bytes(tmp_path))
    data[40:44] = struct.pack("<I", 0xFFFFFFF0)  # data chunk size
    path = tmp_path / "huge_claim.wav"
    path.write_bytes(bytes(data))
    waveform, _ = load_audio(path, mono=False)
    assert waveform.shape == (2, 2000)


def test_unreadable_file(tmp_path):
    """A file without read permission: said so, not libsndfile's "System error." (Root reads
    any file: there the check runs in a process without the capabilities that allow it.)"""
    import shutil
    import subprocess
    import sys

    path = tmp_path / "secret.wav"
    soundfile.write(path, np.zeros((100, 1)), 16000)
    path.chmod(0)
    if os.geteuid() != 0:
        with pytest.raises(AudioError, match=r"secret.wav: cannot open \(permission denied\)"):
            load_audio(path)
        return
    if shutil.which("setpriv") is None:
        pytest.skip("root reads any file, and setpriv is not here to drop that capability")
    caps = "-dac_override,-dac_read_search"
    code = f"from sslam.audio import load_audio\ntry:\n    load_audio({str(path)!r})\nexcept Exception as e:\n    print(e)"
    result = subprocess.run(["setpriv", f"--inh-caps={caps}", f"--bounding-set={caps}", sys.executable, "-c", code],
                            capture_output=True, text=True, timeout=120)
    if result.returncode != 0 and result.stderr.startswith("setpriv"):
        pytest.skip(f"setpriv cannot drop the capabilities here: {result.stderr.strip()}")
    assert "secret.wav: cannot open (permission denied)" in result.stdout, result.stdout + result.stderr


def test_regression_check_waveform_accepts_non_native_numpy_floats():
    """Regression: big-endian and long-double arrays leaked ValueError/TypeError from torch."""
    values = np.random.default_rng(0).uniform(-1, 1, (2, 300))
    expected = torch.from_numpy(values).float().mean(dim=0)
    assert torch.equal(check_waveform(values.astype(">f8"), 16000), expected)
    assert torch.equal(check_waveform(values[0].astype(">f4"), 16000), torch.from_numpy(values[0]).float())
    assert torch.equal(check_waveform(values.astype(np.longdouble), 16000), expected)


# ------------------------------------------------------------------------------- resample


@pytest.mark.parametrize("orig,new", [(1000, 32000), (1000, 384000), (3, 97), (16000, 16000 * 40)])
def test_regression_fast_path_upsampling_by_32x_or_more(orig, new):
    """Regression (resample._block_layout): 16 phases span under half an input sample, the
    group shift rounded to 0 and the plan's block doubling never ended (out of memory)."""
    from sslam.resampler import _block_layout, _phase_taps

    divisor = math.gcd(orig, new)
    o, n = orig // divisor, new // divisor
    offsets, weights = _phase_taps(o, n, torch.float32)
    frames = 64
    _, _, window, _, _ = _block_layout(offsets, weights, o, n, frames)
    assert window <= frames * o, "a group window must fit in a block of some finite size"

    x = noise(23, seed=orig).reshape(1, 23).expand(2, 23).double()
    ours = resample(x, orig, new, exact=False)
    torch.testing.assert_close(ours, torchaudio.functional.resample(x, orig, new), atol=1e-10, rtol=0)


def test_regression_exact_path_memory_is_bounded_for_coprime_rates():
    """Regression (resample._apply_dense): the exact path built the reference's dense bank of
    new * (orig + 2 * width) taps: 25 GB for 383999 -> 16000 Hz (killed the process). Run in a
    child process under a 6 GB address-space limit; checked against the formula in float64."""
    script = textwrap.dedent(
        """
        import math, resource, torch
        resource.setrlimit(resource.RLIMIT_AS, (6 << 30, resource.getrlimit(resource.RLIMIT_AS)[1]))
        from sslam.resampler import inputs_needed, resample
        for orig, new in ((383999, 16000), (16000, 383999)):
            # float64: the reference rounds its time grid in the waveform's dtype, which in
            # float32 moves these outputs far from the formula (t ~ 1e4 cutoff periods here).
            x = torch.randn(2 * orig + 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
            y = resample(x, orig, new)
            assert y.shape == (-(-new * x.numel() // orig),), y.shape
            base, worst = min(orig, new) * 0.99, 0.0
            for m in (0, 7, new // 3, y.numel() - 1):
                i = torch.arange(x.numel(), dtype=torch.float64)
                t = (i / orig - m / new) * base
                h = torch.where(t == 0, 1.0, torch.sin(math.pi * t) / (math.pi * t))
                h = h * torch.cos(math.pi * t / 12) ** 2 * base / orig * (t.abs() < 6)
                worst = max(worst, abs(float(x @ h) - float(y[m])))
            assert worst < 1e-9, worst
        print("ok")
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]


@pytest.mark.parametrize("exact", [True, False])
@pytest.mark.parametrize("orig", [7, 12345, 44100, 96000])
def test_tiny_and_batched_inputs_match_torchaudio(orig, exact):
    for shape in [(1,), (2,), (5,), (3, 4, 5), (2, 1)]:
        x = torch.randn(shape, generator=torch.Generator().manual_seed(sum(shape)))
        expected = torchaudio.functional.resample(x, orig, 16000)
        ours = resample(x, orig, 16000, exact=exact)
        assert ours.shape == expected.shape
        if exact:
            assert torch.equal(ours, expected)
        else:
            torch.testing.assert_close(ours, expected, atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------- preprocessing

# 400: one frame; 401, 560: one and two frames; then exactly 1024 and 1025 frames; 30 s.
LENGTHS = [400, 401, 560, 400 + 1023 * 160, 400 + 1024 * 160, 16000 * 30]


def test_lengths_alone_and_batched_match_torchaudio():
    clips = [noise(n, seed=n) for n in LENGTHS]
    batched, frames = preprocess(clips, return_frames=True)
    assert batched.shape == (len(LENGTHS), 1, 1024, 128)
    assert frames.tolist() == [1, 1, 2, 1024, 1024, 1024]
    for i, clip in enumerate(clips):
        expected = official(clip, 16000)[0, 0]
        assert (preprocess(clip)[0, 0] - expected).abs().max() < 1e-4
        assert (batched[i, 0] - expected).abs().max() < 1e-4


@pytest.mark.parametrize("target_length", [1, 512, 998])
@pytest.mark.parametrize("norm", ["spass", (-1.5, 0.75)])
def test_custom_target_length_and_norm(target_length, norm):
    mean_std = (-5.275, 3.268) if norm == "spass" else norm
    for n in (400, 16000 * 11):
        clip = noise(n, seed=target_length)
        x = preprocess(clip, target_length=target_length, norm=norm)
        assert x.shape == (1, 1, target_length, 128)
        assert (x[0, 0] - official(clip, 16000, target_length, mean_std)[0, 0]).abs().max() < 1e-4


def test_less_than_one_frame_is_an_audio_error():
    with pytest.raises(AudioError, match="399"):
        preprocess([noise(1000), noise(399)])
    with pytest.raises(AudioError):
        preprocess(noise(797), sample_rate=32000)  # ceil(398.5) = 399 samples at 16 kHz
    assert preprocess(noise(799), sample_rate=32000).shape == (1, 1, 1024, 128)  # 400: one frame


@pytest.mark.parametrize("rate", [8000, 11025, 16000])
def test_regression_batched_clips_equal_each_alone_exactly(rate):
    """Regression (features._resample_each, fbank, remove_dc): the padded batch was resampled in
    one conv1d, each clip's fbank was computed in chunks as long as the batch's longest clip and
    its mean taken over the padded row -- all of which round differently from the clip alone.
    Bins above the original Nyquist frequency hold next to no energy and turned that into ~1e-4
    differences in the model input (8 kHz); now a clip gives the same input in any batch."""
    clips = [noise(n, seed=n) for n in (rate // 5, rate // 2 + 3, rate, rate * 4 + 1)]
    batched = preprocess(clips, rate, target_length=128)
    for i, clip in enumerate(clips):
        alone = preprocess(clip, rate, target_length=128)
        assert torch.equal(batched[i], alone[0])
        assert (alone[0, 0] - official(clip, rate, 128)[0, 0]).abs().max() < 1e-4


def test_regression_bad_target_length_and_rate_arguments():
    """Regression: target_length=0 gave an empty input, 44100.5 Hz was silently truncated."""
    clip = noise(16000)
    for bad in (0, -3, 2.5):
        with pytest.raises(ValueError, match="target_length"):
            preprocess(clip, target_length=bad)
    with pytest.raises(ValueError, match="sample_rate"):
        preprocess(clip, sample_rate=44100.5)
    assert torch.equal(preprocess(clip, sample_rate=44100.0), preprocess(clip, sample_rate=44100))


# ------------------------------------------------------------------------------ embeddings


def _write(path, seconds: float, rate: int, seed: int = 0, channels: int = 1):
    data = np.random.default_rng(seed).uniform(-0.5, 0.5, (int(seconds * rate), channels))
    soundfile.write(path, data, rate, subtype="PCM_16")
    return path


@torch.inference_mode()
def test_regression_files_are_resampled_once_whatever_sample_rate_says(tiny, tmp_path):
    """Regression (embed._as_clips): with ``sample_rate`` given, files were resampled to it and
    then again to 16 kHz (a 16 kHz file went up to 44.1 kHz and back)."""
    paths = [_write(tmp_path / f"r{rate}.wav", 1.3, rate, seed=rate) for rate in (16000, 8000, 12345)]
    plain = tiny.embed(paths)
    for i, path in enumerate(paths):
        wave, rate = soundfile.read(path, dtype="float32")
        expected = tiny(preprocess(torch.from_numpy(wave), rate)).x[0]
        assert (plain.utterance[i] - expected[0]).abs().max() < 1e-5
        assert (plain.frames[i] - expected[1:]).abs().max() < 1e-5
    with_rate = tiny.embed(paths, 44100)
    assert (with_rate.utterance - plain.utterance).abs().max() <= 1e-6

    array = noise(44100, seed=3)
    mixed = tiny.embed([paths[1], array], 44100)
    assert (mixed.utterance[0] - plain.utterance[1]).abs().max() <= 1e-6
    assert (mixed.utterance[1] - tiny.embed(array, 44100).utterance[0]).abs().max() <= 1e-6


def test_regression_short_clip_error_names_the_input(tiny, tmp_path):
    """Regression: the error said 'clip(s) [1]', not which file was too short."""
    good = _write(tmp_path / "good.wav", 1.0, 16000)
    short = _write(tmp_path / "short.wav", 0.02, 22050)
    with pytest.raises(AudioError, match=r"short\.wav: too short"):
        tiny.embed([good, short])
    with pytest.raises(AudioError, match=r"audio\[1\]: too short"):
        tiny.embed([noise(1000), noise(100)], 16000)
    with pytest.raises(ValueError, match="batch_size"):
        tiny.embed(noise(1000), 16000, batch_size=0)


@torch.inference_mode()
def test_inputs_shapes_masks_windows(tiny):
    lengths = [400, 5000, 16000 * 3, 16000 * 17 + 123]  # the last spans 3 windows
    clips = [noise(n, seed=n) for n in lengths]
    padded = tiny.embed(clips, 16000)
    frames = [1 + (n - 400) // 160 for n in lengths]
    rows = [math.ceil(f / 16) for f in frames]
    assert padded.num_rows.tolist() == [64, 64, 64, rows[3]]
    assert padded.timestamp_mask.sum(1).tolist() == rows
    assert padded.frame_mask.sum(1).tolist() == [8 * r for r in rows]
    assert padded.frames.shape == (4, 8 * rows[3], 64) and padded.timestamps.shape == (4, rows[3], 64)
    times = padded.times
    assert times.shape == (rows[3],) and bool((times.diff() > 0).all())
    torch.testing.assert_close(times[:2], torch.tensor([0.0875, 0.2475]))  # seconds
    for i in range(3):  # one window: exactly the official output
        x = tiny(preprocess(clips[i])).x[0]
        assert (padded.utterance[i] - x[0]).abs().max() < 1e-5
        assert (padded.frames[i, :512] - x[1:]).abs().max() < 1e-5
    cropped = tiny.embed(clips[3], 16000, crop=True)
    x = tiny(preprocess(clips[3])).x[0]
    assert cropped.num_rows.tolist() == [64] and (cropped.utterance[0] - x[0]).abs().max() < 1e-5

    as_tensor = tiny.embed(torch.stack([c[:5000] for c in clips[1:]]), 16000)
    as_numpy = tiny.embed([c[:5000].numpy() for c in clips[1:]], 16000)
    assert torch.equal(as_tensor.utterance, as_numpy.utterance)

    masked = tiny.embed(clips, 16000, padding="mask")
    assert masked.num_rows.tolist() == rows
    for i, clip in enumerate(clips):
        alone = tiny.embed(clip, 16000, padding="mask")
        r = rows[i]
        assert (masked.utterance[i] - alone.utterance[0]).abs().max() < 1e-5
        assert (masked.timestamps[i, :r] - alone.timestamps[0]).abs().max() < 1e-5
        assert (masked.frames[i, : 8 * r] - alone.frames[0]).abs().max() < 1e-5
        assert not masked.timestamp_mask[i, r:].any()


# ----------------------------------------------------------------------- extract and HEAR


@pytest.fixture()
def folder(tmp_path):
    root = tmp_path / "audio"
    (root / "sub").mkdir(parents=True)
    _write(root / "a.wav", 1.0, 16000, seed=1)
    _write(root / "sub" / "b.wav", 0.7, 44100, seed=2, channels=2)
    _write(root / "sub" / "tiny.wav", 0.01, 16000, seed=3)  # less than one 25 ms frame
    return root


def test_regression_too_short_file_is_reported_not_fatal(folder, tmp_path, capsys):
    """Regression (extract._decode): a too-short file decoded fine, then made the whole batch
    fail inside the encoder: exit status 2, no file named, the remaining inputs not embedded."""
    out = tmp_path / "emb.npz"
    args = ["extract", str(folder), "--checkpoint", CKPT, "--out", str(out), "--batch-size", "2", "--no-progress"]
    assert main(args) == 1
    text = capsys.readouterr()
    assert "tiny.wav" in text.out and "too short" in text.out and "2 embedded" in text.out
    with np.load(out) as data:
        assert sorted(data["keys"].tolist()) == ["a.wav", "sub/b.wav"]
    assert main(args + ["--skip-errors"]) == 0
    assert "2 already done" in capsys.readouterr().out


def test_regression_resume_with_other_settings_is_refused(folder, tmp_path, capsys):
    """Regression (extract.FileSink): resuming a `utterance` file with `--granularity all`
    silently dropped the new arrays; the other way round crashed with a KeyError in flush."""
    base = ["--checkpoint", CKPT, "--no-progress"]
    both = [str(folder / "a.wav"), str(folder / "sub" / "b.wav")]
    for first, second in (("utterance", "all"), ("all", "mean")):
        out = tmp_path / f"{first}.npz"
        assert main(["extract", both[0], "--out", str(out), "--granularity", first, *base]) == 0
        before = out.read_bytes()
        assert main(["extract", *both, "--out", str(out), "--granularity", second, *base]) == 2
        assert "granularity" in capsys.readouterr().err
        assert out.read_bytes() == before
    out = tmp_path / "utterance.npz"
    assert main(["extract", *both, "--out", str(out), "--padding", "mask", *base]) == 2
    assert "padding" in capsys.readouterr().err
    assert main(["extract", *both, "--out", str(out), *base]) == 0  # same settings: resumes
    assert "1 embedded, 1 already done" in capsys.readouterr().out


def test_regression_damaged_output_file_is_a_clear_error(folder, tmp_path, capsys):
    """Regression: a truncated .npz at --out raised zipfile.BadZipFile as a traceback."""
    out = tmp_path / "emb.npz"
    assert main(["extract", str(folder / "a.wav"), "--checkpoint", CKPT, "--out", str(out), "--no-progress"]) == 0
    out.write_bytes(out.read_bytes()[:100])
    assert main(["extract", str(folder / "a.wav"), "--checkpoint", CKPT, "--out", str(out), "--no-progress"]) == 2
    assert "not an sslam embeddings file" in capsys.readouterr().err
    # Records nested past the JSON parser's recursion (a RecursionError before).
    deep = "[" * 200_000 + "]" * 200_000
    np.savez(out, keys=np.array(["a"]), num_rows=np.array([1]), settings=np.array(deep))
    assert main(["extract", str(folder / "a.wav"), "--checkpoint", CKPT, "--out", str(out), "--no-progress"]) == 2
    assert "not an sslam embeddings file" in capsys.readouterr().err
    folder_out = tmp_path / "per_file"
    folder_out.mkdir()
    (folder_out / "sslam_extract.json").write_text(deep)
    assert main(["extract", str(folder / "a.wav"), "--checkpoint", CKPT, "--out", str(folder_out), "--no-progress"]) == 2
    assert "unreadable extraction settings" in capsys.readouterr().err


def test_hear_long_audio_timestamps_in_milliseconds():
    from sslam import hear

    model = hear.load_model(CKPT, device="cpu")
    audio = torch.stack([noise(16000 * 13, seed=1), noise(16000 * 13, seed=2)])
    embeddings, timestamps = hear.get_timestamp_embeddings(audio, model)
    # 1298 frames: 81 whole patch rows; the partial 82nd is centred at 13047.5 ms, past the end
    rows = math.ceil((1 + (16000 * 13 - 400) // 160) / 16) - 1
    assert embeddings.shape == (2, rows, 64) and timestamps.shape == (2, rows)
    assert bool((timestamps.diff(dim=1) > 0).all())
    torch.testing.assert_close(timestamps[0, :2], torch.tensor([87.5, 247.5]))
    assert timestamps[0, -1] == 12887.5


def test_constants_cached_during_inference_still_serve_differentiable_calls():
    # Tensors made under inference_mode can never be saved for backward; the cached filter banks
    # and windows must not be such tensors whichever call filled the cache first.
    from sslam import features, resampler

    caches = (features._mel_banks_cpu, features._window_cpu, resampler._plan,
              resampler._cached_dense_bank)
    for cache in caches:
        cache.cache_clear()
    with torch.inference_mode():
        preprocess(torch.randn(44100) * 0.1, 44100)
        resample(torch.randn(4410), 44100, 16000, exact=False)
    x = (torch.randn(44100) * 0.1).requires_grad_()
    preprocess(x, 44100).sum().backward()
    resample(x, 44100, 16000, exact=False).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_check_waveform_keeps_the_graph_of_a_tensor_that_requires_grad():
    x = (torch.randn(2, 16000) * 0.1).requires_grad_()
    check_waveform(x, 16000).sum().backward()
    torch.testing.assert_close(x.grad, torch.full_like(x, 0.5))


@pytest.mark.parametrize("rate", [16000, 44100, 8000, 7999])
def test_max_samples_decodes_only_what_it_keeps(tmp_path, monkeypatch, rate):
    path = tmp_path / "long.wav"
    soundfile.write(path, np.random.default_rng(3).uniform(-0.5, 0.5, (rate * 20, 2)), rate, subtype="FLOAT")
    whole, _ = load_audio(path, 16000, exact=False)
    asked = []
    read = soundfile.SoundFile.read

    def counting_read(self, frames=-1, *args, **kwargs):
        asked.append(frames)
        return read(self, frames, *args, **kwargs)

    monkeypatch.setattr(soundfile.SoundFile, "read", counting_read)
    head, out_rate = load_audio(path, 16000, exact=False, max_samples=163_840)  # 10.24 s
    assert out_rate == 16000 and head.shape == (163_840,)
    torch.testing.assert_close(head, whole[:163_840], atol=1e-7, rtol=0)
    # 10.24 s and the filter's reach (to a whole frame of the reduced rates: 1 s at 7999 Hz)
    assert sum(asked) == (163_840 if rate == 16000 else inputs_needed(163_840, rate, 16000)) < rate * 12
    with pytest.raises(ValueError, match="max_samples=0"):
        load_audio(path, 16000, max_samples=0)
    assert torch.equal(load_audio(path, 16000, exact=False, max_samples=np.int64(163_840))[0], head)  # as sample_rate
