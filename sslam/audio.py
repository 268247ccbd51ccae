"""Audio input: decode a file (or check a decoded array), downmix to mono, resample.

Files are decoded by ``soundfile`` (libsndfile): WAV (8-bit unsigned, 16/24/32-bit integer PCM,
32/64-bit float), FLAC, OGG/Vorbis and whatever else the installed libsndfile reads. Samples come
back as float32 on the [-1, 1] scale (libsndfile divides integer PCM by its full scale), which is
the scale the model's normalisation constants assume.

Every problem with the audio itself raises :class:`AudioError` whose message is
``"<file>: <reason>"``; library exceptions are wrapped (and chained), never leaked.

Truncated files: when a WAV file's data chunk is cut short, libsndfile reports (and decodes)
only the whole frames that are present, as audio players do; :func:`load_audio` returns those
samples. This is also what the reference pipeline (``soundfile.read``) feeds the model. A file
whose header is damaged cannot be opened and raises :class:`AudioError`.

Multichannel audio is averaged to mono *before* resampling (the reference pipeline resampled
``(frames, channels)`` arrays along the channel axis first; averaging first is what it meant).
"""

from __future__ import annotations

import math
import os
import stat
import typing

import numpy as np
import soundfile
import torch
from torch import Tensor

from sslam.resampler import inputs_needed, resample

__all__ = ["AudioError", "SUPPORTED_RATES", "load_audio", "to_mono", "check_waveform"]

SUPPORTED_RATES = (1000, 384000)
"""Inclusive range of accepted sample rates in Hz (files, arrays and resampling targets)."""

# The files folders are searched for (training data, extraction).
AUDIO_SUFFIXES = {
    ".wav", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".aif", ".aiff", ".aifc", ".au", ".snd", ".w64",
    ".rf64", ".caf", ".sph", ".nist",
}


class AudioError(Exception):
    """Bad audio input: missing, unreadable, empty, non-finite or at an unsupported rate.

    The message is always ``"<file or array name>: <reason>"``.
    """


def _fail(name: str, reason: str) -> AudioError:
    return AudioError(f"{name}: {reason}")


def is_open_file(source) -> bool:
    """Whether ``source`` is an open file or an in-memory one (``io.BytesIO``) rather than a path."""
    return callable(getattr(source, "read", None))


def _check_open_file(source, name: str) -> int:
    """Raise ``AudioError`` unless soundfile can read the open file ``source`` (binary and
    seekable); its position, where the read starts."""
    try:
        if isinstance(source.read(0), str):
            raise _fail(name, "opened in text mode; open audio files in binary mode ('rb')")
        seekable = getattr(source, "seekable", None)
        if not callable(getattr(source, "seek", None)) or (callable(seekable) and not seekable()):
            raise _fail(name, "cannot seek in it (a pipe or a stream), which soundfile needs: read it into "
                              "io.BytesIO(stream.read()) first")
        return source.tell()
    except (OSError, ValueError, AttributeError) as exc:  # closed, or no tell()
        raise _fail(name, f"cannot read it as a file ({exc})") from exc


def source_name(source) -> str:
    """How messages name an audio file: its path, also an open file's when it has one, else the
    open file's type (``<BytesIO>``)."""
    if not is_open_file(source):
        return os.fsdecode(source)
    name = getattr(source, "name", None)
    return os.fsdecode(name) if isinstance(name, (str, bytes, os.PathLike)) else f"<{type(source).__name__}>"


def _check_rate(name: str, rate) -> int:
    """Return the sample rate as an int, or raise ``AudioError`` for a rate outside the range."""
    low, high = SUPPORTED_RATES
    if isinstance(rate, bool) or not isinstance(rate, (int, np.integer)):
        raise _fail(name, f"sample rate must be an integer in Hz, got {rate!r}")
    if not low <= rate <= high:
        raise _fail(name, f"unsupported sample rate {rate} Hz (supported: {low}..{high} Hz)")
    return int(rate)


