"""Tests of kernels/mixture.py: SSLAM mixtures in both layouts and the partner token gather.

Without a GPU the kernels run under the Triton interpreter (flag set before the import; the
``kernels_on_cpu`` fixture re-wraps kernels, and Triton's library functions, decorated for a GPU
by an earlier import), in fp32 and fp16. On a GPU machine the CUDA tests replace them and add
bf16 and the real SSLAM shapes.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from conftest import interpret_kernels, poison_buffers, requires_cuda  # noqa: E402
from sslam.kernels import mixture as mx  # noqa: E402

from sslam.mixing import MixWindows, partner_keep_indices, sample_windows  # noqa: E402

KERNELS = ("_mix_kernel", "_gather_kernel", "_scatter_kernel")
CPU_DTYPES = (torch.float32, torch.float16)


@pytest.fixture
def kernels_on_cpu(monkeypatch):
    """Force the Triton path for CPU tensors, through the interpreter (CPU-only machines: on a
    GPU machine the CUDA tests cover the compiled kernels)."""
    interpret_kernels(monkeypatch, mx, KERNELS)


@pytest.fixture
def poisoned(monkeypatch):
    poison_buffers(monkeypatch, mx)


@pytest.mark.parametrize("dtype", CPU_DTYPES)
def test_mix_spectrogram_layout(kernels_on_cpu, poisoned, dtype):
    spec = torch.randn(3, 1, 83, 24).to(dtype)  # odd sizes: 83 frames, 24 bins
    windows = MixWindows(starts=(5, 40), width=17)  # frame windows need no alignment here
    out = mx.mix_spectrograms(spec, windows)
    assert out.dtype == dtype
    assert torch.equal(out, mx.mix_spectrograms_ref(spec, windows))


@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("batch", [1, 3])
def test_mix_patch_layout(kernels_on_cpu, poisoned, dtype, batch):
    patches = torch.randn(batch, 7 * 8, 256).to(dtype)
    windows = MixWindows(starts=(16, 64), width=32)
    out = mx.mix_spectrograms(patches, windows)
    assert torch.equal(out, mx.mix_patches_ref(patches, windows))
    if batch == 1:
        assert torch.equal(out, patches)


def test_mix_other_freq_patches_and_nan(kernels_on_cpu):
    """Three patches per row; NaNs propagate as in the reference (torch.maximum): a clip's own
    NaN stays in its mixture, a partner's NaN enters only outside the windows."""
    patches = torch.randn(2, 5 * 3, 256)
    patches[0, 0, 0] = float("nan")  # row 0: mixed region for windows at rows 1 and 3
    patches[0, 3, 0] = float("nan")  # row 1: inside a window
    windows = MixWindows(starts=(16, 48), width=16)
    out = mx.mix_spectrograms(patches, windows, freq_patches=3)
    ref = mx.mix_patches_ref(patches, windows, freq_patches=3)
    # Mixture 0 keeps both of its own NaNs; mixture 1 gets its partner's NaN of row 0 only.
    assert torch.equal(out.isnan(), ref.isnan()) and out.isnan().sum() == 3
    assert out[1, 0, 0].isnan() and not out[1, 3, 0].isnan()
    assert torch.equal(out.nan_to_num(), ref.nan_to_num())


@pytest.mark.parametrize("patch", [4, 8, 16])
def test_mix_patches_of_any_square_size_equal_the_mixed_spectrogram(kernels_on_cpu, poisoned, patch):
    """The patch height is the patches' own (P = patch x patch), not always 16: 8 x 8 patches
    were mixed by 16-frame rows, silently, in the reference; the kernel refused them."""
    from sslam.features import patchify

    spec = torch.randn(3, 1, 6 * patch, 3 * patch)
    windows = MixWindows(starts=(patch, 4 * patch), width=patch)
    expected = patchify(mx.mix_spectrograms_ref(spec, windows), patch)
    patches = patchify(spec, patch)
    assert torch.equal(mx.mix_patches_ref(patches, windows, freq_patches=3), expected)
    assert torch.equal(mx.mix_spectrograms(patches, windows, freq_patches=3), expected)
    with pytest.raises(ValueError, match=f"multiples of {patch} frames"):
        mx.mix_spectrograms(patches, MixWindows(starts=(patch + 1, 4 * patch), width=patch), freq_patches=3)


