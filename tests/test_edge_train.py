"""Edge cases of the training side: exact resume in stage 2 with accumulation and real audio
files, resume after a changed config, initialising from our own / official / fine-tuned /
hostile checkpoints, other model sizes and clip lengths, config validation, and downstream
evaluation on tiny or empty splits. A test whose docstring starts with "Regression" failed
before the fix it describes."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from conftest import GOLDEN
from test_train import assert_same_state, interrupt_after, pretrain_script, small

from sslam import native
from sslam.checkpoint import CheckpointError, convert, describe, read_checkpoint, safe_torch_load
from sslam.cli import main
from sslam.evaluate import FinetuneConfig, Finetuner, ProbeConfig, linear_probe, with_head
from sslam.files import checkpoints_in
from sslam.labels import LabeledSplit, read_csv_split, synth_split
from sslam.masking import MaskConfig
from sslam.model import Encoder, EncoderConfig
from sslam.pretrain import CNNDecoder
from sslam.runs import Dist
from sslam.train import Trainer, named_optimizer_state
from sslam.train_config import (
    TrainConfig,
    encoder_config,
    objective_config,
    preset,
    set_option,
    validate,
)


def quiet(*args, **kwargs):
    pass


def records(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def equal_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def audio_folder(path: Path, n: int = 10) -> Path:
    """WAV and FLAC clips of several lengths (0.7-1.3 s, some shorter than the 128-frame
    window), at 22.05 and 44.1 kHz, some stereo: the decode / resample / downmix path."""
    path.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        rate = 22050 if i % 2 else 44100
        rng = np.random.default_rng(i)
        x = rng.standard_normal(int(rate * (0.7 + 0.15 * (i % 5)))) * 0.1
        if i % 3 == 0:
            x = np.stack([x, 0.5 * x], axis=1)
        sf.write(path / f"clip{i}.{'flac' if i % 2 else 'wav'}", x, rate)
    return path


@pytest.fixture(scope="module")
def stage1_run(tmp_path_factory) -> Path:
    """A finished 3-step stage-1 run of the small test model (student, decoder, teacher)."""
    out = tmp_path_factory.mktemp("stage1")
    Trainer(small(out, stage=1, steps=3), log=quiet).fit()
    return out


# ---- exact resume ---------------------------------------------------------------------------


def test_stage2_resume_with_accumulation_and_audio_files_is_exact(tmp_path, monkeypatch):
    """Regression (metrics.jsonl): stage 2 (mixing, SRL), 2 accumulation steps, a folder of
    real WAV/FLAC files, killed during step 5 and resumed from the checkpoint of step 3
    (mid-epoch: 10 clips, global batch 4) -> the same weights, optimizer moments and per-step
    losses as an uninterrupted run. The resumed run used to log step 4 a second time."""
    data = audio_folder(tmp_path / "data")

    def cfg(out):
        return small(out, stage=2, steps=5, data__source=str(data), data__batch_size=2, optim__accum_steps=2,
                     run__ckpt_every=3, run__log_every=1)

    straight = Trainer(cfg(tmp_path / "a"), log=quiet)
    straight.fit()
    interrupt_after(Trainer(cfg(tmp_path / "b"), log=quiet), monkeypatch, 4)
    saved = safe_torch_load(checkpoints_in(tmp_path / "b")[-1])
    assert saved["step"] == 3 and saved["data_position"] == [1, 1]
    resumed = Trainer(cfg(tmp_path / "b"), log=quiet)
    assert resumed.step == 3
    resumed.fit()
    assert_same_state(straight, resumed)
    ra, rb = records(tmp_path / "a"), records(tmp_path / "b")
    assert [r["step"] for r in rb] == list(range(1, 6))
    for x, y in zip(ra, rb):
        assert (x["loss"], x["frame"], x["srl"], x["cls"]) == (y["loss"], y["frame"], y["srl"], y["cls"])


def test_resume_with_changed_settings_is_refused(stage1_run):
    """Regression: a run resumed with other settings used to continue silently -- with the
    checkpoint's architecture and objective (so `--stage 2` kept training stage 1 while the
    printed config said 2), and with a data position counted in the old global batch. Now the
    error names every changed setting; operational settings may still change."""
    before = {p.name: p.read_bytes() for p in stage1_run.iterdir() if p.suffix == ".pt"}
    changed = [
        ({"objective.stage": "2"}, "objective.stage: 1 in the checkpoint, 2 now"),
        ({"data.batch_size": "2"}, "data.batch_size: 4 in the checkpoint, 2 now"),
        ({"optim.accum_steps": "2"}, r"optim.accum_steps x processes: 1 x 1 in the checkpoint, 2 x 1 now"),
        # The same global batch cut into smaller micro-batches: named as such, not as a changed
        # global batch (the message said "the global batch must stay the same", which it did).
        ({"data.batch_size": "2", "optim.accum_steps": "2"},
         r"changed settings: data.batch_size: 4 in the checkpoint, 2 now: the global batch of 4 clips is the "
         r"same, but each micro-batch draws its own masks.*\(--data.batch_size=4 --optim.accum_steps=1 resumes it\)\. Run"),
        ({"model.embed_dim": "64", "run.seed": "7"}, "model.embed_dim: 32 .*run.seed: 1 in the checkpoint, 7 now"),
        ({"objective.mask_prob": "0.7"}, "objective.mask_prob"),
        ({"data.source": str(stage1_run)}, "data.source"),
        ({"run.init": str(GOLDEN / "tiny_ckpt.pt")}, "run.init"),
    ]
    for overrides, message in changed:
        cfg = small(stage1_run, stage=1, steps=3)
        for key, value in overrides.items():
            set_option(cfg, key, value)
        with pytest.raises(ValueError, match=message):
            Trainer(cfg, log=quiet)
    # Where and how it runs may change; so may the length of the run.
    cfg = small(stage1_run, stage=1, steps=4, run__log_every=1, run__keep_last=5, data__max_bad_files=3)
    trainer = Trainer(cfg, log=quiet)
    assert trainer.step == 3
    assert all((stage1_run / name).read_bytes() == data for name, data in before.items())


def test_a_resume_knows_its_data_by_its_clips_not_by_how_the_path_is_written(tmp_path, monkeypatch):
    """data.source 'data' resumed as its absolute path, or moved, is the same data (it was
    refused); the same words from another folder, naming other files, are other data (they
    were accepted, and a run would have gone on over other clips at the saved position). The
    refusal leaves the run's record as it was."""
    monkeypatch.chdir(tmp_path)
    audio_folder(tmp_path / "data", n=6)
    Trainer(small("run", stage=1, steps=2, data__source="data", data__batch_size=2), log=quiet).fit()
    shutil.copytree(tmp_path / "data", tmp_path / "moved")
    for source in (tmp_path / "data", tmp_path / "moved"):
        resumed = Trainer(small("run", stage=1, steps=3, data__source=str(source), data__batch_size=2), log=quiet)
        assert resumed.step == 2
        resumed.data_loader()  # the same clips
    record = (tmp_path / "run" / "config.json").read_bytes()
    for name, clips, message in [("other", 7, "holds 7 clips, not the 6 of the run's data"),
                                 ("renamed", 6, "holds files of other names than the run's data")]:
        audio_folder(tmp_path / name / "data", n=clips)
        if name == "renamed":
            (tmp_path / name / "data" / "clip0.wav").rename(tmp_path / name / "data" / "other0.wav")
        monkeypatch.chdir(tmp_path / name)
        moved = Trainer(small(tmp_path / "run", stage=1, steps=3, data__source="data", data__batch_size=2), log=quiet)
        with pytest.raises(ValueError, match=rf"checkpoint_00000002.pt: cannot resume on other data: data.source "
                                             rf"'data' {message}"):
            moved.fit()
    assert (tmp_path / "run" / "config.json").read_bytes() == record


