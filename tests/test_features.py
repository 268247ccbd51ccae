"""The batched preprocessing against the official pipeline (golden data) and torchaudio."""

import warnings

import numpy as np
import pytest
import torch

from sslam.audio import AudioError
from sslam.features import (
    NORM_STATS,
    fbank,
    mel_banks,
    normalize,
    num_frames,
    pad_or_crop,
    patchify,
    preprocess,
    unpatchify,
)

torchaudio = pytest.importorskip("torchaudio")


def official(wave: torch.Tensor, rate: int, target_length=1024, norm=(-4.268, 4.569)) -> torch.Tensor:
    """The official chain with torchaudio, one clip (SPEC 1.1)."""
    if rate != 16000:
        wave = torchaudio.functional.resample(wave, rate, 16000)
    wave = wave - wave.mean()
    fb = torchaudio.compliance.kaldi.fbank(
        wave[None], htk_compat=True, sample_frequency=16000, use_energy=False,
        window_type="hanning", num_mel_bins=128, dither=0.0, frame_shift=10,
    )
    if fb.shape[0] < target_length:
        fb = torch.nn.functional.pad(fb, (0, 0, 0, target_length - fb.shape[0]))
    fb = fb[:target_length]
    return ((fb - norm[0]) / (2 * norm[1]))[None, None]


def test_golden_model_input(golden_fbank):
    for name, item in golden_fbank["items"].items():
        x = preprocess(item["waveform"], item["wav_file_sample_rate"])
        assert x.shape == (1, 1, 1024, 128)
        err = (x - item["model_input"]).abs().max().item()
        # Bit-identical with torch's MKL FFT (x86); another FFT library (pocketfft, as on ARM)
        # differs from the stored data by its rounding (the live comparisons below hold 1e-6).
        assert err < 1e-4, (name, err)


def test_golden_batched_in_one_call(golden_fbank):
    items = list(golden_fbank["items"].values())
    waves = [it["waveform_16k"] if it["resampled"] else it["waveform"] for it in items]
    x = preprocess(waves, 16000)
    for i, it in enumerate(items):
        assert (x[i] - it["model_input"][0]).abs().max() < 1e-4


def test_golden_raw_fbank(golden_fbank):
    for item in golden_fbank["items"].values():
        fb, frames = fbank(item["waveform_16k_centered"][None])
        assert int(frames[0]) == item["n_frames_raw"]
        # log-domain error (normalisation divides it by 9.1): bit-identical with MKL's FFT
        assert (fb[0] - item["fbank_raw"]).abs().max() < 5e-4


def test_mel_banks_are_the_official_bits():
    """The official fbank builds its mel filterbank in float32 (torchaudio's get_mel_banks); one
    built in float64 and rounded differs by up to 1.6e-3 relative, which a pure tone near
    5638 Hz carried to 1.45e-4 in the features."""
    from torchaudio.compliance.kaldi import get_mel_banks

    official_banks, _ = get_mel_banks(128, 512, 16000.0, 20.0, 0.0, 100.0, -500.0, 1.0)
    assert torch.equal(mel_banks(), torch.nn.functional.pad(official_banks, (0, 1)))
    t = torch.arange(16000) / 16000
    for hz in (5631.5, 5638.0, 5645.5):
        tone = 0.9 * torch.sin(2 * torch.pi * hz * t)
        assert (preprocess(tone, 16000) - official(tone, 16000)).abs().max() < 1e-6, hz


