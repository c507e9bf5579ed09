"""Representation quality measured while training: is the encoder getting better?

The self-supervised loss does not say. At chosen epoch ends the monitor runs the
current online encoder, full and unmasked, over a held-out labelled list of LMS
files (AudioSet's eval segments: `files_as_eval.csv` from `m2das prepare`) and
reports
  - mAP of the AudioSet head on those clips,
  - RankMe, the effective rank of the clip embeddings (Garrido et al., ICML 2023),
  - leave-one-out kNN accuracy of the clip embeddings on their labels.
Crops are fixed (the centre of each clip) and no random generator is touched,
so a resumed run stays bit-identical with the monitor on. The crops are read
by DataLoader workers, encoded sharded over the ranks and kept in memory for
the next check; the metrics are computed on the device (the torch twins in
m2das.metrics), so a check of AudioSet's 20,000 eval clips costs well under
1% of a 4-GPU epoch (docs/performance.md). Torch and numpy are
imported only inside the functions that need them: the flags are read by the
launcher on login nodes, where neither is installed.
"""

import os
import time
from pathlib import Path

from m2das import runfolder
from m2das.fileio import append_jsonl
from m2das.datafolder import EVAL_LIST

# A rank keeps its share of the crops in host memory after the first check when they fit in this
# (ViT-B's 608-frame crops of AudioSet's 20,000 eval clips: 3.9 GB, a quarter per rank on 4 GPUs).
CACHE_BYTES = 8 << 30

METRIC_KEYS = ("monitor_map", "monitor_rankme", "monitor_knn_acc", "monitor_seconds", "monitor_clips")