def test_fresh_run_into_a_folder_with_checkpoints_is_refused(stage1_run):
    """Regression: run.resume=false in a folder holding another run's checkpoints used to train
    over them: same-step files were overwritten and keep_last pruned by name, mixing two runs."""
    names = sorted(p.name for p in checkpoints_in(stage1_run))
    with pytest.raises(ValueError, match="holds checkpoints of an earlier run .*run.resume=false"):
        Trainer(small(stage1_run, stage=1, steps=3, run__resume=False), log=quiet)
    assert sorted(p.name for p in checkpoints_in(stage1_run)) == names


def test_resume_without_init_keeps_the_ema_schedule(tmp_path, stage1_run, monkeypatch):
    """Regression: with ema.restart=false a run started from --init keeps the teacher's decay at
    ema.end; resumed without repeating --init (its weights come from the checkpoint) it used
    to switch to the annealed decay, so the teacher drifted from the uninterrupted run's."""
    init = str(checkpoints_in(stage1_run)[-1])

    def cfg(out, with_init=True):
        return small(out, stage=2, steps=4, run__ckpt_every=2, ema__restart=False, run__init=init if with_init else "")

    straight = Trainer(cfg(tmp_path / "a"), log=quiet)
    straight.fit()
    interrupt_after(Trainer(cfg(tmp_path / "b"), log=quiet), monkeypatch, 2)
    resumed = Trainer(cfg(tmp_path / "b", with_init=False), log=quiet)
    assert resumed.step == 2 and resumed.ema_decay() == resumed.cfg.ema.end
    resumed.fit()
    assert equal_weights(straight.model.teacher.encoder, resumed.model.teacher.encoder)
    assert equal_weights(straight.model.student, resumed.model.student)


@pytest.mark.skipif(not native.built(), reason="needs the C++ extension")
def test_resume_with_the_other_mask_drawer_says_so(tmp_path, monkeypatch):
    """The C++ and Python masks come from different random streams: a run resumed with the
    other one is not exact from there on, and its log says so."""
    Trainer(small(tmp_path, steps=3, run__ckpt_every=3), log=quiet).fit()
    lines = []
    monkeypatch.setenv("SSLAM_NATIVE", "0")
    Trainer(small(tmp_path, steps=3, run__ckpt_every=3), log=lines.append)
    assert any("drawn by the C++ extension before and by the Python reference now" in line for line in lines)


def test_stage2_two_processes_then_resume_in_one_with_accumulation(tmp_path):
    """Stage 2 (not covered by test_train's DDP test) on 2 gloo processes for 2 steps, resumed
    by one process accumulating the same 2 micro-batches -> the weights of one process that
    accumulated all along. The checkpoint records the number of processes, so a resume that
    would change the global batch (1 process, no accumulation) is refused."""
    import subprocess
    import sys

    one = Trainer(small(tmp_path / "one", stage=2, steps=3, optim__accum_steps=2), log=quiet)
    one.fit()
    script = tmp_path / "ddp.py"
    script.write_text(pretrain_script(small(tmp_path / "mixed", stage=2, steps=2)))
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             str(script)], capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert safe_torch_load(checkpoints_in(tmp_path / "mixed")[-1])["world_size"] == 2
    with pytest.raises(ValueError, match=r"optim.accum_steps x processes: 1 x 2 in the checkpoint, 1 x 1 now"):
        Trainer(small(tmp_path / "mixed", stage=2, steps=3), log=quiet)
    resumed = Trainer(small(tmp_path / "mixed", stage=2, steps=3, optim__accum_steps=2), log=quiet)
    assert resumed.step == 2
    resumed.fit()
    for a, b in ((one.model.student, resumed.model.student), (one.model.teacher.encoder, resumed.model.teacher.encoder)):
        theirs = b.state_dict()
        for k, v in a.state_dict().items():
            assert torch.allclose(v, theirs[k], atol=1e-5, rtol=1e-4), k


def test_a_one_process_checkpoint_resumes_under_fsdp(tmp_path):
    """One process saves the optimizer state by position, FSDP loads it by name: a run moved
    to 2 FSDP processes goes on as the one process would (to fp32 reduction order)."""
    import subprocess
    import sys

    one = Trainer(small(tmp_path / "one", steps=3, optim__accum_steps=2), log=quiet)
    one.fit()
    interrupted = Trainer(small(tmp_path / "moved", steps=2, optim__accum_steps=2, run__ckpt_every=2), log=quiet)
    interrupted.fit()
    saved = safe_torch_load(checkpoints_in(tmp_path / "moved")[-1])
    named = named_optimizer_state(saved["optimizer"], interrupted.model, interrupted.optimizer)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    expected = get_optimizer_state_dict(interrupted.model, interrupted.optimizer,
                                        options=StateDictOptions(full_state_dict=True))
    assert list(named["state"]) == list(expected["state"]) and named["param_groups"] == expected["param_groups"]
    script = tmp_path / "fsdp.py"
    script.write_text(pretrain_script(small(tmp_path / "moved", steps=3, run__parallel="fsdp")))
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             str(script)], capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    resumed = safe_torch_load(checkpoints_in(tmp_path / "moved")[-1])
    assert resumed["step"] == 3 and resumed["world_size"] == 2
    for k, v in one.model.student.state_dict().items():
        assert torch.allclose(v, resumed["model"][k], atol=1e-5, rtol=1e-4), k


def test_processes_that_find_different_newest_checkpoints_are_refused(tmp_path):
    """Each process lists the run folder itself. Where one sees an older listing (a shared
    filesystem's cache), DDP would keep their weights together but not their optimizer states,
    steps or data positions: the run stops, naming what each process found."""
    import subprocess
    import sys

    Trainer(small(tmp_path / "run", steps=2, optim__accum_steps=2, run__ckpt_every=1), log=quiet).fit()
    script = tmp_path / "ddp.py"
    stale_listing = ("import os, sslam.train\n"
                     "if os.environ['RANK'] == '1':\n"
                     "    listed = sslam.train.checkpoints_in\n"
                     "    sslam.train.checkpoints_in = lambda out: listed(out)[:-1]\n")
    script.write_text(stale_listing + pretrain_script(small(tmp_path / "run", steps=3)))
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             str(script)], capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                            timeout=120)  # unchecked, the processes ran different steps' collectives and hung
    assert result.returncode != 0
    assert "the processes found different checkpoints to resume: step 2 (process 0), step 1 (process 1)" in result.stderr
    assert [path.name for path in checkpoints_in(tmp_path / "run")] == ["checkpoint_00000001.pt", "checkpoint_00000002.pt"]


