"""mim's pretraining step against a plain PyTorch loop, side by side in one process (one per rank
with --nproc), on the same model object and the same input, on the current device.

    python benchmarks/pretrain_step.py --model mae_vit_debug mae_vit_demo_patch7 --batch 8 256   # CPU
    python benchmarks/pretrain_step.py --model mae_vit_base_patch16 --batch 64 256                # GPU
    python benchmarks/pretrain_step.py --nproc 2 --model mae_vit_demo_patch7 --batch 128 \
        --zero-stage auto 0 0-deepspeed 1 2 --accum 1 4                                         # ranks

With --nproc N the script launches N ranks itself (torchrun; or run it under torchrun / srun) and
the reference is what the official MAE code runs on a cluster: torch DistributedDataParallel
(default buckets, gradient communication overlapped with backward, `no_sync()` on all but the
last micro-batch of an accumulated step) with the same fused AdamW. Each rank takes its own
input; img/s counts every rank's images. `0-deepspeed` is stage 0 with DeepSpeed's own gradient
all-reduce (after backward, flattened) instead of mim's overlapped one, to show what that costs.
At stages 1 to 3 ZeRO takes over the parameters' storage and hooks, so the reference runs on a
copy of the model made before the engine (same weights, same architecture).

mim's step is the one every training stage runs (mim.engine.step.StepRunner on the DeepSpeed
engine that mim.engine.deepspeed_engine builds from the same settings as `mim pretrain`). The
reference is the loop a user would write: autocast (bf16 on a GPU, none on the CPU), loss.backward(),
torch's fused AdamW (0.9, 0.95) over the same parameter groups, zero_grad(set_to_none=True).
Both take the same images and the same masks. The two alternate in rounds (ref, mim, then mim,
ref, ...) and the medians are printed; then the model is compiled in place (`engine.compile()`)
and both run the compiled model. `ratio` is the reference's ms / mim's ms: above 1, mim is faster.

On a GPU, MFU = the FLOPs of one step (torch.utils.flop_counter) / step time / the bf16 matmul
rate measured in this run; peak GiB is torch's peak allocation during the variant's steps (the
model and both optimizers' states are resident throughout). On the CPU, peak RSS is the process's.

`--profile DIR` also runs torch.profiler over a few of mim's steps per model and batch, prints the
ops that take the most time and writes a Chrome trace (chrome://tracing, Perfetto) to DIR.

`--spike-watch` compares instead, on one process, mim's step with the loss watch the training loop
sets up (non-finite values and spikes, at the run.spike_* defaults) against the same step watching
for non-finite values only (the step before spike detection), interleaved, on the same engine:

    python benchmarks/pretrain_step.py --model mae_vit_debug mae_vit_demo_patch7 --batch 8 256 --spike-watch

`--target hog teacher ema ema+global ...` compares instead mim's step with each pretraining
target against mim's step with pixels (MAE), on one process: the same geometry, the same images
and masks, interleaved rounds; the target's own work is in its step (HOG on the device, the
teacher's forward without gradients, the EMA update). The teacher is a frozen copy of a
freshly initialised encoder of the same shape (`--teacher-model` for another registered one).

    python benchmarks/pretrain_step.py --model mae_vit_demo_patch7 --batch 256 \
        --target hog teacher ema pixels+global ema+global --steps 5 --rounds 5
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch.utils.flop_counter import FlopCounterMode

from mim.config import RunConfig, TargetConfig
from mim.distributed import init_distributed, read_dist_env
from mim.engine.deepspeed_engine import EngineSettings, build_engine, resolve_precision
from mim.engine.health import LossWatch
from mim.engine.objective import Objective
from mim.engine.optim import param_groups
from mim.engine.schedule import apply_lr
from mim.engine.step import StepRunner
from mim.models import create_model
from mim.models.backbone import ENCODER_DROP_PREFIXES, Weights
from mim.models.mae import MaskedAutoencoderViT
from mim.models.registry import model_args

LR = 1e-4


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", nargs="+", default=["mae_vit_base_patch16"])
    parser.add_argument("--batch", nargs="+", type=int, default=[8])
    parser.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"])
    parser.add_argument(
        "--zero-stage",
        nargs="+",
        default=["auto"],
        choices=["auto", "0", "0-deepspeed", "1", "2", "3"],
        help="as deepspeed.zero_stage; 0-deepspeed: stage 0 with DeepSpeed's all-reduce",
    )
    parser.add_argument("--accum", nargs="+", type=int, default=[1], help="micro-batches per step")
    parser.add_argument("--nproc", type=int, default=1, help="ranks to launch on this machine")
    parser.add_argument(
        "--zero-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a DeepSpeed zero_optimization option for stages 1 to 3 (JSON value), e.g. overlap_comm=true",
    )
    parser.add_argument(
        "--compile",
        default="auto",
        choices=["auto", "off", "both"],
        help="auto: both on CUDA, off on the CPU",
    )
    parser.add_argument(
        "--warmup", type=int, default=3, help="untimed steps before each variant's first round"
    )
    parser.add_argument("--steps", type=int, default=10, help="timed steps per variant per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--mask-ratio", type=float, default=0.75)
    parser.add_argument("--profile", metavar="DIR", help="also profile mim's steps; traces go to DIR")
    parser.add_argument(
        "--target",
        nargs="+",
        help="compare these targets' steps with pixels': hog, teacher, ema, KIND+global (global_weight 1)",
    )
    parser.add_argument(
        "--teacher-model", help="--target teacher: the teacher's variant (default: --model's)"
    )
    parser.add_argument(
        "--spike-watch", action="store_true", help="the step with spike detection against without it"
    )
    args = parser.parse_args()
    args.zero_option = tuple(zero_option(parser, text) for text in args.zero_option)
    return args


def zero_option(parser: argparse.ArgumentParser, text: str) -> tuple[str, object]:
    key, equals, value = text.partition("=")
    try:
        if not key or not equals:
            raise ValueError("expected KEY=VALUE")
        return key, json.loads(value)
    except ValueError as error:  # json.JSONDecodeError is a ValueError
        parser.error(f"--zero-option {text!r}: {error} (VALUE in JSON, e.g. overlap_comm=true)")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()  # a step takes as long as its slowest rank


def launch_ranks(nproc: int) -> int:
    """Runs this script again as `nproc` ranks (torchrun), the cores shared out among them."""
    threads = max(1, (os.cpu_count() or 1) // nproc)
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", str(threads)))
    own = [a for i, a in enumerate(sys.argv) if a != "--nproc" and sys.argv[i - 1] != "--nproc"]
    own = [a for a in own if not a.startswith("--nproc=")]  # the ranks know theirs from torchrun
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", *own]
    return subprocess.run(command, env=env).returncode


def matmul_peak_tflops(device: torch.device) -> float:
    """The bf16 matmul rate this device reaches now (8192^3, best of 20)."""
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    best = float("inf")
    for _ in range(20):
        synchronize(device)
        start = time.perf_counter()
        a @ b
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * 8192**3 / best / 1e12


class Bench:
    """One model, one input per rank; the reference loop and mim's engine step over the same
    parameters (a copy made before the engine at ZeRO stages 1 to 3: see the top)."""

    def __init__(
        self, name: str, batch: int, accum: int, stage: str, args: argparse.Namespace, device: torch.device
    ) -> None:
        torch.manual_seed(0)
        self.device, self.args, self.batch, self.accum = device, args, batch, accum
        self.world_size = dist.get_world_size() if dist.is_initialized() else 1
        self.model = create_model(name).to(device)
        self.precision = resolve_precision(args.precision)
        zero_stage = stage.removesuffix("-deepspeed")
        self.settings = EngineSettings(
            micro_batch_size=batch,
            accum_steps=accum,
            world_size=self.world_size,
            zero_stage=zero_stage if zero_stage == "auto" else int(zero_stage),
            precision=args.precision,
            grad_clip=None,
            num_params=sum(p.numel() for p in self.model.parameters()),
            zero_options=args.zero_option,
        )
        self.stage = self.settings.resolved_zero_stage
        shared = self.stage == 0
        reference_model = self.model if shared else copy.deepcopy(self.model)
        self.engine = build_engine(self.model, param_groups(self.model, 0.05), self.settings)
        self.runner = StepRunner(
            self.engine, self.settings, device, overlap_all_reduce=not stage.endswith("-deepspeed")
        )
        self.reference_model = reference_model
        self.reference = reference_model
        if self.world_size > 1:
            device_ids = [device.index] if device.type == "cuda" else None
            self.reference = torch.nn.parallel.DistributedDataParallel(reference_model, device_ids=device_ids)
        self.reference_groups = param_groups(reference_model, 0.05)
        self.reference_optimizer = torch.optim.AdamW(
            self.reference_groups, lr=LR, betas=(0.9, 0.95), fused=True
        )
        size = self.model.patch_embed.img_size
        rank = dist.get_rank() if dist.is_initialized() else 0
        data = torch.Generator(device="cpu").manual_seed(1000 + rank)
        self.images = torch.randn(batch, self.model.in_chans, *size, generator=data).to(device)
        self.noise = torch.rand(batch, self.model.num_patches, generator=data).to(device)
        self.step_number = 0

    def compile(self) -> None:
        self.engine.compile()  # in place: the reference loop runs the compiled model too
        if self.reference_model is not self.model:
            self.reference_model.compile()

    def autocast(self):
        if self.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def reference_step(self) -> None:
        apply_lr(self.reference_groups, LR)
        for micro in range(self.accum):
            skip_sync = micro < self.accum - 1 and self.world_size > 1
            with self.reference.no_sync() if skip_sync else contextlib.nullcontext():
                with self.autocast():
                    loss, _, _ = self.reference(
                        self.images, mask_ratio=self.args.mask_ratio, noise=self.noise
                    )
                (loss / self.accum).backward()
        self.reference_optimizer.step()
        self.reference_optimizer.zero_grad(set_to_none=True)

    def mim_step(self) -> None:
        self.step_number += 1

        def micro_loss(micro: int) -> torch.Tensor:
            loss, _, _ = self.engine(self.images, mask_ratio=self.args.mask_ratio, noise=self.noise)
            return loss

        self.runner.run(self.step_number, LR, micro_loss)

    def step_flops(self) -> int:
        counter = FlopCounterMode(display=False)
        with counter, self.autocast():
            loss, _, _ = self.model(self.images, mask_ratio=self.args.mask_ratio, noise=self.noise)
            loss.backward()
        self.model.zero_grad(set_to_none=True)
        return counter.get_total_flops()

    def time_block(self, step: Callable[[], None]) -> tuple[float, float]:
        """ms per step over args.steps steps, and the peak GiB while they ran."""
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        synchronize(self.device)
        start = time.perf_counter()
        for _ in range(self.args.steps):
            step()
        synchronize(self.device)
        ms = (time.perf_counter() - start) / self.args.steps * 1000
        if self.device.type == "cuda":
            return ms, torch.cuda.max_memory_allocated(self.device) / 2**30
        return ms, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20

    def compare(self) -> dict[str, tuple[float, float]]:
        """Median ms and peak GiB of each variant over interleaved rounds."""
        steps = {"reference": self.reference_step, "mim": self.mim_step}
        for step in steps.values():
            for _ in range(self.args.warmup):
                step()
        times: dict[str, list[float]] = {name: [] for name in steps}
        peaks: dict[str, float] = dict.fromkeys(steps, 0.0)
        for round_index in range(self.args.rounds):
            order = list(steps) if round_index % 2 == 0 else list(reversed(steps))
            for name in order:
                ms, peak = self.time_block(steps[name])
                times[name].append(ms)
                peaks[name] = max(peaks[name], peak)
        if self.runner.first_bad() >= 0:
            raise RuntimeError("the benchmark's loss went non-finite: its timings would mean nothing")
        return {name: (statistics.median(times[name]), peaks[name]) for name in steps}


def profile_steps(bench: Bench, directory: str, label: str) -> None:
    """torch.profiler over 3 of mim's steps: the top ops by self time, and a Chrome trace."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if bench.device.type == "cuda" else [])
    with profile(activities=activities) as profiler:
        for _ in range(3):
            bench.mim_step()
        synchronize(bench.device)
    if dist.is_initialized() and dist.get_rank() > 0:
        return
    sort_by = "self_cuda_time_total" if bench.device.type == "cuda" else "self_cpu_time_total"
    print(
        f"\nprofile of 3 mim steps, {label}:\n" + profiler.key_averages().table(sort_by=sort_by, row_limit=15)
    )
    os.makedirs(directory, exist_ok=True)
    profiler.export_chrome_trace(os.path.join(directory, f"{label}.json"))


