"""docker/entrypoint.sh outside a container: real processes, the real `m2das` CLI.

The container's folders (/audio, /data, /metadata, /opt/m2das/launch) are
pointed at temporary folders through the same environment variables a user
can set with `docker run -e`.
"""

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from m2das.cli import COMMANDS

REPO = Path(__file__).resolve().parents[1]
ENTRYPOINT = REPO / "docker" / "entrypoint.sh"
# The CLI installed next to the interpreter running the tests (.venv/bin).
BIN = Path(sys.executable).parent

YTIDS = ("abcdefghijk", "ABCDEFGHIJK")


def _env(tmp_path, **extra):
    env = {
        "PATH": f"{BIN}:/usr/bin:/bin",
        "HOME": str(tmp_path),
        "LANG": "C.UTF-8",
        # Folders that do not exist: a test that forgets to set one fails loudly.
        "M2DAS_AUDIO_DIR": str(tmp_path / "unset-audio"),
        "M2DAS_DATA_DIR": str(tmp_path / "unset-data"),
        "M2DAS_METADATA_DIR": str(tmp_path / "unset-metadata"),
        "M2DAS_LAUNCH_DIR": str(tmp_path / "unset-launch"),
    }
    env.update({k: str(v) for k, v in extra.items()})
    return env


def run(tmp_path, *args, timeout=300, **env):
    return subprocess.run([str(ENTRYPOINT), *args], env=_env(tmp_path, **env), cwd=tmp_path,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module", autouse=True)
def _cli_present():
    if not (BIN / "m2das").is_file():
        pytest.skip(f"m2das CLI not installed next to {sys.executable}; run `make install`")


@pytest.fixture
def audio(tmp_path):
    """Two short clips named after YouTube IDs, as AudioSet downloads are."""
    folder = tmp_path / "audio"
    (folder / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for ytid, sub, sr in zip(YTIDS, ("", "sub"), (16000, 22050)):
        wave = 0.1 * rng.standard_normal(2 * sr).astype(np.float32)
        sf.write(str(folder / sub / f"{ytid}_30.000.wav"), wave, sr)
    return folder


@pytest.fixture
def metadata(tmp_path):
    """A minimal AudioSet release: two classes, one clip in each list."""
    folder = tmp_path / "metadata"
    folder.mkdir()
    (folder / "class_labels_indices.csv").write_text(
        'index,mid,display_name\n0,/m/09x0r,"Speech"\n1,/m/04rlf,"Music"\n')
    header = "# Segments csv\n# num_ytids=1\n# YTID, start_seconds, end_seconds, positive_labels\n"
    (folder / "balanced_train_segments.csv").write_text(
        header + f'{YTIDS[0]}, 30.000, 40.000, "/m/09x0r,/m/04rlf"\n')
    (folder / "eval_segments.csv").write_text(header + f'{YTIDS[1]}, 30.000, 40.000, "/m/04rlf"\n')
    return folder


def test_help_without_arguments(tmp_path):
    for args in ((), ("help",), ("--help",)):
        r = run(tmp_path, *args)
        assert r.returncode == 0, r.stderr
        for command in ("prepare", "train", "demo", "submit", "status", "bench"):
            assert f"  {command} " in r.stdout
        for command, (_, text) in COMMANDS.items():  # the CLI's list, descriptions included
            assert f"  {command:<8} {text}\n" in r.stdout
        # The defaults shown are the ones in effect.
        assert str(tmp_path / "unset-audio") in r.stdout


def test_prepare_defaults_come_from_the_environment(tmp_path, audio, metadata):
    data = tmp_path / "data"
    r = run(tmp_path, "prepare", M2DAS_AUDIO_DIR=audio, M2DAS_DATA_DIR=data,
            M2DAS_METADATA_DIR=metadata)
    assert r.returncode == 0, r.stderr
    npys = sorted(p.relative_to(data / "audioset_lms") for p in (data / "audioset_lms").rglob("*.npy"))
    assert npys == [Path(f"{YTIDS[0]}_30.000.npy"), Path("sub") / f"{YTIDS[1]}_30.000.npy"]
    assert (data / "files_audioset.csv").is_file()
    stats = json.loads((data / "norm_stats.json").read_text())
    assert stats, "empty norm_stats.json"
    # Labels came from the mounted metadata: nothing was downloaded into DATA/metadata.
    weighted = (data / "files_as_weighted.csv").read_text()
    assert "/m/09x0r" in weighted and "/m/04rlf" in weighted
    assert not (data / "metadata").exists()


def test_prepare_options_only_keeps_the_default_folders(tmp_path, audio):
    data = tmp_path / "data"
    r = run(tmp_path, "prepare", "--steps", "lms,list", "--workers", "1", "--no-progress",
            M2DAS_AUDIO_DIR=audio, M2DAS_DATA_DIR=data)
    assert r.returncode == 0, r.stderr
    assert len(list((data / "audioset_lms").rglob("*.npy"))) == 2
    assert (data / "files_audioset.csv").is_file()
    assert not (data / "norm_stats.json").exists()  # --steps reached the CLI


def test_prepare_explicit_folders_override_the_defaults(tmp_path, audio):
    data = tmp_path / "elsewhere"
    r = run(tmp_path, "prepare", str(audio), str(data), "--steps", "lms", "--workers", "1")
    assert r.returncode == 0, r.stderr
    assert len(list((data / "audioset_lms").rglob("*.npy"))) == 2
    assert not (tmp_path / "unset-data").exists()


def test_prepare_user_metadata_option_wins(tmp_path, audio, metadata):
    other = tmp_path / "other-metadata"
    shutil.copytree(metadata, other)
    # Only the user's list knows the clips' labels under another class.
    for name in ("balanced_train_segments.csv", "eval_segments.csv"):
        path = other / name
        path.write_text(path.read_text().replace('"/m/09x0r,/m/04rlf"', '"/m/09x0r"')
                        .replace('"/m/04rlf"', '"/m/09x0r"'))
    data = tmp_path / "data"
    r = run(tmp_path, "prepare", "--steps", "lms,list,labels", "--metadata", str(other),
            M2DAS_AUDIO_DIR=audio, M2DAS_DATA_DIR=data, M2DAS_METADATA_DIR=metadata)
    assert r.returncode == 0, r.stderr
    weighted = (data / "files_as_weighted.csv").read_text()
    assert "/m/09x0r" in weighted and "/m/04rlf" not in weighted


def test_prepare_failure_exit_code_is_kept(tmp_path):
    # No audio mounted: prepare's own usage error, status and message reach the caller.
    r = run(tmp_path, "prepare", M2DAS_DATA_DIR=tmp_path / "data")
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert str(tmp_path / "unset-audio") in r.stderr


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_commands_reach_the_cli(tmp_path, command):
    # Every command of the CLI, the entry point's first word (none is a shell's "not found", 127).
    r = run(tmp_path, command, "--help", M2DAS_LAUNCH_DIR=REPO / "launch")
    assert r.returncode == 0, (r.returncode, r.stderr)
    assert r.stdout.startswith("usage:") and command in r.stdout.splitlines()[0]


def test_the_entrypoint_keeps_no_command_list_of_its_own(tmp_path):
    # A command added to the CLI reaches it through the entry point: the list is asked of `m2das`.
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "m2das").write_text('#!/bin/sh\n[ "$1" = --commands ] && { echo "newcmd   A new command."; exit 0; }\n'
                                'echo "m2das $*"\n')
    (fake / "m2das").chmod(0o755)
    env = _env(tmp_path)
    env["PATH"] = f"{fake}:{env['PATH']}"
    r = subprocess.run([str(ENTRYPOINT), "newcmd", "a b"], env=env, capture_output=True, text=True, timeout=60)
    assert (r.returncode, r.stdout) == (0, "m2das newcmd a b\n"), r.stderr
    r = subprocess.run([str(ENTRYPOINT), "help"], env=env, capture_output=True, text=True, timeout=60)
    assert "  newcmd   A new command.\n" in r.stdout and "  export " not in r.stdout


def test_unknown_cli_option_exit_code(tmp_path):
    r = run(tmp_path, "status", "--no-such-option")
    assert r.returncode == 2
    assert "usage: m2das status" in r.stderr


def test_submit_runs_the_launcher(tmp_path):
    launch = tmp_path / "launch"
    launch.mkdir()
    (launch / "submit.py").write_text(
        "import json, sys\nprint(json.dumps([sys.argv[1:], sys.executable]))\nsys.exit(3)\n")
    env = dict(M2DAS_LAUNCH_DIR=launch, M2DAS_DATA_DIR="/d", M2DAS_RUNS_DIR="/r")
    r = run(tmp_path, "submit", "--preset", "48gb", "a b", **env)
    assert r.returncode == 3
    argv, python = json.loads(r.stdout)
    # Container folders: launcher flag first, trainer flag last; the interpreter
    # is the one on PATH, i.e. the one m2das is installed in.
    assert argv == ["--runs-dir", "/r", "--preset", "48gb", "a b", "--data_path", "/d"]
    assert Path(python).parent == BIN
    r = run(tmp_path, "submit", "--runs-dir", "/mine", "--", "--data_path=/x", **env)
    assert json.loads(r.stdout)[0] == ["--runs-dir", "/r", "--runs-dir", "/mine", "--", "--data_path=/x"]
    r = run(tmp_path, "submit", "--", "--data-path", "/y", **env)  # the hyphen spelling is the same flag
    assert json.loads(r.stdout)[0] == ["--runs-dir", "/r", "--", "--data-path", "/y"]


def test_submit_local_runs_in_the_foreground(tmp_path):
    # The container lives as long as its entry point: a local run must not detach.
    launch = tmp_path / "launch"
    launch.mkdir()
    (launch / "submit.py").write_text("import json, sys\nprint(json.dumps(sys.argv[1:]))\n")
    env = dict(M2DAS_LAUNCH_DIR=launch, M2DAS_DATA_DIR="/d", M2DAS_RUNS_DIR="/r")

    def argv(*args):
        r = run(tmp_path, "submit", *args, **env)
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout)

    assert argv("--cluster", "local", "--preset", "cpu-test") == [
        "--foreground", "--runs-dir", "/r", "--cluster", "local", "--preset", "cpu-test", "--data_path", "/d"]
    assert argv("--cluster=local")[0] == "--foreground"
    assert argv("--cluster", "local", "--foreground").count("--foreground") == 1
    assert argv("--cluster", "local", "--cluster", "slurm")[0] == "--runs-dir"  # the last one counts
    assert argv("--cluster", "slurm")[0] == "--runs-dir"
    assert argv("--preset", "48gb", "--", "--cluster", "local")[0] == "--runs-dir"  # a trainer flag


