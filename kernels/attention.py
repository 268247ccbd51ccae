"""Attention over the kept tokens: FlashAttention-2 style Triton kernels, forward and backward.

The SSLAM/EAT encoder runs bidirectional (non-causal) softmax attention on sequences whose lengths
are not multiples of any block size: 103 tokens for the masked student clones (102 kept + CLS),
513 for the teacher, 273 for the stage-2 partner pass. Embedding extraction either pads clips of
different lengths to one length (``key_padding_mask``) or packs them back to back (varlen).

Math (per batch entry b and head h, scale ``s`` = Dh^-0.5 unless given)::

    S = s * Q K^T                      (L, L), padded keys set to -inf
    P = softmax(S, dim=-1)             rows whose keys are all padded give P = 0 (output zeros)
    O = P V                            (L, Dh)

The kernels never build S or P in memory. The forward streams key blocks through an online
softmax and saves one fp32 log-sum-exp per query row; the backward recomputes P block by block
from it (dV = P^T dO, dP = dO V^T, dS = P * (dP - rowsum(dO * O)), dQ = s dS K, dK = s dS^T Q).

Two paths, chosen on the host from the (static) maximum sequence length:

* **single block** (max length <= ``SINGLE_BLOCK_MAX_SEQLEN``, the student's 103 tokens): one key
  block holds the whole sequence, so the forward softmax runs once with no rescaling, and one
  backward program per (batch, head) owns every key: it computes dK, dV *and* dQ in one launch,
  with no atomics and no separate pass for rowsum(dO * O).
* **general** (teacher, partner, long clips, and fp32 inputs on a GPU): forward over (query
  block, head, batch) programs; backward as a dQ kernel (which also stores rowsum(dO * O))
  followed by a dK/dV kernel.

Block sizes are autotuned per (sequence-length bucket, head dim, dtype) on the first call with
a new key, timing each candidate by CUDA-graph replay; make that first call outside any CUDA
graph capture (a warm-up step does).

Layouts: padded mode takes q, k, v of shape (B, L, H, Dh) with any strides whose last one is 1,
so they can be views of one packed (B, L, 3, H, Dh) projection; varlen mode takes (T, H, Dh) plus
``cu_seqlens`` (B + 1,) int32. Outputs are contiguous. Inputs fp16/bf16 (fp32 for tests and CPU);
dot products accumulate in fp32 and the softmax statistics are fp32.

Order of this file: private ``@triton.jit`` kernels, autotuning tables, host wrappers, the
``sslam::`` custom ops with their fake (shape) implementations and autograd (plus the eager
autograd.Function that skips the custom-op dispatch cost), the PyTorch references, then the
public functions.
"""

import math
from numbers import Real

# typing.Optional (not `X | None`) in the custom-op signatures below: the schema inference of
# every supported torch version understands it.
from typing import Optional

import torch
import triton
import triton.language as tl

from .switch import call_custom_op, interpreting, traced, use_kernels

# Sequences up to this length take the single-block path (one key block holds every key).
SINGLE_BLOCK_MAX_SEQLEN = 128
# The largest head dimension the kernels accept (registers hold whole rows of Q, K, V).
MAX_HEAD_DIM = 128

_LOG2E = 1.4426950408889634
_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# ----------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------


@triton.jit
def _sequence_span(CU_SEQLENS, b, seqlen, IS_VARLEN: tl.constexpr):
    """(first row, length) of sequence ``b``.

    Packed (varlen) batches read both from ``cu_seqlens``; padded batches start each sequence at
    row 0 of its own batch entry (the batch stride does the rest) and all have length ``seqlen``.
    The first row is int64 because ``first * row_stride`` can pass 2**31 in large packed batches.
    """
    if IS_VARLEN:
        first = tl.load(CU_SEQLENS + b)
        length = tl.load(CU_SEQLENS + b + 1) - first
    else:
        first = b * 0
        length = b * 0 + seqlen
    return first.to(tl.int64), length


@triton.jit
def _load_rows(base, rows, stride_row, length, offs_d, HEAD_DIM: tl.constexpr,
               BLOCK_D: tl.constexpr):
    """Load a (len(rows), BLOCK_D) tile; rows >= ``length`` and columns >= HEAD_DIM read as 0."""
    ptrs = base + rows[:, None] * stride_row + offs_d[None, :]
    if BLOCK_D == HEAD_DIM:
        # No column mask at all for power-of-two head dims, so loads stay fully vectorised.
        mask = rows[:, None] < length
    else:
        mask = (rows[:, None] < length) & (offs_d[None, :] < HEAD_DIM)
    return tl.load(ptrs, mask=mask, other=0.0)


@triton.jit
def _load_full_rows(base, rows, stride_row, offs_d, HEAD_DIM: tl.constexpr,
                    BLOCK_D: tl.constexpr):
    """Like :func:`_load_rows` for rows known to lie inside the sequence: no row mask."""
    ptrs = base + rows[:, None] * stride_row + offs_d[None, :]
    if BLOCK_D == HEAD_DIM:
        tile = tl.load(ptrs)
    else:
        tile = tl.load(ptrs, mask=offs_d[None, :] < HEAD_DIM, other=0.0)
    return tile


@triton.jit
def _store_rows(base, tile, rows, stride_row, length, offs_d, HEAD_DIM: tl.constexpr,
                BLOCK_D: tl.constexpr):
    """Store a (len(rows), BLOCK_D) tile, skipping rows >= ``length`` and columns >= HEAD_DIM."""
    ptrs = base + rows[:, None] * stride_row + offs_d[None, :]
    if BLOCK_D == HEAD_DIM:
        mask = rows[:, None] < length
    else:
        mask = (rows[:, None] < length) & (offs_d[None, :] < HEAD_DIM)
    tl.store(ptrs, tile.to(base.dtype.element_ty), mask=mask)


@triton.jit
def _valid_keys(KEY_PADDING, b, stride_pad_b, cols, length, HAS_PADDING: tl.constexpr):
    """(len(cols),) bool: the key exists (col < length) and is not padded."""
    valid = cols < length
    if HAS_PADDING:
        padded = tl.load(KEY_PADDING + b.to(tl.int64) * stride_pad_b + cols, mask=valid, other=1)
        valid = valid & (padded == 0)
    return valid


