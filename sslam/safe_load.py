"""Loading ``torch.save`` files without running code from them.

Pickles are read by PyTorch's ``weights_only`` unpickler; objects of a few inert namespaces that
official files carry (argparse, omegaconf, fairseq, numpy, ...) are replaced by
:class:`InertObject` stand-ins that only hold their data, as are the plain types configs name
(dict, int, ...), and any other global (``os.system``, ``builtins.eval``, ...) makes the load
fail before anything is unpickled. Before torch allocates anything, the sizes the file declares
are checked against its own size, so a small crafted file cannot claim gigabytes.
"""

from __future__ import annotations

import _compat_pickle
import os
import pickletools
import re
import stat
import warnings
import zipfile
from pathlib import Path

import torch

# Globals that official checkpoints pickle besides tensors (configs, meters, numpy scalars).
# They are replaced by inert stand-ins; anything else is refused.
INERT_NAMESPACES = (
    "argparse", "omegaconf", "fairseq", "hydra", "numpy", "collections", "copyreg",
    "typing", "enum", "pathlib", "datetime", "_codecs", "functools.partial",
)
# Plain types that configs name as values (omegaconf's metadata: object_type=dict, element_type=int):
# inert stand-ins too. The real ones would be callable with the file's arguments (str() of a
# shared nested list is exponential in the file's size).
INERT_BUILTINS = frozenset(f"builtins.{name}" for name in ("dict", "list", "tuple", "frozenset", "int", "float",
                                                            "str", "bool"))


class CheckpointError(ValueError):
    """A checkpoint could not be read: unknown format, unsafe content, or keys/shapes that do
    not match the architecture. The message names the file."""


class InertObject:
    """Stand-in for a pickled object of an allowed namespace: keeps its data, runs nothing."""

    qualified_name = "?"
    args, kwargs, state = (), {}, None  # what NEWOBJ (which calls __new__ alone) leaves

    def __new__(cls, *args, **kwargs):
        return super().__new__(cls)

    def __init__(self, *args, **kwargs):
        self.args, self.kwargs, self.state = args, kwargs, None

    def __setstate__(self, state):
        self.state = state

    def __call__(self, *args, **kwargs):  # an inert stand-in for a function call result
        return type(self)(*args, **kwargs)

    def __repr__(self):
        return f"<inert {self.qualified_name}>"


def _stand_in(name: str) -> type:
    return type(name.rsplit(".", 1)[-1], (InertObject,), {"qualified_name": name, "__module__": __name__})


def _is_inert(name: str) -> bool:
    return name in INERT_BUILTINS or any(name == ns or name.startswith(ns + ".") for ns in INERT_NAMESPACES)


# ---- safe unpickling ------------------------------------------------------------------------
def _pickle_globals(stream) -> set[str]:
    """``module.name`` of every global one pickle in ``stream`` refers to, read with
    :mod:`pickletools` (nothing is unpickled). Leaves ``stream`` just after the pickle."""
    found, strings = set(), []
    for opcode, arg, _ in pickletools.genops(stream):
        if opcode.name == "GLOBAL":
            found.add(_python3_name(*arg.split(" ", 1)))
        elif opcode.name == "STACK_GLOBAL" and len(strings) >= 2:
            found.add(_python3_name(strings[-2], strings[-1]))
        elif isinstance(arg, str):
            strings.append(arg)
    return found


def _python3_name(module: str, name: str) -> str:
    """``module.name`` as the unpickler resolves it: protocol-2 pickles spell Python 3's modules
    as Python 2's (``__builtin__.dict`` is ``builtins.dict``)."""
    if (module, name) in _compat_pickle.NAME_MAPPING:
        module, name = _compat_pickle.NAME_MAPPING[module, name]
    else:
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
    return f"{module}.{name}"


