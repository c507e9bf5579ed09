"""The demo's last stage: does pre-training beat a random encoder on clips it never trained on?

The held-out clips are those of the corpus's eval_segments.csv: `m2das prepare
--hold-out-eval` keeps them out of the pre-training list (so neither their audio
nor their labels reach the encoder) and lists them in files_as_eval.csv. They are
split 4/2/4 (of every 10) into probe train, valid and test. The trained encoder
and three random initialisations are embedded once each; a linear probe (the
evaluation protocol's, with a learning rate fit for a hundred clips) is trained
with three seeds, seed i on random init i. The margin is the mean over seeds of
trained minus random test mAP; its 95% interval comes from a paired bootstrap
over the test clips and the seeds, so it carries the test set's sampling noise
and the spread of random inits. Pre-training itself runs once (its seed 3): the
interval does not cover a different pre-training draw.
"""

import csv
from pathlib import Path

import numpy as np

from m2das.data.heldout import EVAL_LIST
from m2das.downstream.protocol import SEEDS, Settings, macro_map, standardise, train_linear

PROBE = Settings(lr=1e-3, max_batch=32)  # Table V's lr 3e-5 barely moves a layer fit on ~100 clips
SPLIT_OF_TEN = {0: "train", 1: "train", 2: "train", 3: "train", 4: "valid", 5: "valid"}  # the rest: test
BOOTSTRAP = 1000
RESULT = "eval_demo.json"


def read_heldout(data_dir) -> tuple[list, np.ndarray, np.ndarray, list]:
    """(LMS paths, multi-hot targets [N, C], split names [N], class ids) from the held-out list."""
    data_dir = Path(data_dir)
    with open(data_dir / EVAL_LIST, newline="") as f:
        rows = list(csv.DictReader(f))
    classes = sorted({c for r in rows for c in r["label"].split(",")})
    targets = np.zeros((len(rows), len(classes)), dtype=np.float32)
    for i, r in enumerate(rows):
        targets[i, [classes.index(c) for c in r["label"].split(",")]] = 1.0
    splits = np.array([SPLIT_OF_TEN.get(i % 10, "test") for i in range(len(rows))])
    return [data_dir / r["file_name"] for r in rows], targets, splits, classes


def probe_scores(emb: np.ndarray, targets: np.ndarray, splits: np.ndarray, seed: int) -> np.ndarray:
    """Test-clip scores of a linear probe on standardised embeddings."""
    import torch

    train, valid, test = (splits == s for s in ("train", "valid", "test"))
    x_train, x_valid, x_test = standardise(emb[train], emb[valid], emb[test])
    fit = train_linear(x_train, targets[train], x_valid, targets[valid], targets.shape[1], True, seed, PROBE)
    with torch.no_grad():
        return fit.layer(torch.from_numpy(x_test)).numpy()


def bootstrap_margin(trained: list, random: list, targets: np.ndarray, rounds: int = BOOTSTRAP,
                     seed: int = 0) -> tuple[float, float]:
    """95% percentile interval of mean-over-seeds (trained - random) mAP, resampling test clips and seeds.

    Resampling the seeds too keeps a lucky or unlucky random init from passing as a real margin."""
    rng = np.random.default_rng(seed)
    n, k = targets.shape[0], len(trained)
    margins = []
    for _ in range(rounds):
        b = rng.integers(0, n, n)
        margins.append(np.mean([macro_map(trained[s][b], targets[b]) - macro_map(random[s][b], targets[b])
                                for s in rng.integers(0, k, k)]))
    lo, hi = np.percentile(margins, [2.5, 97.5])
    return float(lo), float(hi)


def verdict(lo: float, hi: float) -> str:
    if lo > 0:
        return "pre-training helps"
    if hi < 0:
        return "random init is ahead at this size"
    return "no measurable difference at this size (the interval includes 0)"


def summary_line(r: dict) -> str:
    """The one line the demo's summary prints; tests parse it."""
    return (f"pre-training margin {r['margin']:+.3f} mAP (95% CI {r['ci'][0]:+.3f} to {r['ci'][1]:+.3f}): "
            f"trained {r['trained_mean']:.3f} vs random init {r['random_mean']:.3f}, "
            f"{len(r['seeds'])} seeds, {r['counts']['test']} held-out test clips -> {r['verdict']}")


def evaluate_demo(out_dir, data_dir, checkpoint, seeds=SEEDS) -> dict:
    """Export the encoder, probe it and random inits on the held-out clips; the result (also written as JSON)."""
    import torch

    from m2das.downstream.embed import embed_files
    from m2das.downstream.encoder import load_encoder
    from m2das.downstream.export import export
    from m2das.downstream.features import random_encoder_like
    from m2das.downstream.weights import read_weights
    from m2das.fileio import write_json

    torch.set_num_threads(1)  # a 64-wide encoder and a linear layer: threads cost more than they give
    out_dir = Path(out_dir)
    weights = export(checkpoint, out_dir / "export")
    print(f"[demo] exported {weights} ({weights.stat().st_size / 1e3:.0f} kB, encoder only)", flush=True)
    paths, targets, splits, classes = read_heldout(data_dir)
    test = targets[splits == "test"]
    emb, _ = embed_files(load_encoder(weights), paths, 64, progress=False)
    model = read_weights(weights).model
    trained, random = [], []
    for seed in seeds:
        rand_emb, _ = embed_files(random_encoder_like(load_encoder(weights), model, seed), paths, 64, progress=False)
        trained.append(probe_scores(emb, targets, splits, seed))
        random.append(probe_scores(rand_emb, targets, splits, seed))
        print(f"[demo] seed {seed}: test mAP {macro_map(trained[-1], test):.3f} trained, "
              f"{macro_map(random[-1], test):.3f} random init", flush=True)
    t_maps = [macro_map(s, test) for s in trained]
    r_maps = [macro_map(s, test) for s in random]
    lo, hi = bootstrap_margin(trained, random, test)
    result = {
        "margin": float(np.mean(t_maps) - np.mean(r_maps)), "ci": [lo, hi], "verdict": verdict(lo, hi),
        "trained_mean": float(np.mean(t_maps)), "random_mean": float(np.mean(r_maps)),
        "trained": t_maps, "random": r_maps, "seeds": list(seeds), "metric": "mAP", "classes": classes,
        "counts": {s: int((splits == s).sum()) for s in ("train", "valid", "test")},
        "ci_method": f"paired bootstrap over test clips and seeds ({BOOTSTRAP} resamples)",
        "probe": {**PROBE.describe(), "seeds": list(seeds)}, "weights": str(weights),
    }
    write_json(out_dir / RESULT, result)
    return result