@triton.jit
def _fwd_key_block(q, k_base, v_base, KEY_PADDING, b, stride_kl, stride_vl, stride_pad_b,
                   start_n, length, qk_scale, m_i, l_i, acc, offs_n, offs_d,
                   HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, MASKED: tl.constexpr,
                   HAS_PADDING: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """One online-softmax step over the key block at ``start_n``; returns (m_i, l_i, acc).

    Scores are kept in base 2: qk_scale = scale * log2(e), so exp(scale * x) = exp2(qk_scale * x)
    and each probability costs one ex2 instruction instead of a multiply plus ex2. MASKED handles
    keys past the end and padded keys; unmasked blocks must lie wholly inside the sequence.
    """
    cols = start_n + offs_n
    if MASKED:
        k = _load_rows(k_base, cols, stride_kl, length, offs_d, HEAD_DIM, BLOCK_D)
        v = _load_rows(v_base, cols, stride_vl, length, offs_d, HEAD_DIM, BLOCK_D)
    else:
        k = _load_full_rows(k_base, cols, stride_kl, offs_d, HEAD_DIM, BLOCK_D)
        v = _load_full_rows(v_base, cols, stride_vl, offs_d, HEAD_DIM, BLOCK_D)
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
    if MASKED:
        valid = _valid_keys(KEY_PADDING, b, stride_pad_b, cols, length, HAS_PADDING)
        s = tl.where(valid[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    if MASKED:
        # A row whose keys so far are all padded has m_new = -inf; subtracting 0 instead keeps
        # 2^(-inf - m) at 0 rather than NaN.
        m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        m_shift = m_new
    p = tl.exp2(s - m_shift[:, None])
    alpha = tl.exp2(m_i - m_shift)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return m_new, l_i, acc


@triton.jit
def _attention_fwd_kernel(
    Q, K, V, O, LSE, KEY_PADDING, CU_SEQLENS,
    stride_qb, stride_ql, stride_qh,
    stride_kb, stride_kl, stride_kh,
    stride_vb, stride_vl, stride_vh,
    stride_ob, stride_ol, stride_oh,
    stride_lse_b, stride_lse_h, stride_pad_b,
    seqlen, qk_scale,
    SEQLEN_BUCKET: tl.constexpr,  # autotuning key only
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    IS_VARLEN: tl.constexpr, HAS_PADDING: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """One program: BLOCK_M query rows of one (batch, head); streams all key blocks.

    Writes O rows (Dh values in the input dtype) and LSE rows (fp32, base 2: log2 sum 2^(s*S)).
    """
    pid_m = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    first, length = _sequence_span(CU_SEQLENS, b, seqlen, IS_VARLEN)
    start_m = pid_m * BLOCK_M
    if start_m >= length:  # packed batches: shorter sequences need fewer query blocks
        return

    b64 = b.to(tl.int64)
    q_base = Q + b64 * stride_qb + first * stride_ql + h * stride_qh
    k_base = K + b64 * stride_kb + first * stride_kl + h * stride_kh
    v_base = V + b64 * stride_vb + first * stride_vl + h * stride_vh
    o_base = O + b64 * stride_ob + first * stride_ol + h * stride_oh
    lse_base = LSE + b64 * stride_lse_b + h * stride_lse_h + first

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    q = _load_rows(q_base, offs_m, stride_ql, length, offs_d, HEAD_DIM, BLOCK_D)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)  # running row maximum
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)  # running row sum of 2^(s - m_i)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    # Key blocks wholly inside the sequence skip the bounds mask (a compare and a select per
    # score, a real cost next to one ex2 at head dim 64); only the last partial block, or every
    # block when a padding mask must be applied anyway, takes the masked variant.
    if HAS_PADDING:
        unmasked_end = 0
    else:
        unmasked_end = (length // BLOCK_N) * BLOCK_N
    for start_n in range(0, unmasked_end, BLOCK_N):
        m_i, l_i, acc = _fwd_key_block(
            q, k_base, v_base, KEY_PADDING, b, stride_kl, stride_vl, stride_pad_b, start_n,
            length, qk_scale, m_i, l_i, acc, offs_n, offs_d, HEAD_DIM, BLOCK_D, False,
            HAS_PADDING, DOT_PRECISION,
        )
    for start_n in range(unmasked_end, length, BLOCK_N):
        m_i, l_i, acc = _fwd_key_block(
            q, k_base, v_base, KEY_PADDING, b, stride_kl, stride_vl, stride_pad_b, start_n,
            length, qk_scale, m_i, l_i, acc, offs_n, offs_d, HEAD_DIM, BLOCK_D, True,
            HAS_PADDING, DOT_PRECISION,
        )

    has_keys = l_i > 0.0
    l_safe = tl.where(has_keys, l_i, 1.0)
    out = acc / l_safe[:, None]
    # +inf for rows without any key makes the backward's 2^(s - lse) exactly 0 for them.
    lse = tl.where(has_keys, m_i + tl.log2(l_safe), float("inf"))
    _store_rows(o_base, out, offs_m, stride_ol, length, offs_d, HEAD_DIM, BLOCK_D)
    tl.store(lse_base + offs_m, lse, mask=offs_m < length)


@triton.jit
def _attention_bwd_dq_kernel(
    Q, K, V, O, DO, DQ, LSE, DELTA, KEY_PADDING, CU_SEQLENS,
    stride_qb, stride_ql, stride_qh,
    stride_kb, stride_kl, stride_kh,
    stride_vb, stride_vl, stride_vh,
    stride_ob, stride_ol, stride_oh,
    stride_dob, stride_dol, stride_doh,
    stride_dqb, stride_dql, stride_dqh,
    stride_lse_b, stride_lse_h, stride_pad_b,
    seqlen, qk_scale, sm_scale,
    SEQLEN_BUCKET: tl.constexpr,  # autotuning key only
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    IS_VARLEN: tl.constexpr, HAS_PADDING: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """One program: dQ for BLOCK_M query rows of one (batch, head), streaming all key blocks.

    Also stores delta = rowsum(dO * O) (fp32, LSE layout) for the dK/dV kernel that runs next:
    this program has those rows of dO and O at hand anyway, which saves a separate pass.
    """
    pid_m = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    first, length = _sequence_span(CU_SEQLENS, b, seqlen, IS_VARLEN)
    start_m = pid_m * BLOCK_M
    if start_m >= length:
        return

    b64 = b.to(tl.int64)
    q_base = Q + b64 * stride_qb + first * stride_ql + h * stride_qh
    k_base = K + b64 * stride_kb + first * stride_kl + h * stride_kh
    v_base = V + b64 * stride_vb + first * stride_vl + h * stride_vh
    o_base = O + b64 * stride_ob + first * stride_ol + h * stride_oh
    do_base = DO + b64 * stride_dob + first * stride_dol + h * stride_doh
    dq_base = DQ + b64 * stride_dqb + first * stride_dql + h * stride_dqh
    row_offset = b64 * stride_lse_b + h * stride_lse_h + first

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    rows_ok = offs_m < length
    q = _load_rows(q_base, offs_m, stride_ql, length, offs_d, HEAD_DIM, BLOCK_D)
    do = _load_rows(do_base, offs_m, stride_dol, length, offs_d, HEAD_DIM, BLOCK_D)
    o = _load_rows(o_base, offs_m, stride_ol, length, offs_d, HEAD_DIM, BLOCK_D)
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
    tl.store(DELTA + row_offset + offs_m, delta, mask=rows_ok)
    lse = tl.load(LSE + row_offset + offs_m, mask=rows_ok, other=float("inf"))

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start_n in range(0, length, BLOCK_N):
        cols = start_n + offs_n
        k = _load_rows(k_base, cols, stride_kl, length, offs_d, HEAD_DIM, BLOCK_D)
        v = _load_rows(v_base, cols, stride_vl, length, offs_d, HEAD_DIM, BLOCK_D)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        valid = _valid_keys(KEY_PADDING, b, stride_pad_b, cols, length, HAS_PADDING)
        p = tl.where(valid[None, :], tl.exp2(s - lse[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION)

    _store_rows(dq_base, dq * sm_scale, offs_m, stride_dql, length, offs_d, HEAD_DIM, BLOCK_D)


@triton.jit
def _attention_bwd_dkdv_kernel(
    Q, K, V, O, DO, DQ, DK, DV, LSE, DELTA, KEY_PADDING, CU_SEQLENS,
    stride_qb, stride_ql, stride_qh,
    stride_kb, stride_kl, stride_kh,
    stride_vb, stride_vl, stride_vh,
    stride_ob, stride_ol, stride_oh,
    stride_dob, stride_dol, stride_doh,
    stride_dqb, stride_dql, stride_dqh,
    stride_dkb, stride_dkl, stride_dkh,
    stride_dvb, stride_dvl, stride_dvh,
    stride_lse_b, stride_lse_h, stride_pad_b,
    seqlen, qk_scale, sm_scale,
    SEQLEN_BUCKET: tl.constexpr,  # autotuning key only
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    IS_VARLEN: tl.constexpr, HAS_PADDING: tl.constexpr, DOT_PRECISION: tl.constexpr,
    FUSE_DQ: tl.constexpr,
):
    """One program: dK, dV for BLOCK_N key rows of one (batch, head), streaming query blocks.

    Works on transposed scores (keys x queries) so that dV = P^T dO and dK = dS^T Q need no
    transposes of the large tiles. With FUSE_DQ (the single-block path: BLOCK_N covers every key
    of the sequence) each query block's dQ = dS K is complete inside this program, so it is
    stored directly, and delta = rowsum(dO * O) is computed on the fly instead of read.
    """
    pid_n = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    first, length = _sequence_span(CU_SEQLENS, b, seqlen, IS_VARLEN)
    start_n = pid_n * BLOCK_N
    if start_n >= length:
        return

    b64 = b.to(tl.int64)
    q_base = Q + b64 * stride_qb + first * stride_ql + h * stride_qh
    k_base = K + b64 * stride_kb + first * stride_kl + h * stride_kh
    v_base = V + b64 * stride_vb + first * stride_vl + h * stride_vh
    do_base = DO + b64 * stride_dob + first * stride_dol + h * stride_doh
    dk_base = DK + b64 * stride_dkb + first * stride_dkl + h * stride_dkh
    dv_base = DV + b64 * stride_dvb + first * stride_dvl + h * stride_dvh
    row_offset = b64 * stride_lse_b + h * stride_lse_h + first

    cols = start_n + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    k = _load_rows(k_base, cols, stride_kl, length, offs_d, HEAD_DIM, BLOCK_D)
    v = _load_rows(v_base, cols, stride_vl, length, offs_d, HEAD_DIM, BLOCK_D)
    valid = _valid_keys(KEY_PADDING, b, stride_pad_b, cols, length, HAS_PADDING)

    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for start_m in range(0, length, BLOCK_M):
        rows = start_m + offs_m
        rows_ok = rows < length
        q = _load_rows(q_base, rows, stride_ql, length, offs_d, HEAD_DIM, BLOCK_D)
        do = _load_rows(do_base, rows, stride_dol, length, offs_d, HEAD_DIM, BLOCK_D)
        # Rows past the end read lse = +inf, so their probabilities are exactly 0.
        lse = tl.load(LSE + row_offset + rows, mask=rows_ok, other=float("inf"))
        if FUSE_DQ:
            o_base = O + b64 * stride_ob + first * stride_ol + h * stride_oh
            o = _load_rows(o_base, rows, stride_ol, length, offs_d, HEAD_DIM, BLOCK_D)
            delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
        else:
            delta = tl.load(DELTA + row_offset + rows, mask=rows_ok, other=0.0)

        s_t = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * qk_scale
        p_t = tl.where(valid[:, None], tl.exp2(s_t - lse[None, :]), 0.0)
        dv += tl.dot(p_t.to(do.dtype), do, input_precision=DOT_PRECISION)
        dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
        dk += tl.dot(ds_t.to(q.dtype), q, input_precision=DOT_PRECISION)
        if FUSE_DQ:
            dq = tl.dot(tl.trans(ds_t.to(k.dtype)), k, input_precision=DOT_PRECISION)
            dq_base = DQ + b64 * stride_dqb + first * stride_dql + h * stride_dqh
            _store_rows(dq_base, dq * sm_scale, rows, stride_dql, length, offs_d, HEAD_DIM,
                        BLOCK_D)

    _store_rows(dk_base, dk * sm_scale, cols, stride_dkl, length, offs_d, HEAD_DIM, BLOCK_D)
    _store_rows(dv_base, dv, cols, stride_dvl, length, offs_d, HEAD_DIM, BLOCK_D)


# ----------------------------------------------------------------------------------------------
# Autotuning tables. Keyed on (sequence-length bucket, head dim) plus the dtypes. The interpreter
# gets a single small, deliberately unequal (BLOCK_M != BLOCK_N) configuration: nothing is
# benchmarked, several partial blocks occur at test sizes, and a mixed-up block index shows.
# ----------------------------------------------------------------------------------------------

_INTERPRET = interpreting()  # read once, like triton.jit, which decides at decoration time
_TUNING_KEY = ["SEQLEN_BUCKET", "HEAD_DIM"]


def _config(row: tuple, names: tuple[str, ...]) -> triton.Config:
    """triton.Config from a (*block sizes, num_warps, num_stages) tuple."""
    return triton.Config(dict(zip(names, row[:-2])), num_warps=row[-2], num_stages=row[-1])


def _gpu_configs(half: list[tuple], fp32, names: tuple[str, ...]) -> list:
    """The configurations for 16-bit inputs (``half``) and for fp32 ones, each row once (a row
    may be in both lists); :func:`_dtype_pruner` picks the inputs' own. They are plain
    configurations: Triton's on-disk autotuning cache rebuilds them as ``Config(**c.__dict__)``,
    which refuses any attribute of ours.

    fp32 inputs take exact fp32 dots ("ieee"), which run as FMAs rather than on the tensor
    cores, so the compiler unrolls every tile product: ahead-of-time compiles for sm_90 (triton
    3.8, head dim 80) of the 16-bit tiles in fp32 took 5-39 s each and spilled 7-34 kB of
    registers per thread, and half of them needed more shared memory than the card has. The
    fp32 rows compile in about 2 s without spilling. (The single-block kernels, which hold a
    whole 128-key block, spilled in every fp32 configuration tried: :func:`_single_block`.)"""
    return [_config(row, names) for row in dict.fromkeys([*half, *fp32])]  # ordered union


def _row(config: triton.Config) -> tuple:
    """A configuration as its table lists it: (*block sizes, num_warps, num_stages)."""
    return (*config.kwargs.values(), config.num_warps, config.num_stages)


def _dtype_pruner(half: list[tuple], fp32, single_block: bool = False):
    """autotune's early_config_prune: the configurations listed for the inputs' dtype (all of
    them where it lists none, as the interpreter's), and on the single-block path none whose
    query block is larger than the whole (bucketed) sequence, which is waste."""
    def prune(configs, named_args, **kwargs):
        rows = fp32 if named_args["Q"].dtype == torch.float32 else half
        kept = [c for c in configs if _row(c) in rows] or configs
        if not single_block:
            return kept
        bucket = kwargs.get("SEQLEN_BUCKET", named_args.get("SEQLEN_BUCKET"))
        return [c for c in kept if c.kwargs["BLOCK_M"] <= bucket] or [min(kept, key=lambda c: c.kwargs["BLOCK_M"])]
    return prune


def _tuning(half: list[tuple], interpreter: tuple, names: tuple[str, ...], fp32: tuple = (),
            single_block: bool = False) -> dict:
    """triton.autotune's configs and prune_configs_by: the interpreter's single configuration,
    or :func:`_gpu_configs` and their :func:`_dtype_pruner`."""
    configs = [_config(interpreter, names)] if _INTERPRET else _gpu_configs(half, fp32, names)
    return {"configs": configs, "prune_configs_by": {"early_config_prune": _dtype_pruner(half, fp32, single_block)}}


def _graph_bench(kernel_call, quantiles):
    """Autotuning timer: CUDA-graph replays of one config.

    The student's kernels run for ~50-150 us, about as long as a Python-side Triton launch, so
    the default event timer would largely time the launch and pick configs at random.
    """
    from triton.testing import do_bench_cudagraph

    return do_bench_cudagraph(kernel_call, quantiles=quantiles)


# Forward, general path: (BLOCK_M, BLOCK_N, num_warps, num_stages).
_fwd_general = triton.autotune(
    **_tuning(
        [(128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3), (64, 64, 4, 3), (64, 128, 4, 3)],
        (32, 16, 4, 1), ("BLOCK_M", "BLOCK_N"), fp32=[(32, 32, 8, 2)],
    ),
    key=_TUNING_KEY,
    do_bench=_graph_bench,
)(_attention_fwd_kernel)

# Forward, single-block path: BLOCK_N is the whole bucketed sequence; (BLOCK_M, warps, stages).
_fwd_single_block = triton.autotune(
    **_tuning(
        [(128, 8, 1), (64, 4, 1), (64, 8, 1), (32, 4, 1)], (32, 4, 1), ("BLOCK_M",), single_block=True
    ),
    key=_TUNING_KEY,
    do_bench=_graph_bench,
)(_attention_fwd_kernel)

# Backward dQ (+ delta), general path: (BLOCK_M, BLOCK_N, warps, stages).
_bwd_dq_general = triton.autotune(
    **_tuning(
        [(64, 64, 4, 3), (128, 64, 8, 3), (64, 128, 8, 3), (64, 32, 4, 3)],
        (32, 16, 4, 1), ("BLOCK_M", "BLOCK_N"), fp32=[(32, 32, 8, 2)],
    ),
    key=_TUNING_KEY,
    do_bench=_graph_bench,
)(_attention_bwd_dq_kernel)

# Backward dK/dV, general path: (BLOCK_M, BLOCK_N, warps, stages).
_bwd_dkdv_general = triton.autotune(
    **_tuning(
        [(32, 64, 4, 3), (64, 64, 4, 3), (64, 128, 8, 3), (32, 128, 8, 3)],
        (16, 32, 4, 1), ("BLOCK_M", "BLOCK_N"), fp32=[(32, 32, 8, 2)],
    ),
    key=_TUNING_KEY,
    do_bench=_graph_bench,
)(_attention_bwd_dkdv_kernel)

# Backward, single-block path (dK, dV and dQ in one program per (batch, head)):
# BLOCK_N is the whole bucketed sequence; (BLOCK_M, warps, stages).
_bwd_single_block = triton.autotune(
    **_tuning(
        [(16, 8, 1), (32, 8, 1), (32, 8, 2), (64, 8, 1), (64, 8, 2)],
        (32, 4, 1), ("BLOCK_M",), single_block=True,
    ),
    key=_TUNING_KEY,
    do_bench=_graph_bench,
)(_attention_bwd_dkdv_kernel)


# ----------------------------------------------------------------------------------------------
# Host wrappers: validate layouts, allocate, launch
# ----------------------------------------------------------------------------------------------


def _new_buffer(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Uninitialised output buffer: every element is written by a kernel."""
    return torch.empty(shape, dtype=dtype, device=device)


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself when its rows are contiguous (any other strides are fine), else a copy."""
    return t if t.stride(-1) == 1 else t.contiguous()


def _row_strides(t: torch.Tensor, is_varlen: bool) -> tuple[int, int, int]:
    """(batch, row, head) strides of (B, L, H, Dh) or, packed, (T, H, Dh) (batch stride 0)."""
    if is_varlen:
        return 0, t.stride(0), t.stride(1)
    return t.stride(0), t.stride(1), t.stride(2)


def _seqlen_bucket(max_seqlen: int) -> int:
    """Power of two >= max_seqlen, at least 16 (the smallest tl.dot tile)."""
    return max(16, triton.next_power_of_2(max_seqlen))


def _single_block(max_seqlen: int, dtype: torch.dtype) -> bool:
    """Whether a launch takes the single-block kernels (a whole key block per program).

    Not for fp32 on a GPU: its exact FMA dots made those kernels spill 0.3-20 kB per thread on
    sm_90 in every configuration tried (triton 3.6 and 3.8, head dims 64 and 80); the general
    kernels' fp32 tiles do not. The interpreter, which has no registers, runs them in fp32 too,
    so the tests cover both paths."""
    return max_seqlen <= SINGLE_BLOCK_MAX_SEQLEN and (dtype != torch.float32 or _INTERPRET)


def _block_d(head_dim: int) -> int:
    """Head dims that are not powers of two (80) are padded up inside the kernel (masked)."""
    return max(16, triton.next_power_of_2(head_dim))


def _geometry(q: torch.Tensor, cu_seqlens: torch.Tensor | None, max_seqlen: int):
    """(batch, heads, is_varlen, lse shape, lse (batch, head) strides) of a launch."""
    if cu_seqlens is not None:
        total, heads = q.shape[0], q.shape[1]
        return cu_seqlens.numel() - 1, heads, True, (heads, total), (0, total)
    batch, seqlen, heads = q.shape[0], q.shape[1], q.shape[2]
    return batch, heads, False, (batch, heads, seqlen), (heads * seqlen, seqlen)


def _padding_arg(key_padding_mask: torch.Tensor | None, q: torch.Tensor):
    """(pointer tensor, batch stride) for the kernels; a uint8 view of the bool mask."""
    if key_padding_mask is None:
        return q, 0  # never read: HAS_PADDING is False
    mask = key_padding_mask.contiguous().view(torch.uint8)
    return mask, mask.stride(0)


def _dot_precision(dtype: torch.dtype):
    """fp32 inputs use exact fp32 products (not tf32) so they match the fp32 reference."""
    return "ieee" if dtype == torch.float32 else None


def _forward(q, k, v, key_padding_mask, cu_seqlens, max_seqlen: int, scale: float):
    """Launch the forward. Returns (out like q but contiguous, lse fp32 in base 2)."""
    q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
    cu_seqlens = None if cu_seqlens is None else cu_seqlens.contiguous()  # read as cu[b] at CU + b
    batch, heads, is_varlen, lse_shape, lse_strides = _geometry(q, cu_seqlens, max_seqlen)
    head_dim = q.shape[-1]
    out = _new_buffer(q.shape, q.dtype, q.device)
    lse = _new_buffer(lse_shape, torch.float32, q.device)
    if q.numel() == 0 or batch == 0 or max_seqlen == 0:
        return out, lse
    padding, stride_pad_b = _padding_arg(key_padding_mask, q)
    bucket = _seqlen_bucket(max_seqlen)
    args = (
        q, k, v, out, lse, padding, cu_seqlens if is_varlen else q,
        *_row_strides(q, is_varlen), *_row_strides(k, is_varlen),
        *_row_strides(v, is_varlen), *_row_strides(out, is_varlen),
        *lse_strides, stride_pad_b,
        max_seqlen, scale * _LOG2E,
    )
    meta = dict(
        SEQLEN_BUCKET=bucket, HEAD_DIM=head_dim, BLOCK_D=_block_d(head_dim),
        IS_VARLEN=is_varlen, HAS_PADDING=key_padding_mask is not None,
        DOT_PRECISION=_dot_precision(q.dtype),
    )
    grid = lambda META: (triton.cdiv(max_seqlen, META["BLOCK_M"]), heads, batch)
    if _single_block(max_seqlen, q.dtype):
        _fwd_single_block[grid](*args, BLOCK_N=bucket, **meta)
    else:
        _fwd_general[grid](*args, **meta)
    return out, lse


def _backward(grad_out, q, k, v, out, lse, key_padding_mask, cu_seqlens, max_seqlen: int,
              scale: float):
    """Launch the backward. Returns (dq, dk, dv), contiguous, in the input dtype."""
    grad_out, q, k, v, out = (_last_dim_contiguous(t) for t in (grad_out, q, k, v, out))
    # Both are read at offsets computed from their shapes, not their strides.
    lse = lse.contiguous()
    cu_seqlens = None if cu_seqlens is None else cu_seqlens.contiguous()
    batch, heads, is_varlen, lse_shape, lse_strides = _geometry(q, cu_seqlens, max_seqlen)
    head_dim = q.shape[-1]
    dq = _new_buffer(q.shape, q.dtype, q.device)
    dk = _new_buffer(k.shape, k.dtype, k.device)
    dv = _new_buffer(v.shape, v.dtype, v.device)
    if q.numel() == 0 or batch == 0 or max_seqlen == 0:
        return dq, dk, dv
    padding, stride_pad_b = _padding_arg(key_padding_mask, q)
    bucket = _seqlen_bucket(max_seqlen)
    strides = (
        *_row_strides(q, is_varlen), *_row_strides(k, is_varlen),
        *_row_strides(v, is_varlen), *_row_strides(out, is_varlen),
        *_row_strides(grad_out, is_varlen), *_row_strides(dq, is_varlen),
    )
    meta = dict(
        SEQLEN_BUCKET=bucket, HEAD_DIM=head_dim, BLOCK_D=_block_d(head_dim),
        IS_VARLEN=is_varlen, HAS_PADDING=key_padding_mask is not None,
        DOT_PRECISION=_dot_precision(q.dtype),
    )
    cu = cu_seqlens if is_varlen else q
    dkdv_strides = (*_row_strides(dk, is_varlen), *_row_strides(dv, is_varlen))
    tail = (*lse_strides, stride_pad_b, max_seqlen, scale * _LOG2E, scale)

    if _single_block(max_seqlen, q.dtype):
        # DELTA is never touched on this path (FUSE_DQ computes it in registers): pass lse.
        _bwd_single_block[(1, heads, batch)](
            q, k, v, out, grad_out, dq, dk, dv, lse, lse, padding, cu,
            *strides, *dkdv_strides, *tail, BLOCK_N=bucket, FUSE_DQ=True, **meta,
        )
        return dq, dk, dv

    delta = _new_buffer(lse_shape, torch.float32, q.device)
    dq_grid = lambda META: (triton.cdiv(max_seqlen, META["BLOCK_M"]), heads, batch)
    _bwd_dq_general[dq_grid](
        q, k, v, out, grad_out, dq, lse, delta, padding, cu, *strides, *tail, **meta,
    )
    dkdv_grid = lambda META: (triton.cdiv(max_seqlen, META["BLOCK_N"]), heads, batch)
    _bwd_dkdv_general[dkdv_grid](
        q, k, v, out, grad_out, dq, dk, dv, lse, delta, padding, cu,
        *strides, *dkdv_strides, *tail, FUSE_DQ=False, **meta,
    )
    return dq, dk, dv


# ----------------------------------------------------------------------------------------------
# Custom ops (traceable by torch.compile) and their autograd
# ----------------------------------------------------------------------------------------------


@torch.library.custom_op("sslam::attention_forward", mutates_args=())
def _attention_forward_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    key_padding_mask: Optional[torch.Tensor], cu_seqlens: Optional[torch.Tensor],  # noqa: UP045
    max_seqlen: int, scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, lse): padded (B, L, H, Dh) inputs, or packed (T, H, Dh) with ``cu_seqlens``."""
    if cu_seqlens is not None and not cu_seqlens.is_cuda:
        # Traced calls reach the values here only (eager ones were checked by the caller).
        _check_cu_seqlens_values(cu_seqlens.tolist(), q.shape[0], max_seqlen)
    return _forward(q, k, v, key_padding_mask, cu_seqlens, max_seqlen, scale)


@_attention_forward_op.register_fake
def _attention_forward_fake(q, k, v, key_padding_mask, cu_seqlens, max_seqlen, scale):
    if cu_seqlens is not None:
        lse_shape = (q.shape[1], q.shape[0])
    else:
        lse_shape = (q.shape[0], q.shape[2], q.shape[1])
    return q.new_empty(q.shape), q.new_empty(lse_shape, dtype=torch.float32)


@torch.library.custom_op("sslam::attention_backward", mutates_args=())
def _attention_backward_op(
    grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    out: torch.Tensor, lse: torch.Tensor,
    key_padding_mask: Optional[torch.Tensor], cu_seqlens: Optional[torch.Tensor],  # noqa: UP045
    max_seqlen: int, scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) of :func:`_attention_forward_op` given dL/d(out)."""
    return _backward(grad_out, q, k, v, out, lse, key_padding_mask, cu_seqlens, max_seqlen,
                     scale)


@_attention_backward_op.register_fake
def _attention_backward_fake(grad_out, q, k, v, out, lse, key_padding_mask, cu_seqlens,
                             max_seqlen, scale):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, key_padding_mask, cu_seqlens, max_seqlen, scale = inputs
    out, lse = output
    # Only O(L) statistics are kept for the backward: the lse, never the (L, L) probabilities.
    ctx.save_for_backward(q, k, v, out, lse, key_padding_mask, cu_seqlens)
    ctx.max_seqlen = max_seqlen
    ctx.scale = scale
    ctx.mark_non_differentiable(lse)


def _attention_backward_autograd(ctx, grad_out, grad_lse):
    q, k, v, out, lse, key_padding_mask, cu_seqlens = ctx.saved_tensors
    dq, dk, dv = _attention_backward_op(
        grad_out, q, k, v, out, lse, key_padding_mask, cu_seqlens, ctx.max_seqlen, ctx.scale
    )
    return dq, dk, dv, None, None, None, None


_attention_forward_op.register_autograd(_attention_backward_autograd, setup_context=_setup_context)


class _EagerAttention(torch.autograd.Function):
    """The same forward/backward as the custom op, for eager mode.

    Calling a Python custom op costs several times the dispatch of an autograd.Function (tens
    of microseconds per call), which is as long as the student's whole forward kernel; eager
    calls therefore come here, and only torch.compile, which needs an opaque op, goes through
    ``sslam::attention_forward``.
    """

    @staticmethod
    def forward(ctx, q, k, v, key_padding_mask, cu_seqlens, max_seqlen, scale):
        out, lse = _forward(q, k, v, key_padding_mask, cu_seqlens, max_seqlen, scale)
        ctx.save_for_backward(q, k, v, out, lse, key_padding_mask, cu_seqlens)
        ctx.max_seqlen = max_seqlen
        ctx.scale = scale
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable  # no double backward: an error, not a lost term
    def backward(ctx, grad_out):
        q, k, v, out, lse, key_padding_mask, cu_seqlens = ctx.saved_tensors
        dq, dk, dv = _backward(
            grad_out, q, k, v, out, lse, key_padding_mask, cu_seqlens, ctx.max_seqlen, ctx.scale
        )
        return dq, dk, dv, None, None, None, None


def _attention_kernels(q, k, v, key_padding_mask, cu_seqlens, max_seqlen: int, scale: float):
    """Differentiable kernel call: the custom op when something must see it (see
    :func:`~sslam.kernels.switch.call_custom_op`), else the eager Function."""
    if call_custom_op():
        out, _ = _attention_forward_op(q, k, v, key_padding_mask, cu_seqlens, max_seqlen, scale)
        return out
    return _EagerAttention.apply(q, k, v, key_padding_mask, cu_seqlens, max_seqlen, scale)


# ----------------------------------------------------------------------------------------------
# PyTorch references (the CPU path and the baseline of tests and benchmarks)
# ----------------------------------------------------------------------------------------------


def attention_ref(q, k, v, *, key_padding_mask=None, scale=None, upcast=True):
    """Plain matmul-softmax attention; same contract as :func:`attention`.

    q, k, v: (B, L, H, Dh); key_padding_mask: (B, L) bool, True = padded key; returns (B, L, H, Dh)
    in q's dtype. ``upcast=True`` computes everything in fp32 (fp64 stays fp64) and casts back. ``upcast=False``
    is the official EAT/SSLAM recipe: matmuls in the input dtype, softmax in fp32 cast back.
    """
    dtype = q.dtype
    scale = _resolve_scale(q.shape[-1], scale)
    # Softmax never runs below fp32; float64 inputs (tests) stay float64.
    softmax_dtype = torch.promote_types(dtype, torch.float32)
    if upcast:
        q, k, v = (t.to(softmax_dtype) for t in (q, k, v))
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, L, Dh)
    scores = (q @ k.transpose(-2, -1)) * scale
    if key_padding_mask is not None:
        scores = scores.masked_fill(key_padding_mask[:, None, None, :], float("-inf"))
        # A batch entry with every key padded: softmax of all -inf is NaN; use 0 scores there
        # and zero the probabilities afterwards, which keeps forward and gradients finite.
        no_keys = key_padding_mask.all(dim=-1)[:, None, None, None]
        scores = scores.masked_fill(no_keys, 0.0)
    probs = scores.softmax(dim=-1, dtype=softmax_dtype)
    if key_padding_mask is not None:
        probs = probs.masked_fill(no_keys, 0.0)
    out = probs.to(v.dtype) @ v
    return out.transpose(1, 2).contiguous().to(dtype)


def attention_varlen_ref(q, k, v, cu_seqlens, max_seqlen, *, scale=None, upcast=True):
    """Packed attention by looping :func:`attention_ref` over the sequences.

    q, k, v: (T, H, Dh); cu_seqlens: (B + 1,) int; returns (T, H, Dh) in q's dtype. Reads
    ``cu_seqlens`` on the host (a synchronisation on GPU: a reference, not a fast path).
    """
    bounds = cu_seqlens.tolist()
    _check_cu_seqlens_values(bounds, q.shape[0], max_seqlen)
    pieces = [
        attention_ref(q[None, a:e], k[None, a:e], v[None, a:e], scale=scale, upcast=upcast)[0]
        for a, e in zip(bounds[:-1], bounds[1:])
    ]
    if not pieces:  # no sequences, so no tokens: an empty output that still has a backward
        return q + k + v
    return torch.cat(pieces, dim=0)


# ----------------------------------------------------------------------------------------------
# Validation and public functions
# ----------------------------------------------------------------------------------------------


def _resolve_scale(head_dim: int, scale: float | None) -> float:
    if scale is None:
        return head_dim ** -0.5
    # Comparisons, not math.isfinite: under torch.compile(dynamic=True) scale is a symbolic float.
    if isinstance(scale, bool) or not isinstance(scale, Real) or not -math.inf < scale < math.inf:
        raise ValueError(f"scale={scale!r}: expected None or a finite number")
    return float(scale)


def _check_qkv(q, k, v, ndim: int, layout: str) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
        if t.dim() != ndim:
            raise ValueError(f"{name}: expected {layout}, got shape {tuple(t.shape)}")
        if t.dtype not in _SUPPORTED_DTYPES:
            raise TypeError(f"{name}: dtype {t.dtype} is not one of float16, bfloat16, float32")
    for name, t in (("k", k), ("v", v)):
        if t.shape != q.shape:
            raise ValueError(f"{name}: shape {tuple(t.shape)} differs from q's {tuple(q.shape)}")
        if t.dtype != q.dtype:
            raise TypeError(f"{name}: dtype {t.dtype} differs from q's {q.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name}: device {t.device} differs from q's {q.device}")
    if q.shape[-1] == 0:
        # Caught here rather than as a ZeroDivisionError from the default scale Dh ** -0.5.
        raise ValueError(f"q: head dim 0 in shape {tuple(q.shape)}; expected at least 1")


def _check_kernel_head_dim(head_dim: int) -> None:
    if head_dim > MAX_HEAD_DIM:
        raise ValueError(
            f"q: head dim {head_dim} exceeds {MAX_HEAD_DIM}, the largest the Triton kernels hold "
            "(set SSLAM_KERNELS=0 for the PyTorch reference)"
        )


def _check_cu_seqlens_values(bounds: list, total: int, max_seqlen: int) -> None:
    """Host-side check of cu_seqlens values (only where reading them costs no GPU sync)."""
    if bounds[0] != 0 or bounds[-1] != total:
        raise ValueError(f"cu_seqlens: must start at 0 and end at {total} (q's rows), got {bounds}")
    lengths = [e - a for a, e in zip(bounds[:-1], bounds[1:])]
    if any(n < 0 for n in lengths):
        raise ValueError(f"cu_seqlens: must be non-decreasing, got {bounds}")
    if lengths and max(lengths) > max_seqlen:
        raise ValueError(f"max_seqlen={max_seqlen} is below the longest sequence, {max(lengths)}")


def attention(q, k, v, *, key_padding_mask=None, scale=None):
    """Bidirectional softmax attention over (B, L, H, Dh) tensors.

    Args:
        q, k, v: (B, L, H, Dh), float16/bfloat16/float32, same shape/dtype/device. Any strides
            with a contiguous last dim (views of a packed (B, L, 3, H, Dh) projection are not
            copied); other layouts are copied once.
        key_padding_mask: optional (B, L) bool, True = padded key (ignored), the
            ``nn.MultiheadAttention`` convention. Rows whose keys are all padded output zeros.
            Padded keys' values must be finite: their weight is 0, and 0 x inf is NaN.
        scale: softmax scale, default Dh ** -0.5.

    Returns:
        (B, L, H, Dh) contiguous, q's dtype (so ``.reshape(B, L, H * Dh)`` is free).

    Runs the Triton kernels when ``use_kernels(q)`` (CUDA tensors by default, see
    ``SSLAM_KERNELS``), else :func:`attention_ref`. Differentiable in q, k and v. As in
    FlashAttention, the backward rounds the score gradients to q's dtype before its dq and dk
    matmuls: in float16 they overflow where one passes 65504 (large values and output
    gradients over sharp attention), though dq itself would fit; bfloat16 has the range.
    """
    _check_qkv(q, k, v, 4, "(B, L, H, Dh)")
    batch, seqlen = q.shape[0], q.shape[1]
    if key_padding_mask is not None:
        if not isinstance(key_padding_mask, torch.Tensor):
            raise TypeError(f"key_padding_mask: expected a bool tensor, got {type(key_padding_mask).__name__}")
        if key_padding_mask.dtype != torch.bool:
            raise TypeError(f"key_padding_mask: expected dtype bool, got {key_padding_mask.dtype}")
        if tuple(key_padding_mask.shape) != (batch, seqlen):
            raise ValueError(
                f"key_padding_mask: expected shape {(batch, seqlen)} (B, L), "
                f"got {tuple(key_padding_mask.shape)}"
            )
        if key_padding_mask.device != q.device:
            raise ValueError(f"key_padding_mask: device {key_padding_mask.device} differs from "
                             f"q's {q.device}")
    scale = _resolve_scale(q.shape[-1], scale)
    if not use_kernels(q, k, v):
        return attention_ref(q, k, v, key_padding_mask=key_padding_mask, scale=scale)
    _check_kernel_head_dim(q.shape[-1])
    return _attention_kernels(q, k, v, key_padding_mask, None, seqlen, scale)


def attention_varlen(q, k, v, cu_seqlens, max_seqlen, *, scale=None):
    """Attention over sequences packed back to back; each attends only within itself.

    Args:
        q, k, v: (T, H, Dh), float16/bfloat16/float32, last dim contiguous (else copied once).
        cu_seqlens: (B + 1,) int32 on q's device: sequence b is rows cu[b]:cu[b + 1];
            cu[0] = 0 and cu[B] = T.
        max_seqlen: python int >= every sequence length (static: no host synchronisation).
            On CPU tensors both are checked (also in traced calls); on GPU they are trusted.
            The reference reads ``cu_seqlens`` on the host: under torch.compile it breaks the
            graph (``fullgraph=True`` refuses it); the kernels trace whole.
        scale: softmax scale, default Dh ** -0.5.

    Returns:
        (T, H, Dh) contiguous, q's dtype. Differentiable in q, k and v.
    """
    _check_qkv(q, k, v, 3, "(T, H, Dh)")
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1:
        raise ValueError("cu_seqlens: expected a 1-D tensor of B + 1 offsets")
    if cu_seqlens.dtype != torch.int32:
        raise TypeError(f"cu_seqlens: expected dtype int32, got {cu_seqlens.dtype}")
    if cu_seqlens.device != q.device:
        raise ValueError(f"cu_seqlens: device {cu_seqlens.device} differs from q's {q.device}")
    # bool and float are refused by type (True would read as 1); a traced SymInt passes.
    if isinstance(max_seqlen, (bool, float, torch.Tensor)) or int(max_seqlen) != max_seqlen or max_seqlen < 0:
        raise TypeError(f"max_seqlen: expected a non-negative python int, got {max_seqlen!r}")
    max_seqlen = int(max_seqlen)
    scale = _resolve_scale(q.shape[-1], scale)
    if not use_kernels(q, k, v):
        return attention_varlen_ref(q, k, v, cu_seqlens, max_seqlen, scale=scale)
    _check_kernel_head_dim(q.shape[-1])
    if not cu_seqlens.is_cuda and not traced(cu_seqlens):
        _check_cu_seqlens_values(cu_seqlens.tolist(), q.shape[0], max_seqlen)
    # The kernels read offset b at CU_SEQLENS + b: a strided view (cu[::2]) would give them
    # other entries than the ones checked above.
    cu_seqlens = cu_seqlens.contiguous()
    return _attention_kernels(q, k, v, None, cu_seqlens, max_seqlen, scale)


__all__ = [
    "MAX_HEAD_DIM",
    "SINGLE_BLOCK_MAX_SEQLEN",
    "attention",
    "attention_ref",
    "attention_varlen",
    "attention_varlen_ref",
]
