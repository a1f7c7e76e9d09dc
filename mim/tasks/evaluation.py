"""Classification evaluation as a callback: at epoch ends (`eval.every_epochs`) and at the last
step, per-head top-1/top-5 on the selection split (a held-out share of data.train); where that
beats every earlier evaluation, the model as it is now becomes the choice and is evaluated on
data.val, which never takes part in the choice. Everything goes to RUN_DIR/metrics.json (each
evaluation, the choice and its data.val figure) and to the scalars."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mim.engine.callbacks import Callback
from mim.engine.evaluate import EvaluationSplits
from mim.files import atomic_write_text
from mim.runtime import peak_memory

log = logging.getLogger(__name__)
METRICS_FILE = "metrics.json"


class ChoosingEvaluation(Callback):
    """What every evaluation that chooses on one split and reports another shares: when it runs,
    metrics.json (kept across resumes), and the cost so far beside the figures. A subclass's
    `evaluate_now(loop)` evaluates and records; `finish(loop)` then writes."""

    def __init__(
        self, stage: str, splits: EvaluationSplits, description: dict[str, Any], run_dir: Path, is_main: bool
    ) -> None:
        self.stage, self.splits, self.description = stage, splits, description
        self.path, self.is_main = Path(run_dir) / METRICS_FILE, is_main
        self.metrics = self.load_metrics()

    @property
    def chosen(self) -> dict | None:
        """The choice so far on data.val, None before any."""
        return self.metrics.get("test")

    def after_step(self, loop) -> None:
        every = max(1, round(loop.config.eval.every_epochs * loop.plan.steps_per_epoch))
        if loop.step % every == 0 or loop.step == loop.plan.total_steps:
            self.evaluate_now(loop)

    def evaluate_now(self, loop) -> dict:
        raise NotImplementedError

    def load_metrics(self) -> dict:
        metrics = {"stage": self.stage, **self.description, "evaluations": []}
        if self.path.is_file():  # resuming: keep what earlier attempts measured
            metrics["evaluations"] = json.loads(self.path.read_text()).get("evaluations", [])
        return metrics

    def finish(self, loop) -> None:
        self.metrics["cost"] = {"step_seconds": round(loop.step_seconds, 4), **peak_memory(loop.device)}
        log.info(
            "%s cost so far: %.3f s/step, peak memory %.2f GiB (%s)",
            self.stage,
            loop.step_seconds,
            self.metrics["cost"]["peak_memory_gib"],
            self.metrics["cost"]["measured"],
        )
        if self.is_main:
            atomic_write_text(self.path, json.dumps(self.metrics, indent=1))


class ClassificationEvaluation(ChoosingEvaluation):
    def __init__(
        self,
        stage: str,
        splits: EvaluationSplits,
        description: dict[str, Any],
        run_dir: Path,
        is_main: bool,
        evaluate_split: Callable[[str], dict],
    ) -> None:
        """`evaluate_split("select" | "test")`: per-head top1, top5 (lists) and num_samples on the
        selection split or on data.val; every rank calls it."""
        super().__init__(stage, splits, description, run_dir, is_main)
        self.evaluate_split = evaluate_split

    def evaluate_now(self, loop) -> dict:
        result = self.evaluate_split("select")
        step, epoch = loop.step, loop.step / loop.plan.steps_per_epoch
        record = {"epoch": round(epoch, 3), "step": step, **result}
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
        scalars = {"eval/top1": result["top1"][head], "eval/top5": result["top5"][head]}
        scalars.update({f"eval/top1_head{number}": value for number, value in enumerate(result["top1"])})
        loop.report(scalars)
        self.summarize(before=step)
        chosen = self.chosen
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
            loop.report({"test/top1": test["top1"][head]})
        self.metrics["evaluations"].append(record)
        self.summarize(before=step + 1)
        self.finish(loop)
        return record

    def summarize(self, before: int) -> None:
        """Keeps the evaluations of steps before `before` (an earlier attempt may have gone past
        the checkpoint this one resumed from); `final`: the last one's best head on the selection
        split; `test`: the choice (the evaluation whose best head led on the selection split) on
        data.val, as reported."""
        metrics = self.metrics
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
