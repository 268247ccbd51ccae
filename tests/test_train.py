"""The trainer: config and overrides, loss going down, exact resume, DDP equivalence, atomic
checkpoints, stage 2 from the official checkpoint, bad data and bad losses."""

import json
import os
import random
import subprocess
import sys
from contextlib import nullcontext
from functools import partial
from pathlib import Path

import pytest
import torch
from conftest import GOLDEN

import sslam.train
from sslam.checkpoint import load_encoder, read_checkpoint, safe_torch_load
from sslam.files import checkpoints_in
from sslam.precision import MATMUL_MODULES
from sslam.runs import StopTraining
from sslam.train import Trainer, config_from_args, lr_factor
from sslam.train_config import TrainConfig, preset, set_option, validate


def small(out, stage=1, steps=6, **over) -> TrainConfig:
    """A config that trains in seconds on a CPU."""
    cfg = preset("tiny", stage)
    cfg.model.embed_dim, cfg.model.depth, cfg.model.num_heads = 32, 2, 2
    cfg.model.decoder_dim, cfg.model.decoder_groups, cfg.model.decoder_layers = 16, 4, 2
    cfg.objective.clones, cfg.objective.mask_length, cfg.objective.mix_width = 2, 3, 32
    cfg.data.batch_size, cfg.data.target_length, cfg.data.num_workers = 4, 128, 0
    cfg.data.synth_clips, cfg.data.synth_seconds = 48, 1.4
    cfg.optim.max_steps, cfg.optim.warmup_steps = steps, 2
    cfg.run.out, cfg.run.log_every, cfg.run.ckpt_every, cfg.run.progress = str(out), 2, 3, False
    for key, value in over.items():
        set_option(cfg, key.replace("__", "."), value)
    return cfg


def pretrain_script(cfg: TrainConfig) -> str:
    """A Python script that trains ``cfg`` through the command line (``sslam pretrain`` with
    the ``--section.key=value`` overrides that turn the tiny preset into ``cfg``), as each
    process of ``torchrun ... sslam pretrain`` would."""
    stage = cfg.objective.stage
    tiny = preset("tiny", stage).to_dict()
    overrides = [f"--{section}.{key}={value}" for section, entries in cfg.to_dict().items()
                 for key, value in entries.items() if value != tiny[section][key]]
    argv = ["pretrain", "--preset", "tiny", "--stage", str(stage), *overrides]
    return f"import sys\nfrom sslam.cli import main\nsys.exit(main({argv!r}))\n"


def interrupt_after(trainer, monkeypatch, steps: int) -> None:
    """Run ``trainer.fit()`` and stop it, as Ctrl-C would, once it has done ``steps`` steps."""
    real_step = trainer.train_step

    def step_or_stop(micro):
        if trainer.step == steps:
            raise KeyboardInterrupt
        return real_step(micro)

    monkeypatch.setattr(trainer, "train_step", step_or_stop)
    with pytest.raises(KeyboardInterrupt):
        trainer.fit()


def assert_same_state(straight, resumed) -> None:
    """Bit-identical weights (student, teacher, decoder) and Adam moments."""
    a, b = params(straight), params(resumed)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    sa, sb = straight.optimizer.state_dict()["state"], resumed.optimizer.state_dict()["state"]
    for i in sa:
        assert torch.equal(sa[i]["exp_avg"], sb[i]["exp_avg"]), i
        assert torch.equal(sa[i]["exp_avg_sq"], sb[i]["exp_avg_sq"]), i


def params(trainer) -> dict:
    state = {f"student.{k}": v for k, v in trainer.model.student.state_dict().items()}
    state.update({f"teacher.{k}": v for k, v in trainer.model.teacher.encoder.state_dict().items()})
    state.update({f"decoder.{k}": v for k, v in trainer.model.decoder.state_dict().items()})
    return state


def test_overrides_and_errors():
    cfg = preset("tiny", 2)
    set_option(cfg, "optim.lr", "3e-4")
    set_option(cfg, "run.compile", "true")
    set_option(cfg, "data.batch_size", "6")
    assert cfg.optim.lr == 3e-4 and cfg.run.compile is True and cfg.data.batch_size == 6
    with pytest.raises(ValueError, match="unknown key 'learning_rate'"):
        set_option(cfg, "optim.learning_rate", "1")
    with pytest.raises(ValueError, match="unknown section 'optimizer'"):
        set_option(cfg, "optimizer.lr", "1")
    with pytest.raises(ValueError, match="expected an integer"):
        set_option(cfg, "data.batch_size", "many")
    base2 = preset("base", 2)
    assert (base2.optim.lr, base2.optim.warmup_steps, base2.optim.max_steps, base2.objective.clones) == (5e-5, 25_000, 200_000, 8)
    base1 = preset("base", 1)
    assert (base1.optim.lr, base1.optim.warmup_steps, base1.objective.clones) == (5e-4, 53_333, 16)
    large = preset("large", 1)
    assert large.model.variant == "large" and large.objective.mask_prob == 0.75 and large.model.decoder_kernel == 5
    assert TrainConfig.from_dict(base2.to_dict()) == base2


def test_cli_overrides_parse(tmp_path):
    import argparse

    args = argparse.Namespace(preset="tiny", stage=2, data=None, init=None, out=str(tmp_path), print_config=False)
    cfg = config_from_args(args, ["--optim.max_steps=7", "--run.seed=3"])
    assert cfg.optim.max_steps == 7 and cfg.run.seed == 3 and cfg.objective.stage == 2
    with pytest.raises(ValueError, match="--section.key=value"):
        config_from_args(args, ["--lr", "3"])
    # The stage is chosen with --stage: an override alone kept the other stage's lr, steps, clones.
    with pytest.raises(ValueError, match=r"--objective.stage=1: choose the stage with --stage 1"):
        config_from_args(args, ["--objective.stage=1"])
    assert config_from_args(args, ["--objective.stage=2"]).objective.stage == 2


