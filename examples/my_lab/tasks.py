"""A task of our own: rotation prediction (Gidaris et al. 2018), a self-supervised pretext task.
Every image is turned by 0, 90, 180 or 270 degrees and a ViT with a 4-way head says which. It
reads fine-tuning's config keys, trains through mim's loop (DeepSpeed, checkpoints, resume,
Slurm requeue, TensorBoard) and shows its accuracy in the step's log line.

    mim train --task my_lab.tasks:Rotation --config finetune/debug init.from=none \
        model.name=mae_vit_debug data.train=SHARDS data.val=SHARDS run.dir=runs/rotation
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from mim.config import FinetuneConfig
from mim.data.streams import ViewSpec
from mim.distributed import all_reduce_sum
from mim.engine.data import StreamData
from mim.engine.optim import param_groups
from mim.engine.task import Task
from mim.models.classifier import build_finetune_vit
from mim.recipe import check_classify


class Rotation(Task):
    schema = FinetuneConfig

    @classmethod
    def check(cls, config: FinetuneConfig):
        return check_classify(config)  # init.from, the shards, the optimizer: before any work

    def __init__(self, config: FinetuneConfig, inputs: Any, env, device: torch.device) -> None:
        super().__init__(config, inputs, env, device)
        self.correct = torch.zeros((), device=device)  # since the last log line

    def build(self):
        torch.manual_seed(self.config.run.seed)
        arch, config = self.inputs.arch, self.config
        model, _ = build_finetune_vit(
            arch, self.inputs.weights, 4, config.model.global_pool, config.model.drop_path
        )
        return model, param_groups(model, config.optim.weight_decay)

    def data(self, session):
        arch = self.inputs.arch
        view = ViewSpec(arch["img_size"], "L" if arch["in_chans"] == 1 else "RGB", hflip=False)
        return StreamData(
            self.config, self.inputs.shards, view, self.env.rank, self.device, session.input_dtype
        )

    def loss(
        self, engine: Any, inputs: torch.Tensor, labels: torch.Tensor, step: int, micro: int
    ) -> torch.Tensor:
        quarters = [inputs[k::4] for k in range(4)]  # a quarter of the batch per rotation
        rotated = torch.cat([torch.rot90(part, k, dims=(2, 3)) for k, part in enumerate(quarters)])
        turns = torch.cat(
            [torch.full((len(part),), k, device=inputs.device) for k, part in enumerate(quarters)]
        )
        logits = engine(rotated).float()
        self.correct += (logits.argmax(dim=1) == turns).sum()
        return F.cross_entropy(logits, turns)

    def describe_loss(self, loss: float, micro_losses: int, report) -> str:
        seen = micro_losses * self.config.data.batch_size
        accuracy = 100 * all_reduce_sum(self.correct.clone()).item() / seen
        self.correct.zero_()
        report({"train/rotation_accuracy": accuracy})
        return f"loss {loss:.4f}  rotation accuracy {accuracy:.1f} %"
