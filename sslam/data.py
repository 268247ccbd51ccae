"""Training data: where clips come from, how they are decoded, and how batches are drawn.

Sources: a fairseq ``.tsv`` manifest (first line the root folder, then ``relpath<TAB>size``;
the root can be overridden), a folder of audio files, or the built-in synthetic scenes
(:mod:`sslam.synth`, the default). Decoding and resampling to 16 kHz run in DataLoader workers;
features, mixing and masks are computed later on the training device.

Batches are drawn so that a run is reproducible and independent of how it is split: every
optimizer step consumes one *global batch* of ``batch_size * world_size * accum_steps`` clips
from a seeded per-epoch permutation, and slot ``k * world_size + rank`` (micro-step ``k`` of
rank ``rank``) takes its ``batch_size`` clips from it. One process with ``accum_steps = W`` sees
exactly the micro-batches that W processes see in one step.

An unreadable file is replaced by the next readable clip of the dataset (so batch shapes stay
equal across ranks) and reported by name; the trainer counts them and stops past a cap.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import Dataset, Sampler

from .audio import AUDIO_SUFFIXES, AudioError, load_audio
from .features import FRAME_LENGTH, FRAME_SHIFT, SAMPLE_RATE, check_min_length, pad_clips

# The most worker processes (or threads) a setting may ask for: more than any machine has cores;
# a loader starts every one of them before the first batch.
MAX_WORKERS = 1024


def text_lines(text: str) -> list[str]:
    """``text`` split at line ends (\\n, \\r\\n, \\r) only: ``str.splitlines`` also splits at
    characters a file name may hold (U+2028, NEL, form feed)."""
    return text.replace("\r\n", "\n").replace("\r", "\n").split("\n")


# fairseq's min_sample_size in the EAT / SSLAM tasks, for pretraining and fine-tuning splits alike
# (SPEC 1.1): manifest entries whose size column is smaller are skipped.
MIN_SAMPLES = 10_000


def manifest_entries(path: str | os.PathLike, root: str | None = None,
                     min_samples: int = 0) -> tuple[Path, list[str], list[int]]:
    """(root folder, relative paths, skipped entries) of a fairseq manifest: its first line is
    the root (``root`` replaces it), then one ``relative/path<TAB>size`` line per clip. Entries
    whose size column is below ``min_samples`` are skipped, as fairseq does
    (``min_sample_size``); the skipped ones are given by their positions among the entries (0
    for the first clip line), which a label file's lines follow."""
    path = Path(path)
    try:
        # utf-8-sig: a byte-order mark (editors on Windows add one) must not end up in the root.
        # surrogateescape: a path in another encoding keeps its bytes, as the file system has them.
        lines = text_lines(path.read_text(encoding="utf-8-sig", errors="surrogateescape"))
    except OSError as exc:
        raise ValueError(f"{path}: cannot read manifest ({exc})") from exc
    if not lines or not lines[0].strip():
        raise ValueError(f"{path}: the first line must be the root folder of the audio files")
    if "\t" in lines[0]:
        # A clip line where the root should be: the root line is missing. Taking it as the root
        # would drop that clip and prefix every other path with it.
        raise ValueError(
            f"{path}:1: the first line must be the root folder of the audio files, got a clip "
            f"entry {lines[0]!r} (is the root line missing?)"
        )
    relative, skipped = [], []
    for number, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        parts = line.rstrip().split("\t")  # a trailing tab (spreadsheet exports) holds nothing
        if not parts[0].strip():
            raise ValueError(f"{path}:{number}: missing relative path")
        if "\0" in parts[0]:  # no file name holds one: the manifest is damaged
            raise ValueError(f"{path}:{number}: the path holds a NUL byte")
        if len(parts) > 2:  # fairseq's reader asserts two
            raise ValueError(f"{path}:{number}: {len(parts)} tab-separated columns; expected 'path<TAB>size'")
        if len(parts) > 1 and parts[1].strip():
            try:
                size = int(parts[1])
            except ValueError:
                raise ValueError(f"{path}:{number}: size column {parts[1]!r} is not an integer") from None
            if size < min_samples:
                skipped.append(len(relative) + len(skipped))
                continue
        relative.append(parts[0].strip())
    if not relative:
        short = (f": all {len(skipped)} entries have a size column under {min_samples} samples (fairseq's "
                 "min_sample_size)") if skipped else " (no clips listed)"
        raise ValueError(f"{path}: empty split{short}")
    return Path(root if root else lines[0].strip()), relative, skipped


def manifest_paths(path: str | os.PathLike, root: str | None = None, min_samples: int = 0) -> list[Path]:
    """Audio paths of a fairseq manifest (see :func:`manifest_entries`)."""
    base, relative, _ = manifest_entries(path, root, min_samples)
    return [base / rel for rel in relative]


def _unlistable(exc: OSError):
    """os.walk's onerror: a folder it cannot list would be left out of the run without a word."""
    raise ValueError(f"{exc.filename}: cannot list this folder ({exc.strerror}); its audio would be "
                     "left out") from None