def test_stage_defaults_follow_the_spec():
    """SPEC 3: 16 clones in stage 1, 8 in stage 2, also for the library objects; SPEC 1.1:
    manifest entries under 10000 samples are skipped."""
    from sslam.pretrain import ObjectiveConfig

    assert ObjectiveConfig(stage=1).clones == 16 and ObjectiveConfig(stage=2).clones == 8
    assert ObjectiveConfig(stage=2, clones=3).clones == 3
    assert preset("base", 2).objective.clones == 8 and preset("base", 1).objective.clones == 16
    assert TrainConfig().data.min_samples == 10_000
    # Runs saved with the former default resume where it filters nothing: only manifests.
    from sslam.train import resume_conflicts

    saved = TrainConfig()
    saved.data.min_samples = 0
    assert resume_conflicts({"config": saved.to_dict()}, TrainConfig(), 1) == []
    manifest = TrainConfig()
    manifest.data.source = saved.data.source = "train.tsv"
    assert resume_conflicts({"config": saved.to_dict()}, manifest, 1) == [
        "data.min_samples: 0 in the checkpoint, 10000 now"]
    # --init written otherwise names the same file: runs/s1/ is runs/s1.
    initialised, now = TrainConfig(), TrainConfig()
    initialised.run.init, now.run.init = "runs/s1", "runs/./s1/"
    assert resume_conflicts({"config": initialised.to_dict()}, now, 1) == []
    now.run.init = "runs/s2"
    assert resume_conflicts({"config": initialised.to_dict()}, now, 1) == [
        "run.init: 'runs/s1' in the checkpoint, 'runs/s2' now (a resumed run needs no --run.init: its weights "
        "come from its own checkpoint)"]
    manifest.data.source = saved.data.source = "TRAIN.TSV"  # read as a manifest too
    assert resume_conflicts({"config": saved.to_dict()}, manifest, 1) == [
        "data.min_samples: 0 in the checkpoint, 10000 now"]


def test_settings_a_run_does_not_use_may_change_on_resume():
    """Synthetic-data sizes for a run on files, the mixing and SRL settings in stage 1, the EMA
    restart without --init: changing them changes nothing, so a resume takes them; where they
    are used they are compared."""
    from sslam.train import resume_conflicts

    def conflicts(saved: TrainConfig, **changes) -> list[str]:
        now = TrainConfig.from_dict(saved.to_dict())
        for key, value in changes.items():
            set_option(now, key, value)
        return resume_conflicts({"config": saved.to_dict()}, now, 1)

    unused = {"data.synth_clips": 5, "data.synth_seconds": 2.0, "objective.srl_weight": 1.0,
              "objective.mix_width": 32, "ema.restart": False}
    files = preset("tiny", 1)
    files.data.source = "clips/"
    assert conflicts(files, **unused) == []
    stage2 = preset("tiny", 2)
    stage2.run.init = "s1.pt"
    assert [c.split(":")[0] for c in conflicts(stage2, **unused)] == [
        "objective.srl_weight", "objective.mix_width", "data.synth_clips", "data.synth_seconds", "ema.restart"]
    assert conflicts(stage2, **{"run.init": "", "ema.restart": False}) == [  # resumed without --init
        "ema.restart: True in the checkpoint, False now"]


@pytest.mark.parametrize("stage", [1, 2])
def test_stage_two_from_random_weights_is_noted(tmp_path, stage):
    lines = []
    Trainer(small(tmp_path, stage), log=lines.append)
    assert any("stage 2 from random weights" in line for line in lines) == (stage == 2)


def test_lr_schedule():
    o = preset("base", 2).optim
    assert lr_factor(0, o) == 0 and lr_factor(12_500, o) == pytest.approx(0.5)
    assert lr_factor(25_000, o) == pytest.approx(1.0) and lr_factor(200_000, o) == pytest.approx(0.0, abs=1e-12)
    # With a floor, fairseq's cosine warms up from min_lr (its warmup_init_lr), not from 0.
    o.min_lr = 1e-6
    assert lr_factor(0, o) * o.lr == pytest.approx(1e-6) and lr_factor(25_000, o) == pytest.approx(1.0)
    assert lr_factor(12_500, o) * o.lr == pytest.approx(1e-6 + (5e-5 - 1e-6) / 2)
    assert lr_factor(200_000, o) * o.lr == pytest.approx(1e-6)


@pytest.mark.parametrize("stage", [1, 2])
def test_loss_goes_down(tmp_path, stage):
    cfg = small(tmp_path, stage, steps=30, optim__lr=2e-3)
    cfg.run.log_every = 1
    Trainer(cfg, log=lambda *a: None).fit()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 30
    first = sum(r["loss"] for r in records[:5]) / 5
    last = sum(r["loss"] for r in records[-5:]) / 5
    assert last < 0.9 * first, (first, last)
    if stage == 2:
        assert all("srl" in r for r in records)
    saved = read_checkpoint(checkpoints_in(tmp_path)[-1])
    assert saved.format == "sslam-train" and saved.teacher is not None and saved.decoder is not None
    assert load_encoder(checkpoints_in(tmp_path)[-1]).cfg.embed_dim == 32


@pytest.mark.parametrize("precision", ["fp32", "bf16-pure"])
def test_resume_is_exact(tmp_path, monkeypatch, precision):
    straight = Trainer(small(tmp_path / "a", steps=6, run__precision=precision), log=lambda *a: None)
    straight.fit()
    interrupt_after(Trainer(small(tmp_path / "b", steps=6, run__precision=precision), log=lambda *a: None), monkeypatch, 4)
    assert [p.name for p in checkpoints_in(tmp_path / "b")] == ["checkpoint_00000003.pt"]
    resumed = Trainer(small(tmp_path / "b", steps=6, run__precision=precision), log=lambda *a: None)
    assert resumed.step == 3
    resumed.fit()
    assert_same_state(straight, resumed)


