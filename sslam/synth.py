"""Built-in synthetic sound scenes: the default pretraining data and the mono/poly benchmark.

A scene is a few seconds of audio made of *sources*; each source is one sound class present as
one or a few *events* (time intervals of activity), over a faint white or pink noise floor.
Everything is computed on the fly from ``(config.seed, index)``; nothing is stored or downloaded.

The twelve classes (:data:`SOUND_CLASSES`) are kept apart by construction, whatever their random
parameters: they occupy separate frequency ranges or differ in temporal structure (tonal vs
noise, sustained vs repeated units, rising vs falling), as tabulated below. Every event draws
its own parameters, so the task is learnable but not trivial.

=================  =====================================================================
class              content (per-event random ranges)
=================  =====================================================================
harmonic_tone      plucked notes, f0 150-350 Hz (+-3 semitones per note), 3-8 harmonics
                   with random weights, attack 5-40 ms, exponential decay; notes 0.3-1 s
rising_chirp       repeated exponential sine sweeps 350-600 Hz -> 1.5-2.4 kHz, 0.15-0.5 s
falling_chirp      the same sweeps downwards
lowpass_noise      rumble: noise below a cutoff of 150-400 Hz
highpass_noise     hiss: noise above a cutoff of 5.5-6.5 kHz (up to 7.8 kHz)
bandpass_noise     noise band centred at 1.3-2.2 kHz, 1/3 to 2/3 octave wide
click_train        broadband clicks (0.2-1 ms decay) at 4-20 per second
am_tone            sine at 650-1100 Hz, amplitude-modulated at 2-8 Hz, depth 70-100 %
vibrato_tone       sine at 2.6-3.4 kHz, frequency-modulated at 4-8 Hz by +-2-5 %
bird               fast falling sweeps 5-6.5 kHz -> 3.5-4.5 kHz, 25-70 ms, 6-14 per second
engine             buzz, f0 30-60 Hz with harmonics up to 800 Hz, slow AM at 0.5-3 Hz
drum               hits every 0.25-0.6 s: decaying 50-100 Hz sine with pitch drop + noise
=================  =====================================================================

Levels: each event is scaled to an RMS level drawn from ``config.event_gain_db`` (20 dB wide
by default; events with a crest factor above 20 dB are scaled by peak instead, so clicks stay
audible without clipping). The scene is peak-normalised to 0.9 only if it would clip.

Polyphony: with two or more sources, the first events of two sources both span a common
*anchor* window of ``overlap_fraction * seconds`` (half the clip by default), and the first
event of every further source is centred inside that window, so the sources really overlap.
A source's further events fill the gaps its earlier ones leave: a sound never overlaps itself.

Determinism: scene ``index`` of a config draws from numpy ``PCG64`` seeded by
``SeedSequence([seed, index, purpose, k])``; no global random state is used. The draws are
platform-independent and the arithmetic is plain IEEE float32/float64 (phases are accumulated
in float64), so samples are bit-identical for a given numpy build and CPU family; elsewhere
they can differ only where numpy's vectorised sin/cos/exp/FFT round differently (a few float32
ulps).

Benchmark seeds (:func:`benchmark`, :func:`default_pretraining_data`): a user ``seed`` ``s``
becomes ``SceneConfig.seed = 8 * s + stream`` with stream 0 = ``mono_train``, 1 = ``mono_test``,
2 = ``poly_train``, 3 = ``poly_test`` and 4 = pretraining data, so the splits never share a
scene stream, for any ``s``.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset

SOUND_CLASSES: tuple[str, ...] = (
    "harmonic_tone",
    "rising_chirp",
    "falling_chirp",
    "lowpass_noise",
    "highpass_noise",
    "bandpass_noise",
    "click_train",
    "am_tone",
    "vibrato_tone",
    "bird",
    "engine",
    "drum",
)

NUM_CLASSES = len(SOUND_CLASSES)

# Highest frequency any class puts energy at (apart from the broadband clicks and drum
# transients), so the classes look the same at every sample rate >= 16 kHz.
_MAX_CONTENT_HZ = 7800.0
_EDGE_FADE_S = 0.002  # fade at both ends of every event: no step at the boundaries
_MAX_CREST = 10.0  # 20 dB: beyond this crest factor an event is levelled by its peak
_CLIP_PEAK = 1.0
_HEADROOM_PEAK = 0.9

# Purposes mixed into the seed entropy, so layout, background and each event have their own
# independent stream (changing how one class renders never shifts the others' draws).
_LAYOUT, _BACKGROUND, _EVENT = 0, 1, 2


# --------------------------------------------------------------------------------------------
# Configuration and results
# --------------------------------------------------------------------------------------------


def _pair(name: str, value, check) -> tuple:
    """``value`` as an ascending 2-tuple, each checked by ``check`` (:func:`_integer` or
    :func:`_real`); ValueError naming ``name`` otherwise."""
    try:
        lo, hi = value
    except (TypeError, ValueError) as err:
        raise ValueError(f"SceneConfig.{name}: expected a pair (low, high), got {value!r}") from err
    lo, hi = check(name, lo), check(name, hi)
    if lo > hi:
        raise ValueError(f"SceneConfig.{name}: low {lo} is above high {hi}")
    return lo, hi


def _is_whole(value) -> bool:
    """Whether ``value`` is a whole number (2 or 2.0; not a string, a bool, NaN or inf)."""
    return (isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
            and int(value) == value)


def _integer(name: str, value) -> int:
    """``value`` as an int (2.0 is 2); ValueError naming ``name`` otherwise (strings and bools
    included)."""
    if not _is_whole(value):
        raise ValueError(f"SceneConfig.{name}: expected an integer, got {value!r}")
    return int(value)


def _real(name: str, value) -> float:
    """``value`` (a real number, numpy's too; not a string or a bool) as a finite float;
    ValueError naming ``name`` otherwise."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"SceneConfig.{name}: expected a finite number, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class SceneConfig:
    """How to draw scenes. All durations in seconds, levels in dB relative to full scale.

    Attributes:
        sample_rate: Hz, at least 16000 (the classes use frequencies up to 7.8 kHz).
        seconds: length of every scene.
        min_sources, max_sources: number of sources (distinct classes) per scene, uniform.
        events_per_source: (low, high) number of events of each source, uniform, inclusive;
            a source's events do not overlap, and those that find no room are left out.
        event_seconds: (low, high) duration of a free event, uniform (capped at ``seconds``).
        event_gain_db: (low, high) RMS level of an event, uniform.
        background_noise_db: (low, high) RMS level of the white or pink noise floor, uniform;
            None for no noise floor.
        overlap_fraction: with >= 2 sources, fraction of the clip during which two sources are
            both active (the anchor window).
        cycle_classes: if True, the first source of scene ``index`` is class
            ``index % NUM_CLASSES`` (balanced splits); otherwise every class is drawn at random.
        seed: non-negative integer selecting the scene stream.
    """

    sample_rate: int = 16000
    seconds: float = 10.0
    min_sources: int = 1
    max_sources: int = 1
    events_per_source: tuple[int, int] = (1, 3)
    event_seconds: tuple[float, float] = (0.5, 3.0)
    event_gain_db: tuple[float, float] = (-35.0, -15.0)
    background_noise_db: tuple[float, float] | None = (-60.0, -40.0)
    overlap_fraction: float = 0.5
    cycle_classes: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        def fix(name: str, value) -> None:
            object.__setattr__(self, name, value)

        fix("sample_rate", _integer("sample_rate", self.sample_rate))
        if self.sample_rate < 16000:
            raise ValueError(
                f"SceneConfig.sample_rate: must be at least 16000 Hz (the classes use frequencies "
                f"up to {_MAX_CONTENT_HZ:.0f} Hz), got {self.sample_rate}"
            )
        fix("seconds", _real("seconds", self.seconds))
        if self.seconds < 0.1:
            raise ValueError(f"SceneConfig.seconds: must be at least 0.1, got {self.seconds!r}")
        for name in ("min_sources", "max_sources"):
            fix(name, _integer(name, getattr(self, name)))
        if not 1 <= self.min_sources <= self.max_sources <= NUM_CLASSES:
            raise ValueError(
                f"SceneConfig.min_sources={self.min_sources}, max_sources={self.max_sources}: "
                f"expected 1 <= min_sources <= max_sources <= {NUM_CLASSES} (sources are distinct "
                "classes)"
            )
        events = _pair("events_per_source", self.events_per_source, _integer)
        if events[0] < 1:
            raise ValueError(f"SceneConfig.events_per_source: need at least 1 event, got {events}")
        fix("events_per_source", events)
        durations = _pair("event_seconds", self.event_seconds, _real)
        if durations[0] <= 0:
            raise ValueError(
                f"SceneConfig.event_seconds: durations must be positive, got {durations}"
            )
        fix("event_seconds", durations)
        gains = _pair("event_gain_db", self.event_gain_db, _real)
        if gains[1] > 0:
            raise ValueError(f"SceneConfig.event_gain_db: levels must be <= 0 dB, got {gains}")
        fix("event_gain_db", gains)
        if self.background_noise_db is not None:
            noise = _pair("background_noise_db", self.background_noise_db, _real)
            if noise[1] > 0:
                raise ValueError(
                    f"SceneConfig.background_noise_db: levels must be <= 0 dB, got {noise}"
                )
            fix("background_noise_db", noise)
        fix("overlap_fraction", _real("overlap_fraction", self.overlap_fraction))
        if not 0.0 < self.overlap_fraction <= 1.0:
            raise ValueError(
                f"SceneConfig.overlap_fraction: must be in (0, 1], got {self.overlap_fraction!r}"
            )
        fix("seed", _integer("seed", self.seed))
        if self.seed < 0:
            raise ValueError(f"SceneConfig.seed: expected a non-negative integer, got {self.seed!r}")

    @property
    def num_samples(self) -> int:
        """Samples per scene: ``round(seconds * sample_rate)``."""
        return int(round(self.seconds * self.sample_rate))


@dataclass(frozen=True)
class Scene:
    """One rendered scene.

    Attributes:
        waveform: float32 numpy array (num_samples,), values in [-1, 1].
        labels: sorted tuple of the class indices present (the multi-hot source of truth).
        events: (class_index, onset_s, offset_s) per event, sorted by onset.
        sample_rate: Hz.
    """

    waveform: np.ndarray
    labels: tuple[int, ...]
    events: list[tuple[int, float, float]]
    sample_rate: int


# --------------------------------------------------------------------------------------------
# Signal helpers (numpy, vectorised; signals are float32, phases float64)
# --------------------------------------------------------------------------------------------

_F32 = np.float32


def _rng(seed: int, index: int, purpose: int, k: int = 0) -> np.random.Generator:
    """An independent PCG64 generator for one purpose of one scene."""
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, index, purpose, k])))


