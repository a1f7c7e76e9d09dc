"""The training step (mim.engine.step.StepRunner on a real DeepSpeed engine, one gloo process):
it does the plain loop's math, clips only when asked, and records a non-finite loss, gradient or
weight without reading the device on every step."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from mim.distributed import init_distributed, read_dist_env
from mim.engine.deepspeed_engine import EngineSettings, build_engine, deepspeed_config
from mim.engine.grad_sync import GradientSync
from mim.engine.optim import param_groups
from mim.engine.step import StepRunner
from mim.models import create_model
from tests.conftest import without_key_bias

pytestmark = pytest.mark.slow
LOSS_SCALE = 10.0  # gradient norms of about 3: over DeepSpeed's default clip of 1.0


@pytest.fixture(scope="module")
def device():
    import os

    os.environ["MASTER_PORT"] = "0"
    return init_distributed(read_dist_env({}))


def settings(zero_stage, grad_clip=None, batch=4):
    return EngineSettings(
        micro_batch_size=batch,
        accum_steps=1,
        world_size=1,
        zero_stage=zero_stage,
        precision="fp32",
        grad_clip=grad_clip,
    )


@pytest.mark.parametrize("zero_stage", ["auto", 1])
@pytest.mark.parametrize("grad_clip", [None, 0.05])
def test_mim_step_equals_the_plain_loop_step(device, zero_stage, grad_clip):
    """Same weights after 3 steps as torch's AdamW (0.9, 0.95) with torch's clip_grad_norm_ where
    asked; without optim.grad_clip nothing is clipped (DeepSpeed's own default clips at 1.0)."""
    torch.manual_seed(0)
    model = create_model("mae_vit_debug")
    reference = copy.deepcopy(model)
    reference_optimizer = torch.optim.AdamW(param_groups(reference, 0.05), lr=1e-3, betas=(0.9, 0.95))
    config = settings(zero_stage, grad_clip)
    engine = build_engine(model, param_groups(model, 0.05), config)
    runner = StepRunner(engine, config, device)
    data = torch.Generator().manual_seed(1)
    norms = []
    for step in range(3):
        images, noise = torch.randn(4, 3, 32, 32, generator=data), torch.rand(4, 16, generator=data)
        loss, _, _ = reference(images, mask_ratio=0.75, noise=noise)
        (loss * LOSS_SCALE).backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(reference.parameters(), grad_clip or float("inf"))))
        reference_optimizer.step()
        reference_optimizer.zero_grad()
        runner.run(
            step + 1,
            1e-3,
            lambda micro, i=images, n=noise: engine(i, mask_ratio=0.75, noise=n)[0] * LOSS_SCALE,
            want_norm=True,
        )
        assert float(runner.grad_norm) == pytest.approx(norms[-1], rel=1e-4)
    if grad_clip:
        assert max(norms) > grad_clip  # the clip really acted
    else:
        assert max(norms) > 1.0  # DeepSpeed's default clip at 1.0 would have acted
    for (name, expected), got in zip(reference.named_parameters(), engine.module.parameters(), strict=True):
        expected, got = without_key_bias(name, expected), without_key_bias(name, got)
        assert torch.allclose(expected, got, rtol=1e-4, atol=1e-6), name


@pytest.mark.parametrize("zero_stage", [0, 1])
def test_bf16_is_autocast_over_fp32_weights_as_in_the_plain_loop(device, zero_stage):
    """precision bf16 (here on the CPU, the same DeepSpeed torch_autocast path as on a GPU): fp32
    weights and optimizer, bf16 matmuls; the same weights as a plain loop under torch.autocast."""
    torch.manual_seed(0)
    model = create_model("mae_vit_debug")
    reference = copy.deepcopy(model)
    reference_optimizer = torch.optim.AdamW(param_groups(reference, 0.05), lr=1e-3, betas=(0.9, 0.95))
    config = EngineSettings(4, 1, 1, zero_stage, "bf16", None)
    engine = build_engine(model, param_groups(model, 0.05), config)
    runner = StepRunner(engine, config, device)
    images, noise = torch.randn(4, 3, 32, 32), torch.rand(4, 16)
    for step in range(2):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss, pred, _ = reference(images, mask_ratio=0.75, noise=noise)
        assert pred.dtype == torch.bfloat16  # autocast really ran in bf16
        loss.backward()
        reference_optimizer.step()
        reference_optimizer.zero_grad()
        runner.run(step + 1, 1e-3, lambda micro: engine(images, mask_ratio=0.75, noise=noise)[0])
    assert all(p.dtype == torch.float32 for p in engine.module.parameters())
    for (name, expected), got in zip(reference.named_parameters(), engine.module.parameters(), strict=True):
        expected, got = without_key_bias(name, expected), without_key_bias(name, got)
        assert torch.allclose(expected, got, rtol=1e-3, atol=1e-5), name


