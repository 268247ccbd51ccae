"""Tests of kernels/grouped_conv.py: the decoder's grouped 'same' conv on token-major grids,
forward and every gradient, against F.conv2d in float64.

Without a GPU the kernels run under the Triton interpreter (fp32 and fp16); on a GPU machine the
CUDA tests replace them and add bf16 and the ViT-B decoder's shape.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from conftest import interpret_kernels, poison_buffers, requires_cuda  # noqa: E402
from sslam.kernels import grouped_conv as gc  # noqa: E402

KERNELS = ("_conv_fwd_kernel", "_conv_wgrad_kernel")
TOL = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}

# (batch, grid, C_in, C_out, groups, kernel, bias)
CASES = [
    (2, (5, 3), 24, 24, 3, 3, True),  # groups of 8: masked channel tiles; every grid edge
    (1, (4, 4), 32, 48, 1, 1, False),  # 1x1, one group, several output-channel blocks
    (3, (6, 3), 12, 20, 2, 5, True),  # 5x5, wider than the frequency axis; C_in != C_out
    (2, (1, 7), 16, 16, 16, 3, True),  # depthwise, a single time step
]


@pytest.fixture
def kernels_on_cpu(monkeypatch):
    interpret_kernels(monkeypatch, gc, KERNELS)


@pytest.fixture
def poisoned(monkeypatch):
    poison_buffers(monkeypatch, gc)


def assert_close(a, b, tol, what):
    assert a.shape == b.shape, (what, a.shape, b.shape)
    if b.numel() == 0:
        return
    err = (a.double() - b.double()).abs().max().item()
    assert err <= tol * (1 + b.double().abs().max().item()), (what, err)


def check_conv(batch, grid, c_in, c_out, groups, kernel, bias, dtype, device="cpu"):
    """Output and (dx, dweight, dbias) of the kernels against F.conv2d in float64."""
    n = grid[0] * grid[1]
    x = torch.randn(batch, n, c_in, device=device).to(dtype)
    w = (torch.randn(c_out, c_in // groups, kernel, kernel, device=device) * (c_in // groups * kernel**2) ** -0.5).to(dtype)
    b = (torch.randn(c_out, device=device) * 0.1).to(dtype) if bias else None
    g = torch.randn(batch, n, c_out, device=device).to(dtype)

    def run(fn, tensors):
        leaves = [t.detach().clone().requires_grad_(True) for t in tensors]
        out = fn(leaves[0], grid, leaves[1], leaves[2] if bias else None, groups=groups)
        out.backward(g.to(out.dtype))
        return out.detach(), [t.grad for t in leaves]

    inputs = [x, w] + ([b] if bias else [])
    out, got = run(gc.grouped_conv_tokens, inputs)
    ref_out, ref = run(gc.grouped_conv_tokens_ref, [t.double() for t in inputs])
    assert out.dtype == dtype
    assert_close(out, ref_out, TOL[dtype], "out")
    for name, a, r in zip(("dx", "dweight", "dbias"), got, ref):
        assert a.dtype == dtype, name
        assert_close(a, r, TOL[dtype], name)


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}x{c[1][0]}x{c[1][1]}x{c[2]}-{c[3]}g{c[4]}k{c[5]}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_matches_conv2d(kernels_on_cpu, poisoned, case, dtype):
    check_conv(*case, dtype)


def test_empty_batch(kernels_on_cpu):
    """No rows: nothing launched, zero weight and bias gradients (as F.conv2d gives)."""
    check_conv(0, (5, 3), 24, 24, 3, 3, True, torch.float32)


def test_weight_gradient_adds_row_splits(kernels_on_cpu, poisoned, monkeypatch):
    """Splits that cut through grids and row blocks; their partial sums add up exactly once."""
    monkeypatch.setattr(gc, "_ROWS_PER_SPLIT", 7)
    check_conv(3, (5, 4), 16, 16, 2, 3, True, torch.float32)


def test_autocast_casts_the_inputs_as_conv2d_does(kernels_on_cpu):
    x = torch.randn(2, 15, 24, requires_grad=True)
    w = torch.randn(24, 8, 3, 3, requires_grad=True)
    b = torch.randn(24, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.float16):
        out = gc.grouped_conv_tokens(x, (5, 3), w, b, groups=3)
    out.float().sum().backward()
    assert out.dtype == torch.float16
    assert x.grad.dtype == w.grad.dtype == b.grad.dtype == torch.float32
    ref = gc.grouped_conv_tokens_ref(x.half().double(), (5, 3), w.half().double(), b.half().double(), groups=3)
    assert_close(out, ref, TOL[torch.float16], "out")


def test_custom_ops_pass_opcheck(kernels_on_cpu):
    checks = ("test_schema", "test_autograd_registration", "test_faketensor")
    for groups in (2, 1):  # one group: the weight gradient's layout must still be contiguous
        x, w, b = torch.randn(30, 16), torch.randn(16, 16 // groups, 3, 3), torch.randn(16)
        torch.library.opcheck(torch.ops.sslam.grouped_conv_tokens.default, (x, w, b, 5, 3, groups), test_utils=checks)
        torch.library.opcheck(torch.ops.sslam.grouped_conv_tokens.default, (x, w, None, 5, 3, groups),
                              test_utils=checks)
        grad = torch.randn(30, 16)
        torch.library.opcheck(torch.ops.sslam.grouped_conv_tokens_backward.default, (grad, x, w, 5, 3, groups),
                              test_utils=checks)


def test_strided_inputs(kernels_on_cpu, poisoned):
    """Every argument may be a strided view (the kernels see contiguous copies)."""
    x = torch.randn(2, 15, 48)[..., ::2]
    w = torch.randn(24, 16, 3, 3).transpose(0, 1).contiguous().transpose(0, 1)[:, ::2]
    b = torch.randn(48)[::2]
    out = gc.grouped_conv_tokens(x, (5, 3), w, b, groups=3)
    ref = gc.grouped_conv_tokens_ref(x.double(), (5, 3), w.double(), b.double(), groups=3)
    assert_close(out, ref, TOL[torch.float32], "out")


def test_double_backward_is_refused(kernels_on_cpu):
    x = torch.randn(1, 15, 24, requires_grad=True)
    w = torch.randn(24, 8, 3, 3, requires_grad=True)
    out = gc.grouped_conv_tokens(x, (5, 3), w, None, groups=3)
    (dx,) = torch.autograd.grad(out.square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):  # not a silently missing term
        dx.sum().backward()


def test_mixed_dtypes_are_named_on_the_reference_path_too(monkeypatch):
    """F.conv2d's own error blamed the bias alone ("Input type (c10::Half) and bias type
    (float)"), though the weight did not match either."""
    monkeypatch.setenv("SSLAM_KERNELS", "0")
    x, w, b = torch.randn(2, 6, 8), torch.randn(8, 4, 3, 3), torch.randn(8)
    with pytest.raises(TypeError, match=r"x, weight and bias dtypes differ \(torch.float16, torch.float32"):
        gc.grouped_conv_tokens(x.half(), (3, 2), w, b, groups=2)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast casts them, as for F.conv2d
        assert gc.grouped_conv_tokens(x.half(), (3, 2), w, b, groups=2).dtype == torch.bfloat16


