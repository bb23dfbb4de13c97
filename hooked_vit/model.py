"""HookedViT: a timm DeiT-III / ViT with a TransformerLens HookPoint at every activation."""

from __future__ import annotations

import os
from contextlib import nullcontext
from pathlib import Path
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor, nn
from transformer_lens.hook_points import HookPoint
from transformer_lens.HookedRootModule import HookedRootModule

from hooked_vit.cache import ViTActivationCache
from hooked_vit.components import AttentionPool, LayerNorm, PatchEmbed, TransformerBlock, Unembed, build_rope
from hooked_vit.config import HookedViTConfig
from hooked_vit.errors import InvalidArgumentError, InvalidTypeError
from hooked_vit.hook_table import hook_table
from hooked_vit.loading import (
    build_timm_model,
    check_state_dict,
    config_from_timm,
    create_timm_from_spec,
    hooked_to_timm_state_dict,
    load_checkpoint_into,
    load_pretrained_timm,
    timm_to_hooked_state_dict,
)
from hooked_vit.pretrained import get_spec, resolve_model_name
from hooked_vit.saes import SAEMixin
from hooked_vit.sites import SiteRegistry
from hooked_vit.tl_compat import TransformerLensMixin
from hooked_vit.validation import (
    check_hook_names,
    check_images,
    check_return_type,
    check_stop_at_layer,
    shape_checked_hook,
)

CONFIG_FILE, WEIGHTS_FILE = "config.json", "model.safetensors"


def _cross_entropy(logits: Tensor, labels: Tensor, per_image: bool) -> Tensor:
    return F.cross_entropy(logits, labels.to(logits.device), reduction="none" if per_image else "mean")


def _with_buffers(timm_model: nn.Module, rope: nn.Module | None) -> nn.Module:
    """``timm_model`` (an Eva built on the meta device) with its non-persistent buffers filled: the
    rotary tables from ``rope`` (the HookedViT's, built as timm builds them) and the zero k biases."""
    device = next(iter(timm_model.parameters())).device
    if rope is not None:
        for name, buffer in rope.named_buffers():
            module_name, _, attr = f"rope.{name}".rpartition(".")
            timm_model.get_submodule(module_name).register_buffer(attr, buffer.to(device), persistent=False)
    for block in timm_model.blocks:
        if getattr(block.attn, "k_bias", None) is not None:
            block.attn.register_buffer("k_bias", torch.zeros_like(block.attn.q_bias), persistent=False)
    return timm_model


