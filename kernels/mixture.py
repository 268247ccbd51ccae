"""SSLAM mixture synthesis (SPEC 5.1) and the partner pass's token gather (SPEC 5.3), in Triton.

* :func:`mix_spectrograms` -- mixed[i] = max(x[i], x[i - 1]) outside the two non-mixed windows,
  x[i] inside them, for spectrograms (B, 1, T, F) or their p x p patches (B, N, p * p). Both layouts
  are one kernel over a (B, rows, row_size) view: a row's first frame is
  (row // ROW_DIV) * ROW_MUL (spectrogram: the row is the frame; patches: token n lies in patch
  row n // freq_patches, i.e. frames from (n // freq_patches) * p). Inside the windows the
  partner is not even read, so the traffic is one read of each clip, 53 % of a second read
  (served by L2: programs of clip b run right after those of clip b - 1) and one write. The max
  is exact, so the kernel equals the reference bit for bit in every dtype.
* :func:`gather_tokens` -- tokens[:, keep] for the teacher's pass over the clean partner (the
  tokens outside the windows, after positions are added). Its backward scatters the gradient
  into zeros; it sums repeated indices in fp32 in a fixed order (no atomics, deterministic).

Both are memory bound: the goal is the bandwidth of a device-to-device copy. Both are
``sslam::`` custom ops with fake implementations, so ``torch.compile`` traces them; the mixture
has no autograd formula (its inputs are data), the gather has one.

Order of this file: Triton kernels, host wrappers, custom ops, references, public functions.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sslam.mixing import MixWindows, mix_patches, patch_side, window_frame_mask, window_patch_rows
from sslam.mixing import mix_spectrograms as _mix_spectrograms_ref

from .switch import builds_graph, interpreting, traced, use_kernels

_SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# ----------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------


@triton.jit
def _mix_kernel(
    X, OUT, clip_size, batch, start_a, start_b, width,
    ROW_SIZE: tl.constexpr, ROW_DIV: tl.constexpr, ROW_MUL: tl.constexpr, BLOCK: tl.constexpr,
):
    """One BLOCK of elements of clip b: out[b] = x[b] in the windows, max(x[b], x[b - 1]) else."""
    pid = tl.program_id(0)
    b = tl.program_id(1)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    valid = offs < clip_size
    frame = (offs // ROW_SIZE // ROW_DIV) * ROW_MUL
    inside = ((frame >= start_a) & (frame < start_a + width)) | (
        (frame >= start_b) & (frame < start_b + width))
    base = b.to(tl.int64) * clip_size
    x = tl.load(X + base + offs, mask=valid)
    prv = (b + batch - 1) % batch
    partner = tl.load(X + prv.to(tl.int64) * clip_size + offs, mask=valid & ~inside)
    mixed = tl.where(inside, x, tl.maximum(x, partner, propagate_nan=tl.PropagateNan.ALL))
    tl.store(OUT + base + offs, mixed, mask=valid)


@triton.jit
def _gather_kernel(
    TOKENS, KEEP, OUT, num_keep, dim,
    stride_tb, stride_tn, stride_ob, stride_ok,
    BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """out[b, k, :] = tokens[b, keep[k], :] for BLOCK_K kept rows of clip b."""
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    ks = pid * BLOCK_K + tl.arange(0, BLOCK_K)
    row_ok = ks < num_keep
    rows = tl.load(KEEP + ks, mask=row_ok, other=0)
    src = TOKENS + b * stride_tb + rows[:, None] * stride_tn
    dst = OUT + b * stride_ob + ks[:, None].to(tl.int64) * stride_ok
    for d0 in range(0, dim, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        mask = row_ok[:, None] & (d < dim)[None, :]
        tl.store(dst + d[None, :], tl.load(src + d[None, :], mask=mask), mask=mask)


@triton.jit
def _scatter_kernel(
    GRAD, ORDER, BOUNDS, OUT, dim,
    stride_gb, stride_gk, stride_ob, stride_on,
    BLOCK_D: tl.constexpr,
):
    """out[b, n, :] = sum of grad[b, k, :] over the k with keep[k] == n (zeros if none).

    ``ORDER`` lists kept positions sorted by token index and ``BOUNDS[n]:BOUNDS[n + 1]`` is the
    slice of it that holds token n, so every output row is written once, without atomics.
    """
    n = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    first = tl.load(BOUNDS + n)
    last = tl.load(BOUNDS + n + 1)
    dst = OUT + b * stride_ob + n.to(tl.int64) * stride_on
    for d0 in range(0, dim, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        mask = d < dim
        acc = tl.zeros((BLOCK_D,), tl.float32)
        for j in range(first, last):
            k = tl.load(ORDER + j)
            acc += tl.load(GRAD + b * stride_gb + k * stride_gk + d, mask=mask).to(tl.float32)
        tl.store(dst + d, acc.to(OUT.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------
# Host wrappers
# ----------------------------------------------------------------------------------------------


def _new_buffer(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Uninitialised output buffer: every element is written by a kernel."""
    return torch.empty(shape, dtype=dtype, device=device)


