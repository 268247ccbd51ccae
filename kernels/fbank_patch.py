"""Waveforms to normalised 16x16 log-mel patches in one Triton kernel (SPEC 1.1), with the SSLAM
mixtures (SPEC 5.1) fused in.

Per clip the official chain is: subtract the waveform mean -> Kaldi frames of 400 samples every
160 (snip_edges) -> per-frame DC removal -> pre-emphasis 0.97 (first sample repeated) ->
symmetric Hann window -> 512-point power spectrum -> 128 Kaldi mel bins -> log(max(mel, eps)) ->
frames past the clip's own count are 0 (log domain), frames past ``target_length`` are cropped ->
(x - mean) / (2 std) -> 16x16 patches (token = t * 8 + f, pixel = dt * 16 + df). The result is
exactly ``patchify(preprocess(...))`` of :mod:`sslam.features`, up to float rounding.

How the kernel computes it (one program per (block of BLOCK_T frames, clip)):

* Per-frame DC removal, pre-emphasis, window and DFT are one linear map from the 400 samples of
  a frame to the 256 cosine and 256 sine coefficients that matter (the Nyquist bin and the DC bin
  have mel weight 0). It is built once in float64 on the host and cached per device as a
  (512, 512) float32 basis (rows past 400 are zero so any K block size divides it). The spectrum
  is then a matmul of the (BLOCK_T, 400) frame tile, read straight from the waveform with
  overlapping strided loads (no frame tensor in memory), against the basis.
* The waveform mean removal of the official chain is a no-op on the fbank: per-frame DC removal
  subtracts any constant again. We exploit that twice. The clip mean is never computed (no
  extra pass over the clip); instead each program subtracts the mean of its own span of samples
  before the matmul. Mathematically nothing changes, but the matmul then works on small numbers
  even if the clip has a large DC offset (a clip at 0.5 + noise, emulated in float32: log-mel
  error vs float64 7e-6 with the local mean, 3.5e-3 without; the tests check the kernel on it).
* power = re^2 + im^2 in fp32, a second matmul with the (256, 128) mel matrix, log, padding rows,
  normalisation, and the store of BLOCK_T / 16 rows of 8 patches. Frames, spectra and the
  spectrogram never touch global memory; blocks made only of padding skip all arithmetic.
* Fused mixing (``mix=MixWindows``): the mixture of clip b needs the clean tile of clip b - 1 at
  the same frames. Each program stores its clean tile, then bumps two per-(frame block, pair)
  counters: one for its own mixture (b) and one for the mixture it is the partner of (b + 1).
  Whichever of the two programs of a pair arrives second (it sees an odd count: each launch adds
  exactly 2, so autotuner re-runs stay consistent) reads the other's clean tile back (L2, not
  L1) and writes the mixture. No program ever waits, so the scheme cannot deadlock; the only
  extra traffic is one read of a clean tile per mixed tile. The max is exact, so the mixtures
  equal :func:`sslam.mixing.mix_patches` of the clean output bit for bit.

Numerics: the DFT sums 400 products whose terms can be 1e4 times larger than a quiet
high-frequency coefficient, so the dot precision matters. ``dot_precision="ieee"`` is plain fp32
FMA (exact products, CUDA cores). ``"tf32x3"`` splits each fp32 operand into two tf32 parts and
sums three tensor-core products (hi*hi + hi*lo + lo*hi), dropping only lo*lo (~2^-22 relative):
close to fp32 accuracy at tensor-core speed. ``"ieee"`` is the default: on an H200 (triton 3.6,
2026-12-04) the tf32x3 kernel failed the real-shape accuracy test (48 clips against a float64
fbank, ``test_cuda_real_shapes[tf32x3]``) where ieee passed. Plain ``"tf32"`` (10-bit
mantissa products, ~1e-3 relative error on every coefficient) is not offered: it misses the
1e-4 tolerance on real audio. Under the Triton interpreter every dot is computed in fp32, so the
choice is verified on a GPU by the CUDA tests. Measured on an H100 (10-s clips, 1024 frames,
max abs error in normalised units against a float64 fbank; the float32 reference in
parentheses): real audio (golden test_wav) tf32x3 8.8e-5, ieee 8.4e-5 (1.6e-4); noise 2.8e-5
(7.2e-5); 440 Hz sine + noise at 0.05: 4.2e-5 (8.2e-5); 4 kHz sine + noise at 1e-3: 2.9e-4
(1.7e-3). The folded float32 map is more accurate than the reference's rfft, whose own error
against float64 reaches ~2e-4 over a batch of random 10-s clips; so "within 1e-4 of the
reference" holds per clip on the golden data. On white noise a mel bin near the log floor can
pass 1e-4 (``python bench/fbank_accuracy.py --draws 3 --threads 1``, 2 x 10-s clips at 0.3,
interpreter, 2-core CPU): in one draw one element of 262,144 came out 2.3e-4 from float64
(1.1e-4 with ``--threads 2``: the interpreter's matmuls round by thread count), the other
draws within 6.9e-5, where the float32 reference reaches 3.1e-4. A tone far above the noise
floor is the exception for every float32 fbank: its faint mel bins' logs come out several 1e-4 off float64 (under the interpreter on a CPU, 1-s clips of a 440 Hz
sine at 0.9 over noise at 1e-4, five noise draws: this kernel 5.5e-4 to 7.8e-4, the float32
reference 2.1e-4 to 3.0e-4; the tests hold the kernel within 3x the reference there). Without
any noise the kernel and the reference part further: 0.5-s sines at 0.9 of 440, 3100, 5638 and
7000 Hz, kernel against ``preprocess``, 3.5e-3, 2.2e-3, 2.6e-3 and 2.3e-3 (interpreter, CPU).

Measured speed (H100 SXM, B=48 10-s clips, ``bench/bench_fbank_patch.py``): 14.4 us per clip
with tf32x3 (33 useful TFLOP/s), 18.0 with ieee, fused mixing +0.9 %; the eager CUDA reference
31.8 us (2.2x slower), its torch.compile 11.7 us (faster than this kernel: cuFFT needs ~20x
fewer FLOPs than a dense 400 x 512 DFT), the per-clip CPU torchaudio path 200 ms. The autotuner
picks 32-frame tiles (mma.sync, no wgmma), where every program streams the whole 800 kB basis
from L2 (~25 MB per clip). Headroom: larger frame tiles on wgmma, or a host-side hi/lo split of
the constant basis (tf32x3 re-splits it every K step). A 16 x 32 Cooley-Tukey split of the DFT
(two small matmul stages, ~4x fewer DFT FLOPs) was tried and set aside: pre-emphasis, window
and DC removal then act on the samples before the DFT instead of being folded into its basis,
so the quiet low bins come out of the cancellation of the boosted high frequencies. In fp32
(interpreter) its error on the golden real clip was 1.03e-4 against the float64 fbank, over
the 1e-4 budget before any tf32x3 loss, where the folded basis gives 8.5e-5.

Arithmetic floor (per 10-s clip, 1024 frames, ~998 of them real): DFT 400 x 512 x 2 = 410 kFLOP
per frame, mel 256 x 128 x 2 = 66 kFLOP, so ~0.47 GFLOP per clip; bytes: 640 kB of waveform read
+ 512 kB of patches written (1 MB more with mixing). On an H100 (SXM: ~495 TFLOP/s dense tf32,
~67 TFLOP/s fp32 FMA, ~3 TB/s) that is ~2.9 us per clip with tf32x3 (3 tensor-core products),
~7 us with ieee fp32, and 0.4 us (0.7 us with mixing) of memory traffic: the kernel is compute
bound, and mixing adds only memory traffic that overlaps with other programs' arithmetic.

The kernel has no autograd formula (features are inputs, never trained through): a waveform that
requires grad takes the differentiable PyTorch reference instead.
"""

