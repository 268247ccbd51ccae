"""Edge cases of the Triton kernels (attention, fbank_patch, mixture, decoder) beyond the shapes of
tests/test_kernel_*.py: awkward head dims and lengths, empty dimensions, non-contiguous index
tensors, traced calls, non-finite inputs, odd channel counts and grids, and bad arguments that
must be refused with an error naming the argument rather than crash inside Triton or silently
compute something else.

Without a GPU every kernel runs under the Triton interpreter (fp32 / fp16 only: bf16 dots are
not emulated faithfully there), at small shapes.
"""

import importlib
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from conftest import interpret_kernels, poison_buffers  # noqa: E402
from sslam.kernels import decoder as dec  # noqa: E402
from sslam.kernels import mixture as mx  # noqa: E402
from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

from sslam.features import patchify, unpatchify  # noqa: E402
from sslam.mixing import MixWindows, mix_patches  # noqa: E402

attn = importlib.import_module("sslam.kernels.attention")
fp = importlib.import_module("sslam.kernels.fbank_patch")

from test_kernel_fbank_patch import normalised, waveforms_with_lengths  # noqa: E402

TOL = 1e-4  # fbank: max abs difference in normalised units


# ----------------------------------------------------------------------------------------------
# Fixtures and helpers
# ----------------------------------------------------------------------------------------------


@pytest.fixture
def attn_kernels(monkeypatch):
    """The attention kernels are autotuned wrappers built at import: they run in the interpreter
    only if TRITON_INTERPRET=1 was set before that import (conftest.py sets it)."""
    if not isinstance(attn._attention_fwd_kernel, InterpretedFunction):
        pytest.skip("attention kernels are compiled for the GPU here; the CUDA tests cover them")
    monkeypatch.setenv("SSLAM_KERNELS", "1")


@pytest.fixture
def fbank_kernels(monkeypatch):
    interpret_kernels(monkeypatch, fp, ["_fbank_patch_kernel"])


@pytest.fixture
def mix_kernels(monkeypatch):
    interpret_kernels(monkeypatch, mx, ["_mix_kernel", "_gather_kernel", "_scatter_kernel"])


@pytest.fixture
def dec_kernels(monkeypatch):
    interpret_kernels(monkeypatch, dec, ["_norm_act_fwd_kernel", "_norm_act_bwd_kernel"])


def max_err(a, b) -> float:
    if a.numel() == 0:
        return 0.0
    return (a.double() - b.double()).abs().max().item()


def attention_and_grads(fn, inputs, grad_out, **kwargs):
    out = fn(*inputs, **kwargs)
    return (out, *torch.autograd.grad(out, inputs, grad_out))


def assert_all_close(ours, ref, rel, atol=0.0, names=("out", "dq", "dk", "dv")):
    for name, a, r in zip(names, ours, ref):
        assert a.shape == r.shape and a.dtype == r.dtype, name
        assert not torch.isnan(a).any(), f"{name}: NaN"
        bound = rel * (r.double().abs().max().item() if r.numel() else 0.0) + atol
        assert max_err(a, r) <= bound, f"{name}: {max_err(a, r):.3e} > {bound:.3e}"


def cu_of(lengths):
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(torch.as_tensor(lengths, dtype=torch.int64), 0)
    return cu


def pad_value(norm=(-4.268, 4.569)):
    """A padding frame (0 in the log domain) after normalisation."""
    return (0.0 - norm[0]) / (2 * norm[1])


# ----------------------------------------------------------------------------------------------
# Attention
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "seqlen, head_dim",
    # Head dims 16 / 32 / 96 (96: padded to a 128-wide tile, masked) / 128 (the limit), and the
    # lengths around the single-block threshold (128) and one key block.
    [(1, 96), (2, 16), (17, 32), (127, 16), (128, 128), (129, 16), (200, 96)],
)
def test_attention_head_dims_and_lengths(attn_kernels, seqlen, head_dim):
    q, k, v = (torch.randn(1, seqlen, 2, head_dim, requires_grad=True) for _ in range(3))
    grad_out = torch.randn(1, seqlen, 2, head_dim)
    ours = attention_and_grads(attn.attention, (q, k, v), grad_out, scale=0.3)
    ref = attention_and_grads(attn.attention_ref, (q, k, v), grad_out, scale=0.3)
    # atol: at L = 1 the exact dq and dk are 0; both sides carry fp32 rounding noise there.
    assert_all_close(ours, ref, 1e-5, 1e-5)


