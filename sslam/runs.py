"""What both trainers (pretraining, fine-tuning) keep in a run folder and share between
their processes: rotating checkpoints, the checks a resume makes on them, the random streams
they save, the ``metrics.jsonl`` log, and the process group of a torchrun launch with the way
its processes stop together.
"""

from __future__ import annotations

import json
import math
import os
import random
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import torch
import torch.distributed as dist

from .checkpoint import CheckpointError
from .files import atomic_write, checkpoint_name, checkpoints_in
from .safe_load import safe_torch_load

# ---- processes --------------------------------------------------------------------------


class StopTraining(RuntimeError):
    """A run stopped on purpose, for the reason in the message (too many unreadable files, too
    many non-finite losses); every checkpoint written before it is intact."""


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device_type: str) -> Dist:
    """The processes of this run: those of a process group the caller made, or torchrun's
    (RANK / WORLD_SIZE / LOCAL_RANK; NCCL on GPU, gloo on CPU), or this one alone."""
    if dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
        gpus = torch.cuda.device_count() if device_type == "cuda" else 0
        return Dist(rank, world, int(os.environ.get("LOCAL_RANK", rank % gpus if gpus else 0)))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist()
    if "RANK" not in os.environ:
        raise ValueError(f"WORLD_SIZE={world} but RANK is not set: launch the processes with torchrun, "
                         "which sets RANK, LOCAL_RANK and WORLD_SIZE")
    dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
    return Dist(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))


def check_same_start(world_size: int, step: int | None, device: torch.device, out: Path) -> None:
    """Refuse processes that resume from different steps (``step``: this one's, None for a
    fresh start). Each lists the run folder ``out`` itself; where one sees an older listing (a
    shared filesystem's cache), DDP would keep their weights together but not their optimizer
    states, steps or data positions, or their collectives would hang."""
    if world_size == 1:
        return
    mine = torch.tensor([-1 if step is None else step], device=device)
    gathered = [torch.empty_like(mine) for _ in range(world_size)]
    dist.all_gather(gathered, mine)
    steps = [int(s) for s in gathered]
    if len(set(steps)) > 1:
        found = ", ".join(f"{'no checkpoint' if s < 0 else f'step {s}'} (process {rank})" for rank, s in enumerate(steps))
        raise ValueError(f"{out}: the processes found different checkpoints to resume: {found}. Each process must "
                         "see the same files in the run folder (a shared filesystem's cache?)")


def stop_distributed(exc: StopTraining) -> NoReturn:
    """A stop that every process of a distributed run takes together (what it must keep already
    written): said as the command line says it, then left as a finished run leaves, with the
    stop's status (gloo's threads could otherwise abort the process at the interpreter's
    shutdown, and its launcher end the others). Without a process group ``exc`` is raised, for
    the command line to report."""
    if not dist.is_initialized():
        raise exc
    print(f"sslam: {exc}", file=sys.stderr)
    finish_distributed(1)


def finish_distributed(status: int = 0) -> None:
    """End a finished command's part in a distributed run: destroy its process group and leave
    at once with ``status``, after flushing its output (nothing happens without a process group).

    A gloo process group outlives ``destroy_process_group`` (PyTorch keeps references to it),
    and so do its worker threads. One of them can still hold the last reference to a finished
    collective's tensors when the interpreter shuts down; releasing them then needs the GIL of
    a finalizing interpreter, and the thread is killed with "terminate called without an
    active exception" (SIGABRT; native backtrace: ``ProcessGroupGloo::runLoop`` ->
    ``TensorImpl::decref_pyobject`` -> ``PyEval_AcquireThread`` -> ``pthread_exit``). That
    happened to a rank twice in some 450 two-process runs here, after every rank had trained,
    checkpointed and destroyed its group, and torchrun reports it as a failed run. Everything
    this process writes is closed by then, so it leaves with ``os._exit``, skipping the
    interpreter's shutdown."""
    if not dist.is_initialized():
        return
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


# ---- checkpoints ------------------------------------------------------------------------


def save_checkpoint(out: Path, step: int, state: dict, keep_last: int) -> Path:
    """``state`` as ``out/checkpoint_<step>.pt``, written atomically; then every checkpoint but
    the newest ``keep_last`` is deleted."""
    path = out / checkpoint_name(step)
    atomic_write(path, lambda tmp: torch.save(state, tmp))
    for old in checkpoints_in(out)[:-keep_last]:
        old.unlink(missing_ok=True)
    return path


def load_newest(saved: list[Path]) -> dict:
    """:func:`safe_torch_load` of the newest of a run's checkpoints (``saved``, oldest first).
    A damaged one names the one before it, which a resume uses once the damaged file is moved
    out of the folder (a run killed while the disk filled, say)."""
    try:
        return safe_torch_load(saved[-1])
    except CheckpointError as exc:
        if len(saved) < 2:
            raise
        raise CheckpointError(f"{exc}. The previous checkpoint, {saved[-2].name}, may be intact: move the "
                              "damaged file out of the run folder to resume from it") from exc