def test_bad_arguments_are_named(kernels_on_cpu):
    x, w, b = torch.randn(2, 6, 8), torch.randn(8, 4, 3, 3), torch.randn(8)
    with pytest.raises(ValueError, match="grid"):
        gc.grouped_conv_tokens(x, (4, 2), w, b, groups=2)
    with pytest.raises(ValueError, match="odd k"):
        gc.grouped_conv_tokens(x, (3, 2), torch.randn(8, 4, 2, 2), b, groups=2)
    with pytest.raises(ValueError, match="groups=4"):
        gc.grouped_conv_tokens(x, (3, 2), w, b, groups=4)
    with pytest.raises(ValueError, match="bias"):
        gc.grouped_conv_tokens(x, (3, 2), w, torch.randn(4), groups=2)
    with pytest.raises(TypeError, match="x: dtype"):
        gc.grouped_conv_tokens(x.long(), (3, 2), w, b, groups=2)
    with pytest.raises(TypeError, match="dtypes differ"):
        gc.grouped_conv_tokens(x.half(), (3, 2), w, b, groups=2)
    for grid in ((-2, -3), (2.0, 3.0), 6, (6,), (True, 6)):
        with pytest.raises(ValueError, match=r"grid=.*two positive ints"):
            gc.grouped_conv_tokens(x, grid, w, b, groups=2)
    for weight, bias, name in ((w.to("meta"), b, "weight"), (w, b.to("meta"), "bias")):
        with pytest.raises(ValueError, match=rf"{name}: on meta, x on cpu"):
            gc.grouped_conv_tokens(x, (3, 2), weight, bias, groups=2)
    # No output channels: F.conv2d refuses that; the kernels returned (B, N, 0).
    with pytest.raises(ValueError, match="groups=2: weight"):
        gc.grouped_conv_tokens(x, (3, 2), torch.randn(0, 4, 3, 3), torch.randn(0), groups=2)


