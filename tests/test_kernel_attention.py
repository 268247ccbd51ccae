"""Tests of kernels/attention.py: Triton attention (forward + backward, padding mask, varlen).

Without a GPU the kernels run under the Triton interpreter (TRITON_INTERPRET=1, set below before
the kernels are imported, because ``triton.jit`` decides at decoration time) at small shapes in
fp32 and fp16. On a CUDA machine the interpreter tests are skipped and the CUDA tests run the
compiled kernels at the real SSLAM shapes in bf16 and fp16.
"""

import importlib
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from conftest import poison_buffers  # noqa: E402

attn = importlib.import_module("sslam.kernels.attention")  # the module (its function shares its name)
from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

CUDA = torch.cuda.is_available()
INTERPRETED = isinstance(attn._attention_fwd_kernel, InterpretedFunction)


@pytest.fixture
def kernels_on_cpu(monkeypatch):
    """Force the Triton path for CPU tensors (the interpreter)."""
    if not INTERPRETED:
        if CUDA:
            pytest.skip("kernels are compiled for the GPU here; the CUDA tests cover them")
        pytest.fail(
            "sslam.kernels.attention was imported before TRITON_INTERPRET=1 was set, so its "
            "kernels cannot run on CPU: export TRITON_INTERPRET=1 (or set it in conftest.py)"
        )
    monkeypatch.setenv("SSLAM_KERNELS", "1")


@pytest.fixture(params=["single_block", "general"])
def path(request, monkeypatch):
    """Run a test through both code paths: the general one is forced by a zero threshold."""
    if request.param == "general":
        monkeypatch.setattr(attn, "SINGLE_BLOCK_MAX_SEQLEN", 0)
    return request.param


@pytest.fixture
def poisoned(monkeypatch):
    poison_buffers(monkeypatch, attn)


def qkv_tensors(shape, dtype=torch.float32, device="cpu"):
    return [torch.randn(shape, dtype=dtype, device=device, requires_grad=True) for _ in range(3)]


def grads(out, inputs, grad_out):
    return torch.autograd.grad(out, inputs, grad_out)


def assert_rel_close(actual, expected, rel, atol=0.0, what=""):
    """max |actual - expected| <= rel * max |expected| + atol, and nothing NaN."""
    assert not torch.isnan(actual).any(), f"{what}: NaN in result"
    err = (actual.double() - expected.double()).abs().max().item()
    bound = rel * expected.double().abs().max().item() + atol
    assert err <= bound, f"{what}: max error {err:.3e} > {bound:.3e}"


def check_against_reference(q, k, v, mask=None, rel=1e-5, atol=1e-6):
    """Forward and every gradient of the kernels vs autograd through the fp32 reference."""
    out = attn.attention(q, k, v, key_padding_mask=mask)
    grad_out = torch.randn_like(out)
    dq, dk, dv = grads(out, (q, k, v), grad_out)
    ref = attn.attention_ref(q, k, v, key_padding_mask=mask)
    rq, rk, rv = grads(ref, (q, k, v), grad_out)
    assert out.is_contiguous() and out.shape == q.shape and out.dtype == q.dtype
    for name, a, e in (("out", out, ref), ("dq", dq, rq), ("dk", dk, rk), ("dv", dv, rv)):
        assert_rel_close(a, e, rel, atol, name)
    return out


# ---------------------------------------------------------------------------------------------
# Interpreter tests (CPU)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "seqlen, head_dim, forced_general",
    [
        (1, 64, False), (1, 64, True), (7, 80, False), (7, 64, True), (33, 80, False),
        (33, 64, True), (33, 128, True), (103, 64, False), (103, 64, True), (103, 80, True),
    ],
)
def test_fp32_forward_and_gradients(kernels_on_cpu, monkeypatch, seqlen, head_dim,
                                    forced_general):
    if forced_general:
        monkeypatch.setattr(attn, "SINGLE_BLOCK_MAX_SEQLEN", 0)
    q, k, v = qkv_tensors((2, seqlen, 3, head_dim))
    check_against_reference(q, k, v)


