"""From a finished run to a usable model: load_encoder, embed and linear evaluation, on real files
(export: test_export.py; the runtime's recipe for short clips: test_embed.py)."""

import json
import time
from functools import partial

import numpy as np
import pytest
import soundfile as sf
import torch
from conftest import run_m2das
from pretrained_fixture import make_checkpoint, write_corpus, write_eval_list

import m2das
from m2das.data.audio import lms_from_waveform
from m2das.downstream.export import export

@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A corpus of 40 two-second clips of 5 classes and a tiny checkpoint trained 30 steps on it."""
    root = tmp_path_factory.mktemp("pretrained")
    clips = write_corpus(root / "audio", per_class=8)
    ckpt = make_checkpoint(root / "runs", clips, steps=30)
    return {"root": root, "clips": clips, "ckpt": ckpt, "run": ckpt.parent,
            "list": write_eval_list(root / "list.csv", clips, root)}


def reference_features(state: dict, lms: torch.Tensor, input_size, patch: int = 16) -> torch.Tensor:
    """The runtime's recipe on a plain timm ViT: normalise, pad to whole patches, 608-frame (here 208) chunks,
    pos_embed cut to the chunk, tokens rearranged 'b (f t) d -> b t (f d)', chunks concatenated in time."""
    from timm.models.vision_transformer import VisionTransformer

    dim = state["cls_token"].shape[-1]
    vit = VisionTransformer(img_size=tuple(input_size), patch_size=patch, in_chans=1, embed_dim=dim, depth=2,
                            num_heads=2, mlp_ratio=4, qkv_bias=True, num_classes=0,
                            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6))
    encoder = {k: v for k, v in state.items() if k != "norm_stats" and not k.startswith("offline_predictor.")}
    missing, unexpected = vit.load_state_dict(encoder, strict=False)
    assert not unexpected and not missing
    vit.eval()
    x = (lms - state["norm_stats"][0]) / state["norm_stats"][1]
    unit, rows = input_size[1], input_size[0] // patch
    x = torch.nn.functional.pad(x, (0, (patch - (x.shape[-1] % unit % patch)) % patch))
    out = []
    with torch.no_grad():
        for i in range((x.shape[-1] + unit - 1) // unit):
            chunk = x[..., i * unit:(i + 1) * unit]
            tok = vit.patch_embed.proj(chunk).flatten(2).transpose(1, 2)
            pos = vit.pos_embed[:, 1:].reshape(1, rows, -1, dim)[:, :, :tok.shape[1] // rows].reshape(1, -1, dim)
            h = torch.cat([(vit.cls_token + vit.pos_embed[:, :1]).expand(len(x), -1, -1), tok + pos], 1)
            for blk in vit.blocks:
                h = blk(h)
            h = vit.norm(h)[:, 1:]
            b, n, d = h.shape
            out.append(h.reshape(b, rows, n // rows, d).permute(0, 2, 1, 3).reshape(b, n // rows, rows * d))
    return torch.cat(out, dim=1)


def test_features_have_the_documented_shapes_and_match_the_runtime_recipe(trained, tmp_path):
    dest = export(trained["ckpt"], tmp_path)
    enc = m2das.load_encoder(dest)
    lms = torch.from_numpy(np.stack([lms_from_waveform(sf.read(p)[0], 16000) for p, _ in trained["clips"][:2]]))
    frames, clip = enc(lms)
    # LMS as prepare writes them (2-s clips padded to 6.1 s, 611 frames) -> 39 frames of 16; 5 x 64-d tokens.
    assert frames.shape == (2, 39, 5 * 64) and clip.shape == (2, 320) and enc.feature_dim == 320
    assert torch.allclose(clip, frames.mean(1))
    reference = reference_features(torch.load(dest, weights_only=True), lms, [80, 208])
    assert torch.allclose(frames, reference, atol=1e-5)


def test_a_20s_clip_is_the_concatenation_of_its_chunks_and_any_rate_works(trained):
    enc = m2das.load_encoder(trained["run"])  # straight from the run folder
    rng = np.random.default_rng(1)
    wave = (0.1 * rng.standard_normal(20 * 44100)).astype(np.float32)
    from_wave = enc(torch.from_numpy(wave), sample_rate=44100)
    lms = torch.from_numpy(lms_from_waveform(wave, 44100, pad=False))[None]  # [1, 1, 80, 2001]
    assert lms.shape[-1] == 2001
    from_lms = enc(lms)
    assert torch.equal(from_wave.frames, from_lms.frames)
    assert from_lms.frames.shape == (1, 126, 320)  # 2001 frames -> 2016 -> 126 patches of 16
    chunks = [enc(lms[..., s:s + 208]).frames for s in range(0, 2001, 208)]
    assert torch.allclose(from_lms.frames, torch.cat(chunks, dim=1), atol=1e-6)


def test_embed_cli_writes_clip_embeddings_for_every_file(trained, tmp_path):
    out = tmp_path / "emb.npz"
    r = run_m2das("embed", trained["root"] / "audio", out, "--weights", trained["run"], "--device", "cpu",
                  "--batch_size", "7")
    assert r.returncode == 0, r.stderr
    z = np.load(out)
    assert z["embeddings"].shape == (40, 320) and len(z["files"]) == 40
    first = list(z["files"]).index("c0_00.wav")
    enc = m2das.load_encoder(trained["run"])
    expected = enc(torch.from_numpy(sf.read(trained["clips"][0][0])[0]), sample_rate=16000).clip[0]
    assert np.allclose(z["embeddings"][first], expected.numpy(), atol=1e-5)
    assert "clip" in r.stderr  # the progress bar


def test_eval_scores_a_trained_encoder_well_above_chance_and_caches(trained, tmp_path):
    dest = export(trained["ckpt"], tmp_path)
    args = ["eval", dest, "--data", trained["list"], "--cache_dir", tmp_path / "cache", "--device", "cpu"]
    t0 = time.monotonic()
    r = run_m2das(*args, "--out", tmp_path / "first.json")
    first_s = time.monotonic() - t0
    assert r.returncode == 0, r.stderr
    assert len(r.stdout.strip().splitlines()) == 1 and "test accuracy" in r.stdout
    assert "seeds 42, 43, 44" in r.stdout and "95% CI" in r.stdout
    result = json.loads((tmp_path / "first.json").read_text())
    assert result["metric"] == "accuracy" and result["counts"] == {"train": 20, "valid": 10, "test": 10}
    assert result["test"] >= 0.5  # 5 classes: chance is 0.2
    assert result["settings"]["seeds"] == [42, 43, 44] and result["settings"]["lr"] == 3e-5
    assert len(result["runs"]) == 3 and not result["embeddings_cached"]
    r2 = run_m2das(*args, "--out", tmp_path / "second.json")
    second = json.loads((tmp_path / "second.json").read_text())
    assert r2.returncode == 0 and second["embeddings_cached"] and second["test"] == result["test"]
    print(f"eval: first run {first_s:.1f} s, cached run {second['seconds']:.1f} s in-process")


def test_eval_bad_lists_are_one_line_errors(trained, tmp_path):
    good = trained["list"].read_text().splitlines()
    cases = {
        "missing.csv": (good + ["audio/nope.wav,/demo/tone,test"], "missing"),
        "split.csv": (good + [good[1].rsplit(",", 1)[0] + ",holdout"], "unknown split"),
        "notrain.csv": ([line for line in good if not line.endswith(",train")], "no 'train' rows"),
        "novalid.csv": ([line for line in good if not line.endswith(",valid")], "no 'valid' rows"),
    }
    for name, (lines, phrase) in cases.items():
        csv = trained["root"] / name
        csv.write_text("\n".join(lines) + "\n")
        r = run_m2das("eval", trained["run"], "--data", csv, "--cache_dir", tmp_path)
        assert r.returncode == 2, (name, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1 and phrase in r.stderr and name in r.stderr, r.stderr
