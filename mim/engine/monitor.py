"""The online kNN monitor of pretraining: every `monitor.every` steps (and at step 0 and the last
step) the current encoder (eval mode, no masking, bf16 autocast on GPU) embeds a labelled bank and
a labelled validation split, every sample once across ranks, and a weighted kNN classifier gives
top-1/top-5. The result goes to the log, to TensorBoard (monitor/knn_top1, monitor/knn_top5) and
to RUN_DIR/monitor.json.

It leaves training alone: no global RNG is drawn (its loaders have their own generator), the
training data stream is not touched, and the model is back in train mode after.
Its schedule is a pure function of the step, so a resumed run neither repeats nor skips one.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path

import torch

from mim.config import MonitorConfig
from mim.data.streams import ViewSpec
from mim.distributed import DistEnv
from mim.engine.callbacks import Callback
from mim.engine.evaluate import KnnSplits, knn_evaluate
from mim.files import atomic_write_text
from mim.models.mae import MaskedAutoencoderViT
from mim.pictures import line_chart

log = logging.getLogger(__name__)
MONITOR_FILE = "monitor.json"


class KnnMonitor(Callback):
    """A callback of pretraining: at step 0 (the encoder before any training), every
    `monitor.every` steps and at the last one."""

    def __init__(
        self,
        config: MonitorConfig,
        splits: KnnSplits,
        view_spec: ViewSpec,
        env: DistEnv,
        device: torch.device,
        run_dir: Path,
        bf16: bool,
    ) -> None:
        self.config, self.splits, self.env, self.device = config, splits, env, device
        self.spec = ViewSpec(
            view_spec.img_size,
            view_spec.mode,
            needs_label=True,
            image_key=view_spec.image_key,
            label_key=view_spec.label_key,
        )
        self.path = Path(run_dir) / MONITOR_FILE
        self.bf16 = bf16
        self.evaluations: list[dict] = []

    def due(self, step: int, total_steps: int) -> bool:
        return step % self.config.every == 0 or step == total_steps

    def before_loop(self, loop) -> None:
        self.start_at(loop.step)
        if loop.step == 0:
            self.evaluate_in(loop)

    def after_step(self, loop) -> None:
        if self.due(loop.step, loop.plan.total_steps):
            self.evaluate_in(loop)

    def evaluate_in(self, loop) -> None:
        with loop.session.unsharded() as module:
            record = self.evaluate(
                module, loop.data.normalize, loop.step, loop.step * loop.plan.effective_batch
            )
        loop.report(
            {
                "monitor/knn_top1": record["top1"],
                "monitor/knn_top5": record["top5"],
                "monitor/seconds": record["seconds"],
            }
        )
        loop.flush()

    def start_at(self, step: int) -> None:
        """Keeps the evaluations of the timeline being resumed (steps up to `step`); those of a
        run that died after its last checkpoint are dropped, to be made again."""
        if step > 0 and self.path.is_file():
            recorded = json.loads(self.path.read_text()).get("evaluations", [])
            self.evaluations = [e for e in recorded if e["step"] <= step]
        else:
            self.evaluations = []

    def evaluate(
        self,
        model: MaskedAutoencoderViT,
        normalize: Callable[[torch.Tensor], torch.Tensor],
        step: int,
        samples_seen: int,
    ) -> dict:
        """Runs on every rank (the features are gathered); returns this step's record.
        `normalize`: uint8 images -> the model's input (on its device, in its dtype)."""
        started = time.monotonic()
        was_training = model.training
        model.eval()
        autocast = (
            torch.autocast(self.device.type, dtype=torch.bfloat16) if self.bf16 else contextlib.nullcontext()
        )

        def features_of(images: torch.Tensor) -> torch.Tensor:
            with autocast:
                tokens = model.forward_features(normalize(images))  # (N, 1 + L, D)
            return tokens[:, 1:].mean(1) if self.config.global_pool == "avg" else tokens[:, 0]

        loader = (self.config.batch_size, self.config.num_workers, self.config.crop_fraction)
        try:
            result = knn_evaluate(
                features_of,
                self.splits,
                self.spec,
                self.env,
                self.device,
                loader,
                self.config.k,
                self.config.temperature,
                generator=torch.Generator(),
            )
        finally:
            model.train(was_training)
        record = {"step": step, "samples_seen": samples_seen, **result}
        record["seconds"] = round(time.monotonic() - started, 3)
        self.evaluations = [e for e in self.evaluations if e["step"] != step] + [record]
        log.info(
            "monitor step %d: kNN top-1 %.2f %%  top-5 %.2f %%  (k %d, bank %d, val %d) in %.1f s",
            step,
            record["top1"],
            record["top5"],
            self.config.k,
            record["num_bank"],
            record["num_val"],
            record["seconds"],
        )
        if self.env.is_main:
            self._write()
        return record

    def _write(self) -> None:
        document = {
            "k": self.config.k,
            "temperature": self.config.temperature,
            "global_pool": self.config.global_pool,
            "bank": self.config.bank,
            "val": self.config.val,
            "bank_samples": self.config.bank_samples,
            "val_samples": self.config.val_samples,
            "evaluations": self.evaluations,
        }
        atomic_write_text(self.path, json.dumps(document, indent=1))


def knn_chart(run_dir: Path, picture: Path) -> list[dict]:
    """The kNN top-1 of a run's monitor.json over the images seen, drawn as a chart; returns the
    evaluations (step, samples seen, top-1, top-5)."""
    monitor = json.loads((Path(run_dir) / MONITOR_FILE).read_text())
    evaluations = monitor["evaluations"]
    last = evaluations[-1]
    line_chart(
        {"kNN top-1 (monitor)": [(e["samples_seen"], e["top1"]) for e in evaluations]},
        picture,
        f"Online kNN top-1 during pretraining: run {Path(run_dir).name}, to step {last['step']} "
        f"(k {monitor['k']}, bank {last['num_bank']}, val {last['num_val']})",
        "images seen",
        "top-1 %",
    )
    return [{k: e[k] for k in ("step", "samples_seen", "top1", "top5")} for e in evaluations]
