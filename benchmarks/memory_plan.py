"""`mim plan` against what processes really hold, and the plan for the large models.

    python benchmarks/memory_plan.py --validate [--model mae_vit_small_patch16 --img-size 224
        --batch 16]   one and two processes, ZeRO 0-3, activation checkpointing off and on:
                      each rank's measured peak (benchmarks/memory_peak.py) beside the plan
    python benchmarks/memory_plan.py --fit [--device-memory 80GB]
                      the registered sizes on 8, 64 and 256 devices: the ZeRO stage auto picks
                      and the largest micro-batch without and with checkpointing (bf16, the plan)

Prints markdown tables. The measured peak is what torch's allocator held at once (on the CPU
counted from the profiler's allocation records, on a GPU torch.cuda.max_memory_allocated; see
memory_peak.py), with the process's resident peak beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from mim.engine.deepspeed_engine import choose_zero_stage  # noqa: E402
from mim.models.registry import model_args  # noqa: E402
from mim.plan import GiB, Setup, largest_micro_batch, parse_bytes, plan  # noqa: E402

CASES = [(1, 0, 0), (1, 0, 1), (2, 0, 0), (2, 1, 0), (2, 2, 0), (2, 3, 0), (2, 3, 1)]  # procs, ZeRO, ckpt
FIT_MODELS = [
    "mae_vit_base_patch16",
    "mae_vit_large_patch16",
    "mae_vit_huge_patch14",
    "mae_vit_giant_patch14",
    "mae_vit_1b_patch14",
    "mae_vit_2b_patch14",
    "mae_vit_3b_patch14",
    "mae_vit_5b_patch14",
    "mae_vit_7b_patch14",
]


def measure(model: str, img_size: int, batch: int, procs: int, stage: int, every: int) -> list[dict]:
    """Each rank's {"rank", "measured", "predicted"} from memory_peak.py."""
    launch = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")  # the children's own
    env = {k: v for k, v in os.environ.items() if k not in launch}
    env.update(MALLOC_MMAP_THRESHOLD_="65536")
    env.setdefault("DS_ACCELERATOR", "cpu")
    with tempfile.TemporaryDirectory() as out:
        args = [
            str(REPO / "benchmarks/memory_peak.py"),
            out,
            model,
            str(img_size),
            str(batch),
            str(stage),
            str(every),
        ]
        command = [sys.executable, *args]
        if procs > 1:
            command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(procs), *args]
        result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO, timeout=900)
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")
        return [json.loads(path.read_text()) for path in sorted(Path(out).glob("rank-*.json"))]


def validate(args) -> None:
    print(f"{args.model} at {args.img_size}px, micro-batch {args.batch}, 3 steps (AdamW)\n")
    print(
        "| processes | ZeRO | checkpointing | rank | allocated (peak) | plan | plan / allocated | resident (peak) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    cases = [tuple(map(int, c.split(":"))) for c in args.cases.split(",")] if args.cases else CASES
    for procs, stage, every in cases:
        for row in measure(args.model, args.img_size, args.batch, procs, stage, every):
            print(
                f"| {procs} | {stage} | {every or 'off'} | {row['rank']} | {row['measured'] / GiB:.3f} GiB "
                f"| {row['predicted'] / GiB:.3f} GiB | {row['predicted'] / row['measured']:.3f} "
                f"| {row['resident'] / GiB:.3f} GiB |"
            )


def fit_cell(model: str, devices: int, memory: float) -> str:
    """The stage `deepspeed.zero_stage=auto` picks, and the largest micro-batch that fits there
    without and with activation checkpointing of every block."""
    arch = model_args(model)
    setup = Setup(arch, 1, devices, 0, "bf16")
    stage = choose_zero_stage(plan(setup).num_params, devices, int(memory))
    plain = largest_micro_batch(replace(setup, zero_stage=stage), memory)
    checkpointed = largest_micro_batch(replace(setup, zero_stage=stage, grad_checkpointing=1), memory)
    return f"ZeRO {stage}: {plain} ({checkpointed})"


def fit(args) -> None:
    memory = parse_bytes(args.device_memory)
    counts = (8, 64, 256)
    print(
        f"bf16 autocast, AdamW, 224 px, mask 0.75, devices of {args.device_memory}: the ZeRO stage "
        "deepspeed.zero_stage=auto picks, and the largest micro-batch per device that fits "
        "(with activation checkpointing of every block)\n"
    )
    print("| model | parameters | " + " | ".join(f"{n} devices" for n in counts) + " |")
    print("|---|---|" + "---|" * len(counts))
    from mim.plan import _param_counts

    for model in FIT_MODELS:
        trained, frozen, _ = _param_counts(Setup(model_args(model), 1, 1, 0))
        cells = [fit_cell(model, n, memory) for n in counts]
        print(f"| {model} | {(trained + frozen) / 1e9:.2f}B | " + " | ".join(cells) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--validate", action="store_true")
    parser.add_argument("--fit", action="store_true")
    parser.add_argument("--model", default="mae_vit_small_patch16")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--device-memory", default="80GB")
    parser.add_argument("--cases", help="only these cases, e.g. 2:3:0,2:3:1 (processes:ZeRO:checkpointing)")
    args = parser.parse_args()
    if args.validate:
        validate(args)
    if args.fit or not args.validate:
        fit(args)


if __name__ == "__main__":
    main()