@pytest.mark.filterwarnings("ignore:Torchinductor does not support code generation for complex operators")
def test_constants_built_under_torch_compile_keep_the_official_bits():
    """The mel bank and window are built once and cached: built by a first call under
    torch.compile, inductor rounded them otherwise (bank 3.7e-4 relative, window too), and every
    later eager call in the process inherited those bits."""
    from torchaudio.compliance.kaldi import get_mel_banks

    from sslam import features

    features._mel_banks_cpu.cache_clear(), features._window_cpu.cache_clear()
    wave = 0.3 * torch.randn(16000)
    torch._dynamo.reset()
    torch.compile(preprocess)(wave, 16000)
    official_banks, _ = get_mel_banks(128, 512, 16000.0, 20.0, 0.0, 100.0, -500.0, 1.0)
    assert torch.equal(mel_banks(), torch.nn.functional.pad(official_banks, (0, 1)))
    assert torch.equal(features.frame_window(), torch.hann_window(400, periodic=False))
    assert (preprocess(wave, 16000) - official(wave, 16000)).abs().max() < 1e-6


@pytest.mark.parametrize("rate", [8000, 22050, 44100, 48000])
def test_equals_torchaudio_to_rounding_across_signals_and_lengths(rate):
    """The whole chain is the official one op for op: on the CPU it gives torchaudio's bits
    (measured: 0; the margin is for rounding the two might yet part on), for noise, a tone over
    faint noise, a full-scale square wave and a DC offset, one frame to longer than the window."""
    torch.manual_seed(rate)
    for seconds in (0.03, 1.3, 12.0):
        n = int(rate * seconds)
        t = torch.arange(n) / rate
        for wave in (0.3 * torch.randn(n), 0.9 * torch.sin(2 * torch.pi * 1234.5 * t) + 1e-4 * torch.randn(n),
                     torch.sign(torch.sin(2 * torch.pi * 100 * t)), 0.3 + 0.01 * torch.randn(n)):
            assert (preprocess(wave, rate) - official(wave, rate)).abs().max() < 1e-6, seconds


@pytest.mark.parametrize("length", [400, 401, 559, 560, 7919, 16000, 43210, 170001])
def test_matches_torchaudio_random_lengths(length):
    wave = 0.3 * torch.randn(length) + 0.1  # a DC offset, as real recordings have
    ours = preprocess(wave, 16000)
    ref = official(wave, 16000)
    assert (ours - ref).abs().max() < 1e-4


@pytest.mark.parametrize("rate", [8000, 22050, 32000, 44100, 48000])
def test_matches_torchaudio_other_rates(rate):
    t = torch.arange(int(rate * 1.3)) / rate
    wave = 0.5 * torch.sin(2 * torch.pi * 440 * t) + 0.02 * torch.randn(t.numel())
    assert (preprocess(wave, rate) - official(wave, rate)).abs().max() < 1e-4


def test_batch_of_different_lengths_equals_each_alone():
    clips = [torch.randn(n) * s for n, s in [(16000, 0.1), (400, 1.0), (33333, 0.5), (12345, 0.01)]]
    batched = preprocess(clips, 16000, target_length=256)
    for i, clip in enumerate(clips):
        alone = preprocess(clip, 16000, target_length=256)
        assert (batched[i] - alone[0]).abs().max() < 1e-5
        assert (alone - official(clip, 16000, target_length=256)).abs().max() < 1e-4


def test_padded_tensor_with_lengths():
    clips = [torch.randn(9000), torch.randn(20000)]
    padded = torch.zeros(2, 20000)
    padded[0, :9000], padded[1] = clips
    x, frames = preprocess(padded, 16000, target_length=128, lengths=[9000, 20000], return_frames=True)
    assert frames.tolist() == [num_frames(9000), min(128, num_frames(20000))]
    assert (x - preprocess(clips, 16000, target_length=128)).abs().max() < 1e-6


def test_padding_value_and_crop():
    x = preprocess(torch.randn(16000), 16000, target_length=1024)
    assert torch.allclose(x[0, 0, 98:], torch.full((926, 128), 4.268 / 9.138))
    wave = 0.1 * torch.randn(16000 * 12)
    long = preprocess(wave, 16000, target_length=1024)
    assert long.shape == (1, 1, 1024, 128)
    assert (long - official(wave, 16000)).abs().max() < 1e-4  # the first 1024 frames are kept
    feats = torch.randn(2, 30, 128)  # the benchmarks' eager pipelines crop with pad_or_crop itself
    assert torch.equal(pad_or_crop(feats, 20), feats[:, :20])
    assert torch.equal(pad_or_crop(feats, 40), torch.cat([feats, torch.zeros(2, 10, 128)], 1))


