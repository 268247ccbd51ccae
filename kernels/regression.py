"""The masked regression sums of the pretraining losses (SPEC 4.4, 5.4), fused, in Triton.

Per step the student's decoder predicts every patch of every clone: pred (B * C, N, D), ViT-B
stage 2 (192, 512, 768). The losses are sums over the masked positions of
``||pred - target||^2 / sqrt(D)``: the frame loss against the teacher's target of each clip
(row r uses clip r // C), and in stage 2 the Source Retention loss of the mixtures' rows (the
last rows) against the SRL target. In PyTorch each is a chain of passes over fp32 copies of
pred's size (cast, difference, square, sum; in the backward cast, difference, two products,
cast back) and the SRL term's gradient of the mixtures' rows is padded with zeros to pred's
size and added to the frame term's. Here:

* forward: one pass reads pred and both targets once (at the masked tokens only) and writes
  one fp32 partial sum per program and term, which the host adds in a fixed order (no
  atomics: deterministic);
* backward: one pass, reading the masked tokens only, writes pred's gradient, both terms
  added where both apply.

The backward equals the reference's values exactly (the same fp32 products, each term rounded to
pred's dtype before they are added, as autograd adds them); the forward's sums are the same up
to the order of fp32 additions. (Zeros of the gradient may differ in sign.)

Order of this file: Triton kernels, host wrappers, custom ops, reference, public function.
"""

from __future__ import annotations

import math

# typing.Optional (not `X | None`) in the custom-op signatures: torch.library's schema inference
# reads them.
from typing import Optional

import torch
import triton
import triton.language as tl

from .switch import interpreting, use_kernels

_SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# ----------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------


