"""One process's measured memory peak over a few pretraining steps through mim's engine, beside
what `mim plan` predicts for it; launched by memory_plan.py (and the tests), by torchrun for
several processes. Writes OUT/rank-N.json for each rank.

Usage: memory_peak.py OUT MODEL IMG_SIZE BATCH ZERO_STAGE CHECKPOINT_EVERY [STEPS]

The measured peak is what the plan predicts: the bytes of tensors held at once, counted by
torch's allocator from just before the model is built. On CUDA: torch.cuda.max_memory_allocated.
On the CPU torch keeps no such counter, but its allocator reports every allocation and free to the
profiler (profile_memory=True), and their running sum is the same quantity; it does not depend on
the machine's malloc, its page size or its threads. The process's resident peak (VmHWM above the
same start; glibc told to return every block of 64 KiB or more at once by MALLOC_MMAP_THRESHOLD_,
set by the launcher) is recorded beside it as `resident`: it adds the allocator's slack and what
is not a tensor (the Python heap, the profiler's own records) and varies from machine to machine.
"""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

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


def allocated_peak(profiler: profile) -> int:
    """The highest running sum of the CPU allocations and frees the profiler recorded."""
    cpu = torch.autograd.DeviceType.CPU
    records = [
        (event.start_ns(), event.nbytes())
        for event in profiler.profiler.kineto_results.events()
        if event.name() == "[memory]" and event.device_type() == cpu
    ]
    held = peak = 0
    for _, nbytes in sorted(records, key=lambda record: record[0]):
        held += nbytes
        peak = max(peak, held)
    return peak


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
        profiler = contextlib.nullcontext()
    else:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current VmRSS
        baseline = _status("VmRSS")
        profiler = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
    with profiler:
        steps_through_the_engine(arch, images, batch, env, device, precision, zero_stage, every, steps)
    if cuda:
        torch.cuda.synchronize()
        measured = resident = torch.cuda.max_memory_allocated() - baseline
    else:
        measured, resident = allocated_peak(profiler), _status("VmHWM") - baseline
    setup = Setup(arch, batch, env.world_size, zero_stage, precision, every)
    record = {
        "rank": env.rank,
        "measured": measured,
        "resident": resident,
        "predicted": plan(setup).total,
        "precision": precision,
    }
    (out / f"rank-{env.rank}.json").write_text(json.dumps(record))
    shutdown()


def steps_through_the_engine(arch, images, batch, env, device, precision, zero_stage, every, steps) -> None:
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
    if device.type == "cuda":
        torch.cuda.synchronize()


if __name__ == "__main__":
    main()
