"""The CNN decoder's grouped 'same' convolution (SPEC 4.3) on token-major tensors, as implicit GEMMs.

The decoder convolves (B, T, F) patch grids of tokens with a k x k kernel in G channel groups
(ViT-B: 3 x 3, 16 groups of 48 channels, 192 x 512 tokens of 768 channels per step). cuDNN runs
this grouped case far below the tensor cores' rate, plus layout transforms of the weights and
gradients; on an H200 the decoder's convolutions took half of the training step's GPU time
(bench/results/nvidia-h200_2026-12-04). Here each direction is a sum of k * k shifted GEMMs
over the token rows, read in place from the token-major (B * T * F, C) tensor:

* forward: y[m, g, :] = bias[g] + sum over taps (dt, df) of x[m + (dt - p) F + (df - p), g, :]
  @ W[g, dt, df] (p = k // 2; a shifted row outside its grid reads zeros);
* input gradient: the same kernel on dy with the taps flipped and each group's weight
  transposed;
* weight gradient: for each (group, tap), x[shifted rows, g, :]^T @ dy[rows, g, :], the rows split
  over programs into fp32 partial sums that the host adds in a fixed order (no atomics: the same
  inputs and tuned tile sizes give the same bits); the bias gradient is dy summed over rows.

Blocks are powers of two, so a group's channels (48 in ViT-B) are covered by masked tiles.
Products accumulate in fp32; fp32 inputs use exact fp32 products. :func:`grouped_conv_tokens`
picks these kernels or :func:`grouped_conv_tokens_ref` (``F.conv2d`` on the channels-last view)
through ``SSLAM_KERNELS``; ``sslam::grouped_conv_tokens`` is a custom op with a fake
implementation, so ``torch.compile`` traces it.

Order of this file: Triton kernels, tuning tables, host wrappers, custom op and autograd,
reference, public function.
"""

from __future__ import annotations

import numbers
from typing import Optional

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .switch import call_custom_op, interpreting, use_kernels

_SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# ----------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------


@triton.jit
def _shifted_rows(m, t, f, rows, T, F, dt, df, P: tl.constexpr):
    """Rows m (at grid positions t, f) moved by (dt - P, df - P) on their own (T, F) grid, and
    which of them exist."""
    ts = t + (dt - P)
    fs = f + (df - P)
    ok = (m < rows) & (ts >= 0) & (ts < T) & (fs >= 0) & (fs < F)
    return m + (dt - P) * F + (df - P), ok


