"""`m2das demo`: the whole job on a corpus it makes itself, in a couple of minutes on a laptop CPU.

1. synthesise labelled clips (one to three overlapping sounds of five classes in
   background noise), with a class list and segment lists in AudioSet's release
   format (nothing downloaded); the --heldout clips go to eval_segments.csv;
2. `m2das prepare --hold-out-eval` them: LMS files, lists, norm stats, and the
   held-out clips kept out of pre-training;
3. train the tiny model, send it a real SIGTERM mid-run, resume with the same
   command, and check the resumed run ends bit-identical to an uninterrupted one;
4. probe the trained encoder and three random initialisations linearly on the
   held-out clips: the margin of pre-training with its 95% interval.
"""

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from m2das import runfolder
from m2das.cliargs import Parser
from m2das.fileio import read_jsonl

SAMPLE_RATE = 16000
DEMO_MARKER = ".m2das-demo"  # only a folder holding it is deleted when the demo reruns

# Demo classes (mid, display name). Alone each is easy to see on a mel spectrogram; mixed, at random
# levels and in noise, a random encoder's features separate them only in part (tone and clicks least).
CLASSES = [
    ("/demo/tone", "Steady tone"),
    ("/demo/chirp", "Rising chirp"),
    ("/demo/noise", "Noise bursts"),
    ("/demo/clicks", "Click train"),
    ("/demo/chord", "Harmonic chord"),
]


def synth(kind: str, seconds: float, rng: np.random.Generator, sr: int = SAMPLE_RATE) -> np.ndarray:
    t = np.arange(int(seconds * sr)) / sr
    if kind == "/demo/tone":
        return np.sin(2 * np.pi * rng.uniform(300, 1200) * t)
    if kind == "/demo/chirp":
        f0, f1 = rng.uniform(200, 500), rng.uniform(2000, 5000)
        return np.sin(2 * np.pi * (f0 * t + (f1 - f0) * t ** 2 / (2 * seconds)))
    if kind == "/demo/noise":
        gate = (np.sin(2 * np.pi * rng.uniform(1, 3) * t) > 0.3).astype(float)
        return gate * rng.standard_normal(t.size) * 0.5
    if kind == "/demo/clicks":
        x = np.zeros(t.size)
        x[:: int(sr / rng.uniform(4, 12))] = 1.0
        return np.convolve(x, np.hanning(64), mode="same")
    if kind == "/demo/chord":
        f = rng.uniform(150, 300)
        return sum(np.sin(2 * np.pi * f * k * t) / k for k in (1, 2, 3, 5))
    raise ValueError(kind)


SNR_DB = (-5.0, 10.0)  # events over the background noise
EVENT_GAIN_DB = (-6.0, 0.0)
MAX_EVENTS = 3


def background(n: int, rng: np.random.Generator) -> np.ndarray:
    """Brown noise with its slowest drift removed: most energy low, some everywhere."""
    x = np.cumsum(rng.standard_normal(n))
    x -= np.convolve(x, np.ones(400) / 400, mode="same")
    return x / (np.sqrt(np.mean(x ** 2)) + 1e-9)


def mixture(kinds, seconds: float, rng: np.random.Generator) -> np.ndarray:
    """The events at random levels plus background noise at a random SNR, peak 0.3."""
    n = int(seconds * SAMPLE_RATE)
    wave = np.zeros(n)
    for kind in kinds:
        x = synth(kind, seconds, rng)[:n]
        wave += x / (np.sqrt(np.mean(x ** 2)) + 1e-9) * 10 ** (rng.uniform(*EVENT_GAIN_DB) / 20)
    wave += background(n, rng) * np.sqrt(np.mean(wave ** 2)) * 10 ** (-rng.uniform(*SNR_DB) / 20)
    return 0.3 * wave / (np.abs(wave).max() + 1e-9)


