"""`m2das eval --task NAME` and `--suite paper`: the paper's Table V tasks with its protocol, one table.

Each clip is loaded at its task's clip length as the authors' tool loads it
(mono, 16 kHz; a longer clip is cut, from a random start for training and
validation clips and from its beginning for test clips; a shorter one is
zero-padded at the end) and encoded as the runtime encodes it. The random
start of a clip is drawn once, from its file name, so the embeddings of a task
are computed once for all seeds and reruns.
"""

import time
import zlib
from pathlib import Path

import numpy as np

from m2das.downstream.features import ListError, cached_embeddings, targets_of
from m2das.downstream.protocol import SEEDS, Settings, Split, run_protocol

PAPER_AVERAGE = 80.6  # Table V, M2D-AS row, average of the nine tasks (each task's score: tasks.TASKS)
CROP_SEED = SEEDS[0]  # the tool draws its crops once, in the first run's embedding pass


def crop_start(key: str, length: int, clip_samples: int, role: str) -> int:
    """Where a clip of `length` samples is cut: 0 when it fits or is a test clip, else a start drawn
    uniformly from [0, length - clip) by a generator seeded with the file's name."""
    if length <= clip_samples or role == "test":
        return 0
    rng = np.random.default_rng([CROP_SEED, zlib.crc32(key.encode())])
    return int(rng.integers(0, length - clip_samples))


def _load(name: str, root, seed: int):
    from m2das.downstream import tasks

    try:
        return tasks.load_task(name, root, seed)
    except tasks.TaskError as e:
        raise ListError(str(e)) from None


def task_root(name: str, data_root) -> Path:
    """--data_root is the task's own folder, or a --suite paper folder holding DIR/<name>."""
    from m2das.downstream import tasks

    below = tasks.task_folder(data_root, name) if name in tasks.TASKS else None
    return below if below is not None and below.is_dir() else Path(data_root)


class TaskClips:
    """A task's clips as the tool cuts them: a file used as a training clip in one fold and a test clip in
    another (cut from a random start vs from 0 when it is longer than the task's length) is two clips."""

    def __init__(self, task, clip_samples: int):
        from m2das.downstream.embed import samples_16k

        self.task, self.clip_samples = task, clip_samples
        self.items, self.file_row, self._index, self._lengths = [], [], {}, {}
        self._samples_16k = samples_16k

    def _key(self, i: int) -> str:
        f = Path(self.task.files[i])
        try:
            return str(f.relative_to(self.task.root))
        except ValueError:
            return str(f)

    def row(self, i: int, role: str) -> int:
        path = Path(self.task.files[i])
        if i not in self._lengths:
            self._lengths[i] = self._samples_16k(path)
        item = (path, crop_start(self._key(i), self._lengths[i], self.clip_samples, role), self.clip_samples)
        if item not in self._index:
            self._index[item] = len(self.items)
            self.items.append(item)
            self.file_row.append(i)
        return self._index[item]

    def splits(self, task) -> list:
        """The folds of `task` (a load of the same data, possibly with another seed) over clip rows."""
        out = []
        for fold in task.folds:
            parts = [np.array([self.row(i, role) for i in getattr(fold, role)], dtype=np.int64)
                     for role in ("train", "valid", "test")]
            out.append(Split(str(fold.name), *parts, valid_drawn=bool(getattr(fold, "valid_drawn", False))))
        return out


