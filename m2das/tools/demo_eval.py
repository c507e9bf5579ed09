"""The demo's last stage: export the trained tiny encoder and evaluate it linearly next to a random one.

The split is made from the demo's own prepared list (every 5th clip valid, the
next test, the rest train), so the numbers say whether pre-training helped on
sounds the encoder has seen without labels.
"""

import csv
from pathlib import Path

from m2das.datafolder import WEIGHTED_LIST

SPLIT_EVERY = 5


def write_demo_split(data_dir, out_csv) -> Path:
    """file_name,label,split from files_as_weighted.csv (LMS files, names relative to the data folder)."""
    data_dir, out_csv = Path(data_dir), Path(out_csv)
    with open(data_dir / WEIGHTED_LIST, newline="") as f:
        rows = list(csv.DictReader(f))
    out_csv.parent.mkdir(parents=True, exist_ok=True)
    with open(out_csv, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["file_name", "label", "split"])
        for i, row in enumerate(rows):
            split = {1: "valid", 2: "test"}.get(i % SPLIT_EVERY, "train")
            w.writerow([row["file_name"], row["label"], split])
    return out_csv


def evaluate_demo(out_dir, data_dir, checkpoint) -> str:
    """Export, evaluate trained and random-init encoders; returns the summary line."""
    from m2das.downstream.export import export
    from m2das.downstream.linear_eval import evaluate, format_score, summary_line

    out_dir = Path(out_dir)
    weights = export(checkpoint, out_dir / "export")
    print(f"[demo] exported {weights} ({weights.stat().st_size / 1e3:.0f} kB, encoder only)", flush=True)
    split = write_demo_split(data_dir, out_dir / "eval_list.csv")
    results = {}
    for name, random_init in (("trained", False), ("random", True)):
        r = evaluate(weights, split, data_root=data_dir, out=out_dir / f"eval_{name}.json", device="cpu",
                     cache_dir=out_dir / "eval_cache", random_init=random_init, progress=False)
        print(summary_line(r), flush=True)
        results[name] = r
    t, r = results["trained"], results["random"]
    return (f"test {t['metric']} {format_score(t['test'], 3)} trained vs {format_score(r['test'], 3)} random init "
            f"({t['counts']['test']} test clips; {out_dir / 'eval_trained.json'})")