def integer_rate(sample_rate) -> int:
    """``sample_rate`` (an argument) as an int within :data:`SUPPORTED_RATES`, else ``ValueError``.
    Integral floats (44100.0) are accepted; 44100.5 is an error rather than silently truncated."""
    low, high = SUPPORTED_RATES
    if (
        isinstance(sample_rate, bool)
        or not isinstance(sample_rate, (int, float, np.integer, np.floating))
        or not math.isfinite(sample_rate)
        or sample_rate != int(sample_rate)
        or not low <= sample_rate <= high
    ):
        raise ValueError(f"sample_rate must be an integer in {low}..{high} Hz, got {sample_rate!r}")
    return int(sample_rate)


# Float samples belong on the [-1, 1] scale. Far beyond it the power spectrum overflows float32
# (from about 1e17; 1e15 leaves a margin) and the features turn infinite without an error.
MAX_AMPLITUDE = 1e15


_NUMPY_FLOATS = (torch.float16, torch.float32, torch.float64)


def check_samples(name: str, samples: Tensor) -> None:
    """Raise ``AudioError`` naming ``name`` and saying how many float ``samples`` are NaN,
    infinite or beyond +-:data:`MAX_AMPLITUDE` (one min/max pass; on CUDA it waits for the GPU)."""
    if samples.numel() == 0:
        return
    x = samples.detach()
    if x.device.type == "cpu" and x.dtype in _NUMPY_FLOATS:
        array = x.numpy()  # numpy's reductions are faster than torch's here
        low, high = float(array.min()), float(array.max())  # NaN if any is: the test below fails
    else:  # bfloat16 (numpy has none), or a device: one read of both
        low, high = torch.stack(torch.aminmax(x)).tolist()
    if -MAX_AMPLITUDE <= low and high <= MAX_AMPLITUDE:
        return
    nan = int(torch.isnan(samples).sum())
    inf = int(torch.isinf(samples).sum())
    large = int((torch.isfinite(samples) & (samples.abs() > MAX_AMPLITUDE)).sum())
    raise _fail(
        name,
        f"{nan + inf + large} of {samples.numel()} samples are not finite or too large ({nan} NaN, "
        f"{inf} Inf, {large} beyond +-{MAX_AMPLITUDE:g}; samples belong on the [-1, 1] scale)",
    )


def to_mono(waveform: Tensor) -> Tensor:
    """Average the channels of ``waveform``.

    Args:
        waveform: ``(N,)`` (already mono, returned as is) or ``(channels, N)``, any float dtype.

    Returns:
        ``(N,)`` tensor of the input's dtype: the mean over channels.
    """
    if waveform.dim() == 1:
        return waveform
    if waveform.dim() != 2:
        raise ValueError(
            f"waveform must be (N,) or (channels, N), got shape {tuple(waveform.shape)}"
        )
    if waveform.shape[0] == 1:
        return waveform[0]
    return waveform.mean(dim=0)


# Integer PCM is read as integers and scaled here: 4x faster than libsndfile's own float
# conversion, with identical values (int -> float32, times a power of two), and never NaN.
# Only for the common formats that store samples of exactly the subtype's width: an SDS file
# labelled PCM_16 holds more bits, which an int16 read would cut off.
_INTEGER_READS = {
    "PCM_S8": ("int16", 2.0**-15),
    "PCM_U8": ("int16", 2.0**-15),
    "PCM_16": ("int16", 2.0**-15),
    "PCM_24": ("int32", 2.0**-31),
    "PCM_32": ("int32", 2.0**-31),
}
_INTEGER_FORMATS = {"WAV", "WAVEX", "RF64", "W64", "FLAC", "AIFF", "CAF", "AU"}


# soundfile.read (the reference's reader) decodes a file in ONE call of the header's frame
# count, and for a damaged Ogg file libsndfile's result depends on how the reads are cut: a
# read that starts after the damage re-delivers frames an earlier one returned. So a file is
# read in one call like that when its claimed output fits in _ONE_READ_BYTES (46 minutes of
# 48 kHz stereo); a larger claim, honest or hostile (a FLAC STREAMINFO may claim 2**36
# samples), is read in blocks of _READ_BLOCK_FRAMES, as soundfile allocates what it asks for.
_ONE_READ_BYTES = 1 << 30
# More than the headers and metadata of a file without samples hold, as a rule.
_HEADER_BYTES = 4096
_READ_BLOCK_FRAMES = 1 << 20