def make_corpus(folder: Path, clips: int, heldout: int = 0, seed: int = 0) -> tuple[Path, Path]:
    """Write AUDIO/*.wav and METADATA/*.csv in AudioSet's layout; return both folders.

    The first `clips` go to the two training lists, the last `heldout` to eval_segments.csv.
    """
    import soundfile as sf

    rng = np.random.default_rng(seed)
    audio, meta = folder / "audio", folder / "metadata"
    audio.mkdir(parents=True, exist_ok=True)
    meta.mkdir(parents=True, exist_ok=True)
    with open(meta / "class_labels_indices.csv", "w") as f:
        f.write("index,mid,display_name\n")
        f.writelines(f'{i},{mid},"{name}"\n' for i, (mid, name) in enumerate(CLASSES))
    rows = {"eval_segments.csv": [], "balanced_train_segments.csv": [], "unbalanced_train_segments.csv": []}
    for i in range(clips + heldout):
        ytid = f"demo{i:07d}"  # 11 characters, like a YouTube ID
        kinds = sorted(rng.choice([c[0] for c in CLASSES], size=int(rng.integers(1, MAX_EVENTS + 1)), replace=False))
        seconds = float(rng.uniform(2.5, 4.0))
        wave = mixture(kinds, seconds, rng)
        # Both file-name styles users have: "YTID_start.wav" and "Y" + YTID.
        name = f"{ytid}_0.000.wav" if i % 2 == 0 else f"Y{ytid}.wav"
        sf.write(audio / name, wave.astype(np.float32), SAMPLE_RATE)
        lists = list(rows)
        rows[lists[0] if i >= clips else lists[1 + i % 2]].append(f'{ytid}, 0.000, {seconds:.3f}, "{",".join(kinds)}"')
    for name, lines in rows.items():
        header = ["# Segments csv (m2das demo)", f"# num_ytids={len(lines)}, num_segs={len(lines)}",
                  "# YTID, start_seconds, end_seconds, positive_labels"]
        (meta / name).write_text("\n".join(header + lines) + "\n")
    return audio, meta


def last_step(run_dir: Path) -> int:
    """Polled while the trainer appends, so a half-written last line must not break it."""
    rows = read_jsonl(run_dir / "log.jsonl")
    return rows[-1]["step"] if rows else 0


