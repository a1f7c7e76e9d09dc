"""`mim segprobe`: the segmentation probe as a task. A frozen backbone from anything init.from
takes, a head on the patch tokens of its last blocks (mim.models.segmentation), cross-entropy
on the logits brought bilinearly to the mask (pixels at the ignore index count nowhere), the
joint view of image and mask (mim.data.segmentation); evaluation in sliding windows, mIoU, IoU
per class and pixel accuracy (mim.tasks.dense_eval), chosen on the held-out share of data.train
and reported on data.val, with a picture of the choice in RUN_DIR/segmentation.png."""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F

from mim.config import SegprobeConfig
from mim.data.pixels import mode_for
from mim.data.segmentation import SegmentSpec, resize_image, resize_mask
from mim.data.streams import EvalStream, ViewSpec, eval_spec
from mim.engine.callbacks import Callback
from mim.engine.optim import param_groups
from mim.engine.session import Session
from mim.models.segmentation import build_segmentation_probe, predict
from mim.pictures import save_png
from mim.recipe import SegmentInputs, check_segment
from mim.tasks.classify import ClassifyTask
from mim.tasks.dense_eval import SegmentationEvaluation, evaluate_segmentation, segmentation_picture
from mim.tasks.registry import TASKS

log = logging.getLogger(__name__)
PICTURE_IMAGES = 6


@TASKS.register("segprobe")
class Segprobe(ClassifyTask):
    name = "segprobe"
    schema = SegprobeConfig

    @classmethod
    def check(cls, config: Any) -> SegmentInputs:
        return check_segment(config)

    def __init__(self, config: Any, inputs: SegmentInputs, env, device: torch.device) -> None:
        super().__init__(config, inputs, env, device)
        seg, size = config.seg, inputs.arch["img_size"]
        self.window = (size, config.seg.eval_stride or max(1, size * 2 // 3))
        self.segment = SegmentSpec(
            config.data.mask_key, inputs.eval_size, tuple(seg.scale), inputs.num_classes, inputs.ignore_index
        )
        self.view_spec = ViewSpec(
            size,
            mode_for(inputs.arch["in_chans"]),
            hflip=config.data.hflip,
            image_key=config.data.image_key,
            segment=self.segment,
        )
        classes = inputs.shards.classes
        self.classes = (
            classes if len(classes) == inputs.num_classes else [str(c) for c in range(inputs.num_classes)]
        )

    def description(self) -> dict[str, Any]:
        inputs, seg = self.inputs, self.config.seg
        return {
            "backbone": inputs.weights.source if inputs.weights else "random init (init.from=none)",
            "source": self.config.init.from_,
            "arch": inputs.arch,
            "num_classes": inputs.num_classes,
            "classes": self.classes,
            "ignore_index": inputs.ignore_index,
            "load_report": self.report,
            "seg": {
                "head": seg.head,
                "blocks": seg.blocks,
                "crop": inputs.arch["img_size"],
                "eval_size": inputs.eval_size,
                "eval_window": list(self.window),
            },
        }

    def build_model(self):
        config, inputs, seg = self.config, self.inputs, self.config.seg
        model, self.report = build_segmentation_probe(
            inputs.arch, inputs.weights, inputs.num_classes, seg.blocks, seg.head, seg.hidden
        )
        return model, param_groups(model.head, weight_decay=config.optim.weight_decay)

    def data(self, session: Session):
        source = super().data(session)
        if self.config.seg.cache_features:
            from mim.tasks.cached_windows import CachedWindows

            self.source = CachedWindows(source, session, self)
        return self.source

    def callbacks(self, session: Session) -> list[Callback]:
        evaluate_split = getattr(self.source, "evaluate_split", self.evaluate_split)
        self.evaluation = SegmentationEvaluation(
            self.stage,
            self.inputs.splits,
            self.description(),
            session.run_dir,
            self.env.is_main,
            evaluate_split,
            self.picture,
        )
        return [self.evaluation]

    def logits(self, model: Any, images: torch.Tensor) -> torch.Tensor:
        return model(images)

    def loss(
        self, engine: Any, inputs: torch.Tensor, masks: torch.Tensor, step: int, micro: int
    ) -> torch.Tensor:
        logits = F.interpolate(
            engine(inputs).float(), size=masks.shape[-2:], mode="bilinear", align_corners=False
        )
        ignore, masks = self.inputs.ignore_index, masks.long()  # cached masks are kept in bytes
        summed = F.cross_entropy(logits, masks, ignore_index=ignore, reduction="sum")
        return summed / (masks != ignore).sum().clamp(min=1)  # the mean over labelled pixels, no host sync

    def evaluate_split(self, split: str) -> dict:
        """mIoU, IoU per class, pixel accuracy on the selection split ("select") or data.val ("test")."""
        shards, subset = self.split_shards(split)
        data = self.config.data
        return self.with_eval_model(
            lambda logits_of: evaluate_segmentation(
                logits_of,
                shards,
                eval_spec(self.view_spec),
                self.env,
                self.device,
                (data.batch_size, data.num_workers),
                self.window,
                subset,
            )
        )

    def picture(self, what: str) -> torch.Tensor | None:
        """The first images of data.val, their masks and the model's prediction, also written to
        RUN_DIR/segmentation.png; drawn by the main rank (every rank gathers at ZeRO 3)."""
        stream = EvalStream(
            self.inputs.splits.test, eval_spec(self.view_spec), 0, 1, 1.0, range(PICTURE_IMAGES)
        )
        samples = list(stream) if self.env.is_main else []

        def run(logits_of):
            images = [image.to(self.device) for image, _, _ in samples]
            return (
                [logits.argmax(0).cpu() for logits in predict(logits_of, images, *self.window)]
                if samples
                else []
            )

        predictions = self.with_eval_model(run)
        if not samples:
            return None
        side = self.inputs.eval_size
        images = torch.stack([resize_image(image, (side, side)) for image, _, _ in samples])
        masks = [resize_mask(mask, (side, side)) for _, mask, _ in samples]
        predictions = [resize_mask(p, (side, side)) for p in predictions]
        picture = segmentation_picture(
            images, masks, predictions, self.classes, self.inputs.ignore_index, what
        )
        save_png(picture, self.session.run_dir / "segmentation.png")
        return picture

    def meta(self) -> dict[str, Any]:
        description = self.description()
        return {
            "backbone": {"arch": description["arch"], "source": description["source"]},
            "num_classes": description["num_classes"],
            "seg": description["seg"],
            "metrics": self.evaluation.chosen if self.evaluation else None,
        }

    def summary(self) -> str:
        test = self.evaluation.chosen if self.evaluation else None
        if not test:
            return ""
        return f"; data.val mIoU {test['miou']:.2f} (epoch {test['epoch']:g}, chosen on {test['chosen_on']})"
