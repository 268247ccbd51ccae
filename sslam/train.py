"""The trainer: EAT stage 1 and SSLAM stage 2 on one CPU, one GPU, or many through torchrun.

    sslam pretrain --preset tiny --stage 1 --out runs/s1
    sslam pretrain --preset tiny --stage 2 --init runs/s1 --out runs/s2 --optim.lr=1e-4
    torchrun --nproc_per_node 8 -m sslam.train --preset base --stage 2 --data train.tsv \\
        --init EAT-base_epoch10_pt.pt --out runs/sslam

Configuration is a set of typed dataclasses (:class:`sslam.train_config.TrainConfig`) filled
from a preset and ``--section.key=value`` overrides; unknown keys are errors; the resolved
config is printed and stored in every checkpoint. A run whose output folder already holds checkpoints resumes from
the newest one exactly (model, teacher, optimizer, scheduler, scaler, step, data position).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import random
import sys
import time
import warnings
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist

from . import native
from .checkpoint import CheckpointError, check_state, read_checkpoint, run_checkpoint
from .data import (
    GlobalBatchSampler,
    build_dataset,
    collate,
    data_identity,
    samples_for_frames,
    silent_stand_in,
)
from .features import preprocess
from .files import (
    atomic_write,
    check_output_folder,
    checkpoint_name,
    checkpoints_in,
    read_json_object,
    remove_temporaries,
)
from .hub import is_hub_name
from .kernels.switch import use_kernels
from .masking import clone_masks, kept_indices
from .mixing import sample_windows
from .model import EncoderConfig
from .precision import HALF, MATMUL_MODULES, half_weights, resolved_precision
from .pretrain import (
    DecoderConfig,
    ObjectiveConfig,
    Pretrainer,
    ema_decay,
    file_decoder_config,
    train_flops_per_clip,
)
from .runs import (
    Dist,
    StopTraining,
    changed_settings,
    check_record,
    check_same_start,
    finish_distributed,
    init_distributed,
    load_newest,
    loading_parts,
    metrics_line,
    open_metrics,
    rng_state,
    save_checkpoint,
    set_rng_state,
    stop_distributed,
)
from .schedule import cosine, param_groups
from .train_config import (
    DECODER_SIZES,
    ENCODER_SIZES,
    OptimSection,
    RunSection,
    TrainConfig,
    encoder_config,
    format_config,
    given_sizes,
    init_architecture,
    mask_config,
    objective_config,
    preset,
    set_option,
    split_override,
    validate,
)

PEAK_TFLOPS = {"H100": 790.0, "H200": 790.0, "A100": 312.0}
_MASK_DRAWERS = {True: "the C++ extension", False: "the Python reference"}
MIN_LOSS_SCALE = 1e-6  # the official fp16 runs stop below this loss scale (SPEC 5.6)


def mix_seed(*parts) -> int:
    """A 63-bit seed from integers (SplitMix64-style hashing), for per-step, per-slot streams."""
    x = 0x9E3779B97F4A7C15
    for p in parts:
        x = (x ^ (int(p) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        x ^= x >> 31
    return x & 0x7FFFFFFFFFFFFFFF


# ---- optimisation -------------------------------------------------------------------------


def named_optimizer_state(state: dict, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """``state``, an optimizer state dict, keyed by the parameters' names in ``model`` as FSDP's
    full state dicts are. One process or DDP saves ``Optimizer.state_dict()``, which numbers
    the parameters in the optimizer's order; a run resumed under FSDP needs their names."""
    if all(isinstance(key, str) for group in state["param_groups"] for key in group["params"]):
        return state
    names = {p: name for name, p in model.named_parameters()}
    order = [names[p] for group in optimizer.param_groups for p in group["params"]]
    return {"state": {order[i]: value for i, value in state["state"].items()},
            "param_groups": [{**group, "params": [order[i] for i in group["params"]]} for group in state["param_groups"]]}


def lr_factor(step: int, o: OptimSection) -> float:
    """:func:`sslam.schedule.cosine` as a fraction of ``lr`` (what LambdaLR multiplies)."""
    return cosine(step, o.max_steps, o.warmup_steps, 1.0, o.min_lr / o.lr if o.lr > 0 else 0.0)


# ---- resuming -----------------------------------------------------------------------------


# Settings a resumed run may change: where and how it runs and reports, not what it computes.
# optim.max_steps may change to extend or shorten a run (the rest of the schedule stretches);
# optim.accum_steps only together with the number of processes (the global batch stays);
# run.init may be left out (the weights come from the checkpoint).
RESUME_MAY_CHANGE = frozenset({
    "run.out", "run.resume", "run.init", "run.device", "run.compile", "run.checkpoint_decoder", "run.checkpoint_blocks",
    "run.parallel", "run.log_every",
    "run.ckpt_every", "run.keep_last", "run.tensorboard", "run.progress", "run.max_bad_steps", "run.threads",
    "data.num_workers", "data.max_bad_files", "data.root", "optim.max_steps", "optim.accum_steps",
})


def _flat(config: dict) -> dict:
    """{section: {key: value}} -> {"section.key": value}."""
    return {f"{section}.{key}": value for section, values in config.items() for key, value in values.items()}


def _unused_settings(cfg: TrainConfig, init: str) -> set[str]:
    """Settings that change nothing for ``cfg`` resuming a run started from ``init`` (its
    recorded run.init), so a resume may take other values: min_samples filters a manifest's
    size column only (runs saved before its default became fairseq's 10000 resume as they were),
    the synth_* sizes make the synthetic data, stage 1 neither mixes nor has the SRL term, and
    only a run from a checkpoint restarts the EMA; a run from a checkpoint takes the model's
    sizes from it (see :func:`init_architecture`)."""
    unused = set()
    if not cfg.data.source.lower().endswith(".tsv"):
        unused.add("data.min_samples")
    if cfg.data.source != "synth":
        unused |= {"data.synth_clips", "data.synth_seconds"}
    if cfg.objective.stage == 1:
        unused |= {"objective.srl_weight", "objective.mix_width"}
    if not init:
        unused.add("ema.restart")
    else:  # the file's sizes, as the record gives them; a resume builds the saved architecture
        unused |= {f"model.{name}" for name in ENCODER_SIZES + DECODER_SIZES}
    return unused