def _scan_legacy(path: Path) -> tuple[set[str], bool, int | None]:
    """Globals of a legacy (non-zip, ``_use_new_zipfile_serialization=False``) ``torch.save``
    file, whether the file is a plain pickle instead, and the storage bytes its object pickle
    declares (None: :func:`_declared_storages` cannot tell). ``torch.load`` unpickles five
    pickles from a legacy file (magic number, protocol, system info, the object, storage keys)
    before the raw storage bytes; all five are scanned. The first, a bare int, names no global:
    a file whose first pickle does is a plain ``pickle.dump``, and only that pickle is scanned."""
    names: set[str] = set()
    declared: int | None = 0
    with path.open("rb") as f:
        for index in range(5):
            start = f.tell()
            names |= _pickle_globals(f)
            if index == 0 and names:
                return names, True, 0
            if index == 3:
                end = f.tell()
                f.seek(start)
                storages = _declared_storages(f)
                declared = None if storages is None else sum(storages.values())
                f.seek(end)
    return names, False, declared


def _clean(exc: BaseException) -> str:
    return re.sub(r"\x1b\[[0-9;]*m", "", str(exc))  # torch colours parts of its messages


def _reason(exc: BaseException) -> str:
    """The informative line of a (possibly long) torch.load error."""
    text = _clean(exc)
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return (lines[0] if lines else type(exc).__name__)[:300]


def _refusal(path: Path, names) -> CheckpointError:
    return CheckpointError(
        f"{path}: refusing to load: unpickling it would call {', '.join(sorted(names))}, which could "
        "run arbitrary code. Only tensors, containers and inert config/metric objects are accepted."
    )


def _load_error(path: Path, exc: BaseException) -> CheckpointError:
    """A CheckpointError for a failed scan or load; an unknown global is reported as a refusal."""
    offender = re.search(r"GLOBAL ([\w.]+)", _clean(exc))
    if offender:
        name = offender.group(1)
        return _refusal(path, [name if "." in name else f"builtins.{name}"])  # torch drops "builtins."
    reason = _reason(exc)
    if "Unsupported operand" in reason:
        return CheckpointError(
            f"{path}: the safe loader cannot read this pickle ({reason}); it was probably written "
            "with pickle protocol > 2. Re-save it on a trusted machine with torch.save(obj, path)."
        )
    return CheckpointError(f"{path}: not a readable PyTorch checkpoint ({reason})")


def safe_torch_load(path: str | os.PathLike):
    """``torch.load`` that cannot execute code from the file (see the module docstring).
    Zip and legacy (non-zip) ``torch.save`` files are both read; any failure is a
    :class:`CheckpointError` naming the file."""
    path = Path(path)
    kind = file_kind(path)
    if kind is None:
        raise CheckpointError(f"{path}: no such file")
    if kind == "folder":
        raise CheckpointError(f"{path}: is a folder, not a checkpoint file")
    # Arbitrary bytes make the scanners and torch.load fail with arbitrary exception types
    # (IndexError, KeyError, ValueError, ...): all of them mean "not a readable checkpoint".
    try:
        is_zip = zipfile.is_zipfile(path)
        if not is_zip and _starts_like_a_zip(path):
            raise CheckpointError(
                f"{path}: truncated or damaged zip archive (no readable central directory); "
                "the file was probably cut short while being copied or written"
            )
        if is_zip:
            _check_archive(path)
            names = set(torch.serialization.get_unsafe_globals_in_checkpoint(path))
            refused = [name for name in names if not _is_inert(name)]
        else:
            # The weights_only unpickler itself refuses unknown globals of torch.save files (it
            # allows torch's own); a plain pickle, which it would call unreadable, is refused here.
            found, plain, declared = _scan_legacy(path)
            names = {n for n in found if _is_inert(n)}
            refused = [n for n in found if not _is_inert(n)] if plain else []
            # torch.load allocates each storage at its declared size before reading its bytes.
            if declared is None and not plain:
                raise _unfollowable(path)
            if not plain and declared > path.stat().st_size:
                raise CheckpointError(f"{path}: damaged or hostile file: its tensors declare {declared} bytes "
                                      f"of storage; the file holds {path.stat().st_size}")
    except CheckpointError:
        raise
    except Exception as exc:
        raise _load_error(path, exc) from exc
    if refused:
        raise _refusal(path, refused)
    stand_ins = [(_stand_in(name), name) for name in sorted(names)]
    try:
        with torch.serialization.safe_globals(stand_ins):
            # Not memory-mapped: torch then reads each record checking its size first (a mapped
            # tensor would take the bytes after a short or compressed record), and the tensors do
            # not change, or fault, when the file is rewritten in place.
            with warnings.catch_warnings():  # of protocols other than 2: where it reads, moot
                warnings.filterwarnings("ignore", message="Detected pickle protocol")
                obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise _load_error(path, exc) from exc
    _check_tensor_sizes(path, obj)
    return obj


