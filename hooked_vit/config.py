"""Architecture of a hooked Vision Transformer, as a plain dataclass.

The numbers mirror timm's ``VisionTransformer`` arguments; ``timm_kwargs`` rebuilds the exact timm
model (``to_timm``), ``preprocessing`` its eval transform. The fields and constants TransformerLens
reads from a ``HookedTransformerConfig`` (``normalization_type``, ``attn_only``, ``device``, ``dtype``,
``eps`` (= ``ln_eps``), ``positional_embedding_type``, ``d_vocab``, ``use_split_qkv_input``, ...) are
here too, so its ``ActivationCache`` methods, weight processing and patching run on a HookedViT.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar

NORMALIZATION_TYPES = ("LN", "LNPre")
POOLINGS = ("token", "avg", "map")
# MLP activations (TransformerLens's names): exact GELU, OpenAI CLIP's x * sigmoid(1.702 x), tanh GELU.
ACT_FNS = ("gelu", "quick_gelu", "gelu_pytorch_tanh")


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
    # Extra prefix tokens after CLS: DeiT's distillation token (second head ``head_dist``) and
    # DINOv2's register tokens, in timm's order CLS, DIST, REG0.. then the patches.
    has_dist_token: bool = False
    n_registers: int = 0
    # timm's global_pool: "token" (the CLS token), "avg" (mean of the patch tokens) or "map" (an
    # attention-pool head, timm's AttentionPoolLatent: a learned latent query attends to the patch
    # tokens, then proj and a residual MLP; SigLIP); fc_norm: the final LayerNorm runs after pooling
    # (timm's fc_norm, module ``fc_norm``) instead of on every position before it (``ln_final``).
    pooling: str = "token"
    fc_norm: bool = False
    # class_token=False (SigLIP, the _gap_ ViTs): no CLS position; positions are registers then patches.
    class_token: bool = True
    # CLIP: a LayerNorm after the position embedding, before block 0 (timm's norm_pre, hooked as TL's
    # ``ln_pre``), and a patch embedding without bias (timm builds both from pre_norm=True).
    ln_pre: bool = False
    patch_bias: bool = True
    # The MLP activation (of the blocks and the attention-pool head), one of ACT_FNS.
    act_fn: str = "gelu"
    use_attn_result: bool = False
    # TransformerLens's per-head attention inputs and MLP input hook (off: the hooks are not registered).
    use_split_qkv_input: bool = False
    use_attn_in: bool = False
    use_hook_mlp_in: bool = False
    model_name: str = "custom"
    timm_name: str | None = None
    timm_kwargs: dict[str, Any] = field(default_factory=dict)
    preprocessing: dict[str, Any] = field(default_factory=dict)
    dataset: str | None = None
    # "LN" (LayerNorm with weight and bias), "LNPre" once fold_ln has folded them into the next weights.
    normalization_type: str = "LN"
    # Where the model's parameters live; kept current by HookedViT (not saved by to_dict).
    device: str | None = field(default=None, compare=False)
    # The parameters' torch.dtype (TransformerLens's cfg.dtype); kept current by HookedViT, not saved.
    # (Typed Any: this module does not import torch.)
    dtype: Any = field(default=None, compare=False)

    # TransformerLens config constants that are fixed for a ViT.
    attn_only: ClassVar[bool] = False
    positional_embedding_type: ClassVar[str] = "standard"
    gated_mlp: ClassVar[bool] = False
    n_key_value_heads: ClassVar[int | None] = None
    num_experts: ClassVar[int | None] = None
    final_rms: ClassVar[bool] = False
    parallel_attn_mlp: ClassVar[bool] = False
    original_architecture: ClassVar[str] = "VisionTransformer"

    def __post_init__(self) -> None:
        if self.normalization_type not in NORMALIZATION_TYPES:
            raise ValueError(f"normalization_type must be one of {NORMALIZATION_TYPES}, got {self.normalization_type!r}")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}")
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {self.pooling!r}")
        if self.pooling == "token" and not self.class_token:
            raise ValueError("pooling='token' reads the class token: use class_token=True, or pooling 'avg' or 'map'")
        if self.has_dist_token and not self.class_token:
            raise ValueError("a distillation token comes with a class token (timm's VisionTransformerDistilled)")
        if self.act_fn not in ACT_FNS:
            raise ValueError(f"act_fn must be one of {ACT_FNS}, got {self.act_fn!r}")
        if self.n_registers < 0 or self.n_classes < 0:
            raise ValueError(f"n_registers and n_classes must be >= 0, got {self.n_registers}, {self.n_classes}")
        if self.img_size % self.patch_size:
            raise ValueError(f"img_size={self.img_size} is not a multiple of patch_size={self.patch_size}")

    @property
    def eps(self) -> float:
        """TransformerLens's name for the LayerNorm epsilon (``ln_eps``)."""
        return self.ln_eps

    @eps.setter
    def eps(self, value: float) -> None:
        self.ln_eps = value

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
    def n_prefix_tokens(self) -> int:
        """Tokens before the patches: CLS (if any), the distillation token if any, the registers."""
        return int(self.class_token) + int(self.has_dist_token) + self.n_registers

    @property
    def n_ctx(self) -> int:
        """Tokens per image: the prefix tokens (CLS, DIST, registers; none for SigLIP) then the patch tokens."""
        return self.n_patches + self.n_prefix_tokens

    @property
    def d_vocab(self) -> int:
        """TransformerLens's vocabulary: the classes (the rows of ``W_U``'s transpose)."""
        return self.n_classes

    @property
    def d_vocab_out(self) -> int:
        return self.n_classes

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        del data["device"], data["dtype"]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "HookedViTConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"Unknown HookedViTConfig fields {unknown}; known fields: {sorted(known)}")
        return cls(**data)
