"""``sslam extract``: embeddings of many audio files, resumable, never half-written.

Inputs are files, folders (searched recursively for audio files) and fairseq ``.tsv`` manifests
(first line: root folder; then ``relative/path<TAB>size``). Output is either one ``.npz`` file
(all inputs stacked, padded, with masks; flushed atomically every few batches) or a folder with
one ``.npz`` per input (mirroring the inputs' relative paths). Every output records the file it
came from (path, size, modification time, a digest of its first and last 64 KiB): re-running
skips inputs already done (also moved or copied ones), embeds again those that changed, and
refuses an output name that holds another file's embedding (names of files with the same name
depend on the inputs given together). A re-run with other settings or another encoder is
refused, and a file named twice is embedded once. Bad files are reported by name with the
reason.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import math
import os
import sys
import zipfile
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .audio import AudioError, claimed_samples, load_audio
from .checkpoint import encoder_fingerprint
from .data import folder_paths, manifest_entries, samples_for_frames
from .embedding import check_crop_hop, checked_batch_size, length_groups, window_hop
from .features import check_min_length
from .files import atomic_write, check_output_folder, load_json_object, remove_temporaries

GRANULARITIES = ("utterance", "mean", "frames", "timestamps", "all")


@dataclass(frozen=True)
class Item:
    key: str  # identifier in the output (relative path without suffix games)
    path: Path


def read_manifest(path: Path, root: str | None = None) -> list[Item]:
    """Items of a fairseq manifest (:func:`sslam.data.manifest_entries`), keyed by their paths
    relative to its root."""
    base, relative, _ = manifest_entries(path, root)
    return [Item(rel, base / rel) for rel in relative]


def collect_inputs(inputs: list[str], manifest_root: str | None = None) -> list[Item]:
    """Expand files, folders and manifests into items with unique keys, in a stable order. A
    folder without audio files is an error naming it (it would otherwise vanish from the run)."""
    items: list[Item] = []
    for raw in inputs:
        path = Path(raw)
        if path.is_dir():
            items += [Item(str(p.relative_to(path)), p) for p in folder_paths(path)]
        elif path.suffix.lower() == ".tsv":
            items += read_manifest(path, manifest_root)
        else:
            items.append(Item(path.name, path))
    seen, files, unique = set(), set(), []
    for item in items:
        # The same file named twice (twice on the command line, or by a folder and a manifest)
        # is embedded once, under its first key, not again under its full path.
        real = os.path.realpath(item.path)
        if real in files:
            continue
        files.add(real)
        key = item.key
        if key in seen:  # same file name from different places: disambiguate by its path
            key = str(item.path)
        if key in seen:  # that too (a folder's relative path): the real path is unique
            key = real
        seen.add(key)
        unique.append(Item(key, item.path))
    return unique


def arrays_of(emb, i: int, granularity: str) -> dict[str, np.ndarray]:
    """The arrays stored for clip ``i`` of an :class:`sslam.embedding.Embeddings`, cut to the rows
    the encoder produced for it (``num_rows``)."""
    want = GRANULARITIES[:-1] if granularity == "all" else (granularity,)
    rows = int(emb.num_rows[i])
    freq = emb.frames.shape[1] // emb.timestamps.shape[1]
    out: dict[str, np.ndarray] = {"num_rows": np.int64(rows)}
    if "utterance" in want:
        out["utterance"] = emb.utterance[i].cpu().numpy()
    if "mean" in want:
        out["mean"] = emb.mean[i].cpu().numpy()
    if "frames" in want:
        out["frames"] = emb.frames[i, : rows * freq].cpu().numpy()
        out["frame_mask"] = emb.frame_mask[i, : rows * freq].cpu().numpy()
    if "timestamps" in want:
        out["timestamps"] = emb.timestamps[i, :rows].cpu().numpy()
        out["timestamp_mask"] = emb.timestamp_mask[i, :rows].cpu().numpy()
        out["times"] = emb.times[:rows].cpu().numpy()
    if emb.probabilities is not None:
        out["probabilities"] = emb.probabilities[i].cpu().numpy()
    return out


_DIGEST_SPAN = 64 << 10


def digest_of(path: Path) -> str:
    """A digest of a file's size and its first and last 64 KiB (the whole of a small file):
    enough to tell clips apart, without reading all of a large collection again on a resume."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        h.update(size.to_bytes(8, "little") + f.read(_DIGEST_SPAN))
        if size > 2 * _DIGEST_SPAN:
            f.seek(size - _DIGEST_SPAN)
        h.update(f.read())
    return h.hexdigest()[:32]


