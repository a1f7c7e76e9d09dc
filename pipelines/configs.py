"""`mim configs`: the recipe configs `--config` takes by name, with the first line of each."""

from __future__ import annotations

import argparse
import sys

from mim.resources import recipes, shipped
from pipelines.common import reports_user_errors


def summary(name: str) -> str:
    for line in (shipped("configs") / f"{name}.yaml").read_text().splitlines():
        if line.startswith("#"):
            return line.lstrip("# ").strip()
    return ""


@reports_user_errors("mim configs")
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mim configs", description=__doc__)
    parser.add_argument("--path", action="store_true", help="print where the recipes are")
    args = parser.parse_args(argv)
    if args.path:
        print(shipped("configs"))
        return 0
    names = recipes()
    width = max(map(len, names))
    for name in names:
        print(f"{name:<{width}}  {summary(name)}")
    print(f"\n--config NAME takes any of these (the files: {shipped('configs')})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
