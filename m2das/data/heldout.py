"""AudioSet's eval segments as a held-out list for the training monitor.

`m2das prepare` writes `files_as_eval.csv` (file_name,label) for the prepared
clips listed in eval_segments.csv; with --hold-out-eval it also removes them
from the training list (and recomputes the sampling weights of the rest), so
the monitor measures clips the model never trained on.
"""

from pathlib import Path

from m2das.datafolder import EVAL_LIST


def write_eval_list(data_dir, metadata_dir, weighted_list: str, hold_out: bool = False) -> dict:
    """Split the prepared, labelled files by eval_segments.csv; returns counts for the summary."""
    from m2das.data import labels

    data_dir, metadata_dir = Path(data_dir), Path(metadata_dir)
    segments = metadata_dir / labels.EVAL_SEGMENTS
    if not segments.is_file():
        return {"eval_list": None, "eval_files": 0, "held_out": False}
    eval_map, _ = labels.read_segments(segments)
    rows = labels.read_csv_rows(data_dir / weighted_list)
    in_eval = [labels.ytid_of(r["file_name"], eval_map) is not None for r in rows]
    eval_rows = [(r["file_name"], r["label"]) for r, e in zip(rows, in_eval) if e]
    labels.write_csv(data_dir / EVAL_LIST, ["file_name", "label"], eval_rows)
    if hold_out and eval_rows:
        kept = [(r["file_name"], r["label"]) for r, e in zip(rows, in_eval) if not e]
        weights = labels.sample_weights([label.split(",") for _, label in kept])
        labels.write_csv(data_dir / weighted_list, ["file_name", "label", "weight"],
                         ([name, label, repr(w)] for (name, label), w in zip(kept, weights)))
    return {"eval_list": str(data_dir / EVAL_LIST), "eval_files": len(eval_rows), "held_out": bool(hold_out)}
