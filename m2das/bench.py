"""`m2das bench train|prepare`: throughput figures to rerun, never timed tests.

`bench train` times the whole optimizer step (forward, backward, AdamW, EMA)
on random input of the training shape, after warm-up, with one host sync per
measurement window. `--compare ema` also times the target update done the
reference's way (a Python loop over parameters) against the fused foreach
update, in the same process.
"""

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import torch

from m2das.config import size_pair


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (torch {torch.__version__})"
    cpu = platform.processor() or platform.machine()
    info = Path("/proc/cpuinfo")
    if info.exists():
        cpu = next((line.split(":", 1)[1].strip() for line in info.read_text().splitlines()
                    if line.startswith("model name")), cpu)
    return f"{cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} threads (torch {torch.__version__})"


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_step(args, device) -> dict:
    from m2das.model import create_model
    from m2das.train import build_optimizer, optimizer_step

    torch.manual_seed(0)
    model = create_model(args.model, input_size=args.input_size, num_classes=527).to(device)
    optimizer = build_optimizer(model, 1e-4, 0.05, device)
    amp = args.precision in ("fp16", "bf16") and device.type == "cuda"
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float16
    scaler = torch.amp.GradScaler(device.type, enabled=amp and args.precision == "fp16")
    lms = torch.randn(args.batch_size, 1, *args.input_size, device=device) * 4 - 7
    labels = (torch.rand(args.batch_size, 527, device=device) < 0.01).float()
    g = torch.Generator(device=device).manual_seed(0)

    def step():
        with torch.autocast(device.type, dtype=dtype, enabled=amp):
            loss = model(lms, labels, g)["loss"]
        scaler.scale(loss).backward()
        optimizer_step(model, optimizer, scaler, 3.0, 0.9999)

    for _ in range(args.warmup):
        step()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync(device)
    seconds = (time.perf_counter() - t0) / args.steps
    result = {"samples_per_s": args.batch_size / seconds, "step_s": seconds,
              "tflops": model.train_flops_per_sample() * args.batch_size / seconds / 1e12}
    if device.type == "cuda":
        result["max_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2 ** 30
    if args.compare == "ema":
        result["ema"] = compare_ema(model, device, args.steps)
    return result


def compare_ema(model, device, repeats: int) -> dict:
    """Seconds per target update: per-parameter Python loop vs one foreach lerp."""
    targets, online = model.target_parameters(), model.online_counterparts()

    @torch.no_grad()
    def loop(tau):
        for t, o in zip(targets, online):
            t.mul_(tau).add_(o, alpha=1 - tau)

    out = {}
    for name, fn in (("python_loop", loop), ("foreach", model.update_target)):
        fn(0.9999)
        sync(device)
        t0 = time.perf_counter()
        for _ in range(max(repeats, 5)):
            fn(0.9999)
        sync(device)
        out[name] = (time.perf_counter() - t0) / max(repeats, 5)
    return out


def train_main(argv) -> int:
    p = argparse.ArgumentParser(prog="m2das bench train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="m2d_as_vit_base")
    p.add_argument("--input_size", type=size_pair, default=[80, 608])
    p.add_argument("--batch_size", type=int, default=None, help="default 256 on CUDA, 8 on CPU")
    p.add_argument("--precision", choices=["fp32", "fp16", "bf16"], default=None,
                   help="default fp16 on CUDA (the paper's), fp32 on CPU")
    p.add_argument("--device", default="auto")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--compare", choices=["none", "ema"], default="ema")
    args = p.parse_args(argv)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    args.batch_size = args.batch_size or (256 if device.type == "cuda" else 8)
    args.precision = args.precision or ("fp16" if device.type == "cuda" else "fp32")
    print(f"machine: {machine(device)}")
    print(f"model {args.model}, input {args.input_size[0]}x{args.input_size[1]}, batch {args.batch_size}, "
          f"{args.precision}, {args.steps} timed steps after {args.warmup} warm-up")
    r = bench_step(args, device)
    line = f"train step: {r['samples_per_s']:.1f} samples/s ({r['step_s'] * 1e3:.1f} ms/step), " \
           f"{r['tflops']:.3f} TFLOP/s achieved"
    if "max_memory_gib" in r:
        line += f", peak memory {r['max_memory_gib']:.1f} GiB"
    print(line)
    if "ema" in r:
        e = r["ema"]
        print(f"EMA update: python loop {e['python_loop'] * 1e3:.2f} ms, foreach {e['foreach'] * 1e3:.2f} ms "
              f"({e['python_loop'] / e['foreach']:.1f}x)")
    return 0


def checkpoint_main(argv) -> int:
    """What the integrity check costs: load a full-state checkpoint with and without the CRC32 pass."""
    import tempfile

    from m2das import checkpoint
    from m2das.checkpoint import Checkpointer, Progress, RNGState
    from m2das.model import create_model
    from m2das.train import build_optimizer

    p = argparse.ArgumentParser(prog="m2das bench checkpoint", description=checkpoint_main.__doc__)
    p.add_argument("--model", default="m2d_as_vit_base")
    p.add_argument("--dir", default=None, help="folder to write the file in (default: a temporary folder)")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    device = torch.device("cpu")
    model = create_model(args.model, num_classes=527)
    optimizer = build_optimizer(model, 1e-4, 0.05, device)
    for group in optimizer.param_groups:  # the AdamW moments exist after the first step
        for param in group["params"]:
            optimizer.state[param] = {"step": torch.tensor(1.0), "exp_avg": torch.zeros_like(param),
                                      "exp_avg_sq": torch.zeros_like(param)}
    ckpt = Checkpointer(".", {"model": model, "optimizer": optimizer, "rng": RNGState(device), "progress": Progress()},
                        {"args": {}}, rank=0, epochs=1, save_freq=1, interval_s=0, log=print)
    print(f"machine: {machine(device)}")
    with tempfile.TemporaryDirectory(dir=args.dir) as folder:
        path = Path(folder) / "last.pth"
        t0 = time.perf_counter()
        checkpoint.save_file(ckpt.state_dict(), path)
        save_s = time.perf_counter() - t0
        size = path.stat().st_size
        timings = {"finite check": [], "CRC32 check": [], "torch.load": []}
        for _ in range(args.repeats):  # warm page cache: the check's own cost, not the disk's
            for name, fn in (("finite check", lambda: checkpoint.all_finite(ckpt._tensors())),
                             ("CRC32 check", lambda: checkpoint.verify_integrity(path)),
                             ("torch.load", lambda: torch.load(path, map_location="cpu"))):
                t0 = time.perf_counter()
                fn()
                timings[name].append(time.perf_counter() - t0)
    print(f"{args.model} full state: {size / 1e9:.2f} GB, saved in {save_s:.1f} s")
    for name, values in timings.items():
        best = min(values)
        print(f"  {name:<13} {best:.2f} s ({size / 1e9 / best:.2f} GB/s, best of {args.repeats})")
    return 0


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    usage = "usage: m2das bench {train,prepare} [options]"
    if not argv or argv[0] in ("-h", "--help"):
        print(usage)
        return 0
    if argv[0] == "train":
        return train_main(argv[1:])
    if argv[0] == "checkpoint":
        return checkpoint_main(argv[1:])
    if argv[0] == "prepare":
        from m2das.prepare import bench_main

        return bench_main(argv[1:])
    print(f"m2das bench: unknown benchmark {argv[0]!r}\n{usage}", file=sys.stderr)
    return 2
