"""The EAT / SSLAM audio encoder (SPEC section 2): a post-LN ViT over 16x16 spectrogram patches.

patch conv 16x16/16 -> + fixed 2-D sin-cos positions -> [keep the unmasked patches] -> prepend
CLS (no position) -> LayerNorm -> depth x post-LN block -> (no final norm).

A block is ``h = LN1(x + Attn(x)); m = MLP(h); x' = LN2(h + m)``; it also returns ``m``, the
raw FFN output, from which the teacher builds its targets.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import math
import threading
import weakref
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import (
    CheckpointPolicy,
    checkpoint,
    create_selective_checkpoint_contexts,
)

from .features import NUM_MEL_BINS, PATCH

ATTENTION_IMPLS = ("auto", "sdpa", "math", "triton")


# Rows of the position table an encoder may have: 8192 time patches at 8 frequency patches, 21
# minutes of audio in one window (the released models have 6144 rows, 122.9 s). The bound keeps
# a config read from a file from allocating an arbitrarily large table.
MAX_POSITIONS = 1 << 16


@dataclass(frozen=True)
class EncoderConfig:
    """Architecture of an encoder. The defaults are ViT-B, the released SSLAM model."""

    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    patch_size: int = PATCH
    mel_bins: int = NUM_MEL_BINS
    max_length: int = 768  # time patches in the position table (768 x 16 frames = 122.9 s)
    norm_eps: float = 1e-6
    qkv_bias: bool = True
    drop_path_rate: float = 0.0  # 0 in pretraining; 0.1 when fine-tuning
    num_classes: int = 0  # > 0 adds the fine-tuning head: Linear(LayerNorm(CLS))
    head_norm_eps: float = 1e-6  # fairseq fine-tuning head; Hugging Face uses 1e-5

    def __post_init__(self):
        # Configs also come from files (config.json, checkpoint metadata): check types and ranges
        # here so a bad file fails with a ValueError naming the field, not deep inside a layer.
        for name in ("embed_dim", "depth", "num_heads", "patch_size", "mel_bins", "max_length", "num_classes"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise ValueError(f"{name}={value!r} must be an integer")
            if value >= 2**31:  # no tensor dimension is this large; the repr of such an int may fail
                raise ValueError(f"{name}: a {value.bit_length()}-bit integer, over the 2**31 - 1 supported")
        for name in ("mlp_ratio", "norm_eps", "drop_path_rate", "head_norm_eps"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
                raise ValueError(f"{name}={value!r} must be a finite number")
            object.__setattr__(self, name, float(value))  # 4 and 4.0 give the same config
        if not isinstance(self.qkv_bias, bool):
            raise ValueError(f"qkv_bias={self.qkv_bias!r} must be true or false")
        for name in ("embed_dim", "depth", "num_heads", "max_length", "patch_size", "mel_bins"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be positive")
        if self.num_classes < 0:
            raise ValueError(f"num_classes={self.num_classes} must be >= 0 (0 = no classification head)")
        if self.embed_dim % self.num_heads:
            raise ValueError(
                f"embed_dim={self.embed_dim} is not divisible by num_heads={self.num_heads}"
            )
        if self.embed_dim % 4:
            raise ValueError(f"embed_dim={self.embed_dim}: the 2-D sin-cos table needs a multiple of 4")
        if self.mel_bins % self.patch_size:
            raise ValueError(f"mel_bins={self.mel_bins} is not a multiple of patch_size={self.patch_size}")
        if self.max_length * self.freq_patches > MAX_POSITIONS:
            raise ValueError(
                f"max_length={self.max_length} x {self.freq_patches} frequency patches = "
                f"{self.max_length * self.freq_patches} positions, over the {MAX_POSITIONS} "
                f"supported ({MAX_POSITIONS // self.freq_patches * self.patch_size} frames)"
            )
        if not math.isfinite(self.embed_dim * self.mlp_ratio):
            raise ValueError(f"mlp_ratio={self.mlp_ratio} gives no finite MLP width for embed_dim={self.embed_dim}")
        if self.mlp_dim < 1:
            raise ValueError(f"mlp_ratio={self.mlp_ratio} gives an MLP of {self.mlp_dim} units for embed_dim={self.embed_dim}")
        if self.norm_eps <= 0 or self.head_norm_eps <= 0:
            raise ValueError(f"norm_eps={self.norm_eps}, head_norm_eps={self.head_norm_eps} must be positive")
        if not 0 <= self.drop_path_rate < 1:
            raise ValueError(f"drop_path_rate={self.drop_path_rate} must be in [0, 1)")

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def max_frames(self) -> int:
        """Frames the position table covers: ``max_length`` patch rows."""
        return self.max_length * self.patch_size

    @property
    def default_frames(self) -> int:
        """The input window where none is given: AudioSet's 10.24 s (1024 frames), or what a
        shorter position table covers."""
        return min(1024, self.max_frames)

    def fits_window(self, frames: int) -> bool:
        """Whether ``frames`` can be the input window: whole patch rows that the table covers."""
        return 0 < frames <= self.max_frames and frames % self.patch_size == 0

    @property
    def mlp_dim(self) -> int:
        # int(), as the official blocks (and timm's) size fc1: 384 * 2.7 = 1036.8 -> 1036. The
        # 1e-6 keeps a ratio read back from a file's fc1 rows (not exact in binary) from falling
        # one short: 88 * (120 / 88) = 119.99999999999999 is 120 rows.
        return int(self.embed_dim * self.mlp_ratio + 1e-6)

    @property
    def freq_patches(self) -> int:
        return self.mel_bins // self.patch_size

    def replace(self, **changes) -> EncoderConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> EncoderConfig:
        if not isinstance(values, dict):
            raise ValueError(f"EncoderConfig: expected a dict of fields, got {type(values).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"EncoderConfig: unknown field(s) {unknown}")
        return cls(**values)


VARIANTS: dict[str, EncoderConfig] = {
    "tiny": EncoderConfig(embed_dim=64, depth=2, num_heads=2),
    "small": EncoderConfig(embed_dim=384, depth=12, num_heads=6),
    "base": EncoderConfig(),
    "large": EncoderConfig(embed_dim=1024, depth=24, num_heads=16),
}


def sincos_positions(embed_dim: int, time_patches: int, freq_patches: int) -> torch.Tensor:
    """Fixed 2-D sin-cos table (time_patches * freq_patches, D), float32, token n = t * F + f.

    The first half of each row encodes the frequency index f and the second half the time
    index t, each as [sin(i w_k), cos(i w_k)] with w_k = 10000^(-k / (D/4)), in float32 as the
    official table was built."""
    quarter = embed_dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float32) / quarter)

    def encode(index: torch.Tensor) -> torch.Tensor:
        angles = index.to(torch.float32)[:, None] * omega[None]
        return torch.cat([angles.sin(), angles.cos()], dim=1)  # (n, D/2)

    t = torch.arange(time_patches).repeat_interleave(freq_patches)
    f = torch.arange(freq_patches).repeat(time_patches)
    return torch.cat([encode(f), encode(t)], dim=1)


def attention_math(q, k, v, key_padding_mask=None):
    """Explicit matmul-softmax attention as in the official code (softmax in float32).
    q, k, v: (B, H, L, Dh); key_padding_mask: (B, L) bool, True = padded key."""
    scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
    if key_padding_mask is not None:
        scores = scores.masked_fill(key_padding_mask[:, None, None, :], float("-inf"))
    probs = scores.float().softmax(dim=-1).to(q.dtype)
    return probs @ v


@dataclass(frozen=True)
class PackedSequences:
    """Sequences stored back to back as the rows of one (1, T, D) tensor: sequence s is rows
    cu_seqlens[s]:cu_seqlens[s + 1]; max_seqlen bounds their lengths (see
    :func:`sslam.kernels.attention_varlen`)."""

    cu_seqlens: torch.Tensor  # (S + 1,) int32, on the rows' device
    max_seqlen: int

    @staticmethod
    def of(shapes: list[tuple[int, int]], device: torch.device) -> PackedSequences:
        """The packing of sets of (batch, length) sequences, set after set. The offsets are made
        on the device: copying them from the host could make the host wait for the GPU."""
        lengths = torch.cat([torch.full((b,), n, dtype=torch.int32, device=device) for b, n in shapes])
        cu_seqlens = F.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0))
        return PackedSequences(cu_seqlens, max(n for _, n in shapes))


def unpack_sequences(x: torch.Tensor, shapes: list[tuple[int, int]]) -> list[torch.Tensor]:
    """(1, T, D) rows packed by :meth:`PackedSequences.of` -> one (B_i, N_i, D) view per set."""
    parts = x[0].split([b * n for b, n in shapes])
    return [part.view(b, n, -1) for part, (b, n) in zip(parts, shapes)]


def gather_shared(tokens: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """``tokens[:, keep]`` for (B, N, D) tokens and (K,) indices; the Triton gather on CUDA."""
    from .kernels.switch import use_kernels

    if use_kernels(tokens):
        from .kernels.mixture import gather_tokens

        # The kernel takes int64 indices on the tokens' device; check_keep also allows int32, on the CPU.
        return gather_tokens(tokens, keep.to(tokens.device, torch.long))
    return tokens[:, keep]


def check_keep(keep: torch.Tensor, batch: int, clones: int, patches: int) -> None:
    """Validate the kept-patch indices of :meth:`Encoder.forward_tokens`: a 2-D keep needs
    exactly one row per clone of every clip (fewer rows would silently drop clips); values in
    [0, patches), checked on the CPU only (on a GPU reading them would wait for it) and not
    when traced (no values then), where a negative index would silently pick a patch from the end."""
    if keep.dtype not in (torch.int64, torch.int32) or keep.dim() not in (1, 2):
        raise ValueError(
            f"keep must be (K,) or (B * clones, K) int64 or int32 patch indices, got {keep.dtype} {tuple(keep.shape)}"
        )
    if keep.dim() == 2 and keep.shape[0] != batch * clones:
        raise ValueError(
            f"keep has {keep.shape[0]} rows; expected B * clones = {batch} * {clones} = {batch * clones}"
        )
    from .kernels.switch import traced

    if keep.device.type == "cpu" and keep.numel() and not traced(keep):
        low, high = int(keep.min()), int(keep.max())
        if low < 0 or high >= patches:
            raise ValueError(f"keep: patch indices must lie in [0, {patches}), got {low}..{high}")


def check_padding_mask(mask: torch.Tensor, rows: int, tokens: int) -> None:
    """key_padding_mask must be (B', N') bool, True = padded, over the tokens the blocks see."""
    if mask.dtype != torch.bool:
        raise ValueError(f"key_padding_mask must be a bool tensor (True = padded), got {mask.dtype}")
    if tuple(mask.shape) != (rows, tokens):
        raise ValueError(
            f"key_padding_mask has shape {tuple(mask.shape)}; expected ({rows}, {tokens}) = "
            "(rows after cloning, patch tokens after keep), without the CLS token"
        )


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, key_padding_mask=None, impl: str = "sdpa", packed: PackedSequences | None = None):
        b, n, d = x.shape
        qkv = self.qkv(x).view(b, n, 3, self.num_heads, d // self.num_heads)
        if packed is not None:  # x is (1, T, D): sequences back to back, each attending to itself
            from .kernels.attention import attention_varlen

            q, k, v = qkv[0].unbind(1)
            out = attention_varlen(q, k, v, packed.cu_seqlens, packed.max_seqlen)
            return self.proj(out.reshape(b, n, d))
        if impl == "triton":
            from .kernels.attention import attention

            out = attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], key_padding_mask=key_padding_mask)
            return self.proj(out.reshape(b, n, d))
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (B, H, L, Dh)
        if impl == "math":
            out = attention_math(q, k, v, key_padding_mask)
        else:
            mask = None if key_padding_mask is None else ~key_padding_mask[:, None, None, :]
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


def drop_path(x: torch.Tensor, rate: float, training: bool) -> torch.Tensor:
    """Stochastic depth: zero whole samples with probability ``rate`` and rescale the rest."""
    if rate == 0.0 or not training:
        return x
    keep = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(1 - rate)
    return x * keep / (1 - rate)


def drop_path_rates(rate: float, depth: int) -> list[float]:
    """Each block's stochastic-depth rate: rising linearly from 0 to ``rate`` over the blocks."""
    return [rate * i / max(1, depth - 1) for i in range(depth)]


