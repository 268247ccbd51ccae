"""The CNN decoder's layer (SPEC 4.3) without transposes: grouped conv -> LayerNorm over channels
-> GELU -> residual, on token-major (B, N, C) tensors.

The reference decoder lays the tokens out as (B, C, T, F) images, so the channel LayerNorm, the
GELU and the residual each make a pass over a transposed copy, forward and backward. Here the
tokens stay token-major: the grouped conv is implicit GEMMs over the token rows
(kernels/grouped_conv.py), and everything after it is one Triton pass per direction:

* :func:`decoder_norm_act` -- out = GELU(LayerNorm(y)) (+ residual), LayerNorm over the last
  dimension without affine parameters (as the decoder's), exact-erf GELU, statistics in fp32.
  Its backward recomputes the normalised values from y and the saved per-row mean and 1/std,
  so nothing but y and two floats per row is kept for it.
* :func:`decoder_layer` -- one whole layer: the conv, then :func:`decoder_norm_act`.

Both run the PyTorch references (beside them) unless ``SSLAM_KERNELS`` picks the kernel (see
:mod:`sslam.kernels.switch`); ``sslam::decoder_norm_act`` is a custom op with a fake
implementation, so ``torch.compile`` traces it.

Order of this file: Triton kernels, host wrappers, custom op and autograd, references, public
functions.
"""

from __future__ import annotations

import math
from numbers import Real
from typing import Optional

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .grouped_conv import check_conv_arguments, check_float_tensor, grouped_conv_tokens_kernels
from .switch import call_custom_op, use_kernels

_MAX_CHANNELS = 8192  # one row per register tile


# ----------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------


