"""`m2das eval WEIGHTS`: linear evaluation on frozen clip embeddings with the paper's Table V protocol.

Three forms:
  m2das eval WEIGHTS --task esc50 --data_root DIR    one of the paper's nine tasks
  m2das eval WEIGHTS --suite paper --data_root DIR   every task whose data is in DIR, one table
  m2das eval WEIGHTS --data LIST.csv                 your own task (file_name,label,split)

All run the same protocol by default (the authors' evaluation tool, config m2d):
frozen encoder, 3840-d clip embeddings (mean over time frames) standardised with
the training split's mean and std; one linear layer, softmax cross-entropy (or
sigmoid BCE when a clip has several labels); Adam lr 3e-5, betas (0.9, 0.999),
weight decay 1e-8, batch min(200, training clips); at most 200 epochs, stopping
after 20 epochs without a validation score >= the best so far; the best weights
scored on test: accuracy, or macro mAP (a class with no positive scores 0);
three runs (seeds 42, 43, 44) over every fold; the mean and its 95% confidence
interval. ESC-50 and US8K draw their validation clips out of the training folds
per seed, as the tool does (downstream.tasks).
Embeddings are computed once per weights, files and clip length and cached, so
the three seeds and every rerun cost one pass over the audio.
"""

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from m2das.cliargs import Parser
from m2das.downstream.features import ListError, cached_embeddings, default_cache_dir, targets_of
from m2das.downstream.protocol import Settings, Split, run_protocol
from m2das.runfolder import EXIT_BAD_INPUT

SPLITS = ("train", "valid", "test")


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


def unseen_in_training(labels, splits) -> list:
    """Classes of test rows that no train row has, sorted."""
    seen = {c for row, s in zip(labels, splits) if s == "train" for c in row}
    return sorted({c for row, s in zip(labels, splits) if s == "test" for c in row} - seen)


def refuse_unwritable(out) -> None:
    """ListError (one line) when the result file's folder cannot be created or written."""
    from m2das.fileio import check_writable

    try:
        check_writable(Path(out).parent)
    except OSError as e:
        raise ListError(f"--out {out}: cannot write there ({e.strerror or e}); pass --out in a writable "
                        f"folder") from None


def settings_from(args) -> Settings:
    return Settings(lr=args.lr, max_epochs=args.epochs, patience=args.early_stop_epochs,
                    max_batch=args.batch_size, seeds=tuple(args.seeds))


def evaluate(weights, data, *, data_root=None, out=None, settings: Settings = Settings(), clip_seconds=None,
             embed_batch=32, device="auto", cache_dir=None, random_init=False, multi_label=None,
             progress=True) -> dict:
    """The protocol on a file_name,label,split list; returns the result dict that is also written as JSON."""
    t0 = time.monotonic()
    paths, labels, splits, classes = read_eval_list(data, data_root)  # before torch: bad lists fail fast
    untrained = unseen_in_training(labels, splits)
    if untrained:
        print(f"m2das eval: warning: {data}: {len(untrained)} class(es) appear in test but never in train "
              f"(e.g. {', '.join(untrained[:3])}); the linear layer never learns them", file=sys.stderr)

    from m2das.downstream.embed import pick_device, samples_16k
    from m2das.downstream.weights import resolve_checkpoint
    from m2das.fileio import write_json

    weights_file = resolve_checkpoint(weights)
    out = Path(out) if out is not None else weights_file.parent / f"eval_{Path(data).stem}{'_random' if random_init else ''}.json"
    refuse_unwritable(out)  # now, not after the embeddings and three seeds
    device = pick_device(device)
    if multi_label is None:
        multi_label = any(len(row) > 1 for row in labels)
    targets = targets_of(labels, classes, multi_label)
    items = paths
    if clip_seconds is not None:
        from m2das.data.audio import SAMPLE_RATE

        items = [(p, 0, int(SAMPLE_RATE * clip_seconds)) for p in paths]
        samples_16k(paths[0])  # an unreadable first file fails here, before the encoder loads
    emb, frames, cached = cached_embeddings(weights_file, items, cache_dir=cache_dir, device=device,
                                            random_init=random_init, embed_batch=embed_batch, progress=progress)
    split = np.array(splits)
    fold = Split("list", *(np.flatnonzero(split == s) for s in SPLITS))
    result = run_protocol(emb, targets, [fold], len(classes), multi_label, settings, device)
    result.update({
        "test": result["mean"], "weights": str(weights_file), "random_init": random_init, "list": str(data),
        "counts": {s: int((split == s).sum()) for s in SPLITS}, "classes": len(classes),
        "multi_label": multi_label, "feature_dim": int(emb.shape[1]), "clip_seconds": clip_seconds,
        "embeddings_cached": cached, "seconds": round(time.monotonic() - t0, 2),
    })
    result["valid"] = float(np.mean([f["valid"] for f in result["folds"]]))
    try:
        write_json(out, result)
    except OSError as e:
        raise ListError(f"{out}: cannot write the result ({e.strerror or e}); free space there or pass "
                        f"--out in another folder") from None
    result["out"] = str(out)
    return result


