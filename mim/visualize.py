"""Pictures of what a model does, as titled grids (mim.pictures):

- reconstructions: for each image original | masked input | reconstruction | reconstruction with
  the visible patches pasted back. With norm-pix loss the predictions are un-normalised with each
  patch's own mean and variance first (as the MAE paper's figures).
- attention: for each image the image | the cls token's attention to the patches in one block,
  one map per head | their mean; each map scaled to its own maximum and laid over the image.
"""

from __future__ import annotations

import torch
from torch import nn

from mim.data.transforms import normalize_on_device
from mim.models.attention import cls_attention
from mim.models.mae import MaskedAutoencoderViT
from mim.pictures import heat_colours, titled_grid

RECONSTRUCTION_TITLES = ["original", "masked", "reconstruction", "reconstruction + visible"]


def _to_pixels(normalized: torch.Tensor, mean: list[float], std: list[float]) -> torch.Tensor:
    """Normalised images -> what a picture shows in [0, 1]: grey and RGB un-normalised; other band
    counts their first three bands (or first one, for two), each stretched from its mean - 2 std to
    its mean + 2 std (band values need not lie in [0, 1])."""
    channels = normalized.shape[1]
    if channels not in (1, 3):
        shown = normalized[:, : 3 if channels > 3 else 1].float().cpu()
        return (shown / 4 + 0.5).clamp(0, 1)
    mean_t = torch.tensor((mean * channels)[:channels] if len(mean) == 1 else mean[:channels]).view(
        1, -1, 1, 1
    )
    std_t = torch.tensor((std * channels)[:channels] if len(std) == 1 else std[:channels]).view(1, -1, 1, 1)
    return (normalized.float().cpu() * std_t + mean_t).clamp(0, 1)


def _normalized_input(model: nn.Module, images: torch.Tensor, mean: list[float], std: list[float]):
    parameter = next(model.parameters())
    return normalize_on_device(images.to(parameter.device), mean, std, parameter.dtype)


@torch.no_grad()
def reconstruction_grid(
    model: MaskedAutoencoderViT,
    images: torch.Tensor,
    mean: list[float],
    std: list[float],
    mask_ratio: float,
    seed: int = 0,
    what: str = "",
) -> torch.Tensor:
    """uint8 images (N, C, H, W) -> one titled uint8 picture (3, height, width); `what` names the
    checkpoint (and step) in the heading."""
    was_training = model.training
    model.eval()
    normalized = _normalized_input(model, images, mean, std)
    device = normalized.device
    generator = torch.Generator(device=device).manual_seed(seed)
    noise = torch.rand(images.shape[0], model.num_patches, generator=generator, device=device)
    _, pred, mask = model(normalized, mask_ratio=mask_ratio, noise=noise)
    model.train(was_training)

    reconstruction = model.prediction_to_pixels(normalized.float(), pred)
    patch_area = model.patch_size**2 * model.in_chans
    pixel_mask = model.unpatchify(mask.float().unsqueeze(-1).expand(-1, -1, patch_area))  # 1 = removed
    original = normalized.float()
    masked = original * (1 - pixel_mask)
    pasted = original * (1 - pixel_mask) + reconstruction * pixel_mask
    panels = [_to_pixels(t, mean, std) for t in (original, masked, reconstruction, pasted)]
    shown_mask = pixel_mask[:, : panels[1].shape[1]].cpu()
    panels[1] = panels[1] * (1 - shown_mask) + 0.5 * shown_mask  # removed patches in grey
    hidden = int(mask.sum(1).float().mean().item())
    heading = (
        f"MAE reconstructions{' of ' + what if what else ''}: mask ratio {mask_ratio:g}, "
        f"{hidden} of {model.num_patches} patches hidden (grey in 'masked')"
    )
    return titled_grid(panels, RECONSTRUCTION_TITLES, heading=heading)


def overlay(pictures: torch.Tensor, maps: torch.Tensor, opacity: float = 0.6) -> torch.Tensor:
    """Per-patch maps (N, g, g) laid over pictures (N, C, H, W) in [0, 1]: each map scaled to its
    own maximum, blown up to the picture with nearest neighbour (one block per patch), coloured."""
    scaled = maps / maps.flatten(1).amax(1).clamp_min(1e-12).view(-1, 1, 1)
    blown_up = torch.nn.functional.interpolate(scaled.unsqueeze(1), size=pictures.shape[-2:], mode="nearest")
    heat = heat_colours(blown_up[:, 0]).movedim(0, 1)  # (N, 3, H, W)
    grey = pictures.mean(1, keepdim=True).expand(-1, 3, -1, -1)
    return (1 - opacity) * grey + opacity * heat


@torch.no_grad()
def attention_grid(
    encoder: nn.Module,
    images: torch.Tensor,
    mean: list[float],
    std: list[float],
    block: int = -1,
    what: str = "",
) -> torch.Tensor:
    """uint8 images (N, C, H, W) -> one titled uint8 picture (3, height, width): each image, its
    cls token's attention to the patches for each head, and the heads' mean; `block` 0-based
    (negative from the end), shown counted from 1; `what` names the checkpoint in the heading."""
    was_training = encoder.training
    encoder.eval()
    normalized = _normalized_input(encoder, images, mean, std)
    weights = cls_attention(encoder, normalized, block).cpu()  # (N, heads, 1 + L)
    encoder.train(was_training)
    side = round((weights.shape[-1] - 1) ** 0.5)
    patch_maps = weights[:, :, 1:].reshape(weights.shape[0], weights.shape[1], side, side)
    pictures = _to_pixels(normalized, mean, std)
    heads = [overlay(pictures, patch_maps[:, head]) for head in range(patch_maps.shape[1])]
    columns = [pictures, *heads, overlay(pictures, patch_maps.mean(1))]
    titles = ["image", *[f"head {h + 1}" for h in range(len(heads))], "mean"]
    depth = len(encoder.blocks)
    heading = f"cls-token attention in block {block % depth + 1} of {depth}{', ' + what if what else ''}"
    scale = ("0", "each map's own maximum")
    return titled_grid(columns, titles, heading=heading, colour_scale=scale)
