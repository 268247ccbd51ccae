"""Tests of kernels/regression.py: the fused frame and SRL regression sums and their gradient.

Without a GPU the kernels run under the Triton interpreter in fp32 and fp16; on a GPU machine
the CUDA tests replace them and add bf16 and the ViT-B stage-2 shape.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from conftest import interpret_kernels, poison_buffers, requires_cuda  # noqa: E402
from sslam.kernels import regression as rg  # noqa: E402

KERNELS = ("_sums_kernel", "_grad_kernel")
CPU_DTYPES = (torch.float32, torch.float16)
SUM_TOL = {torch.float32: 1e-5, torch.float16: 1e-5, torch.bfloat16: 1e-5}  # fp32 sums, reordered


@pytest.fixture
def kernels_on_cpu(monkeypatch):
    interpret_kernels(monkeypatch, rg, KERNELS)


@pytest.fixture
def poisoned(monkeypatch):
    poison_buffers(monkeypatch, rg)


def inputs(clips, clones, n, d, dtype, srl_clips=None, device="cpu", masked_share=0.8):
    """pred (clips * clones, n, d) in ``dtype``, fp32 targets, a random mask, SRL targets."""
    g = torch.Generator().manual_seed(clips * 1000 + n * 10 + d)
    pred = torch.randn(clips * clones, n, d, generator=g).to(dtype)
    target = torch.randn(clips, n, d, generator=g)
    masked = torch.rand(clips * clones, n, generator=g) < masked_share
    srl = None if srl_clips is None else torch.randn(srl_clips, n, d, generator=g)
    move = (lambda t: None if t is None else t.to(device))
    return move(pred), move(target), move(masked), move(srl)


def sums_and_grad(fn, pred, target, masked, clones, srl, weights=(0.7, -1.3)):
    """Both sums and pred's gradient of weights[0] * frame + weights[1] * srl."""
    pred = pred.detach().requires_grad_()
    frame, srl_sum = fn(pred, target, masked, clones, srl)
    loss = weights[0] * frame + (weights[1] * srl_sum if srl_sum is not None else 0.0)
    loss.backward()
    return frame.detach(), None if srl_sum is None else srl_sum.detach(), pred.grad


CASES = [  # (clips, clones, n, d, srl clips): odd token counts and dims, SRL on some clips
    (2, 3, 13, 40, None),
    (4, 2, 9, 24, 2),
    (3, 1, 7, 17, 3),
    (2, 4, 5, 33, 1),
]


@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("case", CASES)
def test_kernel_matches_the_reference(kernels_on_cpu, poisoned, dtype, case):
    """Sums within fp32 reordering, the gradient bit for bit, SRL or not."""
    clips, clones, n, d, srl_clips = case
    pred, target, masked, srl = inputs(clips, clones, n, d, dtype, srl_clips)
    frame, srl_sum, grad = sums_and_grad(rg.regression_sums, pred, target, masked, clones, srl)
    ref_frame, ref_srl, ref_grad = sums_and_grad(rg.regression_sums_ref, pred, target, masked, clones, srl)
    assert frame.dtype == torch.float32 and grad.dtype == dtype
    torch.testing.assert_close(frame, ref_frame, rtol=SUM_TOL[dtype], atol=0)
    if srl is None:
        assert srl_sum is None and ref_srl is None
    else:
        torch.testing.assert_close(srl_sum, ref_srl, rtol=SUM_TOL[dtype], atol=0)
    assert torch.equal(grad, ref_grad)
    # the gradient is zero where nothing is masked, and only there
    assert torch.equal(grad.abs().sum(-1) == 0, ~masked)


def test_sums_by_hand(kernels_on_cpu):
    """Hand-checkable: one clip, two clones, the SRL target on it too."""
    pred = torch.zeros(2, 3, 4)
    pred[0, 1] = 2.0  # clone 0, token 1: distance 2 per feature from the zero target
    pred[1, 2] = 1.0
    target = torch.zeros(1, 3, 4)
    srl = torch.ones(1, 3, 4)
    masked = torch.tensor([[False, True, True], [False, False, True]])
    frame, srl_sum = rg.regression_sums(pred, target, masked, 2, srl)
    # frame: (4 * 4 + 0) + 4 * 1 = 20; srl: (4 + 4) + 0 = 8; both over sqrt(4) = 2
    assert frame.item() == pytest.approx(10.0) and srl_sum.item() == pytest.approx(4.0)


def test_empty_mask_and_all_masked(kernels_on_cpu, poisoned):
    for share in (0.0, 1.1):
        pred, target, masked, srl = inputs(2, 2, 6, 20, torch.float32, 1, masked_share=share)
        ours = sums_and_grad(rg.regression_sums, pred, target, masked, 2, srl)
        ref = sums_and_grad(rg.regression_sums_ref, pred, target, masked, 2, srl)
        torch.testing.assert_close(ours[0], ref[0], rtol=1e-5, atol=0)
        torch.testing.assert_close(ours[1], ref[1], rtol=1e-5, atol=0)
        assert torch.equal(ours[2], ref[2])