def test_mix_validates():
    with pytest.raises(ValueError, match="multiples of 16"):
        mx.mix_spectrograms(torch.randn(2, 64, 256), MixWindows((8, 40), 16))
    with pytest.raises(ValueError, match="past the"):
        mx.mix_spectrograms(torch.randn(2, 32, 256), MixWindows((0, 64), 16))
    with pytest.raises(ValueError, match="past the"):
        mx.mix_spectrograms(torch.randn(2, 1, 40, 8), MixWindows((0, 32), 16))
    with pytest.raises(ValueError, match="dtype"):
        mx.mix_spectrograms(torch.randn(2, 1, 64, 8).double(), MixWindows((0, 32), 16))
    with pytest.raises(ValueError, match="expected spectrograms"):
        mx.mix_spectrograms(torch.randn(64, 8), MixWindows((0, 32), 16))
    with pytest.raises(ValueError, match=r"P = patch x patch"):  # not a square patch
        mx.mix_spectrograms(torch.randn(2, 16, 200), MixWindows((0, 32), 16))
    for freq_patches in (2.0, True, 0):
        with pytest.raises(ValueError, match="freq_patches="):
            mx.mix_spectrograms(torch.randn(2, 16, 256), MixWindows((0, 32), 16), freq_patches=freq_patches)


@pytest.mark.parametrize("dtype", CPU_DTYPES)
def test_gather_forward_backward(kernels_on_cpu, poisoned, dtype):
    windows = MixWindows(starts=(16, 48), width=16)
    keep = partner_keep_indices(windows, time_patches=5, freq_patches=3)  # rows 0, 2, 4
    tokens = torch.randn(3, 15, 50, dtype=dtype, requires_grad=True)
    out = mx.gather_tokens(tokens, keep)
    ref = mx.gather_tokens_ref(tokens, keep)
    assert torch.equal(out, ref)
    grad = torch.randn_like(out)
    (ours,) = torch.autograd.grad(out, tokens, grad)
    (theirs,) = torch.autograd.grad(ref, tokens, grad)
    assert torch.equal(ours, theirs)  # distinct indices: a pure scatter into zeros


def test_gather_repeated_unsorted_indices(kernels_on_cpu, poisoned):
    """Any order and repeats: repeated tokens get the sum of their copies' gradients."""
    tokens = torch.randn(2, 37, 1100, requires_grad=True)  # D > 1024: two column blocks
    keep = torch.tensor([5, 0, 36, 5, 7, 5, 36])
    out = mx.gather_tokens(tokens, keep)
    assert torch.equal(out, tokens[:, keep])
    grad = torch.randn_like(out)
    (ours,) = torch.autograd.grad(out, tokens, grad)
    (theirs,) = torch.autograd.grad(tokens[:, keep], tokens, grad)
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)
    assert torch.equal(ours[:, 1], torch.zeros(2, 1100))


def test_gather_strided_input(kernels_on_cpu):
    base = torch.randn(2, 20, 3, 16)
    tokens = base[:, :, 1]  # (2, 20, 16) with row stride 48
    keep = torch.tensor([19, 0, 4])
    assert torch.equal(mx.gather_tokens(tokens, keep), tokens[:, keep])


def test_gather_validates():
    tokens = torch.randn(2, 10, 8)
    with pytest.raises(ValueError, match="int64"):
        mx.gather_tokens(tokens, torch.tensor([1, 2], dtype=torch.int32))
    with pytest.raises(ValueError, match=r"\[0, 10\)"):
        mx.gather_tokens(tokens, torch.tensor([1, 10]))
    with pytest.raises(ValueError, match="dtype"):
        mx.gather_tokens(tokens.double(), torch.tensor([1]))
    with pytest.raises(ValueError, match="keep: expected a .* int64 tensor, got list"):
        mx.gather_tokens(tokens, [1, 2])
    # Not a tensor at all: named, not "AttributeError: 'list' object has no attribute 'dtype'".
    with pytest.raises(TypeError, match="tokens: expected a torch.Tensor, got list"):
        mx.gather_tokens(tokens.tolist(), torch.tensor([1]))
    with pytest.raises(TypeError, match="spec_or_patches: expected a torch.Tensor, got list"):
        mx.mix_spectrograms(tokens.tolist(), MixWindows((0, 16), 16))


