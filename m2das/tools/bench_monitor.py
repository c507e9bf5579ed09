"""`m2das bench monitor`: what one quality check costs, today's way next to the way before it.

Before: the crops read one at a time in the training process, the metrics in
NumPy on the host. Now: the crops read by DataLoader workers, kNN, RankMe and
mAP computed by torch on the run's device. Both run in the same process on
synthetic LMS files (AudioSet-shaped by default) and the tiny model, part by
part; the metrics are also timed at ViT-B's clip embedding (5 rows x 768 =
3840 values) on random embeddings, where the kNN product is 2 N^2 D FLOPs.
Then the check is projected onto 4 GPUs from the parts measured here, the
GPU rates stated, and compared with a 4-GPU AudioSet epoch.
"""

import tempfile
import time
from pathlib import Path

from m2das.cliargs import Parser
from m2das.config import size_pair
from m2das.datafolder import EVAL_LIST
from m2das.tools.gpurates import DENSE_BF16_PEAK_TFLOPS, TARGET_MFU, gpu_samples_per_s

AUDIOSET_CLASSES = 527
VIT_B_ROWS_DIM = 5 * 768  # the monitor's clip embedding: one 768-d token per frequency row, concatenated
# H100 SXM datasheet rates (dense, TFLOP/s) of the metric parts; bf16 and the MFU come from bench.
FP32_PEAK, FP64_TENSOR_PEAK = 67.0, 67.0
BF16_PEAK, MFU = DENSE_BF16_PEAK_TFLOPS["H100 SXM"], TARGET_MFU
AUDIOSET_TRAIN_CLIPS = 2_000_000  # about; an epoch of them at gpu_samples_per_s() on each GPU is ~96 s on 4


def write_clips(folder: Path, n: int, frames: int, classes: int, seed: int = 0) -> Path:
    """n LMS files [1, 80, frames] and EVAL_LIST with one to three labels each (AudioSet's eval set has ~2)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    (folder / "eval_lms").mkdir(parents=True)
    rows = ["file_name,label"]
    for i in range(n):
        lms = (rng.standard_normal((1, 80, frames)) * 4 - 7).astype(np.float32)
        np.save(folder / "eval_lms" / f"e{i:05d}.npy", lms)
        labels = rng.choice(classes, size=int(rng.integers(1, 4)), replace=False)
        rows.append(f'eval_lms/e{i:05d}.npy,"{",".join(f"/m/{c}" for c in labels)}"')
    (folder / EVAL_LIST).write_text("\n".join(rows) + "\n")
    return folder


def load_average() -> str:
    return Path("/proc/loadavg").read_text().split()[0] if Path("/proc/loadavg").exists() else "?"


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def load_rates(mon, n: int, cold: bool) -> dict:
    """Clips/s of reading every centre crop: one at a time here, and through the monitor's workers."""
    from m2das.monitor import CentreCrops
    from m2das.tools.benchdata import drop_from_cache

    files = [mon.samples.root / f for f in mon.samples.files]
    crops = CentreCrops(mon.samples, range(n), mon.frames)
    out = {}
    for name, fn in (("before", lambda: [crops[i] for i in range(n)]),
                     ("after", lambda: [b for b in mon.loader(range(n))])):
        if cold:
            drop_from_cache(files)
        out[name] = n / timed(fn)[0]
    return out


def metric_times(embs, probs, targets, device, knn_k: int) -> dict:
    """Seconds of each metric: NumPy on host copies (before) and the torch twins on `device` (after)."""
    import numpy as np
    import torch

    from m2das import metrics

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    z, s, t = embs.cpu().numpy(), probs.cpu().numpy(), targets.cpu().numpy()
    before = {"kNN": lambda: metrics.knn_accuracy(z, t, knn_k), "RankMe": lambda: metrics.rankme(z.astype(np.float64)),
              "mAP": lambda: metrics.mean_average_precision(s, t)}
    zd, sd, td = embs.to(device), probs.to(device), targets.to(device)
    after = {"kNN": lambda: metrics.torch_knn_accuracy(zd, td, knn_k), "RankMe": lambda: metrics.torch_rankme(zd),
             "mAP": lambda: metrics.torch_mean_average_precision(sd, td)}
    out = {}
    for part in before:
        out[part] = {}
        for name, fn in (("before", before[part]), ("after", after[part])):
            sync()
            seconds, value = timed(fn)
            sync()
            out[part][name] = (seconds, value)
    return out