def _same_source(before: str, now: str) -> bool:
    """Whether two data.source values name the same data: 'synth', or one file or folder
    however written (data/x.tsv is ./data/x.tsv and its absolute path)."""
    return before == now or "synth" not in (before, now) and Path(before).resolve() == Path(now).resolve()


def _same_init(before: str, now: str) -> bool:
    """Whether two run.init values name the same start: none, or one file however written
    (runs/s1/ is runs/./s1; a run folder is its newest checkpoint, as :func:`resolve_init`
    reads it; runs record the file they started from)."""
    return before == now or bool(before and now) and resolve_init(before) == resolve_init(now)


def resume_conflicts(saved: dict, cfg: TrainConfig, world_size: int, precision: str | None = None) -> list[str]:
    """The settings of ``cfg`` that differ from the checkpoint ``saved`` in a way a resumed run
    cannot follow exactly, as ``section.key: <saved> in the checkpoint, <now> now``. Settings
    written otherwise that compute the same are compared as they take effect: top_k 0 (every
    layer) and, with ``precision`` (this run's, resolved), run.precision=auto."""
    before = saved.get("config") or {}
    old, now = _flat(before), _flat(cfg.to_dict())
    objective, encoder = saved.get("objective") or {}, saved.get("encoder_config") or {}
    if "top_k" in objective and "depth" in encoder:
        old["objective.top_k"], now["objective.top_k"] = objective["top_k"], cfg.objective.top_k or encoder["depth"]
    resolved = saved.get("precision") and precision  # else (older checkpoints) as written
    if resolved:
        del old["run.precision"], now["run.precision"]
    old_init = before.get("run", {}).get("init", "")
    # The data position and the per-slot random streams count global batches of
    # batch_size x processes x accum_steps clips; only how they are split may change.
    old_world = int(saved.get("world_size", world_size))
    old_accum = before.get("optim", {}).get("accum_steps", cfg.optim.accum_steps)
    old_batch = before.get("data", {}).get("batch_size", cfg.data.batch_size)
    global_batch = old_batch * old_world * old_accum
    resplit = old_batch != cfg.data.batch_size and global_batch == cfg.data.batch_size * world_size * cfg.optim.accum_steps
    named_below = {"data.source"} | ({"data.batch_size"} if resplit else set())
    conflicts = changed_settings(old, now, RESUME_MAY_CHANGE | _unused_settings(cfg, old_init) | named_below)
    # Files of a checkpoint that records its data's clips are checked on them (Trainer.data_loader):
    # the data may move. Older ones name it by its path.
    old_source = before.get("data", {}).get("source", cfg.data.source)
    recorded = isinstance(saved.get("data_identity"), dict) and "synth" not in (old_source, cfg.data.source)
    if not recorded and not _same_source(old_source, cfg.data.source):
        conflicts.append(f"data.source: {old_source!r} in the checkpoint, {cfg.data.source!r} now")
    if resolved and saved["precision"] != precision:
        conflicts.append(f"run.precision: {saved['precision']} in the checkpoint (run.precision="
                         f"{before.get('run', {}).get('precision')!r}), {precision} now ({cfg.run.precision!r}); "
                         f"--run.precision={saved['precision']} resumes it")
    if cfg.run.init and not _same_init(old_init, cfg.run.init):
        names = resolve_init(cfg.run.init)
        a_folder = not is_hub_name(names) and Path(names) != Path(cfg.run.init).resolve()
        newest = f"its newest checkpoint, {names!r}; " if a_folder else ""
        conflicts.append(f"run.init: {old_init!r} in the checkpoint, {cfg.run.init!r} now ({newest}a resumed "
                         "run needs no --run.init: its weights come from its own checkpoint)")
    if resplit:
        split = old_batch * world_size  # clips per accumulation step over this many processes
        conflicts.append(
            f"data.batch_size: {old_batch} in the checkpoint, {cfg.data.batch_size} now: the global batch of "
            f"{global_batch} clips is the same, but each micro-batch draws its own masks and mixing windows, so "
            f"only how whole micro-batches of {old_batch} clips are spread over processes and accumulation steps "
            f"may change" + (f" (--data.batch_size={old_batch} --optim.accum_steps={global_batch // split} resumes it)"
                             if global_batch % split == 0 else ""))
    elif old_world * old_accum != world_size * cfg.optim.accum_steps:
        conflicts.append(f"optim.accum_steps x processes: {old_accum} x {old_world} in the checkpoint, "
                         f"{cfg.optim.accum_steps} x {world_size} now (the global batch must stay the same)")
    return conflicts


def resolve_init(path: str) -> str:
    """The file ``run.init`` names, as an absolute path (a run resumed from another working
    folder names it otherwise): the newest checkpoint when it names a run folder (``--init
    runs/s1``); an exported encoder folder (model.safetensors) is itself the checkpoint. A Hub
    name is kept as it is."""
    if is_hub_name(path):
        return path
    resolved = Path(path).resolve()
    return str(run_checkpoint(resolved) or resolved)


# ---- the trainer --------------------------------------------------------------------------


# The teacher's entry points besides forward that read its own weights outside its blocks (the
# patch embedding, CLS, pre-norm): FSDP gathers them for these calls too. On a GPU the stage-2
# teacher embeds the fused kernel's patches and packs its two passes.
TEACHER_ENTRY_POINTS = ("patchify_embed", "embed_patches", "forward_tokens", "forward_packed")


def shard_pretrainer(model: Pretrainer, param_dtype: torch.dtype | None = None):
    """FSDP2 over ``model`` in the current process group: every student and teacher block, the
    teacher, then the rest; with ``param_dtype`` (the pure modes) the fp32 shards are gathered
    as half weights for the forward and backward, and the gradients reduced in fp32."""
    from torch.distributed.fsdp import (
        MixedPrecisionPolicy,
        fully_shard,
        register_fsdp_forward_method,
    )

    policy = {}
    if param_dtype is not None:
        policy["mp_policy"] = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    # A block returns its FFN output beside its output (the teacher's targets read it): a view
    # of its last linear's 2-D result, which FSDP2 warns about in case it is changed in place.
    # Nothing here does that. (The filter is process-wide and names the class: FSDP2 calls
    # every wrapped Block "FSDPBlock".)
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module \(FSDPBlock\) returned a view tensor")
    for block in list(model.student.blocks) + list(model.teacher.encoder.blocks):
        fully_shard(block, **policy)
    fully_shard(model.teacher.encoder, **policy)
    for method in TEACHER_ENTRY_POINTS:
        register_fsdp_forward_method(model.teacher.encoder, method)
    return fully_shard(model, **policy)


