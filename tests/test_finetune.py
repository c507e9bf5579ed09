"""`m2das finetune`: Table VI fine-tuning on a tiny AudioSet-shaped folder (real YTIDs and labels from
AudioSet's release lists, synthetic LMS), its stop/resume exactness, and the recipe's pieces."""

import json
import math
import zlib

import numpy as np
import pytest
import torch

from conftest import SHARED, run_m2das
from m2das import runfolder
from m2das.data import labels
from m2das.downstream import ft_data
from m2das.downstream.ft_model import LARS, finetune_lr, interpolate_pos_embed
from m2das.model import sincos_pos_embed
from pretrained_fixture import make_checkpoint
from slurm_fixture import slurm_cluster  # noqa: F401

AUDIOSET = SHARED / "audioset"
N_TRAIN, N_TEST = 24, 12


def write_audioset_folder(root, seed=0):
    """DATA/audioset_lms/{YTID}_{start}.npy for the first clips of the balanced and eval lists; each
    label brightens its own mel band, so the task can be learnt."""
    rng = np.random.default_rng(seed)
    (root / "audioset_lms").mkdir(parents=True)
    for name, n in (("balanced_train_segments.csv", N_TRAIN), (labels.EVAL_SEGMENTS, N_TEST)):
        table, _ = labels.read_segments(AUDIOSET / name)
        for ytid in list(table)[:n]:
            lms = rng.standard_normal((1, 80, int(rng.integers(230, 260)))).astype(np.float32) * 2 - 7
            for mid in table[ytid].split(","):
                band = zlib.crc32(mid.encode()) % 76
                lms[:, band:band + 4] += 4
            np.save(root / "audioset_lms" / f"{ytid}_30.000.npy", lms)
    return root


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    base = tmp_path_factory.mktemp("ft")
    weights = make_checkpoint(base / "runs")
    return base, write_audioset_folder(base / "data"), weights


def command(setup, out, *extra):
    base, data, weights = setup
    return ("finetune", weights, "--task", "as20k", "--data_path", data, "--metadata", AUDIOSET,
            "--output_dir", out, "--frames", "240", "--epochs", "3", "--warmup_epochs", "1", "--batch_size", "8",
            "--eval_batch_size", "16", "--num_workers", "0", "--log_every", "1", "--device", "cpu", *extra)


@pytest.fixture(scope="module")
def reference(setup):
    out = setup[0] / "reference"
    r = run_m2das(*command(setup, out))
    assert r.returncode == 0, r.stderr
    return out, r


def segment_count(name):
    return len(labels.read_segments(AUDIOSET / name)[0])


def test_finetune_reports_best_and_last_map_and_missing_clips(reference):
    out, r = reference
    result = json.loads((out / "finetune_result.json").read_text())
    assert result["metric"] == "mAP" and len(result["scores"]) == 3
    assert result["best"] == max(result["scores"]) and result["last"] == result["scores"][-1]
    assert result["scores"][result["best_epoch"] - 1] == result["best"]
    assert all(0 < s <= 1 for s in result["scores"])
    assert result["missing"] == {"train": segment_count("balanced_train_segments.csv") - N_TRAIN,
                                 "test": segment_count(labels.EVAL_SEGMENTS) - N_TEST}
    assert (result["train_clips"], result["test_clips"]) == (N_TRAIN, N_TEST)
    assert "best epoch on eval" in r.stdout and f"{result['missing']['test']} test" in r.stdout
    events = [json.loads(line)["event"] for line in (out / runfolder.RESTARTS).read_text().splitlines()]
    assert events == [runfolder.EVENT_START, runfolder.EVENT_FINISHED]
    state = torch.load(out / "checkpoint-3.pth", weights_only=True)
    assert state["scores"]["scores"] == result["scores"] and state["model"]["head.linear.weight"].shape[0] == 527
    status = run_m2das("status", out, "--json")
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["finished"] is True


@pytest.mark.parametrize("stop_at", [4, 3])  # mid-epoch, and an epoch's last step (its score comes after)
def test_sigterm_then_resume_is_bit_identical(setup, reference, stop_at):
    out = setup[0] / f"stopped{stop_at}"
    first = run_m2das(*command(setup, out), env={"M2DAS_TEST_SIGTERM_AT_STEP": str(stop_at)})
    assert first.returncode == runfolder.EXIT_RESUMABLE, first.stderr
    stopped = [json.loads(line) for line in (out / runfolder.RESTARTS).read_text().splitlines()][-1]
    assert stopped["event"] == runfolder.EVENT_STOPPED and stopped["signal"] == "SIGTERM"
    assert stopped["step"] == stop_at
    second = run_m2das(*command(setup, out))
    assert second.returncode == 0, second.stderr
    assert f"resumed from {out / runfolder.LAST} at step {stop_at}" in second.stdout
    a = torch.load(reference[0] / "checkpoint-3.pth", weights_only=True)
    b = torch.load(out / "checkpoint-3.pth", weights_only=True)
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for p, q in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert all(torch.equal(p[k], q[k]) for k in p)
    assert a["scores"] == b["scores"]