def test_resume_keeps_this_machines_optimizer_implementation(tmp_path):
    """The saved optimizer groups carry the saving run's ``fused`` flag: a run saved on a GPU
    (fused AdamW) and resumed on the CPU, or the other way round, takes this machine's."""
    quiet = lambda *a: None  # noqa: E731
    Trainer(small(tmp_path, steps=2), log=quiet).fit()
    path = checkpoints_in(tmp_path)[-1]
    state = safe_torch_load(path)
    for group in state["optimizer"]["param_groups"]:
        group["fused"] = True  # as a CUDA run saves it
    torch.save(state, path)
    resumed = Trainer(small(tmp_path, steps=4), log=quiet)
    assert [group["fused"] for group in resumed.optimizer.param_groups] == [None, None]
    resumed.fit()


def test_resume_restores_the_global_random_streams(tmp_path, monkeypatch):
    """Regression: after a resume the global torch stream was one draw ahead of the
    uninterrupted run's (iterating the data loader drew its workers' base seed from it), and
    Python's stream, saved in every checkpoint, was not restored."""
    quiet = lambda *a: None  # noqa: E731
    random.gauss(0.0, 1.0)  # one of a pair drawn: Python keeps the other for the next call
    Trainer(small(tmp_path / "a", steps=5), log=quiet).fit()
    after = torch.get_rng_state(), random.getstate()
    # Seeded by run.seed, as torch's (nothing here draws from it): the state a checkpoint saves.
    assert after[1] == random.Random(small(tmp_path / "c").run.seed).getstate()
    interrupt_after(Trainer(small(tmp_path / "b", steps=5), log=quiet), monkeypatch, 4)
    random.random(), random.gauss(0.0, 1.0)  # the process's own use of Python's stream, between the two runs
    Trainer(small(tmp_path / "b", steps=5), log=quiet).fit()
    assert torch.equal(torch.get_rng_state(), after[0])
    assert random.getstate() == after[1]


def test_distributed_pretrain_exits_without_the_interpreter_shutdown(tmp_path):
    """With a process group, `sslam pretrain` destroys it and leaves by os._exit (the shutdown
    where gloo worker threads can abort the process does not run: atexit handlers are part of
    it), with status 0, its checkpoint and its output written."""
    script = tmp_path / "one_rank.py"
    script.write_text(
        "import atexit, torch.distributed as dist\n"
        "atexit.register(print, 'interpreter shutdown ran')\n"
        f"dist.init_process_group('gloo', init_method={(tmp_path / 'store').as_uri()!r}, rank=0, world_size=1)\n"
        + pretrain_script(small(tmp_path / "run", steps=1))
    )
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "interpreter shutdown ran" not in result.stdout
    assert "step 1" in result.stdout  # the run's log line was flushed before leaving
    assert checkpoints_in(tmp_path / "run")