@pytest.mark.parametrize("seqlen, head_dim", [(33, 64), (103, 80)])
def test_fp16_within_twice_torch_error(kernels_on_cpu, path, seqlen, head_dim):
    q32, k32, v32 = (torch.randn(2, seqlen, 2, head_dim) for _ in range(3))
    go32 = torch.randn(2, seqlen, 2, head_dim)
    leaf = lambda t, dtype: t.to(dtype).requires_grad_()
    q, k, v = (leaf(t, torch.float16) for t in (q32, k32, v32))
    ours = attn.attention(q, k, v)
    ours_grads = grads(ours, (q, k, v), go32.half())
    # PyTorch's own fp16 error: the official recipe (fp16 matmuls, fp32 softmax) in fp16.
    tq, tk, tv = (leaf(t, torch.float16) for t in (q32, k32, v32))
    torch16 = attn.attention_ref(tq, tk, tv, upcast=False)
    torch16_grads = grads(torch16, (tq, tk, tv), go32.half())
    rq, rk, rv = (leaf(t, torch.float64) for t in (q32, k32, v32))
    ref = attn.attention_ref(rq, rk, rv)
    ref_grads = grads(ref, (rq, rk, rv), go32.double())
    for name, a, t, r in zip(
        ("out", "dq", "dk", "dv"), (ours, *ours_grads), (torch16, *torch16_grads),
        (ref, *ref_grads),
    ):
        assert a.dtype == torch.float16
        torch_err = (t.double() - r).abs().max().item()
        assert_rel_close(a, r, 0.0, 2 * torch_err + 1e-3, name)


def padding_mask(lengths, seqlen):
    """(B, L) bool, True past each entry's length (a suffix of padding)."""
    return torch.arange(seqlen)[None, :] >= torch.as_tensor(lengths)[:, None]


def test_key_padding_mask_random_lengths(kernels_on_cpu, path):
    seqlen = 37
    lengths = torch.randint(1, seqlen + 1, (4,))
    lengths[2] = 0  # every key padded: that entry must output zeros, not NaN
    mask = padding_mask(lengths, seqlen)
    q, k, v = qkv_tensors((4, seqlen, 2, 64))
    out = check_against_reference(q, k, v, mask)
    assert torch.equal(out[2], torch.zeros_like(out[2]))


def test_key_padding_mask_arbitrary_pattern(kernels_on_cpu, path):
    """Padding need not be a suffix: any (B, L) pattern is honoured."""
    mask = torch.rand(3, 45) < 0.4
    q, k, v = qkv_tensors((3, 45, 2, 80))
    check_against_reference(q, k, v, mask)


def test_padded_keys_do_not_influence_the_output(kernels_on_cpu, path):
    q, k, v = (torch.randn(2, 29, 2, 64) for _ in range(3))
    mask = padding_mask([29, 11], 29)
    out = attn.attention(q, k, v, key_padding_mask=mask)
    k2, v2 = k.clone(), v.clone()
    k2[1, 11:] = torch.randn_like(k2[1, 11:]) * 100
    v2[1, 11:] = torch.randn_like(v2[1, 11:]) * 100
    out2 = attn.attention(q, k2, v2, key_padding_mask=mask)
    assert torch.equal(out, out2)


def varlen_inputs(lengths, heads, head_dim, dtype=torch.float32):
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(torch.as_tensor(lengths), 0)
    q, k, v = qkv_tensors((int(cu[-1]), heads, head_dim), dtype)
    return q, k, v, cu


def test_varlen_matches_per_sequence_reference(kernels_on_cpu, path):
    lengths = [7, 33, 1, 20]
    q, k, v, cu = varlen_inputs(lengths, 3, 80)
    max_seqlen = max(lengths)
    out = attn.attention_varlen(q, k, v, cu, max_seqlen)
    grad_out = torch.randn_like(out)
    ours = (out, *grads(out, (q, k, v), grad_out))
    # Independent reference: each sequence on its own through the padded reference.
    ref_pieces, start = [], 0
    for n in lengths:
        piece = attn.attention_ref(*(t[None, start:start + n] for t in (q, k, v)))[0]
        ref_pieces.append(piece)
        start += n
    ref = torch.cat(ref_pieces)
    expected = (ref, *grads(ref, (q, k, v), grad_out))
    for name, a, e in zip(("out", "dq", "dk", "dv"), ours, expected):
        assert_rel_close(a, e, 1e-5, 1e-6, name)


