"""Pretraining settings: typed sections filled from a preset and ``--section.key=value``
overrides (:class:`TrainConfig`), their checks, and what the model, masks and objective are
built from.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
from dataclasses import dataclass, field

from .data import MAX_WORKERS, MIN_SAMPLES
from .features import norm_stats
from .masking import MaskConfig
from .mixing import min_frames
from .model import BLOCK_CHECKPOINTING, VARIANTS
from .precision import TRAIN_PRECISIONS
from .pretrain import DecoderConfig, ObjectiveConfig


@dataclass
class ModelSection:
    variant: str = "base"  # tiny | small | base | large
    embed_dim: int = 0  # 0: the variant's
    depth: int = 0
    num_heads: int = 0
    decoder_dim: int = 768
    decoder_groups: int = 16
    decoder_kernel: int = 3
    decoder_layers: int = 6


@dataclass
class ObjectiveSection:
    stage: int = 1
    clones: int = 16
    top_k: int = 0  # 0: all layers
    mask_prob: float = 0.8
    mask_prob_adjust: float = 0.07
    mask_length: int = 5
    cls_loss: float = 1.0
    srl_weight: float = 2.0
    mix_width: int = 240


@dataclass
class DataSection:
    source: str = "synth"  # synth | a folder | a .tsv manifest
    root: str = ""  # overrides a manifest's root line
    batch_size: int = 12  # clips per process per micro-step
    target_length: int = 1024
    norm: str = "audioset"
    num_workers: int = 2
    min_samples: int = MIN_SAMPLES  # manifest entries with a smaller size column are skipped (SPEC 1.1)
    max_bad_files: int = 100  # unreadable files tolerated before the run stops
    synth_clips: int = 2000
    synth_seconds: float = 10.0


@dataclass
class OptimSection:
    lr: float = 5e-4
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.05
    warmup_steps: int = 53_333
    max_steps: int = 400_000
    min_lr: float = 0.0
    clip_norm: float = 4.0
    accum_steps: int = 1


@dataclass
class EMASection:
    start: float = 0.9998
    end: float = 0.99999
    anneal_steps: int = 100_000
    restart: bool = True  # stage 2 from a checkpoint re-anneals from `start` (the official run)


@dataclass
class RunSection:
    out: str = "runs/pretrain"
    init: str = ""  # checkpoint to start from (official EAT/SSLAM .pt, or ours)
    resume: bool = True  # continue from the newest checkpoint in `out` if there is one
    device: str = "auto"  # auto | cpu | cuda
    # auto (bf16 on CUDA, fp32 on CPU) | fp32 | bf16 | fp16 (autocast) | bf16-pure | fp16-pure
    # (half weights and activations, fp32 master weights)
    precision: str = "auto"
    compile: bool = False
    checkpoint_decoder: bool = False  # recompute the decoder layer by layer in the backward: less memory
    checkpoint_blocks: str = "off"  # off | selective (norms, GELU, sums redone: no extra matmul) | full (whole blocks)
    parallel: str = "ddp"  # ddp | fsdp (when launched with torchrun)
    seed: int = 1
    log_every: int = 10
    ckpt_every: int = 1000
    keep_last: int = 3
    tensorboard: bool = False
    progress: bool = True
    max_bad_steps: int = 5  # consecutive non-finite losses that stop the run
    threads: int = 0  # torch CPU threads; 0 = torch's default


@dataclass
class TrainConfig:
    """A pretraining run's settings. The defaults are ``preset("base", stage=1)``; take another
    stage's recipe (its lr, schedule and clones) from :func:`preset`, not by setting
    ``objective.stage`` alone."""

    model: ModelSection = field(default_factory=ModelSection)
    objective: ObjectiveSection = field(default_factory=ObjectiveSection)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    ema: EMASection = field(default_factory=EMASection)
    run: RunSection = field(default_factory=RunSection)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> TrainConfig:
        cfg = cls()
        for section, entries in values.items():
            for key, value in entries.items():
                set_option(cfg, f"{section}.{key}", value)
        return cfg


def preset(name: str = "base", stage: int = 1) -> TrainConfig:
    """``tiny`` (CPU, minutes), ``base`` (ViT-B: EAT's stage-1 or SSLAM's stage-2 recipe), or
    ``large`` (ViT-L of the official config)."""
    if stage not in (1, 2):
        raise ValueError(f"stage={stage}: 1 (EAT) or 2 (SSLAM)")
    cfg = TrainConfig()
    cfg.objective.stage = stage
    cfg.objective.clones = 16 if stage == 1 else 8
    if stage == 2:  # SPEC 5.6
        cfg.optim.lr, cfg.optim.warmup_steps, cfg.optim.max_steps = 5e-5, 25_000, 200_000
    if name == "base":
        return cfg
    if name == "large":  # SPEC 2.3
        cfg.model = ModelSection(variant="large", decoder_dim=1024, decoder_groups=16, decoder_kernel=5, decoder_layers=3)
        cfg.objective.mask_prob, cfg.objective.mask_prob_adjust = 0.75, 0.1
        cfg.optim.lr = 4e-4 if stage == 1 else cfg.optim.lr
        cfg.ema.anneal_steps = 150_000
        return cfg
    if name == "tiny":  # small enough to learn something on 2 CPU cores in minutes
        cfg.model = ModelSection(variant="tiny", embed_dim=96, depth=4, num_heads=3, decoder_dim=96,
                                 decoder_groups=8, decoder_kernel=3, decoder_layers=3)
        cfg.objective.clones = 4 if stage == 1 else 2
        cfg.objective.mix_width = 48  # 3 of 16 patch rows (official: 15 of 64)
        cfg.data = DataSection(batch_size=8, target_length=256, num_workers=1, synth_clips=512, synth_seconds=2.6)
        # Stage 2 at a tenth of stage 1's peak lr, as in the official recipes (5e-4 -> 5e-5).
        cfg.optim = OptimSection(lr=1e-3 if stage == 1 else 1e-4, warmup_steps=20, max_steps=300, clip_norm=4.0)
        cfg.ema = EMASection(start=0.99, end=0.999, anneal_steps=300)
        cfg.run.log_every, cfg.run.ckpt_every, cfg.run.device = 10, 100, "cpu"
        return cfg
    raise ValueError(f"unknown preset {name!r}: tiny, base or large")


_KINDS = {"int": "an integer", "float": "a number", "bool": "true or false", "str": "text"}


def parse_option(value, annotation: str, key: str):
    """A ``--key=value`` string converted to the field type named by ``annotation``; a value
    that is not a string (from a dict or a JSON file) must already have that type. ``T | None``
    also takes ``none``."""
    if annotation.endswith(" | None"):
        if value is None or (isinstance(value, str) and value.lower() == "none"):
            return None
        annotation = annotation.removesuffix(" | None")
    if not isinstance(value, str):
        # Checked here, or a batch size of 2.5 or an lr of True would only fail deep in a run.
        ok = {"bool": isinstance(value, bool),
              "int": isinstance(value, int) and not isinstance(value, bool),
              "float": isinstance(value, (int, float)) and not isinstance(value, bool)}.get(annotation, False)
        if annotation == "int" and isinstance(value, float) and value.is_integer():
            return int(value)
        if not ok:
            raise ValueError(f"--{key}={value!r}: expected {_KINDS.get(annotation, annotation)}, got {type(value).__name__}")
        return float(value) if annotation == "float" else value
    try:
        if annotation == "bool":
            if value.lower() in ("1", "true", "yes", "on"):
                return True
            if value.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if annotation == "int":
            try:
                return int(value)
            except ValueError:  # also accept integral floats such as 2e5
                number = float(value)
                if not number.is_integer():
                    raise
                return int(number)
        if annotation == "float":
            return float(value)
        return value
    except ValueError:
        raise ValueError(f"--{key}={value!r}: expected {_KINDS.get(annotation, annotation)}") from None


def split_override(item: str, form: str = "--section.key=value") -> tuple[str, str]:
    """A command-line override ``--key=value`` -> (key, value); anything else is refused,
    showing ``form``."""
    if not item.startswith("--") or "=" not in item:
        raise ValueError(f"{item!r}: options are written {form}")
    key, value = item[2:].split("=", 1)
    return key, value


def set_option(cfg: TrainConfig, key: str, value) -> None:
    """Set ``section.field`` on ``cfg`` (value converted from a string by the field's type)."""
    if "." not in key:
        raise ValueError(f"--{key}: options are --section.key=value; sections: {[f.name for f in dataclasses.fields(cfg)]}")
    section_name, name = key.split(".", 1)
    sections = {f.name for f in dataclasses.fields(cfg)}
    if section_name not in sections:
        raise ValueError(f"--{key}: unknown section {section_name!r}; choose one of {sorted(sections)}")
    section = getattr(cfg, section_name)
    fields = {f.name: f for f in dataclasses.fields(section)}
    if name not in fields:
        raise ValueError(f"--{key}: unknown key {name!r} in [{section_name}]; known: {sorted(fields)}")
    setattr(section, name, parse_option(value, str(fields[name].type), key))


def format_config(cfg: TrainConfig) -> str:
    """The settings, section by section; a size left at 0 says what it stands for."""
    if cfg.run.init:  # the file's sizes, known once it is read
        meaning = "run.init's"
        stands_for = {("model", k): meaning for k in ("embed_dim", "depth", "num_heads")}
        stands_for["objective", "top_k"] = f"every layer of {meaning} encoder"
    else:
        enc = encoder_config(cfg)
        stands_for = {("model", k): f"{getattr(enc, k)}, the {cfg.model.variant} variant's"
                      for k in ("embed_dim", "depth", "num_heads")}
        stands_for["objective", "top_k"] = f"all {enc.depth} layers"
    lines = []
    for section, values in cfg.to_dict().items():
        lines.append(f"[{section}]")
        for k, v in values.items():
            note = stands_for.get((section, k)) if v == 0 else None
            lines.append(f"  {k} = {v!r}" + (f"  # {note}" if note else ""))
    return "\n".join(lines)


def validate(cfg: TrainConfig) -> None:
    """Refuse impossible settings up front, naming the key: otherwise they fail deep inside a
    run (a cryptic shape error at the first step), or worse, train silently wrong (an EMA decay
    above 1, a negative learning rate at the end of the schedule)."""
    m, ob, o, d, e, r = cfg.model, cfg.objective, cfg.optim, cfg.data, cfg.ema, cfg.run
    numbers = {f"{name}.{f.name}": getattr(section, f.name) for name, section in (("optim", o), ("objective", ob), ("ema", e))
               for f in dataclasses.fields(section) if str(f.type) == "float"}
    # clip_norm may be inf (or 0): no clipping
    not_finite = [k for k, v in numbers.items() if math.isnan(v) or (math.isinf(v) and k != "optim.clip_norm")]
    checks = [
        (not not_finite, f"{', '.join(not_finite)}: must be finite (nan or inf given)"),
        (m.variant in VARIANTS, f"model.variant={m.variant!r}: one of {sorted(VARIANTS)}"),
        (min(m.embed_dim, m.depth, m.num_heads) >= 0, "model.embed_dim, depth and num_heads must be >= 0 (0: the variant's)"),
        (min(m.decoder_dim, m.decoder_groups, m.decoder_kernel, m.decoder_layers) >= 1,
         "model.decoder_dim, decoder_groups, decoder_kernel and decoder_layers must be >= 1"),
        (ob.stage in (1, 2), "objective.stage must be 1 or 2"),
        (1 <= ob.clones <= 1024, "objective.clones must be in [1, 1024] (the recipes use 16 and 8)"),
        (ob.top_k >= 0, "objective.top_k must be >= 0 (0: all layers)"),
        (0 < ob.mask_prob < 1, f"objective.mask_prob={ob.mask_prob} must lie in (0, 1)"),
        (0 <= ob.mask_prob_adjust <= 1, f"objective.mask_prob_adjust={ob.mask_prob_adjust} must lie in [0, 1]"),
        (ob.mask_length >= 1, "objective.mask_length must be >= 1"),
        (ob.cls_loss >= 0 and ob.srl_weight >= 0, "objective.cls_loss and objective.srl_weight must be >= 0"),
        (d.batch_size >= 1, f"data.batch_size={d.batch_size} must be >= 1"),
        (o.accum_steps >= 1, f"optim.accum_steps={o.accum_steps} must be >= 1"),
        (ob.stage == 1 or d.batch_size >= 2, "stage 2 mixes in-batch pairs: data.batch_size >= 2"),
        (d.target_length >= 16 and d.target_length % 16 == 0, "data.target_length must be a positive multiple of 16"),
        (0 <= d.num_workers <= MAX_WORKERS, f"data.num_workers must be in [0, {MAX_WORKERS}]"),
        (d.max_bad_files >= 0, "data.max_bad_files must be >= 0"),
        (o.max_steps >= 1 and o.warmup_steps >= 0, "optim.max_steps >= 1 and warmup_steps >= 0"),
        (o.lr >= 0 and 0 <= o.min_lr <= o.lr, f"optim.lr={o.lr} and optim.min_lr={o.min_lr}: need 0 <= min_lr <= lr"),
        (0 <= o.beta1 < 1, f"optim.beta1={o.beta1} must lie in [0, 1)"),
        (0 <= o.beta2 < 1, f"optim.beta2={o.beta2} must lie in [0, 1)"),
        (o.eps >= 0 and o.weight_decay >= 0, "optim.eps and optim.weight_decay must be >= 0"),
        (0 <= e.start <= 1, f"ema.start={e.start} must lie in [0, 1]"),
        (0 <= e.end <= 1, f"ema.end={e.end} must lie in [0, 1]"),
        (e.anneal_steps >= 0, "ema.anneal_steps must be >= 0"),
        (r.device in ("auto", "cpu", "cuda"), f"run.device={r.device!r}: auto, cpu or cuda"),
        (r.precision in TRAIN_PRECISIONS, f"run.precision={r.precision!r}: one of {', '.join(TRAIN_PRECISIONS)}"),
        (r.parallel in ("ddp", "fsdp"), "run.parallel: ddp or fsdp"),
        (r.checkpoint_blocks in BLOCK_CHECKPOINTING, f"run.checkpoint_blocks={r.checkpoint_blocks!r}: one of {BLOCK_CHECKPOINTING}"),
        (r.ckpt_every >= 1 and r.log_every >= 1 and r.keep_last >= 1, "run.ckpt_every, log_every, keep_last >= 1"),
        (r.max_bad_steps >= 1, "run.max_bad_steps must be >= 1"),
        (o.clip_norm >= 0, f"optim.clip_norm={o.clip_norm} must be >= 0 (0 or inf: no clipping)"),
        (d.synth_clips >= 1, "data.synth_clips must be >= 1"),
        (math.isfinite(d.synth_seconds) and d.synth_seconds >= 0.1,
         f"data.synth_seconds={d.synth_seconds} must be finite and at least 0.1 (s, the shortest synthetic scene)"),
        (bool(d.source.strip()), "data.source is empty: 'synth', a folder of audio files or a .tsv manifest"),
        (not r.tensorboard or importlib.util.find_spec("tensorboard") is not None,
         "run.tensorboard=true needs the tensorboard package (pip install tensorboard)"),
        (0 <= r.seed < 2**63, "run.seed must lie in [0, 2**63)"),
        (0 <= r.threads <= MAX_WORKERS, f"run.threads must be in [0, {MAX_WORKERS}] (0: torch's default)"),
        (bool(r.out.strip()), "run.out must name a folder (checkpoints would land in the current one)"),
    ]
    for ok, message in checks:
        if not ok:
            raise ValueError(message)
    _check_architecture(cfg)
    try:
        norm_stats(d.norm)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"data.norm={d.norm!r}: {exc}") from None
    try:  # the masks must keep and hide at least one patch of the grid
        mask_config(cfg)
    except ValueError as exc:
        raise ValueError(f"objective.mask_prob={ob.mask_prob}, mask_length={ob.mask_length} with "
                         f"data.target_length={d.target_length}: {exc}") from None
    if ob.stage == 2:  # the two unmixed windows cover whole patch rows and fit in the clip
        if ob.mix_width < 16 or ob.mix_width % 16:
            raise ValueError(f"objective.mix_width={ob.mix_width} must be a positive multiple of 16 frames (one patch row)")
        need = -(-min_frames(ob.mix_width) // 16) * 16  # in whole patch rows
        if d.target_length < need:
            raise ValueError(f"objective.mix_width={ob.mix_width} does not fit data.target_length={d.target_length}: "
                             f"two unmixed windows of {ob.mix_width} frames need data.target_length >= {need}")


ENCODER_SIZES = ("embed_dim", "depth", "num_heads")
DECODER_SIZES = ("decoder_dim", "decoder_groups", "decoder_kernel", "decoder_layers")


def _check_architecture(cfg: TrainConfig) -> None:
    """Sizes that do not fit together, named (they used to fail when the model was built, with
    messages that named no option). With ``run.init`` the encoder is the file's: its sizes are
    checked when it is read."""
    m, ob = cfg.model, cfg.objective
    if m.decoder_kernel % 2 == 0:
        raise ValueError(f"model.decoder_kernel={m.decoder_kernel} must be odd (an even kernel changes the grid)")
    if m.decoder_dim % m.decoder_groups:
        raise ValueError(f"model.decoder_dim={m.decoder_dim} is not divisible by model.decoder_groups={m.decoder_groups}")
    if cfg.run.init:
        return
    try:
        enc = encoder_config(cfg)
    except ValueError as exc:
        raise ValueError(f"model.embed_dim / model.num_heads: {exc}") from None
    if enc.embed_dim % m.decoder_groups:
        raise ValueError(f"model.embed_dim={enc.embed_dim} is not divisible by model.decoder_groups={m.decoder_groups} "
                         "(the decoder's first grouped conv reads the encoder's channels)")
    if ob.top_k > enc.depth:
        raise ValueError(f"objective.top_k={ob.top_k} exceeds the encoder depth {enc.depth} (model.depth)")
    if cfg.data.target_length > enc.max_frames:
        raise ValueError(f"data.target_length={cfg.data.target_length}: at most {enc.max_frames} frames, the "
                         f"position table of the {cfg.model.variant} encoder")


def given_sizes(model: ModelSection, names=ENCODER_SIZES) -> dict:
    """The sizes ``names`` of ``model`` that were set apart from its variant's preset: with
    ``run.init`` those are the user's, the others the preset's."""
    try:
        defaults = preset(model.variant).model
    except ValueError:  # a variant without a preset (small): its sizes are 0 = the variant's
        defaults = ModelSection(variant=model.variant)
    return {name: getattr(model, name) for name in names
            if getattr(model, name) and getattr(model, name) != getattr(defaults, name)}


def init_architecture(ckpt, given: dict) -> tuple:
    """``run.init``'s checkpoint with the encoder sizes ``given`` (see :func:`given_sizes`), and
    a note naming those it does not use. The file's architecture wins where it states a size or
    its weights' shapes fix one; the number of heads, which shapes cannot show, is taken from
    ``given`` when the file does not state it."""
    if (ckpt.config.patch_size, ckpt.config.mel_bins) != (16, 128):
        # The features (and their fused kernel), the mask grid and the mixing windows are all
        # laid out in 16 x 16 patches of a 128-bin log-mel, as SSLAM and EAT train.
        raise ValueError(f"run.init={ckpt.path}: patch_size={ckpt.config.patch_size}, mel_bins="
                         f"{ckpt.config.mel_bins}; pretraining needs 16 x 16 patches of 128 mel bins")
    fixed = {name: value for name, value in given.items() if name != "num_heads" or name in ckpt.declared}
    unused = [f"model.{name}={value} (the file: {getattr(ckpt.config, name)})"
              for name, value in fixed.items() if value != getattr(ckpt.config, name)]
    if "num_heads" in given and "num_heads" not in fixed:
        config = ckpt.config.replace(num_heads=given["num_heads"])  # checks it divides embed_dim
        ckpt = dataclasses.replace(ckpt, config=config, declared=ckpt.declared | {"num_heads"})
    note = f"the architecture comes from {ckpt.path}; not used: {', '.join(unused)}" if unused else ""
    return ckpt, note


def mask_config(cfg: TrainConfig) -> MaskConfig:
    """The student's masks: the objective's settings on the (target_length / 16, 8) patch grid
    (pretraining takes 16 x 16 patches of 128 mel bins, see :func:`init_architecture`)."""
    ob = cfg.objective
    return MaskConfig(grid=(cfg.data.target_length // 16, 8), mask_prob=ob.mask_prob,
                      mask_prob_adjust=ob.mask_prob_adjust, mask_length=ob.mask_length)


def encoder_config(cfg: TrainConfig):
    m = cfg.model
    changes = {k: getattr(m, k) for k in ("embed_dim", "depth", "num_heads") if getattr(m, k)}
    return VARIANTS[m.variant].replace(**changes)


def objective_config(cfg: TrainConfig, depth: int) -> ObjectiveConfig:
    o, m = cfg.objective, cfg.model
    return ObjectiveConfig(
        stage=o.stage, clones=o.clones, top_k=o.top_k or depth, cls_loss=o.cls_loss, srl_weight=o.srl_weight,
        mix_width=o.mix_width,
        decoder=DecoderConfig(dim=m.decoder_dim, groups=m.decoder_groups, kernel=m.decoder_kernel, layers=m.decoder_layers),
    )