def format_score(value, digits: int = 4) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def summary_line(r: dict) -> str:
    c, s = r["counts"], r["settings"]
    seeds = ", ".join(str(x) for x in s["seeds"])
    return (f"linear eval: test {r['metric']} {format_score(r['test'])} ± {format_score(r['ci95'])} (95% CI over "
            f"{len(r['runs'])} runs, seeds {seeds}; valid {format_score(r['valid'])}) on {r['list']}: "
            f"{c['train']}/{c['valid']}/{c['test']} train/valid/test, {r['classes']} classes, "
            f"{'random-init ' if r['random_init'] else ''}encoder {r['weights']}; lr {s['lr']:g}; {r['out']}")


def parser() -> argparse.ArgumentParser:
    p = Parser(prog="m2das eval", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    d = Settings()
    p.add_argument("weights", metavar="WEIGHTS", help="an exported encoder, a checkpoint or a run folder")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--data", metavar="LIST.csv", help="your own task: file_name,label,split")
    what.add_argument("--task", metavar="NAME", help="one of the paper's tasks (esc50, us8k, spcv2, vc1, voxforge, "
                      "cremad, gtzan, nsynth, surge), read from --data_root")
    what.add_argument("--suite", choices=["paper"], help="every paper task found under --data_root, one table")
    p.add_argument("--data_root", "--data-root", default=None, help="--data: folder the file names are relative "
                   "to (default: the list's folder); --task/--suite: the folder holding the tasks' data")
    p.add_argument("--out", default=None, help="result JSON (default: beside the weights); --suite also writes "
                   "the table as .md beside it")
    p.add_argument("--clip_seconds", "--clip-seconds", type=float, default=None,
                   help="--data only: cut or zero-pad every clip to this length (default: whole files); "
                        "--task uses the task's length")
    p.add_argument("--seeds", type=int, nargs="+", default=list(d.seeds), help=f"one run per seed (default {d.seeds})")
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--epochs", type=int, default=d.max_epochs, help="at most this many passes over the training split")
    p.add_argument("--early_stop_epochs", "--early-stop-epochs", type=int, default=d.patience)
    p.add_argument("--batch_size", "--batch-size", type=int, default=d.max_batch, help="batch = min(this, training clips)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--cache_dir", "--cache-dir", default=None, help=f"embedding cache (default {default_cache_dir()})")
    p.add_argument("--multi_label", "--multi-label", action="store_true", default=None,
                   help="--data: sigmoid and mAP even if every row has one label (default: when any row has two)")
    p.add_argument("--random_init", "--random-init", action="store_true",
                   help="baseline: a randomly initialised encoder of the same size and norm stats")
    p.add_argument("--no_progress", "--no-progress", action="store_true")
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)

    from m2das.downstream.embed import InputError
    from m2das.downstream.weights import WeightsError

    settings = settings_from(args)
    common = dict(out=args.out, settings=settings, device=args.device, cache_dir=args.cache_dir,
                  random_init=args.random_init, progress=not args.no_progress)
    try:
        if args.out is not None:
            refuse_unwritable(args.out)
        if args.data is not None:
            r = evaluate(args.weights, args.data, data_root=args.data_root, clip_seconds=args.clip_seconds,
                         multi_label=args.multi_label, **common)
            print(summary_line(r))
            return 0
        from m2das.downstream import suite

        if args.data_root is None:
            raise ListError(f"--{'task' if args.task else 'suite'} needs --data_root DIR, the folder holding the "
                            f"tasks' data")
        if args.task is not None:
            r = suite.evaluate_task(args.weights, args.task, args.data_root, log=print, **common)
            print(suite.task_line(r))
        else:
            table = suite.evaluate_suite(args.weights, args.data_root, **common)
            print(table)
    except (ListError, InputError, WeightsError) as e:
        print(f"m2das eval: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    return 0