@triton.jit
def _conv_fwd_kernel(
    X, W, BIAS, Y, rows, T, F, c_in, c_out, cg_in, cg_out,
    KS: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_CI: tl.constexpr, BLOCK_CO: tl.constexpr,
):
    """BLOCK_M rows x BLOCK_CO output channels of one group. X (rows, c_in), Y (rows, c_out)
    contiguous; W (G, KS, KS, cg_in, cg_out) contiguous; BIAS (c_out,).

    One loop over (tap, input-channel block) steps -- the GEMM's K dimension -- rather than
    nested loops, so the compiler pipelines the loads across taps and keeps one set of row
    pointers live (unrolled taps spilled registers on sm_90)."""
    co_blocks = tl.cdiv(cg_out, BLOCK_CO)
    g = tl.program_id(1) // co_blocks
    co = (tl.program_id(1) % co_blocks) * BLOCK_CO + tl.arange(0, BLOCK_CO)
    co_ok = co < cg_out
    m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    t = (m // F) % T
    f = m % F
    ci_blocks = tl.cdiv(cg_in, BLOCK_CI)
    acc = tl.zeros((BLOCK_M, BLOCK_CO), dtype=tl.float32)
    for step in range(KS * KS * ci_blocks):
        tap = step // ci_blocks
        src, ok = _shifted_rows(m, t, f, rows, T, F, tap // KS, tap % KS, KS // 2)
        ci = (step % ci_blocks) * BLOCK_CI + tl.arange(0, BLOCK_CI)
        ci_ok = ci < cg_in
        a = tl.load(X + src.to(tl.int64)[:, None] * c_in + (g * cg_in + ci)[None, :],
                    mask=ok[:, None] & ci_ok[None, :], other=0.0)
        w = tl.load(W + ((g * KS * KS + tap) * cg_in + ci)[:, None] * cg_out + co[None, :],
                    mask=ci_ok[:, None] & co_ok[None, :], other=0.0)
        acc = tl.dot(a, w, acc, input_precision=DOT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(BIAS + g * cg_out + co, mask=co_ok, other=0.0).to(tl.float32)[None, :]
    out = Y + m.to(tl.int64)[:, None] * c_out + (g * cg_out + co)[None, :]
    tl.store(out, acc.to(Y.dtype.element_ty), mask=(m < rows)[:, None] & co_ok[None, :])


@triton.jit
def _conv_wgrad_kernel(
    X, DY, PARTIAL, rows, rows_per_split, T, F, c_in, c_out, cg_in, cg_out, groups,
    KS: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_CI: tl.constexpr, BLOCK_CO: tl.constexpr,
):
    """One (group, tap, BLOCK_CI x BLOCK_CO tile) of the weight gradient over the rows of split
    program_id(1): PARTIAL[s, g, dt, df, ci, co] = sum over those rows m of
    X[m shifted by the tap, g * cg_in + ci] * DY[m, g * cg_out + co], in fp32."""
    ci_blocks = tl.cdiv(cg_in, BLOCK_CI)
    co_blocks = tl.cdiv(cg_out, BLOCK_CO)
    tile = tl.program_id(0)
    co_block = tile % co_blocks
    ci_block = (tile // co_blocks) % ci_blocks
    tap = (tile // (co_blocks * ci_blocks)) % (KS * KS)
    g = tile // (co_blocks * ci_blocks * KS * KS)
    ci = ci_block * BLOCK_CI + tl.arange(0, BLOCK_CI)
    co = co_block * BLOCK_CO + tl.arange(0, BLOCK_CO)
    ci_ok = ci < cg_in
    co_ok = co < cg_out
    split = tl.program_id(1)
    start = split * rows_per_split
    end = tl.minimum(start + rows_per_split, rows)
    acc = tl.zeros((BLOCK_CI, BLOCK_CO), dtype=tl.float32)
    for m0 in range(start, end, BLOCK_M):
        m = m0 + tl.arange(0, BLOCK_M)
        src, ok = _shifted_rows(m, (m // F) % T, m % F, end, T, F, tap // KS, tap % KS, KS // 2)
        a = tl.load(X + src.to(tl.int64)[:, None] * c_in + (g * cg_in + ci)[None, :],
                    mask=ok[:, None] & ci_ok[None, :], other=0.0)
        d = tl.load(DY + m.to(tl.int64)[:, None] * c_out + (g * cg_out + co)[None, :],
                    mask=(m < end)[:, None] & co_ok[None, :], other=0.0)
        acc = tl.dot(tl.trans(a), d, acc, input_precision=DOT_PRECISION)
    base = ((split * groups + g) * KS * KS + tap).to(tl.int64) * cg_in * cg_out
    tl.store(PARTIAL + base + ci[:, None] * cg_out + co[None, :], acc, mask=ci_ok[:, None] & co_ok[None, :])


# ----------------------------------------------------------------------------------------------
# Tuning tables: (BLOCK_M, BLOCK_CI, BLOCK_CO, num_warps, num_stages), keyed on the channel
# geometry. Every GPU configuration compiles for sm_90 (bf16, 3 x 3) without register spills
# (ptxas report through cuobjdump -res-usage); 4 warps at 128 x 64 x 64 spilled. The interpreter gets one small configuration whose channel blocks are narrower than
# the test groups, so the channel loops and their masked last tiles run.
# ----------------------------------------------------------------------------------------------

_INTERPRET = interpreting()  # read once, like triton.jit, which decides at decoration time
_TUNING_KEY = ["cg_in", "cg_out", "KS"]


def _configs(gpu: list[tuple], interpreter: tuple) -> list:
    rows = [interpreter] if _INTERPRET else gpu
    return [triton.Config(dict(BLOCK_M=m, BLOCK_CI=ci, BLOCK_CO=co), num_warps=w, num_stages=s)
            for m, ci, co, w, s in rows]


def _prune_channel_blocks(configs, named_args, **kwargs):
    """Channel blocks wider than a group (rounded up to 16, the smallest dot) only add zeros."""
    ci = max(16, triton.next_power_of_2(named_args["cg_in"]))
    co = max(16, triton.next_power_of_2(named_args["cg_out"]))
    kept = [c for c in configs if c.kwargs["BLOCK_CI"] <= ci and c.kwargs["BLOCK_CO"] <= co]
    return kept or [min(configs, key=lambda c: (c.kwargs["BLOCK_CI"], c.kwargs["BLOCK_CO"]))]


_conv_fwd = triton.autotune(
    configs=_configs(
        [(128, 16, 64, 4, 3), (128, 32, 64, 4, 3), (128, 64, 64, 8, 3), (64, 64, 64, 4, 3),
         (256, 16, 64, 8, 3), (256, 32, 64, 8, 3), (128, 64, 128, 8, 3)],
        (32, 16, 16, 4, 1),
    ),
    key=_TUNING_KEY,
    prune_configs_by={"early_config_prune": _prune_channel_blocks},
)(_conv_fwd_kernel)

_conv_wgrad = triton.autotune(
    configs=_configs(
        [(128, 64, 64, 8, 3), (64, 64, 64, 4, 3), (64, 64, 64, 4, 4), (128, 32, 64, 4, 3),
         (128, 64, 128, 8, 3)],
        (16, 16, 16, 4, 1),
    ),
    key=_TUNING_KEY,
    prune_configs_by={"early_config_prune": _prune_channel_blocks},
)(_conv_wgrad_kernel)


# ----------------------------------------------------------------------------------------------
# Host wrappers
# ----------------------------------------------------------------------------------------------

_ROWS_PER_SPLIT = 16384  # weight gradient: rows one program sums (ViT-B: 6 splits x 144 tiles)


def _new_buffer(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, device=device)


def _dot_precision(dtype: torch.dtype):
    """fp32 inputs use exact fp32 products (not tf32) so they match the fp32 reference."""
    return "ieee" if dtype == torch.float32 else None


def _taps(weight: torch.Tensor, groups: int, flip: bool = False) -> torch.Tensor:
    """(C_out, C_in / G, k, k) conv weight -> (G, k, k, C_in / G, C_out / G) GEMM operands; with
    ``flip``, the input gradient's: taps reversed and (G, k, k, C_out / G, C_in / G)."""
    c_out, cg_in, k, _ = weight.shape
    w = weight.reshape(groups, c_out // groups, cg_in, k, k)
    if flip:
        return w.flip(3, 4).permute(0, 3, 4, 1, 2).contiguous()
    return w.permute(0, 3, 4, 2, 1).contiguous()


def _conv(x: torch.Tensor, taps: torch.Tensor, bias: torch.Tensor | None, grid: tuple[int, int]) -> torch.Tensor:
    """(rows, G * cg_in) contiguous -> (rows, G * cg_out) through (G, k, k, cg_in, cg_out) taps."""
    rows, c_in = x.shape
    groups, k, _, cg_in, cg_out = taps.shape
    y = _new_buffer((rows, groups * cg_out), x.dtype, x.device)
    if rows == 0:
        return y
    grid_fn = lambda meta: (triton.cdiv(rows, meta["BLOCK_M"]), groups * triton.cdiv(cg_out, meta["BLOCK_CO"]))  # noqa: E731
    _conv_fwd[grid_fn](
        x, taps, taps if bias is None else bias, y, rows, grid[0], grid[1], c_in, groups * cg_out, cg_in, cg_out,
        KS=k, HAS_BIAS=bias is not None, DOT_PRECISION=_dot_precision(x.dtype),
    )
    return y


def _weight_grad(x: torch.Tensor, grad_y: torch.Tensor, weight_shape, groups: int, grid) -> torch.Tensor:
    """dL/dW in the conv weight's (C_out, C_in / G, k, k) layout, fp32."""
    rows, c_in = x.shape
    c_out, cg_in, k, _ = weight_shape
    cg_out = c_out // groups
    if rows == 0:
        return torch.zeros(weight_shape, dtype=torch.float32, device=x.device)
    splits = triton.cdiv(rows, _ROWS_PER_SPLIT)
    partial = _new_buffer((splits, groups, k, k, cg_in, cg_out), torch.float32, x.device)
    grid_fn = lambda meta: (  # noqa: E731
        groups * k * k * triton.cdiv(cg_in, meta["BLOCK_CI"]) * triton.cdiv(cg_out, meta["BLOCK_CO"]), splits)
    _conv_wgrad[grid_fn](
        x, grad_y, partial, rows, _ROWS_PER_SPLIT, grid[0], grid[1], c_in, c_out, cg_in, cg_out, groups,
        KS=k, DOT_PRECISION=_dot_precision(x.dtype),
    )
    # (G, k, k, cg_in, cg_out) -> (G, cg_out, cg_in, k, k) = (C_out, C_in / G, k, k); contiguous
    # like the weight (with one group the reshape alone would return a strided view)
    return partial.sum(0).permute(0, 4, 3, 1, 2).reshape(weight_shape).contiguous()


def _forward(x, weight, bias, grid, groups):
    return _conv(x, _taps(weight, groups), bias, grid)


def _backward(grad_y, x, weight, grid, groups):
    """(dx, dweight, dbias) for contiguous (rows, C) tensors; dbias is computed even without a
    bias (the op returns tensors only)."""
    grad_y = grad_y.contiguous()
    dx = _conv(grad_y, _taps(weight, groups, flip=True), None, grid)
    dweight = _weight_grad(x, grad_y, weight.shape, groups, grid).to(weight.dtype)
    dbias = grad_y.sum(0, dtype=torch.float32)
    return dx, dweight, dbias


# ----------------------------------------------------------------------------------------------
# Custom op (traceable by torch.compile) and autograd
# ----------------------------------------------------------------------------------------------


@torch.library.custom_op("sslam::grouped_conv_tokens", mutates_args=())
def _conv_op(
    x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], grid_t: int, grid_f: int,  # noqa: UP045
    groups: int,
) -> torch.Tensor:
    """(rows, C_out) conv output of (rows, C_in) token rows."""
    # Contiguous as the kernel indexes them (a no-op for the wrapper's own calls).
    bias = None if bias is None else bias.contiguous()
    return _forward(x.contiguous(), weight.contiguous(), bias, (grid_t, grid_f), groups)


@_conv_op.register_fake
def _conv_fake(x, weight, bias, grid_t, grid_f, groups):
    return x.new_empty((x.shape[0], weight.shape[0]))


@torch.library.custom_op("sslam::grouped_conv_tokens_backward", mutates_args=())
def _conv_backward_op(
    grad_y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, grid_t: int, grid_f: int, groups: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dweight, dbias fp32) of :func:`_conv_op` given dL/dy."""
    return _backward(grad_y, x.contiguous(), weight.contiguous(), (grid_t, grid_f), groups)  # contiguous, as indexed


@_conv_backward_op.register_fake
def _conv_backward_fake(grad_y, x, weight, grid_t, grid_f, groups):
    return grad_y.new_empty(x.shape), weight.new_empty(weight.shape), grad_y.new_empty((grad_y.shape[1],), dtype=torch.float32)


def _bias_grad(dbias: torch.Tensor, bias_dtype) -> torch.Tensor | None:
    return None if bias_dtype is None else dbias.to(bias_dtype)


def _setup_context(ctx, inputs, output):
    x, weight, bias, grid_t, grid_f, groups = inputs
    ctx.save_for_backward(x, weight)
    ctx.geometry = (grid_t, grid_f, groups)
    ctx.bias_dtype = None if bias is None else bias.dtype


def _conv_autograd(ctx, grad_y):
    x, weight = ctx.saved_tensors
    dx, dweight, dbias = _conv_backward_op(grad_y, x, weight, *ctx.geometry)
    return dx, dweight, _bias_grad(dbias, ctx.bias_dtype), None, None, None


_conv_op.register_autograd(_conv_autograd, setup_context=_setup_context)


class _EagerConv(torch.autograd.Function):
    """The custom op's forward and backward for eager calls, which skip the op's dispatch cost
    (as :class:`sslam.kernels.attention._EagerAttention`)."""

    @staticmethod
    def forward(ctx, x, weight, bias, grid, groups):
        ctx.save_for_backward(x, weight)
        ctx.grid, ctx.groups = grid, groups
        ctx.bias_dtype = None if bias is None else bias.dtype
        return _forward(x, weight, bias, grid, groups)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y):
        x, weight = ctx.saved_tensors
        dx, dweight, dbias = _backward(grad_y, x, weight, ctx.grid, ctx.groups)
        return dx, dweight, _bias_grad(dbias, ctx.bias_dtype), None, None


def _conv_kernels(x, weight, bias, grid, groups) -> torch.Tensor:
    if call_custom_op():
        return _conv_op(x, weight, bias, grid[0], grid[1], groups)
    return _EagerConv.apply(x, weight, bias, grid, groups)


# ----------------------------------------------------------------------------------------------
# PyTorch reference (the CPU path and the baseline of tests and benchmarks)
# ----------------------------------------------------------------------------------------------


def grouped_conv_tokens_ref(x, grid, weight, bias=None, *, groups: int):
    """``F.conv2d`` on the (B, C, T, F) channels-last view of the tokens; same contract as
    :func:`grouped_conv_tokens`."""
    b, n, c = x.shape
    image = x.reshape(b, *grid, c).permute(0, 3, 1, 2)
    y = F.conv2d(image, weight, bias, padding=weight.shape[-1] // 2, groups=groups)
    return y.permute(0, 2, 3, 1).reshape(b, n, weight.shape[0])  # a view when the conv returns channels-last


# ----------------------------------------------------------------------------------------------
# Public function
# ----------------------------------------------------------------------------------------------


def check_float_tensor(name: str, t: torch.Tensor) -> None:
    """Raise a TypeError naming ``name`` unless t is a float32/float16/bfloat16 tensor."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _SUPPORTED_DTYPES:
        raise TypeError(f"{name}: dtype {t.dtype} is not one of float16, bfloat16, float32")


def check_conv_arguments(x, grid, weight, bias, groups: int) -> None:
    """Raise a ValueError/TypeError naming the argument that does not fit :func:`grouped_conv_tokens`."""
    check_float_tensor("x", x)
    check_float_tensor("weight", weight)
    if bias is not None:
        check_float_tensor("bias", bias)
    if x.dim() != 3:
        raise ValueError(f"x: expected (B, N, C) tokens, got shape {tuple(x.shape)}")
    _, n, c = x.shape
    if (not isinstance(grid, (tuple, list, torch.Size)) or len(grid) != 2
            or any(isinstance(g, bool) or not isinstance(g, numbers.Integral) or g < 1 for g in grid)
            or grid[0] * grid[1] != n):
        raise ValueError(f"grid={grid!r}: expected two positive ints (T, F) with T * F = the {n} tokens of x")
    for name, tensor in (("weight", weight), ("bias", bias)):
        if tensor is not None and tensor.device != x.device:
            raise ValueError(f"{name}: on {tensor.device}, x on {x.device}")
    # 'same' padding (k // 2 on both sides) keeps the (T, F) grid only for square, odd kernels;
    # any other kernel changes the grid and the token count silently.
    if weight.dim() != 4 or weight.shape[-1] != weight.shape[-2] or weight.shape[-1] % 2 == 0:
        raise ValueError(f"weight: expected (C_out, C_in / groups, k, k) with odd k, got shape "
                         f"{tuple(weight.shape)}")
    if isinstance(groups, bool) or not isinstance(groups, numbers.Integral):
        raise TypeError(f"groups={groups!r}: expected a positive int")
    if groups < 1 or c % groups or weight.shape[0] % groups or weight.shape[0] < groups or weight.shape[1] * groups != c:
        raise ValueError(f"groups={groups}: weight {tuple(weight.shape)} does not fit {c} input channels")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"bias: expected shape ({weight.shape[0]},), got {tuple(bias.shape)}")
    if (not torch.is_autocast_enabled(x.device.type)
            and not x.dtype == weight.dtype == (weight.dtype if bias is None else bias.dtype)):
        raise TypeError(f"x, weight and bias dtypes differ ({x.dtype}, {weight.dtype}, "
                        f"{None if bias is None else bias.dtype}); F.conv2d refuses that too")


def grouped_conv_tokens(x, grid, weight, bias=None, *, groups: int):
    """Grouped k x k convolution with 'same' zero padding of token-major grids.

    Args:
        x: (B, N, C_in) tokens in grid order (N = T * F, time-major), float32/float16/bfloat16.
        grid: (T, F), the patch grid of every row of x.
        weight: (C_out, C_in / groups, k, k) with odd k, as ``nn.Conv2d`` holds it.
        bias: None or (C_out,).
        groups: the conv's groups; C_in and C_out must be positive multiples of it.
        x, weight and bias share one dtype (outside autocast, as ``F.conv2d`` requires).

    Returns (B, N, C_out), the same as ``nn.Conv2d(..., padding=k // 2, groups=groups)`` on the
    (B, C_in, T, F) image. Differentiable in x, weight and bias. Under autocast, the inputs are
    cast to the autocast dtype, as ``F.conv2d`` is. ``SSLAM_KERNELS`` picks the Triton kernels or
    :func:`grouped_conv_tokens_ref`.
    """
    check_conv_arguments(x, grid, weight, bias, groups)
    if not use_kernels(x, weight, *(() if bias is None else (bias,))):
        return grouped_conv_tokens_ref(x, grid, weight, bias, groups=groups)
    return grouped_conv_tokens_kernels(x, grid, weight, bias, groups)


def grouped_conv_tokens_kernels(x, grid, weight, bias, groups: int) -> torch.Tensor:
    """The kernel path of :func:`grouped_conv_tokens` for arguments already checked by
    :func:`check_conv_arguments` (the decoder layer checks once and calls this)."""
    b, n, c = x.shape
    if torch.is_autocast_enabled(x.device.type):
        dtype = torch.get_autocast_dtype(x.device.type)
        x, weight = x.to(dtype), weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
    rows = x.reshape(b * n, c).contiguous()
    bias = None if bias is None else bias.contiguous()  # the kernels index every tensor as contiguous
    grid, groups = (int(grid[0]), int(grid[1])), int(groups)  # Triton takes Python ints, not numpy's
    return _conv_kernels(rows, weight.contiguous(), bias, grid, groups).reshape(b, n, weight.shape[0])