def _starts_like_a_zip(path: Path) -> bool:
    with path.open("rb") as f:
        return f.read(4) == b"PK\x03\x04"


def _check_archive(path: Path) -> None:
    """Refuse an archive whose records unpack to far more than its size (torch.load inflates a
    compressed record whole: a few MB of zeros would take GB), or fail their CRC (torch.load
    reads the tensor records without checking them, so flipped bits would load as wrong
    weights). A record whose CRC is 0 was written without one
    (``torch.serialization.set_crc32_options(False)``)."""
    size = path.stat().st_size
    with zipfile.ZipFile(path) as archive:
        unpacked = sum(info.file_size for info in archive.infolist())
        if unpacked > _ELEMENTS_PER_FILE_BYTE * size + (1 << 20):
            raise CheckpointError(f"{path}: damaged or hostile archive: its records unpack to {unpacked:,} bytes, "
                                  f"over {_ELEMENTS_PER_FILE_BYTE}x the file's {size:,}")
        for info in archive.infolist():
            if info.CRC == 0 and info.file_size:
                continue
            try:
                with archive.open(info) as record:
                    while record.read(1 << 24):
                        pass
            except zipfile.BadZipFile:
                raise CheckpointError(f"{path}: damaged archive: record {info.filename!r} fails its CRC check") from None


def _unfollowable(path: Path) -> CheckpointError:
    return CheckpointError(f"{path}: damaged or hostile file: the storages its tensors declare cannot be read "
                           "without unpickling it")


class _Global(str):
    """A GLOBAL's ``module name`` on the scan's stack: a class, never a key or a location."""


_SCALAR_OPS = {"BINUNICODE", "SHORT_BINUNICODE", "BININT", "BININT1", "BININT2", "LONG1"}  # as torch reads them
_PY2_STRINGS = {"BINSTRING", "SHORT_BINSTRING"}  # pickletools decodes them as latin-1, torch as utf-8


