"""Waveform -> log-mel spectrogram (LMS), exactly as M2D-AS was pre-trained on.

The paper's LMS were made from audio loaded the way `librosa.load(path,
sr=16000)` loads it: channels averaged, then resampled with soxr at HQ quality
and sized ceil(n * 16000 / rate). Resampling here is that same soxr call on the
CPU; only the STFT and mel (identical on every device) may run batched on a
GPU, so the per-file workers, the GPU path and the demo give the same LMS.
Reflect padding is applied per clip before the STFT (instead of `center=True`)
so that clips of different lengths can share one batch without the zero
padding of a short clip leaking into its last frames.
"""

from __future__ import annotations

import math
import os
import re

import numpy as np
import soundfile as sf
import torch
import torchaudio

from m2das.data.lmsfile import N_MELS
from m2das.metrics import full_float32  # TF32 off: the trainer's TF32 would put LMS ~1e-3 off the paper's

SAMPLE_RATE = 16000
N_FFT = 400
WIN_LENGTH = 400
HOP_LENGTH = 160
F_MIN = 50.0
F_MAX = 8000.0
EPS = float(np.finfo(np.float32).eps)  # 1.1920929e-07
MIN_SECONDS = 6.1
MIN_SAMPLES = int(round(MIN_SECONDS * SAMPLE_RATE))  # 97,600 samples -> 611 frames
RESAMPLER = "soxr"
RESAMPLER_QUALITY = "HQ"
# What folders written before the recipe was recorded hold: torchaudio's Resample at its defaults.
LEGACY_RESAMPLER = "torchaudio"
LEGACY_RESAMPLER_QUALITY = "default (sinc_interp_hann, lowpass_filter_width 6, rolloff 0.99)"


class AudioError(ValueError):
    """A file that cannot become an LMS; the message is the reason written to the failure list."""


def lms_recipe(resampler: str = RESAMPLER) -> dict:
    """Everything that decides an LMS's values; two folders with equal recipes hold comparable LMS."""
    legacy = resampler == LEGACY_RESAMPLER
    return {"resampler": resampler,
            "resampler_quality": LEGACY_RESAMPLER_QUALITY if legacy else RESAMPLER_QUALITY,
            "mono": "mean of channels before resampling", "sample_rate": SAMPLE_RATE,
            "n_fft": N_FFT, "win_length": WIN_LENGTH, "window": "periodic hann",
            "hop_length": HOP_LENGTH, "center": "reflect", "power": 2.0, "n_mels": N_MELS,
            "f_min": F_MIN, "f_max": F_MAX, "mel": "slaney scale, slaney area norm",
            "log": f"ln(mel + {EPS!r})", "min_seconds": MIN_SECONDS}


def load_audio(path) -> tuple[np.ndarray, int]:
    """Read any file libsndfile understands as float32 [channels, samples] and its rate.

    Raises AudioError for unreadable, empty or non-finite audio so the caller can
    record the reason and go on with the next file.
    """
    try:
        if os.path.getsize(path) == 0:
            raise AudioError("empty file (0 bytes); re-download it")
        with open(path, "rb"):  # libsndfile would call a refused open a "System error"
            pass
    except PermissionError:
        raise AudioError("permission denied; make it readable (chmod a+r) or copy it") from None
    except OSError as e:
        raise AudioError(f"cannot open: {e.strerror or e}") from None
    try:
        if _utf8_name(path):
            data, sr = sf.read(str(path), dtype="float32", always_2d=True)
        else:  # a name soundfile cannot pass to libsndfile: hand it the open file instead
            with open(path, "rb") as f:
                data, sr = sf.read(f, dtype="float32", always_2d=True)
    except Exception as e:  # libsndfile reports corrupt and unknown formats alike
        msg = " ".join(str(e).split()) or type(e).__name__
        msg = re.sub(r"^Error opening .*?: ", "", msg)  # the path is already in the failure row
        raise AudioError(f"unreadable by soundfile ({msg}); re-download it or convert it to "
                         f"wav/flac") from None
    if data.shape[0] == 0 or data.shape[1] == 0:
        raise AudioError("empty: no samples; re-download it")
    if not np.isfinite(data).all():
        raise AudioError("NaN or inf samples; re-download it")
    if sr <= 0:
        raise AudioError(f"invalid sample rate {sr}")
    return np.ascontiguousarray(data.T), int(sr)