class Block(nn.Module):
    """Post-LN transformer block; returns (block output, FFN output before residual and LN2)."""

    def __init__(self, cfg: EncoderConfig, drop_path_rate: float = 0.0):
        super().__init__()
        self.drop_path_rate = drop_path_rate
        self.norm1 = nn.LayerNorm(cfg.embed_dim, eps=cfg.norm_eps)
        self.attn = Attention(cfg.embed_dim, cfg.num_heads, cfg.qkv_bias)
        self.norm2 = nn.LayerNorm(cfg.embed_dim, eps=cfg.norm_eps)
        self.mlp = Mlp(cfg.embed_dim, cfg.mlp_dim)

    def forward(self, x, key_padding_mask=None, impl: str = "sdpa", packed: PackedSequences | None = None):
        h = self.norm1(x + drop_path(self.attn(x, key_padding_mask, impl, packed), self.drop_path_rate, self.training))
        m = self.mlp(h)
        return self.norm2(h + drop_path(m, self.drop_path_rate, self.training)), m


# How much of each block the backward recomputes instead of keeping (``set_block_checkpointing``).
BLOCK_CHECKPOINTING = ("off", "selective", "full")
# The classification head of a fine-tuned encoder (num_classes > 0): what pretraining drops and
# fine-tuning replaces.
HEAD_NAMES = ("fc_norm.weight", "fc_norm.bias", "head.weight", "head.bias")

