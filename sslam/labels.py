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
import io
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import Dataset

from .audio import AudioError, load_audio
from .data import MIN_SAMPLES, manifest_entries, text_lines
from .features import check_min_length


class LabelError(ValueError):
    """A labelled split could not be read (the message names the file, line and reason)."""


@dataclass
class LabeledSplit:
    """A split: ``items`` are file paths (or a synthetic dataset), ``targets`` (N, C) multi-hot
    float32, ``class_names`` (C,), ``multilabel`` whether a clip may have several labels;
    ``skipped``: manifest entries left out for being shorter than :data:`sslam.data.MIN_SAMPLES`."""

    name: str
    items: list[Path] | Dataset
    targets: torch.Tensor
    class_names: list[str]
    multilabel: bool
    skipped: int = 0

    def __len__(self) -> int:
        return self.targets.shape[0]


def read_text(path: Path) -> str:
    """A label file's text; a byte-order mark (Windows editors write one) is not part of it.
    Unreadable or not UTF-8: ``LabelError`` naming the file."""
    try:
        return path.read_text(encoding="utf-8-sig")
    except OSError as exc:
        raise LabelError(f"{path}: cannot read ({exc.strerror or exc})") from exc
    except UnicodeDecodeError as exc:
        raise LabelError(f"{path}: not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset {exc.start})") from None


def _csv_rows(path: Path) -> list[tuple[int, list[str]]]:
    """(line number, fields) of every CSV row; a quoted field may hold line breaks."""
    reader = csv.reader(io.StringIO(read_text(path), newline=""))
    rows, start = [], 1
    try:
        for row in reader:
            rows.append((start, row))
            start = reader.line_num + 1
    except csv.Error as exc:  # e.g. an unterminated quote that swallowed the rest of the file
        raise LabelError(f"{path}:{start}: unreadable CSV ({exc}; an unmatched quote?)") from None
    return rows


def _without_trailing_empty(fields: list[str], keep: int) -> list[str]:
    """``fields`` without the empty fields at its end (a spreadsheet's trailing commas), but at
    least its first ``keep``."""
    end = len(fields)
    while end > keep and not fields[end - 1].strip():
        end -= 1
    return fields[:end]


def is_descriptor_row(fields: list[str]) -> bool:
    """Whether CSV ``fields`` read as a header-less descriptor row: an integer index, then a mid
    (one word: '/m/09x0r', SPASS's 'music'), not a name such as '1,000 Hz tone'."""
    try:
        int(fields[0])
    except (IndexError, ValueError):
        return False
    return len(fields) > 1 and len(fields[1].split()) == 1


def read_descriptors(path: str | os.PathLike) -> list[tuple[str, str]]:
    """``index,mid,display_name`` rows -> [(mid, display_name)] in index order. The header may be
    left out, as in the official SPASS files: the official task reads every line as index, mid
    and the rest; a row without a display name is then named by its mid."""
    path = Path(path)
    rows = _csv_rows(path)
    headed = bool(rows) and [c.strip().lower() for c in rows[0][1][:3]] == ["index", "mid", "display_name"]
    if not headed and not (rows and is_descriptor_row(rows[0][1])):
        where = f"{path}:{rows[0][0]}" if rows else str(path)
        raise LabelError(f"{where}: expected a header 'index,mid,display_name' or rows 'index,mid[,display_name]'")
    # A spreadsheet's trailing comma names no column. Without a header the fields after the mid
    # are the display name, as with a three-column one.
    columns = len(_without_trailing_empty(rows[0][1], 0)) if headed else 3
    least, expected = (3, "index,mid,display_name") if headed else (2, "index,mid[,display_name]")
    entries, seen = [], {}
    for number, row in rows[1:] if headed else rows:
        row = _without_trailing_empty(row, least)
        if not row:
            continue
        if len(row) < least:
            raise LabelError(f"{path}:{number}: expected {expected}")
        if len(row) > columns and columns > 3:
            raise LabelError(f"{path}:{number}: {len(row)} fields for the {columns} columns of the header; quote "
                             "a display name that holds commas")
        # Three columns: the fields after the mid are one display name whose commas were not
        # quoted ("Male speech, man speaking").
        name = ",".join(row[2:]) if columns == 3 else row[2]
        try:
            entry = (int(row[0]), row[1].strip(), name.strip() or row[1].strip())
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


def label_span(known) -> int:
    """How many comma-separated pieces the longest ``known`` label spans."""
    return 1 + max((label.count(",") for label in known), default=0)