def forward_flops(model_name: str, input_size) -> float:
    """FLOPs of one clip through the encoder unmasked plus the AudioSet head, counted by torch on one forward."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from m2das.model import create_model, encode_tokens

    with torch.device("meta"):  # shapes only: nothing is allocated or computed
        model = create_model(model_name, input_size=input_size, num_classes=AUDIOSET_CLASSES).eval()
        x = torch.zeros(1, 1, *input_size)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model.offline_logits(encode_tokens(model, x, model.grid[0]))
    return float(counter.get_total_flops())


def project(n: int, per_worker_cold: float, start_s: float, measured: dict | None, args) -> dict:
    """Seconds of one check of n clips on `args.gpus` GPUs: reading and worker start from the rates
    measured here, the GPU parts from the datasheets' rates (or measured, when this run had a GPU)."""
    gpus, dim, workers = args.gpus, VIT_B_ROWS_DIM, args.gpu_workers
    read = n / gpus / (workers * per_worker_cold)
    encode = n * args.flops / gpus / (MFU * BF16_PEAK * 1e12)
    rest = {f"all-gather embeddings + probabilities at {args.gather_gbs:.0f} GB/s (assumed)":
            n * (dim + AUDIOSET_CLASSES) * 4 * (gpus - 1) / gpus / (args.gather_gbs * 1e9)}
    if measured:
        rest[f"kNN, measured on this GPU, split over {gpus} ranks"] = measured["kNN"] / gpus
        rest["RankMe, measured on this GPU"] = measured["RankMe"]
        rest["mAP, measured on this GPU"] = measured["mAP"]
    else:
        rest[f"kNN, 2N^2D/{gpus} FLOPs at half of {FP32_PEAK} TFLOP/s fp32"] = \
            2 * n * n * dim / gpus / (0.5 * FP32_PEAK * 1e12)
        rest[f"RankMe Gram 2ND^2 at half of {FP64_TENSOR_PEAK} TFLOP/s fp64"] = \
            2 * n * dim * dim / (0.5 * FP64_TENSOR_PEAK * 1e12)
        rest[f"RankMe eigvalsh {dim}x{dim} float64 (assumed, --gpu_eig_s)"] = args.gpu_eig_s
        rest[f"mAP, {AUDIOSET_CLASSES} sorts of {n} on the GPU (assumed)"] = 0.02
    parts = {f"start and stop {workers} workers per rank (measured here)": start_s,
             f"read {n // gpus} crops per rank, {workers} workers at {per_worker_cold:.0f}/s each "
             f"(one process, cold, measured here)": read,
             f"encode, ViT-B {args.flops / 1e9:.1f} GFLOP/clip at {MFU:.0%} of {BF16_PEAK} TFLOP/s bf16": encode,
             **rest}
    first = start_s + max(read, encode) + sum(rest.values())  # workers read while the rank encodes
    later = encode + sum(rest.values())  # crops kept in memory: no worker, no file
    return {"parts": parts, "first": first, "later": later,
            "share_first": first / (args.epoch_s + first), "share": later / (args.epoch_s + later)}


