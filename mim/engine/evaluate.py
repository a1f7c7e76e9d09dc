"""Evaluation on a labelled split: every sample counted exactly once across ranks; top-1/top-5
per classifier head; and a kNN classifier on frozen features."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

from mim.data.loaders import eval_loader
from mim.data.shards import ShardSet
from mim.data.streams import EvalStream, ViewSpec
from mim.distributed import DistEnv, all_reduce_sum
from mim.runtime import interruptible


@torch.no_grad()
def evaluate(
    logits_of: Callable[[torch.Tensor], torch.Tensor],
    shards: ShardSet,
    spec: ViewSpec,
    env: DistEnv,
    device: torch.device,
    batch_size: int,
    num_workers: int,
    crop_fraction: float,
    subset: Sequence[int] | None = None,
) -> dict:
    """`logits_of(uint8 images on device)` -> (num_heads, N, num_classes). Returns per-head top-1/top-5
    in percent and the number of samples counted (all ranks together), over the split or over
    `subset` (sorted sample indices)."""
    stream = EvalStream(shards, spec, env.rank, env.world_size, crop_fraction, subset)
    correct, count = None, torch.zeros((), device=device)
    with interruptible("evaluating"):
        for images, labels, _ in eval_loader(stream, batch_size, num_workers):
            logits = logits_of(images.to(device, non_blocking=True)).float()
            labels = labels.to(device)
            top = logits.topk(min(5, logits.shape[-1]), dim=-1).indices  # (H, N, 5)
            batch_correct = torch.stack(
                [(top[..., 0] == labels).sum(-1), (top == labels[:, None]).any(-1).sum(-1)]
            )
            correct = batch_correct.float() if correct is None else correct + batch_correct
            count += labels.shape[0]
    if correct is None:  # this rank had no samples; the others still reduce
        heads = logits_of(
            torch.zeros(
                1,
                1 if spec.mode == "L" else 3,
                spec.img_size,
                spec.img_size,
                dtype=torch.uint8,
                device=device,
            )
        ).shape[0]
        correct = torch.zeros(2, heads, device=device)
    all_reduce_sum(correct)
    all_reduce_sum(count)
    total = max(1.0, count.item())
    return {
        "top1": (correct[0] * 100 / total).tolist(),
        "top5": (correct[1] * 100 / total).tolist(),
        "num_samples": int(count.item()),
    }


@torch.no_grad()
def extract_features(
    features_of: Callable[[torch.Tensor], torch.Tensor],
    shards: ShardSet,
    spec: ViewSpec,
    env: DistEnv,
    device: torch.device,
    batch_size: int,
    num_workers: int,
    crop_fraction: float,
    l2_normalize: bool = True,
    gather: bool = True,
    subset: Sequence[int] | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Features and labels of this rank's share of the split (or of `subset`, sorted sample
    indices; each sample once across ranks); with `gather`, the whole split on every rank."""
    stream = EvalStream(shards, spec, env.rank, env.world_size, crop_fraction, subset)
    features, labels = [], []
    with interruptible("extracting features"):
        for images, batch_labels, _ in eval_loader(stream, batch_size, num_workers, generator):
            batch_features = features_of(images.to(device)).float()
            features.append(F.normalize(batch_features, dim=-1) if l2_normalize else batch_features)
            labels.append(batch_labels.to(device))
    local = torch.cat(features) if features else torch.zeros(0, 0, device=device)
    local_labels = torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long, device=device)
    if not gather or not (dist.is_initialized() and dist.get_world_size() > 1):
        return local, local_labels
    return _gather_uneven(local), _gather_uneven(local_labels)


@dataclass(frozen=True)
class EvaluationSplits:
    """Where a classifier is evaluated: `select` (its `select_subset`, sorted sample indices, or
    all of it) chooses the head and epoch; `test` (data.val) is reported, for the choice only.
    `select_name` says which split chose, for logs and metrics.json."""

    test: ShardSet
    select: ShardSet
    select_subset: tuple[int, ...] | None
    select_name: str