# What a block keeps under "selective": the outputs of its matmuls and of attention. The rest
# (LayerNorms, GELU, residual adds, dtype casts) is element-wise or a row reduction, cheap to
# redo, yet holds 7 of the 16 token-width tensors (hidden-width ones count 4) that a ViT block
# keeps; recomputing it leaves 11, and adds no matmul.
KEPT_BY_SELECTIVE_CHECKPOINTING = frozenset({
    "aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm",
    "aten::_scaled_dot_product_flash_attention", "aten::_scaled_dot_product_flash_attention_for_cpu",
    "aten::_scaled_dot_product_efficient_attention", "aten::_scaled_dot_product_cudnn_attention",
    "sslam::attention_forward",
})


def _keep_matmul_outputs(ctx, func, *args, **kwargs) -> CheckpointPolicy:
    kept = func._schema.name in KEPT_BY_SELECTIVE_CHECKPOINTING
    return CheckpointPolicy.MUST_SAVE if kept else CheckpointPolicy.PREFER_RECOMPUTE


# Route what the recomputed blocks keep through the caller's saved-tensor hooks (offloading,
# memory accounting) where torch can; older torch has no such option and always bypasses them.
_SAVED_TENSOR_HOOKS_APPLY = (
    {"respect_saved_tensors_hooks": True}
    if "respect_saved_tensors_hooks" in inspect.signature(checkpoint).parameters else {}
)