def evaluate_task(weights, name: str, data_root, *, out=None, settings: Settings = Settings(), device="auto",
                  cache_dir=None, random_init=False, progress=True, write=True, log=None) -> dict:
    """One paper task: its folds, the protocol, the paper's score beside ours."""
    from m2das.data.audio import SAMPLE_RATE
    from m2das.downstream.embed import pick_device
    from m2das.downstream.weights import resolve_checkpoint
    from m2das.fileio import write_json

    t0 = time.monotonic()
    root = task_root(name, data_root)
    task = _load(name, root, settings.seeds[0])
    weights_file = resolve_checkpoint(weights)
    device = pick_device(device)
    clip_seconds = float(task.spec.clip_seconds)
    clip_samples = int(SAMPLE_RATE * clip_seconds)
    labels = [[v] for v in task.labels]
    classes = list(task.classes)
    multi_label = bool(task.spec.multilabel)
    targets = targets_of(labels, classes, multi_label)
    clips = TaskClips(task, clip_samples)
    per_seed = {seed: clips.splits(task if seed == settings.seeds[0] else _load(name, root, seed))
                for seed in settings.seeds}  # every clip known before the one embedding pass
    emb, frames, cached = cached_embeddings(weights_file, clips.items, cache_dir=cache_dir, device=device,
                                            random_init=random_init, progress=progress, desc=name)
    file_row = np.array(clips.file_row, dtype=np.int64)
    result = run_protocol(emb, targets[file_row], per_seed.__getitem__, len(classes), multi_label, settings,
                          device, log)
    result.update({"task": name, "title": task.spec.title, "paper": task.spec.paper_score,
                   "weights": str(weights_file), "random_init": random_init, "data_root": str(task.root),
                   "clip_seconds": clip_seconds, "clips": len(clips.items), "files": len(task.files),
                   "time_frames": int(frames[0]) if len(frames) else 0, "classes": len(classes),
                   "folds_run": len(task.folds), "embeddings_cached": cached,
                   "seconds": round(time.monotonic() - t0, 2)})
    if write:
        out = Path(out) if out is not None else weights_file.parent / f"eval_{name}{'_random' if random_init else ''}.json"
        write_json(out, result)
        result["out"] = str(out)
    return result


def percent(r: dict) -> str:
    return f"{100 * r['mean']:.1f} ± {100 * r['ci95']:.1f}"


def task_line(r: dict) -> str:
    paper = f"; paper (M2D-AS) {r['paper']:.1f}" if r.get("paper") is not None else ""
    return (f"{r['title']}: {r['metric']} {percent(r)} (mean ± 95% CI over {len(r['runs'])} runs x "
            f"{r['folds_run']} fold(s); clips of {r['clip_seconds']:g} s){paper}; {r.get('out', '')}")


def paper_scores() -> dict:
    from m2das.downstream.tasks import TASKS

    return {n: spec.paper_score for n, spec in TASKS.items()}


def table(results: list, weights) -> str:
    """Markdown: our row (mean ± 95% CI, %) above the paper's M2D-AS row; the average over the tasks run."""
    from m2das.downstream.tasks import TASKS

    paper = paper_scores()
    names = [r["task"] for r in results]
    complete = set(names) >= set(paper)
    ours_avg = float(np.mean([100 * r["mean"] for r in results]))
    paper_avg = PAPER_AVERAGE if complete else float(np.mean([paper[n] for n in names]))
    head = ["", *[TASKS[n].title for n in names], "Avg." if complete else f"Avg. ({len(names)} of {len(paper)})"]
    rows = [[f"this model ({Path(str(weights)).name})", *[percent(r) for r in results], f"{ours_avg:.1f}"],
            ["M2D-AS (paper, Table V)", *[f"{paper[n]:.1f}" for n in names], f"{paper_avg:.1f}"]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def evaluate_suite(weights, data_root, *, out=None, settings: Settings = Settings(), device="auto",
                   cache_dir=None, random_init=False, progress=True) -> str:
    """Every paper task whose folder DIR/<name> is present; writes JSON and Markdown; returns the report."""
    from m2das.downstream import tasks
    from m2das.downstream.weights import resolve_checkpoint
    from m2das.fileio import atomic_write, write_json

    weights_file = resolve_checkpoint(weights)
    present = tasks.present_tasks(data_root)
    if not present:
        raise ListError(f"{data_root}: none of the paper's tasks found (expected folders named "
                        f"{', '.join(tasks.TASKS)}); see the README section 'Reproducing the paper's tables'")
    results = [evaluate_task(weights_file, n, tasks.task_folder(data_root, n), settings=settings, device=device,
                             cache_dir=cache_dir, random_init=random_init, progress=progress, write=False)
               for n in present]
    md = table(results, weights_file)
    missing = [n for n in tasks.TASKS if n not in present]
    out = Path(out) if out is not None else weights_file.parent / f"eval_paper{'_random' if random_init else ''}.json"
    write_json(out, {"weights": str(weights_file), "tasks": results, "missing": missing, "paper": paper_scores(),
                     "paper_average": PAPER_AVERAGE, "table": md})
    with atomic_write(out.with_suffix(".md"), "w") as f:
        f.write(md + "\n")
    note = f"\n(not under {data_root}: {', '.join(missing)})" if missing else ""
    return f"{md}{note}\nwrote {out} and {out.with_suffix('.md')}"