def _read_all(sound: soundfile.SoundFile, dtype: str, limit: int | None = None) -> np.ndarray:
    """Every frame of an open file (the first ``limit`` if given), ``(frames, channels)`` of
    ``dtype``. The result equals ``soundfile.read(..., always_2d=True)``, damaged files
    included, except for a damaged Ogg file too long for one read (see ``_ONE_READ_BYTES``)."""
    if sound.seekable():  # as soundfile.read: without it, the MP3 decoder's last bits differ
        sound.seek(0)
    claimed = sound.frames if limit is None else min(limit, sound.frames)
    if claimed * sound.channels * np.dtype(dtype).itemsize <= _ONE_READ_BYTES:
        samples = sound.read(claimed, dtype=dtype, always_2d=True)
        # A short read (damage, a false claim) is a view of the whole allocation: copy it out.
        return samples if 2 * len(samples) >= claimed else samples.copy()
    blocks, left = [], claimed
    while left > 0:
        asked = min(_READ_BLOCK_FRAMES, left)
        blocks.append(sound.read(asked, dtype=dtype, always_2d=True))
        left -= len(blocks[-1])
        # A short read is the end of the file or a decode error (a damaged Ogg page): stop
        # there, as soundfile.read does, rather than append the audio after the damage.
        if len(blocks[-1]) < asked:
            break
    return blocks[0] if len(blocks) == 1 else np.concatenate(blocks)


def _decode(name: str, source, frames_for=None) -> tuple[np.ndarray, int, bool]:
    """Decode a file (a path as bytes: any path the OS has; or an open binary file) with
    soundfile: float32 ``(channels, frames)`` array, contiguous per channel, its rate, and
    whether the samples may be non-finite (only float formats can hold NaN or Inf).
    ``frames_for(rate)``, if given, says how many leading frames are needed. ``name`` is the
    file's in messages."""
    try:
        with soundfile.SoundFile(source) as sound:
            rate = sound.samplerate
            limit = None if frames_for is None else frames_for(rate)
            integer = _INTEGER_READS.get(sound.subtype) if sound.format in _INTEGER_FORMATS else None
            if integer is None:
                return np.ascontiguousarray(_read_all(sound, "float32", limit).T), rate, True
            dtype, scale = integer
            samples = _read_all(sound, dtype, limit)
    except (soundfile.LibsndfileError, RuntimeError) as exc:
        raise _fail(name, f"cannot decode audio ({_libsndfile_reason(exc)})") from exc
    except TypeError as exc:
        # Raised for header-less formats (RAW) that need the rate and layout from the caller.
        raise _fail(name, f"cannot decode audio without a header ({exc})") from exc
    # Scaled and transposed in one pass: a float copy of the (frames, channels) layout first
    # would hold three times the integers' memory at once (an hour of 48 kHz stereo: 2 GB).
    floats = np.empty(samples.shape[::-1], dtype=np.float32)
    np.multiply(samples.T, np.float32(scale), out=floats, dtype=np.float32)
    return floats, rate, False