def cache_limit() -> int:
    """CACHE_BYTES, or a quarter of the memory available now when that is less (a small machine
    reads the files at every check instead of swapping)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return min(CACHE_BYTES, int(line.split()[1]) * 1024 // 4)
    except (OSError, ValueError, IndexError):
        pass
    return CACHE_BYTES


def add_monitor_flags(add) -> None:
    """The trainer's two monitor flags; `add` is argparse's add_argument (or a wrapper of it)."""
    add("--monitor_every", type=int, default=0,
        help="epochs between quality checks (mAP, RankMe, kNN) on --monitor_list; 0: off")
    add("--monitor_list", default=None,
        help=f"held-out labelled LMS list, file_name,label (default DATA_PATH/{EVAL_LIST})")


def center_start(num_frames: int, frames: int) -> int:
    """The deterministic crop: the middle `frames` of a clip (0 when it is shorter)."""
    return max(num_frames - frames, 0) // 2


class CentreCrops:
    """List rows `ids` as their fixed centre crops: what a monitor DataLoader worker reads.

    A plain map-style dataset (no torch import), float32 arrays [1, F, frames].
    """

    def __init__(self, samples, ids, frames: int):
        self.samples, self.ids, self.frames = samples, list(ids), frames

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, j: int):
        import numpy as np

        from m2das.data.stats import crop_or_pad

        lms = np.load(self.samples.root / self.samples.files[self.ids[j]], mmap_mode="r")  # reads the crop only
        return np.array(crop_or_pad(lms, self.frames, center_start(lms.shape[-1], self.frames)), dtype=np.float32)


class Monitor:
    """Call `due(epoch)` after each finished epoch (1-based count) and, when it is, `run(model, epoch)`.

    With torch.distributed initialised, every rank must call `run`: each loads
    (through DataLoader workers) and encodes its share of the list, the
    embeddings are gathered so every rank can find neighbours for its own
    share, and rank 0 gets the metrics (other ranks get an empty dict). All
    metrics are computed on the device. A rank keeps its crops in memory
    after the first check (up to cache_limit()). `run` leaves the model's mode
    and every random state as it found them.
    """

    def __init__(self, cfg: dict, classes: list, device, rank: int = 0, world_size: int = 1,
                 knn_k: int = 10, batch_size: int | None = None, workers: int | None = None):
        from m2das.machine import loader_workers

        self.every = int(cfg.get("monitor_every") or 0)
        self.rank, self.world = rank, world_size
        self.device, self.knn_k = device, knn_k
        self.batch_size = batch_size or (256 if device.type == "cuda" else 64)
        self.workers = loader_workers(int(cfg.get("num_workers") or 0), world_size) if workers is None else workers
        self.freq_bins, self.frames = int(cfg["input_size"][0]), int(cfg["input_size"][1])
        self.samples, self.targets, self._device_targets, self._kept = None, None, None, None
        if self.every > 0:
            self.list_path = Path(cfg.get("monitor_list") or Path(cfg["data_path"]) / EVAL_LIST)
            self.samples, self.targets = self._read(self.list_path, Path(cfg["data_path"]), classes,
                                                    int(cfg["input_size"][0]))

    @staticmethod
    def _read(path: Path, root: Path, classes: list, freq_bins: int):
        """The list with its labels mapped onto the run's classes; labels the run lacks are ignored."""
        import numpy as np

        from m2das.data.dataset import DataListError, read_list, validate

        if not path.exists():
            raise DataListError(f"{path}: monitor list not found; run `m2das prepare` with AudioSet's "
                                f"eval_segments.csv (writes {EVAL_LIST}) or pass --monitor_list")
        samples = read_list(path, root)
        validate(samples, path, freq_bins, workers=8)
        index = {c: i for i, c in enumerate(classes)}
        targets = np.zeros((len(samples), len(classes)), dtype=np.float32)
        for i in range(len(samples)):
            for label in samples.labels_of(i):
                if samples.classes[label] in index:
                    targets[i, index[samples.classes[label]]] = 1.0
        return samples, targets

    def due(self, epoch: int) -> bool:
        return self.every > 0 and epoch > 0 and epoch % self.every == 0

    def loader(self, ids):
        """Batches of the centre crops of list rows `ids`, read by `self.workers` processes.

        The DataLoader draws its workers' base seed from its own generator, so
        the process's random state is left alone (a resumed run stays bit-identical).
        """
        import torch

        from m2das.data.dataset import _Loader, quiet_worker

        kwargs = dict(batch_size=self.batch_size, num_workers=self.workers, generator=torch.Generator(),
                      pin_memory=self.device.type == "cuda")
        if self.workers > 0:
            kwargs.update(worker_init_fn=quiet_worker, prefetch_factor=4,
                          multiprocessing_context="fork" if os.name == "posix" else None)
        return _Loader(CentreCrops(self.samples, ids, self.frames), **kwargs)

    def _batches(self, ids):
        """The crops of `ids` in batches: read the first time, then from memory when they fit (cache_limit).

        The list and the crops are fixed for the run, so later checks need not read the files again.
        """
        if self._kept is not None:
            yield from self._kept
            return
        keep = len(ids) * self.freq_bins * self.frames * 4 <= cache_limit()
        kept = []
        for x in self.loader(ids):
            if keep:
                kept.append(x)
            yield x
        if keep:
            self._kept = kept

    def _encode(self, model, ids) -> tuple:
        """(probabilities [n, C], clip embeddings [n, rows*D]) of list rows `ids`, on this rank's device."""
        import torch

        from m2das.model import encode_tokens, tokens_to_frames

        probs, embs = [], []
        amp = torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda")
        for x in self._batches(ids):
            x = model.normalize(x.to(self.device, non_blocking=True))
            with amp:
                tokens = encode_tokens(model, x, model.grid[0])
                probs.append(torch.sigmoid(model.offline_logits(tokens).float()))
                embs.append(tokens_to_frames(tokens, model.grid[0]).float().mean(dim=1))
        dim = model.offline_predictor.in_features
        if not probs:
            return (torch.zeros(0, model.num_classes, device=self.device), torch.zeros(0, dim, device=self.device))
        return torch.cat(probs), torch.cat(embs)

    def _gather(self, t):
        """Rows of every rank, in list order (rank r holds rows r, r + world, ...)."""
        import torch
        import torch.distributed as dist

        n = len(self.samples)
        per_rank = -(-n // self.world)
        padded = torch.zeros(per_rank, t.shape[1], device=t.device, dtype=t.dtype)
        padded[:t.shape[0]] = t
        parts = [torch.empty_like(padded) for _ in range(self.world)]
        dist.all_gather(parts, padded)
        return torch.stack(parts, dim=1).reshape(per_rank * self.world, -1)[:n]

    def _metrics(self, probs, embs, sharded: bool) -> dict:
        """The numbers from all clips' probabilities and embeddings, on the device; kNN queries
        split over ranks (each adds the hits of its own rows), the rest on rank 0."""
        import torch
        import torch.distributed as dist

        from m2das.metrics import torch_knn_hits, torch_mean_average_precision, torch_rankme

        if self._device_targets is None:
            self._device_targets = torch.from_numpy(self.targets).to(self.device)
        n = len(self.samples)
        hits = None
        if self.knn_k:
            rows = torch.arange(self.rank, n, self.world, device=self.device) if sharded else None
            hits = torch_knn_hits(embs, self._device_targets, self.knn_k, rows)
            if sharded:
                dist.reduce(hits, dst=0)
        if self.rank != 0:
            return {}
        out = {"monitor_map": torch_mean_average_precision(probs, self._device_targets),
               "monitor_rankme": torch_rankme(embs), "monitor_clips": n}
        if self.knn_k:
            out["monitor_knn_acc"] = int(hits) / n if min(self.knn_k, n - 1) >= 1 else float("nan")
        return out

    def run(self, model, epoch: int) -> dict:
        """Metrics as a flat dict of monitor_* numbers (empty on ranks other than 0)."""
        import torch
        import torch.distributed as dist

        model = getattr(model, "module", model)  # DDP-wrapped or not
        t0 = time.perf_counter()
        sharded = self.world > 1 and dist.is_available() and dist.is_initialized()
        if not sharded and self.rank != 0:
            return {}
        ids = range(self.rank, len(self.samples), self.world) if sharded else range(len(self.samples))
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                probs, embs = self._encode(model, ids)
                if sharded:
                    probs, embs = self._gather(probs), self._gather(embs)
                out = self._metrics(probs, embs, sharded)
        finally:
            model.train(was_training)
        if out:
            out["monitor_seconds"] = time.perf_counter() - t0
        return out


def record(metrics: dict, run_dir, writer, epoch: int, step: int, train_seconds: float | None = None) -> dict:
    """Write monitor metrics to log.jsonl (one row) and TensorBoard (monitor/*); returns the row.

    `train_seconds`, the training time since the previous monitor point, adds
    `monitor_share`: the fraction of wall time the monitor took.
    """
    if not metrics:
        return {}
    row = {"time": time.time(), "epoch": epoch, "step": step, **metrics}
    if train_seconds:
        row["monitor_share"] = metrics["monitor_seconds"] / (train_seconds + metrics["monitor_seconds"])
    append_jsonl(Path(run_dir) / runfolder.LOG, row)
    if writer is not None:
        for k, v in row.items():
            if k.startswith("monitor_") and isinstance(v, (int, float)):
                writer.add_scalar(f"monitor/{k.removeprefix('monitor_')}", v, step)
    return row
