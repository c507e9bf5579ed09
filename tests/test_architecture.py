"""The layout's rules (docs/architecture.md), read from the code's own imports, function-local ones included:
who may import whom, no cycles between modules, no oversized rooms."""

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "m2das"
WINGS = ("data", "cluster", "downstream", "tools")
# What each part may import of the package's other parts ("core" = the modules at the top).
ALLOWED = {
    "core": {"core", "data"},
    "data": {"core", "data"},
    "cluster": {"core", "cluster"},
    "downstream": {"core", "data", "downstream"},
    "tools": {"core", "data", "downstream", "tools"},
}
ENTRY_POINTS = {"m2das", "m2das.__main__", "m2das.cli"}  # name commands and the public API lazily
# The launcher runs two kinds of job: it checks `m2das finetune`'s flags with its torch-free parser on the
# login node and calls its main in the job, as it does for `m2das train` in the core.
EXCEPTIONS = {("m2das.cluster.plan", "m2das.downstream.ft_config"),
              ("m2das.cluster.slurm", "m2das.downstream.finetune"),
              ("m2das.cluster.local", "m2das.downstream.finetune")}
MAX_LINES = 600


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def part_of(module: str) -> str:
    pieces = module.split(".")
    return pieces[1] if len(pieces) > 2 and pieces[1] in WINGS else \
        (pieces[1] if len(pieces) == 2 and pieces[1] in WINGS else "core")


def imports_of(path: Path) -> set:
    """Every m2das module `path` imports, wherever in the file the import is."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("m2das")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("m2das"):
            for a in node.names:  # `from m2das.data import audio` imports the module m2das.data.audio
                sub = f"{node.module}.{a.name}"
                found.add(sub if (REPO / (sub.replace(".", "/") + ".py")).exists() else node.module)
    return found


def graph() -> dict:
    return {module_name(p): imports_of(p) for p in PACKAGE.rglob("*.py")}


def test_each_part_imports_only_what_the_layout_allows():
    wrong = []
    for module, targets in graph().items():
        if module in ENTRY_POINTS:
            continue
        here = part_of(module)
        for target in targets:
            if target != "m2das" and part_of(target) not in ALLOWED[here] and (module, target) not in EXCEPTIONS:
                wrong.append(f"{module} ({here}) imports {target} ({part_of(target)})")
    assert not wrong, "\n".join(sorted(wrong))


def test_the_rule_itself_catches_an_upward_import(tmp_path):
    source = tmp_path / "probe.py"
    source.write_text("def f():\n    from m2das.downstream.encoder import load_encoder\n")
    assert "m2das.downstream.encoder" in imports_of(source)
    assert part_of("m2das.downstream.encoder") not in ALLOWED["core"]
    assert part_of("m2das.train") == "core" and part_of("m2das.data.audio") == "data"


def test_no_module_imports_itself_back():
    edges = graph()
    cycles = []

    def visit(node, stack, done):
        if node in stack:
            cycles.append(" -> ".join(stack[stack.index(node):] + [node]))
            return
        if node in done:
            return
        done.add(node)
        for nxt in sorted(edges.get(node, ())):
            if nxt in edges and nxt not in ENTRY_POINTS and nxt != node:
                visit(nxt, stack + [node], done)

    done: set = set()
    for start in sorted(edges):
        if start not in ENTRY_POINTS:
            visit(start, [], done)
    assert not cycles, "\n".join(cycles)


def test_no_room_is_oversized():
    big = {str(p.relative_to(REPO)): n for p in PACKAGE.rglob("*.py")
           if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not big, big


def test_the_launcher_entry_point_is_thin():
    lines = [line for line in (REPO / "launch" / "submit.py").read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    assert len(lines) <= 4 and "m2das.cluster.submit" in "".join(lines)