def train_command(data: Path, run_dir: Path, epochs: int, clips: int) -> list:
    """Batch 32 (fewer for a tiny corpus, so an epoch has steps): per clip a sixth of batch 8's CPU time."""
    batch = min(32, max(clips // 4, 2))
    return [sys.executable, "-m", "m2das", "train", "--model", "m2d_as_vit_tiny", "--input_size", "80x208",
            "--blr", "1e-2", "--data_path", str(data), "--output_dir", str(run_dir), "--epochs", str(epochs),
            "--batch_size", str(batch), "--warmup_epochs", str(max(epochs // 20, 1)),
            "--save_freq", str(max(epochs // 2, 1)), "--num_workers", "1", "--log_every", "1", "--device", "cpu"]


def trainer_env() -> dict:
    """One thread unless the user chose: the tiny model's matrices are too small to split, and on a
    busy 2-core machine two threads cost ten times the CPU of one."""
    return {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}


def run_training(cmd, interrupt_at: int | None = None, quiet: bool = False) -> int:
    """Run the trainer; optionally send it SIGTERM once its log shows `interrupt_at` steps."""
    run_dir = Path(cmd[cmd.index("--output_dir") + 1])
    out = subprocess.DEVNULL if quiet else None
    proc = subprocess.Popen(cmd, stdout=out, stderr=out, env=trainer_env())
    if interrupt_at is not None:
        while proc.poll() is None and last_step(run_dir) < interrupt_at:
            time.sleep(0.02)
        if proc.poll() is None:
            print(f"\n[demo] sending SIGTERM to the trainer (pid {proc.pid}) at step {last_step(run_dir)}\n",
                  flush=True)
            os.kill(proc.pid, signal.SIGTERM)
    return proc.wait()


def same_weights(a: Path, b: Path) -> bool:
    import torch

    wa = torch.load(a, map_location="cpu", weights_only=True)["model"]
    wb = torch.load(b, map_location="cpu", weights_only=True)["model"]
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def main(argv=None) -> int:
    from m2das import EXIT_RESUMABLE
    from m2das.data.prepare import format_summary, run_prepare

    p = Parser(prog="m2das demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="demo_out",
                   help="folder for the corpus, data and runs (recreated if an earlier demo made it; any other "
                        "existing folder is refused)")
    p.add_argument("--clips", type=int, default=256, help="clips to pre-train on")
    p.add_argument("--heldout", type=int, default=400,
                   help="clips kept out of pre-training, for the linear probe (4/2/4 train/valid/test)")
    p.add_argument("--epochs", type=int, default=80)
    p.add_argument("--no_reference", "--no-reference", action="store_true",
                   help="skip the uninterrupted run used for the check")
    args = p.parse_args(argv)
    out = Path(args.out).resolve()
    if out.exists() and not (out / DEMO_MARKER).exists() and (not out.is_dir() or any(out.iterdir())):
        print(f"m2das demo: error: --out {out} exists and was not made by m2das demo (no {DEMO_MARKER} in it); "
              f"pass another --out, or remove it yourself", file=sys.stderr)
        return 2
    if out.exists():
        import shutil

        shutil.rmtree(out)  # an earlier demo's folder: recreated
    out.mkdir(parents=True)
    (out / DEMO_MARKER).write_text("made by `m2das demo`; the next demo with this --out deletes this folder\n")
    t0 = time.monotonic()

    print(f"[demo] 1/4 synthesising {args.clips} + {args.heldout} held-out clips of {len(CLASSES)} classes "
          f"in {out / 'audio'}", flush=True)
    audio, meta = make_corpus(out, args.clips, args.heldout)

    print("[demo] 2/4 m2das prepare --hold-out-eval (LMS, lists, labels, weights, norm stats)", flush=True)
    data = out / "data"
    summary = run_prepare(audio, data, metadata_dir=meta, device="cpu", workers=min(2, os.cpu_count() or 1),
                          progress=False, hold_out_eval=True)
    print(format_summary(summary), flush=True)
    if not summary["ok"]:
        print(f"[demo] prepare failed: {summary['reason']}", file=sys.stderr)
        return 1

    print("\n[demo] 3/4 training the tiny model; it will be interrupted once and resumed", flush=True)
    run_dir = out / "run"
    cmd = train_command(data, run_dir, args.epochs, args.clips)
    total = json.loads(subprocess.run(cmd + ["--print_config"], capture_output=True, text=True, check=True,
                                      env=trainer_env()).stdout)["total_steps"]
    interrupt_at = max(total // 3, 1)
    code = run_training(cmd, interrupt_at=interrupt_at)
    if code != EXIT_RESUMABLE:
        print(f"[demo] expected the interrupted trainer to exit {EXIT_RESUMABLE}, got {code}", file=sys.stderr)
        return 1
    print(f"\n[demo] trainer exited {code} (interrupted, resumable); rerunning the same command\n", flush=True)
    code = run_training(cmd)
    if code != 0:
        print(f"[demo] resumed run failed with exit {code}", file=sys.stderr)
        return 1

    starts = read_jsonl(run_dir / runfolder.RESTARTS)
    resumed = next(r for r in starts if r.get("event") == runfolder.EVENT_START and r.get("resumed_from"))
    final = run_dir / f"checkpoint-{args.epochs}.pth"
    identical = None
    if not args.no_reference:
        print("\n[demo] an uninterrupted run of the same command, for comparison", flush=True)
        reference = out / "run_uninterrupted"
        if run_training(train_command(data, reference, args.epochs, args.clips), quiet=True) != 0:
            print("[demo] the uninterrupted run failed", file=sys.stderr)
            return 1
        identical = same_weights(final, reference / final.name)

    rows = read_jsonl(run_dir / "log.jsonl")
    print("\n[demo] 4/4 linear probes on the held-out clips: the exported encoder and random inits", flush=True)
    from m2das.tools.demo_eval import RESULT, evaluate_demo, summary_line

    probe = evaluate_demo(out, data, final)

    print("\n" + "=" * 72)
    print("m2das demo summary")
    print(f"  corpus          {args.clips} pre-training + {args.heldout} held-out clips, {len(CLASSES)} classes "
          f"({audio})")
    print(f"  data folder     {data} ({summary['labelled']} labelled files)")
    print(f"  steps           {rows[-1]['step']} optimizer steps over {args.epochs} epochs")
    print(f"  loss            {rows[0]['loss']:.4f} at step {rows[0]['step']} -> {rows[-1]['loss']:.4f} "
          f"(online {rows[-1]['loss_online']:.4f}, offline {rows[-1]['loss_offline']:.4f})")
    print(f"  interrupted     SIGTERM; resumed from {resumed['resumed_from']} at step {resumed['resumed_step']}")
    print(f"  checkpoints     {', '.join(p.name for p in sorted(run_dir.glob('*.pth')))} in {run_dir}")
    if identical is not None:
        print(f"  resume check    final weights {'bit-identical to' if identical else 'DIFFER from'} "
              f"an uninterrupted run")
    print(f"  linear probe    {summary_line(probe)} ({out / RESULT})")
    print(f"  time            {time.monotonic() - t0:.0f} s")
    print(f"  next            m2das status {run_dir}")
    print("=" * 72)
    return 0 if identical in (None, True) else 1