def test_processes_share_their_unreadable_files_and_stop_together(tmp_path):
    """Each process meets its own unreadable files: the count is the run's, so every process
    stops at the same step with the same message (one stopping alone left the other in a
    collective, failing with an unrelated error or, on NCCL, hanging)."""
    import subprocess
    import sys

    data = tmp_path / "data"
    data.mkdir()
    for i in range(8):
        sf.write(data / f"{i}.wav", np.random.default_rng(i).standard_normal(24000) * 0.1, 16000)
    for name in ("b0.wav", "b1.wav"):
        (data / name).write_bytes(b"not audio")
    script = tmp_path / "run.py"
    # The main process writes slowly, as a large model's checkpoint is written: the other one
    # must not stop (and its launcher end the run) before that write is done.
    slow_writes = ("import time\nimport sslam.train\nwrite = sslam.train.save_checkpoint\n"
                   "sslam.train.save_checkpoint = lambda *a, **k: (time.sleep(2), write(*a, **k))[1]\n")
    script.write_text(slow_writes + pretrain_script(small(tmp_path / "run", steps=20, data__source=str(data),
                                                          data__max_bad_files=1, data__batch_size=2)))
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             str(script)], capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                            timeout=300)
    assert result.returncode == 1
    assert result.stderr.count("2 unreadable files exceed data.max_bad_files=1") == 2, result.stderr[-3000:]
    assert "exitcode: -6" not in result.stderr and "SIGABRT" not in result.stderr
    assert "Connection reset" not in result.stderr
    # Both name the checkpoint of the last step, which the main process wrote.
    named = {line.split("saved as ")[1].split(": resume")[0] for line in result.stderr.splitlines() if "saved as " in line}
    assert len(named) == 1 and Path(named.pop()).is_file()


def test_a_process_group_made_by_the_caller_is_used(tmp_path, monkeypatch):
    """A caller's process group (torch.multiprocessing, a file store) gives the trainer its rank
    and size; WORLD_SIZE without RANK is a clear error, not a KeyError."""
    import torch.distributed as dist

    from sslam.runs import init_distributed

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(ValueError, match="WORLD_SIZE=2 but RANK is not set: launch the processes with torchrun"):
        init_distributed("cpu")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        assert init_distributed("cpu") == Dist(0, 1, 0)
    finally:
        dist.destroy_process_group()


# ---- initialising from checkpoints ----------------------------------------------------------


def test_init_stage2_from_own_stage1_with_and_without_teacher(tmp_path, stage1_run):
    """Our stage-1 checkpoint initialises student, decoder and teacher; without a teacher in
    the file the teacher starts as a copy of the student."""
    path = checkpoints_in(stage1_run)[-1]
    saved = read_checkpoint(path)
    trainer = Trainer(small(tmp_path / "with", stage=2, steps=1, run__init=str(path)), log=quiet)
    assert all(torch.equal(v, saved.state[k]) for k, v in trainer.model.student.state_dict().items())
    assert all(torch.equal(v, saved.teacher[k]) for k, v in trainer.model.teacher.encoder.state_dict().items())
    assert all(torch.equal(v, saved.decoder[k]) for k, v in trainer.model.decoder.state_dict().items())
    assert not equal_weights(trainer.model.student, trainer.model.teacher.encoder)  # EMA'd for 3 steps
    assert trainer.model.objective.stage == 2 and trainer.ema_decay() == pytest.approx(trainer.cfg.ema.start)

    raw = safe_torch_load(path)
    raw.pop("teacher")
    torch.save(raw, tmp_path / "no_teacher.pt")
    trainer = Trainer(small(tmp_path / "without", stage=2, steps=1, run__init=str(tmp_path / "no_teacher.pt")), log=quiet)
    assert equal_weights(trainer.model.student, trainer.model.teacher.encoder)
    trainer.fit()
    assert len(checkpoints_in(tmp_path / "without")) == 1


def test_init_from_a_run_folder_uses_its_newest_checkpoint(tmp_path, stage1_run):
    """Regression: `--init runs/s1` (the trainer's own usage line) failed with "folder without
    model.safetensors"; a run folder now means its newest checkpoint."""
    trainer = Trainer(small(tmp_path, stage=2, steps=1, run__init=str(stage1_run)), log=quiet)
    newest = read_checkpoint(checkpoints_in(stage1_run)[-1])
    assert all(torch.equal(v, newest.state[k]) for k, v in trainer.model.student.state_dict().items())


def test_a_run_folder_loads_as_its_newest_checkpoint(tmp_path, stage1_run, capsys):
    """`load_encoder("runs/s1")` and `sslam info runs/s1` were refused ("folder without
    model.safetensors") where `pretrain --init runs/s1` reads the newest checkpoint."""
    newest = checkpoints_in(stage1_run)[-1]
    for weights in ("student", "teacher"):
        ckpt, expected = read_checkpoint(stage1_run, weights), read_checkpoint(newest, weights)
        assert ckpt.path == newest and all(torch.equal(v, expected.state[k]) for k, v in ckpt.state.items())
    assert main(["info", str(stage1_run)]) == 0
    assert f"file:         {newest}" in capsys.readouterr().out
    # Converted, it records which checkpoint of the run it holds.
    assert f"student (of {stage1_run.name}/{newest.name}, converted)" in describe(convert(stage1_run, tmp_path / "exp"))


def test_init_size_comes_from_the_file_not_the_preset(tmp_path):
    """A checkpoint of another size than the preset's (width 48, depth 3 vs 32, 2) is built as
    the file says, with top_k = its depth, and trains."""
    Trainer(small(tmp_path / "s1", stage=1, steps=1, model__embed_dim=48, model__depth=3, model__num_heads=3),
            log=quiet).fit()
    init = str(checkpoints_in(tmp_path / "s1")[-1])
    trainer = Trainer(small(tmp_path / "s2", stage=2, steps=1, run__init=init), log=quiet)
    cfg = trainer.model.student.cfg
    assert (cfg.embed_dim, cfg.depth, cfg.num_heads, trainer.model.objective.top_k) == (48, 3, 3, 3)
    assert trainer.model.decoder.proj.out_features == 48
    assert all(np.isfinite(v) for v in trainer.fit().values())


def test_the_record_of_a_run_from_init_gives_the_file_s_sizes(tmp_path):
    """The printed config, config.json and the checkpoints' config named the preset's sizes
    (width 32, depth 2, 2 heads, decoder 16 wide here) for a model built as the file says: they
    now name the file's, and the same command resumes the run."""
    s1, s2 = tmp_path / "s1", tmp_path / "s2"
    Trainer(small(s1, stage=1, steps=1, model__embed_dim=48, model__depth=3, model__num_heads=3,
                  model__decoder_dim=24), log=quiet).fit()
    init = str(checkpoints_in(s1)[-1])
    lines = []
    Trainer(small(s2, stage=2, steps=1, run__init=init), log=lambda *a: lines.append(" ".join(map(str, a)))).fit()
    record = json.loads((s2 / "config.json").read_text())["model"]
    assert [record[k] for k in ("embed_dim", "depth", "num_heads", "decoder_dim")] == [48, 3, 3, 24]
    assert safe_torch_load(checkpoints_in(s2)[-1])["config"]["model"] == record
    printed = next(line for line in lines if line.startswith("[model]"))
    assert "embed_dim = 48" in printed and "depth = 3" in printed and "decoder_dim = 24" in printed, printed
    Trainer(small(s2, stage=2, steps=2, run__init=init), log=quiet).fit()  # the same command, resumed
    resumed = safe_torch_load(checkpoints_in(s2)[-1])
    assert resumed["step"] == 2 and resumed["config"]["model"] == record
    assert json.loads((s2 / "config.json").read_text())["model"] == record


def test_init_from_a_fine_tuned_model_pretrains_without_its_drop_path(tmp_path):
    """A fine-tuned export records drop-path 0.1; pretraining has none (SPEC 2.1), so the
    student built from it must not drop blocks (it used to, keeping the file's rate)."""
    from sslam.checkpoint import save_encoder

    tuned = Encoder(EncoderConfig(embed_dim=32, depth=2, num_heads=2, max_length=16, num_classes=3,
                                  drop_path_rate=0.1))
    tuned.preprocessing["target_length"] = 128
    save_encoder(tuned, tmp_path / "tuned")
    student = Trainer(small(tmp_path / "s2", stage=2, steps=1, run__init=str(tmp_path / "tuned")), log=quiet).model.student
    assert student.cfg.drop_path_rate == 0 and [b.drop_path_rate for b in student.blocks] == [0.0, 0.0]