@pytest.mark.parametrize("kernels", [True, False], ids=["kernels", "reference"])
@pytest.mark.parametrize("lengths", [[], [0, 0]])
def test_varlen_without_tokens_is_differentiable(request, monkeypatch, kernels, lengths):
    """No tokens at all: the reference's output was a fresh empty tensor, cut off from q, k
    and v, so a backward through it failed where the kernels' went through."""
    if kernels:
        request.getfixturevalue("kernels_on_cpu")
    else:
        monkeypatch.setenv("SSLAM_KERNELS", "0")
    q, k, v, cu = varlen_inputs(lengths, 2, 16)
    out = attn.attention_varlen(q, k, v, cu, 0)
    assert out.shape == (0, 2, 16)
    assert all(g.shape == (0, 2, 16) for g in grads(out, (q, k, v), torch.randn_like(out)))


def test_varlen_max_seqlen_larger_than_needed(kernels_on_cpu, path):
    """A generous static max_seqlen (the usual case) only adds programs that exit at once."""
    q, k, v, cu = varlen_inputs([5, 12, 9], 2, 64)
    out = attn.attention_varlen(q, k, v, cu, 100)
    ref = attn.attention_varlen_ref(q, k, v, cu, 100)
    assert_rel_close(out, ref, 1e-5, 1e-6, "out")


def test_strided_views_of_packed_qkv(kernels_on_cpu, path):
    batch, seqlen, heads, head_dim = 2, 41, 3, 64
    qkv = torch.randn(batch, seqlen, 3 * heads * head_dim, requires_grad=True)
    q, k, v = qkv.view(batch, seqlen, 3, heads, head_dim).unbind(2)
    assert not q.is_contiguous() and q.stride(-1) == 1
    out = attn.attention(q, k, v)
    grad_out = torch.randn_like(out)
    (g,) = grads(out, (qkv,), grad_out)
    ref = attn.attention_ref(q, k, v)
    (rg,) = grads(ref, (qkv,), grad_out)
    assert_rel_close(out, ref, 1e-5, 1e-6, "out")
    assert_rel_close(g, rg, 1e-5, 1e-6, "dqkv")
    assert out.reshape(batch, seqlen, heads * head_dim).data_ptr() == out.data_ptr()


def test_inputs_with_strided_last_dim_are_copied(kernels_on_cpu):
    q, k, v = (torch.randn(2, 19, 64, 2).transpose(-1, -2) for _ in range(3))
    assert q.stride(-1) != 1
    out = attn.attention(q, k, v)
    assert_rel_close(out, attn.attention_ref(q, k, v), 1e-5, 1e-6, "out")


def test_poisoned_buffers_are_fully_written(kernels_on_cpu, path, poisoned):
    lengths = torch.tensor([23, 0, 5])
    q, k, v = qkv_tensors((3, 23, 2, 80))
    check_against_reference(q, k, v, padding_mask(lengths, 23))
    q, k, v, cu = varlen_inputs([3, 23, 17], 2, 64)
    out = attn.attention_varlen(q, k, v, cu, 23)
    for t in (out, *grads(out, (q, k, v), torch.randn_like(out))):
        assert not torch.isnan(t).any()


def test_custom_scale(kernels_on_cpu, path):
    q, k, v = qkv_tensors((2, 21, 2, 64))
    out = attn.attention(q, k, v, scale=0.37)
    ref = attn.attention_ref(q, k, v, scale=0.37)
    assert_rel_close(out, ref, 1e-5, 1e-6, "out")
    assert not torch.allclose(out, attn.attention_ref(q, k, v), atol=1e-3)


