"""Launched by torchrun (1 or 2 processes): k steps of a debug MAE through the trainers' step
(mim.engine.step.StepRunner on a DeepSpeed engine) on a fixed global batch split across the
ranks; rank 0 saves the final weights. Usage: OUT ZERO_STAGE [ACCUM [COMPILE [CHECKPOINT_EVERY]]]
(COMPILE: compile | eager; CHECKPOINT_EVERY: activation checkpointing of every k-th block)."""

from __future__ import annotations

import sys

import torch
from safetensors.torch import save_file

from mim.distributed import barrier, init_distributed, read_dist_env, shutdown
from mim.engine.deepspeed_engine import EngineSettings, build_engine, full_state_dict
from mim.engine.optim import param_groups
from mim.engine.step import StepRunner
from mim.models import create_model
from mim.models.checkpointing import checkpoint_blocks

GLOBAL_BATCH, STEPS = 8, 4


def main() -> None:
    out, zero_stage = sys.argv[1], sys.argv[2] if sys.argv[2] == "auto" else int(sys.argv[2])
    accum = int(sys.argv[3]) if len(sys.argv) > 3 else 1
    compile_model = len(sys.argv) > 4 and sys.argv[4] == "compile"
    checkpoint_every = int(sys.argv[5]) if len(sys.argv) > 5 else 0
    env = read_dist_env()
    device = init_distributed(env)
    torch.manual_seed(0)
    model = create_model("mae_vit_debug")
    for blocks in (model.blocks, model.decoder_blocks):
        checkpoint_blocks(blocks, checkpoint_every)
    settings = EngineSettings(
        micro_batch_size=GLOBAL_BATCH // env.world_size // accum,
        accum_steps=accum,
        world_size=env.world_size,
        zero_stage=zero_stage,
        precision="fp32",
        grad_clip=1.0,
        compile=compile_model,
    )
    engine = build_engine(model, param_groups(model, 0.05), settings)
    runner = StepRunner(engine, settings, device)
    if (
        env.world_size > 1 and settings.resolved_zero_stage == 0
    ):  # mim's overlapped all-reduce, not DeepSpeed's too
        assert runner.grad_sync is not None and engine.enable_backward_allreduce is False
    data = torch.Generator().manual_seed(123)
    for step in range(STEPS):
        images = torch.randn(GLOBAL_BATCH, 3, 32, 32, generator=data)
        noise = torch.rand(GLOBAL_BATCH, 16, generator=data)
        mine = (
            images.chunk(env.world_size)[env.rank].chunk(accum),
            noise.chunk(env.world_size)[env.rank].chunk(accum),
        )

        def micro_loss(micro: int, mine=mine) -> torch.Tensor:
            loss, _, _ = engine(mine[0][micro], mask_ratio=0.75, noise=mine[1][micro])
            return loss

        runner.run(step + 1, 1e-3, micro_loss)
    assert runner.first_bad() == -1
    weights = full_state_dict(engine, env.rank)  # every rank: ZeRO 3 gathers
    if env.rank == 0:
        save_file(weights, out)
    barrier()  # every rank is alive: none closes its connections while the other still receives
    shutdown()


if __name__ == "__main__":
    main()