@pytest.mark.parametrize("kernels", [True, False], ids=["kernels", "reference"])
def test_gather_indices_are_checked_under_torch_compile(request, monkeypatch, kernels):
    """Regressions: traced, the kernel path skipped the index check and read past the tokens (a
    neighbour clip's token, or whatever memory followed); the PyTorch path left it to torch's
    indexing, which reads a negative index from the end ([-1, 2] gave the last token). The
    kernel's op checks on the host (ValueError), the reference by a device-side assertion."""
    if kernels:
        request.getfixturevalue("kernels_on_cpu")
    else:
        monkeypatch.setenv("SSLAM_KERNELS", "0")
    torch._dynamo.reset()
    compiled = torch.compile(mx.gather_tokens, backend="aot_eager", fullgraph=True)
    tokens = torch.randn(2, 5, 8)
    assert torch.equal(compiled(tokens, torch.tensor([4, 0])), tokens[:, [4, 0]])
    for keep in ([0, 7], [-1, 2]):
        with pytest.raises(ValueError if kernels else RuntimeError, match=r"indices must lie in \[0, 5\)"):
            compiled(tokens, torch.tensor(keep))


@pytest.mark.parametrize("shape", [(3, 1, 64, 16), (3, 32, 256)], ids=["spectrogram", "patches"])
def test_an_input_that_requires_grad_is_differentiated_through_the_reference(kernels_on_cpu, shape):
    """The mixing kernel has no backward: its output required grad, and a backward through it
    failed ("no autograd formula"), where on the CPU the same call was differentiable."""
    x = torch.randn(shape, requires_grad=True)
    windows = MixWindows((0, 32), 16)
    out = mx.mix_spectrograms(x, windows)
    grad_out = torch.randn_like(out)
    (grad,) = torch.autograd.grad(out, x, grad_out)
    reference = mx.mix_spectrograms_ref if x.dim() == 4 else mx.mix_patches_ref
    ref = reference(x, windows, *([] if x.dim() == 4 else [8]))
    assert torch.equal(out, ref)
    assert torch.equal(grad, torch.autograd.grad(ref, x, grad_out)[0])


def test_kernels_off_equals_reference(monkeypatch):
    monkeypatch.setenv("SSLAM_KERNELS", "0")
    spec = torch.randn(3, 1, 64, 16)
    windows = MixWindows((0, 32), 16)
    assert torch.equal(mx.mix_spectrograms(spec, windows), mx.mix_spectrograms_ref(spec, windows))
    tokens, keep = torch.randn(2, 9, 4), torch.tensor([0, 8])
    assert torch.equal(mx.gather_tokens(tokens, keep), tokens[:, keep])


def test_torch_compile_traces_the_ops(kernels_on_cpu):
    windows = MixWindows((16, 48), 16)
    keep = partner_keep_indices(windows, time_patches=4, freq_patches=8)

    def step(patches, tokens):
        mixed = mx.mix_spectrograms(patches, windows)
        return mixed, mx.gather_tokens(tokens, keep)

    patches = torch.randn(3, 32, 256)
    tokens = torch.randn(3, 32, 24, requires_grad=True)
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    mixed, gathered = compiled(patches, tokens)
    assert torch.equal(mixed, mx.mix_patches_ref(patches, windows))
    assert torch.equal(gathered, tokens[:, keep])
    gathered.sum().backward()
    expected = torch.zeros(3, 32, 24)
    expected[:, keep] = 1
    assert torch.equal(tokens.grad, expected)


# ----------------------------------------------------------------------------------------------
# CUDA: compiled kernels at the SSLAM shapes, including bf16
# ----------------------------------------------------------------------------------------------


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cuda_real_shapes(monkeypatch, dtype):
    monkeypatch.setenv("SSLAM_KERNELS", "1")
    monkeypatch.setattr(mx, "_new_buffer", lambda s, d, dev: torch.full(s, float("nan"),
                                                                         dtype=d, device=dev))
    windows = sample_windows(generator=torch.Generator().manual_seed(2))
    spec = torch.randn(12, 1, 1024, 128, device="cuda").to(dtype)
    assert torch.equal(mx.mix_spectrograms(spec, windows), mx.mix_spectrograms_ref(spec, windows))
    patches = torch.randn(12, 512, 256, device="cuda").to(dtype)
    assert torch.equal(mx.mix_spectrograms(patches, windows), mx.mix_patches_ref(patches, windows))
    keep = partner_keep_indices(windows).cuda()
    tokens = torch.randn(12, 513, 768, device="cuda", dtype=dtype)[:, 1:].requires_grad_()
    out = mx.gather_tokens(tokens, keep)
    assert out.shape == (12, 272, 768) and torch.equal(out, tokens[:, keep])
    grad = torch.randn_like(out)
    (ours,) = torch.autograd.grad(out, tokens, grad)
    (theirs,) = torch.autograd.grad(tokens[:, keep], tokens, grad)
    assert torch.equal(ours, theirs)