@pytest.mark.parametrize("seqlen", [20, 150])  # single-block and general paths
def test_attention_mask_all_padded_and_only_last_key(attn_kernels, seqlen):
    """Entry 0: every key padded (zeros, zero gradients); entry 1: only the last key is valid
    (a one-hot softmax on the key of the last, partial, key block)."""
    mask = torch.ones(2, seqlen, dtype=torch.bool)
    mask[1, -1] = False
    q, k, v = (torch.randn(2, seqlen, 1, 32, requires_grad=True) for _ in range(3))
    grad_out = torch.randn(2, seqlen, 1, 32)
    ours = attention_and_grads(attn.attention, (q, k, v), grad_out, key_padding_mask=mask)
    ref = attention_and_grads(attn.attention_ref, (q, k, v), grad_out, key_padding_mask=mask)
    # atol: entry 1's exact dq and dk are 0 (a one-hot softmax), up to fp32 rounding noise.
    assert_all_close(ours, ref, 1e-5, 1e-5)
    out, dq, dk, dv = ours
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    assert torch.equal(out[1], v[1, -1:].detach().expand_as(out[1]))
    for g in (dq, dk, dv):
        assert torch.equal(g[0], torch.zeros_like(g[0]))


def test_attention_fp16_gradients_of_head_major_views(attn_kernels):
    """(B, H, L, Dh) storage transposed to (B, L, H, Dh) views, fp16, gradients into the base:
    within twice the error of PyTorch's own fp16 recipe against a float64 reference."""
    base32 = [torch.randn(2, 3, 37, 32) for _ in range(3)]
    grad_out = torch.randn(2, 37, 3, 32)

    def run(fn, dtype, **kw):
        base = [t.to(dtype).requires_grad_() for t in base32]
        views = [t.transpose(1, 2) for t in base]
        out = fn(*views, **kw)
        return (out, *torch.autograd.grad(out, base, grad_out.to(dtype)))

    ours = run(attn.attention, torch.float16)
    torch16 = run(attn.attention_ref, torch.float16, upcast=False)
    ref = run(attn.attention_ref, torch.float64)
    for name, a, t, r in zip(("out", "dq", "dk", "dv"), ours, torch16, ref):
        assert a.dtype == torch.float16
        assert max_err(a, r) <= 2 * max_err(t, r) + 1e-3, name


@pytest.mark.parametrize("shape", [(0, 5, 2, 16), (2, 0, 2, 16), (2, 5, 0, 16)])
def test_attention_empty_batch_length_or_heads(attn_kernels, shape):
    q, k, v = (torch.randn(shape, requires_grad=True) for _ in range(3))
    out = attn.attention(q, k, v)
    assert out.shape == shape and out.is_contiguous()
    for g in torch.autograd.grad(out, (q, k, v), torch.randn(shape)):
        assert g.shape == shape


def test_attention_head_dim_zero_is_a_clear_error(attn_kernels):
    q, k, v = (torch.randn(1, 3, 1, 0) for _ in range(3))
    with pytest.raises(ValueError, match="q: head dim"):
        attn.attention(q, k, v)


def test_varlen_zero_length_sequences_through_the_general_path(attn_kernels):
    """Empty sequences first, between and last, and a static max_seqlen above 128 that no
    sequence reaches (general path, whose extra query / key blocks exit at once)."""
    lengths = [0, 5, 0, 19, 1, 0]
    cu = cu_of(lengths)
    q, k, v = (torch.randn(int(cu[-1]), 2, 80, requires_grad=True) for _ in range(3))
    grad_out = torch.randn_like(q)
    ours = attention_and_grads(attn.attention_varlen, (q, k, v), grad_out, cu_seqlens=cu,
                               max_seqlen=140)
    ref = attention_and_grads(attn.attention_varlen_ref, (q, k, v), grad_out, cu_seqlens=cu,
                              max_seqlen=140)
    assert_all_close(ours, ref, 1e-5, 1e-6)