class HookedViT(TransformerLensMixin, SAEMixin, HookedRootModule):
    """A Vision Transformer whose every intermediate activation is a named HookPoint.

    ``model(images)`` returns logits ``[batch, n_classes]``, equal to the timm model's; the hook
    names and shapes are listed by :meth:`summary` and in the README.
    """

    def __init__(self, cfg: HookedViTConfig):
        super().__init__()
        self.cfg = cfg
        d_model = cfg.d_model
        self.patch_embed = PatchEmbed(cfg)
        # None without a class token (SigLIP), as timm
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d_model)) if cfg.class_token else None
        if cfg.has_dist_token:  # DeiT's distillation token, read by head_dist
            self.dist_token = nn.Parameter(torch.zeros(1, 1, d_model))
        if cfg.n_registers:  # DINOv2's register tokens
            self.reg_token = nn.Parameter(torch.zeros(1, cfg.n_registers, d_model))
        n_pos = cfg.n_patches + (0 if cfg.no_embed_class else cfg.n_prefix_tokens)
        # None without a learned absolute position embedding (DINOv3), as timm's Eva
        self.pos_embed = nn.Parameter(torch.zeros(1, n_pos, d_model)) if cfg.abs_pos_embed else None
        self.hook_embed = HookPoint()  # [batch, pos, d_model]: CLS (DIST, registers) then patch embeddings
        # [batch, pos, d_model]: position embedding (0 at prefix tokens if no_embed_class; 0 everywhere without one)
        self.hook_pos_embed = HookPoint()
        self.hook_full_embed = HookPoint()  # [batch, pos, d_model]: embed + pos_embed
        if cfg.ln_pre:  # CLIP: timm's norm_pre, LayerNorm on embed + pos_embed; its output enters block 0
            self.ln_pre = LayerNorm(d_model, cfg.ln_eps)
        # EVA-02 / DINOv3: timm's rotary embedding, applied to q and k in every block (hook_rot_q/k)
        self.rope = build_rope(cfg.rope, cfg.d_model, cfg.n_heads, cfg.grid_size)
        self.blocks = nn.ModuleList(TransformerBlock(cfg, self.rope) for _ in range(cfg.n_layers))
        if not cfg.fc_norm:  # the final LayerNorm on every position
            self.ln_final = LayerNorm(d_model, cfg.ln_eps)
        if cfg.pooling == "map":  # SigLIP's attention-pool head over the (final-norm) patch tokens
            self.attn_pool = AttentionPool(cfg)
        if cfg.fc_norm:  # timm's fc_norm: the final LayerNorm runs on the pooled features
            self.fc_norm = LayerNorm(d_model, cfg.ln_eps)
        self.hook_pooled = HookPoint()  # [batch, d_pooled]: the pooled features, the head's input
        if cfg.has_dist_token:
            self.hook_pooled_dist = HookPoint()  # [batch, d_model]: final-norm DIST token, head_dist's input
        # TL's unembed: W_U, b_U; nn.Identity for a headless model (n_classes=0), as timm
        self.head = Unembed(cfg.d_pooled, cfg.n_classes) if cfg.n_classes else nn.Identity()
        if cfg.has_dist_token:
            self.head_dist = Unembed(d_model, cfg.n_classes) if cfg.n_classes else nn.Identity()
        self.distilled_training = False  # timm's flag: in train mode return both heads' logits
        self.setup()
        self.sites = SiteRegistry(cfg)

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        images: Float[Tensor, "batch channel height width"],
        *,
        return_type: str | None = "logits",
        labels: Int[Tensor, "batch"] | None = None,
        loss_per_image: bool = False,
        stop_at_layer: int | None = None,
    ) -> (Float[Tensor, "batch n_classes"] | Float[Tensor, "batch pos d_model"] | Float[Tensor, "*loss"]
          | tuple[Float[Tensor, "batch n_classes"], Float[Tensor, "*loss"]] | None):
        """Logits ``[batch, n_classes]`` (TransformerLens's ``return_type``: ``"logits"``; ``"loss"``,
        the cross-entropy against ``labels`` ``[batch]``, a mean or with ``loss_per_image`` one per
        image ``[batch]``; ``"both"``, ``(logits, loss)``; ``None``, nothing, for hooks only). With
        ``stop_at_layer=L``, the residual stream ``[batch, pos, d_model]`` entering block ``L``
        (blocks ``L`` and later do not run; ``return_type`` is then ignored, as in TransformerLens)."""
        check_images(images, self.cfg, self.patch_embed.proj.weight)
        check_stop_at_layer(stop_at_layer, self.cfg.n_layers)
        if stop_at_layer is None:
            if self.cfg.n_classes == 0 and return_type in ("loss", "both"):
                raise InvalidArgumentError(f"return_type={return_type!r} needs a classifier head; this model is headless "
                                           "(n_classes=0) and returns its pooled features")
            check_return_type(return_type, labels, images.shape[0], self.cfg.n_classes)
        batch = images.shape[0]
        tokens = torch.cat([*self._prefix_tokens(batch), self.patch_embed(images)], dim=1)
        if self.pos_embed is None:  # zeros, so TransformerLens's embed + pos_embed decomposition still holds
            x = self.hook_full_embed(self.hook_embed(tokens) + self.hook_pos_embed(torch.zeros_like(tokens)))
        else:
            pos_embed = self.pos_embed
            if self.cfg.no_embed_class:  # zero at the prefix tokens: timm adds pos_embed to the patches only
                pos_embed = F.pad(pos_embed, (0, 0, self.cfg.n_prefix_tokens, 0))
            pos_embed = pos_embed.expand(batch, -1, -1)
            if self.hook_pos_embed.has_hooks():  # a hook may edit it in place: give it its own memory
                pos_embed = pos_embed.clone()
            x = self.hook_full_embed(self.hook_embed(tokens) + self.hook_pos_embed(pos_embed))
        if self.cfg.ln_pre:
            x = self.ln_pre(x)
        for block in self.blocks[:stop_at_layer]:
            x = block(x)
        if stop_at_layer is not None:
            return x
        logits = self._head(x)
        if return_type == "logits":
            return logits
        if return_type is None:
            return None
        if isinstance(logits, tuple):
            raise InvalidArgumentError("in distilled training mode (set_distilled_training(True), train()) the output is "
                                       "the two heads' logits; return_type='loss' needs eval() or distilled training off")
        loss = _cross_entropy(logits, labels, loss_per_image)  # labels checked before the forward
        return loss if return_type == "loss" else (logits, loss)

    def _prefix_tokens(self, batch: int) -> list[Float[Tensor, "batch n_tok d_model"]]:
        """CLS, the distillation token and the registers, those the model has (timm's order)."""
        tokens = [self.cls_token.expand(batch, -1, -1)] if self.cfg.class_token else []
        if self.cfg.has_dist_token:
            tokens.append(self.dist_token.expand(batch, -1, -1))
        if self.cfg.n_registers:
            tokens.append(self.reg_token.expand(batch, -1, -1))
        return tokens

    def _head(self, x: Float[Tensor, "batch pos d_model"]) -> Any:
        """timm's ``forward_head``: pool (CLS token, mean or attention pool of the patch tokens),
        norm, classifier (averaged with ``head_dist`` for a distilled DeiT; pooled features for a
        headless model)."""
        cfg = self.cfg
        if not cfg.fc_norm:
            x = self.ln_final(x)
        if cfg.pooling == "token":
            pooled = x[:, 0]
        elif cfg.pooling == "avg":
            pooled = x[:, cfg.n_prefix_tokens:].mean(dim=1)
        elif cfg.pooling == "token_avg":  # transformers' Dinov2ForImageClassification
            pooled = torch.cat([x[:, 0], x[:, cfg.n_prefix_tokens:].mean(dim=1)], dim=1)
        else:
            pooled = self.attn_pool(x[:, cfg.n_prefix_tokens:])[:, 0]
        if cfg.fc_norm:
            pooled = self.fc_norm(pooled)
        out = self.head(self.hook_pooled(pooled))
        if not cfg.has_dist_token:
            return out
        out_dist = self.head_dist(self.hook_pooled_dist(x[:, 1]))
        if self.distilled_training and self.training:  # as timm: both heads' outputs while training
            return out, out_dist
        return (out + out_dist) / 2

    def set_distilled_training(self, enable: bool = True) -> None:
        """timm's ``set_distilled_training``: in train mode a distilled DeiT then returns the class
        and distillation heads' logits as a tuple (otherwise, and in eval mode, their mean)."""
        if not self.cfg.has_dist_token:
            raise InvalidArgumentError("set_distilled_training needs a distilled DeiT (a distillation token)")
        self.distilled_training = bool(enable)

    def with_classifier(self, classifier: Any) -> "HookedViT":
        """This model with ``head`` replaced by ``classifier`` (a :class:`~hooked_vit.classifier.LinearProbe`,
        or an ``nn.Linear`` d_model -> n_classes such as :func:`~hooked_vit.classifier.zero_shot_head`'s),
        in place: see :func:`hooked_vit.classifier.attach_classifier`."""
        from hooked_vit.classifier import attach_classifier

        return attach_classifier(self, classifier)

    def loss_fn(self, logits: Float[Tensor, "batch n_classes"], labels: Int[Tensor, "batch"], *,
                per_image: bool = False) -> Float[Tensor, "*loss"]:
        """Cross-entropy of ``logits`` against the class ``labels`` (TransformerLens's ``loss_fn``
        with labels in place of the next tokens): the mean, or ``[batch]`` with ``per_image``."""
        check_return_type("loss", labels, logits.shape[0], logits.shape[-1])
        return _cross_entropy(logits, labels, per_image)

    # ------------------------------------------------------------------ hooks
    def _check_hook_name(self, name: str) -> None:
        flag = self.disabled_hooks().get(name) if isinstance(name, str) else None
        if flag is not None:
            raise InvalidArgumentError(f"{name} only exists with {flag} on: call model.set_{flag}(True) first")
        check_hook_names([name], self.hook_dict)
        if name.endswith("attn.hook_result") and not self.cfg.use_attn_result:
            raise InvalidArgumentError(f"{name} only fires with per-head results on: call "
                                       "model.set_use_attn_result(True) first")

    def add_hook(self, name, hook, dir="fwd", is_permanent=False, level=None, prepend=False) -> None:
        if isinstance(name, str):
            self._check_hook_name(name)
        hook = shape_checked_hook(hook, name, dir)
        super().add_hook(name, hook, dir=dir, is_permanent=is_permanent, level=level, prepend=prepend)

    def _enable_hook_with_name(self, name: str, hook: Callable, dir: str) -> None:
        self._check_hook_name(name)
        super()._enable_hook_with_name(name, shape_checked_hook(hook, name, dir), dir)

    def _enable_hooks_for_points(self, hook_points, enabled: Callable, hook: Callable, dir: str) -> None:
        super()._enable_hooks_for_points(hook_points, enabled, shape_checked_hook(hook, "a hook point", dir), dir)

    def set_use_attn_result(self, use_attn_result: bool) -> None:
        """Compute (and hook) each head's output ``attn.hook_result`` ``[batch, pos, head, d_model]``."""
        if use_attn_result and self.cfg.attn_norm:
            raise InvalidArgumentError("per-head results (hook_result) do not exist with a LayerNorm across the heads' "
                                       "outputs before proj (attn_norm, EVA-02 CLIP): read attn.hook_z per head instead")
        self.cfg.use_attn_result = use_attn_result
        for block in self.blocks:
            block.attn.use_attn_result = use_attn_result

    def set_use_split_qkv_input(self, use_split_qkv_input: bool) -> None:
        """TransformerLens's split q/k/v inputs: each block's attention reads its queries, keys and
        values from separate per-head copies of the residual stream, hooked as
        ``blocks.L.hook_q_input``/``hook_k_input``/``hook_v_input`` ``[batch, pos, head, d_model]``
        (before ``ln1``, which then runs on each), so one head's query, key or value input can be
        patched. Values equal the unsplit forward's up to fp32 rounding; off again restores it exactly."""
        self._set_block_flag("use_split_qkv_input", use_split_qkv_input)

    def set_use_attn_in(self, use_attn_in: bool) -> None:
        """TransformerLens's ``hook_attn_in`` ``[batch, pos, head, d_model]``: the residual stream
        repeated per head as the attention's input (before ``ln1``); with split inputs on too, the
        q/k/v inputs are copies of it."""
        self._set_block_flag("use_attn_in", use_attn_in)

    def set_use_hook_mlp_in(self, use_hook_mlp_in: bool) -> None:
        """TransformerLens's ``hook_mlp_in`` ``[batch, pos, d_model]``: the residual stream entering
        ``ln2`` (equal to ``hook_resid_mid``, but editing it changes only the MLP's input)."""
        self._set_block_flag("use_hook_mlp_in", use_hook_mlp_in)

    def _set_block_flag(self, flag: str, value: bool) -> None:
        if not isinstance(value, bool):
            raise InvalidTypeError(f"set_{flag} takes True or False, got {type(value).__name__} {value!r}")
        setattr(self.cfg, flag, value)
        for block in self.blocks:
            setattr(block, flag, value)
        for name, off_flag in self.disabled_hooks().items():  # hooks switched off keep no hook functions
            if off_flag == flag and name in self.hook_dict:
                self.hook_dict[name].remove_hooks("both", including_permanent=True)
        self.setup()

    def run_with_cache(
        self,
        images: Float[Tensor, "batch channel height width"],
        *,
        names_filter: str | Sequence[str] | Callable[[str], bool] | None = None,
        device: str | torch.device | None = None,
        remove_batch_dim: bool = False,
        incl_bwd: bool = False,
        metric: Callable[[Tensor], Tensor] | None = None,
        reset_hooks_end: bool = True,
        clear_contexts: bool = False,
        pos_slice: Any = None,
        stop_at_layer: int | None = None,
        return_cache_object: bool = True,
        return_type: str | None = "logits",
        labels: Tensor | None = None,
        loss_per_image: bool = False,
    ) -> tuple[Any, ViTActivationCache | dict[str, Tensor]]:
        """Run and cache activations (TransformerLens semantics; ``return_cache_object=False`` gives
        the plain ``{hook name: tensor}`` dict); ``return_type``, ``labels``, ``loss_per_image``
        and ``stop_at_layer`` go to :meth:`forward`.

        With ``incl_bwd=True``, ``metric(output)`` (a scalar; default: the output itself, which must
        then be a scalar) is backpropagated and gradients are cached as ``<hook name>_grad``.
        """
        if isinstance(names_filter, str):
            names_filter = [names_filter]
        if isinstance(names_filter, Sequence):
            for name in names_filter:
                self._check_hook_name(name)
            names_filter = list(names_filter)
        cache_dict, fwd, bwd = self.get_caching_hooks(
            names_filter, incl_bwd, device, remove_batch_dim=remove_batch_dim, pos_slice=pos_slice
        )
        if not self.cfg.use_attn_result:  # hook_result does not fire: leave it out of "cache all"
            fwd, bwd = ([(n, h) for n, h in hooks if not n.endswith("hook_result")] for hooks in (fwd, bwd))
        grad_context = torch.enable_grad() if incl_bwd else nullcontext()
        with self.hooks(fwd_hooks=fwd, bwd_hooks=bwd, reset_hooks_end=reset_hooks_end,
                        clear_contexts=clear_contexts), grad_context:
            out = self(images, stop_at_layer=stop_at_layer, return_type=return_type, labels=labels,
                       loss_per_image=loss_per_image)
            if incl_bwd:
                target = metric(out) if metric is not None else out
                if target.numel() != 1:
                    raise InvalidArgumentError(
                        f"incl_bwd=True needs a scalar to differentiate, got shape {list(target.shape)}: pass "
                        "metric=, e.g. metric=lambda logits: logits[:, label].sum()"
                    )
                target.backward()
        if not return_cache_object:
            return out, cache_dict
        return out, ViTActivationCache(cache_dict, self, has_batch_dim=not remove_batch_dim)

    # ------------------------------------------------------------------ conversion
    @classmethod
    def from_timm(cls, timm_model: nn.Module, **cfg_overrides: Any) -> "HookedViT":
        """Wrap a supported timm ``VisionTransformer`` (weights copied, same device and dtype): ViT/AugReg,
        DeiT (distilled too), DeiT-III, DINOv2 (registers), CLIP image towers (``ln_pre``, QuickGELU,
        the projection as ``head``), SigLIP/SigLIP2 (no class token, attention-pool head ``attn_pool``,
        or average pooling); token, average (``fc_norm``) or attention pooling.
        Anything else raises :class:`~hooked_vit.errors.UnsupportedModelError`, one line naming every
        unsupported feature, before any weight is copied."""
        cfg = config_from_timm(timm_model, **cfg_overrides)
        with torch.device("meta"):  # no random init: every parameter is assigned from timm's
            model = cls(cfg)
        state_dict = {k: v.clone() for k, v in timm_to_hooked_state_dict(timm_model.state_dict(), cfg).items()}
        model.load_state_dict(state_dict, assign=True)
        model.distilled_training = bool(getattr(timm_model, "distilled_training", False))
        return model.eval()

    @classmethod
    def from_hf(cls, hf_model: nn.Module, **cfg_overrides: Any) -> "HookedViT":
        """Wrap a Hugging Face ``transformers`` vision model (see :mod:`hooked_vit.hf`); its forward
        returns the HF model's main output (logits, ``image_embeds`` or ``pooler_output``).
        ``img_size=S`` resamples the position embedding as transformers does for S-pixel images."""
        from hooked_vit.hf import hooked_from_hf

        return hooked_from_hf(cls, hf_model, **cfg_overrides)

    def units(self, site: Any, **kwargs: Any) -> Any:
        """The units (neurons, heads, residual dimensions, ...) at ``site`` (a hook name, a circuit
        site or ``(layer, site name)``), as :func:`hooked_vit.units.site_units` describes them."""
        from hooked_vit.units import site_units

        return site_units(self, site, **kwargs)

    def to_timm(self) -> nn.Module:
        """An equivalent timm ``VisionTransformer`` (``Eva`` for EVA-02/DINOv3) holding a copy of these weights."""
        from hooked_vit.pruning.masks import without_masks

        if self.cfg.pooling == "token_avg":
            raise InvalidArgumentError("pooling 'token_avg' (CLS and mean patch token side by side, transformers' "
                                       "Dinov2ForImageClassification) has no timm equivalent; to_timm() needs pooling "
                                       "'token', 'avg' or 'map'")

        with torch.device("meta"):  # no random init: every parameter is assigned below
            timm_model = build_timm_model(self.cfg)
        # Pruned weights are already zero; the masks themselves have no timm counterpart.
        state_dict = hooked_to_timm_state_dict(without_masks(self.state_dict()), self.cfg, set(timm_model.state_dict()))
        timm_model.load_state_dict({k: v.clone() for k, v in state_dict.items()}, assign=True)
        if self.cfg.timm_class == "Eva":  # non-persistent buffers (the rotary table, the zero k bias) built on meta
            timm_model = _with_buffers(timm_model, self.rope)
        if self.cfg.has_dist_token:
            timm_model.distilled_training = self.distilled_training
        return timm_model.eval()

    @classmethod
    def from_pretrained(
        cls,
        name: str | os.PathLike,
        *,
        pretrained: bool = True,
        checkpoint_path: str | os.PathLike | None = None,
        seed: int | None = None,
        device: str | torch.device | None = None,
        dtype: torch.dtype = torch.float32,
        use_attn_result: bool = False,
        use_split_qkv_input: bool = False,
        use_attn_in: bool = False,
        use_hook_mlp_in: bool = False,
        sparsity: float | int | None = None,
        method: str = "wanda",
        nm: tuple[int, int] | str | None = None,
        calibration: Any = None,
        n_calib: int | None = None,
        calib_seed: int | None = None,
        finetune: int | dict[str, Any] | None = None,
        cache: bool = True,
        fold_ln: bool = False,
        center_writing_weights: bool = False,
        center_unembed: bool = False,
        fold_value_biases: bool = False,
        refactor_factored_attn_matrices: bool = False,
        fold_layer_scale: bool | None = None,
    ) -> "HookedViT":
        """Load a model by alias (``"deit3_base"``, see ``pretrained_configs/``), timm name, or a
        directory written by :meth:`save_pretrained`. A bare name is an alias when one is known
        (a same-named directory in the current directory is then ignored, with a warning); a
        ``pathlib.Path`` or a name with a path separator (``./deit3_base``) is a directory;
        ``"alias:deit3_base"`` is always the alias.

        Weights come from ``checkpoint_path`` (timm or original DeiT-III file) if given, else from
        the package (embedded models) or timm's hub; ``pretrained=False`` gives a random
        initialisation, reproducible with ``seed``.

        With ``sparsity`` (fraction of each row's weights zeroed, in ``[0, 1)``) or ``nm=(N, M)``,
        the model is pruned with ``method`` (``"wanda"`` or ``"magnitude"``, see
        :func:`hooked_vit.pruning.prune`). Wanda's ``calibration`` is an image tensor, a dataset (or
        builtin dataset name) or an image folder, sampled to ``n_calib`` images with ``calib_seed``
        (default 0); by default the train split of the model's builtin dataset. Without ``n_calib``
        the model preset's protocol applies (``"protocol"`` in ``pretrained_configs/*.json``: 128
        eval-transform images for the embedded model; for ImageNet models Wanda's reference, 4,096
        train images drawn with replacement through the training augmentation).
        ``finetune`` (epochs, or a dict of :func:`hooked_vit.pruning.finetune` settings plus
        ``batch_size`` and ``data``) fine-tunes with the masks held. The result is cached on disk
        (``$HOOKED_VIT_CACHE``, else ``$XDG_CACHE_HOME/hooked_vit``, else ``~/.cache/hooked_vit``)
        unless ``cache=False``; ``sparsity=0`` returns the dense model.

        ``use_attn_result``, ``use_split_qkv_input``, ``use_attn_in``, ``use_hook_mlp_in``: TransformerLens's
        optional hooks (see :meth:`set_use_split_qkv_input`), off by default.

        ``fold_ln``, ``center_writing_weights``, ``center_unembed``, ``fold_value_biases``,
        ``refactor_factored_attn_matrices``: TransformerLens's weight processing (off by default
        here, so the model stays equal to timm's), with LayerScale folded first
        (``fold_layer_scale``; see :mod:`hooked_vit.weight_processing`).
        """
        from hooked_vit.weight_processing import check_processing_flags

        processing = dict(fold_ln=fold_ln, center_writing_weights=center_writing_weights,
                          center_unembed=center_unembed, fold_value_biases=fold_value_biases,
                          refactor_factored_attn_matrices=refactor_factored_attn_matrices)
        fold_layer_scale = check_processing_flags(**processing, fold_layer_scale=fold_layer_scale,
                                                  pruned=bool(sparsity) or nm is not None)
        if sparsity is not None or nm is not None:  # fail on bad pruning arguments before loading
            from hooked_vit.pruning.recipe import check_request

            check_request(sparsity=sparsity, method=method, nm=nm, finetune=finetune)
        directory, alias = resolve_model_name(name)
        if directory is not None:
            model = cls._from_directory(directory)
        else:
            spec = get_spec(alias)
            if pretrained and checkpoint_path is None:
                timm_model = load_pretrained_timm(spec)
            else:
                rng = torch.random.fork_rng(devices=[]) if seed is not None else nullcontext()
                with rng:
                    if seed is not None:
                        torch.manual_seed(seed)
                    timm_model = create_timm_from_spec(spec)
                if checkpoint_path is not None:
                    load_checkpoint_into(timm_model, checkpoint_path)
            model = cls.from_timm(
                timm_model, model_name=spec.alias, timm_name=spec.hub_name,
                preprocessing=dict(spec.preprocessing), dataset=spec.dataset,
            )
        model = model.to(device=device, dtype=dtype).eval()
        if sparsity is not None or nm is not None:
            from hooked_vit.pruning.calibration import DEFAULT_CALIB_SEED
            from hooked_vit.pruning.recipe import pruned_model

            model = pruned_model(
                model, sparsity=sparsity, method=method, nm=nm, calibration=calibration,
                n_calib=n_calib,  # None: the model preset's calibration protocol
                calib_seed=DEFAULT_CALIB_SEED if calib_seed is None else calib_seed,
                finetune=finetune, cache=cache,
            )
        if fold_layer_scale or any(processing.values()):
            model.process_weights_(**processing, fold_layer_scale=fold_layer_scale)
        model.set_use_attn_result(use_attn_result)
        for flag, value in (("use_split_qkv_input", use_split_qkv_input), ("use_attn_in", use_attn_in),
                            ("use_hook_mlp_in", use_hook_mlp_in)):
            if getattr(model.cfg, flag) != value:
                model._set_block_flag(flag, value)
        return model.eval()

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """Write ``config.json`` and ``model.safetensors`` to ``directory`` (created if needed); a
        pruned model's weights include its ``weight_mask`` buffers, and its metadata goes to
        ``pruning.json``."""
        from hooked_vit import atomic
        from hooked_vit.pruning.metadata import PRUNING_FILE, get_info, write_info

        directory = Path(directory)
        info = get_info(self)
        with atomic.files_into(directory) as tmp:  # all written first, then each renamed into place
            if info is not None:
                write_info(info, tmp)
            atomic.write_json(tmp / CONFIG_FILE, self.cfg.to_dict())
            atomic.save_safetensors({k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()},
                                    tmp / WEIGHTS_FILE)
        if info is None:  # stale metadata of a pruned model saved here before
            (directory / PRUNING_FILE).unlink(missing_ok=True)
        return directory

    @classmethod
    def _from_directory(cls, directory: Path) -> "HookedViT":
        from hooked_vit.errors import CorruptFileError, MissingFileError
        from hooked_vit.pruning.masks import prepare_for_state_dict, rezero_masked_weights
        from hooked_vit.pruning.metadata import INFO_ATTR, read_info
        from hooked_vit.reading import load_safetensors, read_json

        config_path, weights_path = directory / CONFIG_FILE, directory / WEIGHTS_FILE
        for path in (config_path, weights_path):
            if not path.is_file():
                raise MissingFileError(f"{directory} is not a saved HookedViT: {path.name} is missing "
                                       "(save_pretrained writes config.json and model.safetensors)")
        fix = "save the model again with save_pretrained (a cached pruned model is rebuilt automatically)"
        data = read_json(config_path, "a HookedViT config (JSON)", fix)
        try:
            cfg = HookedViTConfig.from_dict(data)
        except (TypeError, ValueError, KeyError) as error:
            raise CorruptFileError(config_path, "a HookedViT config", fix, found=str(error)) from None
        with torch.device("meta"):  # parameters are assigned from the file below
            model = cls(cfg)
        state_dict = load_safetensors(weights_path, "HookedViT weights (safetensors)", fix)
        prepare_for_state_dict(model, state_dict)  # weight_mask buffers of a pruned model
        check_state_dict(state_dict, model, str(weights_path))
        model.load_state_dict(state_dict, assign=True)
        rezero_masked_weights(model, str(weights_path))
        info = read_info(directory)
        if info is not None:
            setattr(model, INFO_ATTR, info)
        return model

    # ------------------------------------------------------------------ conveniences
    def transform(self) -> Callable:
        """timm's eval transform for this model (resize, crop, normalize), PIL image -> tensor."""
        from timm.data import create_transform, resolve_data_config

        pretrained_cfg = {**self.cfg.preprocessing,
                          "input_size": (self.cfg.in_chans, self.cfg.img_size, self.cfg.img_size)}
        return create_transform(**resolve_data_config(pretrained_cfg=pretrained_cfg), is_training=False)

    def summary(self) -> str:
        """Architecture, parameter count and the hook table (name, shape, meaning)."""
        cfg = self.cfg
        n_params = sum(p.numel() for p in self.parameters())
        lines = [
            f"HookedViT {cfg.model_name} ({cfg.timm_name or 'custom timm VisionTransformer'})",
            f"  {cfg.n_layers} blocks, d_model {cfg.d_model}, {cfg.n_heads} heads x d_head {cfg.d_head}, "
            f"d_mlp {cfg.d_mlp}, {cfg.img_size}px / patch {cfg.patch_size} -> {cfg.n_ctx} tokens, "
            f"{cfg.n_classes or 'no'} classes{' (headless: returns the pooled features)' if not cfg.n_classes else ''}, "
            f"LayerScale {cfg.layer_scale}, MLP {cfg.act_fn}{', ln_pre' if cfg.ln_pre else ''}, "
            f"{n_params / 1e6:.2f}M parameters",
            (f"  positions: {', '.join(self.to_str_tokens()[:cfg.n_prefix_tokens]) or 'no prefix tokens'}, then "
             f"{cfg.n_patches} patches; pooling {cfg.pooling!r}{' + fc_norm' if cfg.fc_norm else ''}"
             f"{', class + distillation heads averaged' if cfg.has_dist_token else ''}"),
            f"  {len(self.hook_dict)} hooks, {len(self.sites)} circuit sites ({self.sites.n_units} units)",
            "",
            hook_table(cfg),
        ]
        return "\n".join(lines)