def _declared_storages(pickled) -> dict[str, int] | None:
    """Storage key -> bytes, as a torch.save pickle (bytes or a stream) declares them in its
    persistent ids ``('storage', torch.<T>Storage, key, location, numel)``: the most declared
    for a key, as the first declaration allocates and a later one may claim less. The opcodes
    are followed on a model of the unpickler's stack that holds only strings, ints, None and
    tuples of them (any other value is opaque), so nothing in the file is called, imported or
    built, and the work is linear in its length. None where the model cannot follow the
    stream or a persistent id: torch.load might then allocate what nothing here has checked."""
    opaque = object()
    stack: list = []
    marks: list[int] = []  # stack heights at the MARKs still open
    memo: dict = {}
    declared: dict[str, int] = {}
    try:
        for op, arg, _ in pickletools.genops(pickled):
            name = op.name
            if name in ("BINPUT", "LONG_BINPUT", "PUT", "MEMOIZE"):  # memoise the top, the stack unchanged
                memo[len(memo) if name == "MEMOIZE" else arg] = stack[-1] if stack else opaque
                continue
            if pickletools.markobject in op.stack_before:  # the items down to the last MARK
                if not marks:
                    return None
                height = marks.pop()
                items = stack[height:]
                del stack[max(0, height - op.stack_before.index(pickletools.markobject)) :]
            else:
                count = len(op.stack_before)
                if count > len(stack):
                    return None
                items = stack[len(stack) - count :] if count else []
                del stack[len(stack) - count :]
            while marks and marks[-1] > len(stack):
                marks.pop()
            if name == "MARK":
                marks.append(len(stack))
            elif name in _SCALAR_OPS:
                stack.append(arg)
            elif name in _PY2_STRINGS:
                try:
                    stack.append(arg.encode("latin-1").decode("utf-8"))
                except UnicodeDecodeError:
                    stack.append(opaque)
            elif name == "GLOBAL":
                stack.append(_Global(arg))
            elif name == "STACK_GLOBAL":  # protocol 4 (torch.load refuses it; its error says so)
                stack.append(_Global(f"{items[0]} {items[1]}") if all(type(v) is str for v in items) else opaque)
            elif name in ("BINGET", "LONG_BINGET", "GET"):
                stack.append(memo.get(arg, opaque))
            elif name == "NONE":
                stack.append(None)
            elif name in ("TUPLE", "TUPLE1", "TUPLE2", "TUPLE3", "EMPTY_TUPLE"):
                known = all(v is None or type(v) in (str, int, tuple, _Global) for v in items)
                stack.append(tuple(items) if known else opaque)
            elif name == "BINPERSID":
                if items[0] is opaque or not _note_storage(items[0], declared):
                    return None
                stack.append(opaque)
            else:
                stack.extend([opaque] * len(op.stack_after))
    except ValueError:  # a stream pickletools cannot decode
        return None
    return declared


def _note_storage(pid, declared: dict[str, int]) -> bool:
    """Record a persistent id's storage bytes, numel elements of its class's size; False for
    an id that names a storage in a way not understood here. Zip files write ``('storage',
    class, key, location, numel)``; legacy files add a view field (a view's storage is
    allocated whole, at numel)."""
    if not (isinstance(pid, tuple) and pid[:1] == ("storage",)):
        return True  # not a storage: torch.load refuses what it does not know
    if len(pid) not in (5, 6):
        return False
    _, kind, key, _, numel = pid[:5]
    size = _STORAGE_BYTES.get(kind) if type(kind) is _Global else None
    if size is None or type(key) is not str or type(numel) is not int or numel < 0:
        return False
    declared[key] = max(declared.get(key, 0), numel * size)
    return True


def _storage_classes() -> dict[str, int]:
    """Bytes per element of every storage class torch.load accepts, by the name a pickle's
    GLOBAL gives it (``torch FloatStorage``, ``torch.cuda HalfStorage``, quantized ones)."""
    sizes = {"torch.storage UntypedStorage": 1, "torch UntypedStorage": 1}  # a storage saved by itself
    with warnings.catch_warnings():  # the typed storage classes are deprecated: reading them says so
        warnings.simplefilter("ignore")
        for module in (torch, torch.cuda):
            for name in dir(module):
                dtype = getattr(getattr(module, name), "dtype", None) if name.endswith("Storage") else None
                if isinstance(dtype, torch.dtype):
                    sizes[f"{module.__name__} {name}"] = torch._utils._element_size(dtype)
    return sizes


_STORAGE_BYTES = _storage_classes()


def _tensors_in(obj):
    """Every tensor in nested dicts, lists, tuples and inert stand-ins' state (iteratively: a
    deeply nested file must not exhaust the recursion limit)."""
    stack, seen = [obj], set()
    while stack:
        item = stack.pop()
        if id(item) in seen:
            continue
        seen.add(id(item))
        if isinstance(item, torch.Tensor):
            yield item
        elif isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
        elif isinstance(item, InertObject):
            stack.append(item.state)


