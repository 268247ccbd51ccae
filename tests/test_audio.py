"""Tests for sslam.audio: decoding every supported format, downmix, resampling, clear errors."""

from __future__ import annotations

import io
import os
import struct
import tempfile
import warnings

import numpy as np
import pytest
import soundfile
import torch

from sslam.audio import (
    SUPPORTED_RATES,
    AudioError,
    check_samples,
    check_waveform,
    load_audio,
    to_mono,
)
from sslam.features import preprocess
from sslam.resampler import resample

RATE = 16000


def random_signal(frames: int, channels: int, seed: int = 0) -> np.ndarray:
    """Uniform noise in [-0.9, 0.9], float64 ``(frames, channels)`` (soundfile's layout)."""
    rng = np.random.default_rng(seed)
    return rng.uniform(-0.9, 0.9, size=(frames, channels))


# (extension, format, subtype, largest error of the decoded float32 vs the float64 written)
LOSSLESS = [
    ("wav", "WAV", "PCM_U8", 1 / 128),
    ("wav", "WAV", "PCM_16", 2.0**-15),
    ("wav", "WAV", "PCM_24", 2.0**-23),
    ("wav", "WAV", "PCM_32", 1e-7),  # 2**-31 quantisation, then float32 rounding
    ("wav", "WAV", "FLOAT", 1e-7),
    ("wav", "WAV", "DOUBLE", 1e-7),
    ("flac", "FLAC", "PCM_16", 2.0**-15),
    ("flac", "FLAC", "PCM_24", 2.0**-23),
]


def write(path, data: np.ndarray, rate: int = RATE, **kwargs) -> str:
    soundfile.write(path, data, rate, **kwargs)
    return os.fspath(path)


@pytest.mark.parametrize("ext,fmt,subtype,tolerance", LOSSLESS)
@pytest.mark.parametrize("channels", [1, 3])
def test_lossless_formats_read_back(tmp_path, ext, fmt, subtype, tolerance, channels):
    data = random_signal(1001, channels)
    path = write(tmp_path / f"clip.{ext}", data, format=fmt, subtype=subtype)

    waveform, rate = load_audio(path, mono=False)
    assert rate == RATE
    assert waveform.dtype == torch.float32 and waveform.shape == (channels, 1001)
    assert waveform.is_contiguous()
    error = np.abs(waveform.numpy().T - data).max()
    assert error <= tolerance, f"{subtype}: max error {error} > {tolerance}"

    mono, _ = load_audio(path)
    assert mono.dtype == torch.float32 and mono.shape == (1001,)
    torch.testing.assert_close(mono, waveform.mean(dim=0), atol=1e-7, rtol=0)


def test_integer_pcm_scale_is_full_scale(tmp_path):
    """Known codes: 8-bit unsigned 0/128/255 and 24-bit extremes map to [-1, 1)."""
    u8 = tmp_path / "u8.wav"
    write(u8, np.array([-1.0, 0.0, 127 / 128]), subtype="PCM_U8")
    assert load_audio(u8)[0].tolist() == [-1.0, 0.0, 127 / 128]
    s24 = tmp_path / "s24.wav"
    write(s24, np.array([-1.0, 0.5, (2**23 - 1) / 2**23]), subtype="PCM_24")
    assert load_audio(s24)[0].tolist() == [-1.0, 0.5, (2**23 - 1) / 2**23]


def test_ogg_vorbis_reads_back(tmp_path):
    if "OGG" not in soundfile.available_formats() or "VORBIS" not in soundfile.available_subtypes(
        "OGG"
    ):
        pytest.skip("this libsndfile has no OGG/Vorbis support")
    seconds = np.arange(RATE) / RATE
    tones = 0.3 * np.sin(2 * np.pi * 440 * seconds) + 0.2 * np.sin(2 * np.pi * 1250 * seconds)
    path = write(tmp_path / "clip.ogg", tones, format="OGG", subtype="VORBIS")

    waveform, rate = load_audio(path)
    assert rate == RATE and waveform.dtype == torch.float32 and waveform.shape == (RATE,)
    # Lossy codec: compare by signal-to-noise ratio rather than sample by sample.
    noise = waveform.numpy().astype(np.float64) - tones
    snr_db = 10 * np.log10(np.sum(tones**2) / np.sum(noise**2))
    assert snr_db > 20, f"OGG/Vorbis round trip SNR {snr_db:.1f} dB"