def _log_uniform(rng: np.random.Generator, low: float, high: float) -> float:
    """A draw uniform in log-frequency between ``low`` and ``high``."""
    return float(np.exp(rng.uniform(np.log(low), np.log(high))))


def _fast_length(n: int) -> int:
    """Smallest 5-smooth integer >= n (FFTs of such lengths are fast; primes are not)."""
    best = 1 << max(0, (n - 1).bit_length())
    power5 = 1
    while power5 < best:
        power35 = power5
        while power35 < best:
            needed = -(-n // power35)  # the power of two must reach ceil(n / power35)
            best = min(best, power35 << max(0, (needed - 1).bit_length()))
            power35 *= 3
        power5 *= 5
    return best


def _sine(cycles: np.ndarray) -> np.ndarray:
    """``sin(2 pi cycles)`` as float32, shape of ``cycles``.

    The phase is reduced to [0, 1) in float64 first, so tones seconds long keep an exact pitch
    while the sine itself runs in fast float32.
    """
    fraction = (cycles - np.floor(cycles)).astype(_F32)
    return np.sin(_F32(2 * np.pi) * fraction)


def _time(n: int, sample_rate: int) -> np.ndarray:
    """Sample times in seconds, float32 (n,) (only for slow modulations; phases use float64)."""
    return np.arange(n, dtype=_F32) / _F32(sample_rate)


def _raised_cosine_ramp(x: np.ndarray) -> np.ndarray:
    """0 -> 1 smooth step of ``x`` clipped to [0, 1], float32."""
    return (0.5 - 0.5 * np.cos(np.pi * np.clip(x, 0.0, 1.0))).astype(_F32)


def _slow_modulation(n: int, sample_rate: int, rate_hz: float, depth: float, phase: float):
    """Gain (n,) float32 swinging between 1 and 1 - depth at ``rate_hz`` (raised cosine)."""
    swing = np.cos(_F32(2 * np.pi * rate_hz) * _time(n, sample_rate) + _F32(phase))
    return _F32(1.0 - depth / 2) + _F32(depth / 2) * swing


def _one_period(period: int, harmonic_weights: np.ndarray) -> np.ndarray:
    """One period (period,) float32 of ``sum_k w_k sin(2 pi k s / period)``, k = 1..K."""
    k = np.arange(1, harmonic_weights.size + 1)
    return (np.sin(2 * np.pi * np.outer(np.arange(period) / period, k)) @ harmonic_weights).astype(
        _F32
    )


def _stamp(n: int, starts: np.ndarray, grains: np.ndarray) -> np.ndarray:
    """Signal (n,) float32 with ``grains[i]`` (G, L) written from sample ``starts[i]`` on.

    Grains are cut at n and may not overlap one another (callers space them at least L apart).
    """
    out = np.zeros(n, _F32)
    positions = starts[:, None] + np.arange(grains.shape[1])[None, :]
    inside = positions < n
    out[positions[inside]] = grains[inside]
    return out


def _butterworth_gain(freqs: np.ndarray, low: float, high: float, order: int) -> np.ndarray:
    """Magnitude response (len(freqs),) of a band-pass with Butterworth edges of ``order``.

    ``freqs`` must be positive. Zero-phase: it shapes noise drawn in the frequency domain, where
    the phase is random anyway.
    """
    return 1.0 / np.sqrt(
        (1.0 + (low / freqs) ** (2 * order)) * (1.0 + (freqs / high) ** (2 * order))
    )


def _band_noise(
    n: int, sample_rate: int, rng: np.random.Generator, low: float, high: float, order: int
) -> np.ndarray:
    """Gaussian noise (n,) float32 band-passed between ``low`` and ``high`` Hz; unit RMS.

    Drawn in the frequency domain: random complex bins times the response, one inverse FFT.
    Bins where the response is below -60 dB are left empty, so narrow bands draw few numbers.
    """
    m = _fast_length(n)
    bins = m // 2 + 1
    reach = 1000.0 ** (1.0 / order)  # how far past an edge the response stays above -60 dB
    first = max(1, int(low / reach * m / sample_rate))
    stop = min(bins, int(np.ceil(high * reach * m / sample_rate)) + 1)
    freqs = np.arange(first, stop) * (sample_rate / m)
    # Uniform real and imaginary parts: the inverse FFT sums thousands of bins, so the noise is
    # Gaussian all the same, and uniform draws cost a fifth of normal ones.
    draws = (rng.random(2 * (stop - first), dtype=_F32) - _F32(0.5)).view(np.complex64)
    spectrum = np.zeros(bins, np.complex64)
    spectrum[first:stop] = draws * _butterworth_gain(freqs, low, high, order).astype(_F32)
    noise = np.fft.irfft(spectrum, m)[:n]
    return _unit_rms(noise)


def _unit_rms(x: np.ndarray) -> np.ndarray:
    """``x`` (n,) float32 scaled to unit RMS (silence stays silence)."""
    return x / _F32(max(float(np.sqrt(np.mean(x * x))), 1e-12))


def _pink_noise(n: int, rng: np.random.Generator, octaves: int = 12) -> np.ndarray:
    """Approximately pink (1/f power) Gaussian noise (n,) float32, unit RMS.

    Voss's construction: the sum of white rows held for 1, 2, 4, ... 2**octaves samples has a
    power spectrum ~ 1/f above sample_rate / 2**octaves. Built coarse to fine (repeat, add a
    fresh row), so it costs two draws per sample and no FFT; a random offset hides the common
    row boundaries. The rows are uniform (cheap to draw); their sum is close to Gaussian.
    """
    hold = 1 << octaves
    noise = rng.random(-(-n // hold) + 1, dtype=_F32)
    for _ in range(octaves):
        noise = np.repeat(noise, 2)
        noise += rng.random(noise.size, dtype=_F32)
    offset = int(rng.integers(0, hold))
    noise = noise[offset : offset + n] - _F32(0.5 * (octaves + 1))  # each row has mean 1/2
    return _unit_rms(noise)


# --------------------------------------------------------------------------------------------
# The classes: each renderer maps (n, sample_rate, rng) to an unnormalised float32 (n,) signal
# --------------------------------------------------------------------------------------------
# Constant-pitch periodic sounds are built from one period (or one unit: a sweep, a syllable,
# a note) and repeated with np.resize; their periods are whole samples, which quantises the
# pitch by at most 1.3 % and makes them cost about a copy per sample.


def _harmonic_tone(n: int, sr: int, rng: np.random.Generator) -> np.ndarray:
    base_f0 = _log_uniform(rng, 150.0, 350.0)
    num_harmonics = int(rng.integers(3, 9))
    weights = rng.uniform(0.1, 1.0, num_harmonics) / np.arange(1, num_harmonics + 1)
    note_len = max(1, round(rng.uniform(0.3, 1.0) * sr))
    attack = rng.uniform(0.005, 0.04) * sr
    decay = note_len * rng.uniform(0.25, 0.6)
    s = np.arange(note_len)
    release = _raised_cosine_ramp((note_len - s) / (0.01 * sr))  # no step into the next note
    envelope = (np.minimum(s / attack, 1.0) * np.exp(-s / decay)).astype(_F32) * release
    num_notes = -(-n // note_len)
    semitones = rng.integers(-3, 4, num_notes)  # a melody around the base pitch
    notes = np.empty((num_notes, note_len), _F32)
    for step in np.unique(semitones):
        period = max(2, round(sr / (base_f0 * 2.0 ** (step / 12.0))))
        notes[semitones == step] = np.resize(_one_period(period, weights), note_len) * envelope
    return notes.reshape(-1)[:n]


def _chirp(n: int, sr: int, rng: np.random.Generator, rising: bool) -> np.ndarray:
    low = _log_uniform(rng, 350.0, 600.0)
    high = _log_uniform(rng, 1500.0, 2400.0)
    sweep_len = max(2, round(rng.uniform(0.15, 0.5) * sr))
    gap_len = round(rng.uniform(0.05, 0.3) * sr)
    progress = np.arange(sweep_len) / sweep_len
    freq = low * (high / low) ** (progress if rising else 1.0 - progress)
    edge = 0.01 * sr / sweep_len  # 10 ms fades, as a fraction of the sweep
    envelope = _raised_cosine_ramp(progress / edge) * _raised_cosine_ramp((1.0 - progress) / edge)
    unit = np.zeros(sweep_len + gap_len, _F32)
    unit[:sweep_len] = envelope * _sine(np.cumsum(freq) / sr)
    return np.resize(unit, n)


def _rising_chirp(n: int, sr: int, rng: np.random.Generator) -> np.ndarray:
    return _chirp(n, sr, rng, rising=True)


def _falling_chirp(n: int, sr: int, rng: np.random.Generator) -> np.ndarray:
    return _chirp(n, sr, rng, rising=False)


def _lowpass_noise(n: int, sr: int, rng: np.random.Generator) -> np.ndarray:
    cutoff = _log_uniform(rng, 150.0, 400.0)
    return _band_noise(n, sr, rng, 20.0, cutoff, 6)


def _highpass_noise(n: int, sr: int, rng: np.random.Generator) -> np.ndarray:
    cutoff = rng.uniform(5500.0, 6500.0)
    return _band_noise(n, sr, rng, cutoff, min(_MAX_CONTENT_HZ, 0.49 * sr), 8)


def _bandpass_noise(n: int, sr: int, rng: np.random.Generator) -> np.ndarray:
    centre = _log_uniform(rng, 1300.0, 2200.0)
    half_width = rng.uniform(1.0 / 3.0, 2.0 / 3.0) / 2.0  # octaves
    return _band_noise(n, sr, rng, centre * 2.0**-half_width, centre * 2.0**half_width, 8)


def _click_train(n: int, sr: int, rng: np.random.Generator) -> np.ndarray:
    interval = sr / rng.uniform(4.0, 20.0)
    decay = rng.uniform(0.0002, 0.001) * sr
    length = int(np.ceil(6 * decay)) + 1
    count = int(n // interval) + 1
    jitter = rng.uniform(-0.1, 0.1, count) * interval  # keeps clicks >= 0.8 interval apart
    starts = np.clip(np.round(np.arange(count) * interval + jitter), 0, None).astype(np.int64)
    starts[0] = 0
    grains = rng.standard_normal((count, length)) * np.exp(-np.arange(length) / decay)
    return _stamp(n, starts, grains * rng.uniform(0.6, 1.0, (count, 1)))


def _am_tone(n: int, sr: int, rng: np.random.Generator) -> np.ndarray:
    carrier = _log_uniform(rng, 650.0, 1100.0)
    gain = _slow_modulation(
        n, sr, rng.uniform(2.0, 8.0), rng.uniform(0.7, 1.0), rng.uniform(0, 2 * np.pi)
    )
    return gain * _sine(np.arange(n) * (carrier / sr) + rng.uniform())


def _vibrato_tone(n: int, sr: int, rng: np.random.Generator) -> np.ndarray:
    carrier = _log_uniform(rng, 2600.0, 3400.0)
    rate = rng.uniform(4.0, 8.0)
    depth = rng.uniform(0.02, 0.05)
    start = rng.uniform(0, 2 * np.pi)
    # Frequency carrier * (1 + depth * sin(2 pi rate t + start)), integrated in closed form.
    wobble = np.cos(_F32(2 * np.pi * rate) * _time(n, sr) + _F32(start))
    cycles = np.arange(n) * (carrier / sr) - (carrier * depth / (2 * np.pi * rate)) * wobble
    return _sine(cycles)


def _bird(n: int, sr: int, rng: np.random.Generator) -> np.ndarray:
    start_hz = _log_uniform(rng, 5000.0, 6500.0)
    end_hz = _log_uniform(rng, 3500.0, 4500.0)
    syllable_len = max(2, round(rng.uniform(0.025, 0.07) * sr))
    period = max(syllable_len, round(sr / rng.uniform(6.0, 14.0)))
    progress = np.arange(syllable_len) / syllable_len
    freq = start_hz * (end_hz / start_hz) ** progress
    unit = np.zeros(period, _F32)
    unit[:syllable_len] = np.sin(np.pi * progress) ** 2 * _sine(np.cumsum(freq) / sr)
    return np.resize(unit, n)


def _engine(n: int, sr: int, rng: np.random.Generator) -> np.ndarray:
    period = round(sr / _log_uniform(rng, 30.0, 60.0))
    num_harmonics = int(800.0 * period / sr)  # harmonics up to 800 Hz
    k = np.arange(1, num_harmonics + 1)
    weights = rng.uniform(0.5, 1.0, num_harmonics) / k ** rng.uniform(0.7, 1.2)
    gain = _slow_modulation(
        n, sr, rng.uniform(0.5, 3.0), rng.uniform(0.3, 0.6), rng.uniform(0, 2 * np.pi)
    )
    return gain * np.resize(_one_period(period, weights), n)


def _drum(n: int, sr: int, rng: np.random.Generator) -> np.ndarray:
    interval = rng.uniform(0.25, 0.6) * sr
    pitch = rng.uniform(50.0, 100.0)
    decay = rng.uniform(0.08, 0.2) * sr
    pitch_drop = rng.uniform(0.02, 0.04) * sr
    noise_decay = rng.uniform(0.003, 0.008) * sr
    noise_level = rng.uniform(0.3, 0.8)
    length = int(min(interval * 0.9, 5 * decay))
    s = np.arange(length)
    freq = pitch * (1.0 + 0.6 * np.exp(-s / pitch_drop))  # the skin's pitch drops after a hit
    body = _sine(np.cumsum(freq) / sr) * np.exp(-s / decay)
    count = int(n // interval) + 1
    starts = np.round(np.arange(count) * interval).astype(np.int64)
    hits = np.tile(body.astype(_F32), (count, 1))
    attack = min(length, int(np.ceil(6 * noise_decay)))  # the transient has died out after this
    hits[:, :attack] += rng.standard_normal((count, attack)) * (
        noise_level * np.exp(-s[:attack] / noise_decay)
    )
    return _stamp(n, starts, hits * rng.uniform(0.7, 1.0, (count, 1)).astype(_F32))


_RENDERERS: tuple[Callable[[int, int, np.random.Generator], np.ndarray], ...] = (
    _harmonic_tone,
    _rising_chirp,
    _falling_chirp,
    _lowpass_noise,
    _highpass_noise,
    _bandpass_noise,
    _click_train,
    _am_tone,
    _vibrato_tone,
    _bird,
    _engine,
    _drum,
)
assert len(_RENDERERS) == NUM_CLASSES


def render_event(
    class_index: int, num_samples: int, sample_rate: int, rng: np.random.Generator
) -> np.ndarray:
    """One event of class ``class_index``: float32 numpy (num_samples,) at reference level.

    Reference level is unit RMS, or a peak of 10 when the crest factor exceeds 20 dB (so sparse
    sounds such as clicks are not scaled into clipping). Faded in and out over 2 ms.
    """
    if not 0 <= class_index < NUM_CLASSES:
        raise ValueError(f"class_index: expected 0..{NUM_CLASSES - 1}, got {class_index}")
    if num_samples < 1:
        raise ValueError(f"num_samples: expected a positive length, got {num_samples}")
    signal = np.array(_RENDERERS[class_index](num_samples, sample_rate, rng), dtype=_F32)
    fade = max(1, int(_EDGE_FADE_S * sample_rate))
    ramp = _raised_cosine_ramp((np.arange(min(fade, num_samples)) + 1) / fade)
    signal[: ramp.size] *= ramp
    signal[num_samples - ramp.size :] *= ramp[::-1]
    rms = float(np.sqrt(np.mean(signal * signal, dtype=np.float64)))
    peak = float(np.max(np.abs(signal)))
    signal *= _F32(1.0 / max(rms, peak / _MAX_CREST, 1e-12))
    return signal


# --------------------------------------------------------------------------------------------
# Scene layout and rendering
# --------------------------------------------------------------------------------------------


def _free_gaps(busy: list[tuple[int, int]], total: int, spacing: int) -> list[tuple[int, int]]:
    """Gaps of [0, total) at least ``spacing`` samples away from every interval of ``busy``."""
    gaps, cursor = [], 0
    for onset, offset in sorted(busy):
        if onset - spacing > cursor:
            gaps.append((cursor, onset - spacing))
        cursor = max(cursor, offset + spacing)
    if cursor < total:
        gaps.append((cursor, total))
    return gaps


def _plan_events(index: int, config: SceneConfig):
    """Draw the classes and event intervals of scene ``index`` (from its own layout stream).

    Returns a list of ``(class_index, onset_sample, offset_sample)`` (offset exclusive), source
    by source, each source's first event first.

    A source's further events go into the gaps its earlier events leave (50 ms apart, a sound
    does not overlap itself) and are shortened to fit; an event with no gap of the minimum event
    duration left is not placed, so a source has at least one and at most
    ``events_per_source[1]`` events.
    """
    rng = _rng(config.seed, index, _LAYOUT)
    total = config.num_samples
    sr = config.sample_rate
    num_sources = int(rng.integers(config.min_sources, config.max_sources + 1))
    if config.cycle_classes:
        first = index % NUM_CLASSES
        others = rng.permutation(np.delete(np.arange(NUM_CLASSES), first))[: num_sources - 1]
        classes = [first, *others.tolist()]
    else:
        classes = rng.permutation(NUM_CLASSES)[:num_sources].tolist()

    shortest = int(np.clip(round(config.event_seconds[0] * sr), 1, total))
    spacing = int(0.05 * sr)

    def free_duration() -> int:
        return int(np.clip(round(rng.uniform(*config.event_seconds) * sr), shortest, total))

    # The anchor window that two sources both span when the scene is polyphonic.
    anchor = max(1, int(round(config.overlap_fraction * total)))
    anchor_start = int(rng.integers(0, total - anchor + 1))
    anchor_stop = anchor_start + anchor
    margin = int(0.1 * total)

    events = []
    for source, class_index in enumerate(classes):
        num_events = int(rng.integers(config.events_per_source[0], config.events_per_source[1] + 1))
        if num_sources >= 2 and source < 2:
            onset = int(rng.integers(max(0, anchor_start - margin), anchor_start + 1))
            offset = int(rng.integers(anchor_stop, min(total, anchor_stop + margin) + 1))
        elif num_sources >= 2:
            duration = free_duration()
            centre = int(rng.integers(anchor_start, anchor_stop + 1))
            onset = int(np.clip(centre - duration // 2, 0, total - duration))
            offset = onset + duration
        else:
            duration = free_duration()
            onset = int(rng.integers(0, total - duration + 1))
            offset = onset + duration
        busy = [(onset, offset)]
        for _ in range(num_events - 1):
            gaps = [g for g in _free_gaps(busy, total, spacing) if g[1] - g[0] >= shortest]
            if not gaps:
                break
            lengths = np.array([stop - start for start, stop in gaps], dtype=np.float64)
            start, stop = gaps[int(rng.choice(len(gaps), p=lengths / lengths.sum()))]
            duration = min(free_duration(), stop - start)
            onset = int(rng.integers(start, stop - duration + 1))
            busy.append((onset, onset + duration))
        events.extend((int(class_index), onset, offset) for onset, offset in busy)
    return events


def _labels(plan) -> tuple[int, ...]:
    """The sorted classes of a scene's planned events."""
    return tuple(sorted({c for c, _, _ in plan}))


def _multi_hot(labels: tuple[int, ...]) -> torch.Tensor:
    """Class indices -> (NUM_CLASSES,) float32 multi-hot target."""
    target = torch.zeros(NUM_CLASSES, dtype=torch.float32)
    target[list(labels)] = 1.0
    return target


def _random_gain(rng: np.random.Generator, db_range: tuple[float, float]) -> np.float32:
    """A linear amplitude gain drawn uniformly in decibels over ``db_range``."""
    return np.float32(10.0 ** (rng.uniform(*db_range) / 20.0))


def render_scene(index: int, config: SceneConfig) -> Scene:
    """Render scene ``index`` of ``config`` (deterministic in ``(config, index)``).

    Args:
        index: non-negative scene number.
        config: the scene distribution and seed.

    Returns:
        A :class:`Scene` with a float32 (config.num_samples,) waveform in [-1, 1].
    """
    if not _is_whole(index) or index < 0:
        raise ValueError(f"index: expected a non-negative integer, got {index!r}")
    index = int(index)
    sr = config.sample_rate
    plan = _plan_events(index, config)

    mix = np.zeros(config.num_samples, np.float32)
    for k, (class_index, onset, offset) in enumerate(plan):
        rng = _rng(config.seed, index, _EVENT, k)
        level = _random_gain(rng, config.event_gain_db)
        mix[onset:offset] += level * render_event(class_index, offset - onset, sr, rng)

    if config.background_noise_db is not None:
        rng = _rng(config.seed, index, _BACKGROUND)
        level = _random_gain(rng, config.background_noise_db)
        if rng.integers(0, 2):
            mix += level * _pink_noise(config.num_samples, rng)
        else:
            mix += level * rng.standard_normal(config.num_samples, dtype=np.float32)

    peak = float(np.max(np.abs(mix)))
    if peak > _CLIP_PEAK:
        mix *= np.float32(_HEADROOM_PEAK / peak)
    events = sorted(
        ((c, on / sr, off / sr) for c, on, off in plan), key=lambda e: (e[1], e[0], e[2])
    )
    return Scene(waveform=mix, labels=_labels(plan), events=events, sample_rate=sr)


# --------------------------------------------------------------------------------------------
# Datasets
# --------------------------------------------------------------------------------------------


class SynthDataset(Dataset):
    """``num_clips`` scenes of ``config`` as ``(waveform, target)`` pairs.

    ``waveform`` is torch.float32 (num_samples,), ``target`` torch.float32 multi-hot
    (num_classes,). Holds only the config: picklable and safe in DataLoader workers.
    """

    def __init__(self, num_clips: int, config: SceneConfig) -> None:
        if not _is_whole(num_clips) or num_clips < 1:
            raise ValueError(f"num_clips: expected a positive integer, got {num_clips!r}")
        if not isinstance(config, SceneConfig):
            raise TypeError(f"config: expected a SceneConfig, got {type(config).__name__}")
        self.num_clips = int(num_clips)
        self.config = config

    def __len__(self) -> int:
        return self.num_clips

    @property
    def num_classes(self) -> int:
        return NUM_CLASSES

    @property
    def class_names(self) -> tuple[str, ...]:
        return SOUND_CLASSES

    @property
    def sample_rate(self) -> int:
        return self.config.sample_rate

    def _check_index(self, index: int) -> int:
        if isinstance(index, bool) or not isinstance(index, numbers.Integral):
            raise TypeError(f"index {index!r}: expected an integer")
        if not -self.num_clips <= index < self.num_clips:
            raise IndexError(f"index {index} out of range for {self.num_clips} clips")
        return int(index) % self.num_clips

    def labels(self, index: int) -> tuple[int, ...]:
        """Sorted class indices of scene ``index``, without rendering its audio."""
        return _labels(_plan_events(self._check_index(index), self.config))

    def targets(self) -> torch.Tensor:
        """Multi-hot targets of every scene, (num_clips, num_classes) float32, without audio."""
        return torch.stack([_multi_hot(self.labels(i)) for i in range(self.num_clips)])

    def scene(self, index: int) -> Scene:
        """The full :class:`Scene` (with events) behind item ``index``."""
        return render_scene(self._check_index(index), self.config)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        scene = self.scene(index)
        return torch.from_numpy(scene.waveform), _multi_hot(scene.labels)

    def __repr__(self) -> str:
        return f"SynthDataset(num_clips={self.num_clips}, config={self.config})"


# split -> (seed stream, (min_sources, max_sources), default number of clips)
BENCHMARK_SPLITS: dict[str, tuple[int, tuple[int, int], int]] = {
    "mono_train": (0, (1, 1), 240),
    "mono_test": (1, (1, 1), 120),
    "poly_train": (2, (2, 4), 240),
    "poly_test": (3, (2, 4), 120),
}
PRETRAINING_STREAM = 4
_SEED_STREAMS = 8


def _stream_seed(seed: int, stream: int) -> int:
    """Config seed of ``stream`` for user seed ``seed``: distinct for every (seed, stream)."""
    if not _is_whole(seed) or seed < 0:
        raise ValueError(f"seed: expected a non-negative integer, got {seed!r}")
    return _SEED_STREAMS * int(seed) + stream


def benchmark(
    split: str, num_clips: int | None = None, seed: int = 0, seconds: float = 4.0
) -> SynthDataset:
    """The built-in mono/poly benchmark: labelled scenes of ``seconds`` each.

    Splits: ``mono_train`` (240 clips), ``mono_test`` (120) with exactly one source per clip,
    ``poly_train`` (240), ``poly_test`` (120) with 2-4 overlapping sources. The first source
    cycles through the classes, so every split is class-balanced (20 / 10 clips per class).
    Seeds: ``SceneConfig.seed = 8 * seed + stream`` with stream 0-3 in the order above.

    Args:
        split: one of ``BENCHMARK_SPLITS``.
        num_clips: clips in the split (the split's default when None).
        seed: non-negative base seed.
        seconds: length of each clip.
    """
    if split not in BENCHMARK_SPLITS:
        raise ValueError(f"split: expected one of {sorted(BENCHMARK_SPLITS)}, got {split!r}")
    stream, (min_sources, max_sources), default_clips = BENCHMARK_SPLITS[split]
    config = SceneConfig(
        seconds=seconds,
        min_sources=min_sources,
        max_sources=max_sources,
        cycle_classes=True,
        seed=_stream_seed(seed, stream),
    )
    return SynthDataset(default_clips if num_clips is None else num_clips, config)


def default_pretraining_data(
    num_clips: int = 1024, seconds: float = 10.0, seed: int = 0
) -> SynthDataset:
    """Unlabelled-use pretraining scenes: 1-3 sources each, classes drawn at random.

    Seed stream 4 (``SceneConfig.seed = 8 * seed + 4``): never shares scenes with the benchmark.
    """
    config = SceneConfig(
        seconds=seconds, min_sources=1, max_sources=3, seed=_stream_seed(seed, PRETRAINING_STREAM)
    )
    return SynthDataset(num_clips, config)
