"""The command line's handling of user mistakes: one line naming the argument, exit status 2,
never a traceback; and options reach the setting they name."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import sslam.train
from sslam.cli import build_parser, main


def test_options_are_not_abbreviated():
    """`evaluate finetune --seed=3` sets FinetuneConfig.seed (an override), not --seeds."""
    args, extra = build_parser().parse_known_args(
        ["evaluate", "finetune", "--checkpoint", "c", "--train", "a.csv", "--test", "b.csv", "--seed=3"])
    assert args.seeds == 1 and extra == ["--seed=3"]


def test_seeds_are_checked_before_any_work(capsys):
    argv = ["evaluate", "linear", "--checkpoint", "missing.pt", "--train", "synth:mono", "--test", "synth:mono"]
    assert main([*argv, "--seeds", "0"]) == 2
    assert "--seeds=0: must be >= 1" in capsys.readouterr().err
    # The settings too: they were read after the checkpoint and every clip of both splits.
    for mode, option, message in (("linear", "--lr=-1", "lr=-1.0: must be a finite number >= 0"),
                                  ("finetune", "--layer_decay=1.5", "layer_decay=1.5: must be in [0, 1]"),
                                  ("finetune", "--foo=1", "--foo: unknown option"),
                                  ("finetune", "--seed=99999999999999999999", "seed=99999999999999999999: must be in [0, 9223372036854775807]"),
                                  ("finetune", "--workers=99999999999999999999", "workers=99999999999999999999: must be in [0, 1024]")):
        assert main(["evaluate", mode, *argv[2:], option]) == 2
        assert message in capsys.readouterr().err


@pytest.mark.parametrize("mode, options, unused", [
    ("linear", ["--out", "runs/x"], "--out (fine-tuning's run folder"),
    ("finetune", ["--seeds", "5"], "--seeds (linear probes"),
    ("finetune", ["--full"], "--full (linear probes)"),
    ("linear", ["--full", "--fast=true"], "--fast with --full"),
    ("linear", ["--root", "/data"], "--root (the root of .tsv manifests"),
    ("finetune", ["--label-descriptors", "classes.csv"], "--label-descriptors (synthetic splits"),
    ("linear", ["--mixup=0.3", "--drop_path=0.5"], "--drop_path, --mixup (the augmentations and stochastic depth of "
                                                   "--full; the default probe trains a head on cached features)"),
    ("linear", ["--roll=false", "--fast=true"], "--roll (the augmentations"),
])
def test_evaluate_options_the_mode_or_splits_do_not_read_are_refused(capsys, mode, options, unused):
    """Each was silently ignored (a linear probe with --out wrote nothing there; --seeds 5
    fine-tuned once), after the checkpoint and both splits were read."""
    argv = ["evaluate", mode, "--checkpoint", "missing.pt", "--train", "synth:mono", "--test", "synth:mono"]
    assert main([*argv, *options]) == 2
    assert f"not used by evaluate {mode} with these splits: {unused}" in capsys.readouterr().err


def test_evaluate_full_probe_takes_its_augmentations(capsys):
    """--full (or --fast=false) reads them: they get as far as the checkpoint."""
    argv = ["evaluate", "linear", "--checkpoint", "missing.pt", "--train", "synth:mono", "--test", "synth:mono"]
    for options in (["--full", "--mixup=0.3"], ["--fast=false", "--noise=true", "--mask_ratio=0.1"]):
        assert main([*argv, *options]) == 2
        assert "missing.pt" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [
    ["pretrain", "--preset", "tiny", "--optim.max_steps=1"],
    ["demo", "--quick"],
    # The checkpoint is never read: the output is checked first, with the settings.
    ["evaluate", "finetune", "--checkpoint", "missing.pt", "--train", "synth:mono", "--test", "synth:mono"],
    ["extract", "clips/", "--checkpoint", "missing.pt"],
])
@pytest.mark.parametrize("under", ["", "sub"])
def test_an_output_path_that_is_a_file_is_one_line(tmp_path, capsys, argv, under):
    """Regression: a run folder that was a file (or under one) failed with "[Errno 17] File
    exists" (or "Not a directory"), once the model and the data were ready."""
    (tmp_path / "afile").write_text("")
    out = tmp_path / "afile" / under if under else tmp_path / "afile"
    assert main([*argv, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"sslam: error: --out {out}: ") and "Traceback" not in err
    assert f"{tmp_path / 'afile' if under else 'it'} is not a folder" in err


@pytest.mark.parametrize("argv", [
    ["pretrain", "--preset", "tiny", "--optim.max_steps=1"],
    ["demo", "--quick"],
    ["evaluate", "finetune", "--checkpoint", "missing.pt", "--train", "synth:mono", "--test", "synth:mono"],
    ["extract", "clips/", "--checkpoint", "missing.pt"],
])
def test_an_empty_or_unwritable_output_is_refused_before_any_work(tmp_path, capsys, monkeypatch, argv):
    """An empty --out was taken as the default folder (runs/pretrain, runs/finetune); a folder
    that cannot be made under a read-only one failed once the model and data were ready."""
    monkeypatch.chdir(tmp_path)
    assert main([*argv, "--out", ""]) == 2
    assert ("run.out must name a folder" if argv[0] == "pretrain" else "--out is empty") in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode, **kw: Path(path) != tmp_path and real_access(path, mode, **kw))
    assert main([*argv, "--out", str(tmp_path / "new" / "run")]) == 2
    assert f"--out {tmp_path / 'new' / 'run'}: cannot be made in {tmp_path}, which is not writable" in capsys.readouterr().err