from __future__ import annotations

import functools
import math
import numbers

import torch
import triton
import triton.language as tl

from sslam.audio import AudioError
from sslam.cached import cached_constant
from sslam.features import (
    FFT_SIZE,
    FRAME_LENGTH,
    FRAME_SHIFT,
    NUM_MEL_BINS,
    PATCH,
    PREEMPHASIS,
    Norm,
    frame_window,
    integer_counts,
    integer_lengths,
    mel_banks,
    norm_stats,
    patchify,
    preprocess,
)
from sslam.mixing import MixWindows, mix_patches, window_patch_rows

from .switch import builds_graph, interpreting, traced, use_kernels

# FFT bins that carry mel weight: 0..255 (bin 0 and the Nyquist bin 256 have weight 0; checked
# when the basis is built). Each contributes a cosine and a sine column.
NUM_BINS = FFT_SIZE // 2
# Basis rows: 400 samples padded with zero rows so that every K block size up to 128 divides it.
BASIS_ROWS = 512
DOT_PRECISIONS = ("ieee", "tf32x3")
DEFAULT_DOT_PRECISION = "ieee"
FREQ_PATCHES = NUM_MEL_BINS // PATCH


# ----------------------------------------------------------------------------------------------
# Triton kernel
# ----------------------------------------------------------------------------------------------