def test_switch_off_runs_the_reference(monkeypatch):
    monkeypatch.setenv("SSLAM_KERNELS", "0")
    q, k, v = (torch.randn(2, 13, 2, 64) for _ in range(3))
    mask = padding_mask([13, 4], 13)
    assert torch.equal(
        attn.attention(q, k, v, key_padding_mask=mask),
        attn.attention_ref(q, k, v, key_padding_mask=mask),
    )
    q, k, v, cu = varlen_inputs([4, 9], 2, 64)
    assert torch.equal(
        attn.attention_varlen(q, k, v, cu, 9), attn.attention_varlen_ref(q, k, v, cu, 9)
    )


def test_fp32_inputs_tune_over_their_own_small_tiles():
    """The GPU tables: fp32 inputs ('ieee' FMA dots) only try their small tiles, 16-bit inputs
    only theirs, and the single-block path also drops query blocks past the sequence."""
    half, fp32 = [(128, 64, 4, 3), (32, 32, 8, 2)], [(32, 32, 8, 2), (16, 16, 4, 1)]
    configs = attn._gpu_configs(half, fp32, ("BLOCK_M", "BLOCK_N"))
    rows = [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) for c in configs]
    assert rows == [(128, 64, 4, 3), (32, 32, 8, 2), (16, 16, 4, 1)]  # each row once

    def kept(dtype, single_block=False, **kwargs):
        q = torch.empty(1, 1, 1, 8, dtype=dtype)
        prune = attn._dtype_pruner(half, fp32, single_block)
        return [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]) for c in prune(configs, {"Q": q}, **kwargs)]

    assert kept(torch.float32) == [(32, 32), (16, 16)]
    assert kept(torch.float16) == kept(torch.bfloat16) == [(128, 64), (32, 32)]
    assert kept(torch.float32, single_block=True, SEQLEN_BUCKET=16) == [(16, 16)]
    assert kept(torch.float16, single_block=True, SEQLEN_BUCKET=64) == [(32, 32)]
    # configurations no list names (the interpreter's) are kept for every dtype
    plain = [attn._config((32, 16, 4, 1), ("BLOCK_M", "BLOCK_N"))]
    assert attn._dtype_pruner(half, fp32)(plain, {"Q": torch.empty(1, dtype=torch.float32)}) == plain


