"""Linear probing and fine-tuning: the shared loop with a classification loss, evaluations at
epoch ends on the selection split (a held-out share of data.train), data.val for the choice
only, and metrics.json (each evaluation, the choice and its data.val figure)."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from timm.data import Mixup
from timm.data.random_erasing import RandomErasing
from timm.loss import SoftTargetCrossEntropy

from mim.config import ClassifyConfig
from mim.data.shards import ShardSet
from mim.data.streams import ViewSpec, derived_seed, eval_spec
from mim.distributed import DistEnv, all_reduce_sum
from mim.engine.evaluate import EvaluationSplits, evaluate, extract_features, top_k_counts
from mim.engine.trainer import Trainer
from mim.files import atomic_write_text
from mim.runtime import StopSignal

log = logging.getLogger(__name__)
METRICS_FILE = "metrics.json"


class ClassifierTrainer(Trainer):
    def __init__(
        self,
        stage: str,
        config: ClassifyConfig,
        model: torch.nn.Module,
        groups: list[dict],
        shards: ShardSet,
        splits: EvaluationSplits,
        view_spec: ViewSpec,
        env: DistEnv,
        device: torch.device,
        description: dict[str, Any],
        stop: StopSignal | None = None,
    ) -> None:
        self.stage = stage
        self.description = description  # backbone, arch, num_classes, head lrs: goes into meta and metrics
        self.splits = splits
        self.head_losses: torch.Tensor | None = None  # linprobe: each head's loss summed since the last log
        super().__init__(config, shards, env, device, model, groups, view_spec, stop, config.optim.optimizer)
        augment, num_classes = config.augment, description["num_classes"]
        self.mixup = None
        if stage == "finetune" and (augment.mixup > 0 or augment.cutmix > 0):
            self.mixup = Mixup(
                mixup_alpha=augment.mixup,
                cutmix_alpha=augment.cutmix,
                label_smoothing=augment.label_smoothing,
                num_classes=num_classes,
            )
        self.erasing = (
            RandomErasing(augment.reprob, mode="pixel", device=str(device))
            if stage == "finetune" and augment.reprob > 0
            else None
        )
        self.eval_every = max(1, round(config.eval.every_epochs * self.plan.steps_per_epoch))
        self.metrics = self.load_metrics()

    # ------------------------------------------------------------------ loss

    def forward_loss(self, images: torch.Tensor, labels: torch.Tensor, micro: int) -> torch.Tensor:
        if self.stage == "linprobe":
            logits = self.engine(images)  # (H, N, C): every head sees the same frozen features
            losses = torch.stack([F.cross_entropy(head_logits.float(), labels) for head_logits in logits])
            detached = losses.detach()
            self.head_losses = detached if self.head_losses is None else self.head_losses + detached
            return losses.sum()
        if self.mixup is not None:
            images, targets = self.mixup(images, labels)
            if self.erasing is not None:
                images = self.erasing(images)
            return SoftTargetCrossEntropy()(self.engine(images).float(), targets)
        if self.erasing is not None:
            images = self.erasing(images)
        return F.cross_entropy(
            self.engine(images).float(), labels, label_smoothing=self.config.augment.label_smoothing
        )

    # ------------------------------------------------------------------ evaluation

    def logits_of(self, images: torch.Tensor, model=None) -> torch.Tensor:
        if model is None or model is self.engine.module:
            logits = self.engine(self.normalize(images))
        else:  # a gathered copy (ZeRO 3): the engine's autocast, by hand
            with torch.autocast(self.device.type, torch.bfloat16, enabled=self.precision == "bf16"):
                logits = model(self.normalize(images))
        return logits if self.stage == "linprobe" else logits.unsqueeze(0)

    def describe_loss(self, loss: float, micro_losses: int) -> str:
        """linprobe: each head's own loss (their sum says nothing when one lr diverges), the one
        chosen so far marked with *."""
        if self.head_losses is None:
            return super().describe_loss(loss, micro_losses)
        per_head = (all_reduce_sum(self.head_losses.clone()) / micro_losses).tolist()
        self.head_losses = None
        chosen = self.metrics.get("test", {}).get("head")
        for head, value in enumerate(per_head):
            self.scalar(f"train/loss_head{head}", value)
        shown = " ".join(f"{value:.4g}{'*' if head == chosen else ''}" for head, value in enumerate(per_head))
        return f"loss per head {shown}"

    def after_step(self) -> None:
        if self.step % self.eval_every == 0 or self.step == self.plan.total_steps:
            self.evaluate_now()

    def evaluate_split(self, split: str) -> dict:
        """Per-head top-1/top-5 on the selection split ("select") or on data.val ("test")."""
        shards, subset = (
            (self.splits.select, self.splits.select_subset) if split == "select" else (self.splits.test, None)
        )
        self.engine.eval()
        spec = eval_spec(self.view_spec)
        # Ranks read different numbers of batches: at ZeRO 3, whose forward gathers with the other
        # ranks, each evaluates a whole copy.
        with self.unsharded() as model:
            model.eval()
            result = evaluate(
                lambda images: self.logits_of(images, model),
                shards,
                spec,
                self.env,
                self.device,
                self.config.data.batch_size,
                self.config.data.num_workers,
                self.config.eval.crop_fraction,
                subset,
            )
        self.engine.train()
        return result

    def evaluate_now(self) -> dict:
        """Evaluates on the selection split; where that beats every earlier evaluation (its best
        head), the model as it is now becomes the choice and is evaluated on data.val. The
        choice never sees data.val."""
        result = self.evaluate_split("select")
        epoch = self.step / self.plan.steps_per_epoch
        record = {"epoch": round(epoch, 3), "step": self.step, **result}
        head = max(range(len(result["top1"])), key=lambda h: result["top1"][h])
        log.info(
            "%s eval at epoch %.2f on %s: top-1 %s  top-5 %s  (%d samples)",
            self.stage,
            epoch,
            self.splits.select_name,
            " ".join(f"{v:.2f}" for v in result["top1"]),
            " ".join(f"{v:.2f}" for v in result["top5"]),
            result["num_samples"],
        )
        self.scalar("eval/top1", result["top1"][head])
        self.scalar("eval/top5", result["top5"][head])
        for number, value in enumerate(result["top1"]):
            self.scalar(f"eval/top1_head{number}", value)
        self.summarize(self.metrics, before=self.step)
        chosen = self.metrics.get("test")
        if chosen is None or result["top1"][head] > chosen["selection_top1"]:
            test = result if self.splits.select_subset is None else self.evaluate_split("test")
            record["test"] = {
                "head": head,
                "top1": test["top1"][head],
                "top5": test["top5"][head],
                "num_samples": test["num_samples"],
            }
            blrs = self.description.get("head_blrs")
            log.info(
                "%s: chose head %d%s at epoch %.2f (%.2f on the selection split); "
                "data.val top-1 %.2f  top-5 %.2f  (%d samples)",
                self.stage,
                head,
                f" (blr {blrs[head]:g})" if blrs else "",
                epoch,
                result["top1"][head],
                test["top1"][head],
                test["top5"][head],
                test["num_samples"],
            )
            self.scalar("test/top1", test["top1"][head])
        self.metrics["evaluations"].append(record)
        self.write_metrics()
        return record

    # ------------------------------------------------------------------ metrics.json

    def load_metrics(self) -> dict:
        path = self.run_dir / METRICS_FILE
        metrics = {"stage": self.stage, **self.description, "evaluations": []}
        if path.is_file():  # resuming: keep what earlier attempts measured
            metrics["evaluations"] = json.loads(path.read_text()).get("evaluations", [])
        return metrics

    def summarize(self, metrics: dict, before: int) -> None:
        """Keeps the evaluations of steps before `before` (an earlier attempt may have gone past
        the checkpoint this one resumed from); `final`: the last one's best head on the selection
        split; `test`: the choice (the evaluation whose best head led on the selection split) on
        data.val, as reported."""
        metrics["evaluations"] = [e for e in metrics["evaluations"] if e["step"] < before]
        metrics.pop("test", None)
        metrics.pop("final", None)
        metrics["selection"] = self.splits.select_name
        evaluations = metrics["evaluations"]
        if not evaluations:
            return
        final = evaluations[-1]
        head = max(range(len(final["top1"])), key=lambda h: final["top1"][h])
        metrics["final"] = {
            "epoch": final["epoch"],
            "head": head,
            "top1": final["top1"][head],
            "top5": final["top5"][head],
            "num_samples": final["num_samples"],
        }
        chosen = [e for e in evaluations if "test" in e]
        if chosen:
            record = chosen[-1]
            metrics["test"] = dict(
                record["test"],
                epoch=record["epoch"],
                step=record["step"],
                selection_top1=record["top1"][record["test"]["head"]],
                chosen_on=self.splits.select_name,
            )

    def write_metrics(self) -> None:
        self.summarize(self.metrics, before=self.step + 1)
        if self.env.is_main:
            atomic_write_text(Path(self.run_dir) / METRICS_FILE, json.dumps(self.metrics, indent=1))

    def meta(self) -> dict:
        return dict(
            super().meta(),
            backbone={"arch": self.description["arch"], "source": self.description["source"]},
            num_classes=self.description["num_classes"],
            global_pool=self.config.model.global_pool,
            metrics=self.metrics.get("test"),
        )


class CachedFeatureProbe(ClassifierTrainer):
    """probe.cache_features: the frozen backbone runs once over the (centre-cropped) training and
    validation splits; the heads then train for many epochs on those features. Much faster than
    streaming augmented images through the backbone every epoch; the MAE protocol's augmentation
    is given up for it. The data position is (epoch, offset) into a seeded permutation."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        extract = lambda module, shards, subset=None: extract_features(  # noqa: E731
            lambda images: module.features(self.normalize(images)),
            shards,
            eval_spec(self.view_spec),
            self.env,
            self.device,
            self.config.data.batch_size,
            self.config.data.num_workers,
            self.config.eval.crop_fraction,
            l2_normalize=False,
            gather=False,
            subset=subset,
        )
        started = time.monotonic()
        splits = self.splits
        with torch.no_grad(), self.unsharded() as module:
            module.eval()
            self.train_features, self.train_labels = extract(module, self.shards)
            self.cached = {"test": extract(module, splits.test)}
            self.cached["select"] = (
                extract(module, splits.select, splits.select_subset)
                if splits.select_subset is not None
                else self.cached["test"]
            )
        self.engine.module.takes_features = True
        log.info(
            "cached features of %d training, %d held-out and %d data.val samples (this rank) in %.0f s",
            len(self.train_labels),
            len(self.cached["select"][1]) if splits.select_subset is not None else 0,
            len(self.cached["test"][1]),
            time.monotonic() - started,
        )

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype == torch.uint8:  # images on their way into the backbone
            return super().normalize(images)
        return images.to(self.device, self.input_dtype)  # cached features

    def batches(self):
        epoch, offset = self.position.workers.get(0, (0, 0))
        size, count = self.config.data.batch_size, len(self.train_labels)
        while True:
            generator = torch.Generator().manual_seed(
                derived_seed(self.config.run.seed, self.env.rank, epoch)
            )
            order = torch.randperm(count, generator=generator).to(self.train_labels.device)
            for start in range(offset, count - size + 1, size):
                chosen = order[start : start + size]
                yield {
                    "images": self.train_features[chosen],
                    "labels": self.train_labels[chosen],
                    "worker": 0,
                    "position": (epoch, start + size),
                    "bad": {},
                }
            epoch, offset = epoch + 1, 0

    def evaluate_split(self, split: str) -> dict:
        features, labels = self.cached[split]
        self.engine.eval()
        with torch.no_grad():
            logits = self.engine(self.normalize(features)).float()
        self.engine.train()
        correct = all_reduce_sum(top_k_counts(logits, labels))
        count = all_reduce_sum(torch.tensor(float(len(labels)), device=self.device)).item()
        return {
            "top1": (correct[0] * 100 / count).tolist(),
            "top5": (correct[1] * 100 / count).tolist(),
            "num_samples": int(count),
        }