def test_init_names_the_decoder_sizes_and_top_k_it_cannot_use(tmp_path, stage1_run):
    """The file's decoder is trained on: decoder settings that differ are logged as not used
    (they used to be dropped silently); a top_k beyond the file's depth names the option."""
    lines = []
    Trainer(small(tmp_path / "a", stage=2, steps=1, run__init=str(stage1_run), model__decoder_dim=24,
                  model__decoder_groups=2), log=lambda *a: lines.append(" ".join(map(str, a))))
    assert any("the decoder comes from" in line and "model.decoder_dim=24 (the file: 16)" in line
               and "model.decoder_groups=2 (the file: 4)" in line for line in lines), lines
    with pytest.raises(ValueError, match="objective.top_k=5 exceeds the depth 2 of run.init's encoder"):
        Trainer(small(tmp_path / "b", stage=2, steps=1, run__init=str(stage1_run), objective__top_k=5), log=quiet)
    # A window longer than the file's position table: named before the run starts (it failed at
    # its first step, with advice meant for embedding long audio).
    frames = read_checkpoint(stage1_run).config.max_frames
    with pytest.raises(ValueError, match=rf"data.target_length={frames + 16}: at most {frames} frames, the position "
                                         rf"table of run.init's encoder \("):
        Trainer(small(tmp_path / "c", stage=2, steps=1, run__init=str(stage1_run), data__target_length=frames + 16),
                log=quiet)
    assert not (tmp_path / "c").exists() or not any((tmp_path / "c").iterdir())


def test_init_with_other_patches_is_refused(tmp_path):
    """The features, mask grid and mixing windows are in 16 x 16 patches: an encoder of 8 x 8
    patches would be shown half of each clip, silently."""
    torch.save(Encoder(EncoderConfig(embed_dim=32, depth=2, num_heads=2, patch_size=8)).state_dict(),
               tmp_path / "p8.pt")
    with pytest.raises(ValueError, match="p8.pt: patch_size=8.*needs 16 x 16 patches"):
        Trainer(small(tmp_path / "run", stage=2, steps=1, run__init=str(tmp_path / "p8.pt")), log=quiet)


def test_init_uses_the_given_heads_where_the_file_has_none_and_names_the_sizes_it_ignores(tmp_path):
    bare = tmp_path / "bare.pt"  # the golden encoder (64 wide, 2 heads) as a bare state dict
    torch.save(read_checkpoint(GOLDEN / "tiny_ckpt.pt").state, bare)
    lines = []
    trainer = Trainer(small(tmp_path / "given", stage=2, steps=1, run__init=str(bare), model__num_heads=4),
                      log=lines.append)
    assert trainer.model.student.cfg.num_heads == trainer.model.teacher.encoder.cfg.num_heads == 4
    assert any("not used: model.embed_dim=32 (the file: 64)" in line for line in lines), lines
    # Sizes at the tiny preset's own values are not the user's: the file's heads are guessed.
    preset_sizes = dict(model__embed_dim=96, model__depth=4, model__num_heads=3)
    with pytest.warns(UserWarning, match="does not record num_heads.*assuming 2"):
        trainer = Trainer(small(tmp_path / "guessed", stage=2, steps=1, run__init=str(bare), **preset_sizes),
                          log=quiet)
    assert trainer.model.student.cfg.num_heads == 2
    # A file that states its heads keeps them, and the given value is reported as unused.
    lines.clear()
    trainer = Trainer(small(tmp_path / "stated", stage=2, steps=1, run__init=str(GOLDEN / "tiny_ckpt.pt"),
                            model__num_heads=4), log=lines.append)
    assert trainer.model.student.cfg.num_heads == 2
    assert any("model.num_heads=4 (the file: 2)" in line for line in lines), lines
    # Sizes the file replaces are not checked against the preset's heads (64 / 3 stopped the run).
    lines.clear()
    trainer = Trainer(small(tmp_path / "wide", stage=2, steps=1, run__init=str(GOLDEN / "tiny_ckpt.pt"),
                            model__embed_dim=100, model__num_heads=3), log=lines.append)
    assert trainer.model.student.cfg.embed_dim == 64
    assert any("model.embed_dim=100 (the file: 64)" in line for line in lines), lines


def test_init_decoder_weights_are_checked_like_the_encoders(tmp_path, stage1_run):
    raw = safe_torch_load(checkpoints_in(stage1_run)[-1])
    name = next(iter(raw["decoder"]))
    raw["decoder"][name] = torch.full_like(raw["decoder"][name], float("nan"))
    torch.save(raw, tmp_path / "nan_decoder.pt")
    with pytest.raises(CheckpointError, match=rf"nan_decoder\.pt: {name} is not a finite"):
        Trainer(small(tmp_path / "run", stage=2, steps=1, run__init=str(tmp_path / "nan_decoder.pt")), log=quiet)


def test_init_decoder_and_teacher_problems_are_named_as_the_official_file_names_them(tmp_path):
    """Regression: a bad decoder or teacher tensor of an official file was named under sslam's
    names only (blocks.0.0.weight, pre_norm.weight), which the file does not contain."""
    raw = safe_torch_load(GOLDEN / "tiny_ckpt.pt")
    decoder_key = "modality_encoders.IMAGE.decoder.blocks.0.0.weight"
    bad_decoder = dict(raw, model={**raw["model"], decoder_key: raw["model"][decoder_key] * float("nan")})
    torch.save(bad_decoder, tmp_path / "decoder.pt")
    with pytest.raises(CheckpointError, match=rf"decoder.pt: {decoder_key} \(sslam: blocks.0.0.weight\) is not a finite"):
        Trainer(small(tmp_path / "a", stage=2, steps=1, run__init=str(tmp_path / "decoder.pt")), log=quiet)
    norm = "modality_encoders.IMAGE.context_encoder.norm.weight"
    ema = {k: v for k, v in raw["model"]["_ema"].items() if k != norm}
    torch.save(dict(raw, model={**raw["model"], "_ema": ema}), tmp_path / "teacher.pt")
    with pytest.raises(CheckpointError, match=rf"(?s)teacher.pt \(its EMA teacher\).*missing keys \(1\): \['{norm} \(sslam: pre_norm.weight\)'\]"):
        Trainer(small(tmp_path / "b", stage=2, steps=1, run__init=str(tmp_path / "teacher.pt")), log=quiet)


def test_official_checkpoint_teacher_from_ema_or_from_student(tmp_path):
    """An official (fairseq) checkpoint's `_ema` becomes the teacher; the same file without
    `_ema` gives a teacher equal to the student."""
    official = read_checkpoint(GOLDEN / "tiny_ckpt.pt")
    trainer = Trainer(small(tmp_path / "ema", stage=2, steps=1, run__init=str(GOLDEN / "tiny_ckpt.pt")), log=quiet)
    teacher = trainer.model.teacher.encoder.state_dict()
    assert all(torch.equal(teacher[k], v.float()) for k, v in official.teacher.items() if k != "pos_embed")
    assert not equal_weights(trainer.model.student, trainer.model.teacher.encoder)

    raw = safe_torch_load(GOLDEN / "tiny_ckpt.pt")
    raw["model"] = {k: v for k, v in raw["model"].items() if k != "_ema"}
    torch.save(raw, tmp_path / "no_ema.pt")
    trainer = Trainer(small(tmp_path / "no_ema", stage=2, steps=1, run__init=str(tmp_path / "no_ema.pt")), log=quiet)
    assert equal_weights(trainer.model.student, trainer.model.teacher.encoder)
    assert all(torch.equal(trainer.model.student.state_dict()[k], v.float())
               for k, v in official.state.items() if k != "pos_embed")


