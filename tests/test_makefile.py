"""`make demo` on a machine without a GPU says what the CUDA build of torch costs, and TORCH_INDEX takes the
CPU build instead: the real Makefile, run by make, with a stand-in interpreter that records pip's arguments."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def make_install(tmp_path, *extra):
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    python = venv / "bin" / "python"
    python.write_text(f"#!{sys.executable}\nimport sys\nopen({str(tmp_path / 'pip-args')!r}, 'a')"
                      f".write(' '.join(sys.argv[1:]) + '\\n')\n")
    python.chmod(0o755)
    shutil.copy(REPO / "Makefile", tmp_path / "Makefile")
    (tmp_path / "pyproject.toml").write_text("")
    path = os.pathsep.join(p for p in os.environ["PATH"].split(os.pathsep)
                           if not (Path(p) / "nvidia-smi").exists())  # a machine without a GPU
    r = subprocess.run(["make", "install", f"VENV={venv}", *extra], cwd=tmp_path, capture_output=True,
                       text=True, env={**os.environ, "PATH": path}, timeout=60)
    assert r.returncode == 0, r.stderr
    return r.stdout, (tmp_path / "pip-args").read_text()


def test_without_a_gpu_the_install_says_what_cuda_costs_and_how_to_avoid_it(tmp_path):
    out, pip = make_install(tmp_path)
    assert "about 6 GB" in out and "TORCH_INDEX=https://download.pytorch.org/whl/cpu" in out, out
    assert pip.strip() == "-m pip install -q -e .[test]"


def test_torch_index_takes_the_cpu_build_of_the_pinned_version(tmp_path):
    out, pip = make_install(tmp_path, "TORCH_INDEX=https://download.pytorch.org/whl/cpu")
    assert "note:" not in out
    assert pip.strip() == "-m pip install -q -e .[test] --extra-index-url https://download.pytorch.org/whl/cpu"