@pytest.mark.parametrize("parallel, blocks, precision, accum", [
    ("ddp", "off", "fp32", 1), ("fsdp", "off", "fp32", 1), ("fsdp", "selective", "fp32", 1),
    ("ddp", "off", "bf16-pure", 1), ("fsdp", "off", "bf16-pure", 1), ("fsdp", "off", "fp32", 2),
    ("fsdp", "off", "bf16-pure", 2), ("ddp", "off", "fp16", 1), ("ddp", "off", "fp16-pure", 1),
])
def test_accumulation_equals_two_processes(tmp_path, monkeypatch, parallel, blocks, precision, accum):
    """2 processes on gloo (DDP, or FSDP2 sharding, also with recomputed blocks; also with half
    weights, which FSDP makes as it gathers the shards), each accumulating ``accum``
    micro-batches, give the parameters of one process that accumulates the same 2 * accum
    micro-batches (the global batch is split the same way). The one process casts its half
    weights once per update, for all its micro-batches. FSDP reduce-scatters the gradients
    after the last micro-batch only: once per step for each of its units that trains (the
    student's two blocks and the root). Under DDP a two-way split is exact, bit for bit, in fp16
    too (the 1 / accum of the micro-batches is applied to the fp32 gradients, not in the half
    backward, where halving lost the smallest gradients' bits)."""
    casts = []
    cast = sslam.train.half_weights
    monkeypatch.setattr(sslam.train, "half_weights", lambda *a, **k: casts.append(a) or cast(*a, **k))
    threads = torch.get_num_threads()
    try:  # one thread, as each of the two processes: bf16 matmuls round differently on more
        one = Trainer(small(tmp_path / "one", steps=3, optim__accum_steps=2 * accum, run__precision=precision,
                            run__threads=1), log=lambda *a: None)
        one.fit()
    finally:
        torch.set_num_threads(threads)
    assert len(casts) == (0 if precision == "fp32" else 3)  # one per update (autocast's: the matmuls')
    script = tmp_path / "ddp.py"
    count_reduce_scatters = (  # a line per call in a file per rank (the run leaves by os._exit)
        "import os, torch.distributed as dist\n"
        "def counting(reduce_scatter):\n"
        "    def counted(*a, **k):\n"
        f"        with open({str(tmp_path)!r} + '/rs' + os.environ['RANK'], 'a') as f: f.write('1\\n')\n"
        "        return reduce_scatter(*a, **k)\n"
        "    return counted\n"
        "for name in ('reduce_scatter_single', 'reduce_scatter_tensor'):  # FSDP2 calls one, by version\n"
        "    if hasattr(dist, name):\n"
        "        setattr(dist, name, counting(getattr(dist, name)))\n"
    )
    script.write_text(count_reduce_scatters + pretrain_script(
        small(tmp_path / "two", steps=3, optim__accum_steps=accum, run__parallel=parallel,
              run__checkpoint_blocks=blocks, run__precision=precision)))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script)],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    if parallel == "fsdp":
        assert "returned a view tensor" not in result.stderr  # FSDP2's warning, not ours to give
        for rank in (0, 1):
            assert len((tmp_path / f"rs{rank}").read_text().splitlines()) == 3 * 3
    two = read_checkpoint(checkpoints_in(tmp_path / "two")[-1])
    # FSDP's sharded gradient norm rounds otherwise: close, not equal.
    same = torch.equal if parallel == "ddp" else partial(torch.allclose, atol=1e-5, rtol=1e-4)
    for k, v in one.model.student.state_dict().items():
        assert same(v, two.state[k]), k
    for k, v in one.model.teacher.encoder.state_dict().items():
        assert same(v, two.teacher[k]), k
    # The logged loss is the global batch's (averaged over the processes), not one process's;
    # under DDP the same to the last bit (each micro-batch's terms summed in the same order).
    losses = [[json.loads(line)["loss"] for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
              for run in ("one", "two")]
    assert len(losses[0]) == 2
    assert losses[1] == losses[0] if parallel == "ddp" else losses[1] == pytest.approx(losses[0], rel=1e-4)


def test_the_processes_loss_terms_are_read_in_the_global_batchs_slot_order(monkeypatch):
    """Micro-step k of process r is slot k * processes + r of the global batch (the sampler's
    order): the gathered terms come back in that order, whatever process reads them, with the
    processes' unreadable files and stand-ins added up."""
    from types import SimpleNamespace

    world, accum = 2, 3
    local = {r: torch.tensor([[10.0 * (k * world + r), 1.0] for k in range(accum)]) for r in range(world)}
    counts = {0: (1, 0), 1: (2, 1)}

    def all_gather(outputs, tensor):  # what each process contributes, as gloo would hand it out
        for r, out in enumerate(outputs):
            out.copy_(torch.cat([local[r].flatten(), torch.tensor(counts[r], dtype=torch.float32)]))
    monkeypatch.setattr(sslam.train.dist, "all_gather", all_gather)
    for rank in range(world):
        trainer = SimpleNamespace(dist=SimpleNamespace(world_size=world, rank=rank))
        rows, failures, stand_ins = Trainer._across_processes(trainer, local[rank], *counts[rank])
        assert [row[0] for row in rows] == [10.0 * slot for slot in range(world * accum)]
        assert (failures, stand_ins) == (3, 1)


def test_autocast_casts_the_matmul_weights_once_per_update_exactly(tmp_path, monkeypatch):
    """bf16 autocast in one process: the matmuls' weights are cast once per update, not at each
    use; the run's weights are those of autocast casting them itself, bit for bit."""
    def train(out):
        trainer = Trainer(small(out, stage=2, steps=2, run__precision="bf16"), log=lambda *a: None)
        trainer.fit()
        return trainer.model.state_dict()

    casts = []
    cast = sslam.train.half_weights
    monkeypatch.setattr(sslam.train, "half_weights", lambda *a, **k: casts.append(k) or cast(*a, **k))
    once = train(tmp_path / "once")
    assert casts == [{"only": MATMUL_MODULES}] * 2
    monkeypatch.setattr(sslam.train, "half_weights", lambda *a, **k: nullcontext())
    per_use = train(tmp_path / "per_use")
    assert once.keys() == per_use.keys() and all(torch.equal(once[k], per_use[k]) for k in once)


def test_interrupted_checkpoint_write_keeps_the_previous(tmp_path, monkeypatch):
    trainer = Trainer(small(tmp_path, steps=3), log=lambda *a: None)
    trainer.fit()
    good = checkpoints_in(tmp_path)[-1]

    def crash(obj, path, *a, **k):
        Path(path).write_bytes(b"half a checkpoint")
        raise KeyboardInterrupt

    trainer.step = 4
    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        trainer.save()
    monkeypatch.undo()
    assert checkpoints_in(tmp_path) == [good]
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    resumed = Trainer(small(tmp_path, steps=3), log=lambda *a: None)
    assert resumed.step == 3


def test_official_tiny_checkpoint_initialises_stage2(tmp_path):
    cfg = small(tmp_path, stage=2, steps=3, run__init=str(GOLDEN / "tiny_ckpt.pt"))
    trainer = Trainer(cfg, log=lambda *a: None)
    official = read_checkpoint(GOLDEN / "tiny_ckpt.pt")
    assert trainer.model.student.cfg.embed_dim == 64
    assert torch.equal(trainer.model.teacher.encoder.cls_token.detach(), official.teacher["cls_token"])
    assert trainer.model.objective.decoder.dim == 32 and trainer.model.objective.top_k == 2
    assert trainer.ema_decay() == pytest.approx(cfg.ema.start)  # the restarted schedule
    trainer.fit()
    assert len(checkpoints_in(tmp_path)) == 1


def test_nonfinite_losses_stop_the_run_and_keep_the_last_checkpoint(tmp_path, monkeypatch):
    cfg = small(tmp_path, steps=10, run__max_bad_steps=2)
    trainer = Trainer(cfg, log=lambda *a: None)
    real = trainer.train_module.forward

    def poisoned(*args, **kwargs):
        losses = real(*args, **kwargs)
        if trainer.step >= 3:
            losses.total = losses.total * float("nan")
        return losses

    monkeypatch.setattr(trainer.train_module, "forward", poisoned)
    with pytest.raises(StopTraining, match="2 consecutive non-finite losses or gradients"):
        trainer.fit()
    assert [p.name for p in checkpoints_in(tmp_path)] == ["checkpoint_00000003.pt"]
    assert trainer.skipped_steps == 2


def test_a_resumed_run_keeps_its_count_of_bad_steps(tmp_path, monkeypatch):
    """Steps 3 and 4 non-finite with run.max_bad_steps=2: the run stops at step 4, also when
    resumed from the checkpoint written on the skipped step 3 (its count of bad steps in a row
    was not saved: the resumed run trained on)."""
    def poisoned_from(trainer, bad_steps):
        real = trainer.train_module.forward

        def forward(*args, **kwargs):
            losses = real(*args, **kwargs)
            if trainer.step + 1 in bad_steps:
                losses.total = losses.total * float("nan")
            return losses

        monkeypatch.setattr(trainer.train_module, "forward", forward)
        return trainer

    cfg = small(tmp_path, steps=6, run__max_bad_steps=2, run__ckpt_every=3)
    interrupt_after(poisoned_from(Trainer(cfg, log=lambda *a: None), {3}), monkeypatch, 3)
    resumed = poisoned_from(Trainer(cfg, log=lambda *a: None), {4})
    assert resumed.step == 3 and resumed.bad_steps == 1
    with pytest.raises(StopTraining, match="2 consecutive non-finite losses or gradients at step 4"):
        resumed.fit()


def test_a_run_restarted_before_its_first_checkpoint_logs_each_step_once(tmp_path, monkeypatch):
    cfg = small(tmp_path, steps=4, run__log_every=1, run__ckpt_every=3)
    interrupt_after(Trainer(cfg, log=lambda *a: None), monkeypatch, 2)
    assert not checkpoints_in(tmp_path)
    Trainer(cfg, log=lambda *a: None).fit()
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


def test_recomputing_decoder_and_blocks_trains_as_the_plain_run(tmp_path):
    plain = Trainer(small(tmp_path / "a", steps=2), log=lambda *a: None)
    plain.fit()
    settings = {"run__checkpoint_decoder": True, "run__checkpoint_blocks": "selective"}
    checkpointed = Trainer(small(tmp_path / "b", steps=2, **settings), log=lambda *a: None)
    assert checkpointed.model.checkpoint_decoder and not plain.model.checkpoint_decoder
    assert checkpointed.model.student.checkpoint_blocks == "selective" and plain.model.student.checkpoint_blocks == "off"
    checkpointed.fit()
    assert_same_state(plain, checkpointed)


def test_a_step_with_nonfinite_gradients_is_skipped(tmp_path):
    """Without an fp16 gradient scaler nothing else would stop NaN gradients from reaching the
    weights (the loss itself stays finite here)."""
    trainer = Trainer(small(tmp_path, steps=3), log=lambda *a: None)
    before = {k: v.clone() for k, v in params(trainer).items()}
    next(trainer.model.student.parameters()).register_hook(lambda grad: grad * float("nan"))
    assert trainer.train_step([next(iter(trainer.data_loader()))]) is None
    assert trainer.step == 1 and trainer.skipped_steps == 1 and not trainer.optimizer.state
    assert all(torch.equal(before[k], v) for k, v in params(trainer).items())


def test_an_fp16_overflow_is_no_update_and_not_a_bad_step(tmp_path, monkeypatch):
    """The fp16 scaler's overflow: no optimizer or EMA step, the scale lowered, the step skipped
    without counting towards run.max_bad_steps; a scale below the official minimum stops."""
    trainer = Trainer(small(tmp_path, steps=3, run__precision="fp16", run__max_bad_steps=1),
                      log=lambda *a: None)
    teacher = {k: v.clone() for k, v in trainer.model.teacher.encoder.state_dict().items()}
    trainer.model.teacher.encoder.cls_token.data += 1  # so an EMA step toward the student shows
    teacher["cls_token"] += 1
    before = {k: v.clone() for k, v in params(trainer).items()}
    scale = trainer.scaler.get_scale()
    assert scale == 2.0**7  # fairseq's first loss scale
    next(trainer.model.student.parameters()).register_hook(lambda grad: grad * float("inf"))
    batches = iter(trainer.data_loader())
    assert trainer.train_step([next(batches)]) is None  # one bad step allowed: an overflow is none
    assert (trainer.step, trainer.skipped_steps, trainer.bad_steps) == (1, 1, 0)
    assert trainer.scaler.get_scale() == scale / 2 and not trainer.optimizer.state
    assert all(torch.equal(before[k], v) for k, v in params(trainer).items())
    assert all(torch.equal(teacher[k], v) for k, v in trainer.model.teacher.encoder.state_dict().items())
    monkeypatch.setattr("sslam.train.MIN_LOSS_SCALE", scale / 3)
    with pytest.raises(StopTraining, match="loss scale fell below"):
        trainer.train_step([next(batches)])


def test_unreadable_files_are_skipped_and_capped(tmp_path):
    import numpy as np
    import soundfile as sf

    data = tmp_path / "data"
    data.mkdir()
    for i in range(8):
        sf.write(data / f"{i}.wav", np.random.default_rng(i).standard_normal(24000) * 0.1, 16000)
    (data / "3.wav").write_bytes(b"not audio at all")
    trainer = Trainer(small(tmp_path / "run", steps=2, data__source=str(data)), log=lambda *a: None)
    trainer.fit()
    assert [Path(p).name for p, _ in trainer.bad_files][:1] == ["3.wav"]
    cfg = small(tmp_path / "run2", steps=4, data__source=str(data), data__max_bad_files=0)
    with pytest.raises(StopTraining, match="unreadable files exceed data.max_bad_files=0"):
        Trainer(cfg, log=lambda *a: None).fit()


def test_a_run_stopped_by_unreadable_files_saves_its_last_step_and_resumes_exactly(tmp_path):
    """Regression: the run stopped inside the step that met one unreadable file too many, and
    lost every step since its last checkpoint (up to run.ckpt_every - 1), though only the
    data was at fault: the step's batch is whole (a readable file takes the bad one's place)."""
    import numpy as np
    import soundfile as sf

    data = tmp_path / "data"
    data.mkdir()
    for i in range(12):
        sf.write(data / f"{i:02d}.wav", np.random.default_rng(i).standard_normal(24000) * 0.1, 16000)
    (data / "05.wav").write_bytes(b"not audio")
    run = lambda name, limit, steps=6: small(tmp_path / name, steps=steps, data__source=str(data),  # noqa: E731
                                             data__max_bad_files=limit, run__ckpt_every=100)
    stopped = Trainer(run("run", 0), log=lambda *a: None)
    with pytest.raises(StopTraining, match=r"^1 unreadable files exceed data.max_bad_files=0; first ones: \[.*05.wav'\]\. "
                                           r"Stopped after step \d, saved as .*checkpoint_0000000\d.pt: resume with a "
                                           r"larger data.max_bad_files"):
        stopped.fit()
    assert [p.name for p in checkpoints_in(tmp_path / "run")] == [f"checkpoint_{stopped.step:08d}.pt"]
    with pytest.raises(ValueError, match=r"the run met 1 unreadable files, more than data.max_bad_files=0: resume "
                                         r"with a larger one"):
        Trainer(run("run", 0), log=lambda *a: None)
    Trainer(run("run", 1), log=lambda *a: None).fit()
    Trainer(run("straight", 1), log=lambda *a: None).fit()
    resumed, straight = (safe_torch_load(checkpoints_in(tmp_path / name)[-1]) for name in ("run", "straight"))
    assert resumed["step"] == straight["step"] == 6
    for part in ("model", "decoder", "teacher"):
        assert all(torch.equal(v, straight[part][k]) for k, v in resumed[part].items())
    # A run whose last step crosses the limit is done, not stopped.
    Trainer(run("last", 0, steps=stopped.step), log=lambda *a: None).fit()
    assert [p.name for p in checkpoints_in(tmp_path / "last")] == [f"checkpoint_{stopped.step:08d}.pt"]


@pytest.mark.parametrize("workers", [0, 2])
def test_a_run_of_unreadable_files_longer_than_tolerated_stops_in_one_line(tmp_path, workers):
    """Regression: more unreadable files in a row than data.max_bad_files (a wrong manifest
    root, a corrupt folder) ended in a DataLoader worker's traceback ("Caught AudioError in
    DataLoader worker process 0 ... Original Traceback"), without the files' log lines; a data
    source of nothing but unreadable files was said to exceed a limit it did not reach."""
    data = tmp_path / "data"
    data.mkdir()
    for i in range(12):
        (data / f"{i:02d}.wav").write_bytes(b"not audio")
    lines = []
    cfg = small(tmp_path / "run", steps=2, data__source=str(data), data__max_bad_files=5, data__num_workers=workers)
    with pytest.raises(StopTraining, match=r"^\d+ unreadable files exceed data.max_bad_files=5; first ones") as err:
        Trainer(cfg, log=lines.append).fit()
    assert "Traceback" not in str(err.value) and "\n" not in str(err.value)
    assert any(line.startswith("skipped unreadable file") for line in lines)
    assert f"data: 12 clips from {data}" in lines  # the run says what it found
    cfg = small(tmp_path / "run2", steps=2, data__source=str(data), data__num_workers=workers)  # limit 100
    with pytest.raises(StopTraining, match=r"^every one of the 12 audio files of the data is unreadable"):
        Trainer(cfg, log=lambda *a: None).fit()


@pytest.mark.parametrize("bad_step", [3, 6])  # a checkpoint step, the last step
def test_a_skipped_step_on_a_checkpoint_step_still_saves(tmp_path, monkeypatch, bad_step):
    trainer = Trainer(small(tmp_path, steps=6, run__ckpt_every=3), log=lambda *a: None)
    real = trainer.train_module.forward

    def poisoned(*args, **kwargs):
        losses = real(*args, **kwargs)
        if trainer.step == bad_step - 1:
            losses.total = losses.total * float("nan")
        return losses

    monkeypatch.setattr(trainer.train_module, "forward", poisoned)
    trainer.fit()
    assert trainer.skipped_steps == 1
    assert [p.name for p in checkpoints_in(tmp_path)] == ["checkpoint_00000003.pt", "checkpoint_00000006.pt"]


def test_only_checkpoint_names_count_and_they_sort_by_step(tmp_path):
    for name in ("checkpoint_00000010.pt", "checkpoint_00000009.pt", "best_checkpoint_00000099.pt",
                 "stage1_checkpoint_00000050.pt", "checkpoint_00000011.pt.tmp", "checkpoint_7.pt"):
        (tmp_path / name).write_bytes(b"")
    assert [p.name for p in checkpoints_in(tmp_path)] == ["checkpoint_00000009.pt", "checkpoint_00000010.pt"]


def test_a_bad_file_met_again_counts_once_and_a_long_run_of_them_is_counted_not_fatal(tmp_path):
    import numpy as np
    import soundfile as sf

    data = tmp_path / "data"
    data.mkdir()
    for i in range(6):
        sf.write(data / f"good{i}.wav", np.random.default_rng(i).standard_normal(24000) * 0.1, 16000)
    for i in range(25):  # 25 unreadable files in a row, more than one item used to skip
        (data / f"bad{i:02d}.wav").write_bytes(b"not audio")
    trainer = Trainer(small(tmp_path / "run", steps=12, data__source=str(data), data__max_bad_files=25),
                      log=lambda *a: None)
    trainer.fit()  # 12 steps x 4 clips: every file is met several times
    assert sorted(Path(p).name for p, _ in trainer.bad_files) == [f"bad{i:02d}.wav" for i in range(25)]
    cfg = small(tmp_path / "run2", steps=12, data__source=str(data), data__max_bad_files=24)
    with pytest.raises(StopTraining, match="data.max_bad_files"):
        Trainer(cfg, log=lambda *a: None).fit()


@pytest.mark.parametrize("key, value, match", [
    ("data.norm", "bogus", r"data.norm='bogus'"), ("data.synth_clips", "0", "data.synth_clips"),
    ("data.synth_seconds", "nan", "data.synth_seconds"), ("run.seed", "-1", "run.seed"),
    ("run.threads", "-1", "run.threads"), ("optim.clip_norm", "-1", "optim.clip_norm"),
    ("run.out", "", "run.out must name a folder"),
    ("run.threads", "99999999999", r"run.threads must be in \[0, 1024\]"),
    ("data.num_workers", "99999999999999999999", r"data.num_workers must be in \[0, 1024\]"),
    ("objective.clones", "99999999999999999999", r"objective.clones must be in \[1, 1024\]"),
    ("data.target_length", "1600000", r"data.target_length=1600000: at most 12288 frames"),
])
def test_settings_that_used_to_fail_mid_run_are_refused_up_front(key, value, match):
    cfg = preset("tiny", 1)
    set_option(cfg, key, value)
    with pytest.raises(ValueError, match=match):
        validate(cfg)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_a_gpu_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="run.device=cuda: no CUDA device"):
        Trainer(small(tmp_path, run__device="cuda"), log=lambda *a: None)


