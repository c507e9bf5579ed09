"""A stop signal during start-up is held for the trainer, not fatal and not lost."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from conftest import TINY_TRAIN, m2das_cmd
from m2das.signals import EXIT_ABORTED, START_INTERRUPTED

CODE = """
import os, signal, sys, time
from m2das.signals import StopRequest, hold_early
hold_early()
os.kill(os.getpid(), signal.SIGUSR2)   # SIGUSR2's default would end the process here
time.sleep(0.2)
stop = StopRequest().install()
print(stop.name, stop.previous[signal.SIGUSR2] == signal.SIG_DFL)
stop.restore()
"""


def test_a_signal_before_the_handlers_is_handed_to_the_stop_request():
    out = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["SIGUSR2", "True"]  # and the handler before the hold is the one handed over to


def test_without_a_signal_nothing_is_requested():
    code = CODE.replace("os.kill(os.getpid(), signal.SIGUSR2)", "pass")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.split() == ["None", "True"], out.stderr


def caught_signals(pid: int) -> int:
    """The process's SigCgt mask: which signals it has a handler for (Linux /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigCgt:"):
            return int(line.split()[1], 16)
    return 0


def test_a_ctrl_c_while_train_imports_torch_is_one_line_and_130(tmp_path):
    run = tmp_path / "run"
    proc = subprocess.Popen(m2das_cmd("train", *TINY_TRAIN, "--data_path", tmp_path / "data", "--output_dir", run),
                            start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        # hold_early takes SIGUSR2 last, after SIGINT: from then on until the training loop's handler a
        # Ctrl-C is the early one, and the trainer's module (torch) is still being imported.
        deadline = time.time() + 30
        while not caught_signals(proc.pid) & (1 << (signal.SIGUSR2 - 1)):
            assert proc.poll() is None and time.time() < deadline, proc.communicate()
            time.sleep(0.002)
        os.killpg(proc.pid, signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == EXIT_ABORTED, err
    assert err.splitlines() == [f"m2das train: {START_INTERRUPTED} (exit {EXIT_ABORTED})"], err
    assert out == "" and not run.exists()