def _mix_block() -> tuple[int, int]:
    """(elements per program, warps): 4096 x 4-byte loads keep enough bytes in flight on a GPU."""
    return (1024, 4) if interpreting() else (4096, 8)


def _launch_mix(x: torch.Tensor, start_a: int, start_b: int, width: int, row_size: int,
                row_div: int, row_mul: int) -> torch.Tensor:
    x = x.contiguous()
    out = _new_buffer(x.shape, x.dtype, x.device)
    batch = x.shape[0]
    clip_size = x.numel() // batch
    block, warps = _mix_block()
    grid = (triton.cdiv(clip_size, block), batch)
    _mix_kernel[grid](
        x, out, clip_size, batch, start_a, start_b, width,
        ROW_SIZE=row_size, ROW_DIV=row_div, ROW_MUL=row_mul, BLOCK=block, num_warps=warps,
    )
    return out


def _gather_blocks(dim: int) -> tuple[int, int]:
    """(rows, columns) per gather program: ~4096 elements, a row of up to 1024 at a time."""
    block_d = min(1024, triton.next_power_of_2(dim))
    return max(1, 4096 // block_d), block_d


def _launch_gather(tokens: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    if tokens.stride(-1) != 1:
        tokens = tokens.contiguous()
    # The kernel reads keep[k] at KEEP + k: a strided view would give it other entries.
    keep = keep.contiguous()
    batch, _, dim = tokens.shape
    num_keep = keep.numel()
    out = _new_buffer((batch, num_keep, dim), tokens.dtype, tokens.device)
    if num_keep == 0 or batch == 0 or dim == 0:  # nothing to copy (and no block size for D = 0)
        return out
    block_k, block_d = _gather_blocks(dim)
    _gather_kernel[(triton.cdiv(num_keep, block_k), batch)](
        tokens, keep, out, num_keep, dim,
        tokens.stride(0), tokens.stride(1), out.stride(0), out.stride(1),
        BLOCK_K=block_k, BLOCK_D=block_d, num_warps=4,
    )
    return out


def _launch_scatter(grad: torch.Tensor, keep: torch.Tensor, num_tokens: int) -> torch.Tensor:
    if grad.stride(-1) != 1:
        grad = grad.contiguous()
    batch, _, dim = grad.shape
    out = _new_buffer((batch, num_tokens, dim), grad.dtype, grad.device)
    if num_tokens == 0 or batch == 0 or dim == 0:
        return out
    # Group the kept positions by token index (stable: a fixed summation order).
    sorted_keep, order = torch.sort(keep, stable=True)
    bounds = torch.searchsorted(
        sorted_keep, torch.arange(num_tokens + 1, device=keep.device, dtype=keep.dtype)
    )
    _scatter_kernel[(num_tokens, batch)](
        grad, order, bounds, out, dim,
        grad.stride(0), grad.stride(1), out.stride(0), out.stride(1),
        BLOCK_D=min(1024, triton.next_power_of_2(dim)), num_warps=4,
    )
    return out


# ----------------------------------------------------------------------------------------------
# Custom ops
# ----------------------------------------------------------------------------------------------


@torch.library.custom_op("sslam::mix_rows", mutates_args=())
def _mix_rows_op(x: torch.Tensor, start_a: int, start_b: int, width: int, row_size: int,
                 row_div: int, row_mul: int) -> torch.Tensor:
    """SSLAM mixtures of a (B, ...) tensor read as (B, rows, row_size) (see the module doc)."""
    return _launch_mix(x, start_a, start_b, width, row_size, row_div, row_mul)


@_mix_rows_op.register_fake
def _mix_rows_fake(x, start_a, start_b, width, row_size, row_div, row_mul):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.custom_op("sslam::gather_tokens", mutates_args=())
def _gather_tokens_op(tokens: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """(B, N, D), (K,) int64 -> (B, K, D) = tokens[:, keep]."""
    # Checked here, where it runs under torch.compile too: the kernel does not bound its reads.
    if keep.numel():
        _check_indices(keep, tokens.shape[1])
    return _launch_gather(tokens, keep)


@_gather_tokens_op.register_fake
def _gather_tokens_fake(tokens, keep):
    return tokens.new_empty((tokens.shape[0], keep.shape[0], tokens.shape[2]))


@torch.library.custom_op("sslam::gather_tokens_backward", mutates_args=())
def _gather_tokens_backward_op(grad: torch.Tensor, keep: torch.Tensor,
                               num_tokens: int) -> torch.Tensor:
    """(B, K, D) gradient of the gather -> (B, num_tokens, D), zero on tokens not kept."""
    return _launch_scatter(grad, keep, num_tokens)


@_gather_tokens_backward_op.register_fake
def _gather_tokens_backward_fake(grad, keep, num_tokens):
    return grad.new_empty((grad.shape[0], num_tokens, grad.shape[2]))


def _gather_setup_context(ctx, inputs, output):
    tokens, keep = inputs
    ctx.save_for_backward(keep)
    ctx.num_tokens = tokens.shape[1]


def _gather_backward(ctx, grad):
    (keep,) = ctx.saved_tensors
    return _gather_tokens_backward_op(grad, keep, ctx.num_tokens), None


_gather_tokens_op.register_autograd(_gather_backward, setup_context=_gather_setup_context)


# ----------------------------------------------------------------------------------------------
# References (the CPU path and the baseline of tests and benchmarks)
# ----------------------------------------------------------------------------------------------


def mix_spectrograms_ref(spec: torch.Tensor, windows: MixWindows) -> torch.Tensor:
    """(B, 1, T, F) -> (B, 1, T, F): :func:`sslam.mixing.mix_spectrograms`."""
    return _mix_spectrograms_ref(spec, windows)


def mix_patches_ref(patches: torch.Tensor, windows: MixWindows,
                    freq_patches: int = 8) -> torch.Tensor:
    """(B, N, P) -> (B, N, P): :func:`sslam.mixing.mix_patches`."""
    return mix_patches(patches, windows, freq_patches)


def gather_tokens_ref(tokens: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """(B, N, D), (K,) -> (B, K, D): ``tokens[:, keep]``."""
    return tokens[:, keep]


# ----------------------------------------------------------------------------------------------
# Public functions
# ----------------------------------------------------------------------------------------------


def _check_dtype(name: str, t: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _SUPPORTED_DTYPES:
        raise ValueError(f"{name}: dtype {t.dtype} not supported; expected one of "
                         f"{_SUPPORTED_DTYPES}")


def mix_spectrograms(
    spec_or_patches: torch.Tensor, windows: MixWindows, *, freq_patches: int = 8
) -> torch.Tensor:
    """SSLAM mixtures: clip i with clip i - 1, unmixed inside the two windows.

    Args:
        spec_or_patches: spectrograms (B, 1, T, F) or p x p patches (B, N, p * p), 256 for
            16 x 16 (token n in patch row n // freq_patches), fp32 / fp16 / bf16.
        windows: the non-mixed windows in frames (aligned to p for the patch layout).
        freq_patches: patches per row, for the patch layout.

    Returns:
        A new tensor of the same shape and dtype, equal to
        :func:`sslam.mixing.mix_spectrograms` / :func:`sslam.mixing.mix_patches`. The kernel
        has no backward: an input that requires grad takes the (differentiable) reference.
    """
    x = spec_or_patches
    _check_dtype("spec_or_patches", x)
    if x.dim() == 4:
        if x.shape[1] != 1:
            # The kernel takes row index = frame, which holds for one channel only (with C
            # channels, row c * T + t is frame t).
            raise ValueError(
                f"spec_or_patches: expected (B, 1, T, F) spectrograms, got shape {tuple(x.shape)}"
            )
        window_frame_mask(windows, x.shape[2])  # validates that the windows fit
        geometry = (x.shape[3], 1, 1)
        reference = mix_spectrograms_ref
    elif x.dim() == 3:
        # else a ZeroDivisionError, nonsense, or the custom op's schema error from below
        if isinstance(freq_patches, bool) or not isinstance(freq_patches, int) or freq_patches < 1:
            raise ValueError(f"freq_patches={freq_patches!r}: expected a positive number of "
                             "patches per row")
        patch = patch_side(x, freq_patches, "spec_or_patches")
        window_patch_rows(windows, patch)  # validates the alignment
        if windows.end > x.shape[1] // freq_patches * patch:
            raise ValueError(
                f"windows {windows}: the second window ends at frame {windows.end}, past the "
                f"{x.shape[1] // freq_patches * patch} frames of the patches"
            )
        geometry = (x.shape[2], freq_patches, patch)

        def reference(p, w):
            return mix_patches_ref(p, w, freq_patches)
    else:
        raise ValueError(
            "spec_or_patches: expected spectrograms (B, 1, T, F) or patches (B, N, P), got "
            f"shape {tuple(x.shape)}"
        )
    if not use_kernels(x) or x.shape[0] == 0 or builds_graph(x):
        return reference(x, windows)
    start_a, start_b = windows.starts
    return _mix_rows_op(x, start_a, start_b, windows.width, *geometry)


def _check_indices(keep: torch.Tensor, num_tokens: int) -> None:
    """Raise unless every index lies in [0, num_tokens). On a GPU, and in a traced call, the
    check is a device-side assertion (no host sync): a bad index fails the next synchronising
    call, as torch's own indexing does."""
    in_range = ((keep >= 0) & (keep < num_tokens)).all()
    if keep.is_cuda or traced(keep):  # a traced call cannot read the values either
        torch._assert_async(in_range, f"gather_tokens: keep indices must lie in [0, {num_tokens})")
    elif not bool(in_range):
        raise ValueError(f"keep: indices must lie in [0, {num_tokens}), got "
                         f"[{int(keep.min())}, {int(keep.max())}]")


def gather_tokens(tokens: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """``tokens[:, keep]``: the partner pass's input (tokens outside the windows).

    Args:
        tokens: (B, N, D) fp32 / fp16 / bf16, any strides.
        keep: (K,) int64 token indices in [0, N) (ascending and distinct in SSLAM, but any
            order and repeats are allowed), on the device of ``tokens``.

    Returns:
        (B, K, D), differentiable: the gradient of a token is the sum of the gradients of its
        copies (zero if not kept). Index values are checked, under ``torch.compile`` too (on a
        GPU by a device-side assertion, without a host sync).
    """
    _check_dtype("tokens", tokens)
    if tokens.dim() != 3:
        raise ValueError(f"tokens: expected (B, N, D), got shape {tuple(tokens.shape)}")
    if not isinstance(keep, torch.Tensor) or keep.dim() != 1 or keep.dtype != torch.int64:
        got = f"{keep.dtype} {tuple(keep.shape)}" if isinstance(keep, torch.Tensor) else type(keep).__name__
        raise ValueError(f"keep: expected a (K,) int64 tensor, got {got}")
    if keep.device != tokens.device:
        raise ValueError(f"keep: on {keep.device}, tokens on {tokens.device}")
    if not use_kernels(tokens, keep):
        if keep.numel():  # a negative index would read from the end, not fail
            _check_indices(keep, tokens.shape[1])
        return gather_tokens_ref(tokens, keep)
    return _gather_tokens_op(tokens, keep)
