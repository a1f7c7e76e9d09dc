"""A run's AdamW state moved to another number of processes or another ZeRO stage.

DeepSpeed resumes its own files only where they were written: ZeRO stages 1 to 3 split the
optimizer state into one flat partition per process, and a checkpoint of one stage does not load
at another. mim reads those files itself, into one portable state per parameter name (its first
and second moments and its step count), and writes that into an engine of any stage on any number
of processes. The weights come from the checkpoint's `model.safetensors` (the fp32 weights, which
are also the fp32 master weights: mim trains in fp32 or autocast, never with half weights).

The flat layouts read here are DeepSpeed's own. Stages 1 and 2: a group's partitions,
concatenated in rank order, hold its parameters in the order of `param_shapes` (the model states
file), each followed by its alignment padding (`param_alignment_paddings`, from the optimizer
shards). Stage 3: every parameter is cut into one slice per rank of ceil(numel / ranks) values
(the last padded), and a rank's flat group holds its slices in the order of `param_shapes`.
Stage 0 files hold a torch optimizer state_dict whose groups carry the parameters' names (mim's
param groups do).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from mim.errors import UserInputError

MOMENTS = ("exp_avg", "exp_avg_sq")


def _load(path: Path) -> dict:
    # DeepSpeed's own files of this run (verified against the manifest before this is called):
    # they hold DeepSpeed objects, so they need the full unpickler, as DeepSpeed's own load does.
    return torch.load(path, map_location="cpu", weights_only=False, mmap=True)


def optimizer_state(model_states: Path, shards: list[Path]) -> dict[str, dict[str, torch.Tensor]]:
    """name -> {"exp_avg", "exp_avg_sq", "step"} for every trained parameter, from DeepSpeed's model
    states file and its ZeRO optimizer shards in rank order (none at stage 0); any stage (0 to 3),
    any number of processes. (mim.checkpoint knows where the files are.)"""
    saved = _load(model_states)
    if not shards:
        return _from_torch_optimizer(saved["optimizer"], model_states)
    loaded = [_load(path) for path in shards]
    if int(loaded[0]["optimizer_state_dict"]["zero_stage"]) == 3:
        return _from_partitioned_shards(saved["param_shapes"], loaded, model_states)
    return _from_zero_shards(saved["param_shapes"], loaded, model_states)


def _from_torch_optimizer(saved: dict, where: Path) -> dict[str, dict[str, torch.Tensor]]:
    state = {}
    for group in saved["param_groups"]:
        if "names" not in group:
            raise UserInputError(
                f"{where}: its optimizer groups carry no parameter names; it cannot be moved"
            )
        for index, name in zip(group["params"], group["names"], strict=True):
            if index in saved["state"]:
                entry = saved["state"][index]
                state[name] = {key: entry[key] for key in (*MOMENTS, "step")}
    return state


def _from_zero_shards(
    param_shapes: list[dict], shards: list[dict], where: Path
) -> dict[str, dict[str, torch.Tensor]]:
    optimizers = [shard["optimizer_state_dict"] for shard in shards]
    paddings = optimizers[0].get("param_alignment_paddings")
    state: dict[str, dict[str, torch.Tensor]] = {}
    for group, shapes in enumerate(param_shapes):
        flats = {
            key: torch.cat(
                [optimizer["base_optimizer_state"]["state"][group][key] for optimizer in optimizers]
            )
            for key in MOMENTS
        }
        step = optimizers[0]["base_optimizer_state"]["state"][group]["step"]
        offset = 0
        for index, (name, shape) in enumerate(shapes.items()):
            numel = math.prod(shape)
            state[name] = {
                key: flat[offset : offset + numel].view(shape).clone() for key, flat in flats.items()
            }
            state[name]["step"] = step.clone()
            offset += numel + (paddings[group][index] if paddings is not None else 0)
        if offset > flats["exp_avg"].numel():
            raise UserInputError(
                f"{where}: group {group} holds {flats['exp_avg'].numel()} values, its shapes need {offset}"
            )
    return state


def _from_partitioned_shards(
    param_shapes: list[dict], shards: list[dict], where: Path
) -> dict[str, dict[str, torch.Tensor]]:
    optimizers = [shard["optimizer_state_dict"] for shard in shards]
    ranks = len(optimizers)
    state: dict[str, dict[str, torch.Tensor]] = {}
    for group, shapes in enumerate(param_shapes):
        flats = [optimizer["optimizer_state_dict"]["state"][group] for optimizer in optimizers]
        offset = 0
        for name, shape in shapes.items():
            numel = math.prod(shape)
            part = math.ceil(numel / ranks)
            state[name] = {
                key: torch.cat([flat[key][offset : offset + part] for flat in flats])[:numel]
                .view(shape)
                .clone()
                for key in MOMENTS
            }
            state[name]["step"] = flats[0]["step"].clone()
            offset += part
        if offset > flats[0]["exp_avg"].numel():
            raise UserInputError(
                f"{where}: group {group} holds {flats[0]['exp_avg'].numel()} values per rank, its shapes need {offset}"
            )
    return state


def load_into(
    engine: Any,
    weights: dict[str, torch.Tensor],
    state: dict[str, dict[str, torch.Tensor]],
    trained_only: bool = False,
) -> None:
    """Sets the engine's module to `weights` and its optimizer to `state`, at whatever stage and on
    however many processes it runs (every rank calls it). `trained_only`: `weights` lack the frozen
    parameters, which keep the values the module has."""
    _check_names(engine.module, weights, trained_only)
    if engine.zero_optimization_stage() == 3:
        _load_partitioned(engine, weights, state)
        return
    engine.module.load_state_dict(weights, strict=False)
    named = [(name, p) for name, p in engine.module.named_parameters() if p.requires_grad]
    missing = [name for name, _ in named if name not in state]
    if missing:
        raise UserInputError(f"the checkpoint's optimizer state has no entry for {missing[:5]}")
    if engine.zero_optimization_stage() == 0:
        for name, parameter in named:
            engine.optimizer.state[parameter] = {
                key: value.to(parameter.device).clone() for key, value in state[name].items()
            }
        return
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    # The flat partitions get their AdamW state at their first step, and DeepSpeed links each
    # parameter to its slice of it then; a resumed engine has not stepped: make both now, as
    # torch's AdamW would (a step tensor and zeroed moments), then fill the slices.
    step = next(iter(state.values()))["step"]
    optimizer = engine.optimizer
    for flat in optimizer.single_partition_of_fp32_groups:
        optimizer.optimizer.state[flat] = {
            "step": step.clone().to(flat.device),
            **{key: torch.zeros_like(flat) for key in MOMENTS},
        }
    optimizer._hp_optimizer_states_linked = False
    optimizer._lazy_init_hp_params_optimizer_state()
    for name, parameter in named:
        safe_set_full_fp32_param(parameter, weights[name].to(parameter.device))
        for key in MOMENTS:
            safe_set_full_optimizer_state(parameter, state[name][key].to(parameter.device), key)


def _check_names(module: Any, weights: dict[str, torch.Tensor], trained_only: bool) -> None:
    expected = set(module.state_dict())
    if trained_only:
        expected -= {name for name, parameter in module.named_parameters() if not parameter.requires_grad}
    if set(weights) != expected:
        raise UserInputError(
            f"the checkpoint's weights do not fit this model: missing {sorted(expected - set(weights))[:5]}, "
            f"unexpected {sorted(set(weights) - expected)[:5]}"
        )


def _load_partitioned(
    engine: Any, weights: dict[str, torch.Tensor], state: dict[str, dict[str, torch.Tensor]]
) -> None:
    """Stage 3: each parameter's own slice (what forward gathers) and the optimizer's fp32 slice
    and moments."""
    import deepspeed

    module = engine.module
    named = [(name, parameter) for name, parameter in module.named_parameters() if name in weights]
    missing = [name for name, p in named if p.requires_grad and name not in state]
    if missing:
        raise UserInputError(f"the checkpoint's optimizer state has no entry for {missing[:5]}")
    for name, parameter in named:
        with deepspeed.zero.GatheredParameters([parameter], modifier_rank=0):
            parameter.data.copy_(weights[name].to(parameter.device))
    for name, buffer in module.named_buffers():
        if name in weights:
            buffer.data.copy_(weights[name].to(buffer.device))
    optimizer = engine.optimizer
    step = next(iter(state.values()))["step"]
    for flat in optimizer.fp32_partitioned_groups_flat:  # created here where DeepSpeed has not yet
        held = optimizer.optimizer.state[flat]
        held["step"] = step.clone().to(flat.device)
        for key in MOMENTS:
            held.setdefault(key, torch.zeros_like(flat))
    for name, parameter in named:
        if parameter.requires_grad:
            _set_own_slice(optimizer, parameter, weights[name])
            for key in MOMENTS:
                _set_own_slice(optimizer, parameter, state[name][key], key)


def _set_own_slice(
    optimizer: Any, parameter: torch.Tensor, value: torch.Tensor, key: str | None = None
) -> None:
    """This rank's slice of `value` into the fp32 master copy (key None) or the moment `key` of
    `parameter`: DeepSpeed's own safe_set_full_* reads past the end of a tensor whose size the
    ranks do not divide (its last slice is padded), so the slice is cut here, padded alike."""
    held, _ = optimizer._get_fp32_opt_state_partition(parameter, False, optim_state_key=key)
    size, rank = held.numel(), optimizer._get_param_partition_rank(parameter)
    flat = value.reshape(-1).to(held.device, held.dtype)
    padded = torch.nn.functional.pad(flat, (0, max(0, (rank + 1) * size - flat.numel())))
    held.data.copy_(padded[rank * size : (rank + 1) * size])