def test_one_process_runs_stage_0_without_all_reduce_and_with_fused_adamw():
    config = deepspeed_config(settings("auto"))
    assert config["zero_optimization"]["stage"] == 0 and config["gradient_clipping"] == 0.0
    assert config["timers"]["throughput"]["enabled"] is False
    bf16 = deepspeed_config(EngineSettings(4, 1, 1, 0, "bf16", None))
    assert bf16["torch_autocast"]["enabled"] and "bf16" not in bf16


def test_engine_uses_fused_adamw_and_skips_the_one_process_all_reduce(device):
    model = create_model("mae_vit_debug")
    engine = build_engine(model, param_groups(model, 0.05), settings("auto"))
    assert isinstance(engine.optimizer, torch.optim.AdamW) and engine.optimizer.defaults["fused"] is True
    assert engine.enable_backward_allreduce is False


class SqrtOfZero(nn.Module):
    """loss = sum(sqrt(w * scale)), w = 1: scale 1 is healthy; at scale 0 the loss is finite (0)
    and its gradient is not (0 / 0)."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(4))

    def forward(self, scale: torch.Tensor) -> torch.Tensor:
        return (self.weight * scale).sqrt().sum()


@pytest.mark.parametrize("zero_stage", [0, 1])
def test_a_non_finite_gradient_with_a_finite_loss_is_recorded_at_its_step(device, zero_stage):
    model = SqrtOfZero()
    config = settings(zero_stage, batch=1)
    engine = build_engine(model, param_groups(model, 0.0), config)
    runner = StepRunner(engine, config, device)
    healthy, poisoned = torch.ones(()), torch.zeros(())
    runner.run(1, 1e-3, lambda micro: engine(healthy), want_norm=True)
    assert runner.first_bad() == -1
    runner.run(2, 1e-3, lambda micro: engine(poisoned), want_norm=True)
    assert runner.first_bad() == 2
    runner.run(3, 1e-3, lambda micro: engine(healthy), want_norm=True)
    assert runner.first_bad() == 2  # the first bad step is kept


@pytest.mark.parametrize("zero_stage", [0, 1])
def test_a_non_finite_gradient_on_an_unlogged_step_leaves_weights_the_checkpoint_check_refuses(
    device, zero_stage
):
    """No norm is computed on unlogged, unclipped steps (ZeRO's per-step norm and host read off)."""
    model = SqrtOfZero()
    config = settings(zero_stage, batch=1)
    engine = build_engine(model, param_groups(model, 0.0), config)
    runner = StepRunner(engine, config, device)
    runner.run(1, 1e-3, lambda micro: engine(torch.zeros(())), want_norm=False)
    assert runner.grad_norm is None and runner.first_bad() == -1  # no norm computed: nothing to see
    assert not runner.weights_are_finite()


class Chain(nn.Module):
    """Four linear layers and one parameter that no loss reaches."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.Sequential(*(nn.Linear(64, 64) for _ in range(4)))
        self.unused = nn.Parameter(torch.ones(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x).square().mean()


def test_gradient_sync_starts_buckets_during_backward_and_leaves_the_summed_gradients(device):
    torch.manual_seed(0)
    model, reference = Chain(), Chain()
    reference.load_state_dict(model.state_dict())
    sync = GradientSync(
        list(model.parameters()), world_size=1, bucket_bytes=64 * 65 * 4, first_bucket_bytes=1
    )
    assert len(sync.buckets) >= 4
    inputs = [torch.randn(8, 64) for _ in range(2)]
    model(inputs[0]).backward()  # an accumulated micro-batch: nothing is communicated
    assert sync.next_to_start == 0 and not sync.handles
    sync.arm()
    started_when_input_grad_came = []
    x = inputs[1].clone().requires_grad_()
    x.register_hook(lambda grad: started_when_input_grad_came.append(sync.next_to_start))
    model(x).backward()
    sync.finish()
    assert started_when_input_grad_came[0] >= 2  # the later layers' buckets went out mid-backward
    for x in inputs:
        reference(x).backward()
    for (name, expected), got in zip(reference.named_parameters(), model.parameters(), strict=True):
        if name == "unused":
            assert expected.grad is None and torch.equal(got.grad, torch.zeros(3))  # zero, as DeepSpeed
        else:
            assert torch.allclose(expected.grad, got.grad, rtol=1e-6, atol=1e-7), name
    flats = {bucket.flat.data_ptr() for bucket in sync.buckets}
    assert all(p.grad.untyped_storage().data_ptr() in flats for p in model.parameters())  # no copy back
    # an optimizer that zeroes .grad in place (set_to_none=False) leaves the views as the .grad
    for parameters in (model.parameters(), reference.parameters()):
        for p in parameters:
            if p.grad is not None:
                p.grad.zero_()
    sync.arm()
    model(inputs[0]).backward()
    sync.finish()
    reference(inputs[0]).backward()
    for (name, expected), got in zip(reference.named_parameters(), model.parameters(), strict=True):
        if name != "unused":
            assert torch.allclose(expected.grad, got.grad, rtol=1e-6, atol=1e-7), name
