"""The cluster wing on a login node: no torch, no numpy, only submitit.

Two checks. In this interpreter, with an import hook that refuses torch and
numpy, every module under m2das/cluster/ imports and the launcher's dry runs
(which import the trainer's parser lazily) answer. In a real venv holding
only submitit, `python launch/submit.py ... --dry-run` prints the trainer argv.
"""

import json
import os
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CLUSTER_MODULES = sorted(f"m2das.cluster.{m.name}" for m in pkgutil.iter_modules([str(REPO / "m2das" / "cluster")]))
# Imported by the launcher when it checks trainer flags (config -> monitor).
LAUNCHER_LAZY = ("m2das.config", "m2das.monitor", "m2das.cli")
BLOCKED = ("torch", "numpy")

# argv: import MOD... | run SCRIPT ARGS... | module MOD ARGS...
CHECK = r"""
import importlib, importlib.abc, runpy, sys

BLOCKED = {blocked!r}


class LoginNode(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"not installed on a login node: {{name}}")
        return None


sys.meta_path.insert(0, LoginNode())
mode, rest = sys.argv[1], sys.argv[2:]
if mode == "import":
    for name in rest:
        importlib.import_module(name)
    print("imported", len(rest))
elif mode == "run":
    sys.argv = rest
    runpy.run_path(rest[0], run_name="__main__")
else:
    sys.argv = rest
    runpy.run_module(rest[0], run_name="__main__", alter_sys=True)
""".format(blocked=BLOCKED)


def login_node(*argv, pythonpath=()):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), *map(str, pythonpath)])}
    return subprocess.run([sys.executable, "-c", CHECK, *map(str, argv)], capture_output=True, text=True,
                          cwd=REPO, env=env, timeout=120)


def test_every_cluster_module_imports_without_torch_and_numpy():
    assert {"m2das.cluster.plan", "m2das.cluster.slurm", "m2das.cluster.local", "m2das.cluster.submit",
            "m2das.cluster.requeue", "m2das.cluster.status"} <= set(CLUSTER_MODULES)
    out = login_node("import", *CLUSTER_MODULES, *LAUNCHER_LAZY)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"imported {len(CLUSTER_MODULES) + len(LAUNCHER_LAZY)}"


def test_the_check_catches_an_injected_torch_import(tmp_path):
    # A cluster module that picked up `import torch` (directly or through a core module) fails here.
    (tmp_path / "m2das_probe.py").write_text("from m2das.cluster import plan  # noqa: F401\nimport torch  # noqa: F401\n")
    out = login_node("import", *CLUSTER_MODULES, "m2das_probe", pythonpath=[tmp_path])
    assert out.returncode == 1 and "not installed on a login node: torch" in out.stderr, out.stderr
    (tmp_path / "m2das_probe.py").write_text("import numpy.linalg  # noqa: F401\n")
    out = login_node("import", "m2das_probe", pythonpath=[tmp_path])
    assert out.returncode == 1 and "not installed on a login node: numpy" in out.stderr, out.stderr


@pytest.mark.parametrize("route", ["slurm", "local"])
def test_launcher_dry_runs_without_torch_and_numpy(tmp_path, route):
    argv = ["--preset", "48gb", "--cluster", route, "--run-dir", tmp_path / "run", "--dry-run", "--",
            "--data_path", "/data"]
    for how in (["run", REPO / "launch" / "submit.py"], ["module", "m2das", "submit"]):
        out = login_node(*how, *argv)
        assert out.returncode == 0, out.stderr
        assert f"trainer: m2das train --device cuda --batch_size 512 --accum_iter 1 --data_path /data " \
               f"--output_dir {tmp_path / 'run'}\n" in out.stdout
    if route == "local":
        spec = json.loads(out.stdout.split("# the supervisor would run this spec:\n", 1)[1])
        assert spec["ranks"] == 4 and spec["gpu"] is True
    else:
        assert "#SBATCH --gpus-per-node=4\n" in out.stdout


def test_requeue_and_status_commands_without_torch_and_numpy(tmp_path):
    out = login_node("module", "m2das.cluster.requeue", "defaults")
    assert out.returncode == 0 and len(out.stdout.split()) == 3, out.stderr
    out = login_node("module", "m2das", "status", "--no-queue", tmp_path / "no-such-run")
    assert out.returncode == 2 and "no-such-run" in out.stderr, (out.returncode, out.stderr)


@pytest.fixture(scope="session")
def submitit_only_python(request):
    """A venv holding only submitit (and its dependencies), kept in the pytest cache between runs."""
    folder = Path(request.config.cache.mkdir(f"submitit-only-venv-py{sys.version_info[0]}{sys.version_info[1]}"))
    python = folder / "bin" / "python"
    probe = [str(python), "-c", "import submitit, importlib.util as u; "
             "assert u.find_spec('numpy') is None and u.find_spec('torch') is None"]
    if python.exists() and subprocess.run(probe, capture_output=True).returncode == 0:
        return python
    made = subprocess.run([sys.executable, "-m", "venv", "--clear", str(folder)], capture_output=True, text=True)
    if made.returncode != 0:
        pytest.skip(f"cannot create a venv: {made.stderr.strip()[-300:]}")
    pip = subprocess.run([str(python), "-m", "pip", "install", "--quiet", "submitit"], capture_output=True,
                         text=True, timeout=600)
    if pip.returncode != 0:
        pytest.skip(f"pip cannot install submitit here: {pip.stderr.strip()[-300:]}")
    check = subprocess.run(probe, capture_output=True, text=True)
    assert check.returncode == 0, f"the submitit-only venv holds numpy or torch: {check.stderr}"
    return python


def test_launcher_in_a_venv_holding_only_submitit(submitit_only_python, tmp_path):
    # The command line, from the checkout (no install of m2das in that venv).
    out = subprocess.run([str(submitit_only_python), str(REPO / "launch" / "submit.py"), "--preset", "48gb",
                          "--partition", "debug", "--runs-dir", str(tmp_path / "runs"), "--dry-run", "--",
                          "--data_path", "/data"], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert out.returncode == 0, out.stderr
    trainer = next(line for line in out.stdout.splitlines() if line.startswith("trainer: "))
    assert trainer.startswith("trainer: m2das train --device cuda --batch_size 512 --accum_iter 1 "
                              f"--data_path /data --output_dir {tmp_path / 'runs'}/m2d_as_vit_base-80x608"), trainer
    assert "#SBATCH --partition=debug\n" in out.stdout
    assert f"{submitit_only_python} -m m2das.cluster.requeue decide" in out.stdout  # the job's interpreter


def test_finetune_dry_run_without_torch_and_numpy(tmp_path):
    # The launcher checks `m2das finetune`'s flags with its own parser on the login node, too.
    out = login_node("run", REPO / "launch" / "submit.py", "--preset", "48gb", "--cluster", "slurm",
                     "--command", "finetune", "--run-dir", tmp_path / "ft", "--dry-run", "--",
                     tmp_path / "weights.pth", "--task", "as20k", "--data_path", "/data")
    assert out.returncode == 0, out.stderr
    assert "trainer: m2das finetune " in out.stdout and "--task as20k" in out.stdout, out.stdout
