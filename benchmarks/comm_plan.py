"""On paper: the gradient bytes one data-parallel pretraining step communicates, how long that
takes on NVLink and on InfiniBand, against the step's compute time, and whether overlapping the
all-reduce with backward hides it.

    python benchmarks/comm_plan.py                          # ViT-B/L/H, 8/64/256 GPUs, batch 64
    python benchmarks/comm_plan.py --batch 32 --mfu 0.3 --ib-gbs 45

Parameters and FLOPs come from the registered MAE models themselves (built on the meta device,
FLOPs of forward + backward counted by torch.utils.flop_counter at mask ratio 0.75). The rest are
stated assumptions, each a flag:
- gradients are all-reduced in fp32 (mim's bf16 is autocast over fp32 weights: the gradients are
  fp32, as in the official MAE loop), 4 bytes a parameter;
- a ring all-reduce moves 2 (N - 1) / N times the buffer through each GPU's link, at the bus
  bandwidth NCCL reaches: `--nvlink-gbs` within a node of 8 (H100 SXM NVLink 4: 450 GB/s a
  direction, ~360 GB/s reached), `--ib-gbs` across nodes (one 400 Gb/s NIC a GPU: 50 GB/s, ~45
  reached);
- compute at `--mfu` of `--peak-tflops` (H100 SXM dense bf16: 989); backward is 2/3 of it.
Then which ZeRO stage `deepspeed.zero_stage: auto` chooses for these models and larger ones
(mim.engine.deepspeed_engine.choose_zero_stage), with the model states per GPU.

An all-reduce overlapped with backward (mim's stage 0, DDP) is hidden when it takes less than the
backward pass; DeepSpeed's own stage-0 path and ZeRO-1's reduce run after backward and add their
time to the step. The last column is the smallest per-GPU batch whose backward pass is as long as
the all-reduce (with gradient accumulation only the last micro-batch's backward overlaps, so it is
the micro-batch that counts).
"""

from __future__ import annotations

import argparse
import math

import torch
from torch.utils.flop_counter import FlopCounterMode

from mim.engine.deepspeed_engine import MODEL_STATE_SHARE, choose_zero_stage, model_state_bytes
from mim.models import create_model

GRADIENT_BYTES = 4


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model",
        nargs="+",
        default=["mae_vit_base_patch16", "mae_vit_large_patch16", "mae_vit_huge_patch14"],
    )
    parser.add_argument("--gpus", nargs="+", type=int, default=[8, 64, 256])
    parser.add_argument(
        "--batch", type=int, default=64, help="images per GPU per step (the paper's 4096 / 64)"
    )
    parser.add_argument("--gpus-per-node", type=int, default=8)
    parser.add_argument(
        "--nvlink-gbs", type=float, default=360.0, help="all-reduce bus bandwidth in a node, GB/s"
    )
    parser.add_argument(
        "--ib-gbs", type=float, default=45.0, help="all-reduce bus bandwidth across nodes, GB/s"
    )
    parser.add_argument("--peak-tflops", type=float, default=989.0)
    parser.add_argument("--mfu", type=float, default=0.4)
    parser.add_argument("--device-gb", type=float, default=80.0, help="device memory for the stage table")
    parser.add_argument(
        "--sizes", nargs="+", type=float, default=[1.0, 2.5, 4.0, 7.0], help="more model sizes, billions"
    )
    return parser.parse_args()


def model_figures(name: str) -> tuple[int, float]:
    """(parameters, FLOPs of forward + backward per image)."""
    with torch.device("meta"):
        model = create_model(name)
        size = model.patch_embed.img_size
        images = torch.empty(2, model.in_chans, *size)
        noise = torch.empty(2, model.num_patches).uniform_()
    counter = FlopCounterMode(display=False)
    with counter:
        loss, _, _ = model(images, mask_ratio=0.75, noise=noise)
        loss.backward()
    return sum(p.numel() for p in model.parameters()), counter.get_total_flops() / 2


def main() -> None:
    args = parse()
    print(
        f"per-GPU batch {args.batch}; fp32 gradients; ring all-reduce; NVLink {args.nvlink_gbs:.0f} GB/s, "
        f"InfiniBand {args.ib_gbs:.0f} GB/s; compute at {100 * args.mfu:.0f} % of {args.peak_tflops:.0f} TFLOP/s\n"
    )
    print(
        "| model | parameters | gradient MB | GPUs | link | all-reduce ms | step compute ms | backward ms "
        "| overlapped (mim stage 0, DDP) | after backward (DeepSpeed stage 0, ZeRO-1) | batch that hides it |"
    )
    print("|" + "---|" * 11)
    sizes = {}
    for name in args.model:
        num_params, flops_per_image = model_figures(name)
        sizes[name] = num_params
        gradient_bytes = num_params * GRADIENT_BYTES
        compute_ms = flops_per_image * args.batch / (args.mfu * args.peak_tflops * 1e12) * 1000
        backward_ms = compute_ms * 2 / 3
        for gpus in args.gpus:
            within_node = gpus <= args.gpus_per_node
            bandwidth = args.nvlink_gbs if within_node else args.ib_gbs
            comm_ms = 2 * (gpus - 1) / gpus * gradient_bytes / (bandwidth * 1e9) * 1000
            hidden = "hidden" if comm_ms <= backward_ms else f"+{comm_ms - backward_ms:.1f} ms exposed"
            exposed = f"+{comm_ms:.1f} ms ({100 * comm_ms / compute_ms:.0f} %)"
            hiding_batch = math.ceil(comm_ms / (backward_ms / args.batch))  # backward grows with the batch
            print(
                f"| {name} | {num_params / 1e6:.0f} M | {gradient_bytes / 1e6:.0f} | {gpus} | "
                f"{'NVLink' if within_node else 'InfiniBand'} | {comm_ms:.1f} | {compute_ms:.1f} | "
                f"{backward_ms:.1f} | {hidden} | {exposed} | {hiding_batch} |"
            )
    stage_table(args, sizes | {f"{size:g} B parameters": int(size * 1e9) for size in args.sizes})


def stage_table(args: argparse.Namespace, sizes: dict[str, int]) -> None:
    """Which ZeRO stage `deepspeed.zero_stage: auto` picks, and the model states per GPU."""
    memory = int(args.device_gb * 1e9)
    print(
        f"\nzero_stage auto on {args.device_gb:.0f} GB devices (model states within "
        f"{100 * MODEL_STATE_SHARE:.0f} % of memory; fp32 weights + gradients + AdamW):\n"
    )
    print("| model | parameters | " + " | ".join(f"{gpus} GPUs" for gpus in args.gpus) + " |")
    print("|" + "---|" * (2 + len(args.gpus)))
    for name, num_params in sizes.items():
        cells = []
        for gpus in args.gpus:
            stage = choose_zero_stage(num_params, gpus, memory)
            state_gb = model_state_bytes(num_params, gpus, stage) / 1e9
            fits = "" if state_gb <= MODEL_STATE_SHARE * args.device_gb else ", does not fit"
            cells.append(f"stage {stage}, {state_gb:.1f} GB{fits}")
        print(f"| {name} | {num_params / 1e9:.2f} B | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
