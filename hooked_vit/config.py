"""Architecture of a hooked Vision Transformer, as a plain dataclass.

The numbers mirror timm's ``VisionTransformer`` arguments; ``timm_kwargs`` rebuilds the exact timm
model (``to_timm``), ``preprocessing`` its eval transform.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


@dataclass
class HookedViTConfig:
    """Everything needed to build a :class:`~hooked_vit.HookedViT` (and its timm twin).

    Widths are in features, sizes in pixels.
    """

    img_size: int
    patch_size: int
    in_chans: int
    d_model: int
    n_layers: int
    n_heads: int
    d_mlp: int
    n_classes: int
    layer_scale: bool = True
    no_embed_class: bool = True
    qkv_bias: bool = True
    ln_eps: float = 1e-6
    use_attn_result: bool = False
    model_name: str = "custom"
    timm_name: str | None = None
    timm_kwargs: dict[str, Any] = field(default_factory=dict)
    preprocessing: dict[str, Any] = field(default_factory=dict)
    dataset: str | None = None

    def __post_init__(self) -> None:
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}")
        if self.img_size % self.patch_size:
            raise ValueError(f"img_size={self.img_size} is not a multiple of patch_size={self.patch_size}")

    @property
    def d_head(self) -> int:
        return self.d_model // self.n_heads

    @property
    def grid_size(self) -> int:
        """Patches per image side."""
        return self.img_size // self.patch_size

    @property
    def n_patches(self) -> int:
        return self.grid_size**2

    @property
    def n_ctx(self) -> int:
        """Tokens per image: the CLS token then the patch tokens."""
        return self.n_patches + 1

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "HookedViTConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"Unknown HookedViTConfig fields {unknown}; known fields: {sorted(known)}")
        return cls(**data)
