"""Images/s and peak memory of MAE pretraining steps (forward, backward, optimizer step) for a
chosen variant and batch on the current device, through the same DeepSpeed engine as training.

    python benchmarks/pretrain_step.py --model mae_vit_base_patch16 --batch 8            # CPU, fp32
    python benchmarks/pretrain_step.py --model mae_vit_base_patch16 --batch 256 --precision bf16  # GPU
"""

from __future__ import annotations

import argparse
import os
import resource
import time

import torch

from mim.distributed import init_distributed, read_dist_env
from mim.engine.deepspeed_engine import EngineSettings, build_engine, engine_param_groups, resolve_precision
from mim.engine.optim import param_groups
from mim.engine.schedule import apply_lr
from mim.models import create_model


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", nargs="+", default=["mae_vit_base_patch16"])
    parser.add_argument("--batch", nargs="+", type=int, default=[8])
    parser.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"])
    parser.add_argument("--zero-stage", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--mask-ratio", type=float, default=0.75)
    return parser.parse_args()


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # process peak RSS (KiB -> GiB)


def measure(name: str, batch: int, args: argparse.Namespace, device: torch.device) -> dict:
    model = create_model(name).to(device)
    engine = build_engine(
        model,
        param_groups(model, 0.05),
        EngineSettings(
            micro_batch_size=batch,
            accum_steps=1,
            world_size=1,
            zero_stage=args.zero_stage,
            precision=args.precision,
            grad_clip=None,
        ),
    )
    dtype = {"bf16": torch.bfloat16}.get(resolve_precision(args.precision), torch.float32)
    images = torch.randn(batch, model.in_chans, *model.patch_embed.img_size, device=device, dtype=dtype)
    apply_lr(engine_param_groups(engine), 1e-4)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def step() -> None:
        loss, _, _ = engine(images, mask_ratio=args.mask_ratio)
        engine.backward(loss)
        engine.step()

    for _ in range(args.warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = (time.perf_counter() - start) / args.steps
    result = {
        "model": name,
        "batch": batch,
        "precision": resolve_precision(args.precision),
        "step_ms": seconds * 1000,
        "images_per_s": batch / seconds,
        "peak_gib": peak_memory_gib(device),
    }
    return result


def main() -> None:
    args = parse()
    device = init_distributed(read_dist_env())
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({os.cpu_count()} cores)"
    print(f"device: {where}; torch {torch.__version__}; threads {torch.get_num_threads()}")
    print(
        f"| {'model':<24} | {'batch':>5} | {'precision':>9} | {'step ms':>9} | {'images/s':>9} | {'peak GiB':>8} |"
    )
    print(f"|{'-' * 26}|{'-' * 7}|{'-' * 11}|{'-' * 11}|{'-' * 11}|{'-' * 10}|")
    for name in args.model:
        for batch in args.batch:
            r = measure(name, batch, args, device)
            print(
                f"| {r['model']:<24} | {r['batch']:>5} | {r['precision']:>9} | {r['step_ms']:>9.1f} | "
                f"{r['images_per_s']:>9.1f} | {r['peak_gib']:>8.2f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
