"""slurm/m2das-venv.sbatch on a real SLURM without --output: the job's log lands in the run folder's
logs/ (m2das.runfolder LOGS_DIR), not in the repository root it is submitted from."""

import subprocess
import sys
from pathlib import Path

import pytest

from m2das.runfolder import LOGS_DIR
from slurm_fixture import REPO, make_env, slurm_cluster, tiny_data, wait_for  # noqa: F401

pytestmark = [pytest.mark.slurm, pytest.mark.slow]


def test_the_venv_template_logs_into_the_run_folder(slurm_cluster, tiny_data, tmp_path):
    from slurm_fixture import train_argv_for

    cluster, run = slurm_cluster, tmp_path / "run"
    before = set(REPO.glob("slurm-*.out"))
    env = dict(make_env(), SLURM_CONF=str(cluster.conf), M2DAS_RUN=str(run), M2DAS_DATA=str(tiny_data),
               M2DAS_VENV=str(Path(sys.executable).parent.parent))
    out = subprocess.run(["sbatch", "--parsable", "--gpus-per-node=0", "--ntasks-per-node=2", "--cpus-per-task=1",
                          "--time=10", str(REPO / "slurm" / "m2das-venv.sbatch"), *train_argv_for(run, tiny_data)],
                         env=env, capture_output=True, text=True, timeout=60, cwd=REPO)
    assert out.returncode == 0, out.stdout + out.stderr
    job = out.stdout.strip().split(";")[0]
    log = run / LOGS_DIR / f"slurm-{job}.out"
    wait_for(lambda: cluster.job(job).get("JobState") in ("COMPLETED", "FAILED", "CANCELLED"), 300,
             f"job {job} to finish", lambda: (log.read_text()[-3000:] if log.exists() else "no log") + cluster.logs())
    assert cluster.job(job)["JobState"] == "COMPLETED", cluster.logs()
    assert "training finished" in log.read_text(), log.read_text()[-3000:]
    assert not [p for p in REPO.glob(f"slurm-*{job}.out") if p not in before]
