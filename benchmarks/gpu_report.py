"""One command for a lent GPU: one markdown report of mim's speed and memory on this machine.

    python benchmarks/gpu_report.py > report.md        # one H100/H200, under 8 minutes
    python benchmarks/gpu_report.py --smoke            # the same sections on the CPU, in seconds

Sections (each the output of the script named, so every figure has its command):
1. the step, mim against the plain loop (pretrain_step.py, eager and compiled, MFU, peak GiB):
   ViT-B at micro-batch 64 and 256, ViT-L and ViT-H at 256, ViT-g at the largest micro-batch
   the memory plan gives this device (at most 256); ZeRO 0 against 3 on one process for ViT-L
2. the memory plan against measured peaks (memory_peak.py: torch.cuda.max_memory_allocated) for
   ViT-B, ViT-L and ViT-H at micro-batch 64
3. the CLI end to end: generated JPEGs -> `mim shards` -> `mim pretrain` (ViT-B, the machine's
   cores as loader workers), its logged img/s
A section that fails prints its error and the report goes on.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from mim.models.registry import model_args  # noqa: E402
from mim.plan import GiB, Setup, largest_micro_batch  # noqa: E402

FULL = {
    "step": [
        ("mae_vit_base_patch16", [64, 256]),
        ("mae_vit_large_patch16", [256]),
        ("mae_vit_huge_patch14", [256]),
    ],
    "giant": "mae_vit_giant_patch14",
    "zero": "mae_vit_large_patch16",
    "zero_batch": 128,
    "memory": ["mae_vit_base_patch16", "mae_vit_large_patch16", "mae_vit_huge_patch14"],
    "memory_batch": 64,
    "memory_img": 224,
    "cli_model": "mae_vit_base_patch16",
    "cli_images": 4096,
    "cli_steps": 60,
    "cli_batch": 64,
    "timing": ["--steps", "10", "--rounds", "3", "--warmup", "3"],
}
SMOKE = {
    "step": [("mae_vit_debug", [8])],
    "giant": None,
    "zero": "mae_vit_debug",
    "zero_batch": 8,
    "memory": ["mae_vit_debug"],
    "memory_batch": 8,
    "memory_img": 32,
    "cli_model": "mae_vit_debug",
    "cli_images": 64,
    "cli_steps": 4,
    "cli_batch": 8,
    "timing": ["--steps", "1", "--rounds", "1", "--warmup", "1", "--compile", "off"],
}


def run(command: list[str], timeout: float, env: dict | None = None) -> str:
    started = time.monotonic()
    try:
        result = subprocess.run(
            command,
            capture_output=True,
            text=True,
            cwd=REPO,
            timeout=timeout,
            env={**os.environ, **(env or {})},
        )
    except subprocess.TimeoutExpired:
        return f"(timed out after {timeout:.0f} s: `{' '.join(command)}`)\n"
    took = time.monotonic() - started
    shown = " ".join(Path(c).name if c == sys.executable else c for c in command)
    if result.returncode != 0:
        return f"`{shown}` failed ({result.returncode}):\n\n```\n{result.stderr[-2000:]}\n```\n"
    table = [line for line in result.stdout.splitlines() if line.startswith("|") or not line.strip() == ""]
    return f"`{shown}` ({took:.0f} s)\n\n" + "\n".join(table) + "\n"


def device_line() -> str:
    import torch

    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        return f"{props.name}, {props.total_memory / GiB:.0f} GiB, torch {torch.__version__}"
    return f"CPU ({os.cpu_count()} cores, {platform.processor() or platform.machine()}), torch {torch.__version__}"


def device_memory() -> float:
    import torch

    if torch.cuda.is_available():
        return float(torch.cuda.get_device_properties(0).total_memory)
    return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def step_section(plan: dict) -> list[str]:
    python, script = sys.executable, str(REPO / "benchmarks/pretrain_step.py")
    parts = []
    for model, batches in plan["step"]:
        parts.append(
            run([python, script, "--model", model, "--batch", *map(str, batches), *plan["timing"]], 240)
        )
    if plan["giant"]:
        setup = Setup(model_args(plan["giant"]), 1, 1, 0, "bf16")
        batch = min(256, largest_micro_batch(setup, device_memory()))
        if batch > 0:
            parts.append(
                run([python, script, "--model", plan["giant"], "--batch", str(batch), *plan["timing"]], 240)
            )
        else:
            parts.append(f"{plan['giant']}: the memory plan fits no micro-batch on this device\n")
    parts.append(
        run(
            [
                python,
                script,
                "--model",
                plan["zero"],
                "--batch",
                str(plan["zero_batch"]),
                "--zero-stage",
                "0",
                "3",
                *plan["timing"],
            ],
            240,
        )
    )
    return parts


def memory_section(plan: dict) -> list[str]:
    import json

    rows = ["| model | micro-batch | measured | plan | plan / measured |", "|---|---|---|---|---|"]
    for model in plan["memory"]:
        with tempfile.TemporaryDirectory() as out:
            command = [
                sys.executable,
                str(REPO / "benchmarks/memory_peak.py"),
                out,
                model,
                str(plan["memory_img"]),
                str(plan["memory_batch"]),
                "0",
                "0",
            ]
            text = run(command, 180, env={"MALLOC_MMAP_THRESHOLD_": "65536"})
            found = sorted(Path(out).glob("rank-*.json"))
            if not found:
                rows.append(f"| {model} | {plan['memory_batch']} | failed | | |\n\n{text}")
                continue
            record = json.loads(found[0].read_text())
        rows.append(
            f"| {model} | {plan['memory_batch']} | {record['measured'] / GiB:.2f} GiB | "
            f"{record['predicted'] / GiB:.2f} GiB | {record['predicted'] / record['measured']:.3f} |"
        )
    return ["\n".join(rows) + "\n"]


def cli_section(plan: dict) -> list[str]:
    import numpy as np
    from PIL import Image

    with tempfile.TemporaryDirectory() as root:
        root = Path(root)
        generator = np.random.default_rng(0)
        for index in range(plan["cli_images"]):
            folder = root / "images" / f"class{index % 4}"
            folder.mkdir(parents=True, exist_ok=True)
            pixels = generator.integers(0, 256, (256, 256, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / f"{index}.jpg", quality=90)
        cli = [sys.executable, "-m", "pipelines.cli"]
        made = run(
            [
                *cli,
                "shards",
                "--source",
                f"imagefolder:{root / 'images'}",
                "--out",
                str(root / "shards"),
                "--name",
                "train",
                "--shard-size",
                "512",
            ],
            300,
        )
        workers = max(1, (os.cpu_count() or 2) - 2)
        args = [
            "pretrain",
            f"data.train={root / 'shards'}",
            f"run.dir={root / 'run'}",
            f"model.name={plan['cli_model']}",
            f"data.batch_size={plan['cli_batch']}",
            f"data.num_workers={workers}",
            "schedule.epochs=1000",
            f"run.stop_after={plan['cli_steps']}",
            f"log.every={max(1, plan['cli_steps'] // 4)}",
            "run.checkpoint_every=100000",
            "log.recon_every=0",
        ]
        if plan["cli_model"] == "mae_vit_debug":
            args.append("model.img_size=32")
        started = time.monotonic()
        result = subprocess.run([*cli, *args], capture_output=True, text=True, cwd=REPO, timeout=420)
        took = time.monotonic() - started
        rates = [line.split("img/s")[0].split()[-1] for line in result.stderr.splitlines() if "img/s" in line]
        summary = (
            f"`mim {' '.join(args)}`: exit {result.returncode} in {took:.0f} s, {workers} loader workers; "
            f"logged img/s: {', '.join(rates) or 'none'}\n"
        )
        if result.returncode != 0:
            summary += f"\n```\n{result.stderr[-2000:]}\n```\n"
        return [made, summary]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--smoke", action="store_true", help="tiny models, a step or two: checks the report runs"
    )
    args = parser.parse_args()
    plan = SMOKE if args.smoke else FULL
    started = time.monotonic()
    print(f"# mim GPU report\n\n{device_line()}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}\n")
    for title, section in (
        ("The step: mim against the plain loop", step_section),
        ("The memory plan against measured peaks", memory_section),
        ("The CLI end to end on generated JPEG shards", cli_section),
    ):
        print(f"## {title}\n")
        try:
            parts = section(plan)
        except Exception as error:  # a broken section must not cost the others
            parts = [f"(section failed: {error!r})\n"]
        print("\n".join(parts), flush=True)
    print(f"report took {time.monotonic() - started:.0f} s")


if __name__ == "__main__":
    main()