def folder_paths(folder: str | os.PathLike) -> list[Path]:
    """The audio files under ``folder`` and the folders it links to, sorted. Entries that only
    look like files (a broken link, a pipe) are listed too, so that reading them reports them
    instead of skipping them."""
    folder = Path(folder)
    paths, seen, tops = [], set(), [folder]
    # Links to folders are followed (as fairseq's manifest script does) once the folders
    # themselves are walked, in name order: a folder reached twice (or again through a link
    # loop) is listed once, under its own path where the walk meets it.
    while tops:
        for top, folders, files in os.walk(tops.pop(0), onerror=_unlistable):
            real = os.path.realpath(top)
            if real in seen:
                folders[:] = []
                continue
            seen.add(real)
            folders.sort()
            tops += [Path(top) / name for name in folders if (Path(top) / name).is_symlink()]
            paths += [Path(top) / name for name in files if Path(name).suffix.lower() in AUDIO_SUFFIXES]
    paths.sort()
    if not paths:
        raise ValueError(f"{folder}: no audio files ({', '.join(sorted(AUDIO_SUFFIXES))})")
    return paths


def samples_for_frames(frames: int) -> int:
    """16-kHz samples that produce ``frames`` Kaldi frames (more would be cropped anyway)."""
    return (frames - 1) * FRAME_SHIFT + FRAME_LENGTH


class AudioFiles(Dataset):
    """Decoded 16-kHz mono clips of a list of files, cropped to ``max_samples``.

    ``__getitem__`` returns ``(waveform float32 (n,), index, failures)`` where ``failures``
    lists ``(path, reason)`` of unreadable files skipped on the way to a readable one, and a
    waveform of None when ``max_tries`` files in a row (or all of them) were unreadable: the
    trainer then stops on its count of them (an error raised here would reach it wrapped in a
    data-loader worker's traceback)."""

    def __init__(self, paths: list[Path], max_samples: int | None = None, max_tries: int = 20, skipped: int = 0):
        if not paths:
            raise ValueError("AudioFiles: no paths")
        self.paths, self.max_samples, self.max_tries = list(paths), max_samples, max_tries
        self.skipped = skipped  # manifest entries under min_samples, for the run's log

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        failures = []
        for attempt in range(min(self.max_tries, len(self.paths))):
            path = self.paths[(index + attempt) % len(self.paths)]
            try:
                # The fast resampler (within 1e-6 of the reference) keeps one core ahead of a GPU;
                # only the part of a long file that the crop keeps is decoded. Its mean is then
                # removed rather than the whole file's (SPEC 1.1): a constant, which the fbank's
                # per-frame DC removal takes out anyway, so the features differ only by rounding.
                wave, _ = load_audio(path, sample_rate=SAMPLE_RATE, exact=False, max_samples=self.max_samples)
                check_min_length(wave, str(path))
            except AudioError as exc:
                failures.append((str(path), str(exc)))
                continue
            return wave, index, failures
        return None, index, failures


class SynthClips(Dataset):
    """The built-in synthetic scenes (:func:`sslam.synth.default_pretraining_data`)."""

    def __init__(self, num_clips: int, seconds: float, seed: int = 0, max_samples: int | None = None):
        from .synth import default_pretraining_data

        self.data = default_pretraining_data(num_clips, seconds, seed)
        self.max_samples = max_samples

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int):
        wave = self.data[index][0]
        if self.max_samples is not None:
            wave = wave[: self.max_samples]
        return wave, index, []


@dataclass
class Batch:
    """Padded 16-kHz waveforms (B, N), their lengths (B,), dataset indices (B,), and the files
    that had to be skipped to fill it. Waveforms and lengths are None when some clip found no
    readable file (see :class:`AudioFiles`)."""

    waveforms: torch.Tensor | None
    lengths: torch.Tensor | None
    indices: torch.Tensor
    failures: list
    exhausted: bool = False  # a stand-in: some clip found no readable file (see silent_stand_in)

    def pin_memory(self):
        if self.waveforms is not None:
            self.waveforms = self.waveforms.pin_memory()
        return self


def collate(items) -> Batch:
    waves, indices, failures = zip(*items)
    failures = [f for fs in failures for f in fs]
    if any(w is None for w in waves):
        return Batch(None, None, torch.tensor(indices), failures)
    return Batch(*pad_clips(waves), torch.tensor(indices), failures)


def silent_stand_in(batch: Batch, samples: int) -> Batch:
    """``batch``, one of whose clips found no readable file, with ``samples`` of silence per
    clip: what a process feeds to the step whose collectives the other processes are in, so
    that all of them can stop after it together."""
    size = len(batch.indices)
    return Batch(torch.zeros(size, samples), torch.full((size,), samples), batch.indices, batch.failures, exhausted=True)