def test_stereo_is_downmixed_before_resampling(tmp_path):
    data = random_signal(4410, 2).astype(np.float32)
    path = write(tmp_path / "stereo.wav", data, rate=44100, subtype="FLOAT")

    waveform, rate = load_audio(path, sample_rate=16000)
    assert rate == 16000 and waveform.dtype == torch.float32 and waveform.shape == (1600,)
    channels = torch.from_numpy(data).T
    expected = resample(channels.mean(dim=0), 44100, 16000)
    torch.testing.assert_close(waveform, expected, atol=1e-7, rtol=0)

    per_channel, _ = load_audio(path, sample_rate=16000, mono=False)
    assert per_channel.shape == (2, 1600)
    torch.testing.assert_close(per_channel, resample(channels, 44100, 16000), atol=1e-7, rtol=0)


def test_same_rate_is_not_resampled(tmp_path):
    data = random_signal(777, 1).astype(np.float32)
    path = write(tmp_path / "clip.wav", data, subtype="FLOAT")
    waveform, rate = load_audio(path, sample_rate=RATE)
    assert rate == RATE
    assert torch.equal(waveform, torch.from_numpy(data[:, 0]))


def test_path_like_is_accepted(tmp_path):
    path = tmp_path / "clip.flac"
    write(path, random_signal(50, 1), format="FLAC", subtype="PCM_16")
    assert load_audio(path)[0].shape == (50,)


def test_open_binary_files_and_bytes_in_memory_are_read(tmp_path):
    """A file's contents (from a request, a zip, a dataset's bytes column) in io.BytesIO, or a
    file opened in binary mode, decode as the file does; what soundfile cannot read is named."""
    path = tmp_path / "clip.flac"
    write(path, random_signal(3000, 2), 22050, format="FLAC", subtype="PCM_24")
    expected, rate = load_audio(path, 16000)
    with open(path, "rb") as handle:
        for source in (io.BytesIO(path.read_bytes()), handle):
            wave, got_rate = load_audio(source, 16000)
            assert got_rate == rate and torch.equal(wave, expected)
    with pytest.raises(AudioError, match=r"<BytesIO>: cannot decode audio"):
        load_audio(io.BytesIO(b"not audio at all" * 10))
    with open(path, encoding="latin-1") as text, pytest.raises(AudioError, match=r"clip\.flac: opened in text mode"):
        load_audio(text)
    spooled = tempfile.SpooledTemporaryFile(mode="w+")
    with spooled, pytest.raises(AudioError, match="opened in text mode"):
        load_audio(spooled)
    # Read from where the file stands, as soundfile reads: one read leaves it at its end.
    contents = io.BytesIO(path.read_bytes())
    load_audio(contents)
    with pytest.raises(AudioError, match=r"<BytesIO>: cannot decode audio .*read from its position \d+: seek\(0\)"):
        load_audio(contents)
    read_end, write_end = os.pipe()
    with os.fdopen(read_end, "rb") as pipe, os.fdopen(write_end, "wb"):
        with pytest.raises(AudioError, match=r"cannot seek in it .*io\.BytesIO\(stream\.read\(\)\)"):
            load_audio(pipe)


def test_a_file_s_contents_given_as_a_path_are_named_briefly():
    """bytes are a path, as for open(); a file's contents passed there were echoed whole as its
    'name' (a 4,000-character message): they are refused in a line that says what to pass."""
    contents = b"RIFF\x24\x10\x00\x00WAVEfmt " + bytes(4000)
    with pytest.raises(AudioError) as excinfo:
        load_audio(contents)
    message = str(excinfo.value)
    assert len(message) < 300, message
    assert "4016 bytes" in message and "io.BytesIO" in message, message


# ---------------------------------------------------------------------------------- errors


def assert_audio_error(excinfo, path, *words):
    message = str(excinfo.value)
    assert os.fspath(path) in message, message
    for word in words:
        assert word in message, message


def test_missing_file(tmp_path):
    path = tmp_path / "missing.wav"
    with pytest.raises(AudioError) as excinfo:
        load_audio(path)
    assert_audio_error(excinfo, path, "not found")


def test_directory(tmp_path):
    with pytest.raises(AudioError) as excinfo:
        load_audio(tmp_path)
    assert_audio_error(excinfo, tmp_path, "directory")


def test_random_bytes_named_wav(tmp_path):
    path = tmp_path / "noise.wav"
    path.write_bytes(np.random.default_rng(1).bytes(3000))
    with pytest.raises(AudioError) as excinfo:
        load_audio(path)
    assert_audio_error(excinfo, path, "cannot decode")
    assert isinstance(excinfo.value.__cause__, soundfile.LibsndfileError)


def test_headerless_raw_file(tmp_path):
    path = tmp_path / "samples.raw"
    path.write_bytes(np.random.default_rng(2).bytes(400))
    with pytest.raises(AudioError) as excinfo:
        load_audio(path)
    assert_audio_error(excinfo, path, "cannot decode")


