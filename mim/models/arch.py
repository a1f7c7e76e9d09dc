"""The keys that say a ViT encoder's shape, as checkpoints' meta, exports' config.json and the
classifier stages' model.* name them; what a backbone must agree on to be loaded."""

from __future__ import annotations

ARCH_KEYS = ("img_size", "patch_size", "in_chans", "embed_dim", "depth", "num_heads", "mlp_ratio")
