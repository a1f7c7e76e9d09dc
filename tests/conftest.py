"""Shared fixtures: real tar shards made from real Fashion-MNIST images (Debian's
dataset-fashion-mnist) or from generated RGB JPEGs, and a helper to run the real CLI."""

from __future__ import annotations

import io
import os
import random
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mim.data.shards import write_shards
from mim.data.sources import Record, Source, fashion_mnist

REPO = Path(__file__).resolve().parents[1]
FASHION_MNIST = Path(os.environ.get("MIM_FASHION_MNIST", "/usr/share/datasets/fashion-mnist"))

os.environ.setdefault("DS_ACCELERATOR", "cpu")
# DeepSpeed compiles its CPU ops into torch's extension cache; one per checkout, so two checkouts
# (two venvs) on one machine never rebuild each other's under a running test.
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".torch_extensions"))


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def cli_env(**extra: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    }
    env.update(DS_ACCELERATOR="cpu", PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    env.update(extra)
    return env


def run_cli(*args: str, timeout: float = 300, **env: str) -> subprocess.CompletedProcess:
    """Runs `mim ARGS` in a fresh process, as a user would."""
    return subprocess.run(
        [sys.executable, "-m", "pipelines.cli", *args],
        cwd=REPO,
        env=cli_env(**env),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def torchrun(nproc: int, *program: str, timeout: float = 600, **env: str) -> subprocess.CompletedProcess:
    """Runs `program` (a script and its arguments, or `-m module ...`) as `nproc` ranks on this
    machine, through torchrun, with `env` added to the environment."""
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={nproc}",
        f"--master_port={free_port()}",
        *program,
    ]
    return subprocess.run(
        command, cwd=REPO, env=cli_env(**env), capture_output=True, text=True, timeout=timeout
    )


def run_cli_ranks(nproc: int, *args: str, timeout: float = 600, **env: str) -> subprocess.CompletedProcess:
    """Runs `mim ARGS` as `nproc` ranks on this machine."""
    return torchrun(nproc, "-m", "pipelines.cli", *args, timeout=timeout, **env)


def install_wheel(root: Path) -> tuple[Path, Path]:
    """mim built as a wheel from the repository and installed with `pip install --target` into
    ROOT/site, outside the checkout (what a wheel or `pip install git+...` gives); returns (that
    folder, an empty directory ROOT/elsewhere to run from)."""
    root.mkdir(parents=True, exist_ok=True)
    wheel_command = [sys.executable, "-m", "pip", "wheel", str(REPO), "--no-deps", "--no-build-isolation"]
    build = subprocess.run(
        [*wheel_command, "-w", str(root / "dist")], capture_output=True, text=True, timeout=300, cwd=root
    )
    assert build.returncode == 0, build.stderr[-3000:]
    (wheel,) = (root / "dist").glob("mim_mae-*.whl")
    target = root / "site"
    install = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--target", str(target), str(wheel)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert install.returncode == 0, install.stderr[-3000:]
    (root / "elsewhere").mkdir()
    return target, root / "elsewhere"


def run_installed(
    installed: tuple[Path, Path], *args: str, timeout: float = 300
) -> subprocess.CompletedProcess:
    """`mim ARGS` from the installed package only (not the checkout), run from its empty directory."""
    target, cwd = installed
    env = dict(cli_env(), PYTHONPATH=str(target))
    command = [sys.executable, "-m", "mim", *args]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def start_cli_ranks(nproc: int, args: tuple[str, ...] | list[str], log_dir: Path, **env: str):
    """`mim ARGS` as `nproc` ranks started one by one in the background, not through torchrun: each
    keeps its own exit status and log (LOG_DIR/rankN.log). Returns (processes, log paths)."""
    port, processes, logs = free_port(), [], [log_dir / f"rank{rank}.log" for rank in range(nproc)]
    for rank in range(nproc):
        ranks = dict(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(nproc), LOCAL_WORLD_SIZE=str(nproc))
        variables = cli_env(**ranks, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), **env)
        with open(logs[rank], "w") as log:  # a file, not a pipe: an unread pipe would stall it
            command = [sys.executable, "-m", "pipelines.cli", *args]
            processes.append(subprocess.Popen(command, cwd=REPO, env=variables, stdout=log, stderr=log))
    return processes, logs


# Fashion-MNIST on the debug model: one grey channel, 28x28 images in 7x7 patches
GREY = (
    "data.mean=[0.286]",
    "data.std=[0.353]",
    "model.img_size=28",
    "model.patch_size=7",
    "model.in_chans=1",
)


def fashion_mnist_subset(split: str, count: int) -> Source:
    if not FASHION_MNIST.is_dir():
        pytest.skip(f"Fashion-MNIST not found at {FASHION_MNIST} (apt-get install dataset-fashion-mnist)")
    source = fashion_mnist(FASHION_MNIST, split)
    return Source(source.records[:count], source.classes)


@pytest.fixture(scope="session")
def fmnist_shards(tmp_path_factory) -> dict[str, Path]:
    """Real Fashion-MNIST shards: 960 training images in 8 shards, 250 test images in 3 shards."""
    root = tmp_path_factory.mktemp("fmnist")
    write_shards(fashion_mnist_subset("train", 960), root / "train", name="train", shard_size=120)
    write_shards(fashion_mnist_subset("test", 250), root / "val", name="val", shard_size=100)
    return {"train": root / "train", "val": root / "val"}


def jpeg_bytes(rng: random.Random, size: tuple[int, int]) -> bytes:
    """A smooth random colour picture, JPEG-encoded (not noise: so crops and decodes are realistic)."""
    width, height = size
    grid = np.array([[rng.random() * 255 for _ in range(3 * 4 * 4)]]).reshape(4, 4, 3).astype(np.uint8)
    image = Image.fromarray(grid).resize((width, height), Image.BICUBIC)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def jpeg_source(count: int, num_classes: int = 3, seed: int = 0) -> Source:
    rng = random.Random(seed)
    records = []
    for index in range(count):
        payload = jpeg_bytes(rng, (rng.randint(40, 80), rng.randint(40, 80)))
        records.append(Record(f"jpeg-{index}", index % num_classes, lambda p=payload: (p, "jpg")))
    return Source(records, [f"class{c}" for c in range(num_classes)])


@pytest.fixture(scope="session")
def jpeg_shards(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("jpeg") / "train"
    write_shards(jpeg_source(96), root, name="train", shard_size=24)
    return root


def without_key_bias(name, tensor):
    """The key bias (middle third of qkv.bias) has an exactly zero gradient (softmax ignores a
    shift shared by all keys); Adam turns its float round-off into full-size steps, so it is
    noise in any comparison and is left out."""
    if name.endswith("attn.qkv.bias"):
        q, _, v = tensor.chunk(3)
        return torch.cat([q, v])
    return tensor