def test_a_restarted_run_removes_what_a_killed_run_was_writing(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    stale = out / ".checkpoint_00000008.pt.a1b2c3.tmp"  # as large as a checkpoint, kept forever
    stale.write_bytes(b"half a checkpoint")
    Trainer(small(out, stage=1, steps=1), log=quiet)
    assert not stale.exists()


def test_a_damaged_init_teacher_is_named_as_the_teacher(tmp_path):
    raw = safe_torch_load(GOLDEN / "tiny_ckpt.pt")
    name = next(k for k in raw["model"]["_ema"] if k.startswith("blocks.0."))
    raw["model"]["_ema"][name] = torch.full_like(raw["model"]["_ema"][name], float("nan"))
    torch.save(raw, tmp_path / "nan_teacher.pt")
    with pytest.raises(CheckpointError, match=r"nan_teacher\.pt \(its EMA teacher\): blocks\.0\..* is not a finite"):
        Trainer(small(tmp_path / "run", stage=2, steps=1, run__init=str(tmp_path / "nan_teacher.pt")), log=quiet)


def test_a_damaged_init_teacher_block_list_is_named_as_the_file_names_it(tmp_path):
    """data2vec's ``ema_encoder_only`` teacher is a bare block list: ``0.norm1.weight``."""
    raw = safe_torch_load(GOLDEN / "tiny_ckpt.pt")
    raw["model"]["_ema"] = {k.removeprefix("blocks."): v for k, v in raw["model"]["_ema"].items() if k.startswith("blocks.")}
    raw["cfg"]["model"]["ema_encoder_only"] = True
    raw["model"]["_ema"]["0.norm1.weight"] = torch.full_like(raw["model"]["_ema"]["0.norm1.weight"], float("nan"))
    torch.save(raw, tmp_path / "nan_teacher.pt")
    with pytest.raises(CheckpointError, match=r"\(its EMA teacher\): 0\.norm1\.weight \(sslam: blocks\.0\.norm1\.weight\) is not a finite"):
        Trainer(small(tmp_path / "run", stage=2, steps=1, run__init=str(tmp_path / "nan_teacher.pt")), log=quiet)


def test_a_resume_accepts_settings_written_otherwise_that_compute_the_same(tmp_path):
    """objective.top_k=0 is every layer and run.precision=auto is fp32 on a CPU: naming them
    was refused as a changed setting."""
    out = tmp_path / "run"
    Trainer(small(out, stage=1, steps=2, run__ckpt_every=2), log=quiet).fit()
    resumed = Trainer(small(out, stage=1, steps=3, objective__top_k=2, run__precision="fp32"), log=quiet)
    assert resumed.step == 2
    with pytest.raises(ValueError, match=r"objective.top_k: 2 in the checkpoint, 1 now"):
        Trainer(small(out, stage=1, steps=3, objective__top_k=1), log=quiet)
    with pytest.raises(ValueError, match=r"run.precision: fp32 in the checkpoint \(run.precision='auto'\), fp16 now "
                                         r"\('fp16'\); --run.precision=fp32 resumes it"):
        Trainer(small(out, stage=1, steps=3, run__precision="fp16"), log=quiet)


def test_a_resume_with_other_max_steps_takes_the_new_schedules_lr_at_once(tmp_path):
    """optim.max_steps may change on resume; the saved optimizer held the old schedule's lr for
    the next step, which the first update after the resume then used."""
    from sslam.train import lr_factor

    out = tmp_path / "run"
    Trainer(small(out, stage=1, steps=4, run__ckpt_every=2), log=quiet).fit()
    cfg = small(out, stage=1, steps=12, run__ckpt_every=2)
    trainer = Trainer(cfg, log=quiet)
    expected = cfg.optim.lr * lr_factor(4, cfg.optim)
    assert expected != pytest.approx(cfg.optim.lr * lr_factor(4, small(out, stage=1, steps=4).optim))
    assert [group["lr"] for group in trainer.optimizer.param_groups] == pytest.approx([expected] * 2)


def test_a_fresh_run_keeps_another_runs_record_without_checkpoints(tmp_path):
    """A folder holding another run's config.json and metrics.jsonl but no checkpoint (its
    checkpoints removed, or an exported model's folder): a fresh start there overwrote the
    config and cut the metrics to nothing. It is refused, the files untouched; the same run
    started again (a run stopped before its first checkpoint) goes on."""
    out = tmp_path / "run"
    Trainer(small(out, stage=1, steps=3), log=quiet).fit()
    for path in out.glob("checkpoint_*.pt"):
        path.unlink()
    kept = {name: (out / name).read_bytes() for name in ("config.json", "metrics.jsonl")}
    with pytest.raises(ValueError, match=r"run holds the record of another run and no checkpoint: config.json "
                                         r"with other settings \(run.seed: 1 in config.json, 5 now\)"):
        Trainer(small(out, stage=1, steps=3, run__seed=5, run__resume=False), log=quiet)
    assert {name: (out / name).read_bytes() for name in kept} == kept
    Trainer(small(out, stage=1, steps=3), log=quiet).fit()  # the same run, started again
    assert [r["step"] for r in records(out)] == [2, 3]
    for path in out.glob("checkpoint_*.pt"):
        path.unlink()
    (out / "metrics.jsonl").write_text("")  # an attempt that stopped before logging a step
    Trainer(small(out, stage=1, steps=3, run__seed=5), log=quiet)
    # The accumulation may change (the processes of the attempt are not recorded, so the split
    # of its global batch is not known); a start without the record's run.init may not.
    Trainer(small(out, stage=1, steps=3, optim__accum_steps=2), log=quiet).fit()
    for path in out.glob("checkpoint_*.pt"):
        path.unlink()
    Trainer(small(out, stage=1, steps=3), log=quiet)
    config = json.loads((out / "config.json").read_text())
    config["run"]["init"] = str(tmp_path / "s1")
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"run.init: '.*s1' in config.json, '' now"):
        Trainer(small(out, stage=1, steps=3), log=quiet)
    export = tmp_path / "export"
    from sslam.checkpoint import save_encoder

    save_encoder(Encoder(EncoderConfig(embed_dim=32, depth=1, num_heads=2, max_length=8)), export)
    before = (export / "config.json").read_bytes()
    with pytest.raises(ValueError, match=r"export holds config.json of something else than a pretraining run"):
        Trainer(small(export, stage=1, steps=2), log=quiet)
    assert (export / "config.json").read_bytes() == before
    # Nested deeper than the JSON parser recurses: refused the same way (a RecursionError before).
    deep = tmp_path / "deep"
    deep.mkdir()
    (deep / "config.json").write_text("[" * 200_000 + "]" * 200_000)
    with pytest.raises(ValueError, match=r"deep holds config.json of something else than a pretraining run"):
        Trainer(small(deep, stage=1, steps=2), log=quiet)