def test_a_folder_without_audioset_clips_is_one_line_exit_2(setup, tmp_path):
    (tmp_path / "data" / "audioset_lms").mkdir(parents=True)
    np.save(tmp_path / "data" / "audioset_lms" / "not_a_ytid.npy", np.zeros((1, 80, 300), np.float32))
    r = run_m2das("finetune", setup[2], "--data_path", tmp_path / "data", "--metadata", AUDIOSET,
                  "--output_dir", tmp_path / "run", "--device", "cpu")
    assert r.returncode == 2 and r.stderr.count("\n") == 1
    assert str(tmp_path / "data") in r.stderr and "m2das prepare" in r.stderr


# -- the recipe's pieces -----------------------------------------------------------------------

def test_pos_embed_interpolation_from_608_to_1001_frames():
    rows, cols, dim = 5, 608 // 16, 768
    pos = sincos_pos_embed(dim, rows, cols)[None]
    out = interpolate_pos_embed(pos, rows, cols, 1001 // 16)
    assert out.shape == (1, 1 + rows * 62, dim)
    assert torch.equal(out[:, 0], pos[:, 0])  # cls row untouched
    grid, new = pos[0, 1:].reshape(rows, cols, dim), out[0, 1:].reshape(rows, 62, dim)
    # The frequency axis keeps its size: the row-index channels (constant along time) keep their values.
    assert torch.allclose(new[:, :, dim // 2:], grid[:, :1, dim // 2:].expand(-1, 62, -1), atol=1e-5)
    # The time axis is stretched: a grid linear in the column index is sampled at the new columns' centres
    # (within the bicubic kernel's small ripple, a = -0.75), increasing, the same on every row.
    ramp = torch.arange(cols, dtype=torch.float32).view(1, 1, cols, 1).expand(1, rows, cols, 4)
    ramp = torch.cat([torch.zeros(1, 1, 4), ramp.reshape(1, rows * cols, 4)], dim=1)
    stretched = interpolate_pos_embed(ramp, rows, cols, 62)[0, 1:].reshape(rows, 62, 4)
    centres = (torch.arange(62) + 0.5) * cols / 62 - 0.5
    inner = (centres >= 1) & (centres <= cols - 2)
    assert torch.allclose(stretched[:, inner], centres[inner].view(1, -1, 1).expand(rows, -1, 4), atol=0.05)
    assert bool((stretched[:, 1:] > stretched[:, :-1]).all()) and torch.equal(stretched[0], stretched[-1])
    assert torch.equal(interpolate_pos_embed(pos, rows, cols, cols), pos)


def test_mixup_mixes_inputs_and_targets_with_one_lambda_per_sample():
    x = torch.arange(4.0).view(4, 1, 1, 1).expand(4, 1, 2, 3).contiguous()
    y = torch.eye(4)
    mx, my = ft_data.mixup(x, y, 0.3, np.random.default_rng(1))
    rng = np.random.default_rng(1)
    lam, partner = rng.beta(0.3, 0.3, size=4), rng.permutation(4)
    for b in range(4):
        assert torch.allclose(mx[b], torch.full((1, 2, 3), lam[b] * b + (1 - lam[b]) * partner[b]))
        assert math.isclose(float(my[b].sum()), 1.0, rel_tol=1e-6)
        assert math.isclose(float(my[b, b] + (my[b, partner[b]] if partner[b] != b else 0)), 1.0, rel_tol=1e-6)
    same = ft_data.mixup(x, y, 0.0, np.random.default_rng(1))
    assert same[0] is x and same[1] is y


def test_lars_update_rule():
    w = torch.nn.Parameter(torch.tensor([[3.0, 4.0]]))  # ||w|| = 5
    b = torch.nn.Parameter(torch.tensor([1.0]))
    opt = LARS([w, b], lr=2.0, weight_decay=0.1, momentum=0.9, trust_coefficient=0.001)
    w.grad, b.grad = torch.tensor([[0.0, 1.0]]), torch.tensor([0.5])
    opt.step()
    update = torch.tensor([[0.0, 1.0]]) + 0.1 * torch.tensor([[3.0, 4.0]])
    scaled = update * (0.001 * 5.0 / update.norm())
    assert torch.allclose(w.data, torch.tensor([[3.0, 4.0]]) - 2.0 * scaled)
    assert torch.allclose(b.data, torch.tensor([1.0 - 2.0 * 0.5]))  # vectors: no decay, no trust ratio
    w.grad, b.grad = torch.tensor([[0.0, 1.0]]), torch.tensor([0.5])
    before = w.data.clone()
    opt.step()
    update2 = torch.tensor([[0.0, 1.0]]) + 0.1 * before
    mu = 0.9 * scaled + update2 * (0.001 * before.norm() / update2.norm())
    assert torch.allclose(w.data, before - 2.0 * mu)


def test_cosine_with_warmup_per_iteration():
    assert finetune_lr(0.0, 0.5, 5, 200) == 0.0
    assert math.isclose(finetune_lr(2.5, 0.5, 5, 200), 0.25)
    assert math.isclose(finetune_lr(4 + 3 / 4, 0.5, 5, 200), 0.5 * 4.75 / 5)  # epoch + iter / iters
    assert math.isclose(finetune_lr(100.0, 0.5, 5, 200), 1e-7 + (0.5 - 1e-7) * 0.5)
    assert math.isclose(finetune_lr(5.0, 0.5, 5, 200), 1e-7 + (0.5 - 1e-7) * 0.5 * (1 + math.cos(math.pi * 5 / 200)))
    assert math.isclose(finetune_lr(200.0, 0.5, 5, 200), 1e-7) and math.isclose(finetune_lr(250.0, 0.5, 5, 200), 1e-7)


def test_spec_augment_masks_follow_torchaudio_widths():
    x = torch.ones(3, 1, 80, 240)
    out = ft_data.spec_augment(x, 30, 192, np.random.default_rng(0))
    rng = np.random.default_rng(0)
    for b in range(3):
        f0, f1 = ft_data.mask_span(80, 30, rng)
        t0, t1 = ft_data.mask_span(240, 192, rng)
        assert 0 <= f1 - f0 < 30 and 0 <= t1 - t0 < 192
        assert float(out[b, 0, f0:f1].abs().sum()) == 0 and float(out[b, :, :, t0:t1].abs().sum()) == 0
        expected = (80 - (f1 - f0)) * (240 - (t1 - t0))
        assert int(out[b].sum()) == expected
    assert torch.equal(x, torch.ones(3, 1, 80, 240))  # the input is left as it was


def test_two_ranks_over_gloo_finish_and_score(setup):
    """DDP on CPU: each rank trains on its share, the test list is scored across both ranks."""
    import subprocess
    import sys

    from conftest import REPO

    out = setup[0] / "ddp"
    args = [a for a in command(setup, out, "--batch_size", "4") if a != "finetune"]
    args[args.index("--epochs") + 1] = "2"
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        "-m", "m2das", "finetune", *map(str, args)], capture_output=True, text=True, cwd=REPO,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    result = json.loads((out / "finetune_result.json").read_text())
    assert len(result["scores"]) == 2 and all(0 < s <= 1 for s in result["scores"])
    assert json.loads((out / runfolder.CONFIG).read_text())["world_size"] == 2
    assert "cpu x 2" in r.stdout


def test_a_finetuned_run_folder_exports_and_loads_as_an_encoder(reference, tmp_path):
    """The fine-tuned encoder (keys under `encoder.`) is read back with its own names and its fine-tuned
    input length: `m2das export` writes it, load_encoder rebuilds it, and its features are those of the
    fine-tuned weights."""
    from m2das.downstream.encoder import load_encoder

    out = reference[0]
    r = run_m2das("export", out, "--out", tmp_path)
    assert r.returncode == 0, r.stderr
    exported = next(tmp_path.glob("*/weights_ep3.pth"))
    assert exported.parent.name.startswith("m2d_as_vit_tiny-80x240p16x16p16k-")
    saved = torch.load(exported, weights_only=True)
    tuned = torch.load(out / "checkpoint-3.pth", weights_only=True)["model"]
    assert set(saved) == {k.removeprefix("encoder.") for k in tuned if k.startswith("encoder.")}
    assert not any(k.startswith(("head.", "offline_predictor.")) for k in saved)
    for k, v in saved.items():
        assert torch.equal(v, tuned["encoder." + k]), k
    enc = load_encoder(exported)
    assert enc.input_size == (80, 240) and enc.grid == (5, 15) and len(enc.blocks) == 2
    lms = torch.randn(2, 1, 80, 240) * 2 - 7
    assert torch.equal(enc(lms).clip, load_encoder(out)(lms).clip)


def test_spcv2_from_its_audio_picks_the_test_score_by_validation(setup, tmp_path):
    """SPCV2 read from the publisher's layout (a stand-in of pitch-coded 1-s words): the clips become
    101-frame LMS once, the run scores validation and test every epoch, and the reported accuracy is
    the test score of the epoch best on validation."""
    from task_standins import make_standin

    root = make_standin("spcv2", tmp_path / "spcv2", per_class=8, seconds=1.0, n_classes=3)
    out = tmp_path / "run"
    r = run_m2das("finetune", setup[2], "--task", "spcv2", "--data_path", root, "--output_dir", out,
                  "--epochs", "4", "--warmup_epochs", "1", "--batch_size", "8", "--lr", "0.05", "--num_workers", "0",
                  "--log_every", "1", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    result = json.loads((out / "finetune_result.json").read_text())
    assert result["metric"] == "accuracy" and "validation" in result["selection"]
    assert (result["train_clips"], result["valid_clips"], result["test_clips"]) == (24, 24, 24)
    assert len(result["scores"]) == len(result["valid_scores"]) == 4
    pick = int(np.argmax(result["valid_scores"]))
    assert (result["best_epoch"], result["best"]) == (pick + 1, result["scores"][pick])
    assert result["best_valid"] == max(result["valid_scores"]) > 1 / 3  # above chance on 3 words
    lms = sorted((out / "task_lms").rglob("*.npy"))
    assert len(lms) == 72 and all(np.load(p).shape == (1, 80, 101) for p in lms)
    config = json.loads((out / runfolder.CONFIG).read_text())
    assert (config["frames"], config["optim"], config["mixup"], config["rrc"]) == (101, "sgd", 0.3, True)
    assert json.loads((out / runfolder.CLASSES).read_text()) == ["no", "up", "yes"]


def test_an_esc50_fold_out_of_range_is_one_line_exit_2(setup, tmp_path):
    from task_standins import make_standin

    root = make_standin("esc50", tmp_path / "esc50", per_class=2, seconds=0.2, n_classes=2)
    r = run_m2das("finetune", setup[2], "--task", "esc50", "--fold", "6", "--data_path", root,
                  "--output_dir", tmp_path / "run", "--device", "cpu")
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert "--fold 6" in r.stderr and "1..5" in r.stderr


@pytest.mark.slurm
@pytest.mark.slow
def test_finetune_through_the_launcher_on_slurm_is_preempted_requeued_and_finishes(setup, slurm_cluster, tmp_path):
    """`launch/submit.py --command finetune` on a real SLURM: two CPU ranks fine-tune SPCV2, a
    preemption warning (SIGUSR2) saves and requeues the job (submitit's checkpoint keeps the
    command), and the job ends with its result JSON."""
    import re
    import subprocess
    import sys

    from conftest import REPO
    from slurm_fixture import make_env, read_jsonl, starts, wait_for, wait_for_progress
    from task_standins import make_standin

    cluster, run = slurm_cluster, tmp_path / "run"
    root = make_standin("spcv2", tmp_path / "spcv2", per_class=4, seconds=1.0, n_classes=3)
    out = subprocess.run([sys.executable, str(REPO / "launch" / "submit.py"), "--preset", "cpu-test", "--cluster",
                          "slurm", "--command", "finetune", "--run-dir", str(run), "--time", "10", "--",
                          str(setup[2]), "--task", "spcv2", "--data_path", str(root), "--epochs", "4",
                          "--warmup_epochs", "1", "--batch_size", "2"],
                         env=dict(make_env(), SLURM_CONF=str(cluster.conf)), capture_output=True, text=True,
                         timeout=60, cwd=REPO)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "trainer: m2das finetune " in out.stdout
    job = re.search(r"job id:\s+(\d+)", out.stdout).group(1)

    def diag():
        logs = "".join(p.read_text()[-3000:] for p in sorted((run / "slurm").glob(f"{job}_*_log.*")))
        return f"job: {cluster.job(job)}\n{logs}"

    wait_for_progress(run, 1, 2, 240, diag)
    cluster.run("scancel", "--signal=USR2", job)

    def requeued():  # back in the queue, waiting on its BeginTime: start it now
        j = cluster.job(job)
        return j.get("JobState") == "PENDING" and int(j.get("Restarts", -1)) == 1
    wait_for(requeued, 120, f"job {job} to be requeued", diag)
    cluster.release(job)
    wait_for(lambda: len(starts(run)) >= 2, 240, "the requeued start", diag)
    wait_for(lambda: cluster.job(job).get("JobState") in ("COMPLETED", "FAILED", "CANCELLED"), 420,
             f"job {job} to end", diag)
    assert cluster.job(job)["JobState"] == "COMPLETED", diag()
    result = json.loads((run / "finetune_result.json").read_text())
    assert result["task"] == "spcv2" and len(result["scores"]) == len(result["valid_scores"]) == 4
    events = [r.get("event") for r in read_jsonl(run / runfolder.RESTARTS)]
    assert runfolder.EVENT_STOPPED in events and events[-1] == runfolder.EVENT_FINISHED, events
    assert json.loads((run / runfolder.CONFIG).read_text())["world_size"] == 2
