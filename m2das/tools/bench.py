"""`m2das bench train|prepare`: throughput figures to rerun, never timed tests.

`bench train` times the whole optimizer step (forward, backward, AdamW, EMA)
on random input of the training shape, after warm-up, with one host sync per
measurement window. `--compare ema` also times the target update done the
reference's way (a Python loop over parameters) against the fused foreach
update, in the same process.
"""

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from m2das.cliargs import Parser
from m2das.config import size_pair
from m2das.datafolder import LMS_DIR, WEIGHTED_LIST
from m2das.machine import cpu_name, describe, device_flag, usable_cores
from m2das.tools.benchdata import drop_from_cache as _drop_from_cache, synthetic_data as _synthetic_data
from m2das.tools.gpurates import DENSE_BF16_PEAK_TFLOPS, TARGET_MFU, gpu_samples_per_s  # noqa: F401 (bench.X)




def datasheet_peak(device) -> float | None:
    """The dense bf16 peak of this GPU, by name (None for an unknown card or the CPU)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key in sorted(DENSE_BF16_PEAK_TFLOPS, key=len, reverse=True):  # "H100 SXM" before "H100"
        if all(part in name for part in key.split()):
            return DENSE_BF16_PEAK_TFLOPS[key]
    return None


def flop_rate(tflops: float) -> str:
    """A CPU's matmul is well under 1 TFLOP/s: "0.0 TFLOP/s" would say nothing, so GFLOP/s there."""
    return f"{tflops:.1f} TFLOP/s" if tflops >= 1 else f"{tflops * 1e3:.1f} GFLOP/s"