@triton.jit
def _row_tile(rows, channels, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """This program's BLOCK_R rows of a contiguous (rows, channels) tensor: the row indices,
    which of them exist, the element mask and the element offsets."""
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = r < rows
    c = tl.arange(0, BLOCK_C)
    mask = row_ok[:, None] & (c < channels)[None, :]
    return r, row_ok, mask, r[:, None].to(tl.int64) * channels + c[None, :]


@triton.jit
def _norm_act_fwd_kernel(
    Y, RES, OUT, MEAN, RSTD, rows, channels, eps,
    HAS_RESIDUAL: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """BLOCK_R rows: out = gelu((y - mean) * rstd) (+ res); saves mean and rstd per row."""
    r, row_ok, mask, offs = _row_tile(rows, channels, BLOCK_R, BLOCK_C)
    y = tl.load(Y + offs, mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(y, axis=1) / channels
    centred = tl.where(mask, y - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(centred * centred, axis=1) / channels + eps)
    z = centred * rstd[:, None]
    out = 0.5 * z * (1.0 + tl.math.erf(z * 0.7071067811865476))
    if HAS_RESIDUAL:
        out += tl.load(RES + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(OUT + offs, out.to(OUT.dtype.element_ty), mask=mask)
    tl.store(MEAN + r, mean, mask=row_ok)
    tl.store(RSTD + r, rstd, mask=row_ok)


@triton.jit
def _norm_act_bwd_kernel(
    DOUT, Y, MEAN, RSTD, DY, rows, channels,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """BLOCK_R rows: dy = rstd * (g - mean(g) - z * mean(g * z)), g = dout * gelu'(z)."""
    r, row_ok, mask, offs = _row_tile(rows, channels, BLOCK_R, BLOCK_C)
    y = tl.load(Y + offs, mask=mask, other=0.0).to(tl.float32)
    dout = tl.load(DOUT + offs, mask=mask, other=0.0).to(tl.float32)
    mean = tl.load(MEAN + r, mask=row_ok, other=0.0)
    rstd = tl.load(RSTD + r, mask=row_ok, other=0.0)
    z = tl.where(mask, (y - mean[:, None]) * rstd[:, None], 0.0)
    gelu_grad = 0.5 * (1.0 + tl.math.erf(z * 0.7071067811865476)) + z * 0.3989422804014327 * tl.exp(-0.5 * z * z)
    g = dout * gelu_grad
    g_mean = tl.sum(g, axis=1) / channels
    gz_mean = tl.sum(g * z, axis=1) / channels
    dy = rstd[:, None] * (g - g_mean[:, None] - z * gz_mean[:, None])
    tl.store(DY + offs, dy.to(DY.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------
# Host wrappers
# ----------------------------------------------------------------------------------------------


def _new_buffer(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, device=device)


def _tiles(channels: int) -> dict:
    """A row per register tile; about 4096 elements per program."""
    block_c = triton.next_power_of_2(channels)
    block_r = max(1, 4096 // block_c)
    return {"BLOCK_R": block_r, "BLOCK_C": block_c, "num_warps": 8 if block_c >= 2048 else 4}


def _forward(y: torch.Tensor, residual: torch.Tensor | None, eps: float):
    """(out, mean, rstd) for contiguous (R, C) y and residual."""
    rows, channels = y.shape
    out = _new_buffer((rows, channels), y.dtype, y.device)
    mean = _new_buffer((rows,), torch.float32, y.device)
    rstd = _new_buffer((rows,), torch.float32, y.device)
    meta = _tiles(channels)
    _norm_act_fwd_kernel[(triton.cdiv(rows, meta["BLOCK_R"]),)](
        y, y if residual is None else residual, out, mean, rstd, rows, channels, eps,
        HAS_RESIDUAL=residual is not None, **meta,
    )
    return out, mean, rstd


def _backward(grad_out: torch.Tensor, y: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor):
    """dL/dy for contiguous (R, C) tensors."""
    rows, channels = y.shape
    grad_out = grad_out.contiguous()
    dy = _new_buffer((rows, channels), y.dtype, y.device)
    meta = _tiles(channels)
    _norm_act_bwd_kernel[(triton.cdiv(rows, meta["BLOCK_R"]),)](
        grad_out, y, mean, rstd, dy, rows, channels, **meta,
    )
    return dy


# ----------------------------------------------------------------------------------------------
# Custom op (traceable by torch.compile) and autograd
# ----------------------------------------------------------------------------------------------


@torch.library.custom_op("sslam::decoder_norm_act", mutates_args=())
def _norm_act_op(
    y: torch.Tensor, residual: Optional[torch.Tensor], eps: float,  # noqa: UP045
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out, mean, rstd) of (R, C) inputs."""
    # Contiguous as the kernel indexes them (a no-op for the wrapper's own calls).
    return _forward(y.contiguous(), None if residual is None else residual.contiguous(), eps)


@_norm_act_op.register_fake
def _norm_act_fake(y, residual, eps):
    rows = y.shape[0]
    return y.new_empty(y.shape), y.new_empty((rows,), dtype=torch.float32), y.new_empty((rows,), dtype=torch.float32)


@torch.library.custom_op("sslam::decoder_norm_act_backward", mutates_args=())
def _norm_act_backward_op(
    grad_out: torch.Tensor, y: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor,
) -> torch.Tensor:
    """dL/dy of :func:`_norm_act_op` given dL/d(out)."""
    return _backward(grad_out, y.contiguous(), mean.contiguous(), rstd.contiguous())  # contiguous, as indexed


@_norm_act_backward_op.register_fake
def _norm_act_backward_fake(grad_out, y, mean, rstd):
    return y.new_empty(y.shape)


def _residual_grad(grad_out: torch.Tensor, residual_dtype) -> torch.Tensor | None:
    return None if residual_dtype is None else grad_out.to(residual_dtype)


def _setup_context(ctx, inputs, output):
    y, residual, _ = inputs
    _, mean, rstd = output
    ctx.save_for_backward(y, mean, rstd)
    ctx.residual_dtype = None if residual is None else residual.dtype
    ctx.mark_non_differentiable(mean, rstd)


def _norm_act_autograd(ctx, grad_out, grad_mean, grad_rstd):
    y, mean, rstd = ctx.saved_tensors
    dy = _norm_act_backward_op(grad_out, y, mean, rstd)
    return dy, _residual_grad(grad_out, ctx.residual_dtype), None


_norm_act_op.register_autograd(_norm_act_autograd, setup_context=_setup_context)


class _EagerNormAct(torch.autograd.Function):
    """The custom op's forward and backward for eager calls, which skip the op's dispatch cost
    (as :class:`sslam.kernels.attention._EagerAttention`)."""

    @staticmethod
    def forward(ctx, y, residual, eps):
        out, mean, rstd = _forward(y, residual, eps)
        ctx.save_for_backward(y, mean, rstd)
        ctx.residual_dtype = None if residual is None else residual.dtype
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable  # no double backward: an error, not a lost term
    def backward(ctx, grad_out):
        y, mean, rstd = ctx.saved_tensors
        return _backward(grad_out, y, mean, rstd), _residual_grad(grad_out, ctx.residual_dtype), None


def _norm_act_kernels(y: torch.Tensor, residual: torch.Tensor | None, eps: float) -> torch.Tensor:
    if call_custom_op():
        return _norm_act_op(y, residual, eps)[0]
    return _EagerNormAct.apply(y, residual, eps)


# ----------------------------------------------------------------------------------------------
# PyTorch references (the CPU path and the baseline of tests and benchmarks)
# ----------------------------------------------------------------------------------------------


def decoder_norm_act_ref(y: torch.Tensor, residual: torch.Tensor | None = None, *, eps: float = 1e-5):
    """GELU(LayerNorm(y)) (+ residual), as :func:`decoder_norm_act` computes it: in float32 for
    its half and float32 inputs. It also takes float64 inputs, which the kernel refuses, and
    computes them in float64: the tests' exact answer."""
    compute = torch.promote_types(y.dtype, torch.float32)
    out = F.gelu(F.layer_norm(y.to(compute), (y.shape[-1],), eps=eps))
    if residual is not None:
        out = out + residual.to(compute)
    return out.to(y.dtype)


def decoder_layer_ref(x, grid, weight, bias, *, groups: int, residual: bool = True, eps: float = 1e-5):
    """One decoder layer as the reference decoder computes it (a (B, C, T, F) image); same
    contract as :func:`decoder_layer`."""
    b, n, c = x.shape
    image = x.transpose(1, 2).reshape(b, c, *grid)
    y = F.conv2d(image, weight, bias, padding=weight.shape[-1] // 2, groups=groups)
    out = F.gelu(F.layer_norm(y.movedim(1, -1), (y.shape[1],), eps=eps)).movedim(-1, 1)
    if residual:
        out = out + image
    return out.reshape(b, out.shape[1], n).transpose(1, 2)


# ----------------------------------------------------------------------------------------------
# Public functions
# ----------------------------------------------------------------------------------------------


def _checked_eps(eps) -> float:
    """The LayerNorm epsilon as the Python float the kernels take (a numpy float is one too)."""
    if isinstance(eps, bool) or not isinstance(eps, Real) or not 0 <= eps < math.inf:  # NaN fails too
        raise ValueError(f"eps={eps!r}: expected a finite number >= 0")
    return float(eps)


def decoder_norm_act(y: torch.Tensor, residual: torch.Tensor | None = None, *, eps: float = 1e-5):
    """GELU(LayerNorm over the last dimension of ``y``) (+ ``residual``), in one pass.

    Args:
        y: (..., C) float32/float16/bfloat16, e.g. the conv output of a decoder layer, token-major.
        residual: None, or a tensor of y's shape (any supported dtype) added after the GELU.
        eps: the LayerNorm epsilon (the decoder's: 1e-5). No affine parameters.

    Returns (..., C) in y's dtype. Differentiable in y and residual; statistics, GELU and the
    sum in fp32. ``SSLAM_KERNELS`` picks the Triton kernel or :func:`decoder_norm_act_ref`.
    """
    check_float_tensor("y", y)
    eps = _checked_eps(eps)
    if y.dim() == 0 or y.shape[-1] == 0:
        # A LayerNorm over no channels has no mean; say so on both paths alike.
        raise ValueError(f"y: expected (..., C) with C >= 1, got shape {tuple(y.shape)}")
    if residual is not None:
        check_float_tensor("residual", residual)
        if residual.shape != y.shape:
            raise ValueError(f"residual: shape {tuple(residual.shape)} differs from y's {tuple(y.shape)}")
        # Else the kernel would be handed a pointer it cannot read (or the reference fail in
        # the addition with a message that names neither tensor).
        if residual.device != y.device:
            raise ValueError(f"residual: device {residual.device} differs from y's {y.device}")
    if not use_kernels(y, *(() if residual is None else (residual,))):
        return decoder_norm_act_ref(y, residual, eps=eps)
    return _norm_act_rows(y, residual, eps)


def _norm_act_rows(y: torch.Tensor, residual: torch.Tensor | None, eps: float) -> torch.Tensor:
    """The kernel path of :func:`decoder_norm_act` on checked arguments: (..., C) -> (..., C)."""
    if y.shape[-1] > _MAX_CHANNELS:
        raise ValueError(f"y: {y.shape[-1]} channels exceed {_MAX_CHANNELS}, the most the kernel holds "
                         "(set SSLAM_KERNELS=0 for the PyTorch reference)")
    rows = y.reshape(-1, y.shape[-1]).contiguous()
    res = None if residual is None else residual.reshape(rows.shape).contiguous()
    return _norm_act_kernels(rows, res, eps).reshape(y.shape)


def decoder_layer(x, grid, weight, bias, *, groups: int, residual: bool = True, eps: float = 1e-5):
    """One CNN-decoder layer on token-major tokens, with no transposes.

    Args:
        x: (B, N, C_in) tokens in grid order (N = T * F, time-major), float32/float16/bfloat16.
        grid: (T, F), the patch grid.
        weight: (C_out, C_in / groups, k, k) grouped-conv weight (odd k, 'same' padding); bias: None
            or (C_out,). x, weight and bias share one dtype outside autocast.
        groups: the conv's groups.
        residual: add x after the GELU (needs C_out == C_in).
        eps: the channel LayerNorm's epsilon (no affine parameters).

    Returns (B, N, C_out): GELU(LayerNorm_C(conv(x))) (+ x). With the kernels, the conv is
    :func:`sslam.kernels.grouped_conv_tokens` on the token rows in place, and norm, GELU and
    residual are :func:`decoder_norm_act`'s single pass. Under autocast the kernels return the
    conv's dtype (bf16/fp16; statistics and the sum still in fp32), where the reference's
    autocast LayerNorm returns fp32: the decoder's activations take half the memory, and each
    layer's output is rounded once more (a relative error of at most 2^-8 in bf16).
    """
    check_conv_arguments(x, grid, weight, bias, groups)
    eps = _checked_eps(eps)
    if residual and weight.shape[0] != x.shape[-1]:
        raise ValueError(f"residual needs C_out == C_in, got weight {tuple(weight.shape)} for {x.shape[-1]} channels")
    if not use_kernels(x, weight, *(() if bias is None else (bias,))):
        return decoder_layer_ref(x, grid, weight, bias, groups=groups, residual=residual, eps=eps)
    y = grouped_conv_tokens_kernels(x, grid, weight, bias, groups)  # arguments checked above
    return _norm_act_rows(y, x if residual else None, eps)