def mfu(flops: int, ms: float, peak_tflops: float | None) -> str:
    return f"{100 * flops / (ms / 1000) / (peak_tflops * 1e12):.1f} %" if peak_tflops else "-"


class TargetBench:
    """mim's step with one pretraining objective, on a model shaped for it."""

    def __init__(
        self, name: str, spec: str, batch: int, args: argparse.Namespace, device: torch.device
    ) -> None:
        kind, _, extra = spec.partition("+")
        target = TargetConfig(kind=kind, global_weight=1.0 if extra == "global" else 0.0)
        arch = model_args(name, norm_pix_loss=True)
        teacher = None
        if kind == "teacher":
            teacher_arch = model_args(args.teacher_model or name)
            fresh = create_model(args.teacher_model or name).state_dict()
            state = {k: v for k, v in fresh.items() if not k.startswith(ENCODER_DROP_PREFIXES)}
            teacher = Weights(state, teacher_arch, "a fresh encoder", {}, {})
            target.teacher = "a fresh encoder"
        precision = resolve_precision(args.precision)
        self.objective = Objective(target, arch, teacher, device, precision == "bf16")
        torch.manual_seed(0)
        model = MaskedAutoencoderViT(
            **arch, pred_dim=self.objective.pred_dim, global_dim=self.objective.global_dim
        )
        model = model.to(device)
        settings = EngineSettings(
            micro_batch_size=batch,
            accum_steps=1,
            world_size=1,
            zero_stage=0,
            precision=args.precision,
            grad_clip=None,
            num_params=sum(p.numel() for p in model.parameters()),
        )
        self.engine = build_engine(model, param_groups(model, 0.05), settings)
        self.runner = StepRunner(self.engine, settings, device)
        self.objective.attach(self.engine.module)
        data = torch.Generator(device="cpu").manual_seed(1000)
        self.images = torch.randn(
            batch, arch["in_chans"], arch["img_size"], arch["img_size"], generator=data
        ).to(device)
        self.noise = torch.rand(batch, model.num_patches, generator=data).to(device)
        self.mask_ratio, self.step_number = args.mask_ratio, 0

    def step(self) -> None:
        self.step_number += 1

        def micro_loss(micro: int) -> torch.Tensor:
            inputs = self.objective.step_inputs(self.images)
            loss, _, _ = self.engine(self.images, mask_ratio=self.mask_ratio, noise=self.noise, **inputs)
            return loss

        self.runner.run(self.step_number, LR, micro_loss)
        self.objective.after_step(self.step_number, 10**6)


