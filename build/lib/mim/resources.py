"""Files mim ships beside its code: the recipe configs (`configs/`) and the Slurm template
(`slurm/`). In a checkout they are the repository's top-level folders; an installed wheel carries
copies inside the package (`mim/_data/`, put there by setup.py's build step), found through
importlib.resources. No stage depends on the current directory."""

from __future__ import annotations

import difflib
import importlib.resources
from pathlib import Path

from mim.errors import UserInputError

PACKAGED = "_data"
CHECKOUT = Path(__file__).resolve().parents[1]
RECIPE_PREFIX = "configs/"


def shipped(name: str) -> Path:
    """The folder `name` (configs, slurm) of this installation."""
    packaged = Path(str(importlib.resources.files("mim").joinpath(PACKAGED, name)))
    for folder in (packaged, CHECKOUT / name):
        if folder.is_dir():
            return folder
    raise FileNotFoundError(f"mim's {name}/ folder is neither in the package ({packaged}) nor in a checkout")


def recipes() -> list[str]:
    """The recipe names `--config` takes, e.g. pretrain/mae_vit_base_p16."""
    root = shipped("configs")
    return sorted(str(path.relative_to(root).with_suffix("")) for path in root.rglob("*.yaml"))


def config_path(spec: str | Path) -> Path:
    """`--config`: a YAML file, else a recipe name (`pretrain/mae_vit_base_p16`, with or without
    `.yaml`, with or without a leading `configs/`, so the README's commands work from anywhere)."""
    path = Path(spec)
    if path.is_file():
        return path
    if path.is_dir():
        raise UserInputError(f"config file {spec} does not exist or is not a file (a directory)")
    name = str(spec).removeprefix(RECIPE_PREFIX).removesuffix(".yaml")
    recipe = shipped("configs") / f"{name}.yaml"
    if recipe.is_file():
        return recipe
    close = difflib.get_close_matches(name, recipes(), n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else "; `mim configs` lists the recipes"
    raise UserInputError(f"config file {spec} does not exist or is not a file, nor a recipe name{hint}")
