"""Tests of kernels/decoder.py: the decoder layer's fused LayerNorm + GELU + residual, and whole
layers and decoders on token-major tensors.

Without a GPU the kernels run under the Triton interpreter (fp32 and fp16); on a GPU machine the
CUDA tests replace them and add bf16 and the real decoder shapes.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from conftest import interpret_kernels, poison_buffers, requires_cuda  # noqa: E402
from sslam.kernels import decoder as dec  # noqa: E402
from sslam.kernels import grouped_conv  # noqa: E402

from sslam.pretrain import CNNDecoder, DecoderConfig  # noqa: E402

KERNELS = ("_norm_act_fwd_kernel", "_norm_act_bwd_kernel")
TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


@pytest.fixture
def kernels_on_cpu(monkeypatch):
    interpret_kernels(monkeypatch, dec, KERNELS)


@pytest.fixture
def poisoned(monkeypatch):
    poison_buffers(monkeypatch, dec)
    poison_buffers(monkeypatch, grouped_conv)


def grads(fn, inputs, grad_out):
    """(output, gradients of ``inputs``) of fn(*inputs) for the upstream gradient grad_out."""
    inputs = [t.detach().clone().requires_grad_(True) for t in inputs]
    out = fn(*inputs)
    out.backward(grad_out)
    return out.detach(), [t.grad for t in inputs]


def assert_close(a, b, tol, what):
    err = (a.float() - b.float()).abs().max().item()
    assert err <= tol * (1 + b.float().abs().max().item()), (what, err)


def check_norm_act(shape, dtype, residual: bool, device="cpu"):
    y = (torch.randn(shape, device=device) * 3 + 1).to(dtype)
    res = torch.randn(shape, device=device).to(dtype) if residual else None
    g = torch.randn(shape, device=device).to(dtype)
    inputs = [y] + ([res] if residual else [])
    out, got = grads(lambda *t: dec.decoder_norm_act(*t), inputs, g)
    # The reference in fp64: the kernel's fp32 statistics must be as good as the reference's.
    ref_out, ref = grads(lambda *t: dec.decoder_norm_act_ref(*(x.double() for x in t)), inputs, g.double())
    assert out.dtype == dtype and out.shape == y.shape
    assert_close(out, ref_out, TOL[dtype], "out")
    assert_close(got[0], ref[0], TOL[dtype], "dy")
    if residual:
        assert got[1].dtype == dtype
        assert_close(got[1], ref[1], TOL[dtype], "dresidual")


def test_the_reference_computes_float64_inputs_in_float64():
    """The kernels' tests compare with the reference on float64 inputs as the exact answer: it
    computed them in float32 (a LayerNorm of 1e4 + noise came out ~4e-4 off)."""
    y, residual = torch.randn(5, 48, dtype=torch.float64) * 3 + 1e4, torch.randn(5, 48, dtype=torch.float64)
    expected = torch.nn.functional.gelu(torch.nn.functional.layer_norm(y, (48,), eps=1e-5)) + residual
    assert torch.equal(dec.decoder_norm_act_ref(y, residual), expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("residual", [True, False])
def test_norm_act_matches_reference(kernels_on_cpu, poisoned, dtype, residual):
    check_norm_act((3, 37, 100), dtype, residual)  # odd rows, channels not a power of two


def test_norm_act_one_row_and_wide_rows(kernels_on_cpu, poisoned):
    check_norm_act((1, 48), torch.float32, True)
    check_norm_act((5, 1000), torch.float32, True)


def decoder_weights(c_in, c_out, groups, kernel=3, device="cpu"):
    w = torch.randn(c_out, c_in // groups, kernel, kernel, device=device) * (c_in // groups * kernel**2) ** -0.5
    return w, torch.randn(c_out, device=device) * 0.1


@pytest.mark.parametrize("residual", [True, False])
def test_decoder_layer_matches_reference(kernels_on_cpu, poisoned, residual):
    grid, c_in, c_out, groups = (7, 4), 24, 24 if residual else 16, 4
    x = torch.randn(2, 28, c_in)
    w, b = decoder_weights(c_in, c_out, groups)
    g = torch.randn(2, 28, c_out)
    call = lambda fn: lambda x, w, b: fn(x, grid, w, b, groups=groups, residual=residual)  # noqa: E731
    out, got = grads(call(dec.decoder_layer), [x, w, b], g)
    ref_out, ref = grads(call(dec.decoder_layer_ref), [x, w, b], g)
    assert_close(out, ref_out, 2e-5, "out")
    for name, a, r in zip(("dx", "dweight", "dbias"), got, ref):
        assert_close(a, r, 2e-5, name)


@pytest.mark.parametrize("embed_dim", [32, 48])
def test_cnn_decoder_token_major_path_equals_reference(monkeypatch, kernels_on_cpu, embed_dim):
    """The whole decoder (first layer without residual when the widths differ) and its gradients."""
    decoder = CNNDecoder(embed_dim, DecoderConfig(dim=32, groups=4, kernel=3, layers=3))
    tokens = torch.randn(3, 40, embed_dim)
    g = torch.randn(3, 40, embed_dim)

    def run():
        decoder.zero_grad()
        out, (dtokens,) = grads(lambda t: decoder(t, (10, 4)), [tokens], g)
        return out, dtokens, [p.grad.clone() for p in decoder.parameters()]

    out, dtokens, dparams = run()
    monkeypatch.setenv("SSLAM_KERNELS", "0")
    ref_out, ref_dtokens, ref_dparams = run()
    assert_close(out, ref_out, 2e-5, "out")
    assert_close(dtokens, ref_dtokens, 2e-5, "dtokens")
    for a, r in zip(dparams, ref_dparams):
        assert_close(a, r, 2e-5, "dparam")


def test_decoder_traces_with_dynamic_shapes(kernels_on_cpu):
    """Regression: torch.compile(dynamic=True, fullgraph=True) failed on the epsilon check
    (math.isfinite of the symbolic float dynamo makes of ``eps``)."""
    decoder = CNNDecoder(32, DecoderConfig(dim=32, groups=4, kernel=3, layers=2))
    tokens = torch.randn(2, 15, 32)
    compiled = torch.compile(lambda t, eps: dec.decoder_norm_act(decoder(t, (5, 3)), eps=eps), backend="aot_eager",
                             dynamic=True, fullgraph=True)
    for eps in (1e-5, 1e-3):
        assert_close(compiled(tokens, eps), dec.decoder_norm_act(decoder(tokens, (5, 3)), eps=eps), 1e-6, "out")


def test_custom_op_passes_opcheck(kernels_on_cpu):
    y, res = torch.randn(9, 40), torch.randn(9, 40)
    torch.library.opcheck(torch.ops.sslam.decoder_norm_act.default, (y, res, 1e-5),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


def test_bad_arguments_are_named():
    y = torch.randn(2, 6, 8)
    with pytest.raises(ValueError, match="residual"):
        dec.decoder_norm_act(y, torch.randn(2, 6, 4))
    with pytest.raises(TypeError, match="y: dtype"):
        dec.decoder_norm_act(y.long())
    for eps in (float("nan"), float("inf"), -1e-5, True, "1e-5"):
        with pytest.raises(ValueError, match=r"eps=.*: expected a finite number >= 0"):
            dec.decoder_norm_act(y, eps=eps)
    w, b = decoder_weights(8, 8, 2)
    with pytest.raises(ValueError, match="grid"):
        dec.decoder_layer(y, (4, 2), w, b, groups=2)
    with pytest.raises(ValueError, match="residual needs"):
        dec.decoder_layer(y, (3, 2), *decoder_weights(8, 4, 2), groups=2)


# ---- CUDA: compiled kernels, bf16 and the ViT-B decoder shape ----------------------------------


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cuda_norm_act(poisoned, dtype):
    check_norm_act((192, 512, 768), dtype, True, device="cuda")
    check_norm_act((7, 33, 100), dtype, False, device="cuda")


@requires_cuda
def test_cuda_decoder_matches_reference_under_autocast(monkeypatch):
    decoder = CNNDecoder(768).cuda()
    tokens = torch.randn(12, 512, 768, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = decoder(tokens, (64, 8))
        monkeypatch.setenv("SSLAM_KERNELS", "0")
        ref = decoder(tokens, (64, 8))
    assert_close(out, ref, 3e-2, "out")


def test_norm_act_double_backward_is_refused(kernels_on_cpu):
    y = torch.randn(2, 6, 8, requires_grad=True)
    (dy,) = torch.autograd.grad(dec.decoder_norm_act(y).square().sum(), y, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):  # not a silently missing term
        dy.sum().backward()


def test_the_op_called_directly_accepts_views(kernels_on_cpu):
    """torch.ops.sslam.decoder_norm_act with transposed rows gives the contiguous result (the
    kernel used to index them as contiguous: off by up to 2)."""
    y, res = torch.randn(9, 40), torch.randn(9, 40)
    ty, tres = y.t().contiguous().t(), res.t().contiguous().t()
    for got, want in zip(torch.ops.sslam.decoder_norm_act(ty, tres, 1e-5), torch.ops.sslam.decoder_norm_act(y, res, 1e-5)):
        assert torch.equal(got, want)
    _, mean, rstd = torch.ops.sslam.decoder_norm_act(y, res, 1e-5)
    grad = torch.randn(9, 40)
    assert torch.equal(torch.ops.sslam.decoder_norm_act_backward(grad.t().contiguous().t(), ty, mean, rstd),
                       torch.ops.sslam.decoder_norm_act_backward(grad, y, mean, rstd))
