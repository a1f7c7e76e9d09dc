"""Gathering features of uneven size across two real gloo ranks, one of which has none."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mim.engine.evaluate import _gather_uneven

pytestmark = pytest.mark.slow  # two processes start up: seconds, not the unit tier's milliseconds


def _rank(rank: int, store: str, results: dict) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        features = torch.arange(12.0).view(3, 4) if rank == 0 else torch.zeros(0, 0)
        labels = torch.tensor([1, 2, 3]) if rank == 0 else torch.zeros(0, dtype=torch.long)
        results[rank] = (_gather_uneven(features), _gather_uneven(labels))
    finally:
        dist.destroy_process_group()


def test_a_rank_without_samples_still_gathers_the_others(tmp_path):
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_rank, args=(str(tmp_path / "store"), results), nprocs=2)
        for rank in (0, 1):
            features, labels = results[rank]
            assert torch.equal(features, torch.arange(12.0).view(3, 4))
            assert torch.equal(labels, torch.tensor([1, 2, 3]))