def test_cuda_random_state_is_this_devices_and_old_all_device_states_load(monkeypatch):
    """A checkpoint holds the CUDA stream of the device it trained on. An older one holds every
    visible device's: a process restores its own device's, and one with more GPUs than the
    saving machine had (restoring all of them raised IndexError) restores none."""
    from sslam.runs import rng_state, set_rng_state

    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device="cuda": torch.full((4,), 7, dtype=torch.uint8))
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device="cuda": restored.append(state))
    state = rng_state()
    assert torch.equal(state["cuda"], torch.full((4,), 7, dtype=torch.uint8))
    set_rng_state(state)
    assert torch.equal(restored.pop(), state["cuda"])
    old = {**state, "cuda": [torch.full((4,), i, dtype=torch.uint8) for i in range(2)]}
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    set_rng_state(old)
    assert torch.equal(restored.pop(), old["cuda"][1])
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 5)
    set_rng_state(old)
    assert restored == []


def _damaged(ckpt: dict, change: str) -> dict:
    """``ckpt`` (a training checkpoint) with one part damaged as ``change`` names."""
    ckpt = {**ckpt, "model": dict(ckpt["model"]), "teacher": dict(ckpt["teacher"]),
            "encoder_config": dict(ckpt["encoder_config"])}
    weight = ckpt["model"]["blocks.0.norm1.weight"]
    if change.startswith("no "):
        del ckpt[change[3:]]
    elif change == "step='two'":
        ckpt["step"] = "two"
    elif change == "data_position=None":
        ckpt["data_position"] = None
    elif change == "wrong shape":
        ckpt["model"]["blocks.0.norm1.weight"] = torch.ones(3)
    elif change == "missing weight":
        del ckpt["model"]["blocks.0.norm1.weight"]
    elif change == "NaN teacher":
        ckpt["teacher"]["blocks.0.norm1.weight"] = torch.full_like(weight, float("nan"))
    elif change == "bad rng":
        ckpt["rng"] = {"torch": torch.zeros(3, dtype=torch.uint8)}
    elif change == "huge encoder_config":
        ckpt["encoder_config"].update(embed_dim=96_000, num_heads=3)
    return ckpt