def checkpointed_block(block: Block, mode: str, *args):
    """``block(*args)`` keeping less for the backward and redoing the rest there. "selective":
    only the matmul and attention outputs are kept (no extra matmul); "full": only the block
    input (the whole block runs twice, about 1/3 more FLOPs). Same outputs and gradients, bit
    for bit: the recomputation runs the same kernels on the same inputs (random draws replayed).

    "selective" allows one backward through the block (no ``retain_graph`` or double
    backward), and the block's outputs must not be modified in place before it."""
    if mode == "full":
        return checkpoint(block, *args, use_reentrant=False)
    context = partial(create_selective_checkpoint_contexts, _keep_matmul_outputs)
    return checkpoint(_without_autocast_cache(block), *args, use_reentrant=False, context_fn=context,
                      **_SAVED_TENSOR_HOOKS_APPLY)


def _without_autocast_cache(fn):
    """``fn`` with autocast's weight-cast cache off. Selective checkpointing replays the
    operations of the forward one by one and fails on any difference; a weight cast served
    from the cache (a second forward, or a no_grad one, earlier in the same autocast region)
    would be a cast in the replay only. The cast is done anyway in a region's first forward; a
    second forward with gradients gets casts of its own, so the two forwards' weight gradients
    meet in fp32 instead of bf16 (a last-bit difference from the run without checkpointing)."""
    def run(*args):
        cached = torch.is_autocast_cache_enabled()
        torch.set_autocast_cache_enabled(False)
        try:
            return fn(*args)
        finally:
            torch.set_autocast_cache_enabled(cached)

    return run


class EncoderOutput(NamedTuple):
    """x: (B', 1 + K, D) final block output, CLS at index 0. layer_results / block_outputs:
    per block (B', 1 + K, D) FFN outputs / block outputs, when asked for (else empty).

    A named tuple, read by name or index as Hugging Face's model outputs are: torch.export
    returns it and nn.DataParallel gathers it (both know named tuples, not dataclasses)."""

    x: torch.Tensor
    layer_results: list[torch.Tensor]
    block_outputs: list[torch.Tensor]


# Named, so that torch.export.save can write a program that returns it (the pytree API for
# this is private; the export test shows when it moves).
torch.utils._pytree._register_namedtuple(EncoderOutput, serialized_type_name="sslam.model.EncoderOutput")


def _reset_head(head: nn.Linear) -> None:
    """The classifier head's initialisation (the official fine-tuning's): trunc-normal(0.02)
    weights, zero bias."""
    nn.init.trunc_normal_(head.weight, std=0.02)
    nn.init.zeros_(head.bias)


