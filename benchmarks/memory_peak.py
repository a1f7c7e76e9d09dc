"""One process's measured memory peak over a few pretraining steps through mim's engine, beside
what `mim plan` predicts for it; launched by memory_plan.py (and the tests), by torchrun for
several processes. Writes OUT/rank-N.json for each rank.

Usage: memory_peak.py OUT MODEL IMG_SIZE BATCH ZERO_STAGE CHECKPOINT_EVERY [STEPS]

On the CPU the peak is the process's resident memory (VmHWM, reset before the model is built)
above what it held then; glibc is told to map every allocation of 64 KiB and more by itself
(MALLOC_MMAP_THRESHOLD_, set by the launcher) so freed tensors leave the process at once and the
resident peak is the peak of what is held. On CUDA it is torch.cuda.max_memory_allocated.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from mim.distributed import init_distributed, read_dist_env, shutdown
from mim.engine.deepspeed_engine import EngineSettings, build_engine, resolve_precision
from mim.engine.optim import param_groups
from mim.engine.step import StepRunner
from mim.models.checkpointing import checkpoint_blocks
from mim.models.mae import MaskedAutoencoderViT
from mim.models.registry import model_args
from mim.plan import Setup, plan


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def main() -> None:
    out, name = Path(sys.argv[1]), sys.argv[2]
    img_size, batch, zero_stage, every = map(int, sys.argv[3:7])
    steps = int(sys.argv[7]) if len(sys.argv) > 7 else 3
    env = read_dist_env()
    device = init_distributed(env)
    cuda = device.type == "cuda"
    precision = resolve_precision("auto")
    arch = model_args(name, img_size=img_size)
    torch.manual_seed(0)
    images = torch.randn(batch, arch["in_chans"], img_size, img_size, device=device)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        baseline = torch.cuda.memory_allocated()
    else:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current VmRSS
        baseline = _status("VmRSS")
    model = MaskedAutoencoderViT(**arch).to(device)
    for blocks in (model.blocks, model.decoder_blocks):
        checkpoint_blocks(blocks, every)
    settings = EngineSettings(
        micro_batch_size=batch,
        accum_steps=1,
        world_size=env.world_size,
        zero_stage=zero_stage,
        precision=precision,
        grad_clip=None,
        num_params=sum(p.numel() for p in model.parameters() if p.requires_grad),
    )
    engine = build_engine(model, param_groups(model, 0.05), settings)
    runner = StepRunner(engine, settings, device)
    for step in range(steps):
        runner.run(step + 1, 1e-4, lambda micro: engine(images, mask_ratio=0.75)[0])
    if cuda:
        torch.cuda.synchronize()
        measured = torch.cuda.max_memory_allocated() - baseline
    else:
        measured = _status("VmHWM") - baseline
    setup = Setup(arch, batch, env.world_size, zero_stage, precision, every)
    record = {"rank": env.rank, "measured": measured, "predicted": plan(setup).total, "precision": precision}
    (out / f"rank-{env.rank}.json").write_text(json.dumps(record))
    shutdown()


if __name__ == "__main__":
    main()
