"""The layer rule: a module imports from its own layer or lower ones, never from a higher one
(imports inside functions included). Low to high: foundations; models and data (and what draws
them); the checkpoint format; the engine (and the recipe it derives from the config); the tasks
the engine's loop runs; what uses all of them (plan, export, the config's docs); pipelines and
benchmarks."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

# The first prefix that a module's dotted name starts with gives its layer.
LAYERS: list[tuple[int, tuple[str, ...]]] = [
    (0, ("mim.errors", "mim.runtime", "mim.distributed", "mim.files", "mim.resources", "mim.config")),
    (0, ("mim.pictures", "mim.slurm", "mim.registry", "mim.rng", "mim.__init__", "mim.__main__")),
    (1, ("mim.models", "mim.data", "mim.visualize")),
    (2, ("mim.checkpoint", "mim.meta", "mim.weights")),
    (3, ("mim.engine", "mim.recipe")),
    (4, ("mim.tasks",)),
    (5, ("mim.plan", "mim.export", "mim.model_card", "mim.config_help")),
    (6, ("pipelines", "benchmarks")),
]


def layer_of(module: str) -> int:
    for layer, prefixes in LAYERS:
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return layer
    raise AssertionError(f"{module} is in no layer: add it to LAYERS")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__" and len(parts) > 2:  # a subpackage; mim's own stays mim.__init__
        parts = parts[:-1]
    return ".".join(parts)


def imports_of(path: Path) -> set[str]:
    """The mim modules a file imports, at the top or inside functions; `from mim import x` names
    mim.x."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):  # `import mim` is the package's __init__
            found |= {
                "mim.__init__" if alias.name == "mim" else alias.name
                for alias in node.names
                if alias.name.split(".")[0] == "mim"
            }
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "mim":
                found |= {f"mim.{alias.name}" for alias in node.names}
            elif node.module.startswith("mim."):
                found.add(node.module)
    return found


def all_modules() -> list[Path]:
    return sorted(
        path
        for folder in ("mim", "pipelines", "benchmarks")
        for path in (REPO / folder).rglob("*.py")
        if "_data" not in path.parts
    )


def test_no_module_imports_from_a_higher_layer():
    upward = sorted(
        (module_name(path), imported)
        for path in all_modules()
        for imported in imports_of(path)
        if layer_of(imported) > layer_of(module_name(path))
    )
    assert not upward, f"imports from a higher layer (importer, imported): {upward}"


def test_the_rule_sees_imports_inside_functions(tmp_path):
    source = tmp_path / "example.py"
    source.write_text(
        "def f():\n    from mim.engine import portable\n    import mim.plan\nfrom mim import checkpoint\n"
    )
    assert imports_of(source) == {"mim.engine", "mim.plan", "mim.checkpoint"}
    assert layer_of("mim.engine.portable") > layer_of("mim.checkpoint") > layer_of("mim.models.mae")


MAX_FILE_LINES, MAX_FUNCTION_LINES = 400, 60


def oversized(path: Path) -> list[str]:
    """What in a file breaks the size rule: the file over MAX_FILE_LINES, a function (not `main`)
    over MAX_FUNCTION_LINES."""
    source = path.read_text()
    found = []
    if len(source.splitlines()) > MAX_FILE_LINES:
        found.append(f"{path.name}: {len(source.splitlines())} lines")
    for node in ast.walk(ast.parse(source, str(path))):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name != "main":
            length = node.end_lineno - node.lineno + 1
            if length > MAX_FUNCTION_LINES:
                found.append(f"{path.name}:{node.lineno} {node.name}: {length} lines")
    return found


def test_no_file_in_mim_is_over_400_lines_and_no_function_over_60():
    found = [item for path in sorted((REPO / "mim").rglob("*.py")) for item in oversized(path)]
    assert not found, f"split these: {found}"


def test_the_size_rule_sees_a_long_function(tmp_path):
    source = tmp_path / "long.py"
    source.write_text("def long():\n" + "    x = 1\n" * 60 + "def main():\n" + "    x = 1\n" * 80)
    assert oversized(source) == ["long.py:1 long: 61 lines"]
