"""Checkpoints on the Hugging Face Hub, named as timm and open_clip name them:

* ``hf-hub:OWNER/NAME``: a model repository (``config.json`` with ``model.safetensors``, or
  ``pytorch_model.bin``), e.g. ``hf-hub:ta012/SSLAM_pretrain``;
* ``hf-hub:OWNER/NAME/PATH``: one file in it, e.g. an official fairseq checkpoint,
  ``hf-hub:ta012/SSLAM/SSLAM_Pretrained/checkpoint_last.pt``, or a model folder in it;
* either with ``@REVISION`` (a branch, tag or commit) at the end: an ``@`` always starts it.

The files are downloaded once into the Hub's cache (``huggingface_hub``, ``pip install
'sslam[hub]'``; ``HF_HUB_OFFLINE=1`` reads the cache alone), all of one checkpoint from the
same commit, and then read as any local file or folder, with the same checks: a weights file
is read with the ``config.json`` beside it, when the repository has one.
"""

from __future__ import annotations

import os
import re
from pathlib import Path, PurePosixPath

from .files import first_line
from .safe_load import CheckpointError

PREFIX = "hf-hub:"
# A model repository's weights, in the order Hugging Face's loaders prefer them.
MODEL_FILES = ("model.safetensors", "pytorch_model.bin")
# Weights files that are read with the config.json beside them (see sslam.checkpoint).
_WITH_CONFIG = (".safetensors", ".bin")


def is_hub_name(source) -> bool:
    """Whether ``source`` (a path or a string) names a Hub checkpoint."""
    return isinstance(source, str) and source.startswith(PREFIX)


def parse_hub_name(name: str) -> tuple[str, str | None, str | None]:
    """(repository id, path of a file or folder in it or None, revision or None) of
    ``hf-hub:OWNER/NAME[/PATH][@REVISION]``; a folder may end with ``/``."""
    rest, at, revision = name[len(PREFIX):].partition("@") if is_hub_name(name) else ("", "", "")
    parts = rest.removesuffix("/").split("/")
    if (len(parts) < 2 or not all(parts) or re.search(r"\s", name) or (at and not revision)
            or "@" in revision):
        raise CheckpointError(f"{name}: a Hub checkpoint is named hf-hub:OWNER/NAME[/PATH][@REVISION]")
    return "/".join(parts[:2]), "/".join(parts[2:]) or None, revision or None


def fetch(name: str) -> Path:
    """The local copy of the Hub checkpoint ``name``: the downloaded file, or the folder of a
    model's config and weights (the repository's, or a folder's in it)."""
    repo, path, revision = parse_hub_name(name)
    try:
        from huggingface_hub import hf_hub_download, try_to_load_from_cache
        from huggingface_hub.utils import (  # (also in older releases)
            EntryNotFoundError,
            LocalEntryNotFoundError,
        )
    except ImportError:
        raise CheckpointError(f"{name}: reading from the Hugging Face Hub needs huggingface_hub "
                              "(pip install 'sslam[hub]')") from None
    pinned = revision  # the first file found fixes the commit of the others
    offline_error = None  # offline, the first error of a candidate the cache knows nothing of

    def download(filename: str, candidate: bool = False) -> Path | None:
        """The cached copy of ``filename``; None where the repository has no such file, or,
        offline, where a ``candidate`` (one of several weights files) is not cached."""
        nonlocal pinned, offline_error
        try:
            found = Path(hf_hub_download(repo, filename, revision=pinned))
        except EntryNotFoundError as exc:
            if isinstance(exc, LocalEntryNotFoundError):
                # Offline: absent only if an earlier download recorded it so (a string is a
                # cached file, None not known). A cache that snapshot_download filled records
                # nothing, so of several candidates the one cached is read.
                known = try_to_load_from_cache(repo, filename, revision=pinned)
                if isinstance(known, str) or (known is None and not candidate):
                    raise CheckpointError(f"{name}: {filename} is not in the local Hub cache and cannot be "
                                          f"downloaded now ({first_line(exc)})") from exc
                if known is None:
                    offline_error = offline_error or exc
            return None
        except Exception as exc:  # no connection, no such repository or revision, no access: named
            raise CheckpointError(f"{name}: cannot download {filename} from the Hugging Face Hub "
                                  f"({type(exc).__name__}: {first_line(exc)})") from exc
        pinned = _snapshot_commit(found) or pinned
        return found

    if path is not None:
        # A folder of the repository comes back as its cached snapshot folder where the cache
        # has it (offline too), else as absent: then it is read as a model folder below.
        found = download(path)
        if found is not None:
            if found.name.endswith(_WITH_CONFIG):
                parent = PurePosixPath(path).parent
                download(str(parent / "config.json") if parent.name else "config.json")
            return found
    folder = f"{path}/" if path else ""  # a model folder: the repository, or a folder in it
    download(folder + "config.json")  # beside the weights in the snapshot folder, where it exists
    for filename in MODEL_FILES:
        found = download(folder + filename, candidate=True)
        if found is not None:
            return found.parent
    if offline_error is not None:
        raise CheckpointError(f"{name}: neither {' nor '.join(folder + f for f in MODEL_FILES)} is in the local Hub "
                              f"cache, and they cannot be downloaded now ({first_line(offline_error)})")
    where = f"has no file {path}, nor" if path else "holds neither"
    raise CheckpointError(f"{name}: the repository {repo} {where} {' nor '.join(folder + f for f in MODEL_FILES)}; "
                          f"name the file to read: hf-hub:{repo}/PATH")


def _snapshot_commit(path: Path) -> str | None:
    """The commit of a file in the Hub cache (``.../snapshots/COMMIT/...``), or None."""
    for folder in path.parents:
        if folder.parent.name == "snapshots":
            return folder.name
    return None


def local_path(source: str | os.PathLike) -> Path:
    """``source`` as a local path: a Hub name fetched (see the module docstring), else as given."""
    return fetch(source) if is_hub_name(source) else Path(source)
