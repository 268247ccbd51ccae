"""``sslam demo``: the whole system on a fresh machine, on built-in data, in minutes on a CPU.

1. pretrain the tiny model with EAT stage 1 on synthetic scenes;
2. continue with SSLAM stage 2 (mixtures + Source Retention Loss) from that checkpoint;
3. linear-probe a randomly initialised encoder, the stage-1 encoder and the stage-2 encoder on
   the built-in monophonic and polyphonic benchmark splits (mAP, mean over seeds);
4. print a table, and write ``results.md``, ``results.json`` and ``demo.png`` (mAP bars and the
   loss curves of both stages) into the output folder.

Whatever the numbers are, they are reported as measured.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from .checkpoint import load_encoder
from .evaluate import ProbeConfig, linear_probe
from .files import (
    atomic_write,
    check_output_folder,
    checkpoints_in,
    read_json_object,
    remove_temporaries,
)
from .labels import synth_split
from .model import Encoder
from .train import Trainer
from .train_config import preset

# (stage-1 steps, stage-2 steps, probe epochs, probe seeds, benchmark clips train/test)
FULL = {"stage1": 400, "stage2": 150, "epochs": 60, "seeds": 3, "train_clips": 240, "test_clips": 120}
QUICK = {"stage1": 6, "stage2": 4, "epochs": 3, "seeds": 1, "train_clips": 24, "test_clips": 24}


def pretrain(out: Path, stage: int, steps: int, init: str = "", log=print) -> tuple[Path, list[dict], float]:
    """Run (or resume) one stage of the tiny preset; returns the last checkpoint, the metrics
    records and the seconds its steps took."""
    cfg = preset("tiny", stage)
    cfg.optim.max_steps = steps
    cfg.optim.warmup_steps = min(cfg.optim.warmup_steps, max(1, steps // 10))
    cfg.run.out, cfg.run.init, cfg.run.progress = str(out), init, False
    cfg.run.log_every = max(1, steps // 20)
    cfg.run.ckpt_every = steps
    cfg.ema.anneal_steps = steps
    Trainer(cfg, log=lambda *a: None).fit()
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    # The steps' time as they ran (each record: the mean step time since the one before), so a
    # resumed or finished stage reports its steps, not this call.
    seconds = sum(r["step_time"] * (r["step"] - before["step"]) for before, r in zip([{"step": 0}, *records], records))
    log(f"stage {stage}: {steps} steps in {seconds:.0f} s, loss {records[0]['loss']:.3f} -> {records[-1]['loss']:.3f}")
    return checkpoints_in(out)[-1], records, seconds


def probe_all(encoders: dict[str, Encoder], settings: dict, log=print) -> tuple[dict, dict]:
    """mAP of every encoder on the mono and poly test splits (linear probe, cached features)."""
    splits = {kind: (synth_split(kind, True, settings["train_clips"]), synth_split(kind, False, settings["test_clips"]))
              for kind in ("mono", "poly")}
    cfg = ProbeConfig(epochs=settings["epochs"])
    table, seconds = {}, {}
    for name, encoder in encoders.items():
        start = time.perf_counter()
        table[name] = {}
        for kind, (train, test) in splits.items():
            # mAP on both splits, so the two columns are the same metric
            result = linear_probe(encoder, train, test, cfg, seeds=range(settings["seeds"]), metric="mAP")
            table[name][kind] = result
            log(f"probe {name:>9} on {kind}: mAP {result['mean']:.4f} +- {result['std']:.4f}")
        seconds[name] = time.perf_counter() - start
    return table, seconds


def write_report(out: Path, table: dict, timings: dict, curves: dict, settings: dict) -> str:
    lines = [
        "# sslam demo",
        "",
        f"Tiny encoder, stage 1 (EAT) {settings['stage1']} steps, stage 2 (SSLAM) {settings['stage2']} steps "
        f"on built-in synthetic scenes; linear probe ({settings['epochs']} epochs, {settings['seeds']} seed(s)) "
        "on the built-in monophonic and polyphonic benchmark splits.",
        "",
        "| encoder | mono mAP | poly mAP |",
        "|---|---|---|",
    ]
    for name, row in table.items():
        cells = [f"{row[k]['mean']:.4f} ± {row[k]['std']:.4f}" for k in ("mono", "poly")]
        lines.append(f"| {name} | {cells[0]} | {cells[1]} |")
    lines += ["", "| phase | seconds |", "|---|---|"]
    lines += [f"| {phase} | {sec:.1f} |" for phase, sec in timings.items()]
    text = "\n".join(lines) + "\n"
    atomic_write(out / "results.md", lambda tmp: Path(tmp).write_text(text))
    record = json.dumps({"table": table, "timings": timings, "settings": settings}, indent=2)
    atomic_write(out / "results.json", lambda tmp: Path(tmp).write_text(record))
    atomic_write(out / "demo.png", lambda tmp: _figure(tmp, table, curves))
    return text


def _figure(path, table: dict, curves: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (bars, losses) = plt.subplots(1, 2, figsize=(11, 4))
    names = list(table)
    width = 0.38
    for j, kind in enumerate(("mono", "poly")):
        means = [table[n][kind]["mean"] for n in names]
        stds = [table[n][kind]["std"] for n in names]
        xs = [i + (j - 0.5) * width for i in range(len(names))]
        bars.bar(xs, means, width, yerr=stds, label=f"{kind}phonic", capsize=3)
    bars.set_xticks(range(len(names)), names)
    bars.set_ylabel("linear-probe mAP")
    bars.set_title("Linear probe on the built-in benchmark")
    bars.legend()
    offset = 0
    for stage, records in curves.items():
        steps = [offset + r["step"] for r in records]
        losses.plot(steps, [r["loss"] for r in records], label=stage)
        offset = steps[-1] if steps else offset
    losses.set_xlabel("step")
    losses.set_ylabel("training loss")
    losses.set_title("Pretraining loss")
    losses.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120, format="png")  # path may be a temporary name without the suffix
    plt.close(fig)


def _claim_folder(out: Path, quick: bool) -> None:
    """Make ``out`` a demo folder of this kind (--quick or full), or refuse it: a folder of other
    files (the report would overwrite a results.md of the user's) or of the other kind (its
    stage runs, resumed, would refuse the other kind's settings by options the demo does not
    have). ``demo.json`` records the kind."""
    kinds = {True: "a --quick demo", False: "the full demo"}
    record = out / "demo.json"
    remove_temporaries(out, "demo.json")  # a run killed while writing it: not another's file
    if record.exists() or record.is_symlink():
        before = (read_json_object(record) or {}).get("quick")
        if not isinstance(before, bool):
            raise ValueError(f"--out {out}: its demo.json is not a demo's record; give the demo another folder")
        if before != quick:
            raise ValueError(f"--out {out}: holds {kinds[before]}; {kinds[quick]} needs another folder")
        return
    if out.is_dir() and (held := sorted(p.name for p in out.iterdir())):
        raise ValueError(f"--out {out}: holds other files ({', '.join(held[:5])}{', ...' if len(held) > 5 else ''}) "
                         "and no demo; give the demo an empty or new folder")
    atomic_write(record, lambda tmp: Path(tmp).write_text(json.dumps({"quick": quick}) + "\n"))


def run_demo(out: str | Path = "runs/demo", quick: bool = False, log=print) -> dict:
    try:
        import matplotlib  # noqa: F401
    except ImportError as exc:
        raise RuntimeError("sslam demo draws a figure: pip install matplotlib (or sslam[dev])") from exc
    settings = QUICK if quick else FULL
    check_output_folder(out)
    out = Path(out).absolute()  # stage 2 records its start by this path: a rerun from elsewhere must match
    _claim_folder(out, quick)
    torch.manual_seed(0)
    timings, curves = {}, {}
    ckpt1, curves["stage 1 (EAT)"], timings["pretrain stage 1"] = pretrain(out / "stage1", 1, settings["stage1"], log=log)
    ckpt2, curves["stage 2 (SSLAM)"], timings["pretrain stage 2"] = pretrain(
        out / "stage2", 2, settings["stage2"], init=str(ckpt1), log=log)
    stage1 = load_encoder(ckpt1)
    torch.manual_seed(0)
    random_init = Encoder(stage1.cfg).eval()
    random_init.preprocessing = dict(stage1.preprocessing)
    encoders = {"random": random_init, "stage 1": stage1, "stage 2": load_encoder(ckpt2)}
    table, probe_seconds = probe_all(encoders, settings, log=log)
    timings.update({f"probe {name}": sec for name, sec in probe_seconds.items()})
    text = write_report(out, table, timings, curves, settings)
    log("\n" + text)
    log(f"wrote {out / 'results.md'}, {out / 'results.json'} and {out / 'demo.png'}")
    return {"table": table, "timings": timings}


def add_demo_command(sub) -> None:
    p = sub.add_parser("demo", help="pretrain stage 1 + stage 2 on built-in data, probe mono/poly, report")
    p.add_argument("--out", default="runs/demo",
                   help="output folder (default runs/demo), new or empty or a demo's; the pretraining runs in "
                   "it are resumed, so a --quick folder cannot take a full demo: give each its own")
    p.add_argument("--quick", action="store_true", help="a smoke run of a few steps (seconds)")
    p.set_defaults(func=lambda a: (run_demo(a.out, a.quick), 0)[1])