def measured_matmul_tflops(device, n: int | None = None, repeats: int | None = None) -> float:
    """The rate of one large matrix product on random data (bf16 on CUDA, fp32 on CPU): a ceiling
    measured in the same run, next to the datasheet's (a fraction of a second on either)."""
    n = n or (8192 if device.type == "cuda" else 1024)
    repeats = repeats or (20 if device.type == "cuda" else 5)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    for _ in range(3):
        a @ b
    sync(device)
    t0 = time.perf_counter()
    for _ in range(repeats):
        a @ b
    sync(device)
    return 2 * n ** 3 * repeats / (time.perf_counter() - t0) / 1e12


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_step(args, device) -> dict:
    from m2das.model import create_model
    from m2das.train import build_optimizer, optimizer_step

    torch.manual_seed(0)
    model = create_model(args.model, input_size=args.input_size, num_classes=527).to(device)
    optimizer = build_optimizer(model, 1e-4, 0.05, device)
    forward = torch.compile(model) if args.compile else model
    amp = args.precision in ("fp16", "bf16") and device.type == "cuda"
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float16
    scaler = torch.amp.GradScaler(device.type, enabled=amp and args.precision == "fp16")
    lms = torch.randn(args.batch_size, 1, *args.input_size, device=device) * 4 - 7
    labels = (torch.rand(args.batch_size, 527, device=device) < 0.01).float()
    g = torch.Generator(device=device).manual_seed(0)

    def step():
        mask = model.mask_order(args.batch_size, g, device)  # as train_step: drawn outside the compiled forward
        with torch.autocast(device.type, dtype=dtype, enabled=amp):
            loss = forward(lms, labels, mask)["loss"]
        scaler.scale(loss).backward()
        optimizer_step(model, optimizer, scaler, 3.0, 0.9999)

    for _ in range(args.warmup):
        step()
    # The ceiling, measured between windows of steps (ceiling, steps, ceiling, ...): on a shared machine
    # one measurement taken apart from the step swung the ratio between them by a factor of five.
    k = max(1, min(args.steps, 5))
    windows = [args.steps // k + (i < args.steps % k) for i in range(k)]
    ceilings, seconds = [], 0.0
    for n in windows:
        ceilings.append(measured_matmul_tflops(device))
        sync(device)
        t0 = time.perf_counter()
        for _ in range(n):
            step()
        sync(device)
        seconds += time.perf_counter() - t0
    ceilings.append(measured_matmul_tflops(device))
    seconds /= args.steps
    result = {"samples_per_s": args.batch_size / seconds, "step_s": seconds,
              "tflops": model.train_flops_per_sample() * args.batch_size / seconds / 1e12}
    if device.type == "cuda":
        result["max_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2 ** 30
    result["matmul_tflops"] = statistics.median(ceilings)
    result["matmul_tflops_min"] = min(ceilings)
    result["matmul_tflops_all"] = ceilings
    result["peak_tflops"] = datasheet_peak(device)
    result["mfu"] = result["tflops"] / result["peak_tflops"] if result["peak_tflops"] else None
    result["mfu_of_matmul"] = result["tflops"] / result["matmul_tflops"]
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
    p = Parser(prog="m2das bench train", description=__doc__,
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
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--json", default=None, metavar="PATH",
                   help="also write the result as JSON (device, torch version, settings, figures), "
                        "e.g. bench/results/train-<device>-<precision>-b<batch>.json")
    args = p.parse_args(argv)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    args.batch_size = args.batch_size or (256 if device.type == "cuda" else 8)
    args.precision = args.precision or ("fp16" if device.type == "cuda" else "fp32")
    print(f"machine: {describe(device)}")
    print(f"model {args.model}, input {args.input_size[0]}x{args.input_size[1]}, batch {args.batch_size}, "
          f"{args.precision}, {args.steps} timed steps after {args.warmup} warm-up")
    r = bench_step(args, device)
    line = f"train step: {r['samples_per_s']:.1f} samples/s ({r['step_s'] * 1e3:.1f} ms/step), " \
           f"{r['tflops']:.3f} TFLOP/s achieved"
    if "max_memory_gib" in r:
        line += f", peak memory {r['max_memory_gib']:.1f} GiB"
    print(line)
    mfu = f"MFU {100 * r['mfu']:.1f}% of the dense bf16 peak ({r['peak_tflops']:.0f} TFLOP/s), " if r["mfu"] else \
        "MFU: no datasheet peak for this device, "
    print(f"{mfu}{100 * r['mfu_of_matmul']:.1f}% of a large matmul measured here (median "
          f"{flop_rate(r['matmul_tflops'])}, min {flop_rate(r['matmul_tflops_min'])} over "
          f"{len(r['matmul_tflops_all'])} measurements between the timed windows)")
    if args.json:
        from m2das.fileio import write_json

        write_json(args.json, {"device": describe(device), "torch": torch.__version__, "model": args.model,
                               "input_size": args.input_size, "batch_size": args.batch_size,
                               "precision": args.precision, "compile": args.compile, "steps": args.steps,
                               **{k: v for k, v in r.items() if k != "ema"}})
        print(f"wrote {args.json}")
    if "ema" in r:
        e = r["ema"]
        print(f"EMA update: python loop {e['python_loop'] * 1e3:.2f} ms, foreach {e['foreach'] * 1e3:.2f} ms "
              f"({e['python_loop'] / e['foreach']:.1f}x)")
    return 0


def __getattr__(name):
    """`GPU_SAMPLES_PER_S` stays importable, computed on first use (importing the model costs seconds)."""
    if name == "GPU_SAMPLES_PER_S":
        return gpu_samples_per_s()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _io_counters() -> dict:
    """read_bytes (fetched from storage) and rchar (returned by read syscalls) of this process."""
    rows = dict(line.split(": ") for line in Path("/proc/self/io").read_text().splitlines())
    return {"read_bytes": int(rows["read_bytes"]), "rchar": int(rows["rchar"])}


def _time_reads(dataset, order, files, cold: bool) -> dict:
    """One process reading crops as a DataLoader worker does (__getitem__, no collation)."""
    if cold:
        _drop_from_cache(files)
    before, t0 = _io_counters(), time.perf_counter()
    for position, i in enumerate(order):
        dataset[(0, position, int(i))]
    seconds = time.perf_counter() - t0
    after = _io_counters()
    n = len(order)
    return {"samples_per_s": n / seconds, "read_bytes": (after["read_bytes"] - before["read_bytes"]) / n,
            "rchar": (after["rchar"] - before["rchar"]) / n}


def _time_index(folder: Path, rows: int, shards: int) -> dict:
    """Validation of a packed folder with `rows` samples in `shards` shards (sparse files, known good)."""
    import zlib

    import numpy as np

    from m2das.data import packed
    from m2das.data.dataset import validate_packed
    from m2das.data.packcheck import index_problem
    from m2das.fileio import write_json

    folder.mkdir()
    alphabet = np.frombuffer(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_", dtype=np.uint8)
    ids = alphabet[np.random.default_rng(0).integers(0, 64, (rows, 11))]  # random YouTube-like IDs
    column = lambda text: np.tile(np.frombuffer(text, dtype=np.uint8), (rows, 1))  # noqa: E731
    names = np.hstack([column(b"audioset_lms/"), ids, column(b"_30.000.npy\n")]).tobytes()[:-1]
    per_shard = -(-rows // shards)
    shards = -(-rows // per_shard)  # a short index fills fewer shards: none may be empty
    counts = np.bincount(np.arange(rows) // per_shard, minlength=shards)
    packed.write_index(folder / packed.INDEX, {
        "names": np.frombuffer(names, dtype=np.uint8), "shard": np.arange(rows, dtype=np.int32) // per_shard,
        "offset": (np.arange(rows, dtype=np.int64) % per_shard) * 320320, "frames": np.full(rows, 1001, np.int32),
        "label_offsets": np.arange(rows + 1, dtype=np.int64), "label_ids": np.zeros(rows, np.int32),
        "weights": np.ones(rows)})
    blob = (folder / packed.INDEX).read_bytes()
    entries = []
    for k in range(shards):
        path = folder / packed.shard_name(k)
        with open(path, "wb") as f:
            f.truncate(int(counts[k]) * 320320)
        entries.append({"name": path.name, "samples": int(counts[k]), "bytes": int(counts[k]) * 320320, "crc32": 0})
    write_json(folder / packed.MANIFEST, {
        "format": packed.FORMAT, "version": packed.VERSION, "dtype": "float32", "n_mels": 80, "samples": rows,
        "classes": ["/m/0"], "weighted": True, "norm_stats": None, "shards": entries,
        "index": {"name": packed.INDEX, "bytes": len(blob), "crc32": zlib.crc32(blob)}})
    write_json(folder / packed.VERIFIED, {e["name"]: packed.fingerprint(folder / e["name"]) for e in entries})
    t0 = time.perf_counter()
    samples = packed.load_packed(folder)
    loaded = time.perf_counter() - t0
    validate_packed(samples, None)
    total = time.perf_counter() - t0
    arrays = {"names": np.frombuffer(names, dtype=np.uint8), "shard": samples.shard, "offset": samples.offset,
              "frames": samples.frames, "label_offsets": samples.label_offsets, "label_ids": samples.label_ids,
              "weights": samples.weights}
    t0 = time.perf_counter()  # the range check load_packed ran, once more on its own
    index_problem(arrays, samples.files, samples.manifest)
    return {"load_s": loaded, "total_s": total, "index_mb": len(blob) / 1e6, "check_s": time.perf_counter() - t0,
            "shards": shards}


def data_main(argv) -> int:
    """Loose .npy files vs packed shards: samples/s per loader worker and bytes read per sample,
    cold and warm page cache, on synthetic AudioSet-shaped clips; then validation of a packed index."""
    import math
    import tempfile

    import numpy as np

    from m2das.data.dataset import LMSDataset, make_dataset, read_list, read_samples, validate
    from m2das.data.pack import pack

    p = Parser(prog="m2das bench data", description=data_main.__doc__)
    p.add_argument("--files", type=int, default=400, help="synthetic clips [1, 80, 1001] (default 400)")
    p.add_argument("--crop", type=int, default=608, help="frames per crop (default 608, the paper's)")
    p.add_argument("--dir", default=".", help="folder on the disk to measure (default: the current one; "
                   "not a tmpfs, or nothing is ever read from a disk)")
    p.add_argument("--index-rows", "--index_rows", dest="index_rows", type=int, default=2_000_000,
                   help="samples in the synthetic index whose validation is timed (default 2,000,000)")
    p.add_argument("--remote", action="store_true",
                   help="instead: the reader's CPU per sample from S3 against local disk (`bench data-remote`; "
                   "`bench data --remote --help` lists its options)")
    if "--remote" in argv:
        from m2das.tools import bench_remote

        return bench_remote.main([a for a in argv if a != "--remote"])
    args = p.parse_args(argv)
    print(f"machine: {describe(torch.device('cpu'))}")
    with tempfile.TemporaryDirectory(dir=args.dir, prefix=".m2das-bench-data-") as tmp:
        data = _synthetic_data(Path(tmp) / "data", args.files, 1001)
        crop_bytes = 80 * args.crop * 4
        variants = {"loose .npy": (LMSDataset(read_list(data / WEIGHTED_LIST, data), args.crop, 0),
                                   sorted((data / LMS_DIR).glob("*.npy")))}
        pack_rates = {}
        for dtype in ("float32", "float16"):
            out = Path(tmp) / f"packed-{dtype}"
            t0 = time.perf_counter()
            pack(data, out, shard_size=64 << 20, dtype=dtype)
            pack_rates[dtype] = args.files / (time.perf_counter() - t0)
            samples = read_samples(out, None)
            variants[f"packed {dtype}"] = (make_dataset(samples, args.crop, 0), sorted(out.glob("shard-*.bin")))
        order = np.random.default_rng(1).permutation(args.files)
        gpu_rate = gpu_samples_per_s()
        print(f"{args.files} clips [1, 80, 1001] float32, random crops of {args.crop} frames "
              f"({crop_bytes / 1e3:.0f} KB as float32); cold = sync + POSIX_FADV_DONTNEED on the files")
        print(f"{'data':<16}{'cache':<7}{'samples/s/worker':>17}{'disk KB/sample':>16}{'x crop':>8}"
              f"{'read() KB/sample':>18}{'workers for ' + str(gpu_rate) + '/s':>20}")
        for name, (dataset, files) in variants.items():
            for cache in ("cold", "warm"):
                r = _time_reads(dataset, order, files, cache == "cold")
                size = crop_bytes // (2 if "float16" in name else 1)
                print(f"{name:<16}{cache:<7}{r['samples_per_s']:>17.0f}{r['read_bytes'] / 1e3:>16.0f}"
                      f"{r['read_bytes'] / size:>8.2f}{r['rchar'] / 1e3:>18.0f}"
                      f"{math.ceil(gpu_rate / r['samples_per_s']):>20}")
        print("disk: /proc/self/io read_bytes (x crop: relative to the crop's bytes in that dtype); read(): rchar "
              "(memory-mapped .npy reads do not count there); one process = one DataLoader worker")
        print("m2das pack (warm cache, header check and fsynced shards included): " + ", ".join(
            f"{dtype} {rate:.0f} files/s" for dtype, rate in pack_rates.items()))
        files = variants["loose .npy"][1]
        _drop_from_cache(files)
        t0 = time.perf_counter()
        validate(read_list(data / WEIGHTED_LIST, data), "list", 80)
        per_file = (time.perf_counter() - t0) / len(files)
        r = _time_index(Path(tmp) / "index", args.index_rows, 320)
        print(f"validation: loose, every file header (cold) {per_file * 1e6:.0f} us/file = "
              f"{per_file * args.index_rows:.0f} s for {args.index_rows:,} files; packed index of "
              f"{args.index_rows:,} samples in {r['shards']} shards ({r['index_mb']:.0f} MB): {r['total_s']:.1f} s "
              f"(index load {r['load_s']:.1f} s with its range check {r['check_s'] * 1e3:.0f} ms, shard sizes and "
              f"fingerprints)")
    return 0


# ---------------------------------------------------------------- bench prepare


def make_bench_clips(folder, count: int, seconds: float = 10.0, sample_rate: int = 44100,
                     seed: int = 0) -> list[Path]:
    """Stereo 16-bit wav clips of noise plus tones, the typical downloaded AudioSet file."""
    import numpy as np
    import soundfile as sf

    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sample_rate)) / sample_rate
    paths = []
    for i in range(count):
        tone = np.sin(2 * np.pi * rng.uniform(100, 4000) * t)
        wave = 0.3 * tone[:, None] + 0.05 * rng.standard_normal((t.size, 2))
        path = Path(folder) / f"bench{i:05d}_0.000.wav"
        sf.write(str(path), wave.astype(np.float32), sample_rate, subtype="PCM_16")
        paths.append(path)
    return paths


def prepare_main(argv=None) -> int:
    """`m2das bench prepare`: files/s of the lms step on generated 10-s 44.1-kHz stereo clips,
    the paper's recipe (soxr HQ) next to the old one (torchaudio's Resample) in the same run."""
    import tempfile

    from m2das.data.prepare import run_lms

    p = Parser(prog="m2das bench prepare",
                                description="Time the lms step on clips generated here.")
    p.add_argument("--files", type=int, default=None, help="clips (default 32 per worker)")
    p.add_argument("--workers", type=int, default=None, help="default: all CPU cores")
    p.add_argument("--device", type=device_flag, default="auto",
                   help="auto (CPU, then GPU if present) | cpu | cuda[:N] | gpu")
    args = p.parse_args(argv)
    workers = usable_cores() if args.workers is None else args.workers
    files = args.files or 32 * workers
    devices = ["cpu", "cuda"] if args.device == "auto" else [args.device]
    if devices[-1].startswith("cuda") and not torch.cuda.is_available():
        if args.device != "auto":
            print("m2das bench prepare: no CUDA device visible", file=sys.stderr)
            return 2
        devices.pop()
    from m2das.data.audio import LEGACY_RESAMPLER, RESAMPLER, RESAMPLER_QUALITY

    variants = [(f"new ({RESAMPLER} {RESAMPLER_QUALITY})", RESAMPLER),
                (f"old ({LEGACY_RESAMPLER} Resample defaults)", LEGACY_RESAMPLER)]
    load = Path("/proc/loadavg").read_text().split()[0] if Path("/proc/loadavg").exists() else "?"
    print(f"machine: {cpu_name()}, {os.cpu_count()} cores ({usable_cores()} usable), "
          f"load average {load} before the run")
    with tempfile.TemporaryDirectory(prefix="m2das-bench-") as tmp:
        audio = Path(tmp) / "audio"
        audio.mkdir()
        make_bench_clips(audio, files)
        warm = Path(tmp) / "warm"
        warm.mkdir()
        for clip in sorted(audio.iterdir())[:workers * 2]:
            (warm / clip.name).symlink_to(clip)
        for device in devices:
            name = torch.cuda.get_device_name() if device.startswith("cuda") else "CPU"
            rates = {}
            for label, resampler in variants:
                tag = f"{device}-{resampler}"
                # warm-up on a few clips: worker server start, CUDA context, filter kernels
                run_lms(warm, Path(tmp) / f"warm-{tag}", device=device, workers=workers,
                        progress=False, resampler=resampler)
                s = run_lms(audio, Path(tmp) / f"data-{tag}", device=device, workers=workers,
                            progress=False, resampler=resampler)
                rates[label] = s["converted"] / s["lms_seconds"]
                print(f"{device}, {label}: {files} clips (10 s, 44.1 kHz, stereo, 16-bit wav) in "
                      f"{s['lms_seconds']:.2f} s with {workers} workers: {rates[label]:.1f} "
                      f"files/s, {rates[label] / workers:.2f} files/s per core ({name})")
            new, old = (rates[label] for label, _ in variants)
            print(f"{device}: the paper's recipe runs at {new / old:.2f}x the old one's speed")
    return 0


def _benches() -> dict:
    """Each benchmark's entry point, by the word that names it on the command line."""
    from m2das.tools import bench_checkpoint
    from m2das.tools import bench_monitor, bench_remote
    from m2das.tools import bench_startup

    return {"train": train_main, "prepare": prepare_main, "checkpoint": bench_checkpoint.checkpoint_main,
            "data": data_main,
            "data-remote": bench_remote.main, "monitor": bench_monitor.main,
            "startup": bench_startup.main}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    benches = _benches()
    usage = f"usage: m2das bench {{{','.join(benches)}}} [options]"
    if not argv or argv[0] in ("-h", "--help"):
        print(usage)
        return 0
    if argv[0] in benches:
        return benches[argv[0]](argv[1:])
    print(f"m2das bench: unknown benchmark {argv[0]!r}\n{usage}", file=sys.stderr)
    return 2
