"""Waveform -> log-mel spectrogram (LMS), exactly as M2D-AS was pre-trained on.

One definition shared by `m2das prepare` (files on disk), its batched GPU path
and the demo (synthetic waveforms), so every LMS in the project is the same
function of the audio. Reflect padding is applied per clip before the STFT
(instead of `center=True`) so that clips of different lengths can share one
batch without the zero padding of a short clip leaking into its last frames.
"""

from __future__ import annotations

import os
import re

import numpy as np
import soundfile as sf
import torch
import torchaudio

from m2das.lmsfile import N_MELS

SAMPLE_RATE = 16000
N_FFT = 400
WIN_LENGTH = 400
HOP_LENGTH = 160
F_MIN = 50.0
F_MAX = 8000.0
EPS = float(np.finfo(np.float32).eps)  # 1.1920929e-07
MIN_SECONDS = 6.1
MIN_SAMPLES = int(round(MIN_SECONDS * SAMPLE_RATE))  # 97,600 samples -> 611 frames


class AudioError(ValueError):
    """A file that cannot become an LMS; the message is the reason written to the failure list."""


def load_audio(path) -> tuple[np.ndarray, int]:
    """Read any file libsndfile understands as float32 [channels, samples] and its rate.

    Raises AudioError for unreadable, empty or non-finite audio so the caller can
    record the reason and go on with the next file.
    """
    try:
        if os.path.getsize(path) == 0:
            raise AudioError("empty file (0 bytes); re-download it")
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


def num_frames(num_samples: int) -> int:
    """Frames of a centred STFT of a 16-kHz clip after the 6.1-s minimum padding."""
    return 1 + max(num_samples, MIN_SAMPLES) // HOP_LENGTH


def to_mono_16k(wave, sample_rate: int, device=None) -> torch.Tensor:
    """[samples] or [channels, samples] at any rate -> float32 mono [samples] at 16 kHz."""
    x = torch.as_tensor(np.asarray(wave, dtype=np.float32) if not torch.is_tensor(wave) else wave)
    x = x.to(device=device, dtype=torch.float32)
    if x.dim() == 2:
        x = x.mean(dim=0)
    elif x.dim() != 1:
        raise ValueError(f"waveform must be [samples] or [channels, samples], got {tuple(x.shape)}")
    if x.numel() == 0:
        raise AudioError("empty: no samples")
    return resample_16k(x, sample_rate)


_RESAMPLERS: dict = {}


def resample_16k(x: torch.Tensor, sample_rate: int) -> torch.Tensor:
    """[..., samples] at `sample_rate` -> 16 kHz (torchaudio's default windowed-sinc filter).

    The filter kernel is built once per (rate, device) rather than per clip.
    """
    if sample_rate == SAMPLE_RATE:
        return x
    key = (int(sample_rate), str(x.device))
    if key not in _RESAMPLERS:
        _RESAMPLERS[key] = torchaudio.transforms.Resample(int(sample_rate), SAMPLE_RATE).to(x.device)
    return _RESAMPLERS[key](x)


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


def _padded(x: torch.Tensor) -> torch.Tensor:
    """Zero-pad to 6.1 s at the end, then reflect-pad n_fft/2 on both sides (a centred STFT)."""
    if x.numel() < MIN_SAMPLES:
        x = torch.nn.functional.pad(x, (0, MIN_SAMPLES - x.numel()))
    return torch.nn.functional.pad(x[None, None], (N_FFT // 2, N_FFT // 2), mode="reflect")[0, 0]


@torch.no_grad()
def lms_batch_16k(waves: list, device=None) -> list[np.ndarray]:
    """Mono 16-kHz waveforms (tensors) -> one float32 [1, 80, T] LMS each, in one STFT batch."""
    if not waves:
        return []
    device = waves[0].device if device is None else torch.device(device)
    padded = [_padded(w.to(device)) for w in waves]
    longest = max(p.numel() for p in padded)
    batch = torch.stack([torch.nn.functional.pad(p, (0, longest - p.numel())) for p in padded])
    mel = _mel(device)(batch)  # [B, 80, frames of the longest]
    lms = torch.log(mel + EPS).cpu().numpy()
    return [np.ascontiguousarray(lms[i, None, :, : num_frames(w.numel())], dtype=np.float32)
            for i, w in enumerate(waves)]


def lms_from_waveform(wave, sample_rate: int, device=None) -> np.ndarray:
    """Waveform ([samples] or [channels, samples], numpy or torch) -> float32 LMS [1, 80, T].

    T = 1 + max(n, 97600) // 160 for n samples at 16 kHz (1001 for a 10-s clip).
    """
    x = to_mono_16k(wave, sample_rate, device)
    if not torch.isfinite(x).all():
        raise AudioError("NaN or inf samples")
    return lms_batch_16k([x], device)[0]


def lms_from_file(path, device=None) -> tuple[np.ndarray, float]:
    """File -> (LMS, duration in seconds of the original audio)."""
    wave, sr = load_audio(path)
    return lms_from_waveform(wave, sr, device), wave.shape[1] / sr


def duration_from_frames(frames: int) -> float:
    """Approximate seconds of audio behind an LMS (clips under 6.1 s count as 6.1 s)."""
    return max(frames - 1, 0) * HOP_LENGTH / SAMPLE_RATE


__all__ = ["AudioError", "load_audio", "to_mono_16k", "lms_from_waveform", "lms_from_file",
           "lms_batch_16k", "resample_16k", "num_frames", "duration_from_frames", "SAMPLE_RATE", "EPS",
           "MIN_SAMPLES", "N_MELS"]