def test_shorter_than_one_frame_is_a_clear_error():
    with pytest.raises(AudioError, match=r"clip\(s\) 1 \(399 samples\).*shorter than one 25 ms frame"):
        preprocess([torch.randn(1000), torch.randn(399)], 16000)


def test_a_samples_by_channels_array_is_named_as_such_in_few_words():
    stereo = np.random.default_rng(0).uniform(-0.5, 0.5, (44100, 2)).astype(np.float32)
    with pytest.raises(AudioError, match=r"and 44095 more.*reads as 44100 clips of 2 samples") as info:
        preprocess(stereo, 44100)
    assert len(str(info.value)) < 400


@pytest.mark.parametrize("rate", [999, 384001, 2**31 - 1, 0, -16000, 16000.5, float("nan"), True])
def test_sample_rates_outside_the_supported_range_are_refused_before_any_work(rate):
    with pytest.raises(ValueError, match=r"sample_rate must be an integer in 1000\.\.384000 Hz"):
        preprocess(torch.randn(16000) * 0.1, rate)


@pytest.mark.parametrize(
    "bad, match",
    [
        (np.zeros(16000, dtype=np.int16), r"waveforms: samples must be floating point.*int16"),
        (torch.zeros(16000, dtype=torch.int32), r"waveforms: samples must be floating point"),
        (torch.zeros(16000, dtype=torch.bool), r"waveforms: samples must be floating point"),
        (torch.zeros(16000, dtype=torch.complex64), r"waveforms: samples must be floating point"),
        ([torch.zeros(16000), np.arange(16000)], r"waveforms\[1\]: samples must be floating point"),
        (torch.full((2, 16000), float("nan")), r"waveforms: 32000 of 32000 samples are not finite"),
        ([torch.zeros(16000), torch.tensor([0.0, float("inf")] * 8000)], r"waveforms\[1\]: 8000 of"),
        (torch.full((2, 16000), -1e17), r"waveforms: 32000 of 32000 .* 32000 beyond \+-1e\+15"),
    ],
)
def test_integer_boolean_complex_and_non_finite_samples_are_refused(bad, match):
    with pytest.raises(AudioError, match=match):
        preprocess(bad, 16000)


def test_empty_batches_and_unclippable_inputs_are_value_errors():
    for bad in (torch.zeros(0, 16000), np.zeros((0, 5)), [], "clip.wav", 3.0):
        with pytest.raises(ValueError, match="waveforms"):
            preprocess(bad, 16000)


def test_inputs_without_clips_get_errors_about_what_they_are():
    """Each message names what was given: no layout hint for an empty clip, a list of numbers
    is not taken for one-sample clips, complex samples get no integer-PCM advice."""
    with pytest.raises(AudioError, match=r"clip\(s\) 0 \(0 samples\)") as info:
        preprocess(np.zeros(0, np.float32), 16000)
    assert "reads as" not in str(info.value)
    with pytest.raises(ValueError, match=r"waveforms\[0\]: a single number, not a clip.*np\.asarray"):
        preprocess([0.1] * 1000, 16000)
    with pytest.raises(AudioError, match="complex64") as info:
        preprocess(np.zeros(16000, np.complex64), 16000)
    assert "integer PCM" not in str(info.value)


def test_read_only_arrays_are_read_without_warnings():
    wave = np.random.default_rng(1).uniform(-0.5, 0.5, 16000).astype(np.float32)
    frozen = np.frombuffer(wave.tobytes(), dtype=np.float32)  # not writeable
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(preprocess(frozen, 16000), preprocess(wave, 16000))