def test_hostile_or_truncated_init_is_refused_and_the_folder_is_untouched(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    data = (GOLDEN / "tiny_ckpt.pt").read_bytes()
    (tmp_path / "truncated.pt").write_bytes(data[: len(data) // 2])

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))

    torch.save({"model": {"x": Evil()}}, tmp_path / "evil.pt")
    (tmp_path / "empty.pt").write_bytes(b"")
    for name, message in [("truncated.pt", "truncated or damaged zip archive"), ("evil.pt", "refusing to load"),
                          ("empty.pt", "empty file"), ("missing.pt", "no such file")]:
        with pytest.raises(CheckpointError, match=f"{name}: {message}"):
            Trainer(small(out, stage=2, steps=1, run__init=str(tmp_path / name)), log=quiet)
    assert not (tmp_path / "pwned").exists()
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"] and (out / "notes.txt").read_text() == "keep me"


def test_init_from_a_finetuned_checkpoint_drops_the_head(tmp_path):
    """Regression: a fine-tuned checkpoint's classification head used to join pretraining as a
    trainable parameter without gradient (DDP stops on those) and ride into every checkpoint."""
    train, test = synth_split("poly", True, 8), synth_split("poly", False, 4)
    encoder = Encoder(EncoderConfig(embed_dim=32, depth=2, num_heads=2, max_length=16))
    encoder.preprocessing = {"sample_rate": 16000, "target_length": 128, "norm": "audioset"}
    Finetuner(encoder, train, test, FinetuneConfig(steps=1, warmup=0, batch_size=4, out=str(tmp_path / "ft"), workers=0),
              log=quiet).fit()
    fresh = Trainer(small(tmp_path / "fresh", stage=2, steps=1), log=quiet)
    trainer = Trainer(small(tmp_path / "s2", stage=2, steps=1, run__init=str(tmp_path / "ft")), log=quiet)
    assert trainer.model.student.cfg.num_classes == 0
    assert {k for k, _ in trainer.model.named_parameters()} == {k for k, _ in fresh.model.named_parameters()}
    trainer.fit()
    assert read_checkpoint(checkpoints_in(tmp_path / "s2")[-1]).config.num_classes == 0


def test_settings_that_would_fail_late_are_refused_up_front(tmp_path, monkeypatch):
    """Each failed only once the model was built and the run folder written (or, for an empty
    data source, trained on the current folder)."""
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a))
    for key, value, message in [("run.tensorboard", True, "run.tensorboard=true needs the tensorboard package"),
                                ("data.source", " ", "data.source is empty"),
                                ("data.synth_seconds", 0.05, r"data.synth_seconds=0.05 must be .* at least 0.1")]:
        cfg = small(tmp_path / "run", stage=1, steps=2)
        set_option(cfg, key, value)
        with pytest.raises(ValueError, match=message):
            validate(cfg)


def test_a_data_source_smaller_than_the_global_batch_is_named(tmp_path):
    for i in range(3):
        sf.write(tmp_path / f"c{i}.wav", np.full(16000, 0.1), 16000)
    cfg = small(tmp_path / "run", stage=1, steps=2, data__source=str(tmp_path))
    with pytest.raises(ValueError, match=r"data.batch_size=4 x 1 process\(es\) x 1 accumulation step\(s\): a global "
                                         r"batch of 4 clips, more than the 3 of the data"):
        Trainer(cfg, log=quiet).fit()


def test_a_resume_past_max_steps_is_refused(tmp_path):
    """Resumed at step 4 with optim.max_steps=2: it did nothing and said nothing."""
    out = tmp_path / "run"
    Trainer(small(out, stage=1, steps=4, run__ckpt_every=2), log=quiet).fit()
    with pytest.raises(ValueError, match=r"checkpoint_00000004.pt: the run is at step 4, past optim.max_steps=2"):
        Trainer(small(out, stage=1, steps=2, run__ckpt_every=2), log=quiet)


# ---- model sizes and clip lengths -----------------------------------------------------------