def test_an_empty_data_source_is_not_the_default(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["pretrain", "--preset", "tiny", "--data", "", "--optim.max_steps=1"]) == 2
    assert "data.source is empty" in capsys.readouterr().err
    assert main(["pretrain", "--preset", "tiny", "--out", "", "--optim.max_steps=1"]) == 2
    assert "run.out must name a folder" in capsys.readouterr().err


def test_a_pretraining_run_refused_for_its_data_leaves_no_folder(tmp_path, capsys):
    """A start that fails on its data wrote nothing: it leaves no empty run folder behind."""
    (tmp_path / "no_audio").mkdir()
    for data, reason in (("nowhere.tsv", "no such file or folder"), ("no_audio", "no audio files")):
        out = tmp_path / "runs" / data
        assert main(["pretrain", "--preset", "tiny", "--data", str(tmp_path / data), "--out", str(out)]) == 2
        assert reason in capsys.readouterr().err
        assert not out.exists()


def test_an_npz_output_that_is_a_folder_is_refused_before_any_work(tmp_path, capsys):
    (tmp_path / "emb.npz").mkdir()
    assert main(["extract", "clips/", "--checkpoint", "missing.pt", "--out", str(tmp_path / "emb.npz")]) == 2
    assert "it is a folder, and an output ending in .npz is one file" in capsys.readouterr().err
    # Under a file: the .npz's folder is named.
    (tmp_path / "afile").write_text("")
    assert main(["extract", "clips/", "--checkpoint", "missing.pt", "--out", str(tmp_path / "afile" / "e.npz")]) == 2
    assert f"{tmp_path / 'afile'} is not a folder" in capsys.readouterr().err


def test_the_torchrun_entry_point_reports_errors_as_sslam_pretrain(capsys):
    assert sslam.train.main(["--preset", "tiny", "--optim.lr=abc"]) == 2
    assert "--optim.lr='abc': expected a number" in capsys.readouterr().err


def test_python_dash_m_sslam_is_the_command():
    done = subprocess.run([sys.executable, "-m", "sslam", "info", "--help"], capture_output=True, text=True)
    assert done.returncode == 0 and "usage: sslam info" in done.stdout


def test_evaluate_under_torchrun_puts_each_process_on_its_own_gpu(monkeypatch):
    """LOCAL_RANK picks the GPU (DDP needs distinct ones); every process took cuda:0."""
    import sslam.evaluate

    chosen = []

    class Loaded(Exception):
        pass

    def load_encoder(path, device=None, weights="student"):
        chosen.append(device)
        raise Loaded

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    monkeypatch.setattr(sslam.evaluate, "load_encoder", load_encoder)
    monkeypatch.setenv("LOCAL_RANK", "1")
    args, _ = build_parser().parse_known_args(
        ["evaluate", "finetune", "--checkpoint", "c.pt", "--train", "synth:poly", "--test", "synth:poly"])
    with pytest.raises(Loaded):
        sslam.evaluate.run_evaluate(args)
    assert chosen == ["cuda:1", "cuda:1"]


def test_a_setting_given_twice_is_refused(capsys):
    """--out and --run.out= set one value; the override won whatever the order."""
    for argv in (["--run.out=AAA", "--out", "BBB"], ["--data.source=x.tsv", "--data", "synth"],
                 ["--init", "a.pt", "--run.init=b.pt"]):
        assert main(["pretrain", "--preset", "tiny", "--print-config", *argv]) == 2
        key = next(a for a in argv if "=" in a)[2:].split("=")[0]
        assert f"both set {key}: give one of them" in capsys.readouterr().err


def test_printed_config_says_what_sizes_left_at_zero_stand_for(capsys):
    """The base and large presets leave the sizes at 0 (the variant's): printed bare, they read
    as a zero-width encoder."""
    assert main(["pretrain", "--preset", "large", "--print-config"]) == 0
    printed = capsys.readouterr().out
    assert "embed_dim = 0  # 1024, the large variant's" in printed and "depth = 0  # 24, the large variant's" in printed
    assert "top_k = 0  # all 24 layers" in printed
    assert main(["pretrain", "--preset", "base", "--stage", "2", "--init", "a.pt", "--print-config"]) == 0
    assert "num_heads = 0  # run.init's" in capsys.readouterr().out