class Encoder(nn.Module):
    """The ViT audio encoder. Build with :func:`create_model`; load weights with
    :func:`sslam.load_encoder`."""

    def __init__(self, cfg: EncoderConfig = EncoderConfig()):
        super().__init__()
        self.cfg = cfg
        d = cfg.embed_dim
        self.patch_embed = nn.Conv2d(1, d, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        # Fixed, not learned (filled by reset_parameters); a buffer so it is saved (official
        # checkpoints store a rounded copy).
        self.register_buffer("pos_embed", torch.empty(1, cfg.max_length * cfg.freq_patches, d), persistent=True)
        self.pre_norm = nn.LayerNorm(d, eps=cfg.norm_eps)
        self.blocks = nn.ModuleList(Block(cfg, rate) for rate in drop_path_rates(cfg.drop_path_rate, cfg.depth))
        if cfg.num_classes > 0:
            self.fc_norm = nn.LayerNorm(d, eps=cfg.head_norm_eps)
            self.head = nn.Linear(d, cfg.num_classes)
        self.attention_impl = "auto"
        self.checkpoint_blocks = "off"  # see set_block_checkpointing
        self.label_names: list[str] | None = None
        self.preprocessing: dict = {"sample_rate": 16000, "target_length": cfg.default_frames, "norm": "audioset"}
        self.reset_parameters()

    def input_window(self) -> tuple[int, object]:
        """(frames, norm) of the model's input: ``preprocessing``'s target_length and norm; where
        it gives none (a dict of the user's, an export's None), the config's default window and
        AudioSet's statistics."""
        frames = self.preprocessing.get("target_length")
        return self.cfg.default_frames if frames is None else int(frames), self.preprocessing.get("norm", "audioset")

    # ---- initialisation -------------------------------------------------------------------
    def reset_parameters(self) -> None:
        """Stage-1 initialisation: Linear N(0, 0.02) with zero bias, LayerNorm (1, 0), the patch
        conv Xavier-uniform on its (D, 256) view, CLS N(0, 1); the classifier head
        trunc-normal(0.02) with zero bias; the fixed sin-cos position table (a model built on
        the meta device and moved with ``to_empty`` holds uninitialised memory there)."""
        with torch.no_grad():
            self.pos_embed.copy_(sincos_positions(self.cfg.embed_dim, self.cfg.max_length, self.cfg.freq_patches)[None])
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=0.02)
                if module.bias is not None:  # qkv has no bias when qkv_bias=False
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        # The official code re-initialises only the patch conv's weight: its bias keeps
        # PyTorch's default, U(+-1/sqrt(fan_in)) (+-1/16 for 16 x 16 patches).
        self.patch_embed.reset_parameters()
        w = self.patch_embed.weight
        nn.init.xavier_uniform_(w.data.view(w.shape[0], -1))
        nn.init.normal_(self.cls_token)
        if self.cfg.num_classes > 0:
            _reset_head(self.head)

    def set_attention(self, impl: str) -> Encoder:
        """'auto' (the Triton kernel on CUDA when enabled and the heads are at most its 128 wide,
        else SDPA), 'sdpa', 'math' (explicit matmul-softmax, the official computation) or
        'triton'."""
        if impl not in ATTENTION_IMPLS:
            raise ValueError(f"attention={impl!r}: choose one of {ATTENTION_IMPLS}")
        self.attention_impl = impl
        return self

    def set_block_checkpointing(self, mode: str) -> Encoder:
        """What the blocks keep for the backward in training: 'off' (all that autograd saves),
        'selective' (matmul and attention outputs; LayerNorms, GELU and residual sums are
        recomputed: about 1/3 less activation memory, no extra matmul) or 'full' (only each
        block's input, as timm's gradient checkpointing: the least memory, about 1/3 more
        FLOPs). Exact either way."""
        if mode not in BLOCK_CHECKPOINTING:
            raise ValueError(f"block checkpointing {mode!r}: choose one of {BLOCK_CHECKPOINTING}")
        self.checkpoint_blocks = mode
        return self

    def _attention_impl(self, x: torch.Tensor) -> str:
        if self.attention_impl != "auto":
            return self.attention_impl
        from .kernels.attention import MAX_HEAD_DIM
        from .kernels.switch import use_kernels

        return "triton" if use_kernels(x) and self.cfg.head_dim <= MAX_HEAD_DIM else "sdpa"

    # ---- forward pieces -------------------------------------------------------------------
    def patchify_embed(self, spec: torch.Tensor) -> torch.Tensor:
        """(B, 1, T, mel_bins) spectrogram -> (B, N, D) patch tokens with positions added,
        N = T/16 * mel_bins/16, time-major (token = t * F + f)."""
        if spec.dim() != 4 or spec.shape[1] != 1 or spec.shape[3] != self.cfg.mel_bins:
            raise ValueError(
                f"expected a (B, 1, T, {self.cfg.mel_bins}) spectrogram, got {tuple(spec.shape)}"
            )
        t = spec.shape[2]
        if t < self.cfg.patch_size:
            raise ValueError(f"T={t} frames: the encoder needs at least {self.cfg.patch_size} frames")
        if t % self.cfg.patch_size:
            raise ValueError(f"T={t} frames is not a multiple of the patch size {self.cfg.patch_size}")
        if t // self.cfg.patch_size > self.cfg.max_length:
            raise ValueError(
                f"T={t} frames exceeds the position table ({self.cfg.max_length} patch rows = "
                f"{self.cfg.max_frames} frames); split the audio into windows"
            )
        x = self.patch_embed(self._as_weights(spec)).flatten(2).transpose(1, 2)  # (B, N, D)
        return x + self.pos_embed[:, : x.shape[1]].to(x.dtype)

    def embed_patches(self, patches: torch.Tensor) -> torch.Tensor:
        """(B, N, p * p) patches, 256 for 16 x 16 (see :func:`sslam.features.patchify`) -> (B, N, D) tokens with
        positions; the same result as :meth:`patchify_embed` on the unpatched spectrogram."""
        p, f = self.cfg.patch_size, self.cfg.freq_patches
        if patches.dim() != 3 or patches.shape[2] != p * p or patches.shape[1] % f:
            raise ValueError(
                f"expected (B, N, {p * p}) patches with N a multiple of {f}, or a (B, 1, T, "
                f"{self.cfg.mel_bins}) spectrogram; got {tuple(patches.shape)}"
            )
        if patches.shape[1] > self.pos_embed.shape[1]:
            raise ValueError(f"{patches.shape[1]} patches exceed the position table ({self.pos_embed.shape[1]})")
        w = self.patch_embed.weight.reshape(self.cfg.embed_dim, -1)
        x = F.linear(self._as_weights(patches), w, self.patch_embed.bias)
        return x + self.pos_embed[:, : x.shape[1]].to(x.dtype)

    def _as_weights(self, x: torch.Tensor) -> torch.Tensor:
        """The input in the weights' dtype: a half model (or half weights, see
        :mod:`sslam.precision`) takes fp32 features, as the official fp16 runs cast their input."""
        return x.to(self.patch_embed.weight.dtype)

    def _check_tokens(self, name: str, tokens: torch.Tensor) -> None:
        if tokens.dim() != 3 or tokens.shape[2] != self.cfg.embed_dim:
            raise ValueError(f"{name}: expected (B, N, {self.cfg.embed_dim}) tokens, got {tuple(tokens.shape)}")

    def forward_tokens(
        self,
        tokens: torch.Tensor,
        *,
        keep: torch.Tensor | None = None,
        clones: int = 1,
        key_padding_mask: torch.Tensor | None = None,
        layer_results: bool = False,
        block_outputs: bool = False,
    ) -> EncoderOutput:
        """Run the transformer on patch tokens that already carry their positions.

        Args:
            tokens: (B, N, D).
            keep: (B * clones, K) int64 (or int32) indices of the patches each row keeps (the masked
                student); row r uses clip r // clones. A 1-D (K,) ``keep`` keeps the same
                patches of every clip (the teacher's partner pass). None keeps all N.
            key_padding_mask: (B', N') bool, True = padded patch (excluded from attention);
                over the kept tokens when ``keep`` is given.
            layer_results / block_outputs: also return every FFN output / block output.

        Returns:
            :class:`EncoderOutput` with x of shape (B', 1 + K, D), B' = B * clones.
        """
        self._check_tokens("tokens", tokens)
        if clones < 1:
            raise ValueError(f"clones={clones} must be >= 1")
        if keep is not None:
            check_keep(keep, tokens.shape[0], clones, tokens.shape[1])
        if keep is not None and keep.dim() == 2:  # per-row kept patches: gather and clone at once
            rows = torch.arange(keep.shape[0], device=keep.device) // clones
            tokens = tokens[rows[:, None], keep]
        else:
            if keep is not None:
                tokens = gather_shared(tokens, keep)
            if clones != 1:
                tokens = tokens.repeat_interleave(clones, dim=0)
        x = self.pre_norm(self._with_cls(tokens))
        if key_padding_mask is not None:
            check_padding_mask(key_padding_mask, tokens.shape[0], tokens.shape[1])
            key_padding_mask = F.pad(key_padding_mask, (1, 0), value=False)  # CLS is never padding
        return self._blocks(x, key_padding_mask, self._attention_impl(x), None, layer_results, block_outputs)

    def _with_cls(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, N, D) tokens -> (B, 1 + N, D) with the CLS token in front."""
        return torch.cat([self.cls_token.to(tokens.dtype).expand(tokens.shape[0], -1, -1), tokens], dim=1)

    def _blocks(self, x, key_padding_mask, impl: str, packed: PackedSequences | None,
                layer_results: bool, block_outputs: bool) -> EncoderOutput:
        """The transformer blocks on x (B', 1 + K, D), CLS and pre-norm applied."""
        ffn_outputs, outputs = [], []
        mode = self.checkpoint_blocks if torch.is_grad_enabled() else "off"
        for block in self.blocks:
            if mode == "off":
                x, m = block(x, key_padding_mask, impl, packed)
            else:
                x, m = checkpointed_block(block, mode, x, key_padding_mask, impl, packed)
            if layer_results:
                ffn_outputs.append(m)
            if block_outputs:
                outputs.append(x)
        return EncoderOutput(x, ffn_outputs, outputs)

    def forward_packed(
        self, token_sets: list[torch.Tensor], *, layer_results: bool = False, block_outputs: bool = False
    ) -> list[EncoderOutput]:
        """:meth:`forward_tokens` of each set of (B_i, N_i, D) tokens (positions added, nothing
        masked, padded or cloned), all sets in one pass.

        Every op but the attention is row-wise, so the sequences of all sets are stacked as the
        rows of one tensor and each op is issued once for them all instead of once per set; the
        attention keeps them apart through the Triton kernels' packed mode (cu_seqlens). For the
        stage-2 teacher, whose two passes were half of a step's forward ops, this halves the
        host's work on them and gives the matmuls more rows. Where the attention is not the
        Triton kernel (it alone packs), or in training with stochastic depth (drawn per
        sequence), the sets run one after another. Either way each set's output is that of
        :meth:`forward_tokens` up to rounding (the matmuls see other row counts)."""
        for i, t in enumerate(token_sets):
            self._check_tokens(f"token_sets[{i}]", t)
        packs = (len(token_sets) > 1 and self._attention_impl(token_sets[0]) == "triton"
                 and not (self.training and self.cfg.drop_path_rate > 0))
        if not packs:
            return [self.forward_tokens(t, layer_results=layer_results, block_outputs=block_outputs)
                    for t in token_sets]
        shapes = [(t.shape[0], 1 + t.shape[1]) for t in token_sets]
        rows = [self._with_cls(t).flatten(0, 1) for t in token_sets]
        x = self.pre_norm(torch.cat(rows))[None]  # (1, T, D)
        out = self._blocks(x, None, "triton", PackedSequences.of(shapes, x.device), layer_results, block_outputs)
        unpack = partial(unpack_sequences, shapes=shapes)
        layers = [unpack(m) for m in out.layer_results]  # [block][set]
        blocks = [unpack(b) for b in out.block_outputs]
        return [EncoderOutput(x, [m[i] for m in layers], [b[i] for b in blocks])
                for i, x in enumerate(unpack(out.x))]

    def embed_input(self, x: torch.Tensor) -> torch.Tensor:
        """Patch tokens with positions from a (B, 1, T, mel_bins) spectrogram or from its
        (B, N, p * p) patches (:func:`sslam.features.patchify`, e.g. the fused feature kernel)."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x: expected a (B, 1, T, {self.cfg.mel_bins}) spectrogram tensor (sslam.preprocess) or "
                            f"its (B, N, {self.cfg.patch_size ** 2}) patches, got {type(x).__name__}")
        return self.patchify_embed(x) if x.dim() == 4 else self.embed_patches(x)

    def forward(
        self,
        x: torch.Tensor,
        *,
        keep: torch.Tensor | None = None,
        clones: int = 1,
        key_padding_mask: torch.Tensor | None = None,
        layer_results: bool = False,
        block_outputs: bool = False,
    ) -> EncoderOutput:
        """(B, 1, T, mel_bins) normalised spectrogram, or its (B, N, p * p) patches ->
        :class:`EncoderOutput`; the other arguments are those of :meth:`forward_tokens`."""
        return self.forward_tokens(
            self.embed_input(x),
            keep=keep,
            clones=clones,
            key_padding_mask=key_padding_mask,
            layer_results=layer_results,
            block_outputs=block_outputs,
        )

    def classify(self, cls: torch.Tensor) -> torch.Tensor:
        """Fine-tuned head: (B, D) CLS -> (B, num_classes) logits."""
        if self.cfg.num_classes <= 0:
            raise RuntimeError("this encoder has no classification head (num_classes=0)")
        if cls.dim() != 2 or cls.shape[1] != self.cfg.embed_dim:
            # e.g. the whole (B, 1 + N, D) output, which the head would map token by token
            raise ValueError(f"cls: expected the (B, {self.cfg.embed_dim}) CLS outputs, got {tuple(cls.shape)}")
        return self.head(self.fc_norm(cls))

    # ---- timm's names --------------------------------------------------------------------
    @property
    def num_features(self) -> int:
        """D, the width of the CLS embedding and of every token."""
        return self.cfg.embed_dim

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1, T, mel_bins) spectrogram or its patches -> (B, 1 + N, D) final tokens, CLS first."""
        return self(x).x

    def forward_head(self, features: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """(B, 1 + N, D) final tokens -> (B, num_classes) logits of the CLS token; with
        ``pre_logits`` the (B, D) CLS after fc_norm, which the head reads; without a head the
        (B, D) CLS itself."""
        if not isinstance(features, torch.Tensor) or features.dim() != 3 or features.shape[-1] != self.cfg.embed_dim:
            shape = tuple(features.shape) if isinstance(features, torch.Tensor) else type(features).__name__
            raise ValueError(f"features: expected the (B, 1 + N, {self.cfg.embed_dim}) final tokens of "
                             f"forward_features, got {shape}")
        cls = features[:, 0]
        if self.cfg.num_classes <= 0:
            return cls
        return self.fc_norm(cls) if pre_logits else self.classify(cls)

    def reset_classifier(self, num_classes: int) -> Encoder:
        """A fresh classification head for ``num_classes`` (0: none), on the encoder's device and
        dtype: fc_norm (1, 0), the head trunc-normal(0.02) with zero bias. The encoder's other
        weights are untouched; ``label_names`` no longer apply and are cleared."""
        cfg = self.cfg.replace(num_classes=num_classes)  # refuses a negative count by name
        like = {"device": self.cls_token.device, "dtype": self.cls_token.dtype}
        for name in ("fc_norm", "head"):
            if hasattr(self, name):
                delattr(self, name)
        if num_classes > 0:
            self.fc_norm = nn.LayerNorm(cfg.embed_dim, eps=cfg.head_norm_eps, **like)
            self.head = nn.Linear(cfg.embed_dim, num_classes, **like)
            _reset_head(self.head)
        self.cfg, self.label_names = cfg, None
        return self

    def embed(self, audio, sample_rate: int | None = None, **kwargs):
        """Embeddings of raw audio; see :func:`sslam.embedding.embed`."""
        from .embedding import embed

        return embed(self, audio, sample_rate, **kwargs)

    @classmethod
    def from_pretrained(cls, source, **kwargs) -> Encoder:
        """:func:`sslam.load_encoder` under the name Hugging Face and timm use: any checkpoint it
        reads (an official fairseq ``.pt``, a Hugging Face folder or ``hf-hub:`` name, ours, a
        run folder), with its ``device``, ``weights`` and ``dtype`` arguments."""
        from .checkpoint import load_encoder

        return load_encoder(source, **kwargs)

    def save_pretrained(self, out_dir) -> Path:
        """:func:`sslam.save_encoder` under the Hugging Face name: ``out_dir/model.safetensors``
        and ``out_dir/config.json``, written atomically; returns ``out_dir``."""
        from .checkpoint import save_encoder

        return save_encoder(self, out_dir)

    def compile_for_inference(self) -> Encoder:
        """Compile ``forward`` with ``torch.compile`` for inference, weights frozen into the graph
        (fused LayerNorm/GELU/bias epilogues, prepacked matmul weights on the CPU). The first
        call of each input shape compiles (about 40 s for ViT-B on 2 CPU cores); use it under
        ``torch.no_grad`` (as :meth:`embed` does), not for training. Compile once the weights,
        dtype and device are final: loading weights afterwards is refused, and a pickled or
        copied encoder is the eager one."""
        import torch._inductor.config as inductor_config

        dtype = next(self.parameters()).dtype
        if dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"compile_for_inference: {str(dtype).removeprefix('torch.')} weights: inductor's frozen "
                             "graphs take float32, bfloat16 or float16 ones")
        compiled = torch.compile(self.forward)

        def forward(*args, **kwargs):
            # Freezing is a process-wide inductor setting: on only while this model compiles and
            # runs, so a model compiled later (a pretraining teacher, updated every step) is not
            # frozen too.
            with inductor_config.patch(freezing=True):
                return compiled(*args, **kwargs)

        self.forward = forward
        self.register_load_state_dict_pre_hook(_refuse_frozen_load)
        return self.eval()

    def __getstate__(self) -> dict:
        """A pickled or copied encoder is the eager one: a compiled ``forward`` (see
        :meth:`compile_for_inference`) holds this process's graphs."""
        state = super().__getstate__()
        state.pop("forward", None)
        return state

    def num_parameters(self, trainable_only: bool = True) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)


