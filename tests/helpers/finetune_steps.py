"""Launched by torchrun (1 or 2 processes): k steps of a fine-tuned ViT classifier adapted by a
finetune.method, through the trainers' step (mim.engine.step.StepRunner on a DeepSpeed engine),
on a fixed global batch split across the ranks. Rank 0 writes OUT/initial.safetensors (the whole
model before), OUT/final.safetensors (after) and OUT/trained.json (the names that train).
Usage: OUT METHOD ZERO_STAGE"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from mim.config import FinetuneMethodConfig
from mim.distributed import barrier, init_distributed, read_dist_env, shutdown
from mim.engine.deepspeed_engine import EngineSettings, build_engine, full_state_dict
from mim.engine.optim import param_groups
from mim.engine.step import StepRunner
from mim.models.backbone import create_vit
from mim.models.finetuning import method_of, trained_names

ARCH = dict(img_size=28, patch_size=7, in_chans=1, embed_dim=32, depth=3, num_heads=2, mlp_ratio=4.0)
GLOBAL_BATCH, STEPS = 8, 4


def main() -> None:
    out, method, zero_stage = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    env = read_dist_env()
    device = init_distributed(env)
    torch.manual_seed(0)
    model = create_vit(ARCH, num_classes=10, global_pool="avg", fc_norm=True)
    method_of(FinetuneMethodConfig(method=method, lora_rank=4, adapter_width=8, prompt_tokens=3)).apply(model)
    if env.rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        save_file(
            {k: v.clone().contiguous() for k, v in model.state_dict().items()}, out / "initial.safetensors"
        )
        (out / "trained.json").write_text(json.dumps(sorted(trained_names(model))))
    settings = EngineSettings(
        micro_batch_size=GLOBAL_BATCH // env.world_size,
        accum_steps=1,
        world_size=env.world_size,
        zero_stage=zero_stage,
        precision="fp32",
        grad_clip=1.0,
    )
    groups = param_groups(model, 0.05, layer_decay=0.75, num_layers=ARCH["depth"])
    engine = build_engine(model, groups, settings)
    runner = StepRunner(engine, settings, device)
    data = torch.Generator().manual_seed(123)
    for step in range(STEPS):
        images = torch.randn(GLOBAL_BATCH, 1, 28, 28, generator=data)
        labels = torch.randint(0, 10, (GLOBAL_BATCH,), generator=data)
        mine = images.chunk(env.world_size)[env.rank], labels.chunk(env.world_size)[env.rank]

        def micro_loss(micro: int, mine=mine) -> torch.Tensor:
            return F.cross_entropy(engine(mine[0]), mine[1])

        runner.run(step + 1, 1e-2, micro_loss)
    assert runner.first_bad() == -1
    weights = full_state_dict(engine, env.rank)  # every rank: ZeRO 3 gathers
    if env.rank == 0:
        save_file(weights, out / "final.safetensors")
    barrier()  # every rank is alive: none closes its connections while the other still receives
    shutdown()


if __name__ == "__main__":
    main()