def source_of(path: Path) -> dict | None:
    """What an output records of the file it embeds (None when it cannot be read: decoding
    then says why)."""
    try:
        st = os.stat(path)
        return {"path": os.path.realpath(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns,
                "digest": digest_of(path)}
    except OSError:
        return None


def is_done(out: Path, key: str, recorded: dict | None, path: Path) -> bool:
    """Whether the output's ``key``, recorded from the file ``recorded`` (None: not there; {}:
    written before sources were recorded), is the embedding of the file at ``path``. At the
    same place: its size and modification time are unchanged (a change anywhere in it, the
    digest's parts or not, is caught). Elsewhere (moved or copied): the same digest; other
    bytes there are another file given the same name: ``ValueError``."""
    if recorded is None:
        return False
    if not recorded:
        return True
    try:
        st, real = os.stat(path), os.path.realpath(path)
        if real == recorded.get("path"):
            return (st.st_size, st.st_mtime_ns) == (recorded.get("size"), recorded.get("mtime_ns"))
        if digest_of(path) == recorded.get("digest"):
            return True
    except OSError:
        return True  # gone or unreadable since: its embedding stays
    raise ValueError(f"{out}: {key!r} holds the embedding of {recorded.get('path')}, not of {real} (a run with other "
                     "inputs gave that name to it); choose another --out")


def _shown(text: str) -> str:
    """``text`` printable on a UTF-8 stream: a file name that is not UTF-8 keeps its bytes escaped
    (the command line escapes what its terminal cannot encode)."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


@dataclass
class Report:
    done: int = 0
    skipped: int = 0
    changed: int = 0  # of those done: embedded again, their file having changed since
    failed: list[tuple[str, str]] = field(default_factory=list)

    def summary(self) -> str:
        again = f" ({self.changed} changed since)" if self.changed else ""
        lines = [f"{self.done} embedded{again}, {self.skipped} already done, {len(self.failed)} failed"]
        lines += [_shown(f"  FAILED {key}: {reason}") for key, reason in self.failed]
        return "\n".join(lines)


class FolderSink:
    """One ``.npz`` per input under a folder; an input is done when its file exists. The run's
    ``settings`` are kept in ``SETTINGS`` in the folder and in every file; resuming with others
    is refused (as :class:`FileSink` does) instead of leaving files of different contents side
    by side, also where the folder's record is gone or the files were copied elsewhere."""

    SETTINGS = "sslam_extract.json"  # cannot clash with an output: those all end in .npz

    def __init__(self, root: Path, settings: dict | None = None):
        self.root = root
        self.settings = settings
        self.settings_text = None if settings is None else json.dumps(settings, sort_keys=True)
        root.mkdir(parents=True, exist_ok=True)
        record = root / self.SETTINGS
        # A missing record is written with the first file: a run refused by the files already
        # there (their own records) must not leave its settings as the folder's.
        self.record_pending = settings is not None and not record.exists()
        if settings is not None and not self.record_pending:
            try:
                stored = load_json_object(record)
            except ValueError as exc:
                raise ValueError(f"{record}: unreadable extraction settings ({exc})") from exc
            check_same_settings(root, stored, settings)

    def target(self, key: str) -> Path:
        """Where ``key``'s file goes: its path under the folder (an absolute one under
        ``__abs__``, each ``..`` as ``__up__``, so that no two keys share a file)."""
        rel = Path(key)
        absolute = rel.is_absolute()
        # A name of the folder's own starting with "__" gets one "_" more: no key's part can
        # then read as the markers.
        parts = ["__up__" if part == ".." else "_" + part if part.startswith("__") else part
                 for part in rel.parts[1 if absolute else 0 :]]
        rel = Path("__abs__" if absolute else "", *parts)
        return self.root / rel.with_name(rel.name + ".npz")

    def source(self, key: str) -> dict | None:
        """The file ``key`` was embedded from, {} if its output does not say, None if none.
        A file there that is not an embedding is the user's, never taken for one or replaced
        (outputs are written whole, so a damaged one is not ours either): ``ValueError``; so is
        one that records other settings than this run's."""
        target = self.target(key)
        if not target.exists():
            return None
        try:
            with _open_npz(target) as data:
                if "num_rows" not in data.files:  # every output has it
                    raise ValueError("no num_rows array")
                source = json.loads(str(data["source"])) if "source" in data.files else {}
                # Files written before they recorded the settings have only the folder's record.
                stored = json.loads(str(data["settings"])) if "settings" in data.files else None
                if stored is not None and not isinstance(stored, dict):
                    raise ValueError("its settings are not a JSON object")
        except (OSError, ValueError, KeyError, EOFError, RecursionError, zipfile.BadZipFile) as exc:
            raise ValueError(f"{target}: exists but is not an sslam embedding ({exc}); move it away or "
                             "choose another --out") from None
        if self.settings is not None and stored is not None:
            check_same_settings(target, stored, self.settings)
        return source

    def add(self, key: str, arrays: dict, label_names, source: dict | None = None) -> None:
        if label_names:
            arrays = {**arrays, "label_names": np.asarray(label_names)}
        arrays = {**arrays, "source": np.asarray(json.dumps(source or {}))}
        if self.settings_text is not None:
            arrays["settings"] = np.asarray(self.settings_text)
            if self.record_pending:
                text = self.settings_text + "\n"
                atomic_write(self.root / self.SETTINGS, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
                self.record_pending = False
        atomic_write(self.target(key), lambda tmp: _save_npz(tmp, arrays))

    def flush(self) -> None:
        pass


class FileSink:
    """All inputs in one ``.npz``: ``keys`` names the rows; per-row ragged arrays (frames,
    timestamps and their masks) are zero-padded, ``num_rows`` gives each input's patch rows.
    Rewritten atomically on every flush, so an interruption loses at most the unflushed batches."""

    RAGGED_BY_ROW = {"timestamps", "timestamp_mask", "times"}
    RAGGED_BY_TOKEN = {"frames", "frame_mask"}

    def __init__(self, path: Path, settings: dict | None = None):
        """``settings``: how this run embeds (granularity, padding, crop, encoder fingerprint),
        stored in the file; resuming a file written with other settings is refused rather than
        mixing rows that hold different arrays or were computed differently."""
        self.path = path
        self.settings = settings
        self.items: dict[str, dict[str, np.ndarray]] = {}
        self.sources: dict[str, dict] = {}  # key -> the file it was embedded from
        self.label_names = None
        if path.exists():
            self._read()
        else:  # an unusable location (e.g. under a file) fails now, not after all the embedding
            path.parent.mkdir(parents=True, exist_ok=True)

    def _read(self) -> None:
        try:
            with _open_npz(self.path) as data:
                stored = {name: data[name] for name in data.files}
            keys, rows = [str(k) for k in stored.pop("keys")], stored.pop("num_rows")
            settings = json.loads(str(stored.pop("settings"))) if "settings" in stored else None
            sources = [json.loads(str(s)) for s in stored.pop("sources")] if "sources" in stored else [{}] * len(keys)
        except (OSError, ValueError, KeyError, EOFError, RecursionError, zipfile.BadZipFile) as exc:
            raise ValueError(f"{self.path}: exists but is not an sslam embeddings file ({exc})") from exc
        if self.settings is not None:
            self._check_resume(settings, stored)
        label_names = stored.pop("label_names", None)
        self.label_names = None if label_names is None else [str(n) for n in label_names]
        freq = int(stored.pop("freq_patches", 1))
        self.sources = dict(zip(keys, sources))
        for i, key in enumerate(keys):
            item = {"num_rows": np.int64(rows[i])}
            for name, value in stored.items():
                if name == "times":
                    item[name] = value[: rows[i]]
                elif name in self.RAGGED_BY_ROW:
                    item[name] = value[i, : rows[i]]
                elif name in self.RAGGED_BY_TOKEN:
                    item[name] = value[i, : rows[i] * freq]
                else:
                    item[name] = value[i]
            self.items[key] = item

    def _check_resume(self, stored_settings: dict | None, stored: dict) -> None:
        """Raise ``ValueError`` when the file was written with other settings than this run's
        (files without stored settings: compare the granularity their arrays show)."""
        if stored_settings is None:
            stored_settings = {"granularity": _granularity_of(stored)}
        check_same_settings(self.path, stored_settings, self.settings)

    def source(self, key: str) -> dict | None:
        """The file ``key`` was embedded from, {} if the file does not say, None if no row."""
        return self.sources.get(key) if key in self.items else None

    def add(self, key: str, arrays: dict, label_names, source: dict | None = None) -> None:
        self.items[key] = arrays
        self.sources[key] = source or {}
        self.label_names = label_names

    def flush(self) -> None:
        if not self.items:
            return
        keys = list(self.items)
        out: dict[str, np.ndarray] = {"keys": np.asarray(keys),
                                      "sources": np.asarray([json.dumps(self.sources[k]) for k in keys])}
        for name in self.items[keys[0]]:
            values = [self.items[k][name] for k in keys]
            if name == "times":
                out[name] = max(values, key=len)
            elif name in self.RAGGED_BY_ROW or name in self.RAGGED_BY_TOKEN:
                out[name] = _stack_padded(values)
            else:
                out[name] = np.stack(values)
        if "frames" in out:
            first = self.items[keys[0]]
            out["freq_patches"] = np.int64(len(first["frames"]) // max(1, int(first["num_rows"])))
        if self.label_names:
            out["label_names"] = np.asarray(self.label_names)
        if self.settings is not None:
            out["settings"] = np.asarray(json.dumps(self.settings, sort_keys=True))
        atomic_write(self.path, lambda tmp: _save_npz(tmp, out))


# Settings that outputs written before they were recorded lack, with the value they were
# written with (the hop: None, the default).
UNRECORDED_SETTINGS = {"hop": None}


def check_same_settings(path: Path, stored: dict, settings: dict) -> None:
    """Raise ``ValueError`` when ``path`` was written with other ``settings`` than this run's (a
    setting the file does not record is not compared, but those of UNRECORDED_SETTINGS)."""
    stored = {**UNRECORDED_SETTINGS, **stored}
    differ = {k: v for k, v in stored.items() if settings.get(k, v) != v}
    if differ:
        mine = {k: settings[k] for k in differ}
        raise ValueError(
            f"{path}: was written with {differ}, this run uses {mine}; resume with the "
            "same settings (and checkpoint) or choose another --out"
        )


def _granularity_of(stored: dict) -> str:
    """The ``--granularity`` that wrote a file holding the arrays named in ``stored``."""
    present = [g for g in GRANULARITIES[:-1] if g in stored]
    return "all" if present == list(GRANULARITIES[:-1]) else "+".join(present)


def _stack_padded(values: list[np.ndarray]) -> np.ndarray:
    longest = max(len(v) for v in values)
    out = np.zeros((len(values), longest) + values[0].shape[1:], dtype=values[0].dtype)
    for i, v in enumerate(values):
        out[i, : len(v)] = v
    return out


def _open_npz(path: Path):
    """``np.load`` of an .npz archive, anything else refused first: numpy reads another file
    as a pickle, and its refusal advises loading it unsafely."""
    if not zipfile.is_zipfile(path):
        raise ValueError("not an .npz archive")
    return np.load(path, allow_pickle=False)


def _save_npz(path: str, arrays: dict) -> None:
    with open(path, "wb") as f:
        np.savez(f, **arrays)


def _decode(item: Item) -> tuple[Item, torch.Tensor | None, str | None]:
    """Decode one input at 16 kHz: ``(item, (N,) float32 waveform, None)`` or ``(item, None,
    reason)``. Everything :meth:`Encoder.embed` would reject (too short included) is caught here,
    per file, so that one bad file cannot abort the batch it would have joined."""
    try:
        wave, _ = load_audio(item.path, sample_rate=16000)
        check_min_length(wave, str(item.path))
        return item, wave, None
    except AudioError as exc:
        return item, None, str(exc)


def _prefetched(items: list[Item], workers: int, ahead: int,
                max_samples: float = math.inf) -> Iterator[tuple[Item, torch.Tensor | None, str | None]]:
    """:func:`_decode` of each item, in order, by background threads (soundfile and the
    resampler release the GIL), at most ``ahead`` items before the one being consumed, and
    fewer when their headers claim over ``max_samples`` samples at 16 kHz together (one at
    least: the next long file decodes while this one is encoded). A pool given every item at
    once holds every decoded clip until it is consumed, memory growing with the number of
    inputs; ``ahead`` one-hour files would be 4 GB."""
    pending: deque = deque()  # (future, the samples its file claims)
    pool = ThreadPoolExecutor(max_workers=workers)
    try:
        for item in items:
            size = claimed_samples(item.path, 16000)
            while len(pending) > ahead or (len(pending) > 1 and sum(s for _, s in pending) + size > max_samples):
                yield pending.popleft()[0].result()
            pending.append((pool.submit(_decode, item), size))
        while pending:
            yield pending.popleft()[0].result()
    finally:
        pool.shutdown(cancel_futures=True)  # stopped early: the items not yet started are dropped


def is_one_file(out: Path) -> bool:
    """Whether ``--out`` names one ``.npz`` for every input (else a folder of one per input)."""
    return out.suffix.lower() == ".npz"


@contextmanager
def output_lock(out: Path):
    """Hold an exclusive lock on an extraction output for a run. Two runs writing one ``.npz``
    would each rewrite it from their own rows at every flush, silently dropping the other's;
    the second run is refused instead. The lock is a hidden empty file beside (``.npz``) or in
    (folder) the output, left in place: removing it could let a third run lock a new file."""
    lock_path = out.parent / f".{out.name}.lock" if is_one_file(out) else out / ".sslam_extract.lock"
    lock_path.parent.mkdir(parents=True, exist_ok=True)  # an unusable location fails here, first
    with open(lock_path, "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ValueError(f"{out}: another sslam extract is writing to it; wait for it to finish, "
                             "or choose another --out") from None
        yield


def check_output(out: str | os.PathLike) -> Path:
    """``out`` as a Path; refuses, before any work, an ``--out`` that cannot be written: a
    ``.npz`` that is a folder, or a folder (or a ``.npz``'s folder) that
    :func:`check_output_folder` refuses (an empty name among them)."""
    path = Path(out)
    if is_one_file(path) and path.is_dir():
        raise ValueError(f"--out {path}: it is a folder, and an output ending in .npz is one file (name a folder "
                         "without .npz for one .npz per input)")
    check_output_folder(path.parent if is_one_file(path) else out, path)
    return path


def _settings(model, granularity: str, padding: str, crop: bool, hop: int, autocast) -> dict:
    """What an output records of the run that wrote it; a resume with other settings is
    refused by name (see :func:`check_same_settings`)."""
    # The hop as given apart from the default (None: the default, or cropped, where it does
    # nothing and is None), so that outputs written before the hop was recorded compare as the
    # default's.
    recorded_hop = None if hop == window_hop(model, None) else hop
    frames, norm = model.input_window()
    return {"granularity": granularity, "padding": padding, "crop": bool(crop), "hop": recorded_hop,
            # the window and statistics (also in the fingerprint), to be named apart
            "target_length": frames, "norm": list(norm) if isinstance(norm, tuple) else norm,
            "encoder": encoder_fingerprint(model), "autocast": str(autocast)}


def _open_sink(out_path: Path, settings: dict):
    """The writer of ``out_path`` (one ``.npz`` file or a folder of them), with what a killed
    run left half-written there removed."""
    if is_one_file(out_path):
        remove_temporaries(out_path.parent, out_path.name)
        return FileSink(out_path, settings)
    remove_temporaries(out_path, recursive=True)
    return FolderSink(out_path, settings)


def _pending(items: list[Item], sink, out_path: Path, report: Report) -> tuple[list[Item], set[str]]:
    """The items still to embed, and the keys among them whose file changed since it was
    embedded; the items already done are counted in ``report.skipped``."""
    todo, again = [], set()
    for item in items:
        recorded = sink.source(item.key)
        if is_done(out_path, item.key, recorded, item.path):
            report.skipped += 1
        else:
            todo.append(item)
            if recorded is not None:
                again.add(item.key)
    return todo, again


def _embed_batch(model, batch: list[tuple[Item, torch.Tensor]], sink, report: Report, again: set[str],
                 granularity: str, embed_options: dict) -> None:
    """Embed the decoded 16 kHz clips of ``batch`` and hand each one's arrays to ``sink``."""
    # Files of similar length per call: its embeddings are padded to its longest clip.
    arrays, names = [None] * len(batch), None
    for group in length_groups([wave.numel() for _, wave in batch]):
        emb = model.embed([batch[i][1] for i in group], 16000, **embed_options)
        names = emb.label_names
        for row, i in enumerate(group):
            arrays[i] = arrays_of(emb, row, granularity)
    for (item, _), clip_arrays in zip(batch, arrays):
        sink.add(item.key, clip_arrays, names, source_of(item.path))
        report.done += 1
        report.changed += item.key in again


def run_extract(
    model,
    inputs: list[str],
    out: str,
    *,
    granularity: str = "utterance",
    batch_size: int = 16,
    padding: str = "official",
    crop: bool = False,
    hop: int | None = None,
    autocast: torch.dtype | None = None,
    workers: int = 2,
    manifest_root: str | None = None,
    flush_every: int = 20,
    progress: bool = True,
) -> Report:
    """Embed every input into ``out`` (a ``.npz`` file or a folder); see the module docstring."""
    from tqdm import tqdm

    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity={granularity!r}: choose one of {GRANULARITIES}")
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers={workers!r}: must be a positive number of decoding threads")
    batch_size = checked_batch_size(batch_size)
    check_crop_hop(crop, hop)
    hop = None if crop else window_hop(model, hop)
    out_path = check_output(out)
    items = collect_inputs(inputs, manifest_root)
    if not items:
        raise ValueError(f"no audio files found in {inputs}")
    settings = _settings(model, granularity, padding, crop, hop, autocast)
    embed_options = dict(padding=padding, crop=crop, hop=hop, batch_size=batch_size, autocast=autocast)
    with output_lock(out_path):
        sink = _open_sink(out_path, settings)
        report = Report()
        todo, again = _pending(items, sink, out_path, report)
        # A call embeds at most batch_size window lengths of audio: long files go alone, so that
        # their token sums (a ViT-B's: 0.55 GB per hour) are not held many at a time. Cropped,
        # a file is one window at most; decoded, it is whole (the ahead budget counts that).
        window_samples = samples_for_frames(model.input_window()[0])
        call_samples = batch_size * window_samples
        embedded = (lambda wave: min(wave.numel(), window_samples)) if crop else (lambda wave: wave.numel())
        batch: list[tuple[Item, torch.Tensor]] = []
        batches = 0
        bar = tqdm(total=len(todo), disable=not progress, unit="clip", file=sys.stderr)
        try:
            # Enough clips ahead to fill the next batch while this one is encoded.
            for item, wave, error in _prefetched(todo, workers, batch_size + workers, max_samples=call_samples):
                bar.update(1)
                if error is not None:
                    report.failed.append((item.key, error))
                    bar.write(_shown(f"FAILED {error}"), file=sys.stderr)
                    continue
                batch.append((item, wave))
                if len(batch) == batch_size or sum(embedded(w) for _, w in batch) >= call_samples:
                    _embed_batch(model, batch, sink, report, again, granularity, embed_options)
                    batch = []
                    batches += 1
                    if batches % flush_every == 0:
                        sink.flush()
            if batch:
                _embed_batch(model, batch, sink, report, again, granularity, embed_options)
        finally:
            bar.close()
            sink.flush()
        return report
