"""Tests for sslam.resampler: parity with the reference resampler, the math, shapes, errors."""

from __future__ import annotations

import concurrent.futures
import math
import time

import pytest
import torch
import torch.nn.functional as F
from conftest import load_golden, requires_cuda

from sslam import resampler
from sslam.cached import cached_constant
from sslam.resampler import (
    LOWPASS_FILTER_WIDTH,
    ROLLOFF,
    _build_dense_bank,
    _dense_matmul,
    resample,
)

# Lengths: a single sample, tiny, primes, and a few seconds.
LENGTHS = (1, 2, 13, 997, 7919, 48_011)

DOWN_TO_16K = [(8000, 16000), (22050, 16000), (32000, 16000), (44100, 16000), (48000, 16000)]
OTHER_PAIRS = [
    (16000, 22050),
    (16000, 44100),
    (16000, 48000),
    (11025, 16000),
    (44100, 48000),
    (16000, 8000),
    (3, 7),
    (7, 3),
]


def expected_length(orig: int, new: int, length: int) -> int:
    divisor = math.gcd(orig, new)
    orig, new = orig // divisor, new // divisor
    return -(-new * length // orig)


def brute_force_resample(x: torch.Tensor, orig: int, new: int) -> torch.Tensor:
    """y[m] = sum_i x[i] h(i / orig - m / new), evaluated densely in float64 from the formula."""
    divisor = math.gcd(orig, new)
    orig, new = orig // divisor, new // divisor
    base = min(orig, new) * ROLLOFF
    length = x.shape[-1]
    m = torch.arange(expected_length(orig, new, length), dtype=torch.float64)[:, None]
    i = torch.arange(length, dtype=torch.float64)[None, :]
    t = (i / orig - m / new) * base
    pi_t = math.pi * t
    sinc = torch.where(pi_t == 0, torch.ones_like(t), torch.sin(pi_t) / pi_t)
    hann = torch.cos(pi_t / (2 * LOWPASS_FILTER_WIDTH)) ** 2
    h = torch.where(t.abs() < LOWPASS_FILTER_WIDTH, sinc * hann * base / orig, 0.0)
    return x.to(torch.float64) @ h.T


@pytest.fixture(scope="module")
def reference():
    torchaudio_functional = pytest.importorskip("torchaudio.functional")
    return torchaudio_functional.resample


@pytest.mark.parametrize("exact", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("orig,new", DOWN_TO_16K + OTHER_PAIRS)
def test_matches_reference(reference, orig, new, dtype, exact):
    for length in LENGTHS:
        x = torch.randn(length, dtype=dtype)
        ours = resample(x, orig, new, exact=exact)
        theirs = reference(x, orig, new)
        assert ours.dtype == dtype and ours.shape == theirs.shape
        assert ours.shape[-1] == expected_length(orig, new, length)
        if exact:  # the dense path is the reference's computation, bit for bit
            assert torch.equal(ours, theirs), f"{orig}->{new}, N={length}, {dtype}"
        err = (ours - theirs).abs().max().item()
        assert err < 1e-5, f"{orig}->{new}, N={length}, {dtype}: max abs error {err}"


@pytest.mark.parametrize("orig,new", [(44100, 16000), (32000, 16000), (16000, 48000)])
@pytest.mark.parametrize("exact", [True, False])
def test_batched_matches_reference(reference, orig, new, exact):
    x = torch.randn(2, 3, 4001)
    ours = resample(x, orig, new, exact=exact)
    theirs = reference(x, orig, new)
    assert ours.shape == theirs.shape == (2, 3, expected_length(orig, new, 4001))
    assert (ours - theirs).abs().max().item() < 1e-5
    # Each row on its own gives the same result: rows do not leak into each other.
    for b in range(2):
        for c in range(3):
            torch.testing.assert_close(resample(x[b, c], orig, new, exact=exact), ours[b, c], atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    "orig,new", [(44100, 16000), (8000, 16000), (16001, 16000), (384000, 16000), (1000, 16000)]
)
@pytest.mark.parametrize("exact", [True, False])
@pytest.mark.filterwarnings("ignore:resample 16001 -> 16000 Hz")  # its bank is over the limit
def test_matches_the_formula(orig, new, exact):
    """Independent of the reference: the windowed-sinc sum written out densely in float64."""
    for length in (1, 5, 331):
        x = torch.randn(2, length, dtype=torch.float64)
        ours = resample(x, orig, new, exact=exact)
        torch.testing.assert_close(ours, brute_force_resample(x, orig, new), atol=1e-10, rtol=0)


@pytest.mark.parametrize("name", ["test_wav", "test_x2_12s_32k"])
def test_matches_golden_pipeline(name):
    """The official pipeline's own 32 kHz -> 16 kHz output for a real clip."""
    item = load_golden("fbank.pt")["items"][name]
    ours = resample(item["waveform"], item["wav_file_sample_rate"], 16000)
    assert torch.equal(ours, item["waveform_16k"])
    fast = resample(item["waveform"], item["wav_file_sample_rate"], 16000, exact=False)
    assert (fast - item["waveform_16k"]).abs().max().item() < 1e-5


def test_sine_below_cutoff_is_preserved():
    """A 1 kHz tone resampled 44.1 kHz -> 16 kHz is the same tone (away from the edges)."""
    seconds = torch.arange(44100, dtype=torch.float64) / 44100
    tone = torch.sin(2 * math.pi * 1000 * seconds + 0.3)
    out = resample(tone, 44100, 16000)
    expected = torch.sin(
        2 * math.pi * 1000 * torch.arange(16000, dtype=torch.float64) / 16000 + 0.3
    )
    assert out.shape == (16000,)
    assert (out[100:-100] - expected[100:-100]).abs().max().item() < 1e-3


def test_output_length_uses_reduced_rates():
    for orig, new in DOWN_TO_16K + OTHER_PAIRS + [(16001, 16000), (96000, 16000)]:
        for length in (1, 2, 3, 440, 441, 442, 1000):
            out = resample(torch.randn(length), orig, new)
            assert out.shape == (expected_length(orig, new, length),)


@pytest.mark.parametrize("exact", [True, False])
def test_output_length_rounds_the_quotient_to_float32_as_the_reference(reference, exact):
    # 180697 samples at 44.1 kHz: 160 * 180697 / 441 = 65559.0022..., which float32 rounds to
    # 65559, so the reference returns 65559 samples where the exact ceiling is 65560.
    length = 180697
    assert -(-160 * length // 441) == 65560
    x = torch.randn(length)
    ours, theirs = resample(x, 44100, 16000, exact=exact), reference(x, 44100, 16000)
    assert ours.shape == theirs.shape == (65559,)
    if exact:
        assert torch.equal(ours, theirs)
    else:
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dense_bank_built_a_slice_of_phases_at_a_time_is_the_references(reference, monkeypatch, dtype):
    monkeypatch.setattr(resampler, "_BUILD_SLICE_ELEMENTS", 1000)  # 2 phases of 487 taps a slice
    resampler._cached_dense_bank.cache_clear()
    try:
        for orig, new in [(44100, 16000), (16000, 22050)]:
            x = torch.randn(10_007, dtype=dtype)
            assert torch.equal(resample(x, orig, new), reference(x, orig, new)), f"{orig}->{new}"
    finally:
        resampler._cached_dense_bank.cache_clear()


def test_threads_resampling_at_a_new_rate_build_its_bank_once(monkeypatch):
    calls = []
    build = resampler._build_dense_bank

    def counting_build(*args):
        calls.append(args)
        time.sleep(0.2)  # long enough for the other threads to ask for the same bank
        return build(*args)

    monkeypatch.setattr(resampler, "_cached_dense_bank", cached_constant(maxsize=16)(counting_build))
    x = torch.randn(4410)
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        outs = list(pool.map(lambda _: resample(x, 44100, 16000), range(4)))
    assert len(calls) == 1
    assert all(torch.equal(out, outs[0]) for out in outs)


def test_exact_resampling_too_large_to_build_says_it_is_not_bit_identical(monkeypatch, recwarn):
    """Rates whose reference filter bank is over the build limit (16777 Hz -> 16 kHz: 1,025 MiB)
    took the fast path silently although the docs promised bit identity."""
    x = torch.randn(2, 4000)
    with pytest.warns(UserWarning, match=r"16777 -> 16000 Hz: .* 1,025 MiB, over the 1,024 MiB .* not bit for bit"):
        out = resample(x, 16777, 16000)
    assert torch.equal(out, resample(x, 16777, 16000, exact=False))
    monkeypatch.setattr(resampler, "_DENSE_MAX_BYTES", 80_000 * 4)  # 44.1 kHz -> 16 kHz: 76,200 taps
    recwarn.clear()
    resample(x, 44100, 16000)
    resample(x, 16777, 16000, exact=False)
    assert not recwarn.list


def test_equal_rates_return_the_input():
    x = torch.randn(3, 101)
    assert resample(x, 16000, 16000) is x


def test_non_contiguous_and_empty_batch():
    x = torch.randn(5, 3000).T  # (3000, 5), non-contiguous; resample along the last dim (5)
    torch.testing.assert_close(resample(x, 48000, 16000), resample(x.contiguous(), 48000, 16000))
    strided = torch.randn(2, 6002)[:, ::2]
    torch.testing.assert_close(
        resample(strided, 44100, 16000), resample(strided.contiguous(), 44100, 16000)
    )
    empty = resample(torch.randn(0, 4, 441), 44100, 16000)
    assert empty.shape == (0, 4, 160)


@pytest.mark.parametrize("bad", [0, -16000, 1.5, 16000.0, "16000", None, True])
def test_bad_rates_raise(bad):
    x = torch.randn(100)
    with pytest.raises(ValueError, match="orig_freq"):
        resample(x, bad, 16000)
    with pytest.raises(ValueError, match="new_freq"):
        resample(x, 16000, bad)


def test_bad_waveforms_raise():
    with pytest.raises(ValueError, match="at least 1 sample"):
        resample(torch.randn(3, 0), 44100, 16000)
    with pytest.raises(ValueError, match="at least 1 sample"):
        resample(torch.tensor(1.0), 44100, 16000)
    with pytest.raises(TypeError, match="float32 or float64"):
        resample(torch.randint(-5, 5, (100,)), 44100, 16000)
    with pytest.raises(TypeError, match="torch.Tensor"):
        resample([0.1, 0.2], 44100, 16000)


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("orig", [8000, 22050, 32000, 44100, 48000])
@pytest.mark.parametrize("exact", [True, False])
def test_cuda_matches_cpu(monkeypatch, orig, dtype, exact):
    # Matmuls may use TF32 (~1e-3 here); the comparison is of the arithmetic, in IEEE float32.
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    x = torch.randn(3, 2 * orig + 7, dtype=dtype)
    cpu = resample(x, orig, 16000, exact=exact)
    gpu = resample(x.cuda(), orig, 16000, exact=exact)
    assert gpu.is_cuda and gpu.dtype == dtype
    error = (gpu.cpu() - cpu).abs().max().item()
    assert error < 1e-5, error


@pytest.mark.parametrize("orig, new", [(441, 320), (3, 1), (7, 3), (1, 2)])
def test_dense_matmul_is_the_strided_conv(orig, new):
    # Off the CPU the exact path applies its bank as a matmul over frames; same sums as conv1d.
    bank = _build_dense_bank(orig, new, torch.float64, torch.device("cpu"))
    padded = torch.randn(3, 5 * orig + bank.shape[-1] + 2, dtype=torch.float64)
    conv = F.conv1d(padded[:, None], bank, stride=orig).transpose(1, 2)
    matmul = _dense_matmul(padded, bank, orig)
    assert matmul.shape == conv.shape and conv.shape[-1] == new
    torch.testing.assert_close(matmul, conv, rtol=0, atol=1e-12)
