"""Masked autoencoder with a timm ViT encoder and a lightweight decoder (He et al., 2021).

Parameter names follow the official MAE checkpoints, so their `model` dicts load unchanged.
Model code is architecture plus loss: no backward, no distributed, no environment.

The decoder predicts pixels (MAE) unless `pred_dim` says otherwise: then `forward` takes the
targets (HOG, a teacher's tokens: mim.models.targets) and the loss to use. `global_dim` adds a
small head on the encoder's cls token whose output `forward` compares with a global target.
"""

from __future__ import annotations

from functools import partial

import torch
from timm.layers import PatchEmbed
from timm.models.vision_transformer import Block
from torch import nn

from mim.models.pos_embed import sincos_2d
from mim.models.targets import cosine_loss, masked_loss


class MaskedAutoencoderViT(nn.Module):
    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        decoder_embed_dim: int = 512,
        decoder_depth: int = 8,
        decoder_num_heads: int = 16,
        mlp_ratio: float = 4.0,
        norm_pix_loss: bool = False,
        qk_norm: bool = False,
        pred_dim: int | None = None,
        global_dim: int | None = None,
    ) -> None:
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f"img_size {img_size} is not a multiple of patch_size {patch_size}")
        self.patch_size = patch_size
        self.in_chans = in_chans
        self.norm_pix_loss = norm_pix_loss
        norm_layer = partial(nn.LayerNorm, eps=1e-6)
        grid_size = img_size // patch_size

        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(sincos_2d(embed_dim, grid_size), requires_grad=False)
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias=True, qk_norm=qk_norm, norm_layer=norm_layer)
            for _ in range(depth)
        )
        self.norm = norm_layer(embed_dim)

        self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.decoder_pos_embed = nn.Parameter(sincos_2d(decoder_embed_dim, grid_size), requires_grad=False)
        self.decoder_blocks = nn.ModuleList(
            Block(decoder_embed_dim, decoder_num_heads, mlp_ratio, qkv_bias=True, norm_layer=norm_layer)
            for _ in range(decoder_depth)
        )
        self.decoder_norm = norm_layer(decoder_embed_dim)
        self.decoder_pred = nn.Linear(decoder_embed_dim, pred_dim or patch_size**2 * in_chans)
        if global_dim is not None:  # the student's cls token -> the global target's space
            self.global_head = nn.Sequential(
                nn.Linear(embed_dim, embed_dim), nn.GELU(), nn.Linear(embed_dim, global_dim)
            )
        self._init_weights()

    def _init_weights(self) -> None:
        # As MAE: the patch projection is initialised like a linear layer, tokens N(0, .02).
        nn.init.xavier_uniform_(self.patch_embed.proj.weight.view(self.patch_embed.proj.weight.shape[0], -1))
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    @property
    def num_patches(self) -> int:
        return self.patch_embed.num_patches

    # ------------------------------------------------------------------ patches

    def patchify(self, imgs: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) -> (N, L, p*p*C), channel last within a patch."""
        p = self.patch_size
        n, c, h, w = imgs.shape
        x = imgs.reshape(n, c, h // p, p, w // p, p)
        return torch.einsum("nchpwq->nhwpqc", x).reshape(n, (h // p) * (w // p), p * p * c)

    def unpatchify(self, patches: torch.Tensor) -> torch.Tensor:
        """(N, L, p*p*C) -> (N, C, H, W)."""
        p, c = self.patch_size, self.in_chans
        n, num_patches, _ = patches.shape
        side = int(num_patches**0.5)
        x = patches.reshape(n, side, side, p, p, c)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(n, c, side * p, side * p)

    # ------------------------------------------------------------------ masking

    @staticmethod
    def random_masking(
        x: torch.Tensor, mask_ratio: float, noise: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Keeps round(L * (1 - mask_ratio)) patches per sample: those with the lowest noise.

        Returns the kept tokens (N, L_keep, D), the mask (N, L; 1 = removed) in the original
        order, and ids_restore (N, L) that undoes the shuffle.
        """
        n, num_patches, dim = x.shape
        num_keep = round(num_patches * (1 - mask_ratio))
        if noise is None:
            noise = torch.rand(n, num_patches, device=x.device)
        ids_shuffle = torch.argsort(noise, dim=1)
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        ids_keep = ids_shuffle[:, :num_keep]
        kept = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, dim))
        mask = torch.ones(n, num_patches, device=x.device)
        mask[:, :num_keep] = 0
        mask = torch.gather(mask, 1, ids_restore)
        return kept, mask, ids_restore

    # ------------------------------------------------------------------ encoder / decoder

    def forward_encoder(
        self, imgs: torch.Tensor, mask_ratio: float, noise: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = self.patch_embed(imgs) + self.pos_embed[:, 1:, :]  # (N, L, D)
        x, mask, ids_restore = self.random_masking(x, mask_ratio, noise)
        cls = (self.cls_token + self.pos_embed[:, :1, :]).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1)  # (N, 1 + L_keep, D)
        for block in self.blocks:
            x = block(x)
        return self.norm(x), mask, ids_restore

    def forward_features(self, imgs: torch.Tensor) -> torch.Tensor:
        """The encoder on all patches, no masking: (N, 1 + L, D), cls token first, normalised."""
        x = self.patch_embed(imgs) + self.pos_embed[:, 1:, :]
        cls = (self.cls_token + self.pos_embed[:, :1, :]).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def forward_decoder(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        x = self.decoder_embed(latent)  # (N, 1 + L_keep, Dd)
        n, num_tokens, dim = x.shape
        num_masked = ids_restore.shape[1] + 1 - num_tokens
        patches = torch.cat([x[:, 1:, :], self.mask_token.expand(n, num_masked, -1)], dim=1)
        patches = torch.gather(patches, 1, ids_restore.unsqueeze(-1).expand(-1, -1, dim))  # unshuffle
        x = torch.cat([x[:, :1, :], patches], dim=1) + self.decoder_pos_embed
        for block in self.decoder_blocks:
            x = block(x)
        return self.decoder_pred(self.decoder_norm(x))[:, 1:, :]  # (N, L, p*p*C)

    # ------------------------------------------------------------------ loss

    def targets(self, imgs: torch.Tensor) -> torch.Tensor:
        target = self.patchify(imgs).float()
        if self.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1e-6) ** 0.5
        return target

    def forward_loss(self, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Mean squared error over the removed patches only."""
        per_patch = ((pred.float() - self.targets(imgs)) ** 2).mean(dim=-1)  # (N, L)
        return (per_patch * mask).sum() / mask.sum()

    def forward(
        self,
        imgs: torch.Tensor,
        mask_ratio: float = 0.75,
        noise: torch.Tensor | None = None,
        target: torch.Tensor | None = None,
        loss: str = "mse",
        global_target: torch.Tensor | None = None,
        global_weight: float = 0.0,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The loss, the prediction (N, L, pred_dim) and the mask (N, L; 1 = removed). `target`
        (N, L, pred_dim): what to predict instead of the pixels, compared by `loss` at the masked
        patches; `global_target` (N, global_dim): what the cls token's head predicts (cosine),
        weighted by `global_weight`."""
        latent, mask, ids_restore = self.forward_encoder(imgs, mask_ratio, noise)
        pred = self.forward_decoder(latent, ids_restore)
        if target is None:
            value = self.forward_loss(imgs, pred, mask)
        else:
            value = masked_loss(pred, target, mask, loss)
        if global_target is not None:
            value = value + global_weight * cosine_loss(self.global_head(latent[:, 0]), global_target)
        return value, pred, mask

    def prediction_to_pixels(self, imgs: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
        """Predicted patches back in pixel space: with norm-pix loss, each patch is
        un-normalised with the mean/var of the same patch of `imgs`, as the paper's figures do."""
        pred = pred.float()
        if self.norm_pix_loss:
            target = self.patchify(imgs).float()
            pred = pred * (target.var(dim=-1, keepdim=True) + 1e-6) ** 0.5 + target.mean(dim=-1, keepdim=True)
        return self.unpatchify(pred)