@pytest.mark.parametrize("change, pattern", [
    ("no optimizer", "optimizer: missing"), ("no step", "step: missing"), ("no objective", "objective: missing"),
    ("step='two'", "step: a str, not an int"), ("data_position=None", "data_position: a NoneType"),
    ("wrong shape", r"\(model\): weights do not match.*blocks\.0\.norm1\.weight"),
    ("missing weight", r"\(model\): weights do not match.*missing keys"),
    ("NaN teacher", r"\(teacher\): blocks\.0\.norm1\.weight is not a finite"),
    ("bad rng", "random streams do not load"),
    ("huge encoder_config", r"\(model\): weights do not match.*shape mismatches"),
])
def test_a_damaged_training_checkpoint_is_named_with_its_damaged_part(tmp_path, change, pattern):
    """A resume from a checkpoint damaged or edited by hand: one CheckpointError naming the
    file and the part, not a KeyError or TypeError from inside the resume, nor NaN weights
    trained on, nor a model of the damaged size allocated."""
    from sslam.checkpoint import CheckpointError

    Trainer(small(tmp_path / "run", steps=3), log=lambda *a: None).fit()
    path = tmp_path / "run" / "checkpoint_00000003.pt"
    torch.save(_damaged(torch.load(path, weights_only=True), change), path)
    with pytest.raises(CheckpointError, match=f"(?s)checkpoint_00000003.pt.*{pattern}"):
        Trainer(small(tmp_path / "run", steps=6), log=lambda *a: None)