@pytest.mark.parametrize("name, encoder, decoder, kept, top_k", [
    ("base", 85_254_144, 2_585_856, 102, 12),  # SPEC 2.1: ViT-B, 87.84M trainable with the decoder
    ("large", 302_575_616, 5_967_872, 128, 24),  # SPEC 2.3: ViT-L, 308.5M
])
def test_presets_have_the_official_sizes(name, encoder, decoder, kept, top_k):
    for stage in (1, 2):
        cfg = preset(name, stage)
        validate(cfg)
        enc = encoder_config(cfg)
        objective = objective_config(cfg, enc.depth)
        with torch.device("meta"):  # shapes only
            n_enc = sum(p.numel() for p in Encoder(enc).parameters() if p.requires_grad)
            n_dec = sum(p.numel() for p in CNNDecoder(enc.embed_dim, objective.decoder).parameters())
        assert (n_enc, n_dec, objective.top_k) == (encoder, decoder, top_k)
        mask = MaskConfig(grid=(cfg.data.target_length // 16, 8), mask_prob=cfg.objective.mask_prob,
                          mask_prob_adjust=cfg.objective.mask_prob_adjust, mask_length=cfg.objective.mask_length)
        assert mask.num_kept == kept


def test_width_and_depth_overrides_of_a_preset():
    cfg = preset("base", 2)
    for key, value in [("model.embed_dim", "384"), ("model.depth", "5"), ("model.num_heads", "6"),
                       ("model.decoder_dim", "192"), ("model.decoder_groups", "8")]:
        set_option(cfg, key, value)
    validate(cfg)
    enc = encoder_config(cfg)
    assert (enc.embed_dim, enc.depth, enc.num_heads, enc.mlp_dim) == (384, 5, 6, 1536)
    objective = objective_config(cfg, enc.depth)
    assert objective.top_k == 5 and objective.clones == 8
    with torch.device("meta"):
        decoder = CNNDecoder(enc.embed_dim, objective.decoder)
    assert decoder.blocks[0][0].in_channels == 384 and decoder.proj.out_features == 384


@pytest.mark.parametrize("frames", [112, 208])
def test_odd_clip_lengths_through_both_objectives(tmp_path, frames):
    """7 and 13 patch rows (odd, prime): masks, mixing windows, the partner pass and the SRL
    stitching all follow the grid; every loss term is finite."""
    for stage in (1, 2):
        cfg = small(tmp_path / f"s{stage}", stage=stage, steps=1, data__target_length=frames,
                    data__synth_seconds=frames / 100 + 0.1)
        trainer = Trainer(cfg, log=quiet)
        values = trainer.fit()
        assert trainer.mask_cfg.grid == (frames // 16, 8)
        assert all(np.isfinite(values[k]) for k in ("loss", "frame", "cls"))
        assert ("srl" in values) == (stage == 2)


# ---- config validation ----------------------------------------------------------------------


@pytest.mark.parametrize("key, value, stage, message", [
    ("objective.mask_prob", "1.0", 1, r"objective.mask_prob=1.0 must lie in \(0, 1\)"),
    ("objective.mask_prob", "0", 1, "objective.mask_prob"),
    ("objective.clones", "0", 1, "objective.clones"),
    ("data.batch_size", "0", 1, "data.batch_size=0 must be >= 1"),
    ("optim.accum_steps", "-1", 1, "optim.accum_steps=-1 must be >= 1"),
    ("optim.beta2", "-0.5", 1, "optim.beta2=-0.5 must lie"),
    ("data.batch_size", "1", 2, "data.batch_size >= 2"),
    ("optim.lr", "-1e-3", 1, "optim.lr=-0.001"),
    ("optim.lr", "nan", 1, "optim.lr: must be finite"),
    ("optim.min_lr", "-1", 1, "optim.min_lr=-1.0"),
    ("optim.beta2", "1.0", 1, "optim.beta2"),
    ("optim.weight_decay", "-0.1", 1, "optim.weight_decay"),
    ("objective.cls_loss", "inf", 1, "objective.cls_loss: must be finite"),
    ("objective.srl_weight", "-2", 2, "objective.srl_weight"),
    ("ema.start", "1.5", 1, "ema.start=1.5"),
    ("ema.end", "-0.1", 1, "ema.end=-0.1"),
    ("objective.mix_width", "40", 2, "objective.mix_width=40 must be a positive multiple of 16"),
    ("objective.mix_width", "64", 2, "objective.mix_width=64 does not fit data.target_length=128"),
    ("model.decoder_layers", "0", 1, "decoder_layers must be >= 1"),
    ("model.depth", "-1", 1, "model.embed_dim, depth and num_heads"),
    ("data.target_length", "998", 1, "data.target_length must be a .*multiple of 16"),
    ("data.target_length", "0", 1, "data.target_length"),
    ("run.device", "tpu", 1, "run.device='tpu'"),
    ("run.checkpoint_blocks", "true", 1, "run.checkpoint_blocks='true': one of"),
    ("run.precision", "bf16-true", 1, "run.precision='bf16-true': one of .*bf16-pure"),
    ("run.max_bad_steps", "0", 1, "run.max_bad_steps"),
    ("data.max_bad_files", "-1", 1, "data.max_bad_files"),
    ("model.num_heads", "3", 1, "model.embed_dim / model.num_heads: embed_dim=32 is not divisible by num_heads=3"),
    ("model.decoder_groups", "3", 1, "model.decoder_dim=16 is not divisible by model.decoder_groups=3"),
    ("model.decoder_kernel", "4", 1, "model.decoder_kernel=4 must be odd"),
    ("objective.top_k", "3", 1, r"objective.top_k=3 exceeds the encoder depth 2 \(model.depth\)"),
    ("run.seed", str(2**64), 1, r"run.seed must lie in \[0, 2\*\*63\)"),
])
def test_impossible_settings_are_refused_naming_the_key(tmp_path, key, value, stage, message):
    """Regression for most rows: they used to pass validation and then fail deep in the run
    without naming the setting (a negative lr in AdamW, a mix width at the first step, a
    decoder of 0 layers as a matmul shape error) or train silently wrong (an EMA decay above 1,
    a negative lr at the end of the cosine, a negative loss weight)."""
    cfg = small(tmp_path, stage=stage, steps=1)
    set_option(cfg, key, value)
    with pytest.raises(ValueError, match=message):
        validate(cfg)
    with pytest.raises(ValueError, match=message):
        Trainer(cfg, log=quiet)
    assert not checkpoints_in(tmp_path)


def test_values_that_are_not_strings_are_type_checked():
    """Regression: set_option / TrainConfig.from_dict took non-string values unchecked (a
    batch size of 2.5, an lr of True); integral floats still give ints."""
    cfg = preset("tiny", 1)
    with pytest.raises(ValueError, match=r"--data.batch_size=2.5: expected an integer"):
        set_option(cfg, "data.batch_size", 2.5)
    with pytest.raises(ValueError, match=r"--optim.lr=True: expected a number"):
        TrainConfig.from_dict({"optim": {"lr": True}})
    with pytest.raises(ValueError, match=r"--run.compile=1: expected true or false"):
        set_option(cfg, "run.compile", 1)
    with pytest.raises(ValueError, match=r"--model.variant=5: expected text"):
        set_option(cfg, "model.variant", 5)
    set_option(cfg, "optim.max_steps", 2e5)
    set_option(cfg, "optim.lr", 1)
    assert cfg.optim.max_steps == 200_000 and isinstance(cfg.optim.max_steps, int)
    assert cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float)
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg


# ---- evaluation -----------------------------------------------------------------------------


def tiny_encoder(num_classes: int = 0) -> Encoder:
    torch.manual_seed(0)
    enc = Encoder(EncoderConfig(embed_dim=32, depth=2, num_heads=2, max_length=16, num_classes=num_classes)).eval()
    enc.preprocessing = {"sample_rate": 16000, "target_length": 128, "norm": "audioset"}
    return enc


def test_finetune_with_fewer_clips_than_a_batch_is_refused(tmp_path):
    """Regression: a training split smaller than the batch made every epoch yield no batch
    (the incomplete last one is dropped) and Finetuner.fit looped forever."""
    train, test = synth_split("poly", True, 3), synth_split("poly", False, 4)
    cfg = FinetuneConfig(steps=2, warmup=0, batch_size=4, out=str(tmp_path), workers=0)
    with pytest.raises(ValueError, match=r"poly_train: 3 training clip\(s\) per process per epoch, fewer than batch_size=4"):
        Finetuner(tiny_encoder(), train, test, cfg, log=quiet)
    assert not any(tmp_path.iterdir())


def test_empty_splits_are_refused_clearly(tmp_path):
    """Regression: an empty split failed as "torch.cat(): expected a non-empty list of Tensors"
    (linear probe) or hung (fine-tuning on an empty train split)."""
    train = synth_split("mono", True, 6)
    empty = LabeledSplit("nothing", [], torch.zeros(0, train.targets.shape[1]), list(train.class_names), False)
    cfg = FinetuneConfig(steps=1, warmup=0, batch_size=2, out=str(tmp_path), workers=0)
    for a, b, role in [(train, empty, "score"), (empty, train, "train on")]:
        with pytest.raises(ValueError, match=f"split 'nothing' is empty: no clips to {role}"):
            linear_probe(tiny_encoder(), a, b, ProbeConfig(epochs=1, batch_size=2))
        with pytest.raises(ValueError, match=f"split 'nothing' is empty: no clips to {role}"):
            Finetuner(tiny_encoder(), a, b, cfg, log=quiet)


def test_finetuning_a_finetuned_encoder_gets_a_fresh_head(tmp_path):
    """Regression: an encoder that already has a head (e.g. the AS-2M fine-tuned model) could
    not be fine-tuned on a task with another number of classes (size mismatch of head.weight),
    and one with as many classes silently kept the old head instead of a fresh one."""
    five = tiny_encoder(num_classes=5)
    with torch.no_grad():
        five.head.weight.fill_(1.0)
    model = with_head(five, [f"c{i}" for i in range(12)], drop_path=0.1)
    assert model.head.weight.shape == (12, 32) and torch.equal(model.blocks[1].mlp.fc2.weight, five.blocks[1].mlp.fc2.weight)
    same = with_head(five, [f"c{i}" for i in range(5)], drop_path=0.1)
    assert not torch.equal(same.head.weight, five.head.weight) and torch.all(same.head.bias == 0)
    train, test = synth_split("mono", True, 8), synth_split("mono", False, 4)
    result = Finetuner(five, train, test, FinetuneConfig(steps=1, warmup=0, batch_size=4, out=str(tmp_path), workers=0),
                       log=quiet).fit()
    assert 0 <= result["accuracy"] <= 1


def test_probe_and_finetune_odd_class_counts_and_label_kinds(tmp_path):
    """Regression (multilabel): 5 classes over 7 clips; a train CSV whose rows happen to carry
    one label each with a multi-label test CSV -- the probe used to pick softmax + accuracy
    from the train split alone (scoring multi-hot targets by their first class) while the
    fine-tuner used BCE + mAP; both are multi-label now."""
    audio = tmp_path / "audio"
    audio.mkdir()
    for i in range(7):
        sf.write(audio / f"{i}.wav", np.random.default_rng(i).standard_normal(12000 + 900 * i) * 0.1, 16000)
    names = ["a", "b", "c", "d", "e"]
    (tmp_path / "train.csv").write_text("path,labels\n" + "".join(f"audio/{i}.wav,{names[i % 5]}\n" for i in range(7)))
    (tmp_path / "test.csv").write_text('path,labels\naudio/0.wav,"a;c"\naudio/1.wav,b\naudio/2.wav,e\n')
    train = read_csv_split(tmp_path / "train.csv")
    test = read_csv_split(tmp_path / "test.csv", class_names=train.class_names)
    assert not train.multilabel and test.multilabel and train.targets.shape == (7, 5)
    result = linear_probe(tiny_encoder(), train, test, ProbeConfig(epochs=2, batch_size=3), seeds=range(2))
    assert result["metric"] == "mAP" and 0 < result["mean"] <= 1 and len(result["per_seed"]) == 2
    full = linear_probe(tiny_encoder(), train, test, ProbeConfig(epochs=1, batch_size=3, fast=False), seeds=[0])
    assert full["metric"] == "mAP"
    single = linear_probe(tiny_encoder(), train, train, ProbeConfig(epochs=1, batch_size=3))
    assert single["metric"] == "accuracy" and 0 <= single["mean"] <= 1
    ft = Finetuner(tiny_encoder(), train, test, FinetuneConfig(steps=2, warmup=1, batch_size=3, eval_every=2,
                                                               out=str(tmp_path / "ft"), workers=0), log=quiet)
    assert ft.multilabel and "mAP" in ft.fit()


def test_a_damaged_newest_checkpoint_names_the_previous_one(tmp_path):
    Trainer(small(tmp_path, stage=1, steps=4, run__ckpt_every=2), log=quiet).fit()
    saved = checkpoints_in(tmp_path)
    assert len(saved) == 2
    data = saved[-1].read_bytes()
    saved[-1].write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=rf"truncated.*previous checkpoint, {saved[-2].name}, may be intact"):
        Trainer(small(tmp_path, stage=1, steps=6, run__ckpt_every=2), log=quiet)