def test_big_endian_and_half_precision_arrays_give_the_native_float32_features():
    wave = np.random.default_rng(1).uniform(-0.5, 0.5, 16000)
    expected = preprocess(torch.from_numpy(wave.astype(np.float32)), 16000)
    for variant in (wave.astype(">f4"), wave.astype(">f8"), [wave.astype(">f4")]):
        assert torch.equal(preprocess(variant, 16000), expected)


SPEC_NORMS = {"audioset": (-4.268, 4.569), "esc50": (-6.627, 5.359), "spcv2": (-6.846, 5.565),
              "spass": (-5.275, 3.268)}  # SPEC 1.1, the official data loaders' statistics


@pytest.mark.parametrize("norm", sorted(SPEC_NORMS))
def test_presets(norm):
    assert sorted(NORM_STATS) == sorted(SPEC_NORMS)
    wave = torch.randn(8000)
    mean, std = SPEC_NORMS[norm]
    ref = official(wave, 16000, target_length=64, norm=(mean, std))
    assert (preprocess(wave, 16000, target_length=64, norm=norm) - ref).abs().max() < 1e-4


def test_custom_and_bad_norm():
    wave = torch.randn(8000)
    a = preprocess(wave, 16000, target_length=64, norm=(-5.0, 2.0))
    b = preprocess(wave, 16000, target_length=64, norm=None)
    assert torch.allclose(a, (b + 5.0) / 4.0, atol=1e-6)
    with pytest.raises(ValueError, match="unknown preset"):
        preprocess(wave, 16000, norm="librispeech")
    with pytest.raises(ValueError, match="std must be positive"):
        normalize(torch.zeros(3), (0.0, 0.0))
    # Not a pair of numbers: named, and before any features are computed.
    for bad in ((0.0,), 5, ("a", "b"), (1.0, 2.0, 3.0), (10**400, 1.0)):
        with pytest.raises(ValueError, match=r"norm=.*: expected a preset name, a \(mean, std\) pair of numbers"):
            preprocess(wave, 16000, norm=bad)


def test_paths_given_to_preprocess_are_named_as_such():
    with pytest.raises(AudioError, match=r"waveforms\[0\]: .*text, not samples: paths are decoded by"):
        preprocess(["a.wav"], 16000)


def test_patchify_layout_matches_the_patch_convolution():
    x = torch.randn(2, 1, 64, 128)
    conv = torch.nn.Conv2d(1, 8, 16, 16)
    via_conv = conv(x).flatten(2).transpose(1, 2)
    via_patches = patchify(x) @ conv.weight.reshape(8, -1).T + conv.bias
    assert torch.allclose(via_conv, via_patches, atol=1e-5)
    assert torch.equal(unpatchify(patchify(x)), x)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu(golden_fbank):
    clips = [it["waveform"] for it in golden_fbank["items"].values() if not it["resampled"]]
    cpu = preprocess(clips, 16000)
    gpu = preprocess([c.cuda() for c in clips], 16000)
    assert (gpu.cpu() - cpu).abs().max() < 1e-4


def test_the_finite_scan_can_be_left_to_the_decoder():
    # Audio checked when decoded skips the second scan (on CUDA it would wait for the GPU).
    wave = torch.randn(16000) * 0.1
    wave[5] = float("nan")
    assert torch.isnan(preprocess(wave, 16000, check_finite=False)).any()
    with pytest.raises(AudioError, match="1 NaN"):
        preprocess(wave, 16000)


def test_fractional_or_boolean_lengths_are_refused_not_truncated():
    batch = torch.randn(2, 16000) * 0.1
    for lengths in ([400.9, 16000], torch.tensor([16000.0, 800.0]), torch.tensor([True, True]), ["a", "b"],
                    [None, None]):
        with pytest.raises(ValueError, match="lengths: expected integer sample counts"):
            preprocess(batch, 16000, lengths=lengths)
    for lengths in ([16000, 800], np.array([16000, 800]), torch.tensor([16000, 800], dtype=torch.int32)):
        assert preprocess(batch, 16000, lengths=lengths, target_length=64).shape == (2, 1, 64, 128)
