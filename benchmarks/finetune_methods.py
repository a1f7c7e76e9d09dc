"""Parameter-efficient fine-tuning against the linear probe and full fine-tuning.

quality: on the demo's MAE backbone (a `mim demo` run dir: its pretrain run and shards), with all
of Fashion-MNIST's training labels and with 10 % of them (the first 3 of 30 shards, the epochs
scaled so that every run sees the same number of images): the demo's linear probe, then
`mim finetune` with each finetune.method and the demo's fine-tuning recipe (same epochs, batch,
lr, layer decay), and LoRA at rank 4 with its own lr. A finished run is read, not rerun. Top-1 on
the test split (chosen on the held-out 10 % of data.train), trainable
percent and the run's resident peak, from each run's metrics.json (step times: `cost`, below;
the demo model is too small for the methods' cost to show).

    python benchmarks/finetune_methods.py quality --demo runs/demo --out runs/peft-bench

cost: ViT-B/16 at 224 px, batch 8, fp32, through mim's engine (ZeRO 0) on this machine: each
method's peak of the bytes torch's allocator holds from the model's build through two steps
(profiler on the CPU, max_memory_allocated on a GPU), then step times measured interleaved, the
methods taking turns on the same input.

    python benchmarks/finetune_methods.py cost [--rounds 3]
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from memory_peak import allocated_peak
from torch.profiler import ProfilerActivity, profile

from mim.config import FinetuneMethodConfig
from mim.distributed import init_distributed, read_dist_env
from mim.engine.deepspeed_engine import EngineSettings, build_engine
from mim.engine.optim import param_groups
from mim.engine.step import StepRunner
from mim.models.arch import ARCH_KEYS
from mim.models.backbone import create_vit
from mim.models.finetuning import method_of, trainable_share
from mim.models.registry import model_args

METHODS = ("full", "lora", "adapter", "prompt", "last_blocks")
ALL_EPOCHS = 2  # the demo's fine-tuning budget; 10 % of the labels get ten times the epochs
LORA_TUNED = ("finetune.method=lora", "finetune.lora_rank=4", "optim.blr=1e-2")


def _stage(*args: str) -> None:
    command = [sys.executable, "-m", "mim", *args]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")


def quality(demo: Path, out: Path) -> None:
    shards = demo / "shards"
    labels = {"100 %": str(shards / "train"), "10 %": str(shards / "train" / "train-{000000..000002}.tar")}
    rows = []
    for fraction, train in labels.items():
        epochs = ALL_EPOCHS * (1 if fraction == "100 %" else 10)
        common = (
            f"data.train={train}",
            f"data.val={shards / 'test'}",
            f"init.from={demo / 'pretrain'}",
            "model.num_classes=10",  # a subset of the shards has no _info.json of its own
        )
        runs = {"linear probe": ("linprobe", "demo/linprobe.yaml", ())}
        for method in METHODS:
            runs[method] = ("finetune", "demo/finetune.yaml", (f"finetune.method={method}",))
        # LoRA with its own lr: 1e-2 (chosen on the held-out share over the recipe's 3e-3) and a
        # rank that trains under 5 % of this 128-wide model
        runs["lora r4 blr 1e-2"] = ("finetune", "demo/finetune.yaml", LORA_TUNED)
        for name, (stage, config, extra) in runs.items():
            run_dir = out / f"{fraction.split()[0]}-{name.replace(' ', '_')}"
            if stage == "finetune":
                extra += (f"schedule.epochs={epochs}", f"eval.every_epochs={epochs / 4:g}")
            metrics_file = run_dir / "metrics.json"
            if not (metrics_file.is_file() and "test" in json.loads(metrics_file.read_text())):
                _stage(stage, "--config", config, *common, f"run.dir={run_dir}", *extra)
            metrics = json.loads(metrics_file.read_text())
            share, cost = metrics.get("finetune", {}), metrics.get("cost", {})
            rows.append(
                (
                    fraction,
                    name,
                    metrics["test"]["top1"],
                    metrics["test"]["selection_top1"],
                    share.get("trainable_percent"),
                    cost.get("peak_memory_gib", float("nan")),
                )
            )
            print(f"{fraction} {name}: top-1 {metrics['test']['top1']:.2f}", flush=True)
    print("\n| labels | method | test top-1 | chosen on (held-out top-1) | trained % | resident peak (GiB) |")
    print("|---|---|---|---|---|---|")
    for fraction, name, top1, selection, percent, peak in rows:
        shown = f"{percent:.2f}" if percent is not None else "heads only"
        print(f"| {fraction} | {name} | {top1:.2f} | {selection:.2f} | {shown} | {peak:.2f} |")


def _engine(method: str, batch: int, device: torch.device):
    arch = {key: model_args("mae_vit_base_patch16")[key] for key in ARCH_KEYS}
    torch.manual_seed(0)
    model = create_vit(arch, num_classes=1000, global_pool="avg", fc_norm=True).to(device)
    method_of(FinetuneMethodConfig(method=method)).apply(model)
    settings = EngineSettings(
        micro_batch_size=batch, accum_steps=1, world_size=1, zero_stage=0, precision="fp32", grad_clip=None
    )
    engine = build_engine(model, param_groups(model, 0.05, 0.65, arch["depth"]), settings)
    return engine, StepRunner(engine, settings, device), trainable_share(model)


def _step(engine, runner, images, labels, step: int) -> None:
    runner.run(step, 1e-4, lambda micro: F.cross_entropy(engine(images), labels))


def cost(rounds: int, batch: int) -> None:
    device = init_distributed(read_dist_env({}))
    cuda = device.type == "cuda"
    images = torch.randn(batch, 3, 224, 224, device=device)
    labels = torch.randint(0, 1000, (batch,), device=device)
    peaks, shares = {}, {}
    for method in METHODS:  # one at a time: the peak is of this method's tensors alone
        gc.collect()
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        profiler = (
            contextlib.nullcontext()
            if cuda
            else profile(activities=[ProfilerActivity.CPU], profile_memory=True)
        )
        base = torch.cuda.memory_allocated() if cuda else 0
        with profiler:
            engine, runner, shares[method] = _engine(method, batch, device)
            for step in (1, 2):
                _step(engine, runner, images, labels, step)
        peaks[method] = (torch.cuda.max_memory_allocated() - base) if cuda else allocated_peak(profiler)
        del engine, runner
        print(f"{method}: peak {peaks[method] / 2**30:.2f} GiB", flush=True)
    engines = {method: _engine(method, batch, device)[:2] for method in METHODS}
    times: dict[str, list[float]] = {method: [] for method in METHODS}
    for round_ in range(rounds + 1):  # round 0 warms up
        for method, (engine, runner) in engines.items():
            if cuda:
                torch.cuda.synchronize()
            started = time.perf_counter()
            _step(engine, runner, images, labels, round_ + 1)
            if cuda:
                torch.cuda.synchronize()
            if round_:
                times[method].append(time.perf_counter() - started)
    full_peak, full_time = peaks["full"], statistics.median(times["full"])
    where = torch.cuda.get_device_name() if cuda else "CPU"
    print(f"\nViT-B/16 224 px, batch {batch}, fp32, ZeRO 0, {where}; median of {rounds} interleaved steps")
    print("| method | trained | trained % | peak allocated (GiB) | vs full | s/step | vs full |")
    print("|---|---|---|---|---|---|---|")
    for method in METHODS:
        step = statistics.median(times[method])
        share = shares[method]
        print(
            f"| {method} | {share['trainable'] / 1e6:.2f} M | {share['trainable_percent']:.2f} | "
            f"{peaks[method] / 2**30:.2f} | {peaks[method] / full_peak:.2f} | {step:.2f} | {step / full_time:.2f} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="what", required=True)
    q = sub.add_parser("quality")
    q.add_argument("--demo", type=Path, required=True, help="a mim demo run dir (pretrain/, shards/)")
    q.add_argument("--out", type=Path, required=True)
    c = sub.add_parser("cost")
    c.add_argument("--rounds", type=int, default=3)
    c.add_argument("--batch", type=int, default=8)
    args = parser.parse_args()
    if args.what == "quality":
        quality(args.demo, args.out)
    else:
        cost(args.rounds, args.batch)


if __name__ == "__main__":
    main()
