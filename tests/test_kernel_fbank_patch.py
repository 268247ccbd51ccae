"""Tests of kernels/fbank_patch.py: fused waveform -> normalised log-mel patches (+ mixtures).

Without a GPU the kernel runs under the Triton interpreter at small shapes (B=3..6, 64..128
frames). ``triton.jit`` decides at decoration time whether a kernel is interpreted, so the flag
is set below before anything imports Triton, and the ``kernels_on_cpu`` fixture re-wraps the
kernel and Triton's library functions in the interpreter if an earlier import decorated them
for a GPU. On a GPU machine the CUDA tests run the compiled kernel at the real shapes (B=48,
10-s clips, 1024 frames) with both dot precisions instead.
"""

import importlib
import math
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from conftest import interpret_kernels, load_golden, poison_buffers, requires_cuda  # noqa: E402

from sslam.audio import AudioError  # noqa: E402
from sslam.features import fbank, mel_banks, patchify, remove_dc  # noqa: E402
from sslam.mixing import MixWindows, mix_patches, sample_windows  # noqa: E402

fp = importlib.import_module("sslam.kernels.fbank_patch")  # the module (its function shares its name)

NORM_MEAN, NORM_STD = -4.268, 4.569
TOL = 1e-4  # max abs difference allowed from the reference, in normalised units


@pytest.fixture
def kernels_on_cpu(monkeypatch):
    """Force the Triton path for CPU tensors, through the interpreter (CPU-only machines: on a
    GPU machine the CUDA tests cover the compiled kernels)."""
    interpret_kernels(monkeypatch, fp, ["_fbank_patch_kernel"])


@pytest.fixture
def poisoned(monkeypatch):
    poison_buffers(monkeypatch, fp)


def waveforms_with_lengths(lengths, num_samples=None, scale=0.3):
    """(B, N) random clips, each followed by loud garbage padding that must not leak in."""
    num_samples = num_samples or max(lengths)
    waves = scale * torch.randn(len(lengths), num_samples)
    for i, n in enumerate(lengths):
        waves[i, n:] = 1e3
    return waves, torch.tensor(lengths)


def normalised(logmel: torch.Tensor) -> torch.Tensor:
    return (logmel - NORM_MEAN) / (2 * NORM_STD)


