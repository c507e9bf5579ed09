"""The LMS against an independent numpy computation, and load_audio on real files."""

import math

import numpy as np
import pytest
import soundfile as sf
import soxr
import torch

from m2das.data.audio import (EPS, LEGACY_RESAMPLER, MIN_SAMPLES, AudioError, lms_batch_16k,
                         lms_from_file, lms_from_waveform, load_audio, num_frames)
from m2das.data.prepare import run_lms


def slaney_hz_to_mel(f):
    f = np.asarray(f, dtype=np.float64)
    linear = f / (200.0 / 3.0)
    logstep = np.log(6.4) / 27.0
    return np.where(f >= 1000.0, 15.0 + np.log(np.maximum(f, 1e-10) / 1000.0) / logstep, linear)


def slaney_mel_to_hz(m):
    m = np.asarray(m, dtype=np.float64)
    logstep = np.log(6.4) / 27.0
    return np.where(m >= 15.0, 1000.0 * np.exp(logstep * (m - 15.0)), m * 200.0 / 3.0)


def slaney_filterbank(sr=16000, n_fft=400, n_mels=80, fmin=50.0, fmax=8000.0):
    """Triangles equally spaced on the Slaney mel scale, each scaled to unit area (2 / width)."""
    fft_freqs = np.linspace(0.0, sr / 2.0, 1 + n_fft // 2)
    edges = slaney_mel_to_hz(np.linspace(slaney_hz_to_mel(fmin), slaney_hz_to_mel(fmax), n_mels + 2))
    fb = np.zeros((n_mels, fft_freqs.size))
    for i in range(n_mels):
        lo, mid, hi = edges[i], edges[i + 1], edges[i + 2]
        rising = (fft_freqs - lo) / (mid - lo)
        falling = (hi - fft_freqs) / (hi - mid)
        fb[i] = np.maximum(0.0, np.minimum(rising, falling)) * 2.0 / (hi - lo)
    return fb


def reference_lms(x16k: np.ndarray) -> np.ndarray:
    """The facts sheet's LMS in float64 numpy: pad to 6.1 s, centred periodic-Hann STFT, Slaney mel, ln."""
    x = np.asarray(x16k, dtype=np.float64)
    if x.size < 97600:
        x = np.concatenate([x, np.zeros(97600 - x.size)])
    x = np.pad(x, 200, mode="reflect")
    n_frames = 1 + (x.size - 400) // 160
    window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(400) / 400)  # periodic Hann
    frames = np.stack([x[t * 160: t * 160 + 400] * window for t in range(n_frames)])
    power = np.abs(np.fft.rfft(frames, n=400, axis=1)) ** 2  # [T, 201]
    mel = slaney_filterbank() @ power.T  # [80, T]
    return np.log(mel + np.finfo(np.float32).eps)[None]


def test_slaney_filterbank_matches_librosa_defaults_when_available():
    librosa = pytest.importorskip("librosa")
    ours = slaney_filterbank()
    theirs = librosa.filters.mel(sr=16000, n_fft=400, n_mels=80, fmin=50, fmax=8000)
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-9)


def test_eps_is_float32_machine_epsilon():
    assert EPS == pytest.approx(1.1920929e-07, rel=1e-7)


@pytest.mark.parametrize("seconds", [10.0, 7.3, 2.0])
def test_lms_matches_numpy_reference_at_16k(seconds):
    rng = np.random.default_rng(1)
    n = int(seconds * 16000)
    t = np.arange(n) / 16000
    x = (0.3 * np.sin(2 * np.pi * 440 * t) + 0.2 * np.sin(2 * np.pi * 3150 * t)
         + 0.05 * rng.standard_normal(n)) * np.linspace(0.2, 1.0, n)
    ours = lms_from_waveform(x.astype(np.float32), 16000)
    ref = reference_lms(x.astype(np.float32))
    assert ours.dtype == np.float32
    assert ours.shape == ref.shape == (1, 80, num_frames(n))
    assert np.abs(ours - ref).max() < 1e-3


def test_ten_second_clip_has_1001_frames_and_short_clip_is_padded_to_611():
    assert lms_from_waveform(np.zeros(160000, np.float32), 16000).shape == (1, 80, 1001)
    short = 0.1 * np.random.default_rng(0).standard_normal(8000).astype(np.float32)
    lms = lms_from_waveform(short, 16000)
    assert lms.shape == (1, 80, 611) and MIN_SAMPLES == 97600
    # padding is zeros at the end: frames well past the clip are ln(eps) exactly
    assert np.all(lms[..., 100:] == np.float32(np.log(np.float32(EPS))))
    assert np.all(lms[..., :45] > np.log(EPS) + 1)


def test_silent_clip_is_ln_eps_everywhere():
    lms = lms_from_waveform(np.zeros((2, 48000 * 10), np.float32), 48000)
    assert lms.shape == (1, 80, 1001)
    np.testing.assert_array_equal(lms, np.float32(np.log(np.float32(EPS))))


