"""Linear probing and fine-tuning as tasks: a classification head on the pretrained backbone,
cross-entropy, and the evaluation callback (mim.tasks.evaluation) that chooses on a held-out
share of data.train and reports data.val. They differ in what is frozen, the head, the param
groups, the augmentation and the loss."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from timm.data import Mixup
from timm.data.random_erasing import RandomErasing
from timm.loss import SoftTargetCrossEntropy

from mim.config import ConfigError, FinetuneConfig, LinprobeConfig, require
from mim.data.pixels import mode_for
from mim.data.streams import ViewSpec, eval_spec
from mim.distributed import all_reduce_sum
from mim.engine.callbacks import Callback
from mim.engine.data import StreamData
from mim.engine.evaluate import evaluate
from mim.engine.optim import param_groups
from mim.engine.session import Session
from mim.engine.task import Task
from mim.meta import CheckpointMeta
from mim.models.classifier import build_finetune_vit, build_linear_probe
from mim.models.finetuning import method_of, trainable_share
from mim.models.transforms import apply_transforms
from mim.recipe import ClassifyInputs, check_classify
from mim.tasks.cached import CachedFeatures
from mim.tasks.evaluation import ClassificationEvaluation
from mim.tasks.registry import TASKS
from mim.weights import backbone_reference, check_backbone

log = logging.getLogger(__name__)


class ClassifyTask(Task):
    """What linear probing and fine-tuning share."""

    randaug = False  # the training view takes augment.randaug

    @classmethod
    def check(cls, config: Any) -> ClassifyInputs:
        return check_classify(config)

    def __init__(self, config: Any, inputs: ClassifyInputs, env, device: torch.device) -> None:
        super().__init__(config, inputs, env, device)
        self.report: dict[str, Any] = {}
        self.evaluation: ClassificationEvaluation | None = None
        self.source: Any = None  # the training data: streamed images or cached features
        self.session: Session | None = None
        self.optimizer = config.optim.optimizer
        self.view_spec = ViewSpec(
            inputs.arch["img_size"],
            mode_for(inputs.arch["in_chans"]),
            tuple(config.data.crop_scale),
            config.data.hflip,
            needs_label=True,
            randaug=config.augment.randaug if self.randaug else "",
            reduced_decode=config.data.reduced_decode,
            image_key=config.data.image_key,
            label_key=config.data.label_key,
        )

    def description(self) -> dict[str, Any]:
        """Goes into meta.json and metrics.json: the backbone, the head, how it loaded."""
        inputs = self.inputs
        return {
            "backbone": inputs.weights.source if inputs.weights else "random init (init.from=none)",
            "source": self.config.init.from_,
            "arch": inputs.arch,
            "num_classes": inputs.num_classes,
            "global_pool": self.config.model.global_pool,
            "load_report": self.report,
            "head_blrs": None,
            "probe_blocks": None,
        }

    def build(self):
        torch.manual_seed(self.config.run.seed)  # the same heads (and random encoder) for the same seed
        model, groups = self.build_model()
        log.info(
            "%s of %s: keys the stage adds %s, drops %s",
            self.stage,
            self.description()["backbone"],
            self.report["missing"],
            self.report["unexpected"],
        )
        return model, groups

    def build_model(self):
        raise NotImplementedError

    def data(self, session: Session):
        self.session = session
        stream = StreamData(
            self.config, self.inputs.shards, self.view_spec, self.env.rank, self.device, session.input_dtype
        )
        self.source = stream
        return stream

    def callbacks(self, session: Session) -> list[Callback]:
        evaluate_split = getattr(self.source, "evaluate_split", self.evaluate_split)
        self.evaluation = ClassificationEvaluation(
            self.stage,
            self.inputs.splits,
            self.description(),
            session.run_dir,
            self.env.is_main,
            evaluate_split,
        )
        return [self.evaluation]

    # ------------------------------------------------------------------ evaluation

    def logits(self, model: Any, images: torch.Tensor) -> torch.Tensor:
        """Per-head logits (H, N, C) of a batch of model inputs."""
        return model(images).unsqueeze(0)

    def split_shards(self, split: str):
        """The shards and subset of the selection split ("select") or of data.val ("test")."""
        splits = self.inputs.splits
        return (splits.select, splits.select_subset) if split == "select" else (splits.test, None)

    def evaluate_split(self, split: str) -> dict:
        """Per-head top-1/top-5 on the selection split ("select") or on data.val ("test")."""
        shards, subset = self.split_shards(split)
        data = self.config.data
        return self.with_eval_model(
            lambda logits_of: evaluate(
                logits_of,
                shards,
                eval_spec(self.view_spec),
                self.env,
                self.device,
                data.batch_size,
                data.num_workers,
                self.config.eval.crop_fraction,
                subset,
            )
        )

    def with_eval_model(self, run: Callable[[Callable], Any]) -> Any:
        """`run(logits_of)` with the model in eval mode and whole, where `logits_of` takes uint8
        images (normalised here) and gives what `self.logits` does; training mode after."""
        session, engine = self.session, self.session.engine
        engine.eval()
        # Ranks read different numbers of batches: at ZeRO 3, whose forward gathers with the other
        # ranks, each evaluates a whole copy.
        with session.unsharded() as model:
            model.eval()

            def logits_of(images: torch.Tensor) -> torch.Tensor:
                inputs = self.source.normalize(images)
                if model is engine.module:
                    return self.logits(engine, inputs)
                # a gathered copy (ZeRO 3): the engine's autocast, by hand
                with torch.autocast(self.device.type, torch.bfloat16, enabled=session.precision == "bf16"):
                    return self.logits(model, inputs)

            result = run(logits_of)
        engine.train()
        return result

    def meta(self) -> dict[str, Any]:
        description = self.description()
        return {
            "backbone": {"arch": description["arch"], "source": description["source"]},
            "num_classes": description["num_classes"],
            "global_pool": self.config.model.global_pool,
            "metrics": self.evaluation.chosen if self.evaluation else None,
        }

    def summary(self) -> str:
        test = self.evaluation.chosen if self.evaluation else None
        if not test:
            return ""
        return (
            f"; data.val top-1 {test['top1']:.2f} (head {test['head']} at epoch {test['epoch']:g}, "
            f"chosen on {test['chosen_on']})"
        )


@TASKS.register("linprobe")
class Linprobe(ClassifyTask):
    name = "linprobe"
    schema = LinprobeConfig

    def __init__(self, config: Any, inputs: ClassifyInputs, env, device: torch.device) -> None:
        super().__init__(config, inputs, env, device)
        self.head_losses: torch.Tensor | None = None  # each head's loss summed since the last log

    @classmethod
    def check(cls, config: Any) -> ClassifyInputs:
        inputs = check_classify(config)
        require(bool(config.probe.blrs), "probe.blrs must name at least one base lr")
        require(
            config.probe.blocks <= inputs.arch["depth"],
            f"probe.blocks must be at most the encoder's depth {inputs.arch['depth']}, got {config.probe.blocks}",
        )
        config.optim.blr = max(
            config.probe.blrs
        )  # the heads' lrs are probe.blrs; the schedule runs at the largest
        return inputs

    def description(self) -> dict[str, Any]:
        return dict(
            super().description(), head_blrs=self.config.probe.blrs, probe_blocks=self.config.probe.blocks
        )

    def build_model(self):
        config, inputs = self.config, self.inputs
        model, self.report = build_linear_probe(
            inputs.arch,
            inputs.weights,
            inputs.num_classes,
            len(config.probe.blrs),
            config.model.global_pool,
            config.probe.blocks,
        )
        top = config.optim.blr  # max(probe.blrs), set by `check`
        groups = []
        for blr, head in zip(config.probe.blrs, model.heads, strict=True):
            for group in param_groups(head, weight_decay=config.optim.weight_decay):
                # LARS adapts weights only (MAE's protocol): biases keep their plain lr.
                adapt = group["weight_decay"] > 0 or all(p.ndim > 1 for p in group["params"])
                groups.append(dict(group, lr_scale=blr / top, always_adapt=adapt))
        return model, groups

    def data(self, session: Session):
        stream = super().data(session)
        if self.config.probe.cache_features:
            self.source = CachedFeatures(stream, session, self.inputs.splits)
        return self.source

    def logits(self, model: Any, images: torch.Tensor) -> torch.Tensor:
        return model(images)  # (H, N, C): every head sees the same frozen features

    def loss(
        self, engine: Any, inputs: torch.Tensor, labels: torch.Tensor, step: int, micro: int
    ) -> torch.Tensor:
        logits = engine(inputs)
        losses = torch.stack([F.cross_entropy(head_logits.float(), labels) for head_logits in logits])
        detached = losses.detach()
        self.head_losses = detached if self.head_losses is None else self.head_losses + detached
        return losses.sum()

    def describe_loss(self, loss: float, micro_losses: int, report) -> str:
        """Each head's own loss (their sum says nothing when one lr diverges), the one chosen so
        far marked with *."""
        if self.head_losses is None:
            return super().describe_loss(loss, micro_losses, report)
        per_head = (all_reduce_sum(self.head_losses.clone()) / micro_losses).tolist()
        self.head_losses = None
        chosen = (self.evaluation.chosen or {}).get("head") if self.evaluation else None
        report({f"train/loss_head{head}": value for head, value in enumerate(per_head)})
        shown = " ".join(f"{value:.4g}{'*' if head == chosen else ''}" for head, value in enumerate(per_head))
        return f"loss per head {shown}"


@TASKS.register("finetune")
class Finetune(ClassifyTask):
    """Fine-tuning by `finetune.method` (mim.models.finetuning): every weight, or a few percent of
    them with the backbone frozen; then checkpoints hold the trained weights and a checksummed
    reference to the backbone."""

    name = "finetune"
    schema = FinetuneConfig
    randaug = True

    @classmethod
    def check(cls, config: Any) -> ClassifyInputs:
        inputs = check_classify(config)
        method = method_of(config.finetune)
        method.check(inputs.arch)
        if method.partial and inputs.weights is None:
            raise ConfigError(
                f"finetune.method={config.finetune.method} adapts a pretrained backbone, but "
                "init.from=none gives a random one; set init.from (or finetune.method=full)"
            )
        return inputs

    def __init__(self, config: Any, inputs: ClassifyInputs, env, device: torch.device) -> None:
        super().__init__(config, inputs, env, device)
        self.method = method_of(config.finetune)
        self.trained_only = self.method.partial
        self.share: dict[str, Any] = {}
        self.reference: dict[str, Any] | None = None
        augment = config.augment
        self.mixup = None
        if augment.mixup > 0 or augment.cutmix > 0:
            self.mixup = Mixup(
                mixup_alpha=augment.mixup,
                cutmix_alpha=augment.cutmix,
                label_smoothing=augment.label_smoothing,
                num_classes=inputs.num_classes,
            )
        self.erasing = (
            RandomErasing(augment.reprob, mode="pixel", device=str(device)) if augment.reprob > 0 else None
        )

    def build_model(self):
        config, inputs = self.config, self.inputs
        model, self.report = build_finetune_vit(
            inputs.arch, inputs.weights, inputs.num_classes, config.model.global_pool, config.model.drop_path
        )
        self.method.apply(model)
        self.share = trainable_share(model)
        log.info(
            "finetune.method=%s: %d of %d weights train (%.2f%%)",
            self.method.name,
            self.share["trainable"],
            self.share["total"],
            self.share["trainable_percent"],
        )
        apply_transforms(model, config)
        groups = param_groups(
            model, config.optim.weight_decay, config.optim.layer_decay, inputs.arch["depth"]
        )
        return model, groups

    def description(self) -> dict[str, Any]:
        return dict(super().description(), finetune={**self.method.describe(), **self.share})

    def meta(self) -> dict[str, Any]:
        meta = dict(super().meta(), finetune=self.method.describe())
        if self.trained_only:
            if self.reference is None:  # summed once: a large backbone takes seconds
                self.reference = backbone_reference(self.inputs.weights, self.report["unexpected"])
            meta["backbone"] = dict(meta["backbone"], reference=self.reference)
        return meta

    def check_resumable(self, meta: CheckpointMeta, path) -> None:
        super().check_resumable(meta, path)
        written = (meta.extra.get("finetune") or {"method": "full"})["method"]
        if written != self.method.name:
            raise ConfigError(
                f"cannot resume from {path} with finetune.method={self.method.name}: it was written "
                f"by finetune.method={written}; resume with that, or use a new run.dir"
            )
        if meta.trained_only:
            check_backbone(meta.backbone["reference"], self.inputs.weights, str(path))

    def loss(
        self, engine: Any, inputs: torch.Tensor, labels: torch.Tensor, step: int, micro: int
    ) -> torch.Tensor:
        if self.mixup is not None:
            inputs, targets = self.mixup(inputs, labels)
            if self.erasing is not None:
                inputs = self.erasing(inputs)
            return SoftTargetCrossEntropy()(engine(inputs).float(), targets)
        if self.erasing is not None:
            inputs = self.erasing(inputs)
        return F.cross_entropy(
            engine(inputs).float(), labels, label_smoothing=self.config.augment.label_smoothing
        )