def _start_process(device: str) -> tuple[Dist, torch.device]:
    """This process's place in a torchrun launch (or alone) and its device: ``device`` (auto:
    CUDA where there is a GPU, else the CPU); under torchrun each process takes its own GPU."""
    device_type = device if device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if device_type == "cuda" and not torch.cuda.is_available():
        raise ValueError("run.device=cuda: no CUDA device is available here")
    dist = init_distributed(device_type)
    if device_type != "cuda":
        return dist, torch.device(device_type)
    torch.cuda.set_device(dist.local_rank)
    return dist, torch.device("cuda", dist.local_rank)


class Trainer:
    """Builds everything from a :class:`TrainConfig` and runs the loop (:meth:`fit`)."""

    def __init__(self, cfg: TrainConfig, log=print):
        validate(cfg)
        self.cfg = cfg
        self.out = Path(cfg.run.out)
        check_output_folder(self.out)
        self.dist, self.device = _start_process(cfg.run.device)
        if cfg.run.threads:
            torch.set_num_threads(cfg.run.threads)
        self.log = log if self.dist.main else (lambda *a, **k: None)
        self.precision = precision = resolved_precision(cfg.run.precision, self.device.type)
        half, pure = HALF.get(precision.removesuffix("-pure")), precision.endswith("-pure")
        self.amp_dtype = None if pure else half  # autocast's
        self.half_dtype = half if pure else None  # the networks' (sslam.precision)

        torch.manual_seed(cfg.run.seed)  # the same initial weights on every rank
        random.seed(cfg.run.seed)  # unused here, but saved with the checkpoints: from the seed too
        saved = self._checkpoint_to_resume()
        check_same_start(self.dist.world_size, None if saved is None else int(saved["step"]), self.device, self.out)
        self.model = self._build_model(saved)
        self.mask_cfg = mask_config(cfg)
        self.step = 0
        self.data_start = (0, 0)
        identity = saved.get("data_identity") if saved is not None else None  # checked by data_loader
        self.data_identity = identity if isinstance(identity, dict) else None  # (None: an older checkpoint)
        self.bad_files: list[tuple[str, str]] = []
        self.bad_steps = 0
        self.skipped_steps = 0
        if saved is not None:
            self._load_weights(saved)
        # Wrap before building the optimizer: FSDP replaces the parameters by sharded ones.
        self.train_module = self._wrap(self.model)
        self.optimizer, self.scheduler, self.scaler = self._build_optimizer()
        if saved is not None:
            self._load_training_state(saved)
            if self._too_many_bad_files():
                raise ValueError(f"{self.resume_from}: the run met {len(self.bad_files)} unreadable files, more "
                                 f"than data.max_bad_files={cfg.data.max_bad_files}: resume with a larger one")
            self.log(f"resumed from {self.resume_from} at step {self.step}")
        self.flops_per_clip = train_flops_per_clip(self.model.student.cfg, self.model.objective,
                                                   cfg.data.target_length, self.mask_cfg.num_kept)

    def _checkpoint_to_resume(self) -> dict | None:
        """The newest checkpoint of ``run.out``, checked against this run's settings, or None
        for a fresh start (whose folder holds no other run's record). Sets ``resume_from``, and
        ``run.init`` to the file the run started from."""
        cfg, existing = self.cfg, checkpoints_in(self.out)
        if self.dist.main:  # what a killed run was writing
            remove_temporaries(self.out)
        self.resume_from = existing[-1] if existing else None
        if not existing:
            # The record names the file the run starts from: a run folder's newest checkpoint
            # now, which a resume can then tell from the folder's later ones.
            if cfg.run.init:
                cfg.run.init = resolve_init(cfg.run.init)
            self._check_no_other_record()
            return None
        if not cfg.run.resume:
            # A fresh run there would overwrite some of them and keep_last would prune the rest
            # by name, leaving two runs mixed (and a later resume picking the wrong one).
            raise ValueError(f"{self.out} holds checkpoints of an earlier run (newest {existing[-1].name}) and "
                             "run.resume=false: choose a new run.out, or remove them")
        saved = load_newest(existing)
        if saved.get("format") != "sslam-train":
            raise CheckpointError(f"{self.resume_from}: not an sslam training checkpoint")
        check_record(saved, self.resume_from)
        conflicts = resume_conflicts(saved, cfg, self.dist.world_size, self.precision)
        if conflicts:
            raise ValueError(f"{self.resume_from}: cannot resume with changed settings: " + "; ".join(conflicts)
                             + ". Run with the checkpoint's settings, or start a new run.out (--run.init can "
                             "start it from this checkpoint).")
        if int(saved["step"]) > cfg.optim.max_steps:
            raise ValueError(f"{self.resume_from}: the run is at step {saved['step']}, past optim.max_steps="
                             f"{cfg.optim.max_steps}: give a larger one to train on")
        # The EMA schedule depends on whether the run started from a checkpoint (see
        # ema_decay), and the record names the file it started from: a resume keeps it
        # (an --init given now names the same start, resume_conflicts checked).
        cfg.run.init = (saved.get("config") or {}).get("run", {}).get("init", "")
        return saved

    def _check_no_other_record(self) -> None:
        """A fresh start writes config.json and cuts metrics.jsonl to nothing: in a folder that
        holds another run's record without a checkpoint (or an exported model's config.json),
        that is refused. The same run started again (stopped before its first checkpoint), or
        one whose earlier attempt logged no step (stopped at its start), goes on."""
        path = self.out / "config.json"
        if not path.is_file():
            return
        before = read_json_object(path)
        if before is None or set(before) != set(self.cfg.to_dict()):
            raise ValueError(f"{self.out} holds config.json of something else than a pretraining run: choose a "
                             "new run.out")
        # As for a resume, less the global batch's split (the processes of that attempt are
        # not recorded); but a start without run.init is from random weights, another run.
        now = self.cfg
        conflicts = changed_settings(_flat(before), _flat(now.to_dict()), RESUME_MAY_CHANGE | _unused_settings(now, now.run.init),
                                     "config.json")
        old_init = before.get("run", {}).get("init", "")
        if not _same_init(old_init, now.run.init):
            conflicts.append(f"run.init: {old_init!r} in config.json, {now.run.init!r} now")
        metrics = self.out / "metrics.jsonl"
        if conflicts and metrics.is_file() and metrics.stat().st_size:
            raise ValueError(f"{self.out} holds the record of another run and no checkpoint: config.json with other "
                             f"settings ({'; '.join(conflicts)}); starting here would overwrite it and cut its "
                             "metrics.jsonl: choose a new run.out, or remove them")

    # -- building --
    def _build_model(self, saved: dict | None) -> Pretrainer:
        """The model of a resumed run (its saved architecture), or one initialised from
        ``run.init``, or a fresh one."""
        cfg = self.cfg  # the encoder sizes of cfg.model count only for a fresh model
        if saved is not None:
            source = self.resume_from
            try:
                enc_cfg = EncoderConfig.from_dict(saved["encoder_config"])
                decoder = DecoderConfig(**saved["objective"]["decoder"])
                objective = ObjectiveConfig(**{**saved["objective"], "decoder": decoder})
            except (KeyError, TypeError, ValueError) as exc:
                raise CheckpointError(f"{source}: damaged training checkpoint: its architecture ({exc})") from None
            with torch.device("meta"):  # keys, shapes and values checked before any memory is taken
                shape = Pretrainer(enc_cfg, objective)
            for part, module in (("model", shape.student), ("decoder", shape.decoder), ("teacher", shape.teacher.encoder)):
                check_state(module, saved[part], f"{source} ({part})")
            model = Pretrainer(enc_cfg, objective)
        elif cfg.run.init:
            model = self._model_from_init()
        else:
            if cfg.objective.stage == 2:
                self.log("note: stage 2 from random weights; SSLAM continues a stage-1 (EAT) model, given "
                         "with --init (SPEC 5.6)")
            enc_cfg = encoder_config(cfg)
            model = Pretrainer(enc_cfg, objective_config(cfg, enc_cfg.depth))
        if cfg.run.init:  # started from a file, resumed or not: the record names the sizes that train
            enc, dec = model.student.cfg, model.objective.decoder
            cfg.model = dataclasses.replace(cfg.model, embed_dim=enc.embed_dim, depth=enc.depth, num_heads=enc.num_heads,
                                            decoder_dim=dec.dim, decoder_groups=dec.groups, decoder_kernel=dec.kernel,
                                            decoder_layers=dec.layers)
        model.checkpoint_decoder = cfg.run.checkpoint_decoder
        model.student.set_block_checkpointing(cfg.run.checkpoint_blocks)
        return model.to(self.device).train()

    def _model_from_init(self) -> Pretrainer:
        """A model started from the file ``run.init`` (resolved by :meth:`_checkpoint_to_resume`):
        its architecture, weights, and decoder and teacher where it has them."""
        cfg = self.cfg
        given = given_sizes(cfg.model)
        with warnings.catch_warnings():
            if "num_heads" in given:  # the file's lack of it needs no guess
                warnings.filterwarnings("ignore", message=".*does not record num_heads")
            ckpt, note = init_architecture(read_checkpoint(cfg.run.init), given)
        if note:
            self.log(note)
        if cfg.objective.top_k > ckpt.config.depth:
            raise ValueError(f"objective.top_k={cfg.objective.top_k} exceeds the depth {ckpt.config.depth} of "
                             f"run.init's encoder ({ckpt.path})")
        if cfg.data.target_length > ckpt.config.max_frames:
            raise ValueError(f"data.target_length={cfg.data.target_length}: at most {ckpt.config.max_frames} "
                             f"frames, the position table of run.init's encoder ({ckpt.path})")
        if ckpt.decoder:  # the file's decoder is trained on, whatever the settings say
            file_decoder = file_decoder_config(ckpt)
            unused = [f"model.{name}={value} (the file: {getattr(file_decoder, name.removeprefix('decoder_'))})"
                      for name, value in given_sizes(cfg.model, DECODER_SIZES).items()
                      if value != getattr(file_decoder, name.removeprefix("decoder_"))]
            if unused:
                self.log(f"the decoder comes from {ckpt.path}; not used: {', '.join(unused)}")
        model = Pretrainer.from_checkpoint(ckpt, objective_config(cfg, ckpt.config.depth))
        self.log(f"initialised student{', decoder' if ckpt.decoder else ''}{', teacher' if ckpt.teacher else ''} "
                 f"from {ckpt.path} ({ckpt.format})")
        return model

    def _build_optimizer(self):
        """AdamW over the student and decoder (fused on CUDA), its lr schedule, and the loss
        scaler (enabled for fp16)."""
        cfg = self.cfg
        optimizer = torch.optim.AdamW(
            param_groups(torch.nn.ModuleList([self.model.student, self.model.decoder]), cfg.optim.weight_decay),
            lr=cfg.optim.lr, betas=(cfg.optim.beta1, cfg.optim.beta2), eps=cfg.optim.eps, fused=self._fused_adamw(),
        )
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg.optim))
        # fp16: fairseq's first loss scale, 2**7 (torch's default, 2**16, overflows for the first
        # steps of a run until it has halved its way down, and each overflow is a skipped step).
        scaler = torch.amp.GradScaler(self.device.type, init_scale=2.0**7, enabled=self.precision.startswith("fp16"))
        return optimizer, scheduler, scaler

    def _fused_adamw(self) -> bool | None:
        """AdamW's ``fused``: the fused kernel on CUDA, elsewhere torch's default (foreach)."""
        return True if self.device.type == "cuda" else None

    @property
    def sharded(self) -> bool:
        return self.dist.world_size > 1 and self.cfg.run.parallel == "fsdp"

    def _wrap(self, model: Pretrainer):
        if self.dist.world_size == 1:
            module = model
        elif self.cfg.run.parallel == "fsdp":
            module = shard_pretrainer(model, self.half_dtype)
        else:
            from torch.nn.parallel import DistributedDataParallel

            module = DistributedDataParallel(
                model, device_ids=[self.device.index] if self.device.type == "cuda" else None, broadcast_buffers=False
            )
        if self.cfg.run.compile:
            model.compile_networks()
        return module

    # -- data --
    def data_loader(self):
        from torch.utils.data import DataLoader

        d = self.cfg.data
        dataset = build_dataset(d.source, root=d.root or None, target_length=d.target_length,
                                synth_clips=d.synth_clips, synth_seconds=d.synth_seconds,
                                seed=self.cfg.run.seed, min_samples=d.min_samples, max_bad_files=d.max_bad_files)
        # The data position counts into this list of clips: a resume on another one (the same
        # data.source words from another folder) would go on over other clips.
        found = data_identity(dataset)
        if self.data_identity is not None and self.data_identity != found:
            before = self.data_identity.get("clips")
            what = (f"{found['clips']} clips, not the {before} of the run's data" if before != found["clips"]
                    else "files of other names than the run's data")
            raise ValueError(f"{self.resume_from}: cannot resume on other data: data.source {d.source!r} holds {what}")
        self.data_identity = found
        skipped = getattr(dataset, "skipped", 0)
        self.data_size = len(dataset)
        self.log(f"data: {len(dataset)} clips from {d.source}" + (
            f" ({skipped} manifest entries under data.min_samples={d.min_samples} samples skipped)" if skipped else ""))
        self.sampler = GlobalBatchSampler(len(dataset), d.batch_size, self.dist.world_size, self.dist.rank,
                                          self.cfg.optim.accum_steps, self.cfg.run.seed, start=self.data_start)
        # A generator of its own: without one, each iteration draws the workers' base seed from
        # the global stream, which a resume has restored, and leaves it one draw ahead.
        return DataLoader(dataset, batch_sampler=self.sampler, num_workers=d.num_workers, collate_fn=collate,
                          pin_memory=self.device.type == "cuda", persistent_workers=d.num_workers > 0,
                          generator=torch.Generator().manual_seed(self.cfg.run.seed))

    # -- one step --
    def model_inputs(self, batch, windows):
        """(clean, mixed) model inputs of a micro-batch on the training device. With the Triton
        kernels (CUDA) the fused feature kernel makes normalised patches, and the stage-2
        mixtures in the same pass; otherwise the reference makes spectrograms and ``mixed`` is
        None (the objective mixes them)."""
        d = self.cfg.data
        waves = batch.waveforms.to(self.device, non_blocking=True)
        lengths = batch.lengths  # stay on the CPU: both check them there without waiting for the GPU
        if use_kernels(waves):
            from .kernels.fbank_patch import fbank_patch

            out = fbank_patch(waves, lengths, target_length=d.target_length, norm=d.norm, mix=windows)
            b = waves.shape[0]
            return (out[:b], out[b:]) if windows is not None else (out, None)
        return preprocess(waves, 16000, d.target_length, d.norm, lengths=lengths, check_finite=False), None

    def micro_step_inputs(self, batch, slot: int):
        """Inputs, kept indices, mixing windows and noise generator for micro-batch ``slot`` of
        this step; every random draw comes from (seed, step, slot), so splitting a global batch
        over processes or accumulation steps does not change it."""
        seed = self.cfg.run.seed
        windows = None
        if self.model.objective.stage == 2:
            g = torch.Generator().manual_seed(mix_seed(seed, self.step, slot, 2))
            windows = sample_windows(self.cfg.data.target_length, self.model.objective.mix_width, generator=g)
        clean, mixed = self.model_inputs(batch, windows)
        masks = clone_masks(clean.shape[0], self.model.objective.clones, self.mask_cfg, mix_seed(seed, self.step, slot, 1))
        keep, _ = kept_indices(masks)
        noise = torch.Generator(device=self.device).manual_seed(mix_seed(seed, self.step, slot, 3))
        return clean, mixed, keep.to(self.device, non_blocking=True), windows, noise

    def autocast(self):
        """The forward's autocast region (none in fp32 and the pure modes)."""
        if self.amp_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def half_weights(self):
        """The half weights of an update's forwards and backwards (sslam.precision): in the pure
        modes every weight; under autocast in one process, the matmuls' weights, which autocast
        would cast at every use (~190 ops and backward nodes per ViT-B stage-2 step), cast once
        with the same values. Under DDP autocast keeps casting at each use: those casts' backward
        hands each gradient to its parameter as the backward goes, so the all-reduce overlaps
        it (the backward of one cast for all weights runs last). FSDP makes the half weights
        itself as it gathers the shards (its mixed-precision policy, see _wrap)."""
        if self.sharded:
            return nullcontext()
        if self.half_dtype is not None:
            return half_weights([self.model], self.half_dtype)
        if self.amp_dtype is not None and self.dist.world_size == 1:
            return half_weights([self.model], self.amp_dtype, only=MATMUL_MODULES)
        return nullcontext()

    def train_step(self, micro_batches) -> dict | None:
        """Forward/backward over the accumulation micro-batches, clip, step, EMA. Returns the
        logged values, or None when the step was skipped (see :meth:`_skip_step`; nothing is
        updated, the teacher neither): the loss or the gradients are not finite (in fp16, the
        scaler's overflow).

        The host reads the loss terms and the gradient norm together, after every backward and
        the clipping are queued: each read of a GPU value waits for the GPU to finish all queued
        work, after which it idles until new work arrives."""
        cfg = self.cfg
        accum = len(micro_batches)
        logged = []
        # The pure modes' half weights: cast once for all the micro-batches of the update.
        with self.half_weights():
            for k, batch in enumerate(micro_batches):
                slot = k * self.dist.world_size + self.dist.rank
                clean, mixed, keep, windows, noise = self.micro_step_inputs(batch, slot)
                with self._gradient_sync(last=k == accum - 1):
                    with self.autocast():
                        losses = self.train_module(clean, keep, windows=windows, generator=noise, mixed=mixed)
                    # Also when the loss is not finite: every process must join the gradient
                    # all-reduce, and the step is then skipped below.
                    self.scaler.scale(losses.total).backward()
                logged.append(losses.terms())
        params = self.model.trainable_parameters()
        if accum > 1:
            # The micro-batches' mean, taken on the fp32 gradients, as fairseq divides after its
            # backward: 1 / accum inside an fp16 backward lost the smallest gradients' bits, so
            # a split of the batch over processes and over micro-batches trained apart.
            torch._foreach_mul_([p.grad for p in params if p.grad is not None], 1.0 / accum)
        self.scaler.unscale_(self.optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.optim.clip_norm if cfg.optim.clip_norm > 0 else float("inf"))
        names = list(logged[0])
        rows = torch.stack([torch.stack([terms[n].float() for n in names]) for terms in logged])
        rows, failures, exhausted = self._across_processes(
            rows, sum(len(batch.failures) for batch in micro_batches), sum(batch.exhausted for batch in micro_batches))
        self._count_bad_files(micro_batches, failures)
        if exhausted:  # a clip found no readable file: the batch holds silence, not a step to keep
            raise StopTraining(self._too_many_bad_files() or f"every one of the {self.data_size} audio files of the "
                               f"data is unreadable; first ones: {[p for p, _ in self.bad_files[:5]]}")
        grad_norm = float(grad_norm)
        finite_loss = all(math.isfinite(row[0]) for row in rows)
        if not finite_loss or not math.isfinite(grad_norm):
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.update()  # closes the unscale_ above (an fp16 scaler lowers its scale)
            # An fp16 overflow is the scaler finding its scale, not a fault of the run: as in
            # fairseq it makes no update (no EMA step either), and it does not count towards
            # run.max_bad_steps. Unlike fairseq's, it is still a step, as every skipped step
            # here: the data, masks and schedule move past it.
            self._skip_step(overflow=finite_loss and self.scaler.is_enabled())
            return None
        totals = {name: sum(row[i] / len(rows) for row in rows) for i, name in enumerate(names)}
        lr = self.scheduler.get_last_lr()[0]  # this update's: the step below sets the next one's
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.step += 1
        decay = self.ema_decay()
        self.model.update_teacher(decay)
        totals.update(grad_norm=grad_norm, ema_decay=decay, lr=lr)
        return totals

    def _gradient_sync(self, last: bool):
        """Gradients are reduced across the processes after the last micro-batch's backward
        only; the earlier ones accumulate locally (DDP's ``no_sync``; FSDP2 keeps them
        unsharded, at the memory of one full gradient, instead of reduce-scattering each)."""
        module = self.train_module
        if hasattr(module, "set_requires_gradient_sync"):
            module.set_requires_gradient_sync(last)
        elif not last and hasattr(module, "no_sync"):
            return module.no_sync()
        return nullcontext()

    def _across_processes(self, rows: torch.Tensor, failures: int,
                          exhausted: int) -> tuple[list[list[float]], int, int]:
        """The loss terms of every micro-batch of the global batch (accum x processes, terms),
        in its slot order (micro-step k of process r is slot k * processes + r), the number of
        unreadable files all processes met, and of their micro-batches that are silent
        stand-ins. So every process logs the global batch's loss, summed in one order however
        the batch is split, skips the same steps and stops at the same one, for one small
        all-gather before the host read that follows anyway."""
        world = self.dist.world_size
        if world == 1:
            return rows.tolist(), failures, exhausted
        local = torch.cat([rows.flatten(), rows.new_tensor([float(failures), float(exhausted)])])
        gathered = [torch.empty_like(local) for _ in range(world)]
        dist.all_gather(gathered, local)  # a NaN of any process reaches every one
        every = torch.stack(gathered).tolist()  # one read of the device
        width = rows.shape[1]
        slots = [every[r][k * width : (k + 1) * width] for k in range(rows.shape[0]) for r in range(world)]
        return slots, round(sum(e[-2] for e in every)), round(sum(e[-1] for e in every))

    def ema_decay(self) -> float:
        """The teacher's decay after ``self.step`` updates. A run started from a checkpoint
        re-anneals from ``ema.start`` (the official stage 2) unless ``ema.restart`` is false, in
        which case it continues at ``ema.end``."""
        e = self.cfg.ema
        step = e.anneal_steps if (self.cfg.run.init and not e.restart) else self.step
        return ema_decay(step, e.start, e.end, e.anneal_steps)

    # -- checkpoints --
    def state(self) -> dict:
        cfg = self.cfg
        epoch, step_in_epoch = self.sampler.position(self.step - self._steps_at_start) if hasattr(self, "sampler") else self.data_start
        return {
            "format": "sslam-train",
            "version": 1,
            "config": cfg.to_dict(),
            "encoder_config": self.model.student.cfg.to_dict(),
            "objective": dataclasses.asdict(self.model.objective),
            "preprocessing": {"sample_rate": 16000, "target_length": cfg.data.target_length, "norm": cfg.data.norm},
            "model": _cpu_state(self.model.student),
            "decoder": _cpu_state(self.model.decoder),
            "teacher": _cpu_state(self.model.teacher.encoder),
            "optimizer": self._optimizer_state(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "step": self.step,
            "world_size": self.dist.world_size,
            "precision": self.precision,  # run.precision as resolved (auto: by the device)
            "data_position": [epoch, step_in_epoch],
            "data_identity": self.data_identity,
            "rng": rng_state(),
            "bad_files": self.bad_files,
            "skipped_steps": self.skipped_steps,
            "bad_steps": self.bad_steps,  # the run of non-finite steps so far (run.max_bad_steps)
            "native_masks": native.available(),
        }

    def _optimizer_state(self) -> dict:
        if not self.sharded:
            return self.optimizer.state_dict()
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_optimizer_state_dict,
        )

        return get_optimizer_state_dict(self.model, self.optimizer,
                                        options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def save(self) -> Path | None:
        state = self.state()  # every rank takes part (FSDP gathers)
        if not self.dist.main:
            return None
        return save_checkpoint(self.out, self.step, state, self.cfg.run.keep_last)

    def _load_weights(self, state: dict) -> None:
        self.model.student.load_state_dict(state["model"])
        self.model.decoder.load_state_dict(state["decoder"])
        self.model.teacher.encoder.load_state_dict(state["teacher"])

    def _load_training_state(self, state: dict) -> None:
        with loading_parts(self.resume_from, "its optimizer, schedule, loss scale or random streams"):
            self._restore_training_state(state)

    def _restore_training_state(self, state: dict) -> None:
        if self.sharded:
            from torch.distributed.checkpoint.state_dict import (
                StateDictOptions,
                set_optimizer_state_dict,
            )

            set_optimizer_state_dict(self.model, self.optimizer, named_optimizer_state(state["optimizer"], self.model, self.optimizer),
                                     options=StateDictOptions(full_state_dict=True))
        else:
            self.optimizer.load_state_dict(state["optimizer"])
        for group in self.optimizer.param_groups:  # the saved groups hold the saving machine's
            group["fused"] = self._fused_adamw()
        self.scheduler.load_state_dict(state["scheduler"])
        # The saved optimizer holds the lr the saved schedule gave this step; optim.max_steps
        # may have changed since, and the next update must take this schedule's.
        step = self.scheduler.last_epoch
        for group, base, rule in zip(self.optimizer.param_groups, self.scheduler.base_lrs, self.scheduler.lr_lambdas):
            group["lr"] = base * rule(step)
        self.scaler.load_state_dict(state["scaler"])
        self.step = int(state["step"])
        self.data_start = tuple(state["data_position"])
        self.bad_files = [tuple(f) for f in state.get("bad_files", [])]
        self.skipped_steps = int(state.get("skipped_steps", 0))
        self.bad_steps = int(state.get("bad_steps", 0))
        set_rng_state(state["rng"])
        saved_native = state.get("native_masks")
        if saved_native is not None and saved_native != native.available():
            # Both draw the same distribution, from different random streams.
            self.log(f"note: the masks were drawn by {_MASK_DRAWERS[saved_native]} before and by "
                     f"{_MASK_DRAWERS[native.available()]} now (SSLAM_NATIVE, or the build): from here "
                     "on they differ from an uninterrupted run's")

    # -- the loop --
    def _log_start(self) -> int:
        """Log the settings and what they make of a step; returns the global batch (clips)."""
        cfg = self.cfg
        self.log(format_config(cfg))
        eff = cfg.data.batch_size * self.dist.world_size * cfg.optim.accum_steps
        self.log(f"effective batch: {eff} clips per step ({cfg.data.batch_size} per micro-step x "
                 f"{self.dist.world_size} processes x {cfg.optim.accum_steps} accumulation steps); "
                 f"{self.model.objective.clones} clones; stage {self.model.objective.stage}; "
                 f"precision {self.precision}; device {self.device}; "
                 f"random streams seeded by (seed {cfg.run.seed}, step, rank slot)")
        n_params = sum(p.numel() for p in self.model.trainable_parameters())
        self.log(f"trainable parameters: {n_params:,}")
        return eff

    def fit(self) -> dict:
        cfg = self.cfg
        eff = self._log_start()
        # First: a resume refused for other data leaves the record as it was, a start no empty folder.
        loader = self.data_loader()
        self.out.mkdir(parents=True, exist_ok=True)
        if self.dist.main:
            text = json.dumps(cfg.to_dict(), indent=2) + "\n"
            atomic_write(self.out / "config.json", lambda tmp: Path(tmp).write_text(text))
        self._steps_at_start = self.step
        # (also a fresh start: a run stopped before its first checkpoint left lines)
        metrics_file = open_metrics(self.out, self.step) if self.dist.main else None
        writer = self._tensorboard()
        from tqdm import tqdm

        bar = tqdm(total=cfg.optim.max_steps, initial=self.step, disable=not (cfg.run.progress and self.dist.main),
                   unit="step", file=sys.stderr, dynamic_ncols=True)
        last: dict = {}
        window_start, window_steps = time.perf_counter(), 0
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        batches = iter(loader)
        samples = samples_for_frames(cfg.data.target_length)
        too_many_bad = None
        try:
            while self.step < cfg.optim.max_steps:
                micro = [next(batches) for _ in range(cfg.optim.accum_steps)]
                # A clip that found no readable file: the other processes are about to enter this
                # step's collectives, so silence takes its place and train_step stops them all.
                micro = [batch if batch.waveforms is not None else silent_stand_in(batch, samples) for batch in micro]
                values = self.train_step(micro)  # None: skipped (see _skip_step)
                if values is not None:
                    self.bad_steps = 0
                    window_steps += 1
                    if self.step % cfg.run.log_every == 0 or self.step == cfg.optim.max_steps:
                        last = self._log_step(values, time.perf_counter() - window_start, window_steps, eff,
                                              metrics_file, writer)
                        bar.set_postfix(loss=f"{values['loss']:.4f}")
                        window_start, window_steps = time.perf_counter(), 0
                bar.update(1)
                # The step is whole (readable files took the unreadable ones' places): a run that
                # stops for them keeps it, and a resume with a larger limit goes on from there.
                too_many_bad = self.step < cfg.optim.max_steps and self._too_many_bad_files()
                # A skipped step saves too: otherwise a bad batch on a checkpoint step (or the
                # last) would leave the steps since the previous checkpoint unsaved.
                if too_many_bad or self.step % cfg.run.ckpt_every == 0 or self.step == cfg.optim.max_steps:
                    self.save()
                if too_many_bad:
                    break
            if self.dist.world_size > 1:
                # Every rank waits for the others' last collectives and for the main rank's last
                # checkpoint before any tears its process group down (or stops).
                dist.barrier()
            if too_many_bad:
                raise StopTraining(f"{too_many_bad}. Stopped after step {self.step}, saved as "
                                   f"{self.out / checkpoint_name(self.step)}: resume with a larger data.max_bad_files")
        finally:
            bar.close()
            if metrics_file:
                metrics_file.close()
            if writer:
                writer.close()
        return last

    def _skip_step(self, overflow: bool = False) -> None:
        """Count a step that made no update and move the data, masks and schedule past it. A
        non-finite loss or gradient stops the run after ``run.max_bad_steps`` in a row; fp16
        gradient overflows stop it once the loss scale falls below the official minimum."""
        self.skipped_steps += 1
        if overflow:
            scale = self.scaler.get_scale()
            self.log(f"step {self.step + 1}: fp16 gradient overflow, step skipped (loss scale now {scale:g})")
            if scale < MIN_LOSS_SCALE:
                raise StopTraining(f"the fp16 loss scale fell below {MIN_LOSS_SCALE:g} at step {self.step + 1}; "
                                   f"stopping. The last good checkpoint is {self._last_checkpoint()}")
        else:
            self.bad_steps += 1
            self.log(f"step {self.step + 1}: non-finite loss or gradients, step skipped ({self.bad_steps} in a row)")
            if self.bad_steps >= self.cfg.run.max_bad_steps:
                raise StopTraining(
                    f"{self.bad_steps} consecutive non-finite losses or gradients at step {self.step + 1}; "
                    f"stopping. The last good checkpoint is {self._last_checkpoint()}"
                )
        self.step += 1
        with warnings.catch_warnings():
            # The schedule moves past the step on purpose; the warning that it moved before any
            # optimizer step would only alarm.
            warnings.filterwarnings("ignore", "Detected call of `lr_scheduler.step")
            self.scheduler.step()

    def _last_checkpoint(self) -> str:
        saved = checkpoints_in(self.out)
        return str(saved[-1]) if saved else "none"

    def _count_bad_files(self, micro, failures: int) -> None:
        """Record the step's unreadable files (the run stops past ``data.max_bad_files``, see
        :meth:`_too_many_bad_files`). ``failures`` counts those of every process: when there are
        any, the processes share their lists, so all of them hold the same one and stop at the
        same step."""
        found = [failure for batch in micro for failure in batch.failures]
        if failures and self.dist.world_size > 1:
            gathered = [None] * self.dist.world_size
            dist.all_gather_object(gathered, found)
            found = [failure for part in gathered for failure in part]
        # Distinct files: one corrupt file met again every epoch is still one unreadable file.
        known = {path for path, _ in self.bad_files}
        for path, reason in found:
            if path not in known:
                known.add(path)
                self.bad_files.append((path, reason))
                self.log(f"skipped unreadable file {reason}")

    def _too_many_bad_files(self) -> str | None:
        """Why the run must stop for its unreadable files, or None."""
        if len(self.bad_files) <= self.cfg.data.max_bad_files:
            return None
        return (f"{len(self.bad_files)} unreadable files exceed data.max_bad_files={self.cfg.data.max_bad_files}; "
                f"first ones: {[p for p, _ in self.bad_files[:5]]}")

    def _log_step(self, values, seconds, steps, eff, metrics_file, writer) -> dict:
        step_time = seconds / max(1, steps)
        clips_per_s = eff / step_time
        record = {"step": self.step, **values, "step_time": step_time, "clips_per_s": clips_per_s,
                  "bad_files": len(self.bad_files), "skipped_steps": self.skipped_steps}
        parts = [f"step {self.step}/{self.cfg.optim.max_steps}", f"loss {values['loss']:.4f}",
                 f"frame {values['frame']:.4f}", f"cls {values['cls']:.4f}"]
        if "srl" in values:
            parts.append(f"srl {values['srl']:.4f}")
        parts += [f"lr {values['lr']:.2e}", f"ema {values['ema_decay']:.5f}", f"{step_time:.3f} s/step",
                  f"{clips_per_s:.1f} clips/s"]
        if self.device.type == "cuda":
            peak = peak_tflops(torch.cuda.get_device_name(self.device))
            if peak:
                record["mfu"] = self.flops_per_clip * clips_per_s / self.dist.world_size / (peak * 1e12)
                parts.append(f"MFU {100 * record['mfu']:.1f}%")
            record["peak_mem_gb"] = torch.cuda.max_memory_allocated(self.device) / 2**30
            parts.append(f"mem {record['peak_mem_gb']:.2f} GB")
        self.log(" | ".join(parts))
        if metrics_file:
            metrics_file.write(metrics_line(record))
            metrics_file.flush()
        if writer:
            for k, v in record.items():
                if k != "step":
                    writer.add_scalar(f"train/{k}", v, self.step)
        return record

    def _tensorboard(self):
        if not (self.cfg.run.tensorboard and self.dist.main):
            return None
        from torch.utils.tensorboard import SummaryWriter  # validate() checked that it is installed

        return SummaryWriter(str(self.out / "tensorboard"))


def _cpu_state(module: torch.nn.Module) -> dict:
    """Full (unsharded) CPU copies of a module's state; every rank must call it under FSDP."""
    out = {}
    for k, v in module.state_dict().items():
        if hasattr(v, "full_tensor"):  # an FSDP-sharded DTensor
            v = v.full_tensor()
        out[k] = v.detach().to("cpu").clone()
    return out


def peak_tflops(device_name: str) -> float | None:
    """The dense bf16 peak that MFU is measured against, for the cards this project knows."""
    for key, value in PEAK_TFLOPS.items():
        if key in device_name:
            return value
    return None


# ---- command line -------------------------------------------------------------------------


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="tiny", choices=["tiny", "base", "large"], help="model and recipe (default tiny)")
    p.add_argument("--stage", type=int, default=1, choices=[1, 2],
                   help="1: EAT pretraining, 2: SSLAM on mixtures (default 1)")
    p.add_argument("--data", default=None, help="synth (default), a folder of audio files, or a fairseq .tsv manifest")
    p.add_argument("--init", default=None, help="checkpoint to start from (official EAT/SSLAM or ours, a run "
                   "folder, or hf-hub:OWNER/NAME[/PATH][@REVISION])")
    p.add_argument("--out", default=None, help="run folder (checkpoints, metrics.jsonl, config.json; default "
                   f"{RunSection.out}); a folder that holds checkpoints is resumed")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")


