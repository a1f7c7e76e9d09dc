"""Launched by torchrun (1 or 2 processes): k DeepSpeed steps of a debug MAE on a fixed global
batch split across the ranks; rank 0 saves the final weights. Usage: OUT ZERO_STAGE [ACCUM]."""

from __future__ import annotations

import sys

import torch
from safetensors.torch import save_file

from mim.distributed import init_distributed, read_dist_env, shutdown
from mim.engine.deepspeed_engine import EngineSettings, build_engine, engine_param_groups
from mim.engine.optim import param_groups
from mim.engine.schedule import apply_lr
from mim.models import create_model

GLOBAL_BATCH, STEPS = 8, 4


def main() -> None:
    out, zero_stage = sys.argv[1], int(sys.argv[2])
    accum = int(sys.argv[3]) if len(sys.argv) > 3 else 1
    env = read_dist_env()
    init_distributed(env)
    torch.manual_seed(0)
    model = create_model("mae_vit_debug")
    micro = GLOBAL_BATCH // env.world_size // accum
    engine = build_engine(
        model,
        param_groups(model, 0.05),
        EngineSettings(
            micro_batch_size=micro,
            accum_steps=accum,
            world_size=env.world_size,
            zero_stage=zero_stage,
            precision="fp32",
            grad_clip=1.0,
        ),
    )
    data = torch.Generator().manual_seed(123)
    for _ in range(STEPS):
        apply_lr(engine_param_groups(engine), 1e-3)
        images = torch.randn(GLOBAL_BATCH, 3, 32, 32, generator=data)
        noise = torch.rand(GLOBAL_BATCH, 16, generator=data)
        mine = images.chunk(env.world_size)[env.rank], noise.chunk(env.world_size)[env.rank]
        for part_images, part_noise in zip(mine[0].chunk(accum), mine[1].chunk(accum), strict=True):
            loss, _, _ = engine(part_images, mask_ratio=0.75, noise=part_noise)
            engine.backward(loss)
            engine.step()
    if env.rank == 0:
        save_file({k: v.detach().clone().contiguous() for k, v in engine.module.state_dict().items()}, out)
    shutdown()


if __name__ == "__main__":
    main()
