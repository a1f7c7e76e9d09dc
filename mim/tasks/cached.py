"""probe.cache_features: the frozen backbone runs once over the (centre-cropped) training split,
the selection split and data.val; the heads then train for many epochs on those features. Much
faster than streaming augmented images through the backbone every epoch; the MAE protocol's
augmentation is given up for it. A data source for the loop (the position is (epoch, offset)
into a seeded permutation, a rank part like the stream's) and the evaluator of its splits."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from typing import Any

import torch

from mim.data.batch import Batch, StreamPosition
from mim.data.streams import derived_seed, eval_spec
from mim.distributed import all_reduce_sum
from mim.engine.data import PositionState, StreamData
from mim.engine.evaluate import extract_features, top_k_counts

log = logging.getLogger(__name__)


class CachedFeatures(PositionState):
    def __init__(self, stream: StreamData, session: Any, splits: Any) -> None:
        """`stream`: the probe's image stream (its shards, view, normalisation); the features are
        extracted at once, by every rank, from the engine's model with whole weights."""
        self.stream, self.config, self.device = stream, stream.config, stream.device
        self.dtype, self.rank = stream.dtype, stream.rank
        self.position = StreamPosition(self.config.data.num_workers)
        self.engine, self.env = session.engine, session.env
        started = time.monotonic()
        with torch.no_grad(), session.unsharded() as module:
            module.eval()
            self.extract(module, splits)
        session.engine.module.takes_features = True
        log.info("cached features in %.0f s", time.monotonic() - started)

    def extract(self, module: Any, splits: Any) -> None:
        """Sets train_features and train_labels (the training split's, this rank's part), and
        what evaluate_split reads."""
        self.train_features, self.train_labels = self._extract(module, self.stream.shards)
        self.cached = {"test": self._extract(module, splits.test)}
        self.cached["select"] = (
            self._extract(module, splits.select, splits.select_subset)
            if splits.select_subset is not None
            else self.cached["test"]
        )
        log.info(
            "cached features of %d training, %d held-out and %d data.val samples (this rank)",
            len(self.train_labels),
            len(self.cached["select"][1]) if splits.select_subset is not None else 0,
            len(self.cached["test"][1]),
        )

    def _extract(self, module: Any, shards: Any, subset: Any = None):
        data, crop = self.config.data, self.config.eval.crop_fraction
        return extract_features(
            lambda images: module.features(self.stream.normalize(images)),
            shards,
            eval_spec(self.stream.view_spec),
            self.env,
            self.device,
            data.batch_size,
            data.num_workers,
            crop,
            l2_normalize=False,
            gather=False,
            subset=subset,
        )

    def batches(self) -> Iterator[dict]:
        epoch, offset = self.position.workers.get(0, (0, 0))
        size, count = self.config.data.batch_size, len(self.train_labels)
        while True:
            generator = torch.Generator().manual_seed(derived_seed(self.config.run.seed, self.rank, epoch))
            order = torch.randperm(count, generator=generator).to(self.train_labels.device)
            for start in range(offset, count - size + 1, size):
                chosen = order[start : start + size]
                yield Batch(
                    self.train_features[chosen], self.train_labels[chosen], 0, (epoch, start + size), {}
                )
            epoch, offset = epoch + 1, 0

    def inputs(self, features: torch.Tensor) -> torch.Tensor:
        return features.to(self.device, self.dtype)

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        return self.stream.normalize(images)

    def describe(self) -> dict[str, Any]:
        return self.stream.describe()

    def evaluate_split(self, split: str) -> dict:
        features, labels = self.cached[split]
        self.engine.eval()
        with torch.no_grad():
            logits = self.engine(self.inputs(features)).float()
        self.engine.train()
        correct = all_reduce_sum(top_k_counts(logits, labels))
        count = all_reduce_sum(torch.tensor(float(len(labels)), device=self.device)).item()
        return {
            "top1": (correct[0] * 100 / count).tolist(),
            "top5": (correct[1] * 100 / count).tolist(),
            "num_samples": int(count),
        }
