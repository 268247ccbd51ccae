"""The pretraining objectives: EAT stage 1 and SSLAM stage 2 (SPEC sections 3-5).

Pieces, each a small function or module:

* :class:`CNNDecoder` -- the student's light decoder (grouped 3x3 convs over the patch grid);
* :class:`EMATeacher` and :func:`ema_decay` -- the fp32 exponential-moving-average teacher;
* :func:`layer_targets` -- per-layer instance norm over tokens, top-K average, LayerNorm;
* :func:`regression_sums_ref` and friends -- ``||a - b||^2 / sqrt(D)`` summed, the official scale;
* :func:`srl_target` -- the stitched Source Retention target of stage 2;
* :class:`Pretrainer` -- student + decoder + teacher, and the stage-1 / stage-2 forward that
  returns every loss term, normalised as the official trainer does (sum / sample_size).

Clones: the student sees C masked copies of each clip. Targets are computed once per clip and
indexed by ``row // C``, never copied per clone.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import numbers
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from .kernels.switch import use_kernels
from .mixing import (
    MixWindows,
    mix_patches,
    mix_spectrograms,
    mixed_row_ranges,
    partner_keep_indices,
)
from .model import HEAD_NAMES, Encoder, EncoderConfig, EncoderOutput, gather_shared

# ---- decoder ------------------------------------------------------------------------------


@dataclass(frozen=True)
class DecoderConfig:
    """The CNN decoder (SPEC 4.3). ViT-B: 768 channels, 16 groups, kernel 3, 6 layers."""

    dim: int = 768
    groups: int = 16
    kernel: int = 3
    layers: int = 6
    mask_noise_std: float = 0.01  # the mask tokens' N(0, std^2) noise


class ChannelLayerNorm(nn.Module):
    """LayerNorm over the channels of (B, C, H, W), without affine parameters (eps 1e-5)."""

    def __init__(self, channels: int, eps: float = 1e-5):
        super().__init__()
        self.channels, self.eps = channels, eps

    def forward(self, x):
        return F.layer_norm(x.movedim(1, -1), (self.channels,), eps=self.eps).movedim(-1, 1)


class CNNDecoder(nn.Module):
    """(B', N, D) tokens in grid order -> (B', N, D) predictions.

    The tokens are laid on the (time, frequency) patch grid as (B', D, T, F); each layer is a
    grouped conv (with bias, 'same' padding), LayerNorm over channels, GELU, and a residual when
    the channel counts agree; a final Linear maps back to the encoder width. No positions."""

    def __init__(self, embed_dim: int, cfg: DecoderConfig = DecoderConfig()):
        super().__init__()
        self.cfg = cfg
        if cfg.kernel % 2 == 0:
            raise ValueError(f"decoder kernel {cfg.kernel}: only odd kernels keep the grid size")
        layers = []
        for i in range(cfg.layers):
            in_dim = embed_dim if i == 0 else cfg.dim
            if in_dim % cfg.groups or cfg.dim % cfg.groups:
                raise ValueError(f"decoder channels {in_dim}->{cfg.dim} not divisible by groups={cfg.groups}")
            conv = nn.Conv2d(in_dim, cfg.dim, cfg.kernel, padding=cfg.kernel // 2, groups=cfg.groups)
            # Sequential so the weights are named blocks.{i}.0.* as in official checkpoints.
            layers.append(nn.Sequential(conv, ChannelLayerNorm(cfg.dim), nn.GELU()))
        self.blocks = nn.ModuleList(layers)
        self.proj = nn.Linear(cfg.dim, embed_dim)

    def forward(self, tokens: torch.Tensor, grid: tuple[int, int], recompute: bool = False) -> torch.Tensor:
        """``recompute``: keep only each layer's input for the backward and run the layer again
        there, one layer at a time (exact: the layers draw no random numbers)."""
        token_major = use_kernels(tokens)
        if token_major:
            x, layer = tokens, self._token_major_layer
        else:
            b, n, d = tokens.shape
            x, layer = tokens.transpose(1, 2).reshape(b, d, *grid), self._layer
        for block in self.blocks:
            if recompute:
                x = torch.utils.checkpoint.checkpoint(layer, block, x, grid, use_reentrant=False)
            else:
                x = layer(block, x, grid)
        if not token_major:
            x = x.flatten(2).transpose(1, 2)  # (B', C, T, F) -> (B', N, C)
        return self.proj(x)

    @staticmethod
    def _layer(block: nn.Module, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """One layer on (B', C, T, F)."""
        y = block(x)
        return y + x if y.shape[1] == x.shape[1] else y

    @staticmethod
    def _token_major_layer(block: nn.Module, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """The same layer on (B', N, C) tokens with no transposes (kernels/decoder.py)."""
        from .kernels.decoder import decoder_layer

        conv, norm, _ = block
        return decoder_layer(x, grid, conv.weight, conv.bias, groups=conv.groups,
                             residual=conv.out_channels == x.shape[-1], eps=norm.eps)


def file_decoder_config(ckpt, base: DecoderConfig = DecoderConfig()) -> DecoderConfig:
    """:func:`decoder_config_of` the decoder of a :class:`sslam.checkpoint.Checkpoint`; a
    CheckpointError naming the file when its weights imply none."""
    from .checkpoint import CheckpointError

    try:
        return decoder_config_of(ckpt.decoder, base)
    except ValueError as exc:
        raise CheckpointError(f"{ckpt.path}: its decoder: {exc}") from None


def decoder_config_of(state: dict[str, torch.Tensor], base: DecoderConfig = DecoderConfig()) -> DecoderConfig:
    """The decoder architecture implied by its weights (names blocks.{i}.0.weight, proj.*);
    ValueError naming the weight whose shape implies none."""
    for key in ("blocks.0.0.weight", "proj.weight"):
        if not isinstance(state.get(key), torch.Tensor):
            raise ValueError(f"{key}: missing, and it gives the decoder's shape")
    layers = sum(k.startswith("blocks.") and k.endswith(".0.weight") for k in state)
    first, proj = state["blocks.0.0.weight"], state["proj.weight"]
    if proj.dim() != 2 or first.dim() != 4 or first.shape[-1] != first.shape[-2] or first.shape[-1] % 2 == 0:
        raise ValueError(f"blocks.0.0.weight {tuple(first.shape)} and proj.weight {tuple(proj.shape)}: not a "
                         "grouped conv with an odd square kernel and a linear projection")
    in_dim = proj.shape[0]
    if min(first.shape) < 1 or in_dim % first.shape[1]:
        raise ValueError(f"blocks.0.0.weight {tuple(first.shape)}: its {first.shape[1]} input channels per group "
                         f"do not divide the {in_dim} of proj.weight")
    return dataclasses.replace(
        base, dim=first.shape[0], groups=in_dim // first.shape[1], kernel=first.shape[-1], layers=layers
    )


def decoder_input(
    kept: torch.Tensor, keep: torch.Tensor, num_patches: int, noise_std: float, generator=None
) -> torch.Tensor:
    """Place the student's kept-token outputs (B', K, D) at their positions ``keep`` (B', K) of a
    (B', N, D) grid whose other (masked) positions hold fresh N(0, noise_std^2) mask tokens."""
    b, k, d = kept.shape
    grid = torch.randn(b, num_patches, d, device=kept.device, dtype=kept.dtype, generator=generator) * noise_std
    return grid.scatter(1, keep[..., None].expand(-1, -1, d), kept)


# ---- teacher ------------------------------------------------------------------------------


def ema_decay(step: int, start: float = 0.9998, end: float = 0.99999, anneal_steps: int = 100_000) -> float:
    """Linear anneal from ``start`` to ``end`` over ``anneal_steps`` updates, then ``end``."""
    if step >= anneal_steps or start == end:
        return end
    return end - (end - start) * (1 - step / anneal_steps)


class EMATeacher(nn.Module):
    """An fp32 copy of the student encoder updated as theta_t <- tau theta_t + (1 - tau) theta_s.

    Every trainable encoder parameter is averaged; the fixed position table (a buffer) is copied.
    The teacher always runs in eval mode without gradients."""

    def __init__(self, student: Encoder):
        super().__init__()
        self.encoder = copy.deepcopy(student).float().eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, student: Encoder, decay: float) -> None:
        mine, theirs = list(self.encoder.parameters()), list(student.parameters())
        if len(mine) != len(theirs):
            raise RuntimeError("teacher and student have different parameter lists")
        # The student's parameters are read as they are: under no_grad a detach is not needed,
        # and a detach or a same-dtype cast per parameter is ~150 more ops for the host to issue
        # every step. Only a student held in another dtype is cast.
        theirs = [p if p.dtype == q.dtype else p.to(q.dtype) for p, q in zip(theirs, mine)]
        torch._foreach_lerp_(mine, theirs, 1.0 - decay)
        for name, buf in student.named_buffers():
            self.encoder.get_buffer(name).copy_(buf)

    def train(self, mode: bool = True):  # the teacher never leaves eval mode
        return super().train(False)

    def forward(self, *args, **kwargs):
        with torch.no_grad():
            return self.encoder(*args, **kwargs)


# ---- targets and losses -------------------------------------------------------------------


def patch_layers(out: EncoderOutput) -> list[torch.Tensor]:
    """The teacher's FFN output of every block at the patches, CLS dropped: (B, N, D) each."""
    return [m[:, 1:] for m in out.layer_results]


@torch.no_grad()
def layer_targets(layer_results: list[torch.Tensor], top_k: int) -> torch.Tensor:
    """The data2vec target from the teacher's FFN outputs (each (B, N, D), CLS removed): instance
    norm per layer over tokens, mean of the last ``top_k`` layers, LayerNorm (no affine); fp32.

    The layers are normalised together, as one stacked fp32 copy normalised in place: a dozen
    ops whatever ``top_k`` (one layer at a time was seven ops per layer), and no gradient,
    as befits a target."""
    if not 1 <= top_k <= len(layer_results):
        raise ValueError(f"top_k={top_k} with {len(layer_results)} layers")
    y = torch.stack(layer_results[-top_k:]).float()  # (K, B, N, D), a new tensor
    var, mean = torch.var_mean(y, dim=2, keepdim=True, unbiased=False)
    mean_of_layers = y.sub_(mean).mul_(var.add_(1e-5).rsqrt_()).sum(0).div_(top_k)
    return F.layer_norm(mean_of_layers, mean_of_layers.shape[-1:], eps=1e-5)


def regression_elements(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Element-wise official loss (a - b)^2 / sqrt(D) in fp32; same shape as the inputs."""
    return (pred.float() - target.float()).pow(2) / math.sqrt(pred.shape[-1])


def masked_regression_sum(pred: torch.Tensor, target: torch.Tensor, masked: torch.Tensor, clones: int) -> torch.Tensor:
    """Sum over the masked positions of ||pred - target||^2 / sqrt(D).

    pred: (B * C, N, D) decoder output; target: (B, N, D), row r of pred uses target r // C;
    masked: (B * C, N) bool. The target is broadcast over clones, never copied."""
    if target.requires_grad:
        raise ValueError("the regression target must not require gradients: it is the teacher's")
    return _MaskedRegressionSum.apply(pred, target, masked, clones)


def _clone_differences(pred: torch.Tensor, target: torch.Tensor, clones: int) -> torch.Tensor:
    """(B * C, N, D) pred minus its clip's (B, N, D) target, as (B, C, N, D) fp32."""
    bc, n, d = pred.shape
    return pred.float().view(bc // clones, clones, n, d) - target.float()[:, None]


class _MaskedRegressionSum(torch.autograd.Function):
    """:func:`masked_regression_sum` keeping pred and target for the backward, not their fp32
    difference over every clone (autograd would keep that: twice pred's size in bf16, and
    the largest tensor of the loss). The backward recomputes it with the operations autograd
    would run, so the gradient is the same bit for bit."""

    @staticmethod
    def forward(ctx, pred, target, masked, clones):
        ctx.save_for_backward(pred, target, masked)
        ctx.clones = clones
        bc, n, d = pred.shape
        per_token = _clone_differences(pred, target, clones).pow(2).sum(-1).view(bc, n)
        # Selected, not multiplied by the mask: as the official pred[masked], what an unmasked
        # position holds (even inf or NaN) does not reach the loss or its gradient.
        return per_token.where(masked, 0.0).sum() / math.sqrt(d)

    @staticmethod
    def backward(ctx, grad):
        pred, target, masked = ctx.saved_tensors
        bc, n, d = pred.shape
        grad_pred = (grad / math.sqrt(d)) * (2 * _clone_differences(pred, target, ctx.clones))
        grad_pred = grad_pred.where(masked.view(bc // ctx.clones, ctx.clones, n, 1), 0.0)
        return grad_pred.view(bc, n, d).to(pred.dtype), None, None, None


def regression_sums_ref(
    pred: torch.Tensor, target: torch.Tensor, masked: torch.Tensor, clones: int, srl: torch.Tensor | None = None,
    *, sum_of=None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(frame sum, SRL sum or None): ``sum_of`` (:func:`masked_regression_sum` by default) of
    every row of pred against its clip's target, and of the last ``srl.shape[0] * clones`` rows
    (the mixtures) against the SRL target. ``sslam.kernels.regression_sums`` is the fused
    kernel of both."""
    sum_of = sum_of or masked_regression_sum
    frame = sum_of(pred, target, masked, clones)
    if srl is None:
        return frame, None
    mixtures = slice(pred.shape[0] - srl.shape[0] * clones, None)
    return frame, sum_of(pred[mixtures], srl, masked[mixtures], clones)


def masked_regression_sum_copied(pred: torch.Tensor, target: torch.Tensor, masked: torch.Tensor, clones: int) -> torch.Tensor:
    """The official computation of :func:`masked_regression_sum`: the target copied per clone
    (``repeat_interleave``), then both gathered at the masked positions. Same value; kept as the
    faithful baseline of the benchmarks."""
    target = target.repeat_interleave(clones, dim=0)
    return regression_elements(pred[masked], target[masked]).sum()


def cls_regression_sum(cls: torch.Tensor, target: torch.Tensor, clones: int) -> torch.Tensor:
    """Sum over rows of ||cls - target||^2 / sqrt(D); cls (B * C, D), target (B, D)."""
    bc, d = cls.shape
    diff = cls.float().view(bc // clones, clones, d) - target.float()[:, None]
    return diff.pow(2).sum() / math.sqrt(d)


def srl_target(clean: torch.Tensor, partial: torch.Tensor, windows: MixWindows, freq_patches: int, patch: int = 16) -> torch.Tensor:
    """The Source Retention target of SPEC 5.4.

    clean: (B, N, D) targets of the clean clips (the primary sources);
    partial: (B, K, D) targets of the clean clips computed from their mixed-in rows only (the
    teacher's second pass), NOT yet rolled. Row i of the result averages clip i's target with
    clip i-1's partial target on the mixed rows, and is clip i's target in the two windows."""
    b, n, d = clean.shape
    rows = n // freq_patches
    foreign = partial.roll(1, dims=0).view(b, -1, freq_patches, d)  # row i <- clip i - 1
    stitched = clean.view(b, rows, freq_patches, d).clone()
    consumed = 0
    for start, stop in mixed_row_ranges(windows, rows, patch):
        stitched[:, start:stop] = foreign[:, consumed : consumed + stop - start]
        consumed += stop - start
    if consumed != foreign.shape[1]:
        raise ValueError(f"partial target has {foreign.shape[1]} rows, the windows leave {consumed} mixed")
    return 0.5 * (clean + stitched.view(b, n, d))


def make_mixtures(x: torch.Tensor, windows: MixWindows, freq_patches: int) -> torch.Tensor:
    """SSLAM mixtures of spectrograms (B, 1, T, F) or p x p patches (B, N, p * p); the Triton kernel
    on CUDA (bit-identical)."""
    if use_kernels(x):
        from .kernels.mixture import mix_spectrograms as mix_kernel

        return mix_kernel(x, windows, freq_patches=freq_patches)
    return mix_spectrograms(x, windows) if x.dim() == 4 else mix_patches(x, windows, freq_patches)


# ---- the objective ------------------------------------------------------------------------


@dataclass(frozen=True)
class ObjectiveConfig:
    """Loss and target settings (SPEC 4.2, 4.4, 5.4-5.5). ``stage`` 1 = EAT, 2 = SSLAM."""

    stage: int = 1
    # None: the stage's, 16 in stage 1 and 8 in stage 2 (SPEC 3), fixed when the config is made
    # (dataclasses.replace(cfg, stage=2) keeps cfg's clones)
    clones: int | None = None
    top_k: int | None = None  # average_top_k_layers; None: every layer (12 of ViT-B, 24 of ViT-L)
    cls_loss: float = 1.0
    srl_weight: float = 2.0  # the x2 token-count rescaling of the SRL term
    mix_width: int = 240  # frames of each unmixed window
    decoder: DecoderConfig = field(default_factory=DecoderConfig)

    def __post_init__(self) -> None:
        # Caught here, not in the forward: stage 3 would run stage 2, a negative weight would
        # train away from the targets.
        # numbers.Integral / Real: numpy scalars count too; stored as Python numbers.
        if self.stage not in (1, 2) or isinstance(self.stage, bool):
            raise ValueError(f"ObjectiveConfig.stage={self.stage!r}: expected 1 (EAT) or 2 (SSLAM)")
        if self.clones is None:
            object.__setattr__(self, "clones", 16 if self.stage == 1 else 8)
        for name in ("stage", "clones", "top_k", "mix_width"):
            value = getattr(self, name)
            if name == "top_k" and value is None:  # fixed by the encoder's depth (Pretrainer)
                continue
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
                raise ValueError(f"ObjectiveConfig.{name}={value!r}: expected a positive int")
            object.__setattr__(self, name, int(value))
        for name in ("cls_loss", "srl_weight"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 <= value < math.inf:
                raise ValueError(f"ObjectiveConfig.{name}={value!r}: expected a finite number >= 0")
            object.__setattr__(self, name, float(value))


@dataclass
class Losses:
    """Loss terms of one forward, each already divided by ``sample_size`` (the number of masked
    student tokens), so ``total`` is what is back-propagated. Every field is a 0-d tensor on the
    model's device: reading one on the host waits for the GPU, so the trainer reads them all
    at once, after the backward is queued."""

    total: torch.Tensor
    frame: torch.Tensor
    cls: torch.Tensor
    srl: torch.Tensor | None
    sample_size: torch.Tensor

    def terms(self) -> dict[str, torch.Tensor]:
        """The logged terms, detached: loss, frame, cls (and srl in stage 2)."""
        out = {"loss": self.total, "frame": self.frame, "cls": self.cls}
        if self.srl is not None:
            out["srl"] = self.srl
        return {k: v.detach() for k, v in out.items()}


class Pretrainer(nn.Module):
    """Student encoder + CNN decoder + EMA teacher, with the stage-1 and stage-2 forwards. The
    objective's decoder defaults to ViT-B's (SPEC 4.3); ``sslam.train_config.preset`` gives each model
    size its own."""

    def __init__(self, encoder_cfg: EncoderConfig, objective: ObjectiveConfig = ObjectiveConfig(), student: Encoder | None = None):
        super().__init__()
        self.student = student if student is not None else Encoder(encoder_cfg)
        if objective.top_k is None:
            objective = dataclasses.replace(objective, top_k=self.student.cfg.depth)
        self.objective = objective
        if objective.top_k > self.student.cfg.depth:
            raise ValueError(f"top_k={objective.top_k} exceeds the encoder depth {self.student.cfg.depth}")
        self.decoder = CNNDecoder(self.student.cfg.embed_dim, objective.decoder)
        self.teacher = EMATeacher(self.student)
        # True: per-clone target copies as the official code makes them (benchmark baseline).
        self.copy_targets = False
        # True: the decoder keeps only each layer's input for the backward and runs the layer
        # again there, one at a time. Its activations are the largest block of training memory
        # (six layers over all N tokens of every clone); recomputing them costs a few percent
        # more FLOPs. Layer by layer, the backward never holds more than one layer's worth.
        self.checkpoint_decoder = False
        # True: the stage-2 teacher's two passes (every clip; the clean ones' partner tokens) run
        # as one packed pass (Encoder.forward_packed); compile_networks turns it off.
        self.pack_teacher_passes = True

    def _regressions(self, pred, target, masked, clones, srl=None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(frame sum, SRL sum of the mixtures' rows or None): :func:`regression_sums_ref`, or
        its fused kernel, or with ``copy_targets`` the official computation."""
        if self.copy_targets:
            return regression_sums_ref(pred, target, masked, clones, srl, sum_of=masked_regression_sum_copied)
        if use_kernels(pred):
            from .kernels.regression import regression_sums

            return regression_sums(pred, target, masked, clones, srl)
        return regression_sums_ref(pred, target, masked, clones, srl)

    @classmethod
    def from_checkpoint(cls, ckpt, objective: ObjectiveConfig) -> Pretrainer:
        """Student, decoder and teacher from a :class:`sslam.checkpoint.Checkpoint` (an official
        pretraining file or one of ours). The decoder's shape is read from its weights; without a
        teacher in the file the teacher starts as a copy of the student."""
        from .checkpoint import check_state, encoder_from_checkpoint

        if ckpt.config.num_classes:
            # A fine-tuned file: pretraining trains no head. Kept, it would get no gradient
            # (DDP stops on unused parameters) and ride along into every checkpoint.
            state = {k: v for k, v in ckpt.state.items() if k not in HEAD_NAMES}
            ckpt = dataclasses.replace(ckpt, config=ckpt.config.replace(num_classes=0), state=state)
        # Nor stochastic depth (SPEC 2.1), which a fine-tuned file's config keeps (0.1).
        ckpt = dataclasses.replace(ckpt, config=ckpt.config.replace(drop_path_rate=0.0))
        if ckpt.decoder:  # every key and shape, and finite values, before anything is built
            objective = dataclasses.replace(objective, decoder=file_decoder_config(ckpt, objective.decoder))
            with torch.device("meta"):
                decoder = check_state(CNNDecoder(ckpt.config.embed_dim, objective.decoder), ckpt.decoder, ckpt.path,
                                      ckpt.decoder_file_key)
        student = encoder_from_checkpoint(ckpt).train()
        model = cls(student.cfg, objective, student=student)
        if ckpt.decoder:
            model.decoder.load_state_dict(decoder, strict=True)
        if ckpt.teacher:  # named in the file as the student is (model['_ema'] holds the same names)
            model.teacher.encoder.load_state_dict(check_state(model.teacher.encoder, ckpt.teacher,
                                                              f"{ckpt.path} (its EMA teacher)", ckpt.teacher_file_key))
        return model

    def trainable_parameters(self):
        return [p for p in list(self.student.parameters()) + list(self.decoder.parameters()) if p.requires_grad]

    def compile_networks(self, **options) -> None:
        """``torch.compile`` the student, the decoder and the teacher in place (``options`` go to
        ``torch.compile``). The losses, targets and mixing stay eager. Each network is compiled
        for the step's fixed shapes: the teacher runs on two input shapes in stage 2 (all clips;
        the clean ones keeping the partner's patches), and as the student's forward is the same
        code, dynamo would otherwise compile the student for symbolic shapes (kernels not
        specialised to the step, and an inductor assertion on GPUs with torch 2.11)."""
        options = {"dynamic": False, **options}
        self.student.compile(**options)
        self.decoder.compile(**options)
        self.teacher.encoder.compile(**options)
        self.pack_teacher_passes = False  # the compiled forward, not forward_packed

    def update_teacher(self, decay: float) -> None:
        self.teacher.update(self.student, decay)

    def _grid(self, x: torch.Tensor) -> tuple[int, int]:
        """(time, frequency) patch grid of a spectrogram (B, 1, T, F) or p x p patches (B, N, p * p)."""
        cfg = self.student.cfg
        if x.dim() == 4:
            return x.shape[2] // cfg.patch_size, cfg.freq_patches
        return x.shape[1] // cfg.freq_patches, cfg.freq_patches

    def _student(self, spec, keep, clones, generator):
        """Masked student + decoder: (CLS outputs (B*C, D), predictions (B*C, N, D))."""
        grid = self._grid(spec)
        out = self.student(spec, keep=keep, clones=clones)
        num_patches = grid[0] * grid[1]
        dec_in = decoder_input(out.x[:, 1:], keep, num_patches, self.objective.decoder.mask_noise_std, generator)
        pred = self.decoder(dec_in, grid, recompute=self.checkpoint_decoder and torch.is_grad_enabled())
        return out.x[:, 0], pred

    def _teacher_layers(self, spec: torch.Tensor) -> list[torch.Tensor]:
        return patch_layers(self.teacher(spec, layer_results=True))

    def forward(
        self,
        spec: torch.Tensor,
        keep: torch.Tensor,
        *,
        windows: MixWindows | None = None,
        generator: torch.Generator | None = None,
        mixed: torch.Tensor | None = None,
    ) -> Losses:
        """One training forward.

        Args:
            spec: (B, 1, T, F) normalised clean spectrograms, or their (B, N, p * p) patches (p = the encoder's patch size).
            keep: (B * C, K) kept patch indices of each clone (clip-major rows); every row
                keeps the same number K of patches.
            windows: stage 2 only, the two unmixed windows of this step.
            generator: for the decoder's mask-token noise.
            mixed: stage 2 only, the mixtures of ``spec`` when they were already made (the
                fused feature kernel); otherwise they are made here from ``windows``.
        """
        obj = self.objective
        clones = obj.clones
        if keep.shape[0] != spec.shape[0] * clones:
            raise ValueError(f"keep has {keep.shape[0]} rows, expected batch {spec.shape[0]} x clones {clones}")
        if obj.stage == 1:
            return self._stage1(spec, keep, clones, generator)
        if windows is None:
            raise ValueError("stage 2 needs the mixing windows of the step")
        if spec.shape[0] < 2:
            # Each clip is mixed with its in-batch neighbour: alone, it would be mixed with itself.
            raise ValueError(f"stage 2 needs at least 2 clips per batch, got {spec.shape[0]}")
        return self._stage2(spec, keep, clones, windows, generator, mixed)

    def _masked(self, keep: torch.Tensor, num_patches: int) -> torch.Tensor:
        masked = torch.ones(keep.shape[0], num_patches, dtype=torch.bool, device=keep.device)
        return masked.scatter(1, keep, False)

    # The teacher's targets are made before the student's forward: its layer results and the
    # targets' temporaries are then freed before the student's activations fill the memory.

    def _stage1(self, spec, keep, clones, generator) -> Losses:
        target = layer_targets(self._teacher_layers(spec), self.objective.top_k)
        cls_target = target.mean(dim=1)  # EAT: mean of the top-K frame target
        cls, pred = self._student(spec, keep, clones, generator)
        masked = self._masked(keep, pred.shape[1])
        sample_size = masked.sum()  # a device tensor: int() here would wait for the GPU
        frame = self._regressions(pred, target, masked, clones)[0] / sample_size
        cls_term = cls_regression_sum(cls, cls_target, clones) * self.objective.cls_loss
        return Losses(frame + cls_term, frame, cls_term, None, sample_size)

    def _stage2(self, spec, keep, clones, windows: MixWindows, generator, mixed) -> Losses:
        obj = self.objective
        if mixed is None:
            mixed = make_mixtures(spec, windows, self.student.cfg.freq_patches)
        both = torch.cat([spec, mixed])  # clean then mixed
        keep2 = torch.cat([keep, keep])  # a mixture uses its clean clip's masks
        frame_target, cls_target, srl = self._stage2_targets(spec, both, windows)
        cls, pred = self._student(both, keep2, clones, generator)

        masked = self._masked(keep2, pred.shape[1])
        sample_size = masked.sum()
        frame, srl_sum = self._regressions(pred, frame_target, masked, clones, srl)
        frame = frame / sample_size
        srl_term = obj.srl_weight * srl_sum / sample_size
        cls_term = cls_regression_sum(cls, cls_target, clones) * obj.cls_loss
        return Losses(frame + srl_term + cls_term, frame, cls_term, srl_term, sample_size)

    def _stage2_targets(self, spec, both, windows: MixWindows):
        """(frame targets of the clean and mixed clips, their CLS targets, SRL targets of the
        mixtures): the teacher on every clip, and on the clean partner's tokens outside the
        windows."""
        obj = self.objective
        rows, freq = self._grid(spec)
        partner_keep = partner_keep_indices(windows, rows, freq, self.student.cfg.patch_size).to(
            spec.device, non_blocking=True)
        teacher = self.teacher.encoder
        with torch.no_grad():
            if self.pack_teacher_passes:
                tokens = teacher.embed_input(both)
                partner = gather_shared(tokens[: spec.shape[0]], partner_keep)  # of the clean clips
                full, part = teacher.forward_packed([tokens, partner], layer_results=True)
            else:  # compiled: one graph per pass
                full = teacher(both, layer_results=True)
                part = teacher(spec, keep=partner_keep, layer_results=True)
            layers = patch_layers(full)
        frame_target = layer_targets(layers, obj.top_k)
        cls_target = layer_targets(layers[-1:], 1).mean(dim=1)  # stage 2: last layer only
        partial = layer_targets(patch_layers(part), obj.top_k)
        srl = srl_target(frame_target[: spec.shape[0]], partial, windows, freq, self.student.cfg.patch_size)
        return frame_target, cls_target, srl


# ---- cost model ---------------------------------------------------------------------------


def encoder_forward_flops(cfg: EncoderConfig, tokens: int) -> float:
    """Matmul FLOPs of the transformer blocks on one sequence of ``tokens`` tokens."""
    d = cfg.embed_dim
    per_token = 2 * (4 * d * d + 2 * d * cfg.mlp_dim) + 4 * tokens * d  # projections + QK^T, PV
    return float(per_token * tokens * cfg.depth)


def decoder_forward_flops(embed_dim: int, dec: DecoderConfig, positions: int) -> float:
    per_position = 0
    for i in range(dec.layers):
        in_dim = embed_dim if i == 0 else dec.dim
        per_position += 2 * dec.dim * (in_dim // dec.groups) * dec.kernel**2
    per_position += 2 * dec.dim * embed_dim
    return float(per_position * positions)


def train_flops_per_clip(cfg: EncoderConfig, objective: ObjectiveConfig, frames: int, kept: int) -> float:
    """Model FLOPs per clip of one training step (student and decoder forward + backward = 3x
    forward, teacher forward): ViT-B gives 1.0823 TFLOP for EAT and 1.2283 TFLOP for SSLAM
    (within 0.2 % of the 1.083 and 1.230 that DESIGN.md quotes)."""
    patches = frames // cfg.patch_size * cfg.freq_patches
    student = 3 * (encoder_forward_flops(cfg, kept + 1) + decoder_forward_flops(cfg.embed_dim, objective.decoder, patches))
    teacher = encoder_forward_flops(cfg, patches + 1)
    if objective.stage == 1:
        return objective.clones * student + teacher
    rows = frames // cfg.patch_size
    unmixed_rows = 2 * (objective.mix_width // cfg.patch_size)
    partner = encoder_forward_flops(cfg, (rows - unmixed_rows) * cfg.freq_patches + 1)
    return 2 * objective.clones * student + 2 * teacher + partner
