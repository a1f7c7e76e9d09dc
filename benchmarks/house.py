"""The shape of the house, for a checkout of mim: files and lines per layer (the layers of that
checkout's tests/unit/test_layers.py), the largest files, files over 400 lines, imports from a
higher layer, and the lines that dispatch on a stage or target-kind name (a comparison with one
of the built-in names). Compare two checkouts side by side:

    python benchmarks/house.py                       # this checkout
    git worktree add /tmp/before COMMIT && python benchmarks/house.py /tmp/before
"""

from __future__ import annotations

import argparse
import collections
import importlib.util
import re
from pathlib import Path

NAMES = "pretrain|linprobe|finetune|pixels|hog|teacher|ema"
DISPATCH = re.compile(
    rf"""(stage|kind|\["stage"\])\s*(==|!=|in)\s*\(?["']({NAMES})["']|["']({NAMES})["']\s*(==|!=)\s*[\w.]*(stage|kind)"""
)


def layer_rule(root: Path):
    """That checkout's own layer rule (tests/unit/test_layers.py)."""
    spec = importlib.util.spec_from_file_location("layer_rule", root / "tests/unit/test_layers.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.REPO = root
    return module


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "root", nargs="?", default=str(Path(__file__).resolve().parents[1]), help="a checkout"
    )
    root = Path(parser.parse_args().root).resolve()
    rule = layer_rule(root)
    files = sorted(p for p in (root / "mim").rglob("*.py") if "_data" not in p.parts)
    lines = {p: len(p.read_text().splitlines()) for p in files}
    per_layer: dict[int, list[int]] = collections.defaultdict(lambda: [0, 0])
    for path in files:
        layer = rule.layer_of(rule.module_name(path))
        per_layer[layer][0] += 1
        per_layer[layer][1] += lines[path]
    upward = [
        (rule.module_name(path), imported)
        for path in rule.all_modules()
        for imported in rule.imports_of(path)
        if rule.layer_of(imported) > rule.layer_of(rule.module_name(path))
    ]
    dispatches = [
        f"{path.relative_to(root)}:{number}"
        for path in files + sorted((root / "pipelines").rglob("*.py"))
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if DISPATCH.search(line)
        and not re.match(r"\s*for \w+ in", line)  # iterating over names is no dispatch
    ]
    largest = sorted(files, key=lambda p: -lines[p])
    print(f"checkout: {root}")
    print("| what | value |")
    print("|---|---|")
    print(f"| files in mim/ (lines) | {len(files)} ({sum(lines.values())}) |")
    layers = "; ".join(f"{layer}: {count} ({total})" for layer, (count, total) in sorted(per_layer.items()))
    print(f"| per layer: files (lines) | {layers} |")
    print(f"| largest files | {', '.join(f'{p.relative_to(root)} {lines[p]}' for p in largest[:3])} |")
    print(f"| files over 400 lines | {sum(1 for p in files if lines[p] > 400)} |")
    print(f"| imports from a higher layer | {len(upward)} |")
    print(f"| lines comparing a stage or target-kind name | {len(dispatches)} |")
    for where in dispatches:
        print(f"  {where}")


if __name__ == "__main__":
    main()