# Elements the tensors of a file may declare per byte of the file. A saved tensor takes at
# least one byte per element, except where tensors share storage (tied weights, views); a
# crafted file can declare a 2**34-element tensor over one stored value (a stride-0 expansion),
# which anything that copies, casts or checks it would then allocate (64 GB in float32).
_ELEMENTS_PER_FILE_BYTE = 4


def _check_tensor_sizes(path: Path, obj) -> None:
    """Refuse a file whose tensors declare far more elements than its size can store. A view
    counts once however many names it has (tied weights, shared layers); views of one storage
    at other offsets or shapes count each, as each may be copied. Meta and sparse tensors are
    not counted: neither is taken as weights (:func:`check_state` refuses them)."""
    size = path.stat().st_size
    budget = _ELEMENTS_PER_FILE_BYTE * size + (1 << 20)
    declared, views = 0, set()
    for tensor in _tensors_in(obj):
        if tensor.is_meta or tensor.layout != torch.strided:
            continue
        view = (tensor.untyped_storage().data_ptr(), tensor.dtype, tensor.storage_offset(), tensor.shape,
                tensor.stride())
        if view not in views:
            views.add(view)
            declared += tensor.numel()
        if declared > budget:
            raise CheckpointError(
                f"{path}: its tensors declare over {declared:,} elements, more than a file of "
                f"{size:,} bytes can hold (expanded or crafted tensors); refusing to load it"
            )


# A pickled config is read as plain data by walking it; pickle stores an object referenced
# twice once, so [a, a] nested sixty times is a few bytes that unfold to 2**60 entries. Real
# configs hold hundreds.
MAX_CONFIG_ENTRIES = 100_000


def to_plain(obj, source):
    """Plain dicts / lists / scalars from a pickled config: dicts and lists as they are, and the
    inert stand-ins of ``argparse.Namespace`` (state = its fields) and omegaconf containers
    (state ``_content``) and value nodes (state ``_val``). Cycles become None; a config that
    unfolds to more than :data:`MAX_CONFIG_ENTRIES` is a CheckpointError naming ``source``."""
    entries = 0

    def plain(obj, path: tuple):
        nonlocal entries
        entries += 1
        if entries > MAX_CONFIG_ENTRIES:
            raise CheckpointError(f"{source}: the pickled config unfolds to more than {MAX_CONFIG_ENTRIES} "
                                  "entries (objects shared many times over), not a training config")
        if id(obj) in path:
            return None
        inner = path + (id(obj),)
        if isinstance(obj, dict):
            return {k: plain(v, inner) for k, v in obj.items()}
        if isinstance(obj, (list, tuple)):
            return [plain(v, inner) for v in obj]
        if isinstance(obj, InertObject):
            state = obj.state
            if isinstance(state, tuple) and state and isinstance(state[0], dict):  # (dict, slots)
                state = state[0]
            if not isinstance(state, dict):
                return None
            for key in ("_content", "_val"):
                if key in state:
                    return plain(state[key], inner)
            return plain(state, inner)
        return obj

    return plain(obj, ())


def file_kind(path: Path) -> str | None:
    """'file', 'folder', or None where nothing is. Anything else (a pipe would block the first
    read forever, /dev/zero never end it), a link loop or a link to nothing, or a file name that
    is not UTF-8 (torch and safetensors open files by UTF-8 names) is a CheckpointError naming it."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        if path.is_symlink():
            raise CheckpointError(f"{path}: a link to nothing ({os.readlink(path)} does not exist)") from None
        return None
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot be opened ({exc.strerror or exc})") from None
    if stat.S_ISDIR(mode):
        return "folder"
    if not stat.S_ISREG(mode):
        raise CheckpointError(f"{path}: not a regular file or folder (a pipe, device or socket)")
    try:
        str(path).encode("utf-8")
    except UnicodeEncodeError:
        raise CheckpointError(f"{path}: the file name is not UTF-8, which the loaders cannot open; "
                              "rename the file") from None
    return "file"
