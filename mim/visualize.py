"""Reconstruction pictures: for each image a row of original | masked input | reconstruction |
reconstruction with the visible patches pasted back. With norm-pix loss the predictions are
un-normalised with each patch's own mean and variance first (as the MAE paper's figures)."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image

from mim.data.transforms import normalize_on_device
from mim.models.mae import MaskedAutoencoderViT


def _to_pixels(normalized: torch.Tensor, mean: list[float], std: list[float]) -> torch.Tensor:
    channels = normalized.shape[1]
    mean_t = torch.tensor((mean * channels)[:channels] if len(mean) == 1 else mean[:channels]).view(
        1, -1, 1, 1
    )
    std_t = torch.tensor((std * channels)[:channels] if len(std) == 1 else std[:channels]).view(1, -1, 1, 1)
    return (normalized.float().cpu() * std_t + mean_t).clamp(0, 1)


@torch.no_grad()
def reconstruction_grid(
    model: MaskedAutoencoderViT,
    images: torch.Tensor,
    mean: list[float],
    std: list[float],
    mask_ratio: float,
    seed: int = 0,
) -> torch.Tensor:
    """uint8 images (N, C, H, W) -> one uint8 picture (C, N*H, 4*W)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    normalized = normalize_on_device(images.to(device), mean, std, dtype)
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
    panels[1] = panels[1] * (1 - pixel_mask.cpu()) + 0.5 * pixel_mask.cpu()  # removed patches in grey
    rows = torch.cat(panels, dim=3)  # (N, C, H, 4W)
    grid = torch.cat(list(rows), dim=1)  # (C, N*H, 4W)
    return (grid * 255).round().to(torch.uint8)


def save_png(picture: torch.Tensor, path: Path, scale: int = 1) -> None:
    array = picture.permute(1, 2, 0).numpy()
    image = Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array)
    if scale > 1:
        image = image.resize((image.width * scale, image.height * scale), Image.NEAREST)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
