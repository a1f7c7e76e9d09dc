"""Checkpoint write, verify and resume times, and what the checksums cost.

    python benchmarks/checkpoint_io.py                     # debug, demo and ViT-B MAE, 3 rounds
    python benchmarks/checkpoint_io.py --rounds 7 --dir /dev/shm   # what the README quotes
    python benchmarks/checkpoint_io.py --models mae_vit_base_patch16 --rounds 5 --dir /shared/fs/tmp

Per model, with its AdamW state (after one step, ZeRO stage 0, one process), interleaved rounds of:
- mim: `checkpointer.save` as training calls it (every file summed as it is written, the manifest),
  with the time spent inside the checksum's `update` calls added up: what the summing costs;
- plain: the files as mim wrote them before manifests (DeepSpeed's own save, torch.save,
  safetensors' save_file, meta.json), the reference the checksums' cost is set against;
then `checkpoint.verify` (every file read back and summed), DeepSpeed's `load_checkpoint` (a resume
where the checkpoint was written) and mim's move (`mim.engine.portable`: the per-parameter AdamW
state read from DeepSpeed's files and written into the engine, what a resume on another number of
processes or another stage does).
Nothing is fsynced; on tmpfs (`--dir /dev/shm`) a write is a memory copy, as fast as it gets, so
the sums' share is at its largest there (and the disk's writeback does not blur the timings).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
import types
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mim import checkpoint, rng  # noqa: E402
from mim.distributed import init_distributed, read_dist_env  # noqa: E402
from mim.engine import checkpointer, portable  # noqa: E402
from mim.engine.deepspeed_engine import EngineSettings, build_engine  # noqa: E402
from mim.engine.optim import param_groups  # noqa: E402
from mim.engine.step import StepRunner  # noqa: E402
from mim.meta import CheckpointMeta  # noqa: E402
from mim.models import create_model  # noqa: E402

MODELS = ["mae_vit_debug", "mae_vit_demo_patch7", "mae_vit_base_patch16"]


class _TimedSum:
    """xxh3-128 that adds up the seconds spent summing."""

    seconds = 0.0

    def __init__(self, *args) -> None:
        self.inner = REAL_XXHASH.xxh3_128(*args)

    def update(self, data) -> None:
        start = time.perf_counter()
        self.inner.update(data)
        _TimedSum.seconds += time.perf_counter() - start

    def hexdigest(self) -> str:
        return self.inner.hexdigest()


REAL_XXHASH = checkpoint.xxhash


def trained_engine(name: str, device: torch.device):
    torch.manual_seed(0)
    model = create_model(name)
    settings = EngineSettings(
        micro_batch_size=2,
        accum_steps=1,
        world_size=1,
        zero_stage=0,
        precision="fp32",
        grad_clip=None,
        num_params=sum(p.numel() for p in model.parameters()),
    )
    engine = build_engine(model, param_groups(model, 0.05), settings)
    images = torch.randn(2, model.in_chans, *model.patch_embed.img_size)
    StepRunner(engine, settings, device).run(1, 1e-4, lambda micro: engine(images, mask_ratio=0.75)[0])
    return engine


def mim_save(engine, run_dir: Path, step: int) -> Path:
    rank_state = {"rng": rng.rng_state(), "positions": {}}
    return checkpointer.save(engine, run_dir, step, 0, rank_state, CheckpointMeta("pretrain", {}), 1000, lambda: None)


def plain_save(engine, run_dir: Path, step: int) -> Path:
    directory = run_dir / checkpoint.CHECKPOINT_DIR / checkpoint.step_name(step)
    engine.save_checkpoint(str(directory.parent), tag=directory.name, save_latest=False)
    torch.save({"rng": rng.rng_state(), "positions": {}}, directory / "rank-00000.pt")
    weights = {k: v.detach().float().cpu().contiguous() for k, v in engine.module.state_dict().items()}
    save_file(weights, str(directory / checkpoint.WEIGHTS_FILE))
    meta = {"stage": "pretrain", "step": step, "versions": checkpoint.versions(), "git_sha": checkpoint.git_sha()}
    (directory / checkpoint.META_FILE).write_text(json.dumps(meta))
    return directory


def timed(action) -> tuple[float, object]:
    start = time.perf_counter()
    result = action()
    return time.perf_counter() - start, result


def measure(name: str, rounds: int, root: Path, device: torch.device) -> dict:
    engine = trained_engine(name, device)
    variants = {"mim": mim_save, "plain": plain_save}
    times: dict[str, list[float]] = {key: [] for key in [*variants, "sums", "verify", "load", "move"]}
    size = 0
    for round_number in range(rounds):
        for label, save in variants.items():
            run_dir = root / f"{name}-{label}-{round_number}"
            _TimedSum.seconds = 0.0
            checkpoint.xxhash = types.SimpleNamespace(xxh3_128=_TimedSum)
            try:
                seconds, directory = timed(lambda save=save, run_dir=run_dir: save(engine, run_dir, 1))
            finally:
                checkpoint.xxhash = REAL_XXHASH
            times[label].append(seconds)
            if label == "mim":
                times["sums"].append(_TimedSum.seconds)
                size = sum(p.stat().st_size for p in directory.iterdir())
                times["verify"].append(timed(lambda directory=directory: checkpoint.verify(directory))[0])
                load = lambda directory=directory: engine.load_checkpoint(  # noqa: E731
                    str(directory.parent), tag=directory.name, load_lr_scheduler_states=False
                )
                times["load"].append(timed(load)[0])
                move = lambda directory=directory: portable.load_into(  # noqa: E731
                    engine, checkpoint.load_weights(directory), checkpointer.optimizer_state(directory)
                )
                times["move"].append(timed(move)[0])
            shutil.rmtree(run_dir)
    medians = {key: statistics.median(values) for key, values in times.items()}
    return {"model": name, "bytes": size, **medians}


def checksum_rates(megabytes: int = 256) -> dict[str, float]:
    """GB/s of the candidate checksums on random bytes, one core."""
    import hashlib
    import os
    import zlib

    data = os.urandom(megabytes << 20)
    candidates = {
        "sha256": lambda: hashlib.sha256(data).digest(),
        "crc32": lambda: zlib.crc32(data),
        "xxh3_128 (mim)": lambda: REAL_XXHASH.xxh3_128(data).digest(),
    }
    return {name: len(data) / timed(run)[0] / 1e9 for name, run in candidates.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=MODELS)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dir", type=Path, default=None, help="where to write (default: a temporary dir)")
    args = parser.parse_args()
    device = init_distributed(read_dist_env())
    root = Path(tempfile.mkdtemp(prefix="mim-ckpt-bench-", dir=args.dir))
    rows = []
    try:
        for name in args.models:
            rows.append(measure(name, args.rounds, root, device))
            print(f"measured {name}", file=sys.stderr)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"\nseconds, medians of {args.rounds} interleaved rounds, torch {torch.__version__}, one process, {root.parent}")
    print(
        "| model | checkpoint | plain write | mim write | of which sums | sums / plain write | mim / plain "
        "| verify | DeepSpeed load | mim move |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        sums = row["sums"]
        print(
            f"| {row['model']} | {row['bytes'] / 2**20:.1f} MiB | {row['plain']:.3f} | {row['mim']:.3f} | "
            f"{sums:.3f} | {sums / row['plain'] * 100:.1f} % | {row['mim'] / row['plain']:.2f}x | "
            f"{row['verify']:.3f} | {row['load']:.3f} | {row['move']:.3f} |"
        )
    print("\n| checksum | GB/s, one core |\n|---|---|")
    for name, rate in checksum_rates().items():
        print(f"| {name} | {rate:.2f} |")


if __name__ == "__main__":
    main()
