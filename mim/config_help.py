"""The pages made from the config declarations (mim.config): `mim <stage> --help-config` on the
console, and docs/config.md (`python -m mim.config_help > docs/config.md`; a test keeps it in sync)."""

from __future__ import annotations

import sys

from mim.config import STAGES, KeyInfo, shown, stage_keys, stage_sections

# mim knn reads a linprobe config (so one file serves both) and uses these sections of it.
KNN_SECTIONS = ("model", "init", "data", "eval")


def allowed(info: KeyInfo) -> str:
    if info.choices is not None:
        return " | ".join(shown(c) for c in info.choices)
    return info.declared.bounds or ""


def console_page(stage: str) -> str:
    """The keys `mim <stage>` reads: name, type, default and what it allows; below, what it does."""
    keys, note = _keys_of(stage)
    rows = [(k.name, k.type, f"= {shown(k.default)}") for k in keys]
    widths = [max(len(r[i]) for r in rows) for i in range(2)]
    lines = [f"config keys of mim {stage} (set in --config FILE or as key=value){note}"]
    section = None
    for (name, type_name, default), info in zip(rows, keys, strict=True):
        head = info.name.split(".", 1)[0]
        if head != section:
            section = head
            lines += ["", f"{head}:"]
        limits = f"  ({allowed(info)})" if allowed(info) else ""
        lines.append(f"  {name.ljust(widths[0])}  {type_name.ljust(widths[1])}  {default}{limits}")
        lines.append(f"      {info.declared.doc}")
    return "\n".join(lines)


def _keys_of(stage: str) -> tuple[list[KeyInfo], str]:
    if stage == "knn":
        keys = [k for k in stage_keys("linprobe") if k.name.split(".", 1)[0] in KNN_SECTIONS]
        return (
            keys,
            ";\nmim knn reads a linprobe config: these keys of it, the others are accepted and not read",
        )
    return stage_keys(stage), ""


def markdown_page() -> str:
    lines = [
        "# Config keys",
        "",
        "Generated from the declarations in `mim/config.py` by",
        "`python -m mim.config_help > docs/config.md`;",
        "a test fails when this page and the declarations differ. `mim <stage> --help-config` prints the",
        "same table for one stage. Set a key in a YAML file (`--config`) or on the command line",
        "(`section.key=value`); a key that a stage does not read is an error in that stage.",
        "",
    ]
    for stage in STAGES:
        lines += [f"## mim {stage}", ""]
        described = dict(stage_sections(stage))
        section = None
        for info in stage_keys(stage):
            head = info.name.split(".", 1)[0]
            if head != section:
                section = head
                lines += ["", f"### `{head}`: {described[head]}", ""]
                lines += ["| key | type | default | allowed | description |", "|---|---|---|---|---|"]
            cells = [
                f"`{info.name}`",
                info.type,
                f"`{shown(info.default)}`",
                allowed(info),
                info.declared.doc,
            ]
            lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
        lines.append("")
    lines += [
        "## mim knn",
        "",
        "`mim knn` reads a linprobe config, so one file serves both: its `model`, `init`, `data` and",
        "`eval` keys, as listed under mim linprobe; the other keys are accepted and not read.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.stdout.write(markdown_page())
