"""One optimizer step through the DeepSpeed engine, exactly as every training stage runs it (and
as benchmarks/pretrain_step.py times it): the lr of the schedule, `accum_steps` micro-batches of
forward and backward (at stage 0 on several processes, the gradients averaged during the last
backward: engine.grad_sync), the gradient norm (and, at ZeRO stage 0, the clipping), `engine.step()`.

The step's health is recorded on the device (mim.engine.health) from values the step computes
anyway: the loss on every step, the gradient norm where it is computed (where it clips, and on the steps that are
logged: by mim at stage 0, by ZeRO at stages 1 to 3). Nothing here waits for the device. The
training loop reads the health at log and checkpoint steps, and checks the weights before a checkpoint
(a non-finite gradient between logged steps leaves non-finite weights), so a bad step never
reaches a checkpoint.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from mim.engine.deepspeed_engine import EngineSettings, engine_param_groups
from mim.engine.grad_sync import GradientSync
from mim.engine.health import LossWatch
from mim.engine.schedule import apply_lr


class StepRunner:
    def __init__(
        self, engine, settings: EngineSettings, device: torch.device, overlap_all_reduce: bool = True
    ) -> None:
        """`overlap_all_reduce`: at stage 0 on several processes, mim's GradientSync averages the
        gradients during backward instead of DeepSpeed after it (False: DeepSpeed's, to measure)."""
        self.engine, self.device = engine, device
        self.accum_steps = settings.accum_steps
        self.grad_clip = settings.grad_clip
        # ZeRO keeps gradients in its own partitions and computes their norm itself; at stage 0
        # they are the parameters' .grad and the norm is ours.
        self.own_grad_norm = settings.resolved_zero_stage == 0
        self.parameters = [p for p in engine.module.parameters() if p.requires_grad]
        self.grad_sync = None
        self.zero_norm_switch = not self.own_grad_norm and hasattr(engine.optimizer, "compute_grad_norm")
        if self.own_grad_norm and settings.world_size > 1 and overlap_all_reduce:
            self.grad_sync = GradientSync(self.parameters, settings.world_size)
            engine.enable_backward_allreduce = False
        self.watch = LossWatch(device)  # the training loop sets one that also looks for spikes
        self.grad_norm: torch.Tensor | None = None  # of the last step; None where none was computed

    def run(
        self, step_number: int, lr: float, micro_loss: Callable[[int], torch.Tensor], want_norm: bool = False
    ) -> torch.Tensor:
        """Step `step_number` (1-based) at learning rate `lr`; `micro_loss(i)` is the loss of
        micro-batch i through the engine; `want_norm`: this step's gradient norm will be read.
        Returns the sum of the micro-batch losses, on device."""
        self.grad_norm = None
        apply_lr(engine_param_groups(self.engine), lr)
        loss_sum = torch.zeros((), device=self.device)
        for micro in range(self.accum_steps):
            last = micro == self.accum_steps - 1
            if last and self.grad_sync is not None:
                self.grad_sync.arm()
            loss = micro_loss(micro)
            self.engine.backward(loss if self.grad_sync is None else loss * self.grad_sync.loss_scale)
            if last and self.grad_sync is not None:
                self.grad_sync.finish()
            if last and self.own_grad_norm and (want_norm or self.grad_clip):
                self.grad_norm = self.norm_and_clip()
            if last and self.zero_norm_switch:
                # ZeRO computes the norm (per-tensor norms, an all-reduce, a host read) only where
                # it clips or the norm is read, as stage 0 does.
                self.engine.optimizer.compute_grad_norm = bool(want_norm or self.grad_clip)
            self.engine.step()
            loss_sum += loss.detach().float()
        if not self.own_grad_norm:
            self.grad_norm = self.engine_grad_norm()
        self.watch.record(step_number, loss_sum, self.grad_norm)
        return loss_sum

    def norm_and_clip(self) -> torch.Tensor:
        grads = [p.grad for p in self.parameters if p.grad is not None]
        if not grads:
            return torch.zeros((), device=self.device)
        norm = torch.nn.utils.get_total_norm(grads, foreach=True)
        if self.grad_clip:
            torch.nn.utils.clip_grads_with_norm_(self.parameters, self.grad_clip, norm, foreach=True)
        return norm

    def engine_grad_norm(self) -> torch.Tensor | None:
        norm = self.engine.get_global_grad_norm()  # a device tensor, inf (a skipped step), or None
        if norm is None or torch.is_tensor(norm):
            return None if norm is None else norm.detach().reshape(()).float()
        return torch.full((), float(norm), device=self.device)  # a fill, not a host-to-device copy

    def first_bad(self) -> int:
        """The first step whose loss or gradient norm was not finite (or a spike), or -1 (waits for
        the device)."""
        return self.watch.first_bad()

    def weights_are_finite(self) -> bool:
        """One pass over the weights (waits for the device): for checkpoint steps only."""
        # At ZeRO 3 a parameter's own values are its partition (ds_tensor).
        held = [getattr(p, "ds_tensor", p).detach() for p in self.parameters]
        return bool(torch.stack([t.isfinite().all() for t in held]).all())