def split_labels(text: str, known=(), span: int | None = None) -> list[str]:
    """The labels of one field, separated by ';' or ','; a comma inside a ``known`` label does
    not separate (AudioSet display names such as 'Male speech, man speaking' hold commas): at
    each label the longest known one is taken. ``span``: :func:`label_span` of ``known``
    (pass it when splitting many fields)."""
    span = label_span(known) if span is None else span
    labels = []
    for part in text.split(";"):
        pieces = part.split(",")
        i = 0
        while i < len(pieces):
            longest = min(len(pieces), i + span)
            end = next((j for j in range(longest, i + 1, -1) if ",".join(pieces[i:j]).strip() in known), i + 1)
            label = ",".join(pieces[i:end]).strip()
            if label:
                labels.append(label)
            i = end
    return labels


def _targets(label_lists: list[list[str]], lookup: dict[str, int], num_classes: int, where: list[str],
             classes_from: str = "") -> torch.Tensor:
    """(clips, classes) 0/1 targets; ``classes_from`` says where the classes came from (for
    the message naming a label that is not one)."""
    targets = torch.zeros(len(label_lists), num_classes)
    for i, labels in enumerate(label_lists):
        for label in labels:
            if label not in lookup:
                raise LabelError(f"{where[i]}: unknown label {label!r}{classes_from}")
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


def shared_clips(train: LabeledSplit, test: LabeledSplit) -> list[Path]:
    """The test split's clips that are training clips too (the same file, its folder however
    written). Only training clips of a test clip's file name are resolved: a resolve of each of
    AudioSet's 2M would take half a minute."""
    if not isinstance(train.items, list) or not isinstance(test.items, list):  # synthetic splits
        return []
    names = {Path(path).name for path in test.items}
    seen = {os.path.realpath(path) for path in train.items if Path(path).name in names}
    return [path for path in test.items if os.path.realpath(path) in seen]


def _check_files(name: str, paths: list[Path], hint: str) -> None:
    """Every listed file is there; else the missing ones are named, with ``hint`` on where
    relative paths are read from."""
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise LabelError(f"{name}: {len(missing)} audio file(s) not found, e.g. {missing[:3]} ({hint})")


def clip_names(path: Path) -> set[str]:
    """The ids a label file may give the clip at ``path``: its file name or its stem, in any
    case ('x.1.wav': 'x.1.wav' or 'x.1')."""
    return {path.name.casefold(), path.stem.casefold()}


def clip_id_key(clip_id: str) -> str:
    """A label file's clip id as :func:`clip_names` lists them: without folders, in one case."""
    return os.path.basename(clip_id.strip()).casefold()


def _lbl_fields(line: str, known, names: set[str], every_name: set[str], where: str) -> tuple[str, str]:
    """``(id, labels)`` of a .lbl line ``id<TAB>label,label,...`` for the clip with ``names``;
    a line that would lose labels is an error: more tab fields (only the first would be read),
    or labels without a tab-separated id (the clip would get none)."""
    fields = line.rstrip("\t\r\n").split("\t")  # a trailing tab holds nothing
    if len(fields) > 2:
        raise LabelError(f"{where}: {len(fields)} tab-separated fields; expected 'id<TAB>labels' with the "
                         "labels separated by commas")
    if len(fields) == 2:
        return fields[0].strip(), fields[1]
    text = line.strip()
    if clip_id_key(text) not in names:  # not this clip's id: perhaps labels, or an id and labels
        first, *after_space = text.split(None, 1)
        # This clip's id, a space, then anything: labels known or not (another descriptors file).
        # (Unless the whole text names another clip: the order check reports that.)
        id_then_text = bool(after_space) and clip_id_key(first) in names and clip_id_key(text) not in every_name
        if id_then_text or any(label in known for part in [text, *after_space] for label in split_labels(part, known)):
            raise LabelError(f"{where}: labels without an id in {text!r}; expected 'id<TAB>labels'")
    return text, ""