def changed_settings(before: dict, now: dict, may_change=frozenset(), where: str = "the checkpoint") -> list[str]:
    """``key: <before> in <where>, <now> now`` for every setting of ``now`` that differs from
    ``before`` and is not in ``may_change``; a key ``before`` lacks (a setting newer than the
    file) counts as unchanged."""
    return [f"{key}: {before[key]!r} in {where}, {value!r} now" for key, value in now.items()
            if key in before and before[key] != value and key not in may_change]


# The parts of a training checkpoint (Trainer.state) a resume reads: their types, as named.
_DICT, _INT = (dict, "a dict"), (int, "an int")
TRAINING_PARTS = {"config": _DICT, "encoder_config": _DICT, "objective": _DICT, "model": _DICT, "decoder": _DICT,
                  "teacher": _DICT, "optimizer": _DICT, "scheduler": _DICT, "scaler": _DICT, "step": _INT,
                  "data_position": ((list, tuple), "a list"), "rng": _DICT}
FINETUNING_PARTS = {"config": _DICT, "model": _DICT, "optimizer": _DICT, "scaler": _DICT, "step": _INT,
                    "best": ((int, float, type(None)), "a number or None"), "rng": _DICT}


def check_record(saved: dict, path: Path, parts: dict = TRAINING_PARTS) -> None:
    """Refuse a checkpoint that lacks one of ``parts`` or holds one of another type (damaged,
    or edited by hand), naming the file and the part: a resume would otherwise fail somewhere
    inside with a bare KeyError or TypeError."""
    problems = []
    for key, (kind, name) in parts.items():
        value = saved.get(key)
        if key not in saved:
            problems.append(f"{key}: missing")
        elif not isinstance(value, kind) or isinstance(value, bool):
            problems.append(f"{key}: a {type(value).__name__}, not {name}")
    if not problems and saved["step"] < 0:
        problems.append(f"step: {saved['step']} is negative")
    position = saved.get("data_position")
    if not problems and "data_position" in parts and not (
            len(position) == 2 and all(isinstance(v, int) and v >= 0 for v in position)):
        problems.append(f"data_position: {list(position)!r}, not two counts (epoch, step in epoch)")
    if problems:
        raise CheckpointError(f"{path}: damaged training checkpoint: {'; '.join(problems)}")


@contextmanager
def loading_parts(path: Path, parts: str):
    """Load state ``parts`` of the checkpoint ``path`` within the block: an error of the kinds
    torch's load_state_dict methods raise for a damaged part is a CheckpointError naming both."""
    try:
        yield
    except (KeyError, TypeError, ValueError, IndexError, RuntimeError) as exc:
        raise CheckpointError(f"{path}: damaged training checkpoint: {parts} do not load ({exc})") from None


# ---- random streams ---------------------------------------------------------------------


def rng_state() -> dict:
    """The global random streams: CPU torch, Python's, and the CUDA stream of this process's
    device (the one it trains on; the others are not its to restore)."""
    _, python, gauss_next = random.getstate()
    state = {"torch": torch.get_rng_state(), "python": list(python), "python_gauss": gauss_next}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    """Restore :func:`rng_state`'s streams. Older checkpoints hold every visible device's CUDA
    state: this process's device takes its own, when the saving machine had one."""
    torch.set_rng_state(state["torch"])
    if "python" in state:
        random.setstate((3, tuple(state["python"]), state.get("python_gauss")))  # 3: the Mersenne Twister's
    cuda = state.get("cuda")
    if cuda is None or not torch.cuda.is_available():
        return
    if isinstance(cuda, (list, tuple)):
        index = torch.cuda.current_device()
        if index >= len(cuda):  # more GPUs here than where it was saved (restoring them all raised)
            return
        cuda = cuda[index]
    torch.cuda.set_rng_state(cuda)


# ---- metrics log ------------------------------------------------------------------------


def metrics_line(record: dict) -> str:
    """One line of ``metrics.jsonl``, strict JSON: a non-finite number (the loss of a diverged
    or fp16-overflowed step) is null, since every JSON reader but Python's refuses NaN."""
    return json.dumps({k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()}) + "\n"


def open_metrics(out: Path, step: int):
    """``out/metrics.jsonl`` opened to append, less the records after ``step`` (this run logs
    them again)."""
    trim_metrics(out / "metrics.jsonl", step)
    return (out / "metrics.jsonl").open("a")


def trim_metrics(path: Path, step: int) -> None:
    """Drop the records after ``step`` (and a line cut short by a crash) from ``metrics.jsonl``:
    a run resumed from the checkpoint of ``step`` logs those steps again, and the file would
    otherwise hold them twice."""
    if not path.exists():
        return
    lines = path.read_text().splitlines()
    kept = []
    for line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and record.get("step", 0) <= step:
            kept.append(line)
    if len(kept) != len(lines):
        atomic_write(path, lambda tmp: Path(tmp).write_text("".join(line + "\n" for line in kept)))
