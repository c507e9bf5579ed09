"""`m2das export`: a file the published runtime's loader reads as it is, loaded here the way it loads it."""

import json
import os
from functools import partial

import pytest
import torch
from conftest import run_m2das
from pretrained_fixture import KINDS, RUN_NAME, make_checkpoint

import m2das
from m2das.downstream.export import export
from m2das.downstream.weights import WeightsError

ENCODER_PREFIXES = ("patch_embed.", "blocks.", "norm.")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("export") / "runs")


def runtime_parse(folder: str):
    """How the runtime reads sizes from a folder name (parse_sizes_by_name, written out here)."""
    model, params = folder.split("-")[0], folder.split("-")[1].split("p")[:3]
    return model, [int(v) for v in params[0].split("x")], [int(v) for v in params[1].split("x")], params[2]


def runtime_load(path):
    """RuntimeM2D's loader, step by step: a plain torch.load (weights_only on this torch), 'model' if
    present, sizes from the folder name, the head's width read for an m2d_as_vit / m2d_x_vit model,
    norm_stats defaulted, then only the encoder-only ViT's parameters kept and loaded strictly."""
    from timm.models.vision_transformer import VisionTransformer

    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    checkpoint = checkpoint["model"] if "model" in checkpoint else checkpoint
    model_name, input_size, patch_size, _ = runtime_parse(path.parent.name)
    read = {}
    if model_name.startswith(("m2d_x_vit", "m2d_as_vit")):
        read["off_emb_dim"] = checkpoint["offline_predictor.weight"].shape[0]  # KeyError in the runtime if absent
    checkpoint.setdefault("norm_stats", torch.tensor([-7.1, 4.2]))
    dim = checkpoint["cls_token"].shape[-1]
    depth = 1 + max(int(k.split(".")[1]) for k in checkpoint if k.startswith("blocks."))
    vit = VisionTransformer(img_size=tuple(input_size), patch_size=tuple(patch_size), in_chans=1, embed_dim=dim,
                            depth=depth, num_heads=2, mlp_ratio=4, qkv_bias=True, num_classes=0,
                            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6))
    vit.norm_stats = torch.nn.Parameter(torch.tensor([-7.1, 4.2]), requires_grad=False)
    del vit.head
    names = {n for n, _ in vit.named_parameters()}
    vit.load_state_dict({k: v for k, v in checkpoint.items() if k in names}, strict=True)
    return vit, read


def test_default_export_loads_in_the_runtime_with_everything_its_loader_reads(ckpt, tmp_path):
    r = run_m2das("export", ckpt.parent, "--out", tmp_path)
    assert r.returncode == 0, r.stderr
    exported = next(tmp_path.glob("*/*.pth"))
    assert exported.name == "weights_ep2.pth" and exported.parent.name == RUN_NAME + "_enconly"
    assert runtime_parse(exported.parent.name) == ("m2d_as_vit_tiny", [80, 208], [16, 16], "16k")

    vit, read = runtime_load(exported)
    assert read["off_emb_dim"] == len(KINDS)
    state = torch.load(exported, weights_only=True)
    full = torch.load(ckpt, weights_only=True)["model"]
    expected = {k for k in full if k in ("cls_token", "pos_embed", "norm_stats")
                or k.startswith(ENCODER_PREFIXES + ("offline_predictor.",))}
    assert set(state) == expected
    assert not any(k.startswith(("target_", "decoder", "mask_token")) for k in state)
    assert all(torch.equal(state[k], full[k]) for k in state)
    assert torch.equal(vit.norm_stats, full["norm_stats"])
    assert json.loads((exported.parent / "classes.json").read_text()) == KINDS
    assert exported.stat().st_size < 0.6 * ckpt.stat().st_size


def test_with_head_is_the_same_file_and_tags(ckpt, tmp_path):
    plain = export(ckpt, tmp_path / "a")
    headed = export(ckpt, tmp_path / "b", with_head=True)
    assert plain.relative_to(tmp_path / "a") == headed.relative_to(tmp_path / "b")
    assert plain.read_bytes() == headed.read_bytes()
    enc = m2das.load_encoder(headed)
    probs = enc.tag(torch.randn(1, 1, 80, 300) * 2 - 5)
    assert probs.shape == (1, len(KINDS)) and torch.all((probs > 0) & (probs < 1))


def test_weights_without_a_head_export_plainly_and_refuse_with_head(ckpt, tmp_path):
    raw = torch.load(ckpt, weights_only=True)
    raw["model"] = {k: v for k, v in raw["model"].items() if not k.startswith("offline_predictor.")}
    folder = tmp_path / RUN_NAME
    folder.mkdir()
    torch.save(raw, folder / "checkpoint-2.pth")
    dest = export(folder / "checkpoint-2.pth", tmp_path / "out")
    assert not any(k.startswith("offline_predictor.") for k in torch.load(dest, weights_only=True))
    with pytest.raises(WeightsError, match="no AudioSet head"):
        export(folder / "checkpoint-2.pth", tmp_path / "out2", with_head=True)


def test_export_errors_are_one_line(tmp_path, capsys):
    from m2das.downstream.export import main

    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    r = run_m2das("export", tmp_path / "junk.pth")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert str(tmp_path / "junk.pth") in r.stderr
    assert main([str(tmp_path / "nothing")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "no such file or run folder" in err


def test_two_runs_named_with_output_dir_export_side_by_side_and_never_overwrite(tmp_path):
    """`--output_dir runs/a` and `runs/b`: each export is named after its run; a different file in the
    way is refused (one line, exit 2); exporting the same weights again is fine."""
    a = make_checkpoint(tmp_path / "x", seed=0)
    b = make_checkpoint(tmp_path / "y", seed=1)
    runs = tmp_path / "runs"
    runs.mkdir()
    (runs / "fixme").mkdir()
    (runs / "second try").mkdir()
    a.rename(runs / "fixme" / a.name)
    b.rename(runs / "second try" / b.name)
    out = tmp_path / "exports"
    r1 = run_m2das("export", runs / "fixme", "--out", out)
    r2 = run_m2das("export", runs / "second try", "--out", out)
    assert r1.returncode == 0 and r2.returncode == 0, r1.stderr + r2.stderr
    folders = sorted(p.parent.name for p in out.glob("*/weights_ep2.pth"))
    assert len(folders) == 2 and folders[0].endswith("-fixme_enconly") and folders[1].endswith("-second_try_enconly")
    for name in folders:  # the prefix the runtime parses is kept
        assert runtime_parse(name) == ("m2d_as_vit_tiny", [80, 208], [16, 16], "16k")
    first = next(out.glob("*-fixme_enconly/weights_ep2.pth"))
    before = first.read_bytes()
    again = run_m2das("export", runs / "fixme", "--out", out)  # the same source again: idempotent
    assert again.returncode == 0, again.stderr
    # Another run whose folder has the same name, exported to the same place: refused, file kept.
    other = tmp_path / "elsewhere" / "fixme"
    other.mkdir(parents=True)
    (runs / "second try" / b.name).rename(other / b.name)
    os.utime(other / b.name, (first.stat().st_mtime, (runs / "fixme" / a.name).stat().st_mtime))
    r = run_m2das("export", other, "--out", out)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert str(first) in r.stderr and "different export" in r.stderr and "--out" in r.stderr
    assert first.read_bytes() == before
