"""The data-folder contract: each name written once, in m2das/datafolder.py, and readable from a shell."""

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

from m2das import datafolder, runfolder

PACKAGE = Path(__file__).resolve().parent.parent / "m2das"


def _docstrings(tree) -> set:
    nodes = [tree] + [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))]
    return {id(n.body[0].value) for n in nodes
            if n.body and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}


def _record_fields(tree) -> set:
    """Dict keys and subscripts (`d["packed"]`): names of record fields, not of files."""
    found = set()
    for n in ast.walk(tree):
        if isinstance(n, ast.Dict):
            found |= {id(k) for k in n.keys if k is not None}
        elif isinstance(n, ast.Subscript):
            found.add(id(n.slice))
    return found


def _path_parts(tree) -> set:
    """Constants that name a path: an operand of `/`, an argument of a call (os.path.join, Path), or
    the value of an assignment (`LMS_DIR = "audioset_lms"`)."""
    found = set()
    for n in ast.walk(tree):
        if isinstance(n, (ast.Assign, ast.AnnAssign)) and n.value is not None:
            found.add(id(n.value))
        elif isinstance(n, ast.BinOp) and isinstance(n.op, ast.Div):
            found |= {id(n.left), id(n.right)}
        elif isinstance(n, ast.Call):
            found |= {id(a) for a in n.args}
    return found


def literals(path: Path) -> list[tuple[str, bool]]:
    """(text, used as a path part) for the string constants of a module, f-string parts included;
    docstrings and record fields left out."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skip, parts = _docstrings(tree) | _record_fields(tree), _path_parts(tree)
    return [(n.value, id(n) in parts) for n in ast.walk(tree)
            if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in skip]


def names_file(literal: tuple[str, bool], name: str) -> bool:
    """Whether a literal spells the name: a file name anywhere (not inside a longer name); a folder
    name next to a slash, or alone where a path is joined. A flag or a word is not a folder."""
    text, path_part = literal
    if "." in name:
        return re.search(rf"(?<![\w.-]){re.escape(name)}(?![\w-])", text) is not None
    if text == name:
        return path_part
    return re.search(rf"/{re.escape(name)}(?![\w.-])|(?<![\w.-]){re.escape(name)}/", text) is not None


# Folders of the same name that are not the data folder's: the demo's own AudioSet-layout corpus
# (AUDIO/, METADATA/), and the downstream datasets' layouts as their publishers ship them.
NOT_DATA_FOLDER = {("metadata", "tools/demo.py"), ("metadata", "downstream/tasks.py")}


@pytest.mark.parametrize("name", datafolder.NAMES)
def test_every_data_folder_name_is_written_once(name):
    where = sorted(str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py")
                   if any(names_file(text, name) for text in literals(p)))
    where = [w for w in where if (name, w) not in NOT_DATA_FOLDER]
    home = "runfolder.py" if name == runfolder.NORM_STATS else "datafolder.py"
    assert where == [home], f"{name!r} is spelled in {where}; import it from m2das.{home[:-3]}"


def test_the_check_sees_a_literal_in_an_fstring_and_a_path(tmp_path):
    module = tmp_path / "m.py"
    module.write_text('"""Docstrings may say files_as_weighted.csv."""\n'
                      'x = {"packed": 1}["packed"]\n'
                      'help = f"default DATA_DIR/files_as_weighted.csv, {x}"\n'
                      'folder = "data/packed/"\n')
    texts = literals(module)
    assert any(names_file(t, datafolder.WEIGHTED_LIST) for t in texts)  # the f-string, not the docstring
    assert [t for t, _ in texts if names_file((t, _), datafolder.PACKED_DIR)] == ["data/packed/"]
    assert names_file(("(default DATA/metadata)", False), datafolder.METADATA_DIR)
    assert not names_file(("packed folder (default", False), datafolder.PACKED_DIR)  # a word
    assert names_file(("metadata", True), datafolder.METADATA_DIR)  # data_dir / "metadata"
    assert not names_file(("metadata", False), datafolder.METADATA_DIR)  # a flag's or a field's name
    assert not names_file(("--metadata-url", False), datafolder.METADATA_DIR)
    assert not names_file(("old_files_as_weighted.csv", False), datafolder.WEIGHTED_LIST)


def test_a_shell_script_reads_a_name():
    run = subprocess.run([sys.executable, "-m", "m2das.datafolder", "WEIGHTED_LIST"], capture_output=True, text=True)
    assert (run.returncode, run.stdout) == (0, "files_as_weighted.csv\n")
    run = subprocess.run([sys.executable, "-m", "m2das.datafolder", "NO_SUCH"], capture_output=True, text=True)
    assert run.returncode == runfolder.EXIT_BAD_INPUT and run.stderr.count("\n") == 1


def test_the_contract_imports_neither_torch_nor_numpy():
    code = "import sys, m2das.datafolder; sys.exit(bool({'torch', 'numpy'} & set(sys.modules)))"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
