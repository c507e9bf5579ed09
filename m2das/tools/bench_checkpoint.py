"""`m2das bench checkpoint`: what a save stalls the training step, and what a resume's checks cost.

In one run, on one full state (model, AdamW moments, RNG; ViT-B by default), interleaved per repeat:

- bare torch.save: the reference's save (no fsync, no check), the stall to beat;
- synchronous save (before): the finiteness check as it was (max |x| per tensor) and the atomic,
  fsynced write, all on the step, as every epoch checkpoint was written;
- background save, in-loop stall: what `step_boundary` takes for an epoch checkpoint now (a snapshot
  into buffers kept from the previous save); the finiteness check, write, fsync and rename that follow
  in the writer thread are timed apart;
- stop's save: the one save still written on the step, since the process exits after it;
- the finiteness check, the CRC32 check (before: zipfile.testzip on every rank; now: threads over a
  memory map, on rank 0 only) and a bare torch.load, from page cache.
"""

import tempfile
import time
import zipfile
from pathlib import Path

import torch

from m2das.cliargs import Parser
from m2das.machine import describe


def all_finite_before(tensors) -> bool:
    """The finiteness check as it was: max |x| of every tensor (one foreach call), one host sync."""
    floats = [t.detach() for t in tensors if isinstance(t, torch.Tensor) and t.is_floating_point() and t.numel()]
    return not floats or bool(torch.isfinite(torch.stack(torch._foreach_norm(floats, ord=float("inf")))).all())


def crc_before(path) -> None:
    """The CRC32 check as it was: zipfile's testzip, record by record through its reader."""
    with zipfile.ZipFile(path) as z:
        assert z.testzip() is None


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def full_state(model_name: str, folder: Path):
    """A Checkpointer over a model with its AdamW moments (as after the first step), saving in `folder`."""
    from m2das.checkpoint import Checkpointer, Progress, RNGState
    from m2das.model import create_model
    from m2das.train import build_optimizer

    device = torch.device("cpu")
    model = create_model(model_name, num_classes=527)
    optimizer = build_optimizer(model, 1e-4, 0.05, device)
    for group in optimizer.param_groups:
        for param in group["params"]:
            optimizer.state[param] = {"step": torch.tensor(1.0), "exp_avg": torch.zeros_like(param),
                                      "exp_avg_sq": torch.zeros_like(param)}
    return Checkpointer(folder, {"model": model, "optimizer": optimizer, "rng": RNGState(device),
                                 "progress": Progress()}, {"args": {"model": model_name}},
                        rank=0, epochs=10 ** 6, save_freq=1, interval_s=1e9, log=lambda m: None)


def checkpoint_main(argv) -> int:
    from m2das import ckptfile
    from m2das.checkpoint import all_finite

    p = Parser(prog="m2das bench checkpoint", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="m2d_as_vit_base")
    p.add_argument("--dir", default=None, help="folder to write the files in, on the disk to measure "
                                               "(default: a temporary folder)")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    print(f"machine: {describe(torch.device('cpu'))}, torch {torch.get_num_threads()} threads, "
          f"CRC32 threads {ckptfile.CRC_THREADS}")
    rows = {name: [] for name in ("bare torch.save", "synchronous save (before)", "background save: in-loop stall",
                                  "  then in the writer", "stop's save (synchronous)", "finite check (before)",
                                  "finite check (now)", "CRC32 check (before)", "CRC32 check (now)", "torch.load")}
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="m2das-bench-") as tmp:
        folder = Path(tmp)
        ckpt = full_state(args.model, folder)
        bare, before = folder / "bare.pth", folder / "before.pth"
        ckpt.state_dict()  # the optimizer's first state_dict() imports torch._dynamo: not a save's cost
        for repeat in range(args.repeats):
            rows["bare torch.save"].append(_timed(lambda: torch.save(ckpt.state_dict(), bare)))
            rows["synchronous save (before)"].append(_timed(lambda: all_finite_before(ckpt.tensors()) and
                                                            ckptfile.save_file(ckpt.state_dict(), before)))
            ckpt.progress.epoch = repeat + 1
            rows["background save: in-loop stall"].append(_timed(lambda: ckpt.step_boundary(None, True)))
            rows["  then in the writer"].append(_timed(ckpt.finish))
            rows["stop's save (synchronous)"].append(_timed(lambda: ckpt.step_boundary("SIGTERM", False)))
            rows["finite check (before)"].append(_timed(lambda: all_finite_before(ckpt.tensors())))
            rows["finite check (now)"].append(_timed(lambda: all_finite(ckpt.tensors())))
            rows["CRC32 check (before)"].append(_timed(lambda: crc_before(before)))
            rows["CRC32 check (now)"].append(_timed(lambda: ckptfile.verify_integrity(before)))
            rows["torch.load"].append(_timed(lambda: torch.load(before, map_location="cpu", weights_only=True)))
            for path in folder.glob("checkpoint-*.pth"):
                path.unlink()
        size = before.stat().st_size
    print(f"{args.model} full state: {size / 1e6:.1f} MB; seconds, best and worst of {args.repeats} "
          f"(the first background save also allocates its snapshot buffers)")
    for name, values in rows.items():
        print(f"  {name:<31} {min(values):6.3f} s  (worst {max(values):6.3f} s, {size / 1e9 / min(values):5.2f} GB/s)")
    stall, reference = min(rows["background save: in-loop stall"]), min(rows["bare torch.save"])
    print(f"in-loop stall of a background save: {stall / reference:.2f}x a bare torch.save "
          f"(the synchronous save was {min(rows['synchronous save (before)']) / reference:.2f}x)")
    return 0
