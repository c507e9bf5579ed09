"""`m2das` itself: no command is a usage error, and its list names every benchmark `bench` runs."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def m2das(*args):
    return subprocess.run([sys.executable, "-m", "m2das", *args], capture_output=True, text=True, cwd=REPO,
                          timeout=120)


def test_no_command_is_usage_on_stderr_exit_2():
    r = m2das()
    assert r.returncode == 2 and r.stdout == "" and r.stderr.startswith("usage: m2das <command>"), r
    assert m2das("--help").returncode == 0


def test_help_lists_every_benchmark():
    listed = m2das("--help").stdout
    usage = m2das("bench", "--help").stdout
    names = usage.split("{", 1)[1].split("}", 1)[0].split(",")
    assert "train" in names and "startup" in names
    for name in names:
        assert f"`bench {name}`" in listed, name
