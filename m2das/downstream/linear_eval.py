"""`m2das eval WEIGHTS --data LIST.csv`: linear evaluation on frozen clip embeddings, as the paper runs it.

The list is CSV `file_name,label,split` (split: train, valid or test; labels of a
multi-label clip separated by commas inside quotes; files are audio or LMS .npy,
relative to the list's folder). The encoder stays frozen; clip embeddings are
standardised with the training split's mean and std; one linear layer is
trained (softmax for single-label, sigmoid for multi-label) with Adam, stopping
early on the validation split; the best-on-validation layer is scored on test:
accuracy (single-label) or mAP (multi-label). Defaults follow the EVAR tool:
seed 42, at most 200 epochs, stop after 20 without improvement.
"""

import argparse
import hashlib
import os
import sys
from pathlib import Path

import numpy as np

from m2das.runfolder import EXIT_BAD_INPUT

SPLITS = ("train", "valid", "test")


class ListError(ValueError):
    """The evaluation list cannot be used; the message names the file and the fix."""


def read_eval_list(csv_path, root=None):
    """-> (paths, per-row label lists, splits, class names); ListError for a bad list."""
    import pandas as pd

    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise ListError(f"{csv_path}: list not found")
    try:
        df = pd.read_csv(csv_path, dtype=str, keep_default_na=False)
    except Exception as e:  # pandas raises many types for malformed CSVs
        raise ListError(f"{csv_path}: unreadable CSV ({' '.join(str(e).split())})") from None
    missing = {"file_name", "label", "split"} - set(df.columns)
    if missing:
        raise ListError(f"{csv_path}: missing column(s) {', '.join(sorted(missing))}; expected file_name,label,split")
    splits = [s.strip().lower() for s in df["split"]]
    unknown = sorted(set(splits) - set(SPLITS))
    if unknown:
        raise ListError(f"{csv_path}: unknown split value(s) {unknown[:5]}; use train, valid or test")
    for needed in SPLITS:
        if needed not in splits:
            raise ListError(f"{csv_path}: no {needed!r} rows; the list needs train, valid and test rows")
    labels = [[c.strip() for c in v.split(",") if c.strip()] for v in df["label"]]  # as in AudioSet's lists
    unlabelled = [f for f, row in zip(df["file_name"], labels) if not row]
    if unlabelled:
        raise ListError(f"{csv_path}: {len(unlabelled)} row(s) without a label, e.g. {unlabelled[0]}; label or remove them")
    root = Path(root) if root is not None else csv_path.parent
    paths = [root / f for f in df["file_name"]]
    absent = [str(p) for p in paths if not p.is_file()]
    if absent:
        raise ListError(f"{csv_path}: {len(absent)} listed file(s) missing, e.g. {absent[0]}; fix the list or "
                        f"pass --data_root (names are relative to {root})")
    classes = sorted({c for row in labels for c in row})
    return paths, labels, splits, classes


def cache_key(weights: Path, paths, random_init: bool, seed: int) -> str:
    """Changes when the weight file or the file set changes."""
    st = weights.stat()
    h = hashlib.sha1(f"{weights.resolve()}|{st.st_size}|{st.st_mtime_ns}|{random_init}|{seed}".encode())
    for p in sorted(str(Path(p).resolve()) for p in paths):
        h.update(p.encode() + b"\0")
    return h.hexdigest()[:16]


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "m2das" / "embeddings"


def random_encoder_like(encoder, model_name: str, seed: int):
    """An encoder of the same size and norm stats, with M2D-AS's initialisation and fresh random weights."""
    import torch

    from m2das.model import create_model
    from m2das.downstream.weights import is_encoder_key

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        fresh = create_model(model_name, input_size=encoder.input_size, patch_size=encoder.patch_size, num_classes=1)
    state = {k: v for k, v in fresh.state_dict().items() if is_encoder_key(k) and k != "norm_stats"}
    encoder.load_state_dict(state, strict=False)
    return encoder