def test_submit_with_the_real_launcher(tmp_path):
    if not (REPO / "launch" / "submit.py").is_file():
        pytest.skip("launch/submit.py not in this tree")
    data, runs = tmp_path / "data", tmp_path / "runs"
    r = run(tmp_path, "submit", "--dry-run", "--cluster", "local", "--preset", "cpu-test",
            M2DAS_LAUNCH_DIR=REPO / "launch", M2DAS_DATA_DIR=data, M2DAS_RUNS_DIR=runs)
    assert r.returncode == 0, r.stderr
    trainer = next(line for line in r.stdout.splitlines() if line.startswith("trainer: "))
    assert f"--data_path {data} " in trainer
    assert f"--output_dir {runs}/" in trainer
    assert '"foreground": true' in r.stdout  # the local spec the launcher would run in this process


def test_train_uses_the_container_folders(tmp_path):
    env = dict(M2DAS_DATA_DIR=tmp_path / "d", M2DAS_RUNS_DIR=tmp_path / "r")
    r = run(tmp_path, "train", "--print_config", **env)
    assert r.returncode == 0, r.stderr
    cfg = json.loads(r.stdout)
    assert (cfg["data_path"], cfg["runs_dir"]) == (str(tmp_path / "d"), str(tmp_path / "r"))
    # The caller's flags win over the container's.
    r = run(tmp_path, "train", "--print_config", "--data_path", "/elsewhere", **env)
    assert json.loads(r.stdout)["data_path"] == "/elsewhere"


