"""Fine-tuning methods (`finetune.method`): which weights of a fine-tuned ViT train, and the small
modules the parameter-efficient ones add. The classifier head (and the new `fc_norm` of average
pooling) always trains.

    full         every weight (mim's fine-tuning as it always was)
    lora         a low-rank update B A (rank r, scaled by alpha / r) beside the chosen linear
                 layers of every block; B starts at zero, so training starts from the backbone.
                 Mergeable: W + (alpha / r) B A is a plain timm weight.
    adapter      AdaptFormer: a bottleneck MLP (down, GELU, up; up starts at zero) beside every
                 block's MLP, reading the MLP's input, its output scaled and added to the MLP's
    prompt       VPT-deep: in every block, learned tokens placed after the class token on the way
                 in and dropped on the way out; the blocks' outputs keep their length
    last_blocks  the last k blocks and the final norm train, everything before is frozen (the
                 MAE paper's partial fine-tuning). Its weights are plain timm weights.

The added modules keep the backbone's state-dict names (`blocks.3.attn.qkv.weight` stays,
`blocks.3.attn.qkv.lora_a` is new), so the backbone loads before a method is applied, a
checkpoint of the trained weights alone names them plainly, and a merge is a sum per key.
A method of your own subclasses `Method` and is named as `package.module:Class`.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from mim.config import ConfigError, FinetuneMethodConfig
from mim.models.arch import ViTArch
from mim.registry import Registry

ALWAYS_TRAINED = ("head.", "fc_norm.")  # the classifier the stage adds: new, so always trained


class Method:
    """How a fine-tune adapts its backbone. `partial`: only some weights train, so checkpoints keep
    only those (and the backbone they adapt is referenced); `mergeable`: the trained weights fold
    into plain timm weights of the backbone's shape."""

    partial: ClassVar[bool] = True
    mergeable: ClassVar[bool] = False
    options: ClassVar[tuple[str, ...]] = ()  # the finetune.* keys it reads (recorded with it)

    def __init__(self, config: FinetuneMethodConfig) -> None:
        self.config = config

    @property
    def name(self) -> str:
        return getattr(type(self), "registered_name", type(self).__name__)

    def describe(self) -> dict[str, Any]:
        """The method and its options, as meta.json and adapter.json record them."""
        return {"method": self.name, **{key: getattr(self.config, key) for key in self.options}}

    def check(self, arch: ViTArch) -> None:
        """Raises ConfigError where the options do not fit a backbone of `arch` (before any work)."""

    def apply(self, model: nn.Module) -> None:
        """Adds the method's modules to a timm ViT classifier, in place, and freezes what it does not
        train."""
        raise NotImplementedError

    def merge(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Plain timm weights from an adapted model's whole state (mergeable methods only)."""
        raise ConfigError(
            f"finetune.method={self.name} cannot be merged into plain timm weights: its modules "
            "change what the model computes; load the adapter weights onto the backbone instead "
            "(docs/export.md)"
        )


METHODS = Registry("fine-tuning method", "finetune.method", base=Method)


def method_of(config: FinetuneMethodConfig) -> Method:
    return METHODS.get(config.method)(config)


def from_description(description: dict[str, Any]) -> Method:
    """The method a checkpoint or an adapter.json describes."""
    options = {key: value for key, value in description.items() if key != "method"}
    return METHODS.get(description["method"])(FinetuneMethodConfig(method=description["method"], **options))


def freeze_backbone(model: nn.Module) -> None:
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(name.startswith(ALWAYS_TRAINED))


def trained_names(model: nn.Module) -> set[str]:
    return {name for name, parameter in model.named_parameters() if parameter.requires_grad}


@METHODS.register("full")
class Full(Method):
    partial = False
    mergeable = True

    def apply(self, model: nn.Module) -> None:
        pass

    def merge(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return dict(state)


@METHODS.register("last_blocks")
class LastBlocks(Method):
    mergeable = True
    options = ("last_blocks",)

    def check(self, arch: ViTArch) -> None:
        if self.config.last_blocks > arch["depth"]:
            raise ConfigError(
                f"finetune.last_blocks must be 1..{arch['depth']} (the backbone's depth), "
                f"got {self.config.last_blocks}"
            )

    def apply(self, model: nn.Module) -> None:
        freeze_backbone(model)
        for block in model.blocks[-self.config.last_blocks :]:
            block.requires_grad_(True)
        model.norm.requires_grad_(True)

    def merge(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return dict(state)


# ----------------------------------------------------------------------------- lora


class LowRankLinear(nn.Linear):
    """nn.Linear with a trained low-rank update: x W^T + b + s * dropout(x) A^T B^T. A linear layer
    becomes one in place (`add_low_rank`), keeping its own weight and bias under their names."""

    lora_a: nn.Parameter
    lora_b: nn.Parameter
    lora_scale: float

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        update = F.linear(F.linear(self.lora_dropout(x), self.lora_a), self.lora_b)
        return super().forward(x) + self.lora_scale * update


def add_low_rank(linear: nn.Linear, rank: int, alpha: float, dropout: float) -> None:
    like = dict(device=linear.weight.device, dtype=linear.weight.dtype)
    linear.__class__ = LowRankLinear
    linear.lora_a = nn.Parameter(torch.empty(rank, linear.in_features, **like))
    linear.lora_b = nn.Parameter(torch.zeros(linear.out_features, rank, **like))
    if linear.lora_a.device.type != "meta":
        nn.init.kaiming_uniform_(linear.lora_a, a=math.sqrt(5))  # as nn.Linear initialises its weight
    linear.lora_scale = alpha / rank
    linear.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()


# finetune.lora_targets: a block's linear layers, and the width of their input (the narrowest
# side of the low-rank update's A, which a rank must not exceed)
BLOCK_LINEARS = {
    "qkv": ("attn.qkv", "embed"),
    "proj": ("attn.proj", "embed"),
    "fc1": ("mlp.fc1", "embed"),
    "fc2": ("mlp.fc2", "hidden"),
}


@METHODS.register("lora")
class LoRA(Method):
    mergeable = True
    options = ("lora_rank", "lora_alpha", "lora_dropout", "lora_targets")

    def check(self, arch: ViTArch) -> None:
        targets = self.config.lora_targets
        unknown = sorted(set(targets) - set(BLOCK_LINEARS))
        if unknown or not targets:
            raise ConfigError(
                f"finetune.lora_targets: {unknown or 'an empty list'} "
                f"{'are not linear layers of a ViT block' if unknown else 'names no layer'}; "
                f"allowed: {', '.join(BLOCK_LINEARS)}"
            )
        hidden = int(arch["embed_dim"] * arch["mlp_ratio"])
        widths = {"embed": arch["embed_dim"], "hidden": hidden}
        narrowest = min(widths[BLOCK_LINEARS[target][1]] for target in targets)
        if self.config.lora_rank > narrowest:
            raise ConfigError(
                f"finetune.lora_rank must be 1..{narrowest} (the narrowest input of {', '.join(targets)} "
                f"at embed_dim {arch['embed_dim']}), got {self.config.lora_rank}"
            )

    def apply(self, model: nn.Module) -> None:
        freeze_backbone(model)
        config = self.config
        for block in model.blocks:
            for target in config.lora_targets:
                linear = block.get_submodule(BLOCK_LINEARS[target][0])
                add_low_rank(linear, config.lora_rank, config.lora_alpha, config.lora_dropout)

    def merge(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        scale = self.config.lora_alpha / self.config.lora_rank
        merged = {k: v for k, v in state.items() if not k.endswith((".lora_a", ".lora_b"))}
        for key in state:
            if key.endswith(".lora_a"):
                prefix = key[: -len(".lora_a")]
                update = state[f"{prefix}.lora_b"].double() @ state[key].double()
                weight = merged[f"{prefix}.weight"]
                merged[f"{prefix}.weight"] = (weight.double() + scale * update).to(weight.dtype)
        return merged


# ----------------------------------------------------------------------------- adapter


class ParallelAdapter(nn.Module):
    """AdaptFormer's bottleneck, run beside a block's MLP on the MLP's input (`add_to` is the MLP's
    forward hook)."""

    def __init__(self, width: int, bottleneck: int, scale: float, like: dict[str, Any]) -> None:
        super().__init__()
        self.down = nn.Linear(width, bottleneck, **like)
        self.up = nn.Linear(bottleneck, width, **like)
        self.scale = scale
        if self.up.weight.device.type != "meta":
            nn.init.zeros_(self.up.weight)
            nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(F.gelu(self.down(x))) * self.scale

    def add_to(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        return output + self(args[0])


@METHODS.register("adapter")
class Adapter(Method):
    options = ("adapter_width", "adapter_scale")

    def apply(self, model: nn.Module) -> None:
        freeze_backbone(model)
        for block in model.blocks:
            weight = block.mlp.fc1.weight
            like = dict(device=weight.device, dtype=weight.dtype)
            block.adapter = ParallelAdapter(
                weight.shape[1], self.config.adapter_width, self.config.adapter_scale, like
            )
            block.mlp.register_forward_hook(block.adapter.add_to)


# ----------------------------------------------------------------------------- prompt


class Prompts(nn.Module):
    """A block's learned tokens, placed after the `prefix` tokens (the class token) on the way in
    (`insert`, the block's forward pre-hook) and dropped on the way out (`drop`, its forward hook)."""

    def __init__(self, count: int, width: int, prefix: int, like: dict[str, Any]) -> None:
        super().__init__()
        self.tokens = nn.Parameter(torch.zeros(count, width, **like))
        self.prefix, self.count = prefix, count  # ints: at ZeRO 3 the parameter's own shape is a slice
        if self.tokens.device.type != "meta":
            nn.init.uniform_(self.tokens, -1 / math.sqrt(width), 1 / math.sqrt(width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.tokens.to(x.dtype).expand(x.shape[0], -1, -1)
        return torch.cat([x[:, : self.prefix], tokens, x[:, self.prefix :]], dim=1)

    def insert(self, module: nn.Module, args: tuple) -> tuple:
        return (self(args[0]), *args[1:])

    def drop(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        return torch.cat([output[:, : self.prefix], output[:, self.prefix + self.count :]], dim=1)


@METHODS.register("prompt")
class Prompt(Method):
    options = ("prompt_tokens",)

    def apply(self, model: nn.Module) -> None:
        prefix = getattr(model, "num_prefix_tokens", None)
        if prefix is None or not hasattr(model, "blocks"):
            raise ConfigError(
                f"finetune.method=prompt needs a ViT whose blocks take a token sequence (timm's "
                f"VisionTransformer); {type(model).__name__} has no tokens to prepend to"
            )
        freeze_backbone(model)
        for block in model.blocks:
            weight = block.norm1.weight
            like = dict(device=weight.device, dtype=weight.dtype)
            block.prompt = Prompts(self.config.prompt_tokens, weight.shape[0], prefix, like)
            block.register_forward_pre_hook(block.prompt.insert)
            block.register_forward_hook(block.prompt.drop)


def trainable_share(model: nn.Module) -> dict[str, Any]:
    """The trained weights' count and percent of the model's (the head included)."""
    total = sum(p.numel() for p in model.parameters())
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"trainable": trained, "total": total, "trainable_percent": round(100.0 * trained / total, 3)}