def _refuse_frozen_load(module: nn.Module, *args) -> None:
    """A load_state_dict pre-hook: an encoder compiled for inference holds its weights in its
    graphs, and would compute with a mix of the old and the new ones."""
    if "forward" in vars(module):
        raise RuntimeError("this encoder was compiled for inference with its weights frozen in: load the weights "
                           "before compile_for_inference(), or load them into a new encoder")


_MODE_LOCKS: weakref.WeakKeyDictionary[nn.Module, threading.RLock] = weakref.WeakKeyDictionary()
_MODE_LOCKS_LOCK = threading.Lock()


@contextlib.contextmanager
def eval_mode(model: nn.Module):
    """``model`` in eval mode (no stochastic depth: deterministic outputs) for the block, then
    back in the modes it and each of its submodules had. Threads sharing a model in train
    mode take turns (each would otherwise save the modes another had just set); one in eval
    mode, which needs no switch, serves them at once."""
    with _MODE_LOCKS_LOCK:
        lock = _MODE_LOCKS.setdefault(model, threading.RLock())
    with lock:
        switch = any(module.training for module in model.modules())
        if switch:
            modes = _modes(model)
            model.eval()
            try:
                yield model
            finally:
                _restore_modes(modes)
            return
    yield model


def _modes(model: nn.Module) -> list[tuple[nn.Module, bool]]:
    """Each submodule's train/eval mode: ``model.train(mode)`` would set them all to one."""
    return [(module, module.training) for module in model.modules()]