def compare_targets(args: argparse.Namespace, device: torch.device) -> None:
    """Each target's step against pixels', interleaved rounds, medians."""
    print(f"| model | batch | target | pixels ms | target ms | target / pixels |\n|{'---|' * 6}", flush=True)
    for name in args.model:
        for batch in args.batch:
            for spec in args.target:
                benches = {"pixels": TargetBench(name, "pixels", batch, args, device)}
                benches[spec] = TargetBench(name, spec, batch, args, device)
                times: dict[str, list[float]] = {key: [] for key in benches}
                for bench in benches.values():
                    for _ in range(args.warmup):
                        bench.step()
                for round_index in range(args.rounds):
                    order = list(benches) if round_index % 2 == 0 else list(reversed(benches))
                    for key in order:
                        synchronize(device)
                        start = time.perf_counter()
                        for _ in range(args.steps):
                            benches[key].step()
                        synchronize(device)
                        times[key].append((time.perf_counter() - start) / args.steps * 1000)
                pixels, other = statistics.median(times["pixels"]), statistics.median(times[spec])
                print(
                    f"| {name} | {batch} | {spec} | {pixels:.1f} | {other:.1f} | {other / pixels:.2f}x |",
                    flush=True,
                )


def compare_watches(args: argparse.Namespace, device: torch.device) -> None:
    """mim's step with the spike watch against the non-finite watch alone: interleaved rounds on the
    same engine and input, medians."""
    run = RunConfig()
    print(f"| model | batch | non-finite watch ms | + spike watch ms | spike / non-finite |\n|{'---|' * 5}")
    for name in args.model:
        for batch in args.batch:
            bench = Bench(name, batch, 1, "auto", args, device)
            watches = {
                "non-finite": LossWatch(device),
                "spike": LossWatch(device, run.spike_threshold, run.spike_window, checked_after=0),
            }
            times: dict[str, list[float]] = {key: [] for key in watches}
            for watch in watches.values():
                bench.runner.watch = watch
                for _ in range(args.warmup):
                    bench.mim_step()
            for round_index in range(args.rounds):
                order = list(watches) if round_index % 2 == 0 else list(reversed(watches))
                for key in order:
                    bench.runner.watch = watches[key]
                    times[key].append(bench.time_block(bench.mim_step)[0])
            if any(watch.first_bad() >= 0 for watch in watches.values()):
                raise RuntimeError(
                    "the benchmark's loss went non-finite or spiked: its timings would mean nothing"
                )
            plain, spikes = statistics.median(times["non-finite"]), statistics.median(times["spike"])
            print(f"| {name} | {batch} | {plain:.2f} | {spikes:.2f} | {spikes / plain:.3f}x |", flush=True)