def _utf8_name(path) -> bool:
    try:
        str(path).encode("utf-8")
        return True
    except UnicodeEncodeError:  # bytes that were not UTF-8 on disk (surrogate escapes)
        return False


def num_frames(num_samples: int, *, pad: bool = True) -> int:
    """Frames of a centred STFT of a 16-kHz clip after the 6.1-s minimum padding (`pad=False`: none)."""
    return 1 + (max(num_samples, MIN_SAMPLES) if pad else num_samples) // HOP_LENGTH


def resampled_length(num_samples: int, sample_rate: int) -> int:
    """Samples at 16 kHz: ceil(n * 16000 / rate), the length librosa.load returns."""
    if sample_rate == SAMPLE_RATE:
        return num_samples
    return int(math.ceil(num_samples * (SAMPLE_RATE / sample_rate)))


def mono(wave) -> np.ndarray:
    """[samples] or [channels, samples] (numpy or torch) -> float32 numpy [samples], channel mean."""
    if torch.is_tensor(wave):
        wave = wave.detach().cpu().numpy()
    x = np.asarray(wave, dtype=np.float32)
    if x.ndim == 2:
        x = x.mean(axis=0, dtype=np.float32)
    elif x.ndim != 1:
        raise ValueError(f"waveform must be [samples] or [channels, samples], got {x.shape}")
    if x.size == 0:
        raise AudioError("empty: no samples")
    return np.ascontiguousarray(x)


def resample_16k(x: np.ndarray, sample_rate: int, resampler: str = RESAMPLER) -> np.ndarray:
    """Mono float32 [samples] at `sample_rate` -> 16 kHz, soxr HQ, ceil(n * 16000 / rate) samples.

    soxr returns round(n * ratio) samples; the rest is zeros, as librosa pads it.
    `resampler=LEGACY_RESAMPLER` gives what folders without a recorded recipe hold
    (kept for `m2das bench prepare`, which times both).
    """
    if sample_rate == SAMPLE_RATE:
        return x
    if resampler == LEGACY_RESAMPLER:
        y = _legacy_resample(torch.from_numpy(np.ascontiguousarray(x)), sample_rate).numpy()
    elif resampler == RESAMPLER:
        import soxr

        y = soxr.resample(x, int(sample_rate), SAMPLE_RATE, quality=RESAMPLER_QUALITY)
    else:
        raise ValueError(f"unknown resampler {resampler!r}")
    n = resampled_length(x.shape[-1], sample_rate)
    if y.shape[-1] < n:
        y = np.concatenate([y, np.zeros(n - y.shape[-1], dtype=y.dtype)])
    return np.ascontiguousarray(y[:n], dtype=np.float32)


_LEGACY_RESAMPLERS: dict = {}


def _legacy_resample(x: torch.Tensor, sample_rate: int) -> torch.Tensor:
    key = int(sample_rate)
    if key not in _LEGACY_RESAMPLERS:
        _LEGACY_RESAMPLERS[key] = torchaudio.transforms.Resample(key, SAMPLE_RATE)
    with torch.no_grad():
        return _LEGACY_RESAMPLERS[key](x)


def to_mono_16k(wave, sample_rate: int, device=None, resampler: str = RESAMPLER) -> torch.Tensor:
    """[samples] or [channels, samples] at any rate -> float32 mono [samples] at 16 kHz on `device`.

    Mixing and resampling run on the CPU (soxr), whatever the device.
    """
    x = resample_16k(mono(wave), sample_rate, resampler)
    return torch.from_numpy(x).to(device=device)


_MEL_CACHE: dict = {}


