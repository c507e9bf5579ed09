"""`m2das embed` computes what the published runtime computes, for short and long clips alike.

The reference below is the runtime's recipe written out independently: torchaudio's
MelSpectrogram with the paper's parameters (centred, reflect padding), ln(x + eps),
the weights' norm_stats, padding to whole patches only, crop-long chunks through the
checkpoint's own layers with the position embedding cut to the chunk, tokens
rearranged 'b (f t) d -> b t (f d)', chunks concatenated in time, mean over frames.
"""

import numpy as np
import pytest
import soundfile as sf
import torch
import torchaudio
from conftest import run_m2das
from pretrained_fixture import TINY, make_checkpoint

import m2das

SECONDS = {"a_1s": 1.0, "b_3s": 3.0, "c_6.08s": 6.08, "d_10s": 10.0}
# LMS frames 1 + n // 160 (101, 301, 609, 1001), padded to whole 16-frame patches, one time frame each.
TIME_FRAMES = {"a_1s": 7, "b_3s": 19, "c_6.08s": 39, "d_10s": 63}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("embed")
    rng = np.random.default_rng(5)
    (root / "audio").mkdir()
    for name, sec in SECONDS.items():
        n = int(round(sec * 16000))
        t = np.arange(n) / 16000
        wave = 0.2 * np.sin(2 * np.pi * (300 + 200 * t) * t) + 0.05 * rng.standard_normal(n)
        sf.write(root / "audio" / f"{name}.wav", wave.astype(np.float32), 16000, subtype="FLOAT")
    return {"root": root, "ckpt": make_checkpoint(root / "runs", seed=2)}


def runtime_clip_embedding(state: dict, wave: np.ndarray) -> tuple:
    """(time frames, clip embedding) by the runtime's recipe, from the checkpoint's tensors."""
    from m2das.model import create_model

    model = create_model(TINY["model"], input_size=TINY["input_size"], num_classes=state["offline_predictor.weight"].shape[0])
    model.load_state_dict(state)
    model.eval()
    mel = torchaudio.transforms.MelSpectrogram(sample_rate=16000, n_fft=400, win_length=400, hop_length=160,
                                               f_min=50.0, f_max=8000.0, n_mels=80, power=2.0, norm="slaney",
                                               mel_scale="slaney", center=True, pad_mode="reflect")
    lms = torch.log(mel(torch.from_numpy(wave)[None]) + torch.finfo(torch.float32).eps)[:, None]  # [1, 1, 80, T]
    x = (lms - state["norm_stats"][0]) / state["norm_stats"][1]
    unit, patch, rows = TINY["input_size"][1], 16, 80 // 16
    chunks = (x.shape[-1] + unit - 1) // unit
    x = torch.nn.functional.pad(x, (0, (patch - x.shape[-1] % unit % patch) % patch))
    dim = state["cls_token"].shape[-1]
    out = []
    with torch.no_grad():
        for i in range(chunks):
            c = x[..., i * unit:(i + 1) * unit]
            tok = model.patch_embed.proj(c).flatten(2).transpose(1, 2)  # [1, rows * cols, dim], row-major
            cols = tok.shape[1] // rows
            pos = model.pos_embed[:, 1:].reshape(1, rows, -1, dim)[:, :, :cols].reshape(1, rows * cols, dim)
            h = torch.cat([model.cls_token + model.pos_embed[:, :1], tok + pos], dim=1)
            for blk in model.blocks:
                h = blk(h)
            h = model.norm(h)[:, 1:]
            out.append(h.reshape(1, rows, cols, dim).permute(0, 2, 1, 3).reshape(1, cols, rows * dim))
    frames = torch.cat(out, dim=1)
    return frames.shape[1], frames.mean(1)[0].numpy()


def test_embed_matches_the_runtime_for_1_3_6_and_10_second_clips(setup, tmp_path):
    out = tmp_path / "emb.npz"
    r = run_m2das("embed", setup["root"] / "audio", out, "--weights", setup["ckpt"], "--device", "cpu",
                  "--no_progress")
    assert r.returncode == 0, r.stderr
    z = np.load(out)
    state = torch.load(setup["ckpt"], weights_only=True)["model"]
    for name, emb, frames in zip(z["files"], z["embeddings"], z["frames"]):
        stem = name.removesuffix(".wav")
        wave = sf.read(setup["root"] / "audio" / name, dtype="float32")[0]
        ref_frames, ref = runtime_clip_embedding(state, wave)
        assert frames == ref_frames == TIME_FRAMES[stem], name
        assert np.abs(emb - ref).max() < 1e-4, (name, np.abs(emb - ref).max())


def test_load_encoder_does_not_pad_a_short_waveform(setup):
    enc = m2das.load_encoder(setup["ckpt"])
    wave = sf.read(setup["root"] / "audio" / "a_1s.wav", dtype="float32")[0]
    frames, clip = enc(torch.from_numpy(wave), sample_rate=16000)
    assert frames.shape[1] == 7  # 101 LMS frames; padded to 6.1 s it would be 39
    state = torch.load(setup["ckpt"], weights_only=True)["model"]
    assert np.abs(clip[0].numpy() - runtime_clip_embedding(state, wave)[1]).max() < 1e-4


def test_unreadable_files_are_listed_and_the_rest_embedded(setup, tmp_path):
    import csv
    import shutil

    folder = tmp_path / "mixed"
    folder.mkdir()
    for name in ("a_1s.wav", "b_3s.wav"):
        shutil.copy(setup["root"] / "audio" / name, folder / name)
    (folder / "broken.wav").write_bytes(b"RIFF\x00\x00\x00\x00not audio at all")
    np.save(folder / "wrong_shape.npy", np.zeros((3, 4), dtype=np.float32))
    out = tmp_path / "emb.npz"
    r = run_m2das("embed", folder, out, "--weights", setup["ckpt"], "--device", "cpu", "--no_progress")
    assert r.returncode == 0, r.stderr
    z = np.load(out)
    assert list(z["files"]) == ["a_1s.wav", "b_3s.wav"] and z["embeddings"].shape[0] == 2
    listed = tmp_path / "emb_failures.csv"
    rows = list(csv.DictReader(listed.open()))
    assert [row["file"] for row in rows] == ["broken.wav", "wrong_shape.npy"]
    assert all(row["error"] for row in rows) and "[1, 80, T]" in rows[1]["error"]
    warning = [ln for ln in r.stderr.splitlines() if "warning" in ln]
    assert len(warning) == 1 and "2 of 4 files" in warning[0] and str(listed) in warning[0], r.stderr

    # Nothing readable at all: exit 2, one line, the list written, no OUT.npz.
    for name in ("a_1s.wav", "b_3s.wav"):
        (folder / name).unlink()
    out2 = tmp_path / "none.npz"
    r = run_m2das("embed", folder, out2, "--weights", setup["ckpt"], "--device", "cpu", "--no_progress")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "none of the 2 files could be read" in r.stderr and not out2.exists()
    assert (tmp_path / "none_failures.csv").exists()
    # A clean run later removes the stale list next to its output.
    r = run_m2das("embed", setup["root"] / "audio", out, "--weights", setup["ckpt"], "--device", "cpu",
                  "--no_progress")
    assert r.returncode == 0 and not listed.exists(), r.stderr