def read_fairseq_split(tsv: str | os.PathLike, descriptors: str | os.PathLike, lbl: str | os.PathLike | None = None,
                       root: str | None = None) -> LabeledSplit:
    """A fairseq manifest with its ``.lbl`` file (default: the manifest's name with ``.lbl``).
    As in the official fine-tuning task, entries whose size column is under
    :data:`sslam.data.MIN_SAMPLES` are skipped with their label lines."""
    tsv = Path(tsv)
    lbl = Path(lbl) if lbl else tsv.with_suffix(".lbl")
    try:
        base, relative, skipped = manifest_entries(tsv, root, MIN_SAMPLES)
    except ValueError as exc:  # its message names the file (and the line)
        raise LabelError(str(exc)) from None
    paths = [base / rel for rel in relative]
    # Each label line keeps its number in the file (blank lines skipped) for the messages.
    label_lines = [(number, line) for number, line in enumerate(text_lines(read_text(lbl)), 1) if line.strip()]
    if len(label_lines) != len(paths) + len(skipped):
        raise LabelError(f"{lbl}: {len(label_lines)} label lines for the {len(paths) + len(skipped)} entries of {tsv}")
    dropped = set(skipped)
    label_lines = [line for i, line in enumerate(label_lines) if i not in dropped]
    classes = read_descriptors(descriptors)
    lookup = _lookup(classes)
    every_name, span = set().union(*map(clip_names, paths)), label_span(lookup)
    label_lists, where = [], []
    for path, (number, line) in zip(paths, label_lines):
        names = clip_names(path)
        clip_id, labels = _lbl_fields(line, lookup, names, every_name, f"{lbl}:{number}")
        # Labels pair with clips by line; an id naming another of the clips (by file name or
        # stem, through a folder, in other case) means another order.
        if clip_id_key(clip_id) not in names and clip_id_key(clip_id) in every_name:
            raise LabelError(f"{lbl}:{number}: labels of {clip_id!r} where the manifest {tsv} has {path.name}; the "
                             ".lbl lines must follow the manifest's order")
        label_lists.append(split_labels(labels, lookup, span))
        where.append(f"{lbl}:{number}")
    _check_unique(paths, where)
    _check_files(str(tsv), paths, "paths are read under the manifest's first line, the root, unless --root is given")
    targets = _targets(label_lists, lookup, len(classes), where, f" (not in {descriptors})")
    return LabeledSplit(tsv.stem, paths, targets, [name for _, name in classes], bool((targets.sum(1) > 1).any()),
                        skipped=len(skipped))


def read_csv_split(path: str | os.PathLike, class_names: list[str] | None = None,
                   descriptors: str | os.PathLike | None = None) -> LabeledSplit:
    """A ``path,labels`` CSV. The classes are those of ``descriptors`` (labels given as mids or
    display names), else ``class_names`` (e.g. those of the train split), else the sorted labels
    found here."""
    path = Path(path)
    rows = _csv_rows(path)
    if not rows or [c.strip().lower() for c in rows[0][1][:2]] != ["path", "labels"]:
        raise LabelError(f"{path}: expected a header 'path,labels'")
    columns = len([name for name in rows[0][1] if name.strip()])  # a trailing comma names no column
    if descriptors:
        classes = read_descriptors(descriptors)
        lookup, names = _lookup(classes), [name for _, name in classes]
    else:
        names = class_names
        lookup = {n: i for i, n in enumerate(names or ())}
    paths, label_lists, where, span = [], [], [], label_span(lookup)
    for number, row in rows[1:]:
        if not any(field.strip() for field in row):
            continue
        if not row[0].strip():
            raise LabelError(f"{path}:{number}: labels without a path")
        # Wider than the header (its trailing commas included), even by an empty field: some
        # field then sits in another's column (a label read as the fold, or one dropped).
        filled = len([field for field in row if field.strip()])
        if columns > 2 and (len(row) > len(rows[0][1]) or filled > columns):
            raise LabelError(f"{path}:{number}: {len(row)} fields for the {columns} columns of the header; "
                             "quote a labels field that holds commas")
        file = Path(row[0].strip())
        paths.append(file if file.is_absolute() else path.parent / file)
        # With only path and labels, unquoted commas separate labels (the fields are joined
        # again: a comma inside a known display name does not); else the other columns (a
        # fold, a split) are not labels.
        field = ",".join(row[1:]) if columns == 2 else "".join(row[1:2])
        if "\n" in field or "\r" in field:
            raise LabelError(f"{path}:{number}: a labels field spans lines; separate labels with ';' or ','")
        label_lists.append(split_labels(field, lookup, span))
        where.append(f"{path}:{number}")
    if not paths:
        raise LabelError(f"{path}: empty split (no rows)")
    _check_unique(paths, where)
    if names is None:
        names = sorted({label for labels in label_lists for label in labels})
        lookup = {n: i for i, n in enumerate(names)}
    _check_files(str(path), paths, f"relative paths are read from the CSV's folder, {path.parent}")
    if descriptors:
        classes_from = f" (not in {descriptors})"
    elif class_names is not None:
        classes_from = " (not among the training split's classes; --label-descriptors names every class)"
    else:
        classes_from = ""
    targets = _targets(label_lists, lookup, len(names), where, classes_from)
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
    if path.suffix.lower() == ".tsv":
        if not descriptors:
            raise LabelError(f"{spec}: a fairseq manifest needs --label-descriptors (index,mid,display_name CSV)")
        return read_fairseq_split(path, descriptors, root=root)
    if path.suffix.lower() == ".csv":
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
                check_min_length(wave, str(self.split.items[i]))  # not "clip 4" of a batch later
            except AudioError as exc:
                raise LabelError(f"{self.split.name}: {exc}") from exc
        if self.max_samples is not None:
            wave = wave[: self.max_samples]
        return wave, self.split.targets[i]