def _mel(device) -> torch.nn.Module:
    """One MelSpectrogram per device; its filterbank and window are built once."""
    key = str(device)
    if key not in _MEL_CACHE:
        _MEL_CACHE[key] = torchaudio.transforms.MelSpectrogram(
            sample_rate=SAMPLE_RATE, n_fft=N_FFT, win_length=WIN_LENGTH, hop_length=HOP_LENGTH,
            f_min=F_MIN, f_max=F_MAX, n_mels=N_MELS, power=2.0, norm="slaney",
            mel_scale="slaney", center=False).to(device)
    return _MEL_CACHE[key]


def _padded(x: torch.Tensor, pad: bool = True) -> torch.Tensor:
    """Zero-pad to 6.1 s at the end (pre-training's rule; `pad=False` for downstream use), then
    reflect-pad n_fft/2 on both sides (a centred STFT)."""
    if not pad and x.numel() <= N_FFT // 2:
        raise AudioError(f"too short: {x.numel()} samples at 16 kHz; a clip needs more than {N_FFT // 2}")
    if pad and x.numel() < MIN_SAMPLES:
        x = torch.nn.functional.pad(x, (0, MIN_SAMPLES - x.numel()))
    return torch.nn.functional.pad(x[None, None], (N_FFT // 2, N_FFT // 2), mode="reflect")[0, 0]


@torch.no_grad()
def lms_batch_16k(waves: list, device=None, *, pad: bool = True) -> list[np.ndarray]:
    """Mono 16-kHz waveforms (tensors or arrays) -> one float32 [1, 80, T] LMS each, one STFT batch.

    `pad=False`: no 6.1-s minimum, the clip as it is (what the published runtime encodes)."""
    if not waves:
        return []
    waves = [torch.as_tensor(w) for w in waves]
    device = waves[0].device if device is None else torch.device(device)
    padded = [_padded(w.to(device), pad) for w in waves]
    longest = max(p.numel() for p in padded)
    batch = torch.stack([torch.nn.functional.pad(p, (0, longest - p.numel())) for p in padded])
    with full_float32():
        mel = _mel(device)(batch)  # [B, 80, frames of the longest]
    lms = torch.log(mel + EPS).cpu().numpy()
    return [np.ascontiguousarray(lms[i, None, :, : num_frames(w.numel(), pad=pad)], dtype=np.float32)
            for i, w in enumerate(waves)]


def lms_from_waveform(wave, sample_rate: int, device=None, resampler: str = RESAMPLER, *,
                      pad: bool = True) -> np.ndarray:
    """Waveform ([samples] or [channels, samples], numpy or torch) -> float32 LMS [1, 80, T].

    T = 1 + max(n, 97600) // 160 for n samples at 16 kHz (1001 for a 10-s clip).
    """
    x = to_mono_16k(wave, sample_rate, None, resampler)
    if not torch.isfinite(x).all():
        raise AudioError("NaN or inf samples")
    return lms_batch_16k([x], device, pad=pad)[0]


def lms_from_file(path, device=None, *, pad: bool = True) -> tuple[np.ndarray, float]:
    """File -> (LMS, duration in seconds of the original audio)."""
    wave, sr = load_audio(path)
    return lms_from_waveform(wave, sr, device, pad=pad), wave.shape[1] / sr


def duration_from_frames(frames: int) -> float:
    """Approximate seconds of audio behind an LMS (clips under 6.1 s count as 6.1 s)."""
    return max(frames - 1, 0) * HOP_LENGTH / SAMPLE_RATE


__all__ = ["AudioError", "load_audio", "mono", "to_mono_16k", "lms_from_waveform", "lms_from_file",
           "lms_batch_16k", "resample_16k", "resampled_length", "num_frames", "duration_from_frames",
           "lms_recipe", "SAMPLE_RATE", "EPS", "MIN_SAMPLES", "N_MELS", "RESAMPLER",
           "RESAMPLER_QUALITY", "LEGACY_RESAMPLER"]