def main() -> None:
    args = parse()
    if args.spike_watch:
        device = init_distributed(read_dist_env())
        print(f"device: {device}; torch {torch.__version__}; {args.rounds} rounds x {args.steps} steps")
        compare_watches(args, device)
        return
    if args.target:
        device = init_distributed(read_dist_env())
        print(f"device: {device}; torch {torch.__version__}; {args.rounds} rounds x {args.steps} steps")
        compare_targets(args, device)
        return
    if args.nproc > 1 and "WORLD_SIZE" not in os.environ:
        sys.exit(launch_ranks(args.nproc))
    device = init_distributed(read_dist_env())
    main_rank = not dist.is_initialized() or dist.get_rank() == 0
    say = print if main_rank else (lambda *a, **k: None)
    cuda = device.type == "cuda"
    compile_modes = [False, True] if args.compile == "both" or (args.compile == "auto" and cuda) else [False]
    where = torch.cuda.get_device_name(device) if cuda else f"CPU ({os.cpu_count()} cores)"
    peak_tflops = matmul_peak_tflops(device) if cuda else None
    world_size = dist.get_world_size() if dist.is_initialized() else 1
    reference = "torch DDP" if world_size > 1 else "plain loop"
    say(
        f"device: {where}; torch {torch.__version__}; {world_size} rank(s), {torch.get_num_threads()} "
        f"thread(s) each; reference: {reference}; {args.rounds} rounds x {args.steps} steps"
        + (f"; zero_optimization {dict(args.zero_option)}" if args.zero_option else "")
        + (f"; bf16 matmul peak {peak_tflops:.0f} TFLOP/s" if peak_tflops else ""),
        flush=True,
    )
    say(
        "| model | batch x accum | ZeRO | precision | compiled | reference ms | mim ms | ratio "
        "| reference img/s | mim img/s | reference MFU | mim MFU | reference peak GiB | mim peak GiB |"
    )
    say("|" + "---|" * 14)
    for name in args.model:
        for batch in args.batch:
            for accum in args.accum:
                for stage in args.zero_stage:
                    bench = Bench(name, batch, accum, stage, args, device)
                    flops = bench.step_flops() * accum if cuda else 0
                    images = batch * accum * world_size
                    shown_stage = f"{stage} (= {bench.stage})" if stage == "auto" else stage
                    for compiled in compile_modes:
                        if compiled:
                            bench.compile()
                        results = bench.compare()
                        ref_ms, ref_peak = results["reference"]
                        mim_ms, mim_peak = results["mim"]
                        say(
                            f"| {name} | {batch} x {accum} | {shown_stage} | {bench.precision} | "
                            f"{'yes' if compiled else 'no'} | {ref_ms:.1f} | {mim_ms:.1f} | "
                            f"{ref_ms / mim_ms:.2f}x | {images * 1000 / ref_ms:.1f} | "
                            f"{images * 1000 / mim_ms:.1f} | {mfu(flops, ref_ms, peak_tflops)} | "
                            f"{mfu(flops, mim_ms, peak_tflops)} | {ref_peak:.2f} | {mim_peak:.2f} |",
                            flush=True,
                        )
                        if args.profile:  # every rank steps (collectives); rank 0 reports
                            label = f"{name}-b{batch}x{accum}-z{stage}-{'compiled' if compiled else 'eager'}"
                            profile_steps(bench, args.profile, label)
                    del bench
                    if cuda:
                        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