@pytest.mark.parametrize("argv, hint", [
    (["pretrain", "--preset", "tiny"], "the same command resumes from the last checkpoint in its output folder, if it has one"),
    (["pretrain", "--preset", "tiny", "--run.resume=false"],
     "without --run.resume=false the same command resumes from the last checkpoint"),
    (["evaluate", "finetune", "--checkpoint", "c.pt", "--train", "synth:mono", "--test", "synth:mono"],
     "the same command resumes from the last checkpoint in its output folder, if it has one"),
    (["extract", "clips/", "--checkpoint", "c.pt", "--out", "e.npz"], "the same command embeds the inputs not yet done"),
    (["info", "c.pt"], None),
])
def test_ctrl_c_says_what_rerunning_does(monkeypatch, capsys, argv, hint):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    for target in ("sslam.train.Trainer", "sslam.evaluate.load_encoder", "sslam.extract.check_output",
                   "sslam.checkpoint.describe"):
        monkeypatch.setattr(target, interrupted)
    code, err = main(argv), capsys.readouterr().err.strip()
    assert code == 130, err
    assert err == (f"sslam: interrupted; {hint}" if hint else "sslam: interrupted")


def test_names_the_terminal_cannot_encode_are_escaped_not_fatal(tmp_path):
    """On an ASCII (or Latin-1) terminal, a failed file's non-ASCII name in extract's summary
    made print raise: the summary was lost and the exit status said "bad input" (2)."""
    import numpy as np
    import soundfile
    from conftest import GOLDEN

    clips = tmp_path / "clips"
    clips.mkdir()
    soundfile.write(clips / "ok.wav", np.random.default_rng(0).uniform(-0.5, 0.5, 16000), 16000)
    (clips / "café.wav").write_bytes(b"not audio")
    done = subprocess.run([sys.executable, "-m", "sslam", "extract", str(clips), "--checkpoint",
                           str(GOLDEN / "tiny_ckpt.pt"), "--out", str(tmp_path / "e.npz")],
                          capture_output=True, env={**os.environ, "PYTHONIOENCODING": "ascii"})
    assert done.returncode == 1, done.stderr.decode()
    assert b"1 embedded, 0 already done, 1 failed" in done.stdout
    assert b"clips/caf\\xe9.wav: cannot decode audio" in done.stdout


def test_output_cut_short_by_a_closed_pipe_is_not_an_error_about_the_file():
    """`sslam info ckpt | head -1`: the reader leaving used to be reported as an error of the
    checkpoint ("sslam: error: ckpt.pt: [Errno 32] Broken pipe"). It ends the command quietly."""
    ckpt = Path(__file__).parent / "data" / "golden" / "tiny_ckpt.pt"
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before the command prints
    done = subprocess.run([sys.executable, "-m", "sslam", "info", str(ckpt)], stdout=write_end,
                          stderr=subprocess.PIPE, text=True, timeout=120)
    os.close(write_end)
    assert done.stderr == "" and done.returncode == 1


def test_a_broken_pipe_other_than_the_output_s_is_an_error(monkeypatch, capsys):
    """Only the reader of the output leaving ends a command quietly; another pipe's EPIPE (a
    loader's, a socket's) is reported as the error it is."""
    def broken(args):
        raise BrokenPipeError(32, "Broken pipe")

    import sslam.cli

    monkeypatch.setattr(sslam.cli, "cmd_info", broken)
    assert main(["info", "x.pt"]) == 2
    assert "sslam: error:" in capsys.readouterr().err


def allocator_error() -> RuntimeError:
    """The error torch's CPU allocator raises for a size beyond any address space."""
    try:
        torch.empty(2**62, dtype=torch.uint8)
    except RuntimeError as exc:
        return exc
    raise AssertionError("4 EiB were allocated")


def test_failed_allocations_and_stopped_runs_are_one_line(monkeypatch, capsys):
    """Sizes beyond the memory (--model.depth=100000 passes every range check) died in the
    allocator's traceback. StopTraining is a RuntimeError too: it must keep its own line, and a
    MemoryError without a message must not break the one printed for it."""
    from sslam.runs import StopTraining

    cases = [(allocator_error(), "sslam: error: out of memory ([enforce fail"),
             (MemoryError(), "sslam: error: out of memory (MemoryError): lower the batch size or the sizes"),
             (StopTraining("stopped: 5 bad files"), "sslam: stopped: 5 bad files"),
             (RuntimeError("an error of the code, not of memory"), None)]
    for exc, expected in cases:
        def fail(*args, exc=exc, **kwargs):
            raise exc

        monkeypatch.setattr(sslam.train.Trainer, "__init__", fail)
        argv = ["pretrain", "--preset", "tiny", "--run.progress=false"]
        if expected is None:  # a bug keeps its traceback
            with pytest.raises(RuntimeError, match="an error of the code"):
                main(argv)
            continue
        assert main(argv) == 1
        err = capsys.readouterr().err
        assert err.startswith(expected) and len(err.strip().splitlines()) == 1
