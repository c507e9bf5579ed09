"""Command-line conventions: defaults and exit codes in --help, both spellings of a flag,
one-line errors, and commands that refuse instead of guessing."""

import functools
import os

from conftest import REPO, run_m2das
from m2das import config


def test_train_help_shows_defaults_and_exit_codes():
    r = run_m2das("train", "--help")
    text = " ".join(r.stdout.split())
    assert r.returncode == 0
    assert "(default: 300)" in text and "(default: m2d_as_vit_base)" in text
    for code in ("0 finished", "2 bad input", "3 diverged", "75 stopped"):
        assert code in text, code


def test_train_accepts_hyphens_and_keeps_underscores_canonical(tmp_path):
    cfg = config.parse_args(["--batch-size", "7", "--accum_iter", "3", "--output-dir", str(tmp_path / "r")])
    assert (cfg.batch_size, cfg.accum_iter, cfg.output_dir) == (7, 3, str(tmp_path / "r"))
    help_text = run_m2das("train", "--help").stdout
    assert "--batch_size BATCH_SIZE, --batch-size BATCH_SIZE" in help_text  # underscore first


def test_unknown_model_is_one_line_everywhere():
    for args in (("train", "--model", "vit_huge"), ("train", "--print_config", "--model", "vit_huge")):
        r = run_m2das(*args)
        assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
        assert "unknown model 'vit_huge'" in r.stderr and "m2d_as_vit_tiny" in r.stderr
    r = run_m2das("train", "--epoch", "3")  # not an abbreviation of --epochs
    assert r.returncode == 2 and "unrecognized arguments: --epoch" in r.stderr


def test_model_names_come_from_the_registry_without_torch():
    import sys

    from m2das.model import MODEL_SIZES

    assert config.model_names() == tuple(MODEL_SIZES)
    code = "import sys; from m2das import config; config.parse_args([]); assert 'torch' not in sys.modules"
    import subprocess
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_bench_without_a_benchmark_is_a_usage_error():
    r = run_m2das("bench")
    assert r.returncode == 2 and "usage: m2das bench" in r.stderr and r.stdout == ""


def test_demo_refuses_a_folder_it_did_not_make(tmp_path):
    mine = tmp_path / "thesis"
    mine.mkdir()
    (mine / "chapter1.tex").write_text("precious")
    r = run_m2das("demo", "--out", mine, "--clips", "4")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "not made by m2das demo" in r.stderr, r.stderr
    assert (mine / "chapter1.tex").read_text() == "precious"


HELP_COLLECTOR = """
import contextlib, io, json, sys
from m2das.cli import COMMANDS, main
from m2das.tools.bench import _benches

texts = {}
for args in [[name] for name in COMMANDS] + [["bench", b] for b in _benches()]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        try:
            code = main([*args, "--help"])
        except SystemExit as e:
            code = e.code
    texts[" ".join(args)] = [code or 0, out.getvalue()]
json.dump(texts, sys.__stdout__)
"""


@functools.lru_cache(maxsize=None)
def every_help_text() -> dict:
    """Every command's --help and each benchmark's, one line per help text, read once for the tests below.
    One real process runs the CLI's main for each (the same text as `m2das CMD --help`, which
    tests/test_cli_usage.py runs as separate processes) instead of one process per command."""
    import json
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-c", HELP_COLLECTOR], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "COLUMNS": "400"}, cwd=REPO)
    assert r.returncode == 0, r.stderr
    texts = {}
    for joined, (code, text) in json.loads(r.stdout).items():
        assert code == 0, (joined, text)
        texts[tuple(joined.split(" "))] = text
    assert len(texts) >= 15, sorted(texts)
    return texts


def test_no_help_text_states_a_default_twice():
    """Every command's --help (and each benchmark's): a help string that spells its default must not
    also get the formatter's "(default: X)", and "(default: None)" says nothing."""
    import re

    stated = re.compile(r"\(default\b|\bdefault:")
    for args, text in every_help_text().items():
        for line in text.splitlines():
            assert len(stated.findall(line)) < 2, f"m2das {' '.join(args)} --help: {line.strip()}"
            assert "(default: None)" not in line, f"m2das {' '.join(args)} --help: {line.strip()}"


def test_every_flag_of_every_command_takes_both_spellings():
    """--batch_size and --batch-size, --stats-files and --stats_files: whichever a user types works,
    with every command and benchmark (the options listed in each --help, both spellings side by side)."""
    import re

    option = re.compile(r"^\s+(-\S+(?: \S+)?(?:, -\S+(?: \S+)?)*)\s{2,}|^\s+(-\S+(?: \S+)?(?:, -\S+(?: \S+)?)*)$")
    lacking = []
    for args, text in every_help_text().items():
        for line in text.splitlines():
            m = option.match(line)
            if not m:
                continue
            names = {tok.split(" ")[0] for tok in (m.group(1) or m.group(2)).split(", ")}
            for name in names:
                body = name[2:]
                if name.startswith("--") and body[:1].isalnum() and ("_" in body or "-" in body):
                    other = "--" + (body.replace("_", "-") if "_" in body else body.replace("-", "_"))
                    if other not in names:
                        lacking.append(f"m2das {' '.join(args)}: {name}")
    assert not lacking, lacking
