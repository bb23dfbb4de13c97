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
POOLINGS = ("token", "avg", "map", "token_avg")
# MLP activations (TransformerLens's names): exact GELU, OpenAI CLIP's x * sigmoid(1.702 x), tanh GELU,
# and SiLU (the gate of a SwiGLU MLP, EVA-02).
ACT_FNS = ("gelu", "quick_gelu", "gelu_pytorch_tanh", "silu")
# The timm model classes a HookedViT mirrors: VisionTransformer (ViT, DeiT, DINOv2, CLIP, SigLIP) and
# Eva (EVA-02, DINOv3: rotary position embeddings, SwiGLU MLPs, inner norms).
TIMM_CLASSES = ("VisionTransformer", "Eva")
ROPE_TYPES = ("cat", "dinov3")  # timm's axial RoPE with concatenated sin/cos (EVA-02) and DINOv3's


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
    # tokens, then proj and a residual MLP; SigLIP); or "token_avg" (transformers'
    # Dinov2ForImageClassification: the CLS token and the mean patch token side by side, [2 d_model];
    # no timm equivalent, so no to_timm()); fc_norm: the final LayerNorm runs after pooling
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
    # EVA-02 / DINOv3 (timm's Eva). abs_pos_embed: a learned absolute position embedding (DINOv3 has
    # none). rope: timm's rotary embedding of q and k at the patch tokens, as the keyword arguments of
    # timm's create_rope_embed (rope_type 'cat' for EVA-02, 'dinov3'; temperature, grid_indexing,
    # grid_offset, rotate_half, ref_feat_shape), None without. gated_mlp: a SwiGLU MLP,
    # act(fc1_g x) * fc1_x x (TransformerLens's W_gate / W_in). mlp_norm: a LayerNorm on the MLP's hidden
    # activation before fc2 (EVA-02's scale_mlp); attn_norm: a LayerNorm on the heads' concatenated
    # outputs before proj (EVA-02 CLIP's scale_attn_inner).
    abs_pos_embed: bool = True
    rope: dict[str, Any] | None = None
    gated_mlp: bool = False
    mlp_norm: bool = False
    attn_norm: bool = False
    timm_class: str = "VisionTransformer"
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
        if self.pooling in ("token", "token_avg") and not self.class_token:
            raise ValueError(f"pooling={self.pooling!r} reads the class token: use class_token=True, or pooling 'avg' or 'map'")
        if self.pooling == "token_avg" and (self.fc_norm or self.has_dist_token):
            raise ValueError("pooling='token_avg' reads the final-norm tokens (fc_norm=False) of a model without a "
                             "distillation token")
        if self.has_dist_token and not self.class_token:
            raise ValueError("a distillation token comes with a class token (timm's VisionTransformerDistilled)")
        if self.act_fn not in ACT_FNS:
            raise ValueError(f"act_fn must be one of {ACT_FNS}, got {self.act_fn!r}")
        if self.use_attn_result and self.attn_norm:
            raise ValueError("use_attn_result needs per-head outputs, which a LayerNorm across the heads (attn_norm) mixes")
        if self.timm_class not in TIMM_CLASSES:
            raise ValueError(f"timm_class must be one of {TIMM_CLASSES}, got {self.timm_class!r}")
        if self.rope is not None and self.rope.get("rope_type") not in ROPE_TYPES:
            raise ValueError(f"rope['rope_type'] must be one of {ROPE_TYPES}, got {self.rope.get('rope_type')!r}")
        if self.n_registers < 0 or self.n_classes < 0:
            raise ValueError(f"n_registers and n_classes must be >= 0, got {self.n_registers}, {self.n_classes}")
        if self.img_size % self.patch_size:
            raise ValueError(f"img_size={self.img_size} is not a multiple of patch_size={self.patch_size}")

    @property
    def positional_embedding_type(self) -> str:
        """TransformerLens's: ``"rotary"`` with RoPE (EVA-02 adds a learned absolute embedding too), else ``"standard"``."""
        return "rotary" if self.rope is not None else "standard"

    @property
    def eps(self) -> float:
        """TransformerLens's name for the LayerNorm epsilon (``ln_eps``)."""
        return self.ln_eps

    @eps.setter
    def eps(self, value: float) -> None:
        self.ln_eps = value

    @property
    def d_pooled(self) -> int:
        """Width of the pooled features the head reads: ``2 * d_model`` for ``token_avg``, else ``d_model``."""
        return 2 * self.d_model if self.pooling == "token_avg" else self.d_model

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