@pytest.mark.parametrize("fn", [rg.regression_sums, rg.regression_sums_ref], ids=["kernel", "reference"])
def test_unmasked_positions_do_not_reach_the_loss(kernels_on_cpu, fn):
    """As the official pred[masked]: inf or NaN at positions that are not masked leave both sums
    and the gradient finite, the gradient zero there and unchanged elsewhere."""
    pred, target, masked, srl = inputs(2, 2, 6, 20, torch.float32, 1)
    clean = sums_and_grad(fn, pred, target, masked, 2, srl)
    hostile = pred.clone()
    hostile[~masked] = float("inf")
    hostile[~masked, 3] = float("nan")
    got = sums_and_grad(fn, hostile, target, masked, 2, srl)
    torch.testing.assert_close(got[0], clean[0], rtol=1e-6, atol=0)
    torch.testing.assert_close(got[1], clean[1], rtol=1e-6, atol=0)
    assert torch.equal(got[2], clean[2]) and bool((got[2][~masked] == 0).all())


def test_torch_compile_traces_the_op(kernels_on_cpu):
    pred, target, masked, srl = inputs(2, 2, 6, 20, torch.float32, 1)
    compiled = torch.compile(rg.regression_sums, backend="aot_eager", fullgraph=True)
    ours = sums_and_grad(compiled, pred, target, masked, 2, srl)
    ref = sums_and_grad(rg.regression_sums_ref, pred, target, masked, 2, srl)
    torch.testing.assert_close(ours[0], ref[0], rtol=1e-5, atol=0)
    assert torch.equal(ours[2], ref[2])


def test_reference_path_on_cpu_without_the_switch(monkeypatch):
    """On CPU tensors the public function is the reference unless SSLAM_KERNELS=1."""
    monkeypatch.setenv("SSLAM_KERNELS", "auto")
    pred, target, masked, srl = inputs(2, 2, 6, 20, torch.float32, 1)
    launched = []
    monkeypatch.setattr(rg, "_sums_op", lambda *a: launched.append(a))
    frame, srl_sum = rg.regression_sums(pred, target, masked, 2, srl)
    assert not launched
    ref = rg.regression_sums_ref(pred, target, masked, 2, srl)
    assert torch.equal(frame, ref[0]) and torch.equal(srl_sum, ref[1])


def test_arguments_are_validated():
    pred, target, masked, srl = inputs(2, 2, 6, 20, torch.float32, 1)
    with pytest.raises(ValueError, match="pred: expected"):
        rg.regression_sums(pred[0], target, masked, 2)
    with pytest.raises(ValueError, match="clones=3"):
        rg.regression_sums(pred, target, masked, 3)
    with pytest.raises(ValueError, match="clones=True"):
        rg.regression_sums(pred, target, masked, True)
    with pytest.raises(ValueError, match=r"target: expected shape \(2, 6, 20\)"):
        rg.regression_sums(pred, target[:1], masked, 2)
    with pytest.raises(ValueError, match="masked: expected"):
        rg.regression_sums(pred, target, masked.float(), 2)
    with pytest.raises(ValueError, match="srl: expected"):
        rg.regression_sums(pred, target, masked, 2, torch.randn(3, 6, 20))
    with pytest.raises(ValueError, match="must not require gradients"):
        rg.regression_sums(pred, target.requires_grad_(), masked, 2)
    with pytest.raises(ValueError, match="dtype"):
        rg.regression_sums(pred.double(), target, masked, 2)
    # Not tensors at all: named, not an AttributeError.
    for args, name in (((pred.tolist(), target, masked, 2), "pred"), ((pred, target.tolist(), masked, 2), "target"),
                       ((pred, target, masked.tolist(), 2), "masked"), ((pred, target, masked, 2, srl.tolist()), "srl")):
        with pytest.raises(TypeError, match=f"{name}: expected a torch.Tensor, got list"):
            rg.regression_sums(*args)


# ---- CUDA: the compiled kernels, bf16 and the ViT-B stage-2 shape ----------------------------


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", CASES + [(24, 8, 512, 768, 12)])
def test_cuda_kernel_matches_the_reference(monkeypatch, dtype, case):
    monkeypatch.setenv("SSLAM_KERNELS", "1")
    clips, clones, n, d, srl_clips = case
    pred, target, masked, srl = inputs(clips, clones, n, d, dtype, srl_clips, device="cuda")
    ours = sums_and_grad(rg.regression_sums, pred, target, masked, clones, srl)
    ref = sums_and_grad(rg.regression_sums_ref, pred, target, masked, clones, srl)
    torch.testing.assert_close(ours[0], ref[0], rtol=1e-5, atol=0)
    if srl is not None:
        torch.testing.assert_close(ours[1], ref[1], rtol=1e-5, atol=0)
    assert torch.equal(ours[2], ref[2])


def test_the_ops_called_directly_accept_views(kernels_on_cpu):
    """The registered ops (torch.ops.sslam.*) are public too: a transposed ``pred`` gives the
    contiguous result (the kernels used to index it as contiguous: 81.3 for 64.1), and the
    gradient op's fake returns the real op's contiguous layout (opcheck compared strides)."""
    pred, target, masked, srl = inputs(2, 2, 5, 7, torch.float32, srl_clips=1)
    view = pred.transpose(1, 2).contiguous().transpose(1, 2)  # same values, strides (35, 1, 5)
    ops = torch.ops.sslam
    assert torch.equal(ops.regression_sums(view, target, masked, 2, srl), ops.regression_sums(pred, target, masked, 2, srl))
    scales = torch.tensor([0.7, -1.3])
    assert torch.equal(ops.regression_sums_backward(scales, view, target, masked, 2, srl),
                       ops.regression_sums_backward(scales, pred, target, masked, 2, srl))
    torch.library.opcheck(ops.regression_sums_backward.default, (scales, view, target, masked, 2, srl),
                          test_utils=("test_schema", "test_faketensor"))