def train_linear(x_train, y_train, x_valid, y_valid, n_classes: int, multi_label: bool, lr: float, epochs: int,
                 patience: int, batch_size: int, seed: int, device="cpu"):
    """Adam on one linear layer; returns (best layer, best validation score, its epoch, epochs run)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    layer = torch.nn.Linear(x_train.shape[1], n_classes)
    bound = 1.0 / np.sqrt(x_train.shape[1])
    with torch.no_grad():
        layer.weight.uniform_(-bound, bound, generator=gen)
        layer.bias.uniform_(-bound, bound, generator=gen)
    layer.to(device)
    opt = torch.optim.Adam(layer.parameters(), lr=lr)
    xt, yt = torch.from_numpy(x_train).to(device), torch.from_numpy(y_train).to(device)
    xv = torch.from_numpy(x_valid).to(device)
    loss_fn = torch.nn.BCEWithLogitsLoss() if multi_label else torch.nn.CrossEntropyLoss()
    best, best_epoch, best_state, epoch = -np.inf, 0, copy_state(layer), 0
    for epoch in range(1, epochs + 1):
        for idx in torch.randperm(len(xt), generator=gen).split(batch_size):
            idx = idx.to(device)
            opt.zero_grad()
            loss_fn(layer(xt[idx]), yt[idx]).backward()
            opt.step()
        with torch.no_grad():
            score = score_of(layer(xv).cpu().numpy(), y_valid, multi_label)
        if np.isnan(score):  # no validation clip has a label the score can use: keep the latest layer
            best_state, best_epoch = copy_state(layer), epoch
        elif score > best:
            best, best_epoch, best_state = score, epoch, copy_state(layer)
        elif epoch - best_epoch >= patience:
            break
    layer.load_state_dict(best_state)
    return layer, float(best), best_epoch, epoch


def finite_or_none(value: float):
    """JSON has no NaN: a score with nothing to score (no positive label in the split) is null."""
    return float(value) if np.isfinite(value) else None


def copy_state(layer) -> dict:
    return {k: v.detach().clone() for k, v in layer.state_dict().items()}


def score_of(scores: np.ndarray, targets: np.ndarray, multi_label: bool) -> float:
    from m2das.metrics import accuracy, mean_average_precision

    return mean_average_precision(scores, targets) if multi_label else accuracy(scores, targets)


def evaluate(weights, data, *, data_root=None, out=None, seed=42, lr=3e-4, epochs=200, patience=20,
             batch_size=128, embed_batch=32, device="auto", cache_dir=None, random_init=False,
             multi_label=None, progress=True) -> dict:
    """The whole evaluation; returns the result dict that is also written as JSON."""
    import time

    t0 = time.monotonic()
    paths, labels, splits, classes = read_eval_list(data, data_root)  # before torch: bad lists fail fast

    import torch

    from m2das.downstream.embed import embed_files, pick_device
    from m2das.downstream.encoder import load_encoder
    from m2das.downstream.weights import read_weights, resolve_checkpoint

    weights_file = resolve_checkpoint(weights)
    device = pick_device(device)
    if multi_label is None:
        multi_label = any(len(row) > 1 for row in labels)
    index = {c: i for i, c in enumerate(classes)}
    if multi_label:
        targets = np.zeros((len(paths), len(classes)), dtype=np.float32)
        for r, row in enumerate(labels):
            targets[r, [index[c] for c in row]] = 1.0
    else:
        targets = np.array([index[row[0]] for row in labels], dtype=np.int64)

    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    cache_file = cache / f"{cache_key(weights_file, paths, random_init, seed)}.npz"
    cached = False
    if cache_file.exists():
        with np.load(cache_file, allow_pickle=False) as z:
            if list(z["files"]) == [str(p.resolve()) for p in paths]:
                emb, cached = z["embeddings"], True
    if not cached:
        encoder = load_encoder(weights_file, device)
        if random_init:
            model_name = read_weights(weights_file).model
            encoder = random_encoder_like(encoder, model_name, seed)
        emb = embed_files(encoder, paths, embed_batch, progress=progress)
        from m2das.fileio import atomic_write

        with atomic_write(cache_file) as f:
            np.savez(f, files=np.array([str(p.resolve()) for p in paths]), embeddings=emb)

    split = np.array(splits)
    train, valid, test = (split == s for s in SPLITS)
    mean, std = emb[train].mean(0), emb[train].std(0) + 1e-8
    x = ((emb - mean) / std).astype(np.float32)
    layer, valid_score, best_epoch, ran = train_linear(
        x[train], targets[train], x[valid], targets[valid], len(classes), multi_label, lr, epochs, patience,
        batch_size, seed, device)
    with torch.no_grad():
        test_scores = layer(torch.from_numpy(x[test]).to(device)).cpu().numpy()
    metric = "mAP" if multi_label else "accuracy"
    result = {
        "metric": metric, "test": finite_or_none(score_of(test_scores, targets[test], multi_label)),
        "valid": finite_or_none(valid_score),
        "weights": str(weights_file), "random_init": random_init, "list": str(data),
        "counts": {s: int((split == s).sum()) for s in SPLITS}, "classes": len(classes),
        "multi_label": multi_label, "feature_dim": int(emb.shape[1]),
        "settings": {"seed": seed, "lr": lr, "max_epochs": epochs, "early_stop_epochs": patience,
                     "batch_size": batch_size, "best_epoch": best_epoch, "epochs_run": ran,
                     "standardised": "train split mean/std", "classifier": "linear, " +
                     ("sigmoid/BCE" if multi_label else "softmax/CE") + ", Adam"},
        "embeddings_cached": cached, "seconds": round(time.monotonic() - t0, 2),
    }
    out = Path(out) if out is not None else weights_file.parent / f"eval_{Path(data).stem}{'_random' if random_init else ''}.json"
    from m2das.fileio import write_json

    write_json(out, result)
    result["out"] = str(out)
    return result


def format_score(value, digits: int = 4) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def summary_line(r: dict) -> str:
    c = r["counts"]
    s = r["settings"]
    fmt = format_score
    return (f"linear eval: test {r['metric']} {fmt(r['test'])} (valid {fmt(r['valid'])}) on {r['list']}: "
            f"{c['train']}/{c['valid']}/{c['test']} train/valid/test, {r['classes']} classes, "
            f"{'random-init ' if r['random_init'] else ''}encoder {r['weights']}; seed {s['seed']}, lr {s['lr']:g}, "
            f"best epoch {s['best_epoch']} of {s['epochs_run']}; {r['out']}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="m2das eval", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("weights", metavar="WEIGHTS", help="an exported encoder, a checkpoint or a run folder")
    p.add_argument("--data", required=True, metavar="LIST.csv", help="file_name,label,split")
    p.add_argument("--data_root", "--data-root", default=None, help="folder the file names are relative to "
                   "(default: the list's folder)")
    p.add_argument("--out", default=None, help="result JSON (default: beside the weights, eval_LIST.json)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--epochs", type=int, default=200, help="at most this many passes over the training split")
    p.add_argument("--early_stop_epochs", "--early-stop-epochs", type=int, default=20)
    p.add_argument("--batch_size", "--batch-size", type=int, default=128)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--cache_dir", "--cache-dir", default=None, help=f"embedding cache (default {default_cache_dir()})")
    p.add_argument("--multi_label", "--multi-label", action="store_true", default=None,
                   help="sigmoid and mAP even if every row has one label (default: multi-label when any row has two)")
    p.add_argument("--random_init", "--random-init", action="store_true",
                   help="baseline: a randomly initialised encoder of the same size and norm stats")
    p.add_argument("--no_progress", "--no-progress", action="store_true")
    args = p.parse_args(argv)

    from m2das.downstream.embed import InputError
    from m2das.downstream.weights import WeightsError

    try:
        r = evaluate(args.weights, args.data, data_root=args.data_root, out=args.out, seed=args.seed, lr=args.lr,
                     epochs=args.epochs, patience=args.early_stop_epochs, batch_size=args.batch_size,
                     device=args.device, cache_dir=args.cache_dir, random_init=args.random_init,
                     multi_label=args.multi_label, progress=not args.no_progress)
    except (ListError, InputError, WeightsError) as e:
        print(f"m2das eval: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(summary_line(r))
    return 0