def test_a_run_started_from_a_relative_init_resumes_from_another_folder(tmp_path, monkeypatch):
    """The run records its start as an absolute path: resumed from another working folder, with
    --init written for that folder, it is the same file (the relative record was read against
    the new folder and refused)."""
    quiet = lambda *a: None  # noqa: E731
    Trainer(small(tmp_path / "s1", steps=3), log=quiet).fit()
    monkeypatch.chdir(tmp_path)
    Trainer(small("s2", steps=3, run__init="s1"), log=quiet).fit()
    start = tmp_path / "s1" / "checkpoint_00000003.pt"
    assert json.loads((tmp_path / "s2" / "config.json").read_text())["run"]["init"] == str(start)
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    for init in ("../s1", str(start)):
        assert Trainer(small("../s2", steps=6, run__init=init), log=quiet).step == 3


def test_init_given_as_a_run_folder_or_its_newest_checkpoint_is_one_start(tmp_path, monkeypatch):
    """--init s1 takes s1's newest checkpoint: a resume naming that file is the same start; once
    s1 holds a newer one, the folder names another start."""
    from sslam.train import resume_conflicts

    monkeypatch.chdir(tmp_path)
    (tmp_path / "s1").mkdir()
    (tmp_path / "s1" / "checkpoint_00000002.pt").write_bytes(b"")
    saved, now = TrainConfig(), TrainConfig()
    saved.run.init, now.run.init = "s1", "s1/checkpoint_00000002.pt"
    assert resume_conflicts({"config": saved.to_dict()}, now, 1) == []
    (tmp_path / "s1" / "checkpoint_00000004.pt").write_bytes(b"")
    assert resume_conflicts({"config": saved.to_dict()}, now, 1) == [
        "run.init: 's1' in the checkpoint, 's1/checkpoint_00000002.pt' now (a resumed run needs no --run.init: "
        "its weights come from its own checkpoint)"]
    # The folder itself, once it holds a newer checkpoint: the message says which file it names now.
    saved.run.init, now.run.init = str(tmp_path / "s1" / "checkpoint_00000002.pt"), "s1"
    newest = tmp_path / "s1" / "checkpoint_00000004.pt"
    assert resume_conflicts({"config": saved.to_dict()}, now, 1) == [
        f"run.init: {saved.run.init!r} in the checkpoint, 's1' now (its newest checkpoint, {str(newest)!r}; a "
        "resumed run needs no --run.init: its weights come from its own checkpoint)"]