def test_numpy_integers_as_grid_and_groups(kernels_on_cpu):
    """Regression: a grid of numpy ints passed the checks, then failed inside the kernel."""
    x, w, b = torch.randn(2, 6, 8), torch.randn(8, 4, 3, 3), torch.randn(8)
    out = gc.grouped_conv_tokens(x, (np.int64(3), np.int32(2)), w, b, groups=np.int64(2))
    assert torch.allclose(out, gc.grouped_conv_tokens_ref(x, (3, 2), w, b, groups=2), atol=1e-5)


# ---- CUDA: compiled kernels, bf16 and the ViT-B decoder shape ----------------------------------


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cuda_real_shapes(poisoned, dtype):
    check_conv(24, (64, 8), 768, 768, 16, 3, True, dtype, device="cuda")  # ViT-B decoder layer
    check_conv(3, (6, 3), 12, 20, 2, 5, True, dtype, device="cuda")


def test_torch_compile_traces_the_op_in_one_graph(kernels_on_cpu):
    """The decoder layer compiles without graph breaks (the conv and norm ops are traced through
    their fake implementations) and computes what the eager call does, gradients included."""
    from sslam.kernels.decoder import decoder_layer

    x = torch.randn(2, 15, 24)
    w, b = torch.randn(24, 8, 3, 3) * 0.2, torch.randn(24) * 0.1
    layer = lambda x, w, b: decoder_layer(x, (5, 3), w, b, groups=3)  # noqa: E731
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    results = []
    for fn in (layer, compiled):
        leaves = [t.clone().requires_grad_(True) for t in (x, w, b)]
        out = fn(*leaves)
        out.square().sum().backward()
        results.append([out.detach()] + [t.grad for t in leaves])
    for name, a, r in zip(("out", "dx", "dweight", "dbias"), *results):
        assert_close(a, r, 1e-6, name)


def test_the_ops_called_directly_accept_views(kernels_on_cpu):
    """torch.ops.sslam.grouped_conv_tokens(_backward) with column-major rows and a permuted
    weight give the contiguous results."""
    x, w, b = torch.randn(30, 16), torch.randn(16, 8, 3, 3), torch.randn(16)
    tx, tw = x.t().contiguous().t(), w.permute(3, 2, 1, 0).contiguous().permute(3, 2, 1, 0)
    ops = torch.ops.sslam
    assert torch.equal(ops.grouped_conv_tokens(tx, tw, b, 5, 3, 2), ops.grouped_conv_tokens(x, w, b, 5, 3, 2))
    grad = torch.randn(30, 16)
    for got, want in zip(ops.grouped_conv_tokens_backward(grad, tx, tw, 5, 3, 2),
                         ops.grouped_conv_tokens_backward(grad, x, w, 5, 3, 2)):
        assert torch.equal(got, want)