def main(argv=None) -> int:
    import numpy as np
    import torch

    from m2das.machine import describe, usable_cores
    from m2das.model import create_model
    from m2das.monitor import Monitor

    p = Parser(prog="m2das bench monitor", description=__doc__)
    p.add_argument("--clips", type=int, default=20000, help="held-out clips (default 20,000: AudioSet's eval set)")
    p.add_argument("--frames", type=int, default=1001, help="frames per synthetic clip (default 1001, 10 s)")
    p.add_argument("--model", default="m2d_as_vit_tiny")
    p.add_argument("--input_size", type=size_pair, default=[80, 208], help="crop the model sees (default 80x208)")
    p.add_argument("--workers", type=int, default=None, help="monitor DataLoader workers here (default: all cores)")
    p.add_argument("--dim", type=int, default=VIT_B_ROWS_DIM,
                   help=f"embedding size of the random-embedding metric timing (default {VIT_B_ROWS_DIM}, ViT-B's)")
    p.add_argument("--dir", default=None, help="folder for the synthetic clips (default: the system's temp)")
    p.add_argument("--device", default="auto")
    p.add_argument("--gpus", type=int, default=4, help="GPUs of the projection (default 4)")
    p.add_argument("--gpu_workers", type=int, default=7, help="monitor workers per rank there (default 7: "
                   "--num_workers 8 on a 32-core 4-GPU node, one core left to each rank)")
    p.add_argument("--gpu_eig_s", type=float, default=0.3,
                   help="assumed seconds of a 3840x3840 float64 eigvalsh on one GPU (default 0.3; measured "
                        "instead when this run has a GPU)")
    p.add_argument("--gather_gbs", type=float, default=100.0, help="assumed all-gather bus rate, GB/s (default 100)")
    p.add_argument("--epoch_s", type=float, default=None,
                   help="seconds of the epoch the check is compared with (default: ~2 million AudioSet clips at "
                        "bench's GPU rate per GPU, ~96 s on 4 GPUs)")
    args = p.parse_args(argv)
    args.epoch_s = args.epoch_s or AUDIOSET_TRAIN_CLIPS / (args.gpus * gpu_samples_per_s())
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    workers = usable_cores() if args.workers is None else args.workers
    print(f"machine: {describe(device)}, {usable_cores()} usable cores, load average {load_average()} before the run")
    n = args.clips
    with tempfile.TemporaryDirectory(dir=args.dir, prefix=".m2das-bench-monitor-") as tmp:
        t_write, data = timed(lambda: write_clips(Path(tmp) / "data", n, args.frames, AUDIOSET_CLASSES))
        print(f"{n} synthetic clips [1, 80, {args.frames}] float32 written in {t_write:.0f} s; {args.model}, "
              f"crop {args.input_size[0]}x{args.input_size[1]}, {workers} monitor workers")
        classes = [f"/m/{c}" for c in range(AUDIOSET_CLASSES)]
        cfg = {"monitor_every": 1, "monitor_list": None, "data_path": str(data), "input_size": args.input_size}
        mon = Monitor(cfg, classes, device, workers=workers)
        old = Monitor(cfg, classes, device, workers=0)  # reads in this process, as before
        torch.manual_seed(0)
        model = create_model(args.model, input_size=args.input_size, num_classes=AUDIOSET_CLASSES).to(device)

        print("\nread every centre crop (clips/s):")
        rates = {}
        for cache in ("cold", "warm"):
            rates[cache] = load_rates(mon, n, cache == "cold")
            r = rates[cache]
            print(f"  {cache}: before (one at a time, this process) {r['before']:.0f}; after ({workers} workers) "
                  f"{r['after']:.0f} ({r['after'] / r['before']:.1f}x)")
        start_s = timed(lambda: [b for b in mon.loader(range(workers))])[0]  # one clip per worker: start and stop
        print(f"  starting and stopping {workers} workers: {start_s:.2f} s")

        print("\none whole check, warm cache (seconds):")
        with torch.no_grad():
            model.eval()
            t_enc, (probs, embs) = timed(lambda: old._encode(model, range(n)))
        targets = torch.from_numpy(old.targets)
        t_metrics = metric_times(embs, probs, targets, device, old.knn_k)
        before = t_enc + sum(v["before"][0] for v in t_metrics.values())
        first = mon.run(model, 1)["monitor_seconds"]
        after = mon.run(model, 1)["monitor_seconds"]
        print(f"  before: {before:.2f} (read + encode {t_enc:.2f}, " + ", ".join(
            f"{k} {v['before'][0]:.2f}" for k, v in t_metrics.items()) + ")")
        print(f"  after, first check: {first:.2f} (Monitor.run: {workers} workers read while this process "
              f"encodes; " + ", ".join(f"{k} {v['after'][0]:.2f}" for k, v in t_metrics.items()) + ")")
        print(f"  after, later checks: {after:.2f} (crops kept in memory)  {before / after:.1f}x before")
        same = {k: (v["before"][1], v["after"][1]) for k, v in t_metrics.items()}
        print("  values before / after: " + ", ".join(f"{k} {a:.6f} / {b:.6f}" for k, (a, b) in same.items()))
        print(f"  goal under 3 s per check of {n} clips here (later checks): {'met' if after < 3 else 'not met'}")
        knn_flops = 2 * n * n * embs.shape[1]
        work = n * forward_flops(args.model, args.input_size) + knn_flops
        rate = knn_flops / t_metrics["kNN"]["after"][0]  # the kNN's products, at the rate they just ran
        print(f"  the floor: encoding and the kNN product are {work / 1e12:.2f} TFLOP; at the "
              f"{rate / 1e9:.0f} GFLOP/s of the kNN timed above, {work / rate:.1f} s")

        t_big = None
        if args.dim:
            rng = np.random.default_rng(1)
            z = torch.from_numpy(rng.standard_normal((n, args.dim), dtype=np.float32))
            print(f"\nmetrics at D = {args.dim} on random embeddings of {n} clips (seconds; kNN product "
                  f"{2 * n * n * args.dim / 1e12:.2f} TFLOP):")
            t_big = metric_times(z, probs, targets, device, old.knn_k)
            for k, v in t_big.items():
                print(f"  {k:<7} before {v['before'][0]:7.2f}   after {v['after'][0]:7.2f}   "
                      f"({v['before'][0] / v['after'][0]:.1f}x; values {v['before'][1]:.6f} / {v['after'][1]:.6f})")

    args.flops = forward_flops("m2d_as_vit_base", [80, 608])
    measured = {k: v["after"][0] for k, v in t_big.items()} if t_big and device.type == "cuda" and \
        args.dim == VIT_B_ROWS_DIM else None
    proj = project(n, rates["cold"]["before"], start_s, measured, args)
    print(f"\nprojection: one check of {n} clips on {args.gpus} GPUs, ViT-B 80x608 (seconds):")
    for name, seconds in proj["parts"].items():
        print(f"  {seconds:7.3f}  {name}")
    print(f"  first check {proj['first']:.2f} s (reading overlaps encoding), later checks {proj['later']:.2f} s "
          f"(crops in memory)")
    print(f"  at --monitor_every 1 with an epoch of {args.epoch_s:.0f} s: {100 * proj['share']:.2f}% of wall time "
          f"({100 * proj['share_first']:.2f}% for the first check); goal under 1%: "
          f"{'met' if proj['share'] < 0.01 else 'not met'}")
    print(f"load average {load_average()} after the run (other processes on the machine slow every part)")
    return 0