def test_a_run_records_the_checkpoint_its_init_folder_gave(tmp_path):
    """--init s1 starts from s1's newest checkpoint, which the run records, through its
    resumes too; once s1 has trained on, a resume naming that file is the same start, and s1
    itself (now its newer checkpoint) is not."""
    quiet = lambda *a: None  # noqa: E731
    s1 = str(tmp_path / "s1")
    Trainer(small(tmp_path / "s1", steps=3), log=quiet).fit()
    Trainer(small(tmp_path / "s2", steps=3, run__init=s1), log=quiet).fit()
    first = str(tmp_path / "s1" / "checkpoint_00000003.pt")
    assert json.loads((tmp_path / "s2" / "config.json").read_text())["run"]["init"] == first
    Trainer(small(tmp_path / "s2", steps=6, run__init=s1), log=quiet).fit()  # s1 is still at step 3
    Trainer(small(tmp_path / "s1", steps=6), log=quiet).fit()
    for later in (s1, str(tmp_path / "s1" / "checkpoint_00000006.pt")):
        with pytest.raises(ValueError, match="cannot resume with changed settings: run.init"):
            Trainer(small(tmp_path / "s2", steps=9, run__init=later), log=quiet)
    assert Trainer(small(tmp_path / "s2", steps=9, run__init=first), log=quiet).step == 6


def test_the_logged_lr_is_the_one_the_update_used(tmp_path):
    """A step's record gave the schedule's lr for the next update: the first update of a
    warm-up from 0 changes nothing, yet its line said it ran at a positive lr."""
    from sslam.train import lr_factor

    cfg = small(tmp_path, steps=6, optim__warmup_steps=3)
    trainer = Trainer(cfg, log=lambda *a: None)
    batches = iter(trainer.data_loader())
    logged = [trainer.train_step([next(batches)])["lr"] for _ in range(3)]
    assert logged[0] == 0.0  # the first update of the warm-up from 0
    assert logged == pytest.approx([cfg.optim.lr * lr_factor(step, cfg.optim) for step in range(3)])
    assert logged[1] == pytest.approx(cfg.optim.lr / 3)


@pytest.mark.parametrize("stage", [1, 2])
def test_the_base_recipes_are_the_official_ones(stage):
    """Every number of the ViT-B recipes (SPEC 3, 4.1, 5.1, 5.5, 5.6), so a changed default
    cannot pass unnoticed: a run would train, just not as the paper's did."""
    cfg = preset("base", stage)
    schedule = {1: (5e-4, 53_333, 400_000, 16), 2: (5e-5, 25_000, 200_000, 8)}[stage]
    optim = cfg.optim
    assert (optim.lr, optim.warmup_steps, optim.max_steps, cfg.objective.clones) == schedule
    assert (optim.beta1, optim.beta2, optim.eps, optim.weight_decay) == (0.9, 0.95, 1e-8, 0.05)
    assert (optim.min_lr, optim.clip_norm, optim.accum_steps) == (0.0, 4.0, 1)
    assert (cfg.ema.start, cfg.ema.end, cfg.ema.anneal_steps, cfg.ema.restart) == (0.9998, 0.99999, 100_000, True)
    objective = cfg.objective
    assert (objective.top_k, objective.mask_prob, objective.mask_prob_adjust, objective.mask_length) == (0, 0.8, 0.07, 5)
    assert (objective.cls_loss, objective.srl_weight, objective.mix_width) == (1.0, 2.0, 240)
    assert (cfg.model.variant, cfg.model.decoder_dim, cfg.model.decoder_groups, cfg.model.decoder_kernel,
            cfg.model.decoder_layers) == ("base", 768, 16, 3, 6)
    assert (cfg.data.batch_size, cfg.data.target_length, cfg.data.norm, cfg.run.seed) == (12, 1024, "audioset", 1)


def test_weight_decay_skips_biases_and_one_dimensional_parameters(tmp_path):
    trainer = Trainer(small(tmp_path), log=lambda *a: None)
    decay, no_decay = ({id(p) for p in group["params"]} for group in trainer.optimizer.param_groups)
    assert [group["weight_decay"] for group in trainer.optimizer.param_groups] == [0.05, 0.0]
    trained = [(name, p) for name, p in trainer.model.named_parameters() if p.requires_grad]
    assert len(decay) + len(no_decay) == len(trained)
    for name, p in trained:
        expected = decay if p.ndim > 1 and not name.endswith(".bias") else no_decay
        assert id(p) in expected, name
    assert any(name.endswith("cls_token") and id(p) in decay for name, p in trained)  # 3-D: it decays
    assert any(name.endswith("norm.weight") and id(p) in no_decay for name, p in trained)


def test_gradients_are_clipped_to_clip_norm(tmp_path):
    """AdamW's first update is about lr * sign(gradient) whatever the gradient's size, so the
    weights alone do not show clipping; its first moment, (1 - beta1) * the clipped gradient,
    does."""
    clip = 1e-3
    trainer = Trainer(small(tmp_path, optim__clip_norm=clip), log=lambda *a: None)
    totals = trainer.train_step([next(iter(trainer.data_loader()))])
    assert totals["grad_norm"] > 10 * clip  # the norm before clipping is logged
    moments = [state["exp_avg"] for state in trainer.optimizer.state.values()]
    first_moment_norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(m) for m in moments]))
    assert float(first_moment_norm) == pytest.approx((1 - trainer.cfg.optim.beta1) * clip, rel=1e-4)