def test_stereo_is_the_mean_of_its_channels():
    rng = np.random.default_rng(2)
    left, right = 0.1 * rng.standard_normal((2, 16000 * 7)).astype(np.float32)
    stereo = lms_from_waveform(np.stack([left, right]), 16000)
    mono = lms_from_waveform((left + right) / 2, 16000)
    np.testing.assert_allclose(stereo, mono, atol=1e-5)
    np.testing.assert_allclose(stereo, reference_lms((left.astype(np.float64) + right) / 2),
                               atol=1e-3)


@pytest.mark.parametrize("rate", [44100, 48000, 22050])
def test_resampled_tone_lands_in_the_same_band_with_the_same_level(rate):
    seconds, freq = 8.0, 1000.0
    hi = np.sin(2 * np.pi * freq * np.arange(int(seconds * rate)) / rate).astype(np.float32)
    lo = np.sin(2 * np.pi * freq * np.arange(int(seconds * 16000)) / 16000)
    ours = lms_from_waveform(hi, rate)
    ref = reference_lms(lo)
    assert ours.shape == ref.shape == (1, 80, 801)
    mid = slice(50, 750)  # away from the clip edges where the resampling filter differs
    assert ours[0, :, mid].mean(axis=1).argmax() == ref[0, :, mid].mean(axis=1).argmax()
    peak = ref[0, :, mid].mean(axis=1).argmax()
    assert abs(ours[0, peak, mid].mean() - ref[0, peak, mid].mean()) < 0.01
    # a band far from the tone stays far below it: no aliasing from the resampler
    assert ours[0, 75, mid].mean() < ours[0, peak, mid].mean() - 20


def test_torch_input_and_batched_path_agree_with_single_clips():
    rng = np.random.default_rng(3)
    waves = [torch.from_numpy(0.1 * rng.standard_normal(n).astype(np.float32))
             for n in (160000, 113333, 5000, 97600)]
    batched = lms_batch_16k(waves)
    for w, b in zip(waves, batched):
        single = lms_from_waveform(w, 16000)
        assert b.shape == single.shape == (1, 80, num_frames(w.numel()))
        np.testing.assert_allclose(b, single, atol=1e-5)


def test_nonfinite_waveform_is_rejected():
    x = np.zeros(16000, np.float32)
    x[100] = np.nan
    with pytest.raises(AudioError, match="NaN"):
        lms_from_waveform(x, 16000)


def test_load_audio_real_files(tmp_path):
    rng = np.random.default_rng(4)
    stereo = (0.2 * rng.standard_normal((44100, 2))).astype(np.float32)
    sf.write(tmp_path / "s.wav", stereo, 44100, subtype="PCM_16")
    sf.write(tmp_path / "m.flac", stereo[:, 0], 48000)
    wave, sr = load_audio(tmp_path / "s.wav")
    assert sr == 44100 and wave.shape == (2, 44100) and wave.dtype == np.float32
    np.testing.assert_allclose(wave, stereo.T, atol=1 / 32768 + 1e-6)
    wave, sr = load_audio(tmp_path / "m.flac")
    assert sr == 48000 and wave.shape == (1, 44100)
    lms, seconds = lms_from_file(tmp_path / "s.wav")
    assert lms.shape == (1, 80, 611) and seconds == pytest.approx(1.0)


def test_load_audio_rejects_bad_files_with_a_reason(tmp_path):
    (tmp_path / "text.wav").write_text("this is not audio\n")
    (tmp_path / "zero.wav").write_bytes(b"")
    sf.write(tmp_path / "noframes.wav", np.zeros((0, 1), np.float32), 16000)
    sf.write(tmp_path / "good.wav", np.zeros(16000, np.float32), 16000)
    (tmp_path / "cut.wav").write_bytes((tmp_path / "good.wav").read_bytes()[:20])
    nan = np.zeros(16000, np.float32)
    nan[5] = np.inf
    sf.write(tmp_path / "inf.wav", nan, 16000, subtype="FLOAT")
    expected = {"text.wav": "unreadable", "zero.wav": "empty", "noframes.wav": "empty",
                "cut.wav": "unreadable", "inf.wav": "NaN or inf"}
    for name, reason in expected.items():
        with pytest.raises(AudioError, match=reason):
            load_audio(tmp_path / name)
    with pytest.raises(AudioError, match="cannot open"):
        load_audio(tmp_path / "missing.wav")


def test_equals_torchaudio_melspectrogram_with_center_reflect():
    """Padding per clip before a center=False STFT is the centred, reflect-padded transform."""
    import torchaudio

    x = torch.from_numpy(0.1 * np.random.default_rng(5).standard_normal(16000 * 8).astype(np.float32))
    mel = torchaudio.transforms.MelSpectrogram(
        sample_rate=16000, n_fft=400, win_length=400, hop_length=160, f_min=50, f_max=8000,
        n_mels=80, power=2.0, norm="slaney", mel_scale="slaney", center=True, pad_mode="reflect")
    expected = torch.log(mel(x) + EPS).numpy()[None]
    np.testing.assert_allclose(lms_from_waveform(x, 16000), expected, atol=1e-5)


