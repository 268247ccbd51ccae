"""Checkpoints on the Hugging Face Hub, named as timm and open_clip name them:

* ``hf-hub:OWNER/NAME``: a model repository (``config.json`` with ``model.safetensors``, or
  ``pytorch_model.bin``), e.g. ``hf-hub:ta012/SSLAM_pretrain``;
* ``hf-hub:OWNER/NAME/PATH``: one file in it, e.g. an official fairseq checkpoint,
  ``hf-hub:ta012/SSLAM/SSLAM_Pretrained/checkpoint_last.pt``, or a model folder in it;
* either with ``@REVISION`` (a branch, tag or commit) at the end.

The files are downloaded once into the Hub's cache (``huggingface_hub``, ``pip install
'sslam[hub]'``; ``HF_HUB_OFFLINE=1`` reads the cache alone) and then read as any local file or
folder, with the same checks.
"""

from __future__ import annotations

import os
from pathlib import Path

from .files import first_line
from .safe_load import CheckpointError

PREFIX = "hf-hub:"
# A model repository's weights, in the order Hugging Face's loaders prefer them.
MODEL_FILES = ("model.safetensors", "pytorch_model.bin")


def is_hub_name(source) -> bool:
    """Whether ``source`` (a path or a string) names a Hub checkpoint."""
    return isinstance(source, str) and source.startswith(PREFIX)


def parse_hub_name(name: str) -> tuple[str, str | None, str | None]:
    """(repository id, path of a file in it or None, revision or None) of ``hf-hub:...``."""
    rest, at, revision = name[len(PREFIX):].partition("@")
    parts = rest.split("/")
    if len(parts) < 2 or not all(part.strip() for part in parts) or (at and not revision.strip()) or "@" in revision:
        raise CheckpointError(f"{name}: a Hub checkpoint is named hf-hub:OWNER/NAME[/PATH][@REVISION]")
    return "/".join(parts[:2]), "/".join(parts[2:]) or None, revision or None


def fetch(name: str) -> Path:
    """The local copy of the Hub checkpoint ``name``: the downloaded file, or for a repository
    the folder of its config and weights."""
    repo, path, revision = parse_hub_name(name)
    try:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.utils import (  # (also in older releases)
            EntryNotFoundError,
            LocalEntryNotFoundError,
        )
    except ImportError:
        raise CheckpointError(f"{name}: reading from the Hugging Face Hub needs huggingface_hub "
                              "(pip install 'sslam[hub]')") from None

    def download(filename: str) -> Path | None:
        """The cached copy of ``filename``; None where the repository has no such file."""
        try:
            return Path(hf_hub_download(repo, filename, revision=revision))
        except EntryNotFoundError as exc:
            if isinstance(exc, LocalEntryNotFoundError):  # offline and not cached: the file may exist
                raise CheckpointError(f"{name}: {filename} is not in the local Hub cache and cannot be downloaded "
                                      f"now ({first_line(exc)})") from exc
            return None
        except Exception as exc:  # no connection, no such repository or revision, no access: named
            raise CheckpointError(f"{name}: cannot download {filename} from the Hugging Face Hub "
                                  f"({type(exc).__name__}: {first_line(exc)})") from exc

    if path is not None:
        found = download(path)
        if found is not None:
            return found
    folder = f"{path}/" if path else ""  # a model folder: the repository, or a folder in it
    download(folder + "config.json")  # beside the weights in the cache's snapshot folder, where it exists
    for filename in MODEL_FILES:
        found = download(folder + filename)
        if found is not None:
            return found.parent
    where = f"has no file {path}, nor" if path else "holds neither"
    raise CheckpointError(f"{name}: the repository {repo} {where} {' nor '.join(folder + f for f in MODEL_FILES)}; name the "
                          f"file to read: hf-hub:{repo}/PATH")


def local_path(source: str | os.PathLike) -> Path:
    """``source`` as a local path: a Hub name fetched (see the module docstring), else as given."""
    return fetch(source) if is_hub_name(source) else Path(source)
