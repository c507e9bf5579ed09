"""Facts about the machine a command runs on: which device, how many cores, what CPU, which port.

One home so `train`, `prepare`, `embed`, `bench` and the launchers agree on
what `--device gpu` means or how many cores a rank may use. Torch-free at
import time: the cluster wing (login nodes) imports the port rule from here;
the functions that need torch import it themselves.
"""

import argparse
import contextlib
import os
import platform
import re
import socket
from pathlib import Path

DEVICE_HELP = "auto | cpu | cuda | cuda:N | gpu (= cuda)"
_CUDA_RE = re.compile(r"^cuda(?::(\d+))?$")


class DeviceError(ValueError):
    """A --device value that is malformed or names a device this machine lacks; one line, exit 2."""


def parse_device(text: str) -> str:
    """The canonical spelling of a --device value (auto, cpu, cuda, cuda:N); DeviceError otherwise."""
    want = str(text).strip().lower()
    if want == "gpu":
        want = "cuda"
    if want in ("auto", "cpu") or _CUDA_RE.match(want):
        return want
    raise DeviceError(f"--device {text}: expected {DEVICE_HELP}")


def device_flag(text: str) -> str:
    """parse_device as an argparse `type`, so a bad value is the parser's one-line error."""
    try:
        return parse_device(text)
    except DeviceError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected {DEVICE_HELP}") from None


def resolve_device(text: str, local_rank: int = 0):
    """The torch.device to use: auto picks CUDA when visible; CUDA without a GPU is a DeviceError.

    Plain `cuda` under torchrun means this rank's GPU (local_rank); `cuda:N` is taken as given.
    """
    import torch

    want = parse_device(text)
    if want == "auto":
        want = "cuda" if torch.cuda.is_available() else "cpu"
    if want == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise DeviceError(f"--device {text} but no CUDA device is visible; use --device cpu")
    index = _CUDA_RE.match(want).group(1)
    index = int(index) if index is not None else local_rank
    if index >= torch.cuda.device_count():
        raise DeviceError(f"--device {text}: only {torch.cuda.device_count()} CUDA device(s) are visible "
                          f"(cuda:0..cuda:{torch.cuda.device_count() - 1}); pick one of them")
    return torch.device("cuda", index)


def usable_cores() -> int:
    """Cores this process may run on (its affinity mask, which containers and SLURM narrow)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


def cores_per_rank(world_size: int) -> int:
    """This rank's share of the cores: SLURM's per-task count when set, else an even split."""
    cores = usable_cores()
    share = int(os.environ.get("SLURM_CPUS_PER_TASK", 0) or 0) or cores // max(world_size, 1)
    return max(1, min(share, cores))


def loader_workers(requested: int, world_size: int) -> int:
    """DataLoader workers: no more than this rank's share of the cores, one left for the rank itself."""
    per_rank = max(usable_cores() // max(world_size, 1) - 1, 0)
    return min(requested, per_rank) if requested > 0 else 0


def cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def describe(device) -> str:
    """One line naming the hardware a measurement ran on (for benchmark records)."""
    import torch

    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (torch {torch.__version__})"
    return f"{cpu_name()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads (torch {torch.__version__})"


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now (for a single-machine rendezvous)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def master_port(job_id, restart_count) -> int:
    """Same on every task of one start, different after a requeue (no stale socket clash)."""
    digits = int(re.sub(r"\D", "", str(job_id)) or 0)
    return 15000 + (digits * 31 + int(restart_count) * 7919) % 20000