@triton.jit
def _target_rows(tok, first_row, N, CLONES: tl.constexpr):
    """Tokens ``tok`` of pred (row-major over (rows, N)): their row of a target that starts at
    pred row ``first_row`` (row r uses clip (r - first_row) // CLONES), as int64 element rows."""
    row = tok // N
    return ((row - first_row) // CLONES).to(tl.int64) * N + tok % N


@triton.jit
def _sums_kernel(
    PRED, TARGET, SRL, MASKED, PARTIAL, tokens, N, D, srl_first,
    CLONES: tl.constexpr, HAS_SRL: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """PARTIAL[pid] = (sum over masked tokens of this block of ||pred - target||^2,
    the same against SRL over the tokens of rows >= srl_first), in fp32."""
    pid = tl.program_id(0)
    tok = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    ok = tok < tokens
    masked = tl.load(MASKED + tok, mask=ok, other=0) != 0
    pred_rows = tok.to(tl.int64) * D
    target_rows = _target_rows(tok, 0, N, CLONES) * D
    in_srl = ok & (tok // N >= srl_first)
    srl_rows = _target_rows(tok, srl_first, N, CLONES) * D
    frame = tl.zeros((BLOCK_T,), tl.float32)
    srl = tl.zeros((BLOCK_T,), tl.float32)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        both = (ok & masked)[:, None] & (d < D)[None, :]
        p = tl.load(PRED + pred_rows[:, None] + d[None, :], mask=both, other=0.0).to(tl.float32)
        t = tl.load(TARGET + target_rows[:, None] + d[None, :], mask=both, other=0.0).to(tl.float32)
        frame += tl.sum((p - t) * (p - t), axis=1)
        if HAS_SRL:
            s = tl.load(SRL + srl_rows[:, None] + d[None, :], mask=both & in_srl[:, None],
                        other=0.0).to(tl.float32)
            srl += tl.sum(tl.where(in_srl[:, None], (p - s) * (p - s), 0.0), axis=1)
    tl.store(PARTIAL + 2 * pid, tl.sum(frame, axis=0))
    tl.store(PARTIAL + 2 * pid + 1, tl.sum(srl, axis=0))


@triton.jit
def _grad_kernel(
    PRED, TARGET, SRL, MASKED, SCALES, GRAD, tokens, N, D, srl_first,
    CLONES: tl.constexpr, HAS_SRL: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """GRAD = scale_frame * 2 (pred - target) [+ scale_srl * 2 (pred - srl) on rows >=
    srl_first] at masked tokens, zero elsewhere; each term rounded to pred's dtype before the
    sum."""
    tok = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    ok = tok < tokens
    inside = ok[:, None] & (d < D)[None, :]
    masked = tl.load(MASKED + tok, mask=ok, other=0) != 0
    # Only the masked tokens are read (~80 % in pretraining): the others' gradient is zero.
    used = inside & masked[:, None]
    pred = PRED + tok.to(tl.int64)[:, None] * D + d[None, :]
    p = tl.load(pred, mask=used, other=0.0).to(tl.float32)
    t_rows = _target_rows(tok, 0, N, CLONES)
    t = tl.load(TARGET + t_rows[:, None] * D + d[None, :], mask=used, other=0.0).to(tl.float32)
    frame_scale = tl.load(SCALES)
    out_ty = GRAD.dtype.element_ty
    grad = (frame_scale * (2.0 * (p - t))).to(out_ty)
    if HAS_SRL:
        in_srl = ok & (tok // N >= srl_first)
        s_rows = _target_rows(tok, srl_first, N, CLONES)
        s = tl.load(SRL + s_rows[:, None] * D + d[None, :], mask=used & in_srl[:, None],
                    other=0.0).to(tl.float32)
        srl_grad = (tl.load(SCALES + 1) * (2.0 * (p - s))).to(out_ty)
        both = (grad.to(tl.float32) + srl_grad.to(tl.float32)).to(out_ty)
        grad = tl.where(in_srl[:, None], both, grad)
    # Selected, as the reference: an unmasked position's pred (even inf) gives a zero gradient
    # (its loads above were skipped anyway).
    grad = tl.where(masked[:, None], grad, 0.0)
    tl.store(GRAD + tok.to(tl.int64)[:, None] * D + d[None, :], grad, mask=inside)


# ----------------------------------------------------------------------------------------------
# Host wrappers
# ----------------------------------------------------------------------------------------------


def _new_buffer(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Uninitialised output buffer: every element is written by a kernel."""
    return torch.empty(shape, dtype=dtype, device=device)


def _blocks(dim: int) -> tuple[int, int]:
    """(tokens, features) per program: tiles of 2048 elements on a GPU, small ones in the
    interpreter (the feature block narrower than small test dimensions, so the loop over D and
    its masked last block run).

    Compiled for sm_90 without a GPU (``triton.compile`` with a CUDA target, registers from
    ``cuobjdump -res-usage``), bf16 pred with SRL, 4 warps: 8 x 256 tiles take 125 registers
    (sums) and 80 (gradient), no spills; 16 x 256 tiles took 244 and 168, which fits only two
    blocks of 4 warps per SM: few loads in flight for a memory-bound pass."""
    if interpreting():
        return 8, 16
    block_d = min(256, triton.next_power_of_2(dim))
    return 2048 // block_d, block_d


def _geometry(pred: torch.Tensor, srl: torch.Tensor | None, clones: int):
    rows, n, d = pred.shape
    srl_first = rows - srl.shape[0] * clones if srl is not None else rows
    return rows * n, n, d, srl_first


def _launch_sums(pred, target, masked, clones: int, srl) -> torch.Tensor:
    tokens, n, d, srl_first = _geometry(pred, srl, clones)
    block_t, block_d = _blocks(d)
    programs = triton.cdiv(tokens, block_t)
    partial = _new_buffer((programs, 2), torch.float32, pred.device)
    if programs:
        _sums_kernel[(programs,)](
            pred, target, srl if srl is not None else target, masked.view(torch.uint8), partial,
            tokens, n, d, srl_first,
            CLONES=clones, HAS_SRL=srl is not None, BLOCK_T=block_t, BLOCK_D=block_d, num_warps=4,
        )
    return partial.sum(0) / math.sqrt(d)


def _launch_grad(scales, pred, target, masked, clones: int, srl) -> torch.Tensor:
    tokens, n, d, srl_first = _geometry(pred, srl, clones)
    block_t, block_d = _blocks(d)
    grad = _new_buffer(pred.shape, pred.dtype, pred.device)
    if tokens and d:
        _grad_kernel[(triton.cdiv(tokens, block_t), triton.cdiv(d, block_d))](
            pred, target, srl if srl is not None else target, masked.view(torch.uint8),
            scales, grad, tokens, n, d, srl_first,
            CLONES=clones, HAS_SRL=srl is not None, BLOCK_T=block_t, BLOCK_D=block_d, num_warps=4,
            # No fused multiply-adds: in fp32 the sum of the two terms would round once where
            # the reference rounds each product and then the sum.
            enable_fp_fusion=False,
        )
    return grad


# ----------------------------------------------------------------------------------------------
# Custom ops
# ----------------------------------------------------------------------------------------------


def _rows(pred, target, masked, srl, clones: int) -> tuple:
    """The kernels' arguments, contiguous as they index them (a no-op for the wrapper's own
    calls; a direct call of the op may pass views)."""
    return pred.contiguous(), target.contiguous(), masked.contiguous(), clones, None if srl is None else srl.contiguous()


@torch.library.custom_op("sslam::regression_sums", mutates_args=())
def _sums_op(pred: torch.Tensor, target: torch.Tensor, masked: torch.Tensor, clones: int,
             srl: Optional[torch.Tensor]) -> torch.Tensor:  # noqa: UP045
    """(2,) fp32: the frame sum and the SRL sum (0 without an SRL target)."""
    return _launch_sums(*_rows(pred, target, masked, srl, clones))


@_sums_op.register_fake
def _sums_fake(pred, target, masked, clones, srl):
    return pred.new_empty((2,), dtype=torch.float32)


@torch.library.custom_op("sslam::regression_sums_backward", mutates_args=())
def _grad_op(grad: torch.Tensor, pred: torch.Tensor, target: torch.Tensor, masked: torch.Tensor,
             clones: int, srl: Optional[torch.Tensor]) -> torch.Tensor:  # noqa: UP045
    """pred's gradient given the (2,) gradient of the sums."""
    # As the reference: the gradient of each sum divided by sqrt(D), in the same op.
    return _launch_grad(grad.float() / math.sqrt(pred.shape[-1]), *_rows(pred, target, masked, srl, clones))


@_grad_op.register_fake
def _grad_fake(grad, pred, target, masked, clones, srl):
    return pred.new_empty(pred.shape)  # contiguous, as the kernel's output


def _setup_context(ctx, inputs, output):
    pred, target, masked, clones, srl = inputs
    ctx.save_for_backward(pred, target, masked, srl)
    ctx.clones = clones


def _backward(ctx, grad):
    pred, target, masked, srl = ctx.saved_tensors
    return _grad_op(grad, pred, target, masked, ctx.clones, srl), None, None, None, None


_sums_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------
# Reference (the CPU path and the baseline of tests and benchmarks)
# ----------------------------------------------------------------------------------------------


def regression_sums_ref(pred, target, masked, clones: int, srl=None):
    """:func:`sslam.pretrain.regression_sums_ref`: the frame sum, and the SRL sum of the last
    rows (or None). Imported when called: sslam.pretrain imports this package."""
    from sslam.pretrain import regression_sums_ref as reference

    return reference(pred, target, masked, clones, srl)


# ----------------------------------------------------------------------------------------------
# Public function
# ----------------------------------------------------------------------------------------------


def _check(name: str, t: torch.Tensor, shape: tuple, device: torch.device) -> None:
    if t.dtype not in _SUPPORTED_DTYPES:
        raise ValueError(f"{name}: dtype {t.dtype} not supported; expected one of {_SUPPORTED_DTYPES}")
    if tuple(t.shape) != shape:
        raise ValueError(f"{name}: expected shape {shape}, got {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name}: on {t.device}, pred on {device}")
    if t.requires_grad:
        raise ValueError(f"{name}: a regression target must not require gradients (it is the teacher's)")


def regression_sums(
    pred: torch.Tensor,
    target: torch.Tensor,
    masked: torch.Tensor,
    clones: int,
    srl: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The pretraining regression sums: sum over masked positions of ||pred - target||^2 / sqrt(D).

    Args:
        pred: (B * C, N, D) decoder predictions, fp32 / fp16 / bf16; row r is clone r % C of
            clip r // C.
        target: (B, N, D) the clips' targets (teacher side: no gradient), fp32 / fp16 / bf16.
        masked: (B * C, N) bool, the positions that count.
        clones: C.
        srl: optional (B_s, N, D) Source Retention targets of the last B_s * C rows of pred (the
            mixtures), row r of those using SRL clip (r - (B - B_s) * C) // C.

    Returns:
        (frame sum, SRL sum or None), fp32 scalars, differentiable with respect to pred.
    """
    for name, t in (("pred", pred), ("target", target), ("masked", masked), ("srl", srl)):
        if not isinstance(t, torch.Tensor) and not (name == "srl" and t is None):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if pred.dim() != 3:
        raise ValueError(f"pred: expected (B * C, N, D), got shape {tuple(pred.shape)}")
    if pred.dtype not in _SUPPORTED_DTYPES:
        raise ValueError(f"pred: dtype {pred.dtype} not supported; expected one of {_SUPPORTED_DTYPES}")
    rows, n, d = pred.shape
    if isinstance(clones, bool) or not isinstance(clones, int) or clones < 1 or rows % clones:
        raise ValueError(f"clones={clones!r}: expected a positive divisor of pred's {rows} rows")
    _check("target", target, (rows // clones, n, d), pred.device)
    if masked.dtype != torch.bool or tuple(masked.shape) != (rows, n) or masked.device != pred.device:
        raise ValueError(f"masked: expected a ({rows}, {n}) bool tensor on {pred.device}, got "
                         f"{masked.dtype} {tuple(masked.shape)} on {masked.device}")
    if srl is not None:
        if srl.dim() != 3 or srl.shape[0] * clones > rows:
            raise ValueError(f"srl: expected (B_s, {n}, {d}) with B_s <= {rows // clones}, got shape "
                             f"{tuple(srl.shape)}")
        _check("srl", srl, (srl.shape[0], n, d), pred.device)
    if not use_kernels(pred, target, masked):
        return regression_sums_ref(pred, target, masked, clones, srl)
    # Contiguous here, so the tensors saved for the backward are too: one copy of a view, not two.
    sums = _sums_op(*_rows(pred, target, masked, srl, clones))
    return sums[0], None if srl is None else sums[1]
