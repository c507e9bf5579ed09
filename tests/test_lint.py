"""shellcheck on the repository's shell scripts, hadolint on the Dockerfile.

A missing linter skips its test with the reason, unless M2DAS_REQUIRE_LINT=1
(set by .ci/run, which installs both) makes it a failure, so CI cannot pass
without linting. hadolint is looked up on PATH, then in M2DAS_LINT_TOOLS and
the tool folder .ci/run installs it into.
"""

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SKIP_DIRS = {".git", ".venv", "node_modules", "build", "demo_out", "runs", "__pycache__"}


def _tool(name):
    folders = [os.environ.get("M2DAS_LINT_TOOLS", ""),
               str(Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "m2das-tools" / "bin")]
    found = shutil.which(name) or shutil.which(name, path=os.pathsep.join(f for f in folders if f))
    if found:
        return found
    reason = f"{name} not found on PATH or in {folders}; .ci/run installs it"
    if os.environ.get("M2DAS_REQUIRE_LINT") == "1":
        pytest.fail(f"{reason} (M2DAS_REQUIRE_LINT=1)")
    pytest.skip(reason)


def _files(pattern):
    out = []
    for root, dirs, files in os.walk(REPO):
        dirs[:] = [d for d in dirs if d not in SKIP_DIRS]
        out += [Path(root) / f for f in files if Path(f).match(pattern)]
    return sorted(out)


def shell_scripts():
    return _files("*.sh") + [REPO / ".ci" / "run"]


def test_files_are_found():
    # Guards against a walk that silently lints nothing.
    scripts = shell_scripts()
    assert REPO / "docker" / "entrypoint.sh" in scripts
    assert REPO / "docker" / "build-local.sh" in scripts
    assert REPO / "Dockerfile" in _files("Dockerfile*")


@pytest.mark.parametrize("script", shell_scripts(), ids=lambda p: str(p.relative_to(REPO)))
def test_shellcheck(script):
    shellcheck = _tool("shellcheck")
    r = subprocess.run([shellcheck, "--external-sources", "--format=gcc", str(script)],
                       cwd=script.parent, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.parametrize("dockerfile", _files("Dockerfile*"), ids=lambda p: str(p.relative_to(REPO)))
def test_hadolint(dockerfile):
    hadolint = _tool("hadolint")
    r = subprocess.run([hadolint, "--no-color", str(dockerfile)], cwd=REPO,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


# The linters as invoked above do report findings (not a no-op binary or flags).
def test_shellcheck_reports_problems(tmp_path):
    bad = tmp_path / "bad.sh"
    bad.write_text("#!/bin/sh\nrm -rf $1/*\n")
    r = subprocess.run([_tool("shellcheck"), "--format=gcc", str(bad)], capture_output=True, text=True)
    assert r.returncode != 0 and "SC2086" in r.stdout, r.stdout + r.stderr


def test_hadolint_reports_problems(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM debian\nRUN apt-get install curl\n")
    r = subprocess.run([_tool("hadolint"), "--no-color", str(bad)], capture_output=True, text=True)
    assert r.returncode != 0 and "DL3006" in r.stdout, r.stdout + r.stderr


# ---- Dockerfile and .dockerignore agree with each other and with the entry point


def _dockerfile_instructions():
    text = (REPO / "Dockerfile").read_text().replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def _ignored(rel, patterns):
    """Docker's rule: the last pattern matching the path or one of its parents decides."""
    parts = rel.split("/")
    candidates = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        body = pattern[1:] if negate else pattern
        body = body.strip("/")
        regex = "".join(".*" if tok == "**" else "[^/]*" if tok == "*" else "[^/]" if tok == "?"
                        else re.escape(tok) for tok in re.split(r"(\*\*|\*|\?)", body) if tok)
        if any(re.fullmatch(regex, c) for c in candidates):
            ignored = not negate
    return ignored


def test_dockerignore_keeps_what_the_dockerfile_copies():
    patterns = [p.strip() for p in (REPO / ".dockerignore").read_text().splitlines()
                if p.strip() and not p.strip().startswith("#")]
    copies = [rest.split()[:-1] for word, rest in _dockerfile_instructions() if word == "COPY"]
    sources = [s for srcs in copies for s in srcs if not s.startswith("--")]
    assert sources, "no COPY found"
    for src in sources:
        path = REPO / src
        assert path.exists(), f"COPY {src}: not in the repository"
        files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()
                                               and "__pycache__" not in p.parts]
        assert files, f"COPY {src}: empty"
        for f in files:
            rel = f.relative_to(REPO).as_posix()
            assert not _ignored(rel, patterns), f".dockerignore drops {rel}, which COPY {src} needs"
    # Large or private things stay out of the build context.
    for rel in (".venv/bin/python", ".git/HEAD", "tests/test_lint.py", "runs/x/last.pth",
                "m2das/__pycache__/cli.cpython-311.pyc"):
        assert _ignored(rel, patterns), f".dockerignore lets {rel} into the build context"


def test_dockerfile_matches_the_entrypoint():
    ins = _dockerfile_instructions()
    env = {}
    for word, rest in ins:
        if word == "ENV":
            env.update(re.findall(r"(\w+)=(\S+)", rest))
    volumes = json.loads(next(rest for word, rest in ins if word == "VOLUME"))
    dirs = [env[f"M2DAS_{name}_DIR"] for name in ("AUDIO", "DATA", "RUNS", "METADATA")]
    assert sorted(volumes) == sorted(dirs)
    entrypoint = json.loads(next(rest for word, rest in ins if word == "ENTRYPOINT"))
    copied = {rest.split()[-1] for word, rest in ins if word == "COPY"}
    assert entrypoint[-1] in copied, "ENTRYPOINT script is not the copied docker/entrypoint.sh"
    assert f"{env['M2DAS_LAUNCH_DIR']}" in copied, "M2DAS_LAUNCH_DIR is not where launch/ is copied"
    # The same defaults in the entry point itself, for runs without the image's ENV (pyxis, tests).
    script = (REPO / "docker" / "entrypoint.sh").read_text()
    for name, value in env.items():
        if name.startswith("M2DAS_"):
            assert f"${{{name}:-{value}}}" in script, f"{name} default differs from the Dockerfile's"


def test_apptainer_definition_runs_the_image_entrypoint():
    text = (REPO / "docker" / "m2das.def").read_text()
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
    header = dict(line.split(":", 1) for line in lines[:2])
    assert {k.strip(): v.strip() for k, v in header.items()} == {"Bootstrap": "docker-daemon",
                                                                  "From": "m2das:latest"}
    sections = re.findall(r"^%(\w+)", text, re.M)
    assert set(sections) <= {"labels", "help", "runscript", "test", "environment", "post", "files"}
    runscript = text.split("%runscript", 1)[1].split("\n%", 1)[0]
    entrypoint = json.loads(next(rest for word, rest in _dockerfile_instructions() if word == "ENTRYPOINT"))
    assert f'exec {entrypoint[-1]} "$@"' in runscript
