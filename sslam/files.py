"""Writing files so that nothing already written is lost: atomic replacement, output folders
checked before any work, the temporaries a killed writer leaves, and small JSON records read
back without trusting them."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

# What an encoder export holds (:func:`sslam.checkpoint.save_encoder`): a temporary folder that
# holds these and nothing else is one a killed export left.
EXPORT_FILES = ("model.safetensors", "config.json")

# A trainer's checkpoint, the whole name (not best_checkpoint_...): the step zero-padded to 8
# digits, more past 10**8 - 1.
CKPT_PATTERN = re.compile(r"checkpoint_(\d{8,})\.pt")


def checkpoint_name(step: int) -> str:
    return f"checkpoint_{step:08d}.pt"


def checkpoints_in(folder: Path) -> list[Path]:
    """Checkpoints of a run folder, oldest first."""
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := CKPT_PATTERN.fullmatch(p.name))]
    return [p for _, p in sorted(found)]


def creation_mode(mode: int) -> int:
    """``mode`` less the process umask: the permissions ``open`` or ``mkdir`` would give."""
    umask = os.umask(0)
    os.umask(umask)
    return mode & ~umask


def atomic_write(path: str | os.PathLike, write) -> None:
    """Call ``write(tmp_path)`` then rename onto ``path``: readers never see a partial file.
    The file gets the permissions a plain ``open(path, 'w')`` would give it (the temporary
    file starts private, and some writers, such as safetensors, create files 0600). A failed
    write (a full disk, say) is an ``OSError`` naming ``path``; what was there is kept. The
    file and then its folder are synced, so after a power loss ``path`` holds the old or the
    new file, whole."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, creation_mode(0o666))
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        # torch.save reports a full disk as a RuntimeError of its zip writer; other errors
        # are the writer's own faults (or an interruption) and pass as they are.
        if isinstance(exc, OSError) or (isinstance(exc, RuntimeError) and "inline_container" in str(exc)):
            raise _write_error(path, exc) from exc
        raise
    _sync_folder(path.parent)


def check_output_folder(folder: str | os.PathLike, out: str | os.PathLike | None = None,
                        argument: str = "--out") -> None:
    """Refuse, before any work, an output folder that cannot be made: none (an empty name:
    Path("") is the current folder), an existing file (or broken link), a path under one, or
    under a folder this process cannot write to. ``mkdir`` would say only "File exists" or "Not
    a directory", and only once the model and the data were ready. ``out`` is the value of
    ``argument`` that names the folder (the folder itself by default)."""
    if not str(folder).strip():
        raise ValueError(f"{argument} is empty: name a folder (the output would land in the current one)")
    folder = Path(folder)
    out = folder if out is None else out
    for path in (folder, *folder.parents):
        if path.is_dir():
            if not os.access(path, os.W_OK | os.X_OK):
                where = "it is not writable" if path == folder else f"cannot be made in {path}, which is not writable"
                raise ValueError(f"{argument} {out}: {where}")
            return
        if path.exists() or path.is_symlink():
            raise ValueError(f"{argument} {out}: {'it' if path == out else path} is not a folder")


def remove_temporaries(folder: Path, target: str = "*", recursive: bool = False) -> None:
    """Delete the temporary files :func:`atomic_write` (and folders :func:`save_encoder`) left in
    ``folder`` for ``target`` (a glob of names) when its process was killed mid-write: each is
    as large as what it was writing. Only for a folder that no other process is writing to."""
    if folder.is_dir():
        for tmp in (folder.rglob if recursive else folder.glob)(f".{target}.*.tmp"):
            if tmp.is_file():
                tmp.unlink(missing_ok=True)
            elif tmp.is_dir() and not tmp.is_symlink() and _holds_only_an_export(tmp):
                shutil.rmtree(tmp, ignore_errors=True)


def _holds_only_an_export(folder: Path) -> bool:
    """Whether ``folder`` holds :func:`save_encoder`'s files and nothing else (False when it
    cannot be listed: not ours to remove)."""
    try:
        return {p.name for p in folder.iterdir()} <= set(EXPORT_FILES)
    except OSError:
        return False


def _sync_folder(folder: Path) -> None:
    """Make a rename in ``folder`` durable: the new entry is on disk only once the folder is."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems cannot sync a folder (EINVAL); the rename itself has happened
    finally:
        os.close(fd)


def _write_error(path: Path, exc: BaseException) -> OSError:
    """An OSError of ``exc``'s kind naming ``path``, the reason, the free space and what is kept."""
    try:
        free_bytes = shutil.disk_usage(path.parent).free
        free = f"; {free_bytes / 2**20:.0f} MiB free on its disk"
    except OSError:
        free_bytes, free = None, ""
    kept = "; the earlier file of that name is kept" if path.exists() else ""
    if isinstance(exc, OSError):
        kind, code, reason = type(exc), exc.errno, exc.strerror or first_line(exc)
    elif free_bytes is not None and free_bytes < 1 << 20:
        # torch's zip writer only says "unexpected pos" when a write stops short; the disk is full
        kind, code, reason = OSError, errno.ENOSPC, os.strerror(errno.ENOSPC)
    else:
        kind, code, reason = OSError, None, "a write stopped short"
    message = f"{path}: could not write it ({reason}{free}){kept}"
    return kind(code, message) if code is not None else kind(message)


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type's name where it has none)."""
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def load_json_object(path: str | os.PathLike) -> dict:
    """The JSON object in ``path``; ValueError saying why there is none: no file, unreadable,
    not UTF-8, not JSON (or nested too deeply to parse), or another JSON value."""
    try:
        value = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as exc:  # ValueError: bad UTF-8 or JSON
        raise ValueError(first_line(exc)) from exc
    if not isinstance(value, dict):
        raise ValueError(f"not a JSON object but {type(value).__name__}")
    return value


def read_json_object(path: str | os.PathLike) -> dict | None:
    """The JSON object in ``path``; None where there is none (see :func:`load_json_object`)."""
    try:
        return load_json_object(path)
    except ValueError:
        return None