def test_matches_reference_awkward_lengths(kernels_on_cpu, poisoned):
    """One batch: crop (more frames than target_length), 400, 401, 559, 560 and a random length."""
    target = 64
    lengths = [target * 160 + 240 + 333, 400, 401, 559, 560, 3571]
    waves, lens = waveforms_with_lengths(lengths)
    out = fp.fbank_patch(waves, lens, target_length=target)
    ref = fp.fbank_patch_ref(waves, lens, target_length=target)
    assert out.shape == (6, target // 16 * 8, 256) and out.dtype == torch.float32
    assert torch.isfinite(out).all()
    assert (out - ref).abs().max() <= TOL


def test_golden_signals_match_official(kernels_on_cpu, golden_fbank):
    """Real audio and the golden synthetic clips, in one batch of different lengths: equal to
    the official model input (first 128 frames) and to our reference."""
    names = ["test_wav", "sine440_noise_1s_16k", "noise_2p7s_16k"]
    items = [golden_fbank["items"][n] for n in names]
    clips = [it.get("waveform_16k", it["waveform"]) for it in items]
    lens = torch.tensor([c.numel() for c in clips])
    waves = torch.zeros(len(clips), int(lens.max()))
    for i, c in enumerate(clips):
        waves[i, : c.numel()] = c
    target = 128
    out = fp.fbank_patch(waves, lens, target_length=target)
    ref = fp.fbank_patch_ref(waves, lens, target_length=target)
    official = torch.cat([patchify(it["model_input"][:, :, :target]) for it in items])
    assert (out - ref).abs().max() <= TOL
    assert (out - official).abs().max() <= TOL


def test_dynamic_range_as_accurate_as_reference(kernels_on_cpu):
    """A loud 440 Hz sine over faint noise stresses the absolute DFT error in quiet mel bins:
    with noise at 1e-4 many bins sit just above the log floor. Against a float64 fbank the
    float32 reference (pocketfft) itself misses by more than 1e-4 there, so no float32 method
    can promise 1e-4 *from the reference*; the kernel must be about as accurate as it (measured
    on an H100 at 10 s: tf32x3 2.9e-4 vs the reference's 1.6e-4 on the faintest, and 2.9e-4 vs
    1.7e-3 on a 4 kHz sine, where the kernel is the more accurate). A DC offset costs nothing."""
    n = 12000
    t = torch.arange(n) / 16000
    gen = torch.Generator().manual_seed(7)
    sine = 0.5 * torch.sin(2 * math.pi * 440 * t)
    clips = [sine + amp * torch.randn(n, generator=gen) for amp in (0.05, 1e-3, 1e-4)]
    clips.append(0.5 + 0.01 * torch.randn(n, generator=gen))  # large DC offset
    waves = torch.stack(clips)
    target = 64
    out = fp.fbank_patch(waves, target_length=target)
    ref = fp.fbank_patch_ref(waves, target_length=target)
    for i, clip in enumerate(clips):
        truth = patchify(normalised(fp.logmel_float64(clip)[:target])[None, None])
        ours_err = (out[i] - truth[0]).abs().max().item()
        ref_err = (ref[i] - truth[0]).abs().max().item()
        assert ours_err <= max(3 * ref_err, TOL), (i, ours_err, ref_err)
    assert (out[0] - ref[0]).abs().max() <= TOL  # the golden item's level of noise
    assert (out[3] - ref[3]).abs().max() <= TOL  # DC offset


def test_clip_mean_removal_is_a_no_op():
    """The kernel skips the official waveform mean removal because per-frame DC removal follows:
    the reference fbank with and without it (offset 0.25) agrees to float rounding."""
    x = 0.25 + 0.2 * torch.randn(1, 5000)
    lens = torch.tensor([5000])
    with_mean, _ = fbank(remove_dc(x, lens), lens)
    without, _ = fbank(x, lens)
    assert (normalised(with_mean) - normalised(without)).abs().max() < 2e-5


def test_fused_mixing(kernels_on_cpu, poisoned):
    target = 64
    waves, lens = waveforms_with_lengths([9000, 10813, 2000], num_samples=10813)
    windows = MixWindows(starts=(0, 32), width=16)
    out = fp.fbank_patch(waves, lens, target_length=target, mix=windows)
    clean, mixed = out[:3], out[3:]
    assert out.shape == (6, 32, 256)
    # The mixtures are exactly the reference mixing rule applied to the kernel's clean output.
    assert torch.equal(mixed, mix_patches(clean, windows))
    ref = fp.fbank_patch_ref(waves, lens, target_length=target, mix=windows)
    assert (out - ref).abs().max() <= TOL


@pytest.mark.parametrize("batch", [1, 2])
def test_fused_mixing_tiny_batches(kernels_on_cpu, poisoned, batch):
    """B=1 mixes the clip with itself (identity); B=2 pairs the two clips both ways."""
    waves, lens = waveforms_with_lengths([6000, 4321][:batch], num_samples=6000)
    windows = MixWindows(starts=(16, 48), width=16)
    out = fp.fbank_patch(waves, lens, target_length=64, mix=windows)
    assert torch.equal(out[batch:], mix_patches(out[:batch], windows))
    if batch == 1:
        assert torch.equal(out[1], out[0])


@pytest.mark.parametrize("precision", fp.DOT_PRECISIONS)
def test_dot_precisions(kernels_on_cpu, precision):
    waves, lens = waveforms_with_lengths([5000, 3000])
    out = fp.fbank_patch(waves, lens, target_length=32, dot_precision=precision)
    assert (out - fp.fbank_patch_ref(waves, lens, target_length=32)).abs().max() <= TOL


@pytest.mark.parametrize("block_k", [16, 64])
def test_tile_shapes(kernels_on_cpu, monkeypatch, block_k):
    """K blocks that divide the 400-sample frame and that run past it (masked) agree, as do
    other frame blocks and frequency chunks."""
    monkeypatch.setattr(fp, "_INTERPRETER_CONFIG", dict(BLOCK_T=16, BLOCK_F=128, BLOCK_K=block_k))
    waves, lens = waveforms_with_lengths([5000, 2345])
    out = fp.fbank_patch(waves, lens, target_length=48, norm=(-5.0, 3.0))
    ref = fp.fbank_patch_ref(waves, lens, target_length=48, norm=(-5.0, 3.0))
    assert (out - ref).abs().max() <= TOL


def test_norm_none_and_input_layouts(kernels_on_cpu):
    waves = 0.1 * torch.randn(4, 2, 3000, dtype=torch.float64)[:, 1]  # float64, strided rows
    out = fp.fbank_patch(waves, target_length=32, norm=None)
    ref = fp.fbank_patch_ref(waves.float(), target_length=32, norm=None)
    assert (out - ref).abs().max() <= TOL * 2 * NORM_STD  # raw log-mel units


def test_a_waveform_that_requires_grad_is_differentiated_through_the_reference(kernels_on_cpu):
    """The kernel has no backward: its output required grad, and a backward through it failed
    ("no autograd formula"), where on the CPU the same call was differentiable."""
    waves = (0.1 * torch.randn(2, 1700)).requires_grad_()
    out = fp.fbank_patch(waves, target_length=32)
    grad_out = torch.randn_like(out)
    (grad,) = torch.autograd.grad(out, waves, grad_out)
    ref = fp.fbank_patch_ref(waves, target_length=32)
    assert torch.equal(out, ref)
    assert torch.equal(grad, torch.autograd.grad(ref, waves, grad_out)[0])
    with torch.no_grad():  # no graph to build: the kernel
        assert not torch.equal(fp.fbank_patch(waves, target_length=32), ref)


def test_kernels_off_equals_reference(monkeypatch):
    monkeypatch.setenv("SSLAM_KERNELS", "0")
    waves, lens = waveforms_with_lengths([3000, 1000])
    windows = MixWindows((0, 16), 16)
    out = fp.fbank_patch(waves, lens, target_length=32, mix=windows)
    assert torch.equal(out, fp.fbank_patch_ref(waves, lens, target_length=32, mix=windows))


def test_errors():
    waves, lens = waveforms_with_lengths([3000, 399])
    with pytest.raises(AudioError, match="clip\\(s\\) \\[1\\]"):
        fp.fbank_patch(waves, lens, target_length=32)
    with pytest.raises(AudioError, match="shorter than one"):
        fp.fbank_patch(torch.randn(2, 300))
    with pytest.raises(ValueError, match="lengths"):
        fp.fbank_patch(waves, torch.tensor([3000, 3001]))
    with pytest.raises(ValueError, match="lengths: expected integer sample counts"):
        fp.fbank_patch(waves, [3000.0, 2400.9])
    with pytest.raises(ValueError, match="target_length"):
        fp.fbank_patch(waves, target_length=100)
    with pytest.raises(ValueError, match="dot_precision"):
        fp.fbank_patch(waves, dot_precision="tf32")
    with pytest.raises(ValueError, match="waveforms"):
        fp.fbank_patch(torch.randn(3000))
    with pytest.raises(ValueError, match="multiples of 16"):
        fp.fbank_patch(waves, mix=MixWindows((8, 40), 16))
    with pytest.raises(ValueError, match="past target_length"):
        fp.fbank_patch(waves, target_length=32, mix=MixWindows((0, 32), 16))


def test_torch_compile_traces_the_op(kernels_on_cpu):
    windows = MixWindows((0, 16), 16)

    def features(waves, lens):
        return fp.fbank_patch(waves, lens, target_length=32, mix=windows)

    waves, lens = waveforms_with_lengths([4000, 2500])
    compiled = torch.compile(features, backend="aot_eager", fullgraph=True)
    out = compiled(waves, lens)
    assert torch.equal(out, features(waves, lens))


def test_basis_folds_the_frame_chain():
    """The cached float32 basis applied to a frame equals the explicit DC / pre-emphasis /
    window / DFT chain (float64), so the kernel's linear map is the right one."""
    basis, mel = fp._constants_cpu()
    assert basis.shape == (512, 512) and torch.all(basis[400:] == 0)
    assert torch.equal(mel, mel_banks()[:, :256].T)
    frame = torch.randn(400, dtype=torch.float64)
    x = frame - frame.mean()
    x = (x - 0.97 * torch.cat([x[:1], x[:-1]])) * torch.hann_window(400, periodic=False,
                                                                    dtype=torch.float64)
    spectrum = torch.fft.rfft(x, n=512)[:256]
    coeffs = frame @ basis[:400].double()
    assert torch.allclose(coeffs[:256], spectrum.real, atol=1e-5)
    assert torch.allclose(coeffs[256:], -spectrum.imag, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# CUDA: the compiled kernel at the real shapes
# ----------------------------------------------------------------------------------------------


def real_batch(device):
    """B=48 10-s clips: the golden real clip, random audio and awkward lengths."""
    gen = torch.Generator().manual_seed(0)
    waves = 0.2 * torch.randn(48, 160000, generator=gen)
    t = torch.arange(160000) / 16000
    waves[1] = 0.5 * torch.sin(2 * math.pi * 440 * t) + 0.05 * torch.randn(160000, generator=gen)
    waves[0] = load_golden("fbank.pt")["items"]["test_wav"]["waveform_16k"]
    lens = torch.full((48,), 160000)
    lens[2:8] = torch.tensor([400, 401, 559, 560, 43200, 99999])
    return waves.to(device), lens


def truth_patches(waves: torch.Tensor, lens: torch.Tensor, target: int = 1024) -> torch.Tensor:
    """Float64 model input of each clip (cropped / padded to ``target``), patchified, float32."""
    rows = []
    for clip, n in zip(waves, lens.tolist()):
        x = normalised(fp.logmel_float64(clip[:n])[:target])
        pad = normalised(torch.zeros(target - x.shape[0], x.shape[1], dtype=x.dtype,
                                     device=x.device))
        rows.append(torch.cat([x, pad]).float())
    return patchify(torch.stack(rows)[:, None])


@requires_cuda
@pytest.mark.parametrize("precision", fp.DOT_PRECISIONS)
def test_cuda_real_shapes(monkeypatch, precision):
    """At full scale (48 x 131072 values) the float32 reference's own tail error reaches ~2e-4
    against float64 (pocketfft rounding; measured on random 10-s clips), so the kernel is held to
    1e-4 against the float64 fbank instead, and to the reference's error + 1e-4 against it.
    tf32x3, which is not the default, missed that on an H200 (triton 3.6, 2026-12-04; see the
    module doc): its accuracy shortfall is reported as an expected failure, with the errors,
    after every other check has held."""
    monkeypatch.setenv("SSLAM_KERNELS", "1")
    monkeypatch.setattr(fp, "_new_buffer", lambda s, d, dev: torch.full(s, float("nan"),
                                                                         dtype=d, device=dev))
    waves, lens = real_batch("cuda")
    windows = sample_windows(generator=torch.Generator().manual_seed(1))
    out = fp.fbank_patch(waves, lens, mix=windows, dot_precision=precision)
    assert out.shape == (96, 512, 256) and not out.isnan().any()
    assert torch.equal(out[48:], mix_patches(out[:48], windows))
    clean = fp.fbank_patch(waves, lens, dot_precision=precision)
    assert torch.equal(clean, out[:48])
    truth = truth_patches(waves, lens.cuda())
    ref = fp.fbank_patch_ref(waves.cpu(), lens)  # the CPU chain, as official
    ref_err = (ref - truth.cpu()).abs().max().item()
    # (error, bound) of each comparison
    errors = {"max vs float64": ((out[:48] - truth).abs().max().item(), TOL),
              "max vs reference": ((out[:48].cpu() - ref).abs().max().item(), ref_err + TOL),
              "mean vs reference": ((out[:48].cpu() - ref).abs().mean().item(), 1e-6)}
    missed = {name: error for name, (error, bound) in errors.items() if error > bound}
    if precision == "tf32x3" and missed:
        pytest.xfail(f"tf32x3 misses its bounds at real shapes (known, see the module doc): {errors}")
    assert not missed, errors


def test_the_op_called_directly_accepts_views_and_int64_lengths(kernels_on_cpu):
    """torch.ops.sslam.fbank_patch with column-major clips and int64 lengths gives what the
    public function's own (row-contiguous, int32) arguments give."""
    waves, lengths = waveforms_with_lengths([1200, 3000, 2100])
    args = (32, -4.268, 9.138, [], 0, "ieee")
    want = torch.ops.sslam.fbank_patch(waves, lengths.to(torch.int32), *args)
    assert torch.equal(torch.ops.sslam.fbank_patch(waves.t().contiguous().t(), lengths, *args), want)
    strided = torch.stack([lengths, torch.zeros_like(lengths)], 1).to(torch.int32)[:, 0]  # every other entry
    assert not strided.is_contiguous()
    assert torch.equal(torch.ops.sslam.fbank_patch(waves, strided, *args), want)