def test_the_gpu_configurations_survive_tritons_autotuning_cache():
    """Triton's on-disk autotuning cache (TRITON_CACHE_AUTOTUNING=1, which bench/run_all.py
    sets) stores each configuration's attributes and rebuilds it as Config(**c.__dict__): an
    attribute of ours on a configuration made every process after the first fail there. The
    GPU tables are built where the interpreter is off (no GPU is needed to build them)."""
    import subprocess
    import sys

    script = (
        "import importlib, pkgutil, triton, sslam.kernels as k\n"
        "from triton.runtime.autotuner import Autotuner\n"
        "tuned = [t for m in pkgutil.iter_modules(k.__path__) for t in vars(importlib.import_module("
        "'sslam.kernels.' + m.name)).values() if isinstance(t, Autotuner)]\n"
        "for t in tuned:\n"
        "    for c in t.configs:\n"
        "        assert str(triton.Config(**c.__dict__)) == str(c), c\n"
        "print(len(tuned), sum(len(t.configs) for t in tuned))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "TRITON_INTERPRET": "0"})
    assert result.returncode == 0, result.stderr[-2000:]
    kernels, configs = map(int, result.stdout.split())
    assert kernels >= 5 and configs > kernels  # the attention tables at least, with their GPU rows


def test_torch_compile_traces_the_custom_ops(kernels_on_cpu):
    batch, seqlen, heads, head_dim = 2, 17, 2, 64
    mask = padding_mask([17, 6], seqlen)

    def block(qkv, mask):
        q, k, v = qkv.unbind(2)
        return attn.attention(q, k, v, key_padding_mask=mask).reshape(batch, seqlen, -1)

    compiled = torch.compile(block, backend="aot_eager", fullgraph=True)
    qkv = torch.randn(batch, seqlen, 3, heads, head_dim, requires_grad=True)
    out = compiled(qkv, mask)
    grad_out = torch.randn_like(out)
    (g,) = grads(out, (qkv,), grad_out)
    ref = attn.attention_ref(*qkv.unbind(2), key_padding_mask=mask).reshape(batch, seqlen, -1)
    (rg,) = grads(ref, (qkv,), grad_out)
    assert_rel_close(out, ref, 1e-5, 1e-6, "out")
    assert_rel_close(g, rg, 1e-5, 1e-6, "dqkv")

    q, k, v, cu = varlen_inputs([5, 12], heads, head_dim)
    packed = torch.compile(
        lambda q, k, v, cu: attn.attention_varlen(q, k, v, cu, 12), backend="aot_eager",
        fullgraph=True,
    )
    out = packed(q, k, v, cu)
    (dq,) = grads(out, (q,), torch.ones_like(out))
    ref = attn.attention_varlen_ref(q, k, v, cu, 12)
    (rdq,) = grads(ref, (q,), torch.ones_like(ref))
    assert_rel_close(out, ref, 1e-5, 1e-6, "varlen out")
    assert_rel_close(dq, rdq, 1e-5, 1e-6, "varlen dq")
    # CPU offsets are checked in traced calls too (the op reads them): a max_seqlen below the
    # longest sequence used to leave rows of the output unwritten.
    too_short = torch.compile(lambda q, k, v, cu: attn.attention_varlen(q, k, v, cu, 8), backend="aot_eager",
                              fullgraph=True)
    with pytest.raises(ValueError, match="max_seqlen=8 is below the longest sequence, 12"):
        too_short(q, k, v, cu)


def test_torch_compile_with_dynamic_shapes_and_a_scale(kernels_on_cpu):
    """dynamic=True makes a float argument symbolic: the scale's check must trace (comparisons,
    not math.isfinite), and other lengths and scales reuse or extend the graph."""
    compiled = torch.compile(lambda q, k, v, scale: attn.attention(q, k, v, scale=scale), backend="aot_eager",
                             dynamic=True, fullgraph=True)
    for seqlen, scale in ((17, 0.1), (23, 0.25)):
        q, k, v = (torch.randn(2, seqlen, 2, 64) for _ in range(3))
        assert_rel_close(compiled(q, k, v, scale), attn.attention_ref(q, k, v, scale=scale), 1e-5, 1e-6, "out")


def test_custom_op_passes_opcheck(kernels_on_cpu):
    q, k, v = qkv_tensors((2, 9, 2, 64))
    mask = padding_mask([9, 3], 9)
    torch.library.opcheck(
        torch.ops.sslam.attention_forward.default, (q, k, v, mask, None, 9, 0.125),
        test_utils=("test_schema", "test_autograd_registration", "test_faketensor"),
    )


def test_custom_op_autograd_matches_eager_path(kernels_on_cpu, path):
    """Eager calls use an autograd.Function, compiled graphs the custom op: same results."""
    q, k, v = qkv_tensors((2, 23, 2, 64))
    mask = padding_mask([23, 8], 23)
    grad_out = torch.randn(2, 23, 2, 64)
    out, lse = torch.ops.sslam.attention_forward(q, k, v, mask, None, 23, 0.125)
    assert lse.shape == (2, 2, 23) and lse.dtype == torch.float32 and not lse.requires_grad
    op_grads = grads(out, (q, k, v), grad_out)
    eager = attn.attention(q, k, v, key_padding_mask=mask, scale=0.125)
    eager_grads = grads(eager, (q, k, v), grad_out)
    for a, e in zip((out, *op_grads), (eager, *eager_grads)):
        assert torch.equal(a, e)


def test_reference_matches_sdpa():
    """The reference itself, against PyTorch's SDPA (math) in float64, with a padding mask."""
    q, k, v = (torch.randn(3, 26, 2, 80, dtype=torch.float64) for _ in range(3))
    mask = padding_mask([26, 9, 1], 26)
    ours = attn.attention_ref(q, k, v, key_padding_mask=mask)
    sdpa = F.scaled_dot_product_attention(
        *(t.transpose(1, 2) for t in (q, k, v)), attn_mask=~mask[:, None, None, :]
    ).transpose(1, 2)
    torch.testing.assert_close(ours, sdpa, rtol=1e-12, atol=1e-12)


def test_reference_all_padded_entry_is_zero_with_finite_gradients():
    q, k, v = (torch.randn(2, 5, 1, 16, requires_grad=True) for _ in range(3))
    mask = padding_mask([5, 0], 5)
    out = attn.attention_ref(q, k, v, key_padding_mask=mask)
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    for g in grads(out, (q, k, v), torch.randn_like(out)):
        assert torch.isfinite(g).all()


@pytest.mark.parametrize(
    "change, error, match",
    [
        (lambda q, k, v, m: (q[0], k[0], v[0], m), ValueError, r"q: expected \(B, L, H, Dh\)"),
        (lambda q, k, v, m: (q, k[:, :5], v, m), ValueError, "k: shape"),
        (lambda q, k, v, m: (q, k, v.double(), m), TypeError, "v: dtype"),
        (lambda q, k, v, m: (q.int(), k.int(), v.int(), m), TypeError, "q: dtype"),
        (lambda q, k, v, m: (q, k, v, m.int()), TypeError, "key_padding_mask: expected dtype"),
        (lambda q, k, v, m: (q, k, v, m[:, :3]), ValueError, r"key_padding_mask: expected shape"),
    ],
)
def test_invalid_arguments_are_named(change, error, match):
    q, k, v = (torch.randn(2, 7, 2, 16) for _ in range(3))
    q, k, v, m = change(q, k, v, padding_mask([7, 2], 7))
    with pytest.raises(error, match=match):
        attn.attention(q, k, v, key_padding_mask=m)


@pytest.mark.parametrize("scale", ["x", float("nan"), float("inf"), True, torch.tensor(0.1)])
def test_invalid_scale_is_named(scale):
    """A string failed as "could not convert string to float: 'x'"; NaN gave NaN outputs."""
    q = torch.randn(1, 5, 2, 16)
    for call in (lambda: attn.attention(q, q, q, scale=scale),
                 lambda: attn.attention_varlen(q[0], q[0], q[0], torch.tensor([0, 5], dtype=torch.int32), 5, scale=scale)):
        with pytest.raises(ValueError, match=r"scale=.*: expected None or a finite number"):
            call()


def test_a_list_as_padding_mask_is_named():
    q = torch.randn(2, 7, 2, 16)
    with pytest.raises(TypeError, match="key_padding_mask: expected a bool tensor, got list"):
        attn.attention(q, q, q, key_padding_mask=padding_mask([7, 2], 7).tolist())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_the_reference_output_is_contiguous(dtype):
    """Regression: attention's contract (a contiguous output, so that the (B, L, H * Dh) view is
    free) did not hold for the reference, which returned a transposed view."""
    q, k, v = (torch.randn(2, 5, 3, 8).to(dtype) for _ in range(3))
    for upcast in (True, False):
        out = attn.attention_ref(q, k, v, upcast=upcast)
        assert out.is_contiguous() and out.dtype == dtype
        out.view(2, 5, 24)


def test_invalid_varlen_arguments_are_named(kernels_on_cpu):
    q, k, v, cu = varlen_inputs([4, 6], 2, 64)
    with pytest.raises(TypeError, match="cu_seqlens: expected dtype int32"):
        attn.attention_varlen(q, k, v, cu.long(), 6)
    with pytest.raises(ValueError, match="max_seqlen=5 is below the longest sequence, 6"):
        attn.attention_varlen(q, k, v, cu, 5)
    with pytest.raises(ValueError, match="cu_seqlens: must start at 0 and end at 10"):
        attn.attention_varlen(q, k, v, torch.tensor([0, 4, 9], dtype=torch.int32), 6)
    for bad in (torch.tensor(6), True, 6.0):
        with pytest.raises(TypeError, match="max_seqlen"):
            attn.attention_varlen(q, k, v, cu, bad)


def test_head_dim_above_kernel_limit_is_refused(kernels_on_cpu):
    q, k, v = (torch.randn(1, 3, 1, attn.MAX_HEAD_DIM + 16) for _ in range(3))
    with pytest.raises(ValueError, match="head dim 144 exceeds 128"):
        attn.attention(q, k, v)


# ---------------------------------------------------------------------------------------------
# CUDA tests: the compiled kernels at the real SSLAM shapes
# ---------------------------------------------------------------------------------------------

requires_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA device (compiled Triton kernels)")

# (sequences, tokens) of ViT-B (12 heads, head dim 64) per GPU step.
SSLAM_SHAPES = {"student": (192, 103), "teacher": (24, 513), "partner": (12, 273)}


def low_precision_check(q32, k32, v32, dtype, mask=None, cu=None, max_seqlen=None):
    """Ours in ``dtype`` vs fp32 reference, allowed 2x the error of PyTorch's own recipe."""
    go32 = torch.randn_like(q32)
    leaf = lambda t, d: t.detach().to(d).requires_grad_()

    def run(fn, d, **kw):
        q, k, v = (leaf(t, d) for t in (q32, k32, v32))
        if cu is None:
            out = fn(q, k, v, key_padding_mask=mask, **kw)
        else:
            out = fn(q, k, v, cu, max_seqlen, **kw)
        return (out, *grads(out, (q, k, v), go32.to(d)))

    padded = cu is None
    ours = run(attn.attention if padded else attn.attention_varlen, dtype)
    ref_fn = attn.attention_ref if padded else attn.attention_varlen_ref
    torch_low = run(ref_fn, dtype, upcast=False)
    ref = run(ref_fn, torch.float32)
    for name, a, t, r in zip(("out", "dq", "dk", "dv"), ours, torch_low, ref):
        assert a.dtype == dtype
        torch_err = (t.float() - r).abs().max().item()
        assert_rel_close(a, r, 0.0, 2 * torch_err + 2e-3, f"{name} ({dtype})")


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", sorted(SSLAM_SHAPES))
def test_cuda_sslam_shapes(case, dtype):
    batch, seqlen = SSLAM_SHAPES[case]
    qkv = torch.randn(batch, seqlen, 3, 12, 64, device="cuda")
    low_precision_check(*qkv.unbind(2), dtype)


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("seqlen", [103, 300])
def test_cuda_padding_mask_and_varlen(seqlen, dtype):
    lengths = torch.randint(1, seqlen + 1, (6,))
    lengths[0], lengths[3] = seqlen, 0
    q, k, v = (torch.randn(6, seqlen, 4, 80, device="cuda") for _ in range(3))
    mask = padding_mask(lengths, seqlen).cuda()
    low_precision_check(q, k, v, dtype, mask=mask)

    lengths[3] = 1
    cu = torch.zeros(7, dtype=torch.int32)
    cu[1:] = torch.cumsum(lengths, 0)
    total = int(cu[-1])
    q, k, v = (torch.randn(total, 4, 64, device="cuda") for _ in range(3))
    low_precision_check(q, k, v, dtype, cu=cu.cuda(), max_seqlen=seqlen)


@requires_cuda
@pytest.mark.parametrize("seqlen", [7, 103, 300])
def test_cuda_fp32_and_poisoned_buffers(seqlen, poisoned):
    q, k, v = qkv_tensors((3, seqlen, 2, 80), device="cuda")
    mask = padding_mask([seqlen, 0, seqlen // 2], seqlen).cuda()
    check_against_reference(q, k, v, mask, rel=2e-5, atol=1e-5)


def test_double_backward_is_refused(kernels_on_cpu):
    q, k, v = (torch.randn(1, 2, 17, 16, requires_grad=True) for _ in range(3))
    (dq,) = torch.autograd.grad(attn.attention(q, k, v).square().sum(), q, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):  # not a silently missing term
        dq.sum().backward()