def test_a_damaged_newest_finetuning_checkpoint_names_the_previous_one(tmp_path):
    """Regression: fine-tuning said only that its newest checkpoint was damaged, not that the
    one before it may be intact (pretraining did)."""
    train, test = synth_split("poly", True, 6, seconds=1.0), synth_split("poly", False, 3, seconds=1.0)
    cfg = FinetuneConfig(steps=2, warmup=0, batch_size=3, eval_every=1, ckpt_every=1, keep_last=2,
                         out=str(tmp_path), workers=0)
    Finetuner(tiny_encoder(), train, test, cfg, log=quiet).fit()
    saved = checkpoints_in(tmp_path)
    assert len(saved) == 2
    data = saved[-1].read_bytes()
    saved[-1].write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=rf"truncated.*previous checkpoint, {saved[-2].name}, may be intact"):
        Finetuner(tiny_encoder(), train, test, cfg, log=quiet)
    saved[-1].rename(tmp_path / "damaged.pt")  # what the message says: it resumes from the one before
    assert Finetuner(tiny_encoder(), train, test, cfg, log=quiet).step == 1


def test_a_process_that_finds_no_readable_file_stops_every_process_at_the_same_step(tmp_path):
    """Under 2 processes, one meets a clip whose every try is unreadable: it stopped alone,
    before the step's collectives, and the other failed in its backward ("Connection closed by
    peer") or, with NCCL, hung. Both now stop at that step, with the same one-line message."""
    import subprocess
    import sys

    for i in range(16):
        sf.write(tmp_path / f"{i:02d}.wav", np.random.default_rng(i).uniform(-0.3, 0.3, 16000), 16000)
    cfg = small(tmp_path / "run", stage=1, steps=3, data__source=str(tmp_path), data__batch_size=2)
    script = tmp_path / "ddp.py"
    script.write_text(
        "import os\nimport sslam.data as data\nreal = data.AudioFiles.__getitem__\n"
        "def exhausted(self, index):\n"
        "    if os.environ['RANK'] == '0':  # every try of this rank's first clip fails\n"
        "        return None, index, [(f'gone{i}.wav', f'gone{i}.wav: unreadable') for i in range(3)]\n"
        "    return real(self, index)\n"
        "data.AudioFiles.__getitem__ = exhausted\n" + pretrain_script(cfg))
    # Two processes started by hand, not by torchrun, whose agent would end the second as soon
    # as the first stopped (hiding whether it stops by itself).
    import socket

    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
           "WORLD_SIZE": "2"}
    ranks = [subprocess.Popen([sys.executable, str(script)], stderr=subprocess.PIPE, text=True,
                              env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}) for r in (0, 1)]
    errors = [rank.communicate(timeout=300)[1] for rank in ranks]
    # 1, not SIGABRT: a stopped distributed run leaves as a finished one does, skipping the
    # interpreter's shutdown, where gloo's worker threads could abort the process ("terminate
    # called without an active exception", see sslam.runs.finish_distributed).
    assert [rank.returncode for rank in ranks] == [1, 1], errors
    stops = [[line for line in err.splitlines() if "audio files of the data is unreadable" in line] for err in errors]
    assert [len(lines) for lines in stops] == [1, 1] and stops[0] == stops[1], errors
    assert not any("Traceback" in err for err in errors), errors


def test_checkpoints_past_step_99_999_999_are_found_kept_and_pruned_in_order(tmp_path):
    """Names are zero-padded to 8 digits: step 10**8 writes 9, which the pattern (exactly 8)
    did not match, so such a run neither resumed nor pruned its checkpoints."""
    from sslam.runs import save_checkpoint

    for step in (99_999_999, 100_000_000, 100_000_001):
        save_checkpoint(tmp_path, step, {"step": step}, keep_last=2)
    assert [p.name for p in checkpoints_in(tmp_path)] == ["checkpoint_100000000.pt", "checkpoint_100000001.pt"]
    assert safe_torch_load(checkpoints_in(tmp_path)[-1]) == {"step": 100_000_001}


def test_fsdp_gathers_the_teacher_on_every_path_a_gpu_step_takes(tmp_path, monkeypatch):
    """On a GPU the stage-2 teacher embeds the fused kernel's patches (embed_patches) and packs
    its two passes in one (forward_packed, taken with the Triton attention): FSDP gathered its
    own weights only in patchify_embed and forward_tokens, so the first step met a sharded
    weight and crashed. Here in one gloo process (the packed attention by its reference): the
    same loss as unsharded."""
    import copy

    import torch.distributed as dist

    from sslam.features import patchify, preprocess
    from sslam.masking import clone_masks, kept_indices
    from sslam.mixing import sample_windows
    from sslam.pretrain import Pretrainer
    from sslam.train import shard_pretrainer
    from sslam.train_config import encoder_config, mask_config, objective_config, preset

    monkeypatch.setenv("SSLAM_KERNELS", "0")
    cfg = preset("tiny", 2)
    cfg.data.target_length, cfg.objective.mix_width = 128, 32
    torch.manual_seed(0)
    model = Pretrainer(encoder_config(cfg), objective_config(cfg, encoder_config(cfg).depth)).train()
    model.teacher.encoder.set_attention("triton")  # what "auto" picks on a GPU: the passes pack
    unsharded = copy.deepcopy(model)
    waves = 0.1 * torch.randn(2, 127 * 160 + 400)
    patches = patchify(preprocess(waves, 16000, cfg.data.target_length))  # what fbank_patch gives
    keep, _ = kept_indices(clone_masks(2, model.objective.clones, mask_config(cfg), 0))
    windows = sample_windows(cfg.data.target_length, cfg.objective.mix_width, generator=torch.Generator().manual_seed(1))
    expected = unsharded(patches, keep, windows=windows, generator=torch.Generator().manual_seed(2)).total
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        losses = shard_pretrainer(model)(patches, keep, windows=windows, generator=torch.Generator().manual_seed(2))
        losses.total.backward()
    finally:
        dist.destroy_process_group()
    torch.testing.assert_close(losses.total, expected)