def claimed_samples(path: str | os.PathLike, sample_rate: int) -> int:
    """The length a file's header claims, in samples at ``sample_rate``; 0 when there is no
    header to read (decoding the file then says why). A claim, which damage or a hostile file
    can make anything: for planning memory, never for results."""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):  # opening a pipe would wait for a writer
            return 0
        info = soundfile.info(os.fsencode(path))
    except Exception:  # noqa: BLE001 -- any failure here is reported by the decode that follows
        return 0
    return int(info.frames * sample_rate // max(1, info.samplerate))


def _libsndfile_reason(exc: RuntimeError) -> str:
    """libsndfile's reason without soundfile's "Error opening b'<path>': " (the message names the
    file already). Its "not a regular file (possibly a pipe?)" means undecodable data here: the
    file was checked to be a regular one."""
    reason = getattr(exc, "error_string", None) or str(exc)
    if "possibly a pipe" in reason:
        return "not audio in a format libsndfile reads, or damaged"
    return reason


def _check_regular_file(name: str) -> None:
    """Raise ``AudioError`` unless ``name`` is a readable regular file (not missing, not a
    directory, not a FIFO or device, whose read would block or never end)."""
    if "\0" in name:  # os.stat would raise a ValueError that names no file
        if len(name) > 200:  # a file's contents, not a path: echoed whole, they would be the message
            raise AudioError(f"<{len(os.fsencode(name))} bytes given as a path>: they hold NUL bytes, as a file's contents "
                             "do; pass the contents as io.BytesIO(data)")
        raise _fail(name, "the path holds a NUL byte")
    try:
        info = os.stat(name)
    except FileNotFoundError:
        raise _fail(name, "file not found") from None
    except OSError as exc:  # a symlink loop, a path through a non-directory, no permission
        raise _fail(name, f"cannot open ({exc.strerror})") from None
    if stat.S_ISDIR(info.st_mode):
        raise _fail(name, "is a directory, not an audio file")
    if not stat.S_ISREG(info.st_mode):
        raise _fail(name, "is not a regular file (a pipe, socket or device); read audio from a file")
    if info.st_size == 0:
        raise _fail(name, "is empty (0 bytes)")
    try:  # libsndfile would only say "System error." (os.access asks for the real, not the effective, user)
        with open(name, "rb"):
            pass
    except PermissionError:
        raise _fail(name, "cannot open (permission denied)") from None


def load_audio(
    path: str | bytes | os.PathLike | typing.BinaryIO, sample_rate: int | None = None, *, mono: bool = True, exact: bool = True,
    max_samples: int | None = None,
) -> tuple[Tensor, int]:
    """Read an audio file as float32 on the [-1, 1] scale, downmix, optionally resample.

    Args:
        path: file to read (WAV, FLAC, OGG/Vorbis, ...: anything libsndfile decodes): a path
            (``bytes`` too, as for ``open``), a seekable file opened in binary mode, or its
            contents in ``io.BytesIO``; an open file is read from where it stands, as soundfile
            reads it, and left at its end.
        sample_rate: resample to this rate in Hz when given (windowed sinc, see
            :func:`sslam.resampler.resample`); ``None`` keeps the file's rate.
        mono: average the channels (before resampling) and return ``(N,)``; with ``False``
            return ``(channels, N)``.
        exact: resample bit-identically to the reference (``False``: the faster path, ~1e-6).
        max_samples: return at most this many samples. Only the part of the file they depend on
            is decoded (the resampling filter reaches a few samples past the cut), so the first
            seconds of an hour-long file cost what a short file costs; the samples equal those
            of the whole file's (to float rounding where resampled).

    Returns:
        ``(waveform, rate)``: float32 tensor ``(N,)`` (or ``(channels, N)``) on the CPU, and the
        sample rate of the returned waveform.

    Raises:
        AudioError: the file is missing, a directory, not decodable, has no samples, holds
            NaN/Inf samples, or its sample rate is outside :data:`SUPPORTED_RATES`.
        ValueError: ``sample_rate`` is not an integer within :data:`SUPPORTED_RATES`.
    """
    target = None if sample_rate is None else integer_rate(sample_rate)
    name = source_name(path)
    if is_open_file(path):
        start, source = _check_open_file(path, name), path
    else:
        _check_regular_file(name)
        start, source = 0, os.fsencode(name)

    if max_samples is not None:
        if isinstance(max_samples, bool) or not isinstance(max_samples, (int, np.integer)) or max_samples < 1:
            raise ValueError(f"max_samples={max_samples!r}: must be a positive integer")
        max_samples = int(max_samples)  # numpy's too, as sample_rate

    def frames_for(rate: int) -> int | None:
        if max_samples is None:
            return None
        return max_samples if target in (None, rate) else inputs_needed(max_samples, rate, target)

    try:
        samples, rate, may_be_nonfinite = _decode(name, source, frames_for)
    except AudioError as exc:
        if start:  # a file read once already is at its end
            raise AudioError(f"{exc} (read from its position {start}: seek(0) to read it from its start)") from exc
        raise
    if samples.shape[1] == 0:
        size = None if is_open_file(path) else os.stat(name).st_size
        if size is not None and size > _HEADER_BYTES:
            raise _fail(name, f"contains no audio samples: its header declares no samples, though the file holds "
                              f"{size} bytes (metadata alone, or a recording whose header was never finished)")
        raise _fail(name, "contains no audio samples (zero length)")
    rate = _check_rate(name, rate)

    waveform = torch.from_numpy(samples)  # (channels, N)
    del samples  # so that the channels are freed once averaged
    if may_be_nonfinite:
        check_samples(name, waveform)
    if mono:
        waveform = to_mono(waveform)
    if target is not None and target != rate:
        waveform = resample(waveform, rate, target, exact=exact)
        rate = target
    if max_samples is not None:
        waveform = waveform[..., :max_samples]
    return waveform, rate


def as_float_samples(wave, name: str) -> Tensor:
    """``wave`` (torch tensor or numpy array of floating-point samples) as a tensor, any shape.

    numpy arrays become CPU tensors, byte-swapped when big-endian (torch takes native float16,
    float32 and float64 only) and narrowed to float64 when long double.

    Raises:
        AudioError naming ``name``: not a tensor or array, a meta tensor, or integer/bool/complex
        samples.
    """
    if isinstance(wave, np.ndarray):
        if wave.dtype.kind in "US":
            raise _fail(name, f"got numpy {wave.dtype} text, not samples: paths are decoded by "
                              "sslam.load_audio or Encoder.embed")
        if not np.issubdtype(wave.dtype, np.floating):
            raise _not_float(name, f"numpy {wave.dtype}", integer=wave.dtype.kind in "biu")
        native = np.float64 if wave.dtype.itemsize > 8 else wave.dtype.newbyteorder("=")
        # (ascontiguousarray makes a 0-d array 1-D; torch warns about sharing a read-only one)
        samples = np.ascontiguousarray(wave, dtype=native).reshape(wave.shape)
        wave = torch.from_numpy(samples if samples.flags.writeable else samples.copy())
    elif not isinstance(wave, Tensor):
        raise _fail(name, f"expected a torch.Tensor or numpy.ndarray, got {type(wave).__name__}")
    if wave.is_meta:
        raise _fail(name, "a tensor on the meta device holds no samples")
    if not wave.is_floating_point():
        raise _not_float(name, str(wave.dtype), integer=not wave.is_complex())
    return wave


def _not_float(name: str, dtype: str, integer: bool) -> AudioError:
    advice = " (convert integer PCM first, e.g. int16 / 32768)" if integer else ""
    return _fail(name, f"samples must be floating point on the [-1, 1] scale, got {dtype}{advice}")


def check_waveform(wave, rate: int, name: str = "<array>") -> Tensor:
    """Check an already-decoded waveform and return it as a float32 mono tensor.

    Applies the same checks as :func:`load_audio` to in-memory audio.

    Args:
        wave: torch tensor or numpy array, floating point on the [-1, 1] scale, ``(N,)`` or
            ``(channels, N)`` (channels first, as in torch; a ``(N, channels)`` array from
            ``soundfile.read`` must be transposed first).
        rate: its sample rate in Hz, within :data:`SUPPORTED_RATES`.
        name: how error messages refer to this input.

    Returns:
        float32 tensor ``(N,)`` on the input's device (CPU for numpy input), the channel mean
        for multichannel input.

    Raises:
        AudioError: wrong type/dtype/shape, no samples, NaN/Inf samples, unsupported rate.
    """
    rate = _check_rate(name, rate)
    wave = as_float_samples(wave, name)
    if wave.dim() not in (1, 2):
        raise _fail(name, f"expected shape (N,) or (channels, N), got {tuple(wave.shape)}")
    if wave.numel() == 0:
        raise _fail(name, f"contains no audio samples (shape {tuple(wave.shape)})")
    if wave.dim() == 2 and wave.shape[0] > wave.shape[1]:
        raise _fail(
            name,
            f"shape {tuple(wave.shape)} has more channels than samples; expected "
            "(channels, N): transpose a (N, channels) array",
        )
    check_samples(name, wave)  # before the cast: 1e300 in float64 is too large, not Inf
    return to_mono(wave.to(torch.float32)).contiguous()
