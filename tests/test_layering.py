"""Imports point one way: cli -> launch -> runners (train/, pipeline/) -> stage -> model, with data, tracking,
storage and seeding beside them, each depending only downward. Checked over every import in the package,
function-level ones included."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "vgim_dist"

# Each unit (a module or subpackage; the longest matching name wins) and the units it may import.
BASE = {"config", "data.config", "layout", "run_dir", "storage", "seeding", "ray_session", "ray_private", "errors",
        "progress"}
ALLOWED = {
    "__init__": {"downstream"},     # the package's own __init__: vgim_dist.load_encoder
    "__main__": {"cli"},
    "downstream": {"train", "model", *BASE},
    "cli": {"launch", "sweep", "plan", "train", "pipeline", "eval", "tracking", "data", "model", "encode",
            "sequential", *BASE},
    "sequential": {"launch", "encode", "tracking", *BASE},
    "encode": {"downstream", "train", "data", "model", *BASE},
    # a sweep's trials are launches; its report reads their evaluations
    "sweep": {"launch", "train", "eval", "tracking", *BASE},
    # eval: probes while training
    "launch": {"plan", "train", "pipeline", "eval", "tracking", "data", "model", "parallel", *BASE},
    "plan": {"train", "data", "model", *BASE},
    "eval": {"train", "tracking", "data", "model", *BASE},
    "pipeline": {"train", "tracking", "data", "model", "parallel", *BASE},
    "train": {"tracking", "data", "model", "parallel", *BASE},
    "model": {"parallel", *BASE},
    "parallel": {"config"},
    "tracking": {"config", "run_dir", "storage", "errors"},
    "data": {"data.config", "storage", "seeding", "ray_session", "config", "errors", "progress"},
    "config": set(),
    "layout": {"config"},
    "errors": set(),
    "progress": set(),
    "data.config": {"config"},
    "storage": set(),
    "run_dir": {"storage"},
    "seeding": set(),
    "ray_session": {"ray_private"},
    "ray_private": set(),
}


def unit(module: str) -> str:
    name = module.removeprefix("vgim_dist.").removesuffix(".__init__")
    matches = [u for u in ALLOWED if name == u or name.startswith(u + ".")]
    assert matches, f"vgim_dist.{name} belongs to no unit: add it to ALLOWED in {__file__}"
    return max(matches, key=len)


def imports() -> list[tuple[str, str, int]]:
    """(importing module, imported vgim_dist module, line) for every import in the package."""
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        module = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = ([node.module] if isinstance(node, ast.ImportFrom) and node.module and not node.level
                     else [a.name for a in node.names] if isinstance(node, ast.Import) else [])
            found += [(module, n, node.lineno) for n in names if n.startswith("vgim_dist.")]
    return found


def test_imports_follow_the_layer_table():
    wrong = [f"{src}:{line} imports {dst}" for src, dst, line in imports()
             if unit(dst) != unit(src) and unit(dst) not in ALLOWED[unit(src)]]
    assert not wrong, "imports against the layer table:\n" + "\n".join(wrong)


def test_no_import_cycles_between_modules():
    graph: dict[str, set[str]] = {}
    for src, dst, _ in imports():
        graph.setdefault(src.removesuffix(".__init__"), set()).add(dst)
    done: set[str] = set()

    def visit(node: str, path: list[str]) -> None:
        if node in path:
            raise AssertionError("import cycle: " + " -> ".join(path[path.index(node):] + [node]))
        if node in done:
            return
        for nxt in graph.get(node, ()):
            visit(nxt, [*path, node])
        done.add(node)

    for node in graph:
        visit(node, [])


def test_the_table_catches_a_backward_import():
    assert unit("vgim_dist.tracking.tracker") == "tracking" and "train" not in ALLOWED["tracking"]
    assert unit("vgim_dist.data.config") == "data.config" and unit("vgim_dist.data.loader") == "data"
