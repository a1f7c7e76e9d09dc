"""Files mim ships beside its code: the recipe configs (`configs/`) and the Slurm template
(`slurm/`). In a checkout they are the repository's top-level folders; an installed wheel carries
copies inside the package (`mim/_data/`, put there by setup.py's build step), found through
importlib.resources. No stage depends on the current directory."""

from __future__ import annotations

import importlib.resources
from pathlib import Path

PACKAGED = "_data"
CHECKOUT = Path(__file__).resolve().parents[1]


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