def test_truncated_header(tmp_path):
    full = write(tmp_path / "full.wav", random_signal(500, 2), subtype="PCM_16")
    path = tmp_path / "half_header.wav"
    path.write_bytes(open(full, "rb").read()[:22])  # the canonical WAV header is 44 bytes
    with pytest.raises(AudioError) as excinfo:
        load_audio(path)
    assert_audio_error(excinfo, path, "cannot decode")


def test_truncated_data_reads_the_frames_present(tmp_path):
    """Documented policy: a cut data chunk yields the whole frames that are there."""
    data = random_signal(1000, 2)
    full = write(tmp_path / "full.wav", data, subtype="PCM_16")
    payload = open(full, "rb").read()
    path = tmp_path / "half_data.wav"
    path.write_bytes(payload[: 44 + (len(payload) - 44) // 2 + 1])  # + 1: a partial frame
    waveform, rate = load_audio(path, mono=False)
    assert rate == RATE and waveform.shape == (2, 500)
    assert np.abs(waveform.numpy().T - data[:500]).max() <= 2.0**-15


def test_zero_length(tmp_path):
    path = write(tmp_path / "empty.wav", np.zeros((0, 1)), subtype="PCM_16")
    with pytest.raises(AudioError) as excinfo:
        load_audio(path)
    assert_audio_error(excinfo, path, "no audio samples")


def test_non_finite_samples_are_counted(tmp_path):
    data = random_signal(100, 2).astype(np.float32)
    data[3, 0] = np.nan
    data[50, 1] = np.nan
    data[7, 1] = np.inf
    path = write(tmp_path / "nan.wav", data, subtype="FLOAT")
    with pytest.raises(AudioError) as excinfo:
        load_audio(path)
    assert_audio_error(excinfo, path, "3 of 200 samples are not finite", "2 NaN", "1 Inf")


def test_samples_that_would_overflow_the_features_are_refused(tmp_path):
    """A float file far off the [-1, 1] scale: from about 1e17 the power spectrum overflows and
    the features would be inf without an error. 1e15 and below still load."""
    data = random_signal(16000, 1).astype(np.float32)
    data[10, 0], data[20, 0] = 1e18, -3e15
    path = write(tmp_path / "loud.wav", data, subtype="FLOAT")
    with pytest.raises(AudioError) as excinfo:
        load_audio(path)
    assert_audio_error(excinfo, path, "2 of 16000 samples are not finite or too large", "2 beyond +-1e+15",
                       "[-1, 1] scale")
    data[10, 0], data[20, 0] = 1e15, -1e15
    wave, _ = load_audio(write(tmp_path / "loud_enough.wav", data, subtype="FLOAT"))
    assert torch.isfinite(preprocess(wave, 16000)).all()


def test_huge_float64_samples_are_called_too_large_not_inf():
    """1e300 fits float64 but not float32: it is checked before the cast, so it is reported as
    a sample beyond the limit rather than as an Inf the input does not hold."""
    clip = np.zeros(16000)
    clip[5] = 1e300
    for call in (lambda: check_waveform(clip, 16000, name="clip"), lambda: preprocess(clip),
                 lambda: preprocess([clip]), lambda: preprocess(clip[None])):
        with pytest.raises(AudioError, match=r"\(0 NaN, 0 Inf, 1 beyond"):
            call()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
@pytest.mark.parametrize("bad, kind", [(float("nan"), "1 NaN"), (-float("inf"), "1 Inf"), (3e20, "1 beyond")])
def test_check_samples_in_every_float_dtype(dtype, bad, kind):
    """bfloat16 samples (numpy has no such dtype) are checked too, and half precision compares
    with the limit without overflow warnings (3e20 is inf in float16)."""
    clip = torch.randn(1000, dtype=torch.float64)
    check_samples("clip", clip.to(dtype))
    clip[500] = bad
    kind = "1 Inf" if dtype == torch.float16 and bad == 3e20 else kind
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(AudioError, match=f"clip: 1 of 1000 samples .*{kind}"):
            check_samples("clip", clip.to(dtype))


@pytest.mark.parametrize("rate", [500, 400_000])
def test_unsupported_file_rate(tmp_path, rate):
    path = write(tmp_path / f"rate{rate}.wav", random_signal(100, 1), rate=rate, subtype="PCM_16")
    with pytest.raises(AudioError) as excinfo:
        load_audio(path)
    assert_audio_error(excinfo, path, "unsupported sample rate", str(rate))


def test_zero_rate_header(tmp_path):
    full = write(tmp_path / "full.wav", random_signal(100, 1), subtype="PCM_16")
    header = bytearray(open(full, "rb").read())
    header[24:28] = struct.pack("<I", 0)  # the fmt chunk's sample-rate field
    path = tmp_path / "rate0.wav"
    path.write_bytes(bytes(header))
    with pytest.raises(AudioError) as excinfo:
        load_audio(path)
    assert_audio_error(excinfo, path, "cannot decode")


@pytest.mark.parametrize("bad", [0, 500, 16000.5, float("nan"), "16000", True])
def test_bad_target_rate_argument(tmp_path, bad):
    path = write(tmp_path / "clip.wav", random_signal(100, 1), subtype="PCM_16")
    with pytest.raises(ValueError, match="sample_rate"):
        load_audio(path, sample_rate=bad)


def test_supported_rates_bounds_are_inclusive(tmp_path):
    low, high = SUPPORTED_RATES
    for rate in (low, high):
        path = write(tmp_path / f"r{rate}.wav", random_signal(64, 1), rate=rate, subtype="PCM_16")
        assert load_audio(path)[1] == rate


# ------------------------------------------------------------------------- in-memory audio


def test_check_waveform_numpy_and_torch():
    data = random_signal(300, 2).T.copy()  # (channels, N) float64
    mono = check_waveform(data, RATE)
    assert mono.dtype == torch.float32 and mono.shape == (300,)
    torch.testing.assert_close(mono, torch.from_numpy(data).float().mean(dim=0))

    tensor = torch.rand(1, 301, dtype=torch.float16) - 0.5
    out = check_waveform(tensor, 44100, name="clip-7")
    assert out.dtype == torch.float32 and out.shape == (301,)
    assert torch.equal(out, tensor[0].float())

    one_d = torch.rand(17) - 0.5
    assert torch.equal(check_waveform(one_d, RATE), one_d)


@pytest.mark.parametrize(
    "wave,rate,words",
    [
        (np.arange(100, dtype=np.int16), RATE, ["floating point", "int16"]),
        (torch.arange(100), RATE, ["floating point"]),
        ([0.1, 0.2], RATE, ["expected a torch.Tensor"]),
        (np.random.rand(2, 3, 100), RATE, ["(N,) or (channels, N)"]),
        (np.zeros((1, 0)), RATE, ["no audio samples"]),
        (np.random.rand(100, 2), RATE, ["transpose"]),
        (np.array([0.1, np.nan, np.inf, 0.2]), RATE, ["2 of 4", "1 NaN", "1 Inf"]),
        (np.random.rand(100), 0, ["unsupported sample rate 0"]),
        (np.random.rand(100), 999, ["unsupported sample rate 999"]),
        (np.random.rand(100), 16000.5, ["sample rate must be an integer"]),
    ],
)
def test_check_waveform_errors(wave, rate, words):
    with pytest.raises(AudioError) as excinfo:
        check_waveform(wave, rate, name="clip-42")
    assert_audio_error(excinfo, "clip-42", *words)


def test_to_mono():
    stereo = torch.randn(3, 55)
    torch.testing.assert_close(to_mono(stereo), stereo.mean(dim=0))
    mono = torch.randn(55)
    assert to_mono(mono) is mono
    with pytest.raises(ValueError, match="channels, N"):
        to_mono(torch.randn(2, 2, 5))


INTEGER_PCM = ("PCM_S8", "PCM_U8", "PCM_16", "PCM_24", "PCM_32")
# Every format libsndfile writes with integer PCM, and those subtypes (MP3, OGG, ... have none).
PCM_FORMATS = {fmt: [s for s in soundfile.available_subtypes(fmt) if s in INTEGER_PCM]
               for fmt in sorted(set(soundfile.available_formats()) - {"RAW"})}


@pytest.mark.parametrize("fmt", [fmt for fmt, subtypes in PCM_FORMATS.items() if subtypes])
def test_integer_pcm_equals_libsndfile_float_conversion(tmp_path, fmt):
    """Integer PCM of every format libsndfile writes decodes bit-identically to soundfile's
    floats. (An SDS file labelled PCM_16 holds more than 16 bits: read as int16 it was 3e-5 off.)"""
    for subtype in PCM_FORMATS[fmt]:
        path = tmp_path / f"{subtype}.{fmt.lower()}"
        channels = 1 if fmt in ("HTK", "SDS", "SVX") else 2  # formats of mono audio only
        samples = np.random.default_rng(3).uniform(-1, 1, (3001, channels)).astype(np.float32)
        samples[:2] = [[1.0], [-1.0]]  # full scale
        soundfile.write(path, samples, 16000, subtype=subtype, format=fmt)
        theirs, _ = soundfile.read(path, dtype="float32", always_2d=True)
        ours, _ = load_audio(path, mono=False)
        np.testing.assert_array_equal(ours.numpy(), theirs.T, err_msg=f"{fmt} {subtype}")