def test_load_audio_with_a_name_that_is_not_utf8(tmp_path):
    sf.write(tmp_path / "x.wav", np.full(800, 0.25, np.float32), 8000)
    odd = tmp_path.as_posix().encode() + b"/caf\xe9.wav"
    (tmp_path / "x.wav").rename(odd.decode("utf-8", "surrogateescape"))
    wave, sr = load_audio(odd.decode("utf-8", "surrogateescape"))
    assert sr == 8000 and wave.shape == (1, 800) and np.allclose(wave, 0.25, atol=1e-4)


# ---------------------------------------------------------------- the paper's LMS, file to file

RATES = (8000, 22050, 44100, 48000)
AUDIBLE = np.log(1e-4)  # bins above this are held to 1e-3; every bin to 1e-4 on average


def paper_lms(path) -> np.ndarray:
    """What librosa.load(path, sr=16000) and the reference's mel code give, written out here:
    float32 samples, channel mean, soxr HQ, zeros up to ceil(n * 16000 / sr), then reference_lms."""
    data, sr = sf.read(str(path), dtype="float32", always_2d=True)
    x = data.mean(axis=1, dtype=np.float32)
    if sr != 16000:
        y = soxr.resample(x, sr, 16000, quality="HQ")
        x = np.concatenate([y, np.zeros(math.ceil(x.size * 16000 / sr) - y.size, np.float32)])
    return reference_lms(x)


def differences(ours: np.ndarray, ref: np.ndarray) -> tuple[float, float]:
    """(max |difference| over the bins above ln(1e-4), mean |difference| over all bins)."""
    assert ours.shape == ref.shape
    d = np.abs(ours.astype(np.float64) - ref)
    return float(d[ref > AUDIBLE].max()), float(d.mean())


def broadband(seconds: float, rate: int, channels: int, seed: int) -> np.ndarray:
    """Noise, two tones, a fade and a near-silent stretch: every band and level the check needs."""
    rng = np.random.default_rng(seed)
    n = int(seconds * rate)
    t = np.arange(n) / rate
    x = 0.2 * np.sin(2 * np.pi * 440 * t)[:, None] + 0.1 * np.sin(2 * np.pi * 7300 * t)[:, None]
    x = x + 0.1 * rng.standard_normal((n, channels)) * np.linspace(1.0, 0.02, n)[:, None]
    x[n // 2: n // 2 + rate // 2] *= 1e-4
    return x.astype(np.float32)


@pytest.fixture(scope="module")
def rate_corpus(tmp_path_factory):
    """Every rate, mono and stereo, wav and flac: 16 real files of 6.5 s."""
    audio = tmp_path_factory.mktemp("rates")
    for i, rate in enumerate(RATES):
        for channels in (1, 2):
            for ext in ("wav", "flac"):
                sf.write(audio / f"r{rate}_c{channels}_{ext}.{ext}",
                         broadband(6.5, rate, channels, seed=10 * i + channels), rate,
                         subtype="PCM_16")
    return audio


def _batched_device():
    return "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("path", ["per-file", "batched"])
def test_prepare_output_is_the_papers_lms_at_every_rate(rate_corpus, tmp_path, path):
    """prepare's files against soxr HQ + numpy STFT + Slaney mel written out in this test.

    The batched path runs on the GPU when there is one, else on the CPU with its
    batching forced: its STFT batches clips of different lengths.
    """
    data = tmp_path / "data"
    if path == "per-file":
        s = run_lms(rate_corpus, data, device="cpu", workers=1, progress=False)
    else:
        s = run_lms(rate_corpus, data, device=_batched_device(), workers=1, progress=False,
                    batched=True, batch_size=5)
    assert (s["converted"], s["failed"]) == (16, 0)
    for src in sorted(rate_corpus.iterdir()):
        ours = np.load(data / "audioset_lms" / f"{src.stem}.npy")
        worst, mean = differences(ours, paper_lms(src))
        assert worst <= 1e-3 and mean <= 1e-4, (src.name, worst, mean)


def test_the_old_resampler_fails_the_same_check(rate_corpus):
    """The check tells the recipes apart: torchaudio's default Resample misses it by far."""
    src = rate_corpus / "r44100_c2_flac.flac"
    wave, sr = load_audio(src)
    worst, mean = differences(lms_from_waveform(wave, sr, resampler=LEGACY_RESAMPLER), paper_lms(src))
    assert worst > 0.1 and mean > 1e-3
    worst, mean = differences(lms_from_waveform(wave, sr), paper_lms(src))
    assert worst <= 1e-3 and mean <= 1e-4