def _restore_modes(modes: list[tuple[nn.Module, bool]]) -> None:
    for module, training in modes:
        module.training = training


@contextlib.contextmanager
def stochastic_depth(model: Encoder, rate: float):
    """``model`` in train mode with drop-path rising to ``rate`` over its blocks, as if built
    with ``drop_path_rate=rate``, for the block; then back in the mode and rates it had."""
    modes, cfg, rates = _modes(model), model.cfg, [block.drop_path_rate for block in model.blocks]
    model.cfg = cfg.replace(drop_path_rate=rate)
    for block, new in zip(model.blocks, drop_path_rates(rate, cfg.depth)):
        block.drop_path_rate = new
    model.train()
    try:
        yield model
    finally:
        model.cfg = cfg
        for block, old in zip(model.blocks, rates):
            block.drop_path_rate = old
        _restore_modes(modes)


def create_model(
    name_or_config: str | EncoderConfig = "base",
    checkpoint: str | None = None,
    **overrides,
) -> Encoder:
    """Build an encoder from a variant name in :data:`VARIANTS` or an :class:`EncoderConfig`,
    with optional field overrides; with ``checkpoint``, load its encoder weights (any format
    :func:`sslam.load_encoder` reads; every key and shape must match the built model)."""
    if isinstance(name_or_config, str):
        try:
            cfg = VARIANTS[name_or_config]
        except KeyError:
            raise ValueError(
                f"unknown variant {name_or_config!r}; choose one of {sorted(VARIANTS)} or pass "
                "an EncoderConfig"
            ) from None
    else:
        cfg = name_or_config
    cfg = cfg.replace(**overrides) if overrides else cfg
    model = Encoder(cfg)
    if checkpoint is not None:
        from .checkpoint import _load_with_metadata

        _load_with_metadata(model, checkpoint)
    return model