def config_from_args(args, overrides: list[str]) -> TrainConfig:
    cfg = preset(args.preset, args.stage)
    for flag, key in (("data", "data.source"), ("init", "run.init"), ("out", "run.out")):
        if getattr(args, flag) is not None and any(item.startswith(f"--{key}=") for item in overrides):
            raise ValueError(f"--{flag} and --{key}= both set {key}: give one of them")
    # "is not None": an empty --out or --data is refused by validate(), not taken as the default
    if args.data is not None:
        cfg.data.source = args.data
    if args.init is not None:
        cfg.run.init = args.init
    if args.out is not None:
        cfg.run.out = args.out
    for item in overrides:
        set_option(cfg, *split_override(item))
    if cfg.objective.stage != args.stage:  # it would keep the other stage's lr, steps and clones
        raise ValueError(f"--objective.stage={cfg.objective.stage}: choose the stage with --stage "
                         f"{cfg.objective.stage}, which also sets its recipe (SPEC 5.6)")
    validate(cfg)
    return cfg


def run_pretrain(args, overrides) -> int:
    cfg = config_from_args(args, overrides)
    if args.print_config:
        print(format_config(cfg))
        return 0
    trainer = Trainer(cfg)
    try:
        trainer.fit()
    except StopTraining as exc:
        stop_distributed(exc)
    except BaseException:
        if dist.is_initialized():
            dist.destroy_process_group()
        raise
    finish_distributed()
    return 0


def add_pretrain_command(sub) -> None:
    p = sub.add_parser("pretrain", help="EAT stage-1 / SSLAM stage-2 pretraining",
                       description="Overrides: --section.key=value (sections model, objective, data, optim, ema, run).")
    add_arguments(p)
    p.set_defaults(func=lambda a: run_pretrain(a, a.overrides), overrides=[])


def main(argv: list[str] | None = None) -> int:
    """``python -m sslam.train ARGS`` (what torchrun runs) is ``sslam pretrain ARGS``, with the
    same one-line errors."""
    from .cli import main as cli_main

    return cli_main(["pretrain", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