def test_submit_without_launcher(tmp_path):
    r = run(tmp_path, "submit", "--help")
    assert r.returncode == 2
    assert "submit.py not found" in r.stderr


def test_other_commands_pass_through(tmp_path):
    r = run(tmp_path, "printf", "%s|", "a b", "c")
    assert (r.returncode, r.stdout) == (0, "a b|c|")
    assert run(tmp_path, "sh", "-c", "exit 7").returncode == 7
    missing = run(tmp_path, "no-such-command-m2das")
    assert missing.returncode == 127
    assert "no-such-command-m2das" in missing.stderr


def test_commands_replace_the_entrypoint_process(tmp_path):
    # exec, not a child shell: the scheduler's SIGTERM/SIGUSR1 reach the command itself.
    proc = subprocess.Popen([str(ENTRYPOINT), "sh", "-c", "echo $$"], env=_env(tmp_path),
                            stdout=subprocess.PIPE, text=True)
    out, _ = proc.communicate(timeout=30)
    assert int(out) == proc.pid


def test_sigterm_reaches_prepare(tmp_path):
    audio = tmp_path / "audio"
    audio.mkdir()
    rng = np.random.default_rng(0)
    for i in range(40):
        sf.write(str(audio / f"clip{i:03d}.wav"), 0.1 * rng.standard_normal(160000), 16000)
    data = tmp_path / "data"
    proc = subprocess.Popen([str(ENTRYPOINT), "prepare", "--workers", "1", "--no-progress"],
                            env=_env(tmp_path, M2DAS_AUDIO_DIR=audio, M2DAS_DATA_DIR=data),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # The lock file appears once prepare runs with its SIGTERM handler installed.
    deadline = time.monotonic() + 120
    while not (data / ".prepare.lock").exists() and proc.poll() is None:
        assert time.monotonic() < deadline, "prepare did not start"
        time.sleep(0.005)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    # Handled by prepare (its "interrupted" exit), not a shell killed by the signal.
    assert proc.returncode == 130, (proc.returncode, err)
    assert "interrupted" in err
