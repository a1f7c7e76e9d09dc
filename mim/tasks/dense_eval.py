"""Segmentation evaluation: a confusion matrix over every labelled pixel of a split (each image
once across ranks, images of any size predicted in sliding windows, the prediction brought to
the mask's own resolution), its IoU per class, mIoU and pixel accuracy; and the callback that
chooses on the selection split and reports data.val, as the classification one does (its
records go to metrics.json), with a picture of the choice: image | ground truth | prediction.

IoU of a class = true positives / (true positives + false positives + false negatives) over all
pixels of the split; a class with no pixel in the labels and none predicted has no IoU (None),
and mIoU is the mean over the classes that have one. Pixels at the ignore index count nowhere."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from mim.data.loaders import eval_loader
from mim.data.pixels import to_units
from mim.data.segmentation import as_lists
from mim.data.shards import ShardSet
from mim.data.streams import EvalStream, ViewSpec
from mim.distributed import DistEnv, all_reduce_sum
from mim.models.segmentation import predict
from mim.pictures import class_colours, label_picture, titled_grid
from mim.runtime import interruptible
from mim.tasks.evaluation import ChoosingEvaluation

log = logging.getLogger(__name__)


def confusion(
    predicted: torch.Tensor, target: torch.Tensor, num_classes: int, ignore_index: int
) -> torch.Tensor:
    """(num_classes, num_classes) int64 counts, rows the true class, columns the predicted one."""
    valid = (target != ignore_index) & (target >= 0) & (target < num_classes)
    pairs = target[valid] * num_classes + predicted[valid]
    return torch.bincount(pairs, minlength=num_classes * num_classes).view(num_classes, num_classes)


def scores(matrix: torch.Tensor, ignore_index: int | None = None) -> dict[str, Any]:
    """mIoU and pixel accuracy in percent, IoU per class (None where the class is absent from the
    labels and the predictions, or is the ignore index)."""
    matrix = matrix.double()
    hits = matrix.diag()
    union = matrix.sum(0) + matrix.sum(1) - hits
    iou = [
        None if union[c] == 0 or c == ignore_index else float(hits[c] / union[c] * 100)
        for c in range(len(hits))
    ]
    present = [value for value in iou if value is not None]
    total = matrix.sum()
    return {
        "miou": sum(present) / len(present) if present else 0.0,
        "pixel_accuracy": float(hits.sum() / total * 100) if total > 0 else 0.0,
        "iou": iou,
    }


@torch.no_grad()
def evaluate_segmentation(
    logits_of: Callable[[torch.Tensor], torch.Tensor],
    shards: ShardSet,
    spec: ViewSpec,
    env: DistEnv,
    device: torch.device,
    loader: tuple[int, int],
    window: tuple[int, int],
    subset: Sequence[int] | None = None,
) -> dict[str, Any]:
    """`logits_of(uint8 windows (n, C, size, size))` -> (n, K, h, w); `loader`:
    (images per batch, workers); `window`: (size, stride). Scores of the split (or `subset`), all
    ranks together, and the number of images."""
    segment = spec.segment
    num_classes, ignore = segment.num_classes, segment.ignore_index
    stream = EvalStream(shards, spec, env.rank, env.world_size, 1.0, subset)
    matrix = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)
    count = torch.zeros((), device=device)
    with interruptible("evaluating"):
        for images, masks, _ in eval_loader(stream, loader[0], loader[1], collate=as_lists):
            inputs = [image.to(device) for image in images]
            for logits, mask in zip(predict(logits_of, inputs, *window), masks, strict=True):
                mask = mask.to(device)
                logits = F.interpolate(logits[None], size=mask.shape, mode="bilinear", align_corners=False)
                matrix += confusion(logits[0].argmax(0), mask, num_classes, ignore)
            count += len(images)
    all_reduce_sum(matrix)
    all_reduce_sum(count)
    return {**scores(matrix.cpu(), ignore), "num_samples": int(count.item())}


class SegmentationEvaluation(ChoosingEvaluation):
    def __init__(
        self,
        stage: str,
        splits,
        description: dict[str, Any],
        run_dir,
        is_main: bool,
        evaluate_split: Callable[[str], dict],
        picture: Callable[[str], torch.Tensor | None],
    ) -> None:
        """`evaluate_split("select" | "test")`: scores and num_samples (every rank calls it);
        `picture(what)`: the picture of the model as it is now (None on ranks that draw none)."""
        super().__init__(stage, splits, description, run_dir, is_main)
        self.evaluate_split, self.picture = evaluate_split, picture

    def evaluate_now(self, loop) -> dict:
        result = self.evaluate_split("select")
        step, epoch = loop.step, loop.step / loop.plan.steps_per_epoch
        record = {"epoch": round(epoch, 3), "step": step, **result}
        log.info(
            "%s eval at epoch %.2f on %s: mIoU %.2f  pixel accuracy %.2f  (%d images)",
            self.stage,
            epoch,
            self.splits.select_name,
            result["miou"],
            result["pixel_accuracy"],
            result["num_samples"],
        )
        loop.report({"eval/miou": result["miou"], "eval/pixel_accuracy": result["pixel_accuracy"]})
        self.summarize(before=step)
        chosen = self.chosen
        if chosen is None or result["miou"] > chosen["selection_miou"]:
            test = result if self.splits.select_subset is None else self.evaluate_split("test")
            record["test"] = test
            log.info(
                "%s: chose epoch %.2f (mIoU %.2f on the selection split); data.val mIoU %.2f  "
                "pixel accuracy %.2f  (%d images)",
                self.stage,
                epoch,
                result["miou"],
                test["miou"],
                test["pixel_accuracy"],
                test["num_samples"],
            )
            loop.report({"test/miou": test["miou"]})
            picture = self.picture(f"epoch {epoch:.2f}")
            if picture is not None:
                loop.image("segmentation", picture)
        self.metrics["evaluations"].append(record)
        self.summarize(before=step + 1)
        self.finish(loop)
        return record

    def summarize(self, before: int) -> None:
        """Keeps the evaluations of steps before `before`; `final`: the last one on the selection
        split; `test`: the choice (the evaluation whose mIoU led on the selection split) on data.val."""
        metrics = self.metrics
        metrics["evaluations"] = [e for e in metrics["evaluations"] if e["step"] < before]
        metrics.pop("test", None)
        metrics.pop("final", None)
        metrics["selection"] = self.splits.select_name
        evaluations = metrics["evaluations"]
        if not evaluations:
            return
        metrics["final"] = {k: v for k, v in evaluations[-1].items() if k != "test"}
        chosen = [e for e in evaluations if "test" in e]
        if chosen:
            record = chosen[-1]
            metrics["test"] = dict(
                record["test"],
                epoch=record["epoch"],
                step=record["step"],
                selection_miou=record["miou"],
                chosen_on=self.splits.select_name,
            )


def segmentation_picture(
    images: torch.Tensor,
    masks: list[torch.Tensor],
    predictions: list[torch.Tensor],
    classes: list[str],
    ignore_index: int,
    what: str,
) -> torch.Tensor:
    """Rows of image | ground truth | prediction with a legend of the classes' colours."""
    colours = class_colours(len(classes))
    columns = [
        to_units(images)[:, : 3 if images.shape[1] >= 3 else 1].clamp(0, 1),  # the first bands of others
        torch.stack([label_picture(mask, colours, ignore_index) for mask in masks]),
        torch.stack([label_picture(p, colours, ignore_index) for p in predictions]),
    ]
    legend = [(name, colour) for name, colour in zip(classes, colours, strict=True)]
    if any(bool((mask == ignore_index).any()) for mask in masks):
        legend.append(("ignored", torch.ones(3)))
    return titled_grid(
        columns, ["image", "ground truth", "prediction"], heading=f"segmentation probe, {what}", legend=legend
    )