@dataclass(frozen=True)
class KnnSplits:
    """What a kNN evaluation reads: a labelled bank and a labelled validation split, each whole
    or a sorted subset of its sample indices."""

    bank: ShardSet
    val: ShardSet
    num_classes: int
    bank_subset: tuple[int, ...] | None = None
    val_subset: tuple[int, ...] | None = None


@torch.no_grad()
def knn_evaluate(
    features_of: Callable[[torch.Tensor], torch.Tensor],
    splits: KnnSplits,
    spec: ViewSpec,
    env: DistEnv,
    device: torch.device,
    loader: tuple[int, int, float],
    k: int,
    temperature: float,
    generator: torch.Generator | None = None,
) -> dict:
    """Weighted kNN top-1/top-5 (percent) of the validation split against the bank, every sample
    once across ranks: the bank's features are gathered on every rank, each rank classifies its
    own share of the validation split, the hits are summed. `loader`: (batch size, workers, crop
    fraction)."""
    batch_size, num_workers, crop_fraction = loader
    common = (spec, env, device, batch_size, num_workers, crop_fraction)
    bank_features, bank_labels = extract_features(
        features_of, splits.bank, *common, subset=splits.bank_subset, generator=generator
    )
    val_features, val_labels = extract_features(
        features_of, splits.val, *common, gather=False, subset=splits.val_subset, generator=generator
    )
    counts = torch.zeros(3, device=device)  # top-1 hits, top-5 hits, samples
    if len(val_labels) and len(bank_labels):
        scores = knn_classify(bank_features, bank_labels, val_features, splits.num_classes, k, temperature)
        counts[:2] = top_k_counts(scores.unsqueeze(0), val_labels)[:, 0]
    counts[2] = len(val_labels)
    all_reduce_sum(counts)
    total = max(1.0, counts[2].item())
    return {
        "top1": counts[0].item() * 100 / total,
        "top5": counts[1].item() * 100 / total,
        "num_bank": len(bank_labels),
        "num_val": int(counts[2].item()),
    }


def _gather_uneven(tensor: torch.Tensor) -> torch.Tensor:
    """Rows from every rank, in rank order; a rank with no rows may have an empty (0, 0) tensor
    (it never saw a feature, so it does not know the width: the others' is taken)."""
    shape = torch.tensor(tensor.shape, device=tensor.device)
    shapes = [torch.zeros_like(shape) for _ in range(dist.get_world_size())]
    dist.all_gather(shapes, shape)
    widest = torch.stack(shapes).amax(0).tolist()  # (rows, *feature dims): the largest of each
    padded = torch.zeros(*widest, dtype=tensor.dtype, device=tensor.device)
    padded[tuple(slice(0, n) for n in tensor.shape)] = tensor
    parts = [torch.zeros_like(padded) for _ in shapes]
    dist.all_gather(parts, padded)
    return torch.cat([part[: int(size[0])] for part, size in zip(parts, shapes, strict=True)])


def knn_classify(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    features: torch.Tensor,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
    chunk: int = 1024,
) -> torch.Tensor:
    """Weighted kNN on cosine similarity (votes exp(sim / T), as in InstDisc/DINO): class scores (N, C)."""
    scores = []
    for start in range(0, features.shape[0], chunk):
        similarity = features[start : start + chunk] @ train_features.T  # (n, N_train)
        top_similarity, top_index = similarity.topk(min(k, train_features.shape[0]), dim=-1)
        votes = torch.zeros(similarity.shape[0], num_classes, device=features.device)
        votes.scatter_add_(1, train_labels[top_index], (top_similarity / temperature).exp())
        scores.append(votes)
    return torch.cat(scores)


def top_k_counts(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(2, H): top-1 and top-5 hits of each head; logits (H, N, C)."""
    top = logits.topk(min(5, logits.shape[-1]), dim=-1).indices
    return torch.stack([(top[..., 0] == labels).sum(-1), (top == labels[:, None]).any(-1).sum(-1)]).float()
