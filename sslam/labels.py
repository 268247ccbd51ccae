"""Labelled splits for evaluation, in the formats users have.

* fairseq / EAT: ``split.tsv`` (first line the root folder, then ``relpath<TAB>size``), the
  matching ``split.lbl`` (one line per clip, same order: ``id<TAB>label,label,...``) and a
  ``label_descriptors.csv`` (``index,mid,display_name``); labels may be written as mids or as
  display names.
* a plain CSV with a header ``path,labels`` (labels separated by ``;`` or ``,`` inside quotes,
  or by unquoted commas when the header has just these two columns; further named columns, an
  ESC-50 fold say, are ignored; relative paths are relative to the CSV's folder). The classes
  are the descriptors' when given (labels then as mids or display names, commas inside a
  display name kept), otherwise the sorted set of labels of the training split.
* the built-in benchmark: ``synth:mono`` and ``synth:poly`` (:mod:`sslam.synth`).
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import Dataset

from .audio import AudioError, load_audio
from .data import manifest_paths


class LabelError(ValueError):
    """A labelled split could not be read (the message names the file, line and reason)."""


@dataclass
class LabeledSplit:
    """A split: ``items`` are file paths (or a synthetic dataset), ``targets`` (N, C) multi-hot
    float32, ``class_names`` (C,), ``multilabel`` whether a clip may have several labels."""

    name: str
    items: list[Path] | Dataset
    targets: torch.Tensor
    class_names: list[str]
    multilabel: bool

    def __len__(self) -> int:
        return self.targets.shape[0]


def read_descriptors(path: str | os.PathLike) -> list[tuple[str, str]]:
    """``index,mid,display_name`` rows -> [(mid, display_name)] in index order."""
    path = Path(path)
    try:
        rows = list(csv.reader(path.read_text(encoding="utf-8-sig").splitlines()))
    except OSError as exc:
        raise LabelError(f"{path}: cannot read label descriptors ({exc})") from exc
    if not rows or [c.strip().lower() for c in rows[0][:3]] != ["index", "mid", "display_name"]:
        raise LabelError(f"{path}: expected a header 'index,mid,display_name'")
    entries, seen = [], {}
    for number, row in enumerate(rows[1:], start=2):
        if not row:
            continue
        if len(row) < 3:
            raise LabelError(f"{path}:{number}: expected index,mid,display_name")
        try:
            entry = (int(row[0]), row[1].strip(), row[2].strip())
        except ValueError:
            raise LabelError(f"{path}:{number}: index {row[0]!r} is not an integer") from None
        # A repeated index or mid would silently map two classes onto one column.
        for kind, key in (("index", entry[0]), ("mid", entry[1])):
            if (kind, key) in seen:
                raise LabelError(f"{path}:{number}: duplicate {kind} {key!r} (first on line {seen[kind, key]})")
            seen[kind, key] = number
        entries.append(entry)
    entries.sort()
    if [e[0] for e in entries] != list(range(len(entries))):
        raise LabelError(f"{path}: indices must be 0..{len(entries) - 1} without gaps")
    return [(mid, name) for _, mid, name in entries]


_AMBIGUOUS = -1  # lookup value of a display name that several classes share


def _lookup(classes: list[tuple[str, str]]) -> dict[str, int]:
    """Column of every mid and display name of ``classes`` [(mid, display_name)]."""
    lookup = {}
    for i, (_, name) in enumerate(classes):
        lookup[name] = _AMBIGUOUS if name in lookup else i
    lookup.update({mid: i for i, (mid, _) in enumerate(classes)})  # mids are unique and win
    return lookup


def split_labels(text: str, known=()) -> list[str]:
    """The labels of one field, separated by ';' or ','; a comma inside a ``known`` label does
    not separate (AudioSet display names such as 'Male speech, man speaking' hold commas): at
    each label the longest known one is taken."""
    labels = []
    for part in text.split(";"):
        pieces = part.split(",")
        i = 0
        while i < len(pieces):
            end = next((j for j in range(len(pieces), i + 1, -1) if ",".join(pieces[i:j]).strip() in known), i + 1)
            label = ",".join(pieces[i:end]).strip()
            if label:
                labels.append(label)
            i = end
    return labels


def _targets(label_lists: list[list[str]], lookup: dict[str, int], num_classes: int, where: list[str]) -> torch.Tensor:
    targets = torch.zeros(len(label_lists), num_classes)
    for i, labels in enumerate(label_lists):
        for label in labels:
            if label not in lookup:
                raise LabelError(f"{where[i]}: unknown label {label!r}")
            if lookup[label] == _AMBIGUOUS:
                raise LabelError(f"{where[i]}: label {label!r} is the display name of several classes; use its mid")
            targets[i, lookup[label]] = 1.0
    return targets


def _check_unique(paths: list[Path], where: list[str]) -> None:
    """A clip listed twice would be trained on or scored twice, perhaps with other labels."""
    first: dict[str, str] = {}
    for path, at in zip(paths, where):
        key = os.path.realpath(path)  # written relative and absolute, or through a link
        if key in first:
            raise LabelError(f"{at}: {path} is listed again (first at {first[key]})")
        first[key] = at


def _check_files(name: str, paths: list[Path]) -> None:
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise LabelError(f"{name}: {len(missing)} audio file(s) not found, e.g. {missing[:3]}")


def read_fairseq_split(tsv: str | os.PathLike, descriptors: str | os.PathLike, lbl: str | os.PathLike | None = None,
                       root: str | None = None) -> LabeledSplit:
    """A fairseq manifest with its ``.lbl`` file (default: the manifest's name with ``.lbl``)."""
    tsv = Path(tsv)
    lbl = Path(lbl) if lbl else tsv.with_suffix(".lbl")
    try:
        paths = manifest_paths(tsv, root)
        # utf-8-sig: a byte-order mark (Windows editors write one) is not part of the first line.
        # Each label line keeps its number in the file (blank lines skipped) for the messages.
        label_lines = [(number, line) for number, line in enumerate(lbl.read_text(encoding="utf-8-sig").splitlines(), 1)
                       if line.strip()]
    except OSError as exc:
        raise LabelError(f"cannot read {exc.filename}: {exc.strerror}") from exc
    except ValueError as exc:  # the manifest itself: its message names the file and line
        raise LabelError(str(exc)) from None
    if len(label_lines) != len(paths):
        raise LabelError(f"{lbl}: {len(label_lines)} label lines for {len(paths)} clips in {tsv}")
    classes = read_descriptors(descriptors)
    lookup = _lookup(classes)
    stems = {p.stem for p in paths}
    label_lists, where = [], []
    for path, (number, line) in zip(paths, label_lines):
        parts = line.split("\t")
        clip_id = parts[0].strip()
        # Labels pair with clips by line; an id naming another of the clips means another order.
        if clip_id != path.stem and clip_id in stems:
            raise LabelError(f"{lbl}:{number}: labels of {clip_id!r} where the manifest {tsv} has {path.name}; the "
                             ".lbl lines must follow the manifest's order")
        label_lists.append(split_labels(parts[1] if len(parts) > 1 else "", lookup))
        where.append(f"{lbl}:{number}")
    _check_unique(paths, where)
    _check_files(str(tsv), paths)
    targets = _targets(label_lists, lookup, len(classes), where)
    return LabeledSplit(tsv.stem, paths, targets, [name for _, name in classes], bool((targets.sum(1) > 1).any()))


def read_csv_split(path: str | os.PathLike, class_names: list[str] | None = None,
                   descriptors: str | os.PathLike | None = None) -> LabeledSplit:
    """A ``path,labels`` CSV. The classes are those of ``descriptors`` (labels given as mids or
    display names), else ``class_names`` (e.g. those of the train split), else the sorted labels
    found here."""
    path = Path(path)
    try:
        rows = list(csv.reader(path.read_text(encoding="utf-8-sig").splitlines()))
    except OSError as exc:
        raise LabelError(f"{path}: cannot read ({exc})") from exc
    if not rows or [c.strip().lower() for c in rows[0][:2]] != ["path", "labels"]:
        raise LabelError(f"{path}: expected a header 'path,labels'")
    columns = len([name for name in rows[0] if name.strip()])  # a trailing comma names no column
    if descriptors:
        classes = read_descriptors(descriptors)
        lookup, names = _lookup(classes), [name for _, name in classes]
    else:
        names = class_names
        lookup = {n: i for i, n in enumerate(names or ())}
    paths, label_lists, where = [], [], []
    for number, row in enumerate(rows[1:], start=2):
        if not row or not row[0].strip():
            continue
        filled = len([field for field in row if field.strip()])
        if columns > 2 and filled > columns:
            raise LabelError(f"{path}:{number}: {filled} fields for the {columns} columns of the header; "
                             "quote a labels field that holds commas")
        file = Path(row[0].strip())
        paths.append(file if file.is_absolute() else path.parent / file)
        # With only path and labels, unquoted commas separate labels; else the other columns
        # (a fold, a split) are not labels.
        fields = row[1:] if columns == 2 else row[1:2]
        label_lists.append([label for field in fields for label in split_labels(field, lookup)])
        where.append(f"{path}:{number}")
    if not paths:
        raise LabelError(f"{path}: empty split (no rows)")
    _check_unique(paths, where)
    if names is None:
        names = sorted({label for labels in label_lists for label in labels})
        lookup = {n: i for i, n in enumerate(names)}
    _check_files(str(path), paths)
    targets = _targets(label_lists, lookup, len(names), where)
    return LabeledSplit(path.stem, paths, targets, list(names), bool((targets.sum(1) > 1).any()))


def synth_split(kind: str, train: bool, num_clips: int | None = None, seed: int = 0, seconds: float = 4.0) -> LabeledSplit:
    """The built-in benchmark: kind 'mono' (one source per clip, single-label) or 'poly'
    (2-4 overlapping sources, multi-label)."""
    from .synth import benchmark

    if kind not in ("mono", "poly"):
        raise LabelError(f"synth:{kind}: choose synth:mono or synth:poly")
    name = f"{kind}_{'train' if train else 'test'}"
    data = benchmark(name, num_clips=num_clips, seed=seed, seconds=seconds)
    return LabeledSplit(name, data, data.targets(), list(data.class_names), kind == "poly")


def read_split(spec: str, *, train: bool, descriptors: str | None = None, class_names: list[str] | None = None,
               root: str | None = None, num_clips: int | None = None, seed: int = 0) -> LabeledSplit:
    """Any supported split: 'synth:mono' / 'synth:poly', a fairseq .tsv (needs ``descriptors``),
    or a ``path,labels`` CSV."""
    if spec.startswith("synth:"):
        return synth_split(spec.split(":", 1)[1], train, num_clips, seed)
    path = Path(spec)
    if path.suffix == ".tsv":
        if not descriptors:
            raise LabelError(f"{spec}: a fairseq manifest needs --label-descriptors (index,mid,display_name CSV)")
        return read_fairseq_split(path, descriptors, root=root)
    if path.suffix == ".csv":
        return read_csv_split(path, class_names, descriptors)
    raise LabelError(f"{spec}: expected synth:mono, synth:poly, a .tsv manifest or a path,labels .csv")


class SplitAudio(Dataset):
    """Waveforms (16 kHz, float32) and targets of a split, for DataLoader workers."""

    def __init__(self, split: LabeledSplit, max_samples: int | None = None):
        self.split, self.max_samples = split, max_samples

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, i: int):
        if isinstance(self.split.items, Dataset):
            wave = self.split.items[i][0]
        else:
            try:
                wave, _ = load_audio(self.split.items[i], sample_rate=16000)
            except AudioError as exc:
                raise LabelError(f"{self.split.name}: {exc}") from exc
        if self.max_samples is not None:
            wave = wave[: self.max_samples]
        return wave, self.split.targets[i]
