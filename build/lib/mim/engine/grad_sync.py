"""Gradient averaging across data-parallel processes at ZeRO stage 0, overlapped with the
backward pass as torch's DistributedDataParallel does it.

DeepSpeed's stage-0 path waits for the whole backward pass, then flattens every gradient into one
buffer, scales it, all-reduces it and copies it back: three extra passes over the gradients and
communication that nothing hides. Here the parameters are grouped into buckets of about
`bucket_bytes` in reverse registration order (about the order backward produces their
gradients). A hook on each parameter counts the gradients that are complete; when a bucket's last
one is, its gradients are copied into the bucket in one `cat` and the bucket's all-reduce (a sum)
starts at once, asynchronously, while backward goes on. The caller scales the loss by
`loss_scale` (1 / world size), so the sum is the average with no pass over the gradients.
Buckets start strictly in order, so every rank issues the same collectives in the same order.
`finish()` starts what is left (a parameter that got no gradient counts as zero, as in
DeepSpeed), waits, and leaves each parameter's `.grad` as a view of its bucket: the averages are
never copied back.

Only the last micro-batch of an accumulated step communicates (`arm()` before its backward), as
DDP's `no_sync()` does for the others.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

FIRST_BUCKET_BYTES = 1 << 20  # small, so the first all-reduce starts early in backward (as DDP)
BUCKET_BYTES = 25 << 20  # DDP's default bucket_cap_mb


@dataclass
class _Bucket:
    parameters: list[nn.Parameter]
    flat: torch.Tensor
    views: list[torch.Tensor] = field(default_factory=list)
    waiting: int = 0  # parameters of this step whose gradient is not in the bucket yet


class GradientSync:
    def __init__(
        self,
        parameters: list[nn.Parameter],
        world_size: int,
        bucket_bytes: int = BUCKET_BYTES,
        first_bucket_bytes: int = FIRST_BUCKET_BYTES,
    ) -> None:
        self.loss_scale = 1.0 / world_size  # for every micro-batch's loss: the sums are averages
        self.buckets = _make_buckets(list(reversed(parameters)), bucket_bytes, first_bucket_bytes)
        self.armed = False
        self.next_to_start = 0
        self.handles: list[dist.Work] = []
        for bucket in self.buckets:
            for parameter in bucket.parameters:
                parameter.register_post_accumulate_grad_hook(
                    lambda _, bucket=bucket: self._on_gradient(bucket)
                )

    def arm(self) -> None:
        """The next backward pass is the last of this step: its gradients are averaged."""
        for bucket in self.buckets:
            bucket.waiting = len(bucket.parameters)
        self.next_to_start, self.handles, self.armed = 0, [], True

    def _on_gradient(self, bucket: _Bucket) -> None:
        """Runs once per parameter per backward pass: kept to a count."""
        if not self.armed:
            return
        bucket.waiting -= 1
        while self.next_to_start < len(self.buckets) and self.buckets[self.next_to_start].waiting == 0:
            self._start(self.buckets[self.next_to_start])

    def _start(self, bucket: _Bucket) -> None:
        grads = [p.grad for p in bucket.parameters]
        pairs = list(zip(grads, bucket.views, strict=True))
        if all(grad is not None and not grad.is_set_to(view) for grad, view in pairs):
            torch.cat([grad.reshape(-1) for grad in grads], out=bucket.flat)  # the usual case: one copy
        else:  # a parameter backward never reached (from finish()), or a .grad still the bucket's view
            for grad, view in pairs:  # (an optimizer that zeroes .grad in place instead of dropping it)
                if grad is None:
                    view.zero_()
                elif not grad.is_set_to(view):
                    view.copy_(grad)
        self.handles.append(dist.all_reduce(bucket.flat, async_op=True))
        self.next_to_start += 1

    def finish(self) -> None:
        """Waits for every bucket; each parameter's `.grad` is then the average over the ranks."""
        assert self.armed, "GradientSync.finish() without arm() before the backward pass"
        while self.next_to_start < len(self.buckets):
            self._start(self.buckets[self.next_to_start])
        for handle in self.handles:
            handle.wait()
        for bucket in self.buckets:
            for parameter, view in zip(bucket.parameters, bucket.views, strict=True):
                parameter.grad = view
        self.armed, self.handles = False, []


def _make_buckets(
    parameters: list[nn.Parameter], bucket_bytes: int, first_bucket_bytes: int
) -> list[_Bucket]:
    """Consecutive parameters of one dtype and device, up to the byte cap per bucket."""
    groups: list[list[nn.Parameter]] = []
    size = 0
    for parameter in parameters:
        cap = first_bucket_bytes if len(groups) <= 1 else bucket_bytes
        nbytes = parameter.numel() * parameter.element_size()
        same_kind = groups and (groups[-1][0].dtype, groups[-1][0].device) == (
            parameter.dtype,
            parameter.device,
        )
        if not groups or not same_kind or size + nbytes > cap:
            groups.append([])
            size = 0
        groups[-1].append(parameter)
        size += nbytes
    buckets = []
    for members in groups:
        flat = torch.empty(sum(p.numel() for p in members), dtype=members[0].dtype, device=members[0].device)
        bucket = _Bucket(members, flat)
        offset = 0
        for parameter in members:
            bucket.views.append(flat[offset : offset + parameter.numel()].view_as(parameter))
            offset += parameter.numel()
        buckets.append(bucket)
    return buckets