class GlobalBatchSampler(Sampler):
    """Yields this rank's micro-batches of dataset indices, step after step (see the module
    docstring): epoch e uses the permutation seeded by (seed, e); incomplete global batches at
    the end of an epoch are dropped. ``start`` = (epoch, step within the epoch) resumes exactly."""

    def __init__(self, size: int, batch_size: int, world_size: int = 1, rank: int = 0, accum_steps: int = 1,
                 seed: int = 0, start: tuple[int, int] = (0, 0)):
        for name, value, low in (("size", size, 1), ("batch_size", batch_size, 1), ("world_size", world_size, 1),
                                 ("accum_steps", accum_steps, 1), ("rank", rank, 0)):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"GlobalBatchSampler: {name} must be an int >= {low}, got {value!r}")
        if rank >= world_size:  # its slots would overlap another step's (or run past the epoch)
            raise ValueError(f"GlobalBatchSampler: rank {rank} must be < world_size {world_size}")
        start = tuple(start)
        if len(start) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in start):
            raise ValueError(f"GlobalBatchSampler: start must be (epoch, step) ints >= 0, got {start!r}")
        self.size, self.batch_size = size, batch_size
        self.world_size, self.rank, self.accum_steps, self.seed = world_size, rank, accum_steps, seed
        self.global_batch = batch_size * world_size * accum_steps
        if self.global_batch > size:
            raise ValueError(f"data.batch_size={batch_size} x {world_size} process(es) x {accum_steps} accumulation "
                             f"step(s): a global batch of {self.global_batch} clips, more than the {size} of the data")
        self.steps_per_epoch = size // self.global_batch
        # A step past the end of an epoch (saved with a larger epoch, e.g. before the dataset
        # shrank) carries into the next epochs exactly as position() counts it; iterating from
        # it unnormalised would silently restart at the next epoch's step 0 instead.
        self.start = divmod(start[0] * self.steps_per_epoch + start[1], self.steps_per_epoch)

    def permutation(self, epoch: int) -> torch.Tensor:
        # Modulo 2**64, which manual_seed applies to negative seeds anyway: any int seed works.
        g = torch.Generator().manual_seed((self.seed * 1_000_003 + epoch) % 2**64)
        return torch.randperm(self.size, generator=g)

    def position(self, steps_done: int) -> tuple[int, int]:
        """(epoch, step within epoch) after ``steps_done`` optimizer steps from the start."""
        epoch, step = self.start
        total = epoch * self.steps_per_epoch + step + steps_done
        return divmod(total, self.steps_per_epoch)

    def __iter__(self):
        epoch, step = self.start
        while True:
            perm = self.permutation(epoch)
            for s in range(step, self.steps_per_epoch):
                base = s * self.global_batch
                for k in range(self.accum_steps):
                    slot = k * self.world_size + self.rank
                    lo = base + slot * self.batch_size
                    yield perm[lo : lo + self.batch_size].tolist()
            epoch, step = epoch + 1, 0

    def __len__(self) -> int:  # an endless sampler; the trainer stops by step count
        return 2**62


def add_file_names(digest, paths):
    """Feed the names of the files ``paths`` (not their folders: the data may move), in order,
    to the hash ``digest``; returns it."""
    for path in paths:
        digest.update(os.fsencode(Path(path).name) + b"\0")
    return digest


def data_identity(dataset: Dataset) -> dict:
    """What identifies a pretraining dataset's clips for a resume: how many, and the names of
    its files in order, as a short hash. The built-in scenes are named by the run's settings."""
    digest = hashlib.sha256(b"synth") if not isinstance(dataset, AudioFiles) else add_file_names(hashlib.sha256(),
                                                                                                  dataset.paths)
    return {"clips": len(dataset), "names": digest.hexdigest()[:16]}


def build_dataset(source: str, *, root: str | None = None, target_length: int = 1024, synth_clips: int = 2000,
                  synth_seconds: float = 10.0, seed: int = 0, min_samples: int = 0,
                  max_bad_files: int = 100) -> Dataset:
    """'synth', a folder, or a ``.tsv`` manifest -> a dataset of (waveform, index, failures).
    A run stops past ``max_bad_files`` unreadable files, so an item may skip that many (and at
    least 20, so a small limit still meets the run's own count, which names the files)."""
    max_samples, max_tries = samples_for_frames(target_length), max(20, max_bad_files + 1)
    if source == "synth":
        return SynthClips(synth_clips, synth_seconds, seed, max_samples)
    path = Path(source)
    if not path.exists():
        raise ValueError(f"data source {source!r}: no such file or folder")
    if path.is_dir():
        return AudioFiles(folder_paths(path), max_samples, max_tries)
    if path.suffix.lower() == ".tsv":
        base, relative, skipped = manifest_entries(path, root, min_samples)
        return AudioFiles([base / rel for rel in relative], max_samples, max_tries, skipped=len(skipped))
    raise ValueError(f"data source {source!r}: expected 'synth', a folder of audio files, or a .tsv manifest")