@triton.jit
def _fbank_patch_kernel(
    WAVE, LENGTHS, BASIS, MEL_T, OUT, COUNTERS,
    num_samples, stride_wave, batch, target_length,
    norm_mean, norm_scale,
    mix_start_a, mix_start_b, mix_width,
    MIX: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """One (BLOCK_T frames, clip) tile: waveform -> normalised log-mel -> patches (-> mixture)."""
    FRAME: tl.constexpr = 400
    SHIFT: tl.constexpr = 160
    BINS: tl.constexpr = 256
    MELS: tl.constexpr = 128
    SPAN: tl.constexpr = (BLOCK_T - 1) * SHIFT + FRAME  # samples the tile's frames cover
    SPAN_BLOCK: tl.constexpr = 1024
    EPS: tl.constexpr = 1.1920928955078125e-07  # float32 epsilon, Kaldi's log floor

    pid_t = tl.program_id(0)
    b = tl.program_id(1)
    t0 = pid_t * BLOCK_T
    # Lengths are validated on the host; the clamp only keeps traced calls in bounds.
    length = tl.minimum(tl.maximum(tl.load(LENGTHS + b), 0), num_samples)
    # Explicitly 0 frames below one frame: Triton's integer division truncates toward zero, so
    # (length - FRAME) // SHIFT + 1 alone is 1 for lengths 241..399 (traced calls get there).
    n_frames = tl.where(length >= FRAME,
                        tl.minimum((length - FRAME) // SHIFT + 1, target_length), 0)
    rows = tl.arange(0, BLOCK_T)
    frame = t0 + rows
    mels = tl.arange(0, MELS)

    if t0 < n_frames:
        wave = WAVE + b.to(tl.int64) * stride_wave
        first = t0 * SHIFT
        # Mean of the clip's own samples in the span: subtracting a constant changes nothing
        # after per-frame DC removal (folded into the basis) but keeps the matmul's terms small.
        span_end = tl.minimum(first + SPAN, length)
        total = tl.zeros((SPAN_BLOCK,), tl.float32)
        for s in range(0, SPAN, SPAN_BLOCK):
            idx = first + s + tl.arange(0, SPAN_BLOCK)
            total += tl.load(wave + idx, mask=idx < span_end, other=0.0)
        offset = tl.sum(total, axis=0) / (span_end - first).to(tl.float32)

        # Rows past the clip's last frame re-read that frame, so every load stays inside the
        # clip's own samples (no bounds mask); their results are replaced by padding below.
        frame_start = tl.minimum(frame, n_frames - 1) * SHIFT
        ks = tl.arange(0, BLOCK_K)
        bins = tl.arange(0, BLOCK_F)
        mel = tl.zeros((BLOCK_T, MELS), tl.float32)
        for f0 in range(0, BINS, BLOCK_F):
            re = tl.zeros((BLOCK_T, BLOCK_F), tl.float32)
            im = tl.zeros((BLOCK_T, BLOCK_F), tl.float32)
            x_ptrs = wave + frame_start[:, None] + ks[None, :]
            cos_ptrs = BASIS + ks[:, None] * (2 * BINS) + (f0 + bins)[None, :]
            for k0 in range(0, FRAME, BLOCK_K):
                if FRAME % BLOCK_K == 0:
                    x = tl.load(x_ptrs) - offset
                else:
                    # The last block runs past the frame: those samples (of the next frames)
                    # meet zero basis rows, but must not be read past the clip's end.
                    inside = (ks < FRAME - k0)[None, :]
                    x = tl.where(inside, tl.load(x_ptrs, mask=inside, other=0.0) - offset, 0.0)
                re = tl.dot(x, tl.load(cos_ptrs), re, input_precision=PRECISION)
                im = tl.dot(x, tl.load(cos_ptrs + BINS), im, input_precision=PRECISION)
                x_ptrs += BLOCK_K
                cos_ptrs += BLOCK_K * 2 * BINS
            power = re * re + im * im
            weights = tl.load(MEL_T + (f0 + bins)[:, None] * MELS + mels[None, :])
            mel = tl.dot(power, weights, mel, input_precision=PRECISION)
        # NaN must survive the floor (tl.maximum drops it by default), as in the reference's
        # clamp: a non-finite sample must not come out as silence.
        logmel = tl.log(tl.maximum(mel, EPS, propagate_nan=tl.PropagateNan.ALL))
        # Frames past the clip's own count are padding: 0 in the log domain.
        logmel = tl.where((frame < n_frames)[:, None], logmel, 0.0)
    else:
        logmel = tl.zeros((BLOCK_T, MELS), tl.float32)
    clean = (logmel - norm_mean) / norm_scale

    # Patch layout: token = (t // 16) * 8 + m // 16, pixel = (t % 16) * 16 + m % 16.
    clip_size = target_length * MELS
    tile = ((frame // 16) * 8)[:, None] * 256 + ((frame % 16) * 16)[:, None] \
        + ((mels // 16) * 256 + mels % 16)[None, :]
    store_mask = (frame < target_length)[:, None]
    tl.store(OUT + b.to(tl.int64) * clip_size + tile, clean, mask=store_mask)

    if MIX:
        # Every thread's clean store must be issued before the counter says the tile is there.
        tl.debug_barrier()
        counters = COUNTERS + pid_t * batch
        nxt = (b + 1) % batch
        own_count = tl.atomic_add(counters + b, 1, sem="acq_rel", scope="gpu")
        next_count = tl.atomic_add(counters + nxt, 1, sem="acq_rel", scope="gpu")
        in_window = ((frame >= mix_start_a) & (frame < mix_start_a + mix_width)) | (
            (frame >= mix_start_b) & (frame < mix_start_b + mix_width))
        if own_count % 2 == 1:
            # Clip b - 1 already stored its tile: this program writes mixture b.
            prv = (b + batch - 1) % batch
            partner = tl.load(OUT + prv.to(tl.int64) * clip_size + tile, mask=store_mask,
                              other=0.0, cache_modifier=".cg")
            # NaN-propagating max, as torch.maximum in mix_patches (bit-equal mixtures).
            mixed = tl.where(in_window[:, None], clean,
                             tl.maximum(clean, partner, propagate_nan=tl.PropagateNan.ALL))
            tl.store(OUT + (batch + b).to(tl.int64) * clip_size + tile, mixed, mask=store_mask)
        if next_count % 2 == 1:
            # Clip b + 1 already stored its tile: this program writes mixture b + 1.
            primary = tl.load(OUT + nxt.to(tl.int64) * clip_size + tile, mask=store_mask,
                              other=0.0, cache_modifier=".cg")
            mixed = tl.where(in_window[:, None], primary,
                             tl.maximum(primary, clean, propagate_nan=tl.PropagateNan.ALL))
            tl.store(OUT + (batch + nxt).to(tl.int64) * clip_size + tile, mixed, mask=store_mask)


# (BLOCK_T, BLOCK_F, BLOCK_K, num_warps, num_stages)
_GPU_CONFIGS = [
    (64, 64, 16, 4, 3), (64, 128, 16, 8, 3), (64, 64, 32, 4, 3),
    (32, 128, 16, 4, 3), (32, 256, 16, 8, 2), (128, 64, 16, 8, 3),
]
_INTERPRETER_CONFIG = dict(BLOCK_T=32, BLOCK_F=256, BLOCK_K=128)
# The mixing counters are sized for the largest grid any configuration launches.
_SMALLEST_BLOCK_T = min([c[0] for c in _GPU_CONFIGS] + [_INTERPRETER_CONFIG["BLOCK_T"]])


@functools.cache
def _autotuned_kernel():
    """The kernel autotuned over tile shapes (GPU only; built on first use)."""
    return triton.autotune(
        configs=[
            triton.Config(dict(BLOCK_T=t, BLOCK_F=f, BLOCK_K=k), num_warps=w, num_stages=s)
            for t, f, k, w, s in _GPU_CONFIGS
        ],
        key=["target_length", "MIX", "PRECISION"],
    )(_fbank_patch_kernel)


# ----------------------------------------------------------------------------------------------
# Host side: the folded basis, validation, launch
# ----------------------------------------------------------------------------------------------


@cached_constant()
def _constants_cpu() -> tuple[torch.Tensor, torch.Tensor]:
    """(basis (512, 512), mel (256, 128)) float32: the frame -> spectrum map and the mel matrix.

    basis[n, j] for j < 256 is the cosine coefficient of bin j and basis[n, 256 + j] the sine
    coefficient, of the linear map sample n -> (DC removal, pre-emphasis, window, 512-point DFT).
    Built in float64 and rounded once.
    """
    n = FRAME_LENGTH
    eye = torch.eye(n, dtype=torch.float64)
    remove_dc = eye - 1.0 / n
    previous = torch.diag(torch.ones(n - 1, dtype=torch.float64), -1)
    previous[0, 0] = 1.0  # Kaldi repeats the first sample: y[0] = x[0] - 0.97 x[0]
    preemphasis = eye - PREEMPHASIS * previous
    window = frame_window().to(torch.float64)  # the float32 window values, as the reference
    frame_map = window[:, None] * (preemphasis @ remove_dc)  # (400, 400): frame -> windowed
    angle = (2 * math.pi / FFT_SIZE) * torch.outer(
        torch.arange(NUM_BINS, dtype=torch.float64), torch.arange(n, dtype=torch.float64)
    )
    cos_rows = torch.cos(angle) @ frame_map  # (256, 400)
    sin_rows = torch.sin(angle) @ frame_map
    basis = torch.zeros(BASIS_ROWS, 2 * NUM_BINS, dtype=torch.float64)
    basis[:n, :NUM_BINS] = cos_rows.T
    basis[:n, NUM_BINS:] = sin_rows.T

    banks = mel_banks()  # (128, 257)
    if banks.shape != (NUM_MEL_BINS, NUM_BINS + 1) or torch.any(banks[:, NUM_BINS] != 0):
        raise RuntimeError(
            "sslam.features.mel_banks(): expected (128, 257) with a zero Nyquist column, got "
            f"shape {tuple(banks.shape)}; the kernel skips that column"
        )
    return basis.to(torch.float32), banks[:, :NUM_BINS].T.contiguous()


@cached_constant()
def _constants(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    basis, mel = _constants_cpu()
    return basis.to(device), mel.to(device)


def _new_buffer(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Uninitialised output buffer: every element is written by the kernel."""
    return torch.empty(shape, dtype=dtype, device=device)


def _launch(
    waveforms: torch.Tensor, lengths: torch.Tensor, target_length: int, norm_mean: float,
    norm_scale: float, mix_starts: list[int], mix_width: int, dot_precision: str,
) -> torch.Tensor:
    """Run the kernel on validated inputs: (B, N) float32 rows, (B,) int32 lengths on device."""
    batch, num_samples = waveforms.shape
    mix = bool(mix_starts)
    out = _new_buffer(
        ((2 if mix else 1) * batch, target_length // PATCH * FREQ_PATCHES, PATCH * PATCH),
        torch.float32, waveforms.device,
    )
    basis, mel = _constants(waveforms.device)
    starts = mix_starts if mix else [0, 0]
    if interpreting() and not waveforms.is_cuda:
        kernel, meta = _fbank_patch_kernel, _INTERPRETER_CONFIG
    else:
        kernel, meta = _autotuned_kernel(), {}
    # One counter per (frame block, mixture) for the fused mixing.
    counters = torch.zeros(
        (triton.cdiv(target_length, _SMALLEST_BLOCK_T) * batch if mix else 1,),
        dtype=torch.int32, device=waveforms.device,
    )

    def grid(meta_):
        return (triton.cdiv(target_length, meta_["BLOCK_T"]), batch)

    kernel[grid](
        waveforms, lengths, basis, mel, out, counters,
        num_samples, waveforms.stride(0), batch, target_length,
        norm_mean, norm_scale, starts[0], starts[1], mix_width,
        MIX=mix, PRECISION=dot_precision, **meta,
    )
    return out


@torch.library.custom_op("sslam::fbank_patch", mutates_args=())
def _fbank_patch_op(
    waveforms: torch.Tensor, lengths: torch.Tensor, target_length: int, norm_mean: float,
    norm_scale: float, mix_starts: list[int], mix_width: int, dot_precision: str,
) -> torch.Tensor:
    """Patches (B or 2B, target_length / 16 * 8, 256) float32; see :func:`fbank_patch`."""
    # The kernel steps over rows by their stride but reads each row's samples, and the lengths,
    # contiguously.
    if waveforms.stride(1) != 1:
        waveforms = waveforms.contiguous()
    return _launch(waveforms.to(torch.float32), lengths.to(torch.int32).contiguous(), target_length, norm_mean, norm_scale,
                   mix_starts, mix_width, dot_precision)


@_fbank_patch_op.register_fake
def _fbank_patch_fake(waveforms, lengths, target_length, norm_mean, norm_scale, mix_starts,
                      mix_width, dot_precision):
    batch = waveforms.shape[0] * (2 if mix_starts else 1)
    return waveforms.new_empty(
        (batch, target_length // PATCH * FREQ_PATCHES, PATCH * PATCH), dtype=torch.float32
    )


# ----------------------------------------------------------------------------------------------
# Reference and public function
# ----------------------------------------------------------------------------------------------


def logmel_float64(clip: torch.Tensor) -> torch.Tensor:
    """(N,) clip at 16 kHz -> (frames, 128) float64 log-mel, the chain of SPEC 1.1 computed in
    float64 and written independently of the kernel's folded basis: the yardstick of both
    float32 paths' accuracy (the tests, ``bench/fbank_accuracy.py``)."""
    x = clip.double()
    x = x - x.mean()
    frames = x.unfold(0, FRAME_LENGTH, FRAME_SHIFT)
    frames = frames - frames.mean(dim=-1, keepdim=True)
    previous = torch.cat([frames[:, :1], frames[:, :-1]], dim=-1)
    window = torch.hann_window(FRAME_LENGTH, periodic=False, dtype=torch.float64, device=x.device)
    power = torch.fft.rfft((frames - PREEMPHASIS * previous) * window, n=FFT_SIZE).abs() ** 2
    mel = power @ mel_banks(x.device).double().T
    return mel.clamp(min=torch.finfo(torch.float32).eps).log()


def fbank_patch_ref(
    waveforms: torch.Tensor,
    lengths: torch.Tensor | None = None,
    *,
    target_length: int = 1024,
    norm: Norm = "audioset",
    mix: MixWindows | None = None,
) -> torch.Tensor:
    """PyTorch reference of :func:`fbank_patch`: ``patchify(preprocess(...))`` (+ mixtures)."""
    # No NaN/Inf scan: like the kernel, the reference lets a bad sample show in the output.
    spec = preprocess(waveforms, target_length=target_length, norm=norm, lengths=lengths, check_finite=False)
    patches = patchify(spec)
    if mix is None:
        return patches
    return torch.cat([patches, mix_patches(patches, mix, FREQ_PATCHES)])


def _check_lengths(lengths: torch.Tensor | None, batch: int, num_samples: int) -> torch.Tensor:
    """(B,) int64 on the CPU, each in [400, N]; a GPU tensor costs one device sync here."""
    if lengths is None:
        lens = torch.full((batch,), num_samples, dtype=torch.int64)
    else:
        lens = integer_lengths(lengths)
        if lens.shape != (batch,) or bool((lens < 0).any()) or bool((lens > num_samples).any()):
            raise ValueError(
                f"lengths: expected {batch} values in [0, {num_samples}], got {lens.tolist()}"
            )
    short = (lens < FRAME_LENGTH).nonzero().flatten().tolist()
    if short:
        raise AudioError(
            f"clip(s) {short}: shorter than one 25 ms frame ({FRAME_LENGTH} samples at 16 kHz; "
            f"got {[int(lens[i]) for i in short]})"
        )
    return lens


def _traced_lengths(lengths, batch: int, num_samples: int, device) -> torch.Tensor:
    """Lengths for a traced call: their type and shape checked, not their values (see
    :func:`fbank_patch`)."""
    if lengths is None:
        if num_samples < FRAME_LENGTH:
            raise AudioError(f"waveforms: {num_samples} samples, shorter than one 25 ms frame")
        return torch.full((batch,), num_samples, dtype=torch.int64, device=device)
    lengths = integer_counts(lengths)
    if lengths.shape != (batch,):
        raise ValueError(f"lengths: expected shape ({batch},), got {tuple(lengths.shape)}")
    return lengths


def fbank_patch(
    waveforms: torch.Tensor,
    lengths: torch.Tensor | None = None,
    *,
    target_length: int = 1024,
    norm: Norm = "audioset",
    mix: MixWindows | None = None,
    dot_precision: str = DEFAULT_DOT_PRECISION,
) -> torch.Tensor:
    """16 kHz waveforms -> normalised log-mel 16x16 patches, the model input, in one pass.

    Args:
        waveforms: (B, N) float 16 kHz samples on the [-1, 1] scale, right-padded.
        lengths: (B,) int number of valid samples per clip (default: all N); each >= 400.
        target_length: frames after zero-padding / cropping, a multiple of 16.
        norm: 'audioset', 'esc50', 'spcv2', 'spass', a (mean, std) pair, or None.
        mix: the SSLAM non-mixed windows (aligned to 16 frames); when given, the B mixtures
            follow the B clean clips (SPEC 5.1), both from the same pass.
        dot_precision: 'ieee' (default) or 'tf32x3', the GPU matmul precision (see module doc).

    Returns:
        (B, target_length / 16 * 8, 256) float32, or (2B, ...) with ``mix``: equal to
        ``patchify(preprocess(waveforms, lengths=lengths, ...))`` up to float32 rounding (within
        about 1e-4 of a float64 fbank on real audio and noise, a bin near the log floor up to
        2.3e-4; a pure tone's faint mel bins a few 1e-3 from the reference: see the module doc).
        The kernel has no backward: a waveform that requires grad takes the (differentiable)
        reference.

    Length values are checked eagerly (clips shorter than 400 samples raise
    :class:`sslam.audio.AudioError`). Pass ``lengths`` on the CPU: then nothing waits for the
    GPU; a GPU ``lengths`` costs one device sync to read them. Inside
    ``torch.compile`` the kernel path checks shapes only: lengths are clamped to [0, N] and a
    clip shorter than one frame comes out as padding. The reference reads the lengths on the
    host, so there it breaks the graph (``fullgraph=True`` refuses it).
    """
    if not isinstance(waveforms, torch.Tensor) or waveforms.dim() != 2 or waveforms.shape[0] == 0:
        shape = tuple(waveforms.shape) if isinstance(waveforms, torch.Tensor) else type(waveforms)
        raise ValueError(f"waveforms: expected a (batch >= 1, samples) tensor, got {shape}")
    if not waveforms.is_floating_point():
        raise ValueError(f"waveforms: expected floating-point samples, got {waveforms.dtype}")
    # Integral check first: a float (32.0) would pass the arithmetic below and only fail in
    # the custom op's schema with a less helpful message.
    if (isinstance(target_length, bool) or not isinstance(target_length, numbers.Integral)
            or target_length <= 0 or target_length % PATCH):
        raise ValueError(f"target_length={target_length!r}: must be a positive multiple of {PATCH}")
    if dot_precision not in DOT_PRECISIONS:
        raise ValueError(f"dot_precision={dot_precision!r}: expected one of {DOT_PRECISIONS}")
    if mix is not None:
        window_patch_rows(mix)  # raises unless aligned to whole patch rows
        if mix.end > target_length:
            raise ValueError(f"mix={mix}: the second window ends past target_length={target_length}")
    batch, num_samples = waveforms.shape
    if traced(waveforms, lengths):
        # Checking length values needs them on the host, which a traced call cannot do.
        lens = _traced_lengths(lengths, batch, num_samples, waveforms.device)
    else:
        lens = _check_lengths(lengths, batch, num_samples)
    if not use_kernels(waveforms) or builds_graph(waveforms):
        # The checked lengths stay on the CPU, where preprocess reads them without a device sync.
        return fbank_patch_ref(waveforms, lens, target_length=target_length, norm=norm, mix=mix)
    stats = norm_stats(norm)
    mean, std = stats if stats is not None else (0.0, 0.5)  # (x - 0) / 1 is exact
    wave = waveforms.to(torch.float32)
    # Checked lengths live on the CPU: an asynchronous copy, so the host does not wait for the
    # GPU here (a blocking one synchronises the stream).
    lens = lens.to(torch.int32).to(wave.device, non_blocking=True)
    return _fbank_patch_op(
        wave, lens, target_length, float(mean),
        float(2 * std), list(mix.starts) if mix is not None else [], mix.width if mix else 0,
        dot_precision,
    )