def test_varlen_non_contiguous_cu_seqlens(attn_kernels):
    """BUG: the kernels read cu_seqlens[b] at CU_SEQLENS + b, ignoring its stride, so a strided
    view (here every other entry of a buffer) gave sequence bounds from the wrong entries:
    wrong outputs, and reads past the packed rows."""
    lengths = [4, 7, 3]
    buffer = torch.full((2 * (len(lengths) + 1),), 3, dtype=torch.int32)
    buffer[::2] = cu_of(lengths)
    cu = buffer[::2]
    assert not cu.is_contiguous()
    q, k, v = (torch.randn(14, 2, 32, requires_grad=True) for _ in range(3))
    grad_out = torch.randn_like(q)
    ours = attention_and_grads(attn.attention_varlen, (q, k, v), grad_out, cu_seqlens=cu,
                               max_seqlen=7)
    ref = attention_and_grads(attn.attention_varlen_ref, (q, k, v), grad_out,
                              cu_seqlens=cu.contiguous(), max_seqlen=7)
    assert_all_close(ours, ref, 1e-5, 1e-6)


@pytest.mark.parametrize("varlen", [True, False])
def test_the_ops_called_directly_accept_views(attn_kernels, varlen):
    """torch.ops.sslam.attention_forward / _backward with a strided cu_seqlens, a lse that is not
    contiguous and an out with a strided last dim give what contiguous arguments give."""
    ops, scale = torch.ops.sslam, 32 ** -0.5
    if varlen:
        q, k, v = (torch.randn(14, 2, 32) for _ in range(3))
        cu = cu_of([4, 7, 3])
        cu_view = torch.stack([cu, torch.zeros_like(cu)], 1)[:, 0]
        assert not cu_view.is_contiguous()
    else:
        q, k, v = (torch.randn(2, 9, 2, 32) for _ in range(3))
        cu = cu_view = None
    out, lse = ops.attention_forward(q, k, v, None, cu, 9, scale)
    out_view, lse_view = ops.attention_forward(q, k, v, None, cu_view, 9, scale)
    assert torch.equal(out_view, out) and torch.equal(lse_view, lse)
    grad_out = torch.randn_like(out)
    want = ops.attention_backward(grad_out, q, k, v, out, lse, None, cu, 9, scale)
    lse_view = lse.mT.contiguous().mT  # same values, other strides
    out_view = torch.stack([out, out], -1)[..., 0]
    assert not lse_view.is_contiguous() and out_view.stride(-1) != 1
    got = ops.attention_backward(grad_out, q, k, v, out_view, lse_view, None, cu_view, 9, scale)
    assert all(torch.equal(a, b) for a, b in zip(got, want))


# ----------------------------------------------------------------------------------------------
# fbank_patch
# ----------------------------------------------------------------------------------------------


def truth(waves, lens, target):
    """float64 features of each clip (patch layout), padding included."""
    rows = []
    for clip, n in zip(waves, lens.tolist()):
        x = normalised(fp.logmel_float64(clip[:n])[:target])
        pad = torch.full((target - x.shape[0], 128), pad_value(), dtype=x.dtype)
        rows.append(torch.cat([x, pad]).float())
    return patchify(torch.stack(rows)[:, None])


@pytest.mark.parametrize(
    "lengths, target, lens_dtype",
    [
        # Prime batch; exactly one frame (400), 401; 12 frames (not a multiple of 16); a clip
        # longer than the target (cropped); int32 lengths.
        ([400, 401, 2160, 9000, 3333], 48, torch.int32),
        # A batch of one, 16 frames only, much longer than the target.
        ([9000], 16, torch.int64),
        # A target that is not a multiple of the interpreter's 32-frame tile.
        ([12000, 5000], 80, torch.int64),
    ],
)
def test_fbank_lengths_targets_and_batches(fbank_kernels, lengths, target, lens_dtype):
    waves, lens = waveforms_with_lengths(lengths)
    out = fp.fbank_patch(waves, lens.to(lens_dtype), target_length=target)
    ref = fp.fbank_patch_ref(waves, lens, target_length=target)
    assert out.shape == ref.shape == (len(lengths), target // 16 * 8, 256)
    assert (out - truth(waves, lens, target)).abs().max() <= TOL
    assert (out - ref).abs().max() <= TOL


def test_fbank_mixing_windows_at_both_edges_prime_batch(fbank_kernels):
    """Windows at frame 0 and ending exactly at target_length, five clips (the pairing wraps
    around an odd batch), one of them a single frame: mixtures equal mix_patches bit for bit."""
    target = 48
    waves, lens = waveforms_with_lengths([3000, 7777, 400, 9000, 5000])
    windows = MixWindows(starts=(0, 32), width=16)
    out = fp.fbank_patch(waves, lens, target_length=target, mix=windows)
    assert out.shape == (10, 24, 256)
    assert torch.equal(out[5:], mix_patches(out[:5], windows))
    ref = fp.fbank_patch_ref(waves, lens, target_length=target, mix=windows)
    assert (out - ref).abs().max() <= TOL


def test_fbank_broadcast_rows(fbank_kernels):
    """A (B, N) view with row stride 0 (one clip repeated) is read in place: equal rows."""
    clip = 0.2 * torch.randn(1, 4000)
    out = fp.fbank_patch(clip.expand(3, 4000), torch.tensor([4000, 2500, 4000]), target_length=32)
    single = fp.fbank_patch(clip, target_length=32)
    assert torch.equal(out[0], single[0]) and torch.equal(out[2], single[0])
    ref = fp.fbank_patch_ref(clip.expand(3, 4000).contiguous(), torch.tensor([4000, 2500, 4000]),
                             target_length=32)
    assert (out - ref).abs().max() <= TOL


@pytest.mark.parametrize("num_samples", [3000, 300])
def test_fbank_traced_clip_shorter_than_a_frame_is_padding(fbank_kernels, num_samples):
    """BUG: under torch.compile the kernel counted frames as (length - 400) // 160 + 1 with
    Triton's truncating division, so lengths 241..399 gave 1 frame instead of 0: a frame
    computed from samples past the clip's end (past the row when N < 400) instead of the
    documented padding."""
    waves = 0.3 * torch.randn(2, num_samples)
    lens = torch.tensor([300, min(num_samples, 250)])
    call = torch.compile(lambda w, n: fp.fbank_patch(w, n, target_length=32), backend="aot_eager",
                         fullgraph=True)
    out = call(waves, lens)
    assert (out - pad_value()).abs().max() <= 1e-6  # float32 rounding of the normalisation


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy's NaN warnings in the interpreter
def test_fbank_non_finite_samples_are_not_hidden(fbank_kernels):
    """BUG: a NaN (or inf) sample came out as the log floor, i.e. silence, because the floor's
    tl.maximum drops NaN; the reference gives NaN. The NaN must show in the frames that hold
    it (the reference spreads it over the whole clip through the clip mean), never where the
    reference is finite, and the fused mixtures must still equal mix_patches bit for bit."""
    target = 48
    waves, lens = waveforms_with_lengths([7000, 6000, 5000])
    waves[0, 3000] = float("nan")
    waves[1, 100] = float("inf")
    windows = MixWindows(starts=(0, 32), width=16)
    out = fp.fbank_patch(waves, lens, target_length=target, mix=windows)
    ref = fp.fbank_patch_ref(waves, lens, target_length=target, mix=windows)
    frames = unpatchify(out)[:, 0]
    for clip, sample in ((0, 3000), (1, 100)):
        first, last = max(0, (sample - 400) // 160 + 1), sample // 160
        assert frames[clip, first:last + 1].isnan().all(), clip
    assert not (out.isnan() & ~ref.isnan()).any()
    finite = ~ref.isnan()
    assert (out[finite] - ref[finite]).abs().max() <= TOL
    mixed = mix_patches(out[:3], windows)
    assert torch.equal(out[3:].isnan(), mixed.isnan())
    assert torch.equal(out[3:].nan_to_num(), mixed.nan_to_num())


def test_fbank_non_integer_target_length_is_named(fbank_kernels):
    waves = 0.1 * torch.randn(1, 3000)
    with pytest.raises(ValueError, match="target_length"):
        fp.fbank_patch(waves, target_length=32.0)


# ----------------------------------------------------------------------------------------------
# Mixture and gather
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_mix_spectrograms_several_blocks_and_touching_windows(mix_kernels, dtype):
    """Clips larger than one program's block (300 x 13 elements), touching windows, a batch of
    two, an input that is a transposed view, infinities and signed zeros: bit-exact."""
    spec = torch.randn(2, 1, 13, 300).transpose(2, 3).to(dtype)
    spec[0, 0, 7, :5] = float("-inf")
    spec[1, 0, 7, :3] = float("inf")
    spec[0, 0, 100] = -0.0
    windows = MixWindows(starts=(100, 150), width=50)
    out = mx.mix_spectrograms(spec, windows)
    ref = mx.mix_spectrograms_ref(spec, windows)
    bits = torch.int32 if dtype == torch.float32 else torch.int16
    assert torch.equal(out.view(bits), ref.view(bits))


def test_mix_spectrograms_rejects_several_channels(mix_kernels):
    """BUG: a (B, C > 1, T, F) input was accepted, but the kernel took row c * T + t for frame
    c * T + t, so every channel after the first was mixed with the wrong frame mask."""
    spec = torch.randn(3, 2, 20, 5)
    with pytest.raises(ValueError, match=r"spec_or_patches: expected \(B, 1, T, F\)"):
        mx.mix_spectrograms(spec, MixWindows(starts=(3, 10), width=4))


def test_mix_rejects_zero_freq_patches(mix_kernels):
    with pytest.raises(ValueError, match="freq_patches"):
        mx.mix_spectrograms(torch.randn(2, 8, 256), MixWindows((0, 16), 16), freq_patches=0)


def test_gather_non_contiguous_keep(mix_kernels, monkeypatch):
    """BUG: the gather kernel read keep[k] at KEEP + k, ignoring its stride, so a strided index
    view gathered the wrong tokens (the checked values were not the ones read)."""
    poison_buffers(monkeypatch, mx)
    tokens = torch.randn(2, 9, 20, requires_grad=True)
    keep = torch.tensor([1, 7, 2, 7, 8, 0])[::2]  # [1, 2, 8]
    assert not keep.is_contiguous()
    out = mx.gather_tokens(tokens, keep)
    assert torch.equal(out, tokens[:, keep])
    grad = torch.randn_like(out)
    (ours,) = torch.autograd.grad(out, tokens, grad)
    (theirs,) = torch.autograd.grad(tokens[:, keep], tokens, grad)
    assert torch.equal(ours, theirs)


def test_gather_zero_width_tokens(mix_kernels):
    """BUG: D = 0 divided by zero in the host code (block sizes) instead of returning empty."""
    tokens = torch.randn(2, 5, 0, requires_grad=True)
    keep = torch.tensor([1, 3, 3])
    out = mx.gather_tokens(tokens, keep)
    assert out.shape == (2, 3, 0)
    (grad,) = torch.autograd.grad(out, tokens, torch.randn(2, 3, 0))
    assert grad.shape == (2, 5, 0)


def test_gather_broadcast_batch_and_fp16_repeats(mix_kernels):
    """Tokens with batch stride 0 (expanded), and fp16 gradients of repeated indices: each
    token's gradient is the (fp32-summed) total of its copies'."""
    base = torch.randn(1, 7, 5)
    keep = torch.tensor([0, 6, 2])
    assert torch.equal(mx.gather_tokens(base.expand(3, 7, 5), keep), base.expand(3, 7, 5)[:, keep])
    tokens = torch.randn(2, 9, 33, dtype=torch.float16, requires_grad=True)
    keep = torch.tensor([3, 3, 0, 8, 3])
    grad = torch.randn(2, 5, 33, dtype=torch.float16)
    (ours,) = torch.autograd.grad(mx.gather_tokens(tokens, keep), tokens, grad)
    expected = torch.zeros(2, 9, 33)
    expected.index_add_(1, keep, grad.float())
    assert torch.equal(ours, expected.half())


# ----------------------------------------------------------------------------------------------
# Decoder
# ----------------------------------------------------------------------------------------------


def decoder_weights(c_in, c_out, groups, kernel=3):
    w = torch.randn(c_out, c_in // groups, kernel, kernel) * (c_in // groups * kernel**2) ** -0.5
    return w, torch.randn(c_out) * 0.1


@pytest.mark.parametrize(
    "grid, c_in, c_out, groups, kernel, residual",
    [
        ((5, 3), 40, 40, 4, 3, True),  # channels not a power of two
        ((1, 6), 96, 96, 8, 5, True),  # one time row, a 5x5 kernel
        ((6, 1), 24, 200, 8, 1, False),  # one frequency column, 1x1 conv, 200 channels out
        ((1, 1), 16, 16, 1, 3, True),  # a single token
    ],
)
def test_decoder_layer_odd_channels_and_grids(dec_kernels, grid, c_in, c_out, groups, kernel,
                                              residual):
    n = grid[0] * grid[1]
    x = torch.randn(2, n, c_in)
    w, b = decoder_weights(c_in, c_out, groups, kernel)
    g = torch.randn(2, n, c_out)

    def run(fn):
        inputs = [t.clone().requires_grad_() for t in (x, w, b)]
        out = fn(inputs[0], grid, inputs[1], inputs[2], groups=groups, residual=residual)
        out.backward(g)
        return [out.detach()] + [t.grad for t in inputs]

    for name, a, r in zip(("out", "dx", "dw", "db"), run(dec.decoder_layer),
                          run(dec.decoder_layer_ref)):
        assert max_err(a, r) <= 2e-5 * (1 + r.abs().max().item()), name


def test_decoder_norm_act_fp16_mixed_residual_and_tiny_rows(dec_kernels):
    """fp16 y with an fp32 residual (gradient kept in fp32), 1-D input, one or three channels."""
    y = (torch.randn(3, 7, 40) * 3 + 1).half().requires_grad_()
    res = torch.randn(3, 7, 40, requires_grad=True)
    g = torch.randn(3, 7, 40).half()
    out = dec.decoder_norm_act(y, res)
    dy, dres = torch.autograd.grad(out, (y, res), g)
    y64, res64 = y.detach().double().requires_grad_(), res.detach().double().requires_grad_()
    ref = dec.decoder_norm_act_ref(y64, res64)
    rdy, rdres = torch.autograd.grad(ref, (y64, res64), g.double())
    assert out.dtype == dy.dtype == torch.float16 and dres.dtype == torch.float32
    assert max_err(out, ref) <= 2e-3 * (1 + ref.abs().max().item())
    assert max_err(dy, rdy) <= 2e-3 * (1 + rdy.abs().max().item())
    assert torch.equal(dres, g.float())
    for shape in ((40,), (5, 1), (5, 3)):
        y = torch.randn(shape) * 2
        assert max_err(dec.decoder_norm_act(y), dec.decoder_norm_act_ref(y.double())) <= 1e-5


def test_decoder_layer_rejects_even_or_non_square_kernels(dec_kernels):
    """BUG: an even kernel (the contract says odd, 'same' padding) changed the conv's output
    grid; the kernel path then read it as n tokens of the wrong width and returned garbage
    (without residual) or blamed the residual's shape."""
    x = torch.randn(2, 20, 16)
    for kernel_shape in ((4, 4), (3, 5)):
        w = torch.randn(16, 4, *kernel_shape)
        for residual in (True, False):
            with pytest.raises(ValueError, match="weight"):
                dec.decoder_layer(x, (5, 4), w, torch.randn(16), groups=4, residual=residual)


def test_decoder_bad_arguments_are_named(dec_kernels):
    """Residual on another device: refused before Triton sees a pointer it cannot read; tokens
    that are not (B, N, C), or no channels: a message naming the argument instead of an
    unpacking or reshape error."""
    y = torch.randn(3, 8)
    with pytest.raises(ValueError, match="residual: device"):
        dec.decoder_norm_act(y, torch.empty(3, 8, device="meta"))
    w, b = decoder_weights(8, 8, 4)
    with pytest.raises(ValueError, match=r"x: expected \(B, N, C\)"):
        dec.decoder_layer(torch.randn(6, 8), (3, 2), w, b, groups=4)
    with pytest.raises(ValueError, match="y: expected"):
        dec.decoder_norm_act(torch.tensor(1.0))
    # No channels: refused alike on both paths (the kernel's reshape could not infer the rows).
    with pytest.raises(ValueError, match="C >= 1"):
        dec.decoder_norm_act(torch.randn(3, 0))


def test_decoder_eps_is_a_number_on_both_paths(dec_kernels, monkeypatch):
    """A numpy float eps gives the Python float's result on the kernel path as on the reference
    (Triton took it for an unknown type); a tensor or a negative eps is refused by name."""
    import numpy as np

    y, x = torch.randn(3, 8), torch.randn(2, 6, 8)
    w, b = decoder_weights(8, 8, 4)
    for kernels in ("1", "0"):
        monkeypatch.setenv("SSLAM_KERNELS", kernels)
        assert torch.equal(dec.decoder_norm_act(y, eps=np.float32(1e-3)),
                           dec.decoder_norm_act(y, eps=float(np.float32(1e-3))))
        assert torch.equal(dec.decoder_layer(x, (3, 2), w, b, groups=4, eps=np.float64(1e-3)),
                           dec.decoder_layer(x, (3, 2), w, b, groups=4, eps=1e-3))
        for eps in (torch.tensor(1e-5), -1.0, float("nan"), True, "1e-5"):
            with pytest.raises(ValueError, match="eps="):
                dec.decoder_norm_act(y, eps=eps)
            with pytest.raises(ValueError, match="eps="):
                dec.decoder_layer(x, (3, 2), w, b, groups=4, eps=eps)


def test_arguments_of_the_wrong_type_are_named():
    """A tuple or None for the windows, a float for groups: TypeErrors naming them (they used to
    be an AttributeError on a missing ``.width`` / ``.end`` and a reshape error)."""
    from sslam.kernels import grouped_conv as gc

    for windows in ((0, 16), None):
        with pytest.raises(TypeError, match=r"windows: expected a MixWindows .*got"):
            mx.mix_spectrograms(torch.randn(2, 1, 32, 4), windows)
        with pytest.raises(TypeError, match=r"windows: expected a MixWindows"):
            mx.mix_spectrograms(torch.randn(2, 16, 256), windows, freq_patches=8)
        with pytest.raises(TypeError, match=r"windows: expected a MixWindows"):
            fp.fbank_patch(torch.randn(2, 1000), target_length=32, mix=windows or (0, 16))
    with pytest.raises(TypeError, match=r"groups=2.0: expected a positive int"):
        gc.grouped_conv_tokens(torch.randn(1, 6, 4), (2, 3), torch.randn(4, 2, 3, 3), None, groups=2.0)


# ----------------------------------------------------------------------------------------------
# Every public kernel under fake tensors
# ----------------------------------------------------------------------------------------------


def _public_kernel_calls():
    """(name, call) of every public kernel function on small CPU inputs made when called."""
    import sslam.kernels as K

    r = torch.randn
    return [
        ("attention", lambda: K.attention(r(2, 9, 2, 16), r(2, 9, 2, 16), r(2, 9, 2, 16))),
        ("attention_varlen", lambda: K.attention_varlen(r(9, 2, 16), r(9, 2, 16), r(9, 2, 16),
                                                        torch.tensor([0, 4, 9], dtype=torch.int32), 5)),
        ("fbank_patch", lambda: K.fbank_patch(r(2, 4000), torch.tensor([4000, 3000]), target_length=16)),
        ("mix_spectrograms", lambda: K.mix_spectrograms(r(2, 1, 64, 128), MixWindows(starts=(0, 32), width=16))),
        ("gather_tokens", lambda: K.gather_tokens(r(2, 12, 8), torch.tensor([0, 5, 11]))),
        ("decoder_norm_act", lambda: K.decoder_norm_act(r(3, 12))),
        ("grouped_conv_tokens", lambda: K.grouped_conv_tokens(r(2, 15, 6), (3, 5), r(6, 3, 3, 3), groups=2)),
        ("decoder_layer", lambda: K.decoder_layer(r(2, 15, 6), (3, 5), r(6, 3, 3, 3), None, groups=2)),
        ("regression_sums", lambda: K.regression_sums(r(4, 6, 8), r(2, 6, 8), torch.rand(4, 6) > 0.5, 2)[0]),
    ]


@pytest.mark.parametrize("name", [name for name, _ in _public_kernel_calls()])
def test_kernel_path_under_fake_tensors_gives_the_reference_shape(name, monkeypatch):
    """Under a dispatch mode (FakeTensorMode, as export and make_fx use) the kernel path calls
    its custom op, whose fake implementation gives the reference's shape and dtype; it neither
    launches Triton on fake tensors nor reads their values on the host."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    call = dict(_public_kernel_calls())[name]
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("SSLAM_KERNELS", "0")
    expected = call()
    monkeypatch.setenv("SSLAM_KERNELS", "1")
    with FakeTensorMode():
        out = call()
    assert (out.shape, out.dtype) == (expected.shape, expected.dtype)


def test_fbank_patch_traced_checks_the_lengths_type_as_eager(fbank_kernels):
    """Under torch.compile the length values cannot be checked, but their type can: float
    lengths are refused as in eager mode (not truncated), and a list is taken as in eager mode."""
    waves = torch.randn(2, 5000)
    call = lambda w, lengths: fp.fbank_patch(w, lengths, target_length=16)  # noqa: E731
    compiled = torch.compile(call, backend="eager")
    for fn in (call, compiled):
        torch._dynamo.reset()
        with pytest.raises(ValueError, match="lengths: expected integer sample counts, got torch.float32"):
            fn(waves, torch.tensor([4999.7, 4000.0]))
    expected = call(waves, torch.tensor([5000, 4000]))
    torch._dynamo.reset()
    assert torch.equal(compiled(waves, [5000, 4000]), expected)


def test_encoder_with_kept_patches_runs_under_fake_tensors(monkeypatch):
    """The encoder's check of kept indices reads their values on the host only where they are
    real: under FakeTensorMode (export, make_fx) it checks shapes, as the kernels do."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from sslam.model import Encoder, EncoderConfig

    torch.manual_seed(0)
    model = Encoder(EncoderConfig(embed_dim=32, depth=1, num_heads=2, max_length=16)).eval()
    keep = torch.stack([torch.randperm(128)[:25] for _ in range(2)])
    spec = torch.randn(2, 1, 256, 128)
    expected = model(spec, keep=keep).x.shape
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        out = model(mode.from_tensor(spec), keep=mode.from_tensor(keep))
    assert out.x.shape == expected


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU runs the kernels without the interpreter")
def test_interpreter_switched_on_after_import_is_refused_by_name():
    """Triton reads TRITON_INTERPRET when the kernels are defined, at import: set later, the
    kernels are still built for a GPU, and Triton's own error ("0 active drivers") says nothing
    of why. The call is refused with the reason and the fix."""
    import subprocess
    import sys

    script = (
        "import os, torch\n"
        "import sslam.kernels as K\n"
        "os.environ['TRITON_INTERPRET'] = '1'\n"
        "x = torch.randn(1, 1, 8, 64)\n"
        "K.attention(x, x, x)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {"SSLAM_KERNELS": "1"}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert "TRITON_INTERPRET=1 was set after sslam.kernels was imported" in done.stderr, done.stderr[-2000:]


@pytest.mark.parametrize("value, on", [("1", True), ("true", True), ("On", True), ("YES", True), ("y", True), ("0", False),
                                       ("false", False), ("2", False), ("", False)])
def test_the_interpreter_flag_is_read_as_triton_reads_it(monkeypatch, value, on):
    """Triton takes 1, true, on and yes in any case: the switch must agree (with 'true' the
    kernels were interpreted, but SSLAM_KERNELS=1 on CPU tensors said TRITON_INTERPRET was unset)."""
    from sslam.kernels import switch
    from triton import knobs

    monkeypatch.setenv("TRITON_INTERPRET", value)
    assert switch.interpreting() == knobs.runtime.interpret == on
