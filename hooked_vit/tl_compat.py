"""What a TransformerLens ``HookedTransformer`` offers beyond hooks, for a HookedViT: stacked weight
views in TL's names and shapes, ``OV``/``QK`` factored matrices, ``accumulated_bias``, class
residual directions, weight processing, and caching that knows ``hook_pooled`` has no position axis.

Vocabulary = classes, unembedding = the classifier head, tokens = the CLS token then the patches.
Where TL's methods need nothing ViT-specific they are TL's own (taken from ``HookedTransformer``);
methods without a meaning for an image classifier raise ``NotImplementedError`` naming the
alternative.

Weight views (``[n_layers, ...]`` stacks of the per-block views in :mod:`hooked_vit.components`):
``W_Q``/``W_K``/``W_V`` ``[layer, head, d_model, d_head]``, ``b_Q``/``b_K``/``b_V``
``[layer, head, d_head]``, ``W_O`` ``[layer, head, d_head, d_model]``, ``b_O`` ``[layer, d_model]``,
``W_in`` ``[layer, d_model, d_mlp]``, ``b_in``, ``W_out`` ``[layer, d_mlp, d_model]``, ``b_out``.
``W_O``, ``b_O``, ``W_out``, ``b_out`` include LayerScale (what reaches the residual stream), so
they are new tensors: edit weights through the timm parameters (``attn.proj``, ``mlp.fc2``).
``W_U`` ``[d_model, n_classes]`` and ``b_U`` are the head; ``W_pos`` ``[n_ctx, d_model]`` the
position embedding per token (a zero row at CLS for DeiT-III); ``W_E`` ``[in_chans * patch *
patch, d_model]`` the patch embedding as a matrix on a patch's flattened pixels (its conv bias and
the CLS token are not in it).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn
from transformer_lens.HookedTransformer import HookedTransformer

from hooked_vit.components import mark_read_only
from hooked_vit.errors import InvalidArgumentError, InvalidTypeError
from hooked_vit.hook_table import OPTIONAL_HOOK_FLAGS, POOLED_HOOKS


def _no_meaning(method: str, alternative: str) -> Callable[..., Any]:
    def raise_not_implemented(self: Any, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError(f"{method} has no meaning for an image classifier: {alternative}")

    raise_not_implemented.__name__ = method
    raise_not_implemented.__doc__ = f"Not available on a HookedViT: {alternative}"
    return raise_not_implemented


_IMAGES = ("the input is an image batch [batch, channel, height, width] (model.transform() prepares a PIL "
           "image); the positions are CLS (DIST, registers; none for SigLIP) then the patches, labelled by "
           "model.to_str_tokens()")


class TransformerLensMixin:
    """HookedTransformer's interface on a HookedViT (see the module docstring)."""

    tokenizer = None  # no tokenizer: inputs are images

    # ------------------------------------------------------------------ weight views (TL's own)
    W_Q = HookedTransformer.W_Q
    W_K = HookedTransformer.W_K
    W_V = HookedTransformer.W_V
    W_O = HookedTransformer.W_O
    b_Q = HookedTransformer.b_Q
    b_K = HookedTransformer.b_K
    b_V = HookedTransformer.b_V
    b_O = HookedTransformer.b_O
    W_in = HookedTransformer.W_in
    W_gate = HookedTransformer.W_gate  # None unless gated_mlp (SwiGLU: EVA-02)
    b_in = HookedTransformer.b_in
    W_out = HookedTransformer.W_out
    b_out = HookedTransformer.b_out
    QK = HookedTransformer.QK
    OV = HookedTransformer.OV
    W_E_pos = HookedTransformer.W_E_pos
    accumulated_bias = HookedTransformer.accumulated_bias
    all_composition_scores = HookedTransformer.all_composition_scores
    all_head_labels = HookedTransformer.all_head_labels
    n_params_total = HookedTransformer.n_params_total

    @property
    def W_U(self) -> Float[Tensor, "d_model n_classes"]:
        """The classifier head's weight: ``hook_pooled @ W_U + b_U`` are the logits (for a distilled
        DeiT, the class head's; the logits average it with ``head_dist``'s)."""
        return self._classifier().weight.T

    @property
    def b_U(self) -> Float[Tensor, "n_classes"]:
        return self._classifier().bias

    def _classifier(self) -> nn.Linear:
        if self.cfg.n_classes == 0:
            raise InvalidArgumentError("this model is headless (n_classes=0): it has no classifier weights W_U/b_U; "
                                       "its output is the pooled features")
        return self.head

    @property
    def unembed(self) -> nn.Linear:
        """The classifier head (TL's ``model.unembed``): ``model.unembed(normalized_resid)``,
        ``model.unembed.W_U``, ``model.unembed.b_U``."""
        return self.head

    @property
    def W_pos(self) -> Float[Tensor, "n_ctx d_model"]:
        """Position embedding of each token, CLS (DIST, registers) first (zero rows there when
        ``no_embed_class``; all zero without a learned absolute embedding, DINOv3's RoPE-only models)."""
        if self.pos_embed is None:
            weight = self.patch_embed.proj.weight
            return weight.new_zeros(self.cfg.n_ctx, self.cfg.d_model)
        pos = self.pos_embed[0]
        if not self.cfg.no_embed_class:
            return pos
        return torch.cat([pos.new_zeros(self.cfg.n_prefix_tokens, pos.shape[-1]), pos])

    @property
    def W_E(self) -> Float[Tensor, "patch_pixels d_model"]:
        """Patch embedding as a matrix on a patch's pixels flattened in ``(channel, row, column)``
        order: ``patch_pixels @ W_E + conv bias`` (none for CLIP) is the patch token
        (``hook_embed[:, cfg.n_prefix_tokens:]``)."""
        return self.patch_embed.proj.weight.flatten(1).T

    # ------------------------------------------------------------------ classes as the vocabulary
    @property
    def class_names(self) -> list[str] | None:
        """Readable class names of the model's builtin dataset (``None`` if it has none)."""
        dataset = self.cfg.dataset
        if dataset == "digits":
            from hooked_vit.data.digits import DIGITS_CLASS_NAMES

            return list(DIGITS_CLASS_NAMES)
        if dataset is not None and dataset.startswith("imagenet"):
            from hooked_vit.data.imagenet import imagenet_class_names

            names = imagenet_class_names()
            return list(names) if len(names) == self.cfg.n_classes else None
        return None

    def to_single_token(self, class_name: str) -> int:
        """The class index of ``class_name`` (TL maps a string to its token id; here the vocabulary is
        the classes), or of a class index written as a string. Used by ``tokens_to_residual_directions``
        and ``cache.logit_attrs``."""
        names = self.class_names
        if names is not None and class_name in names:
            return names.index(class_name)
        if class_name.isdigit() and int(class_name) < self.cfg.n_classes:
            return int(class_name)
        known = f"one of {names[:10]}{' ...' if len(names) > 10 else ''}" if names else \
            f"a class index 0..{self.cfg.n_classes - 1}"
        raise InvalidArgumentError(f"{class_name!r} is not a class of this model: pass {known}")

    def to_single_str_token(self, class_index: int) -> str:
        """The name of class ``class_index`` (its index as a string if the model has no names)."""
        if not 0 <= class_index < self.cfg.n_classes:
            raise InvalidArgumentError(f"class index {class_index} out of range 0..{self.cfg.n_classes - 1}")
        names = self.class_names
        return names[class_index] if names else str(class_index)

    def class_residual_directions(
        self, classes: int | str | Sequence[int | str] | Int[Tensor, "*batch"]
    ) -> Float[Tensor, "*batch d_model"]:
        """Residual directions of classes given by index or name, shaped like ``classes`` plus
        ``d_model``: the head's columns times the final LayerNorm's weight, ``ln_final.w * W_U[:, c]``
        (just ``W_U[:, c]`` after ``fold_ln``, where that weight is folded into ``W_U``). Dotted with
        a component after ``cache.apply_ln_to_stack`` (centred, over the cached final scale) this is
        the component's share of logit ``c`` minus ``b_U[c]`` and the LN bias's ``ln_final.b @ W_U[:, c]``."""
        if isinstance(classes, (int, str)):
            return self.tokens_to_residual_directions(classes)
        if not isinstance(classes, Tensor):
            classes = torch.tensor([self._class_index(c) for c in classes], dtype=torch.long)
        if classes.dtype.is_floating_point or classes.dtype == torch.bool:
            raise InvalidTypeError(f"classes must be integer class indices, got a {classes.dtype} tensor")
        if classes.numel() and not (0 <= int(classes.min()) and int(classes.max()) < self.cfg.n_classes):
            raise InvalidArgumentError(f"class indices must be in 0..{self.cfg.n_classes - 1}, got "
                                       f"{int(classes.min())}..{int(classes.max())}")
        if self.cfg.pooling == "token_avg":
            raise InvalidArgumentError("with pooling 'token_avg' the head reads two vectors (CLS and the mean patch "
                                       "token), not one residual position: use the directions at hook_pooled (model.W_U)")
        if self.cfg.pooling == "map":
            raise InvalidArgumentError("with an attention-pool head (pooling 'map') the logits are not linear in the "
                                       "residual stream: there is no class residual direction; use the gradient of "
                                       "the logit, or the directions at hook_pooled (model.W_U)")
        directions = self.W_U[:, classes.to(self.W_U.device)].movedim(0, -1)
        norm = self.fc_norm if self.cfg.fc_norm else self.ln_final
        return directions * norm.weight if self.cfg.normalization_type == "LN" else directions

    def tokens_to_residual_directions(
        self, tokens: int | str | Int[Tensor, "*batch"]
    ) -> Float[Tensor, "*batch d_model"]:
        """TL's ``tokens_to_residual_directions`` with classes as tokens: the direction ``[d_model]``
        of one class (an index, a name, or a one-element tensor, as TL), or ``[*shape, d_model]``
        for a tensor of several; the final LayerNorm's weight is included (see
        :meth:`class_residual_directions`), so ``cache.logit_attrs`` is right without ``fold_ln``."""
        if isinstance(tokens, Tensor) and tokens.numel() > 1:
            return self.class_residual_directions(tokens)
        if isinstance(tokens, Tensor) and tokens.numel() == 1:
            tokens = int(tokens.item())
        if not isinstance(tokens, (int, str)) or isinstance(tokens, bool):
            raise InvalidTypeError(f"tokens must be a class index, a class name or an integer tensor, "
                                   f"got {type(tokens).__name__}")
        return self.class_residual_directions(torch.tensor([self._class_index(tokens)]))[0]

    def _class_index(self, cls: int | str) -> int:
        if isinstance(cls, str):
            return self.to_single_token(cls)
        if not 0 <= cls < self.cfg.n_classes:
            raise InvalidArgumentError(f"class indices must be in 0..{self.cfg.n_classes - 1}, got {cls}")
        return cls

    def to_str_tokens(self, images: Tensor | str | list[str] | None = None, *args: Any, **kwargs: Any) -> list[str]:
        """Labels of the token positions (``n_ctx`` of them, the same for every image: TL's string
        tokens of an input): ``"CLS"`` (none without a class token, as SigLIP), ``"DIST"`` for a
        distilled DeiT, ``"REG0"``.. for registers, then ``"r{row}c{col}"`` per patch."""
        if isinstance(images, str) or (isinstance(images, list) and images and isinstance(images[0], str)):
            raise NotImplementedError(f"to_str_tokens of text has no meaning for an image classifier: {_IMAGES}")
        cfg, grid = self.cfg, self.cfg.grid_size
        prefix = ["CLS"] * cfg.class_token + ["DIST"] * cfg.has_dist_token + [f"REG{i}" for i in range(cfg.n_registers)]
        return prefix + [f"r{r}c{c}" for r in range(grid) for c in range(grid)]

    to_tokens = _no_meaning("to_tokens", _IMAGES)
    to_string = _no_meaning("to_string", "an image classifier has no text to decode; "
                            "class names come from model.to_single_str_token(index)")
    get_token_position = _no_meaning("get_token_position", "position 0 is CLS (if cfg.class_token) and patch "
                                     "(row, col) is cfg.n_prefix_tokens + row * grid_size + col (model.to_str_tokens() "
                                     "labels every position)")
    set_tokenizer = _no_meaning("set_tokenizer", _IMAGES)
    generate = _no_meaning("generate", "it does not generate; model(images) gives the class logits")
    generate_stream = _no_meaning("generate_stream", "it does not generate; model(images) gives the class logits")
    sample_datapoint = _no_meaning("sample_datapoint", "use hooked_vit.data.load_dataset('builtin', model=model)")
    load_sample_training_dataset = _no_meaning("load_sample_training_dataset",
                                               "use hooked_vit.data.load_dataset('builtin', model=model)")

    # ------------------------------------------------------------------ weight processing
    def process_weights_(
        self,
        fold_ln: bool = True,
        center_writing_weights: bool = True,
        center_unembed: bool = True,
        refactor_factored_attn_matrices: bool = False,
        fold_value_biases: bool = True,
        fold_layer_scale: bool | None = None,
    ) -> None:
        """TransformerLens's in-place weight processing (TL's positional order; TL folds the value
        biases here too), LayerScale folded first (see
        :func:`hooked_vit.weight_processing.process_weights_`)."""
        from hooked_vit.weight_processing import process_weights_

        process_weights_(self, fold_ln=fold_ln, center_writing_weights=center_writing_weights,
                         center_unembed=center_unembed, fold_value_biases=fold_value_biases,
                         refactor_factored_attn_matrices=refactor_factored_attn_matrices,
                         fold_layer_scale=fold_layer_scale)

    def fold_layer_norm(self, state_dict: dict[str, Tensor], fold_biases: bool = True,
                        center_weights: bool = True) -> dict[str, Tensor]:
        """TL's ``fold_layer_norm`` on a state dict laid out as ``model.state_dict()`` (LayerScale
        folded first): each LayerNorm's weight and bias folded into the weights reading its output,
        which are centred; the LayerNorms become weight 1, bias 0. Returns a new dict
        (``model.load_state_dict`` it); ``from_pretrained(fold_ln=True)`` gives the same weights."""
        if not (fold_biases and center_weights):
            raise InvalidArgumentError("fold_biases=False and center_weights=False are TransformerLens's options for "
                                       "RMSNorm; a ViT's LayerNorm folds with both True")
        return self._processed(state_dict, fold_ln=True)

    def center_writing_weights(self, state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
        """TL's ``center_writing_weights`` on a ``model.state_dict()``-layout dict: every weight
        writing to the residual stream (patch embedding and its bias, CLS token, position embedding,
        ``W_O``, ``W_out`` and their biases) centred over ``d_model``; returns a new dict."""
        return self._processed(state_dict, center_writing_weights=True)

    def center_unembed(self, state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
        """TL's ``center_unembed``: ``W_U`` and ``b_U`` centred over the classes (each image's logits
        shift by a constant, probabilities are unchanged); returns a new dict."""
        return self._processed(state_dict, center_unembed=True)

    def fold_value_biases(self, state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
        """TL's ``fold_value_biases``: ``b_O += sum_h b_V[h] @ W_O[h]`` and ``b_V = 0`` (patterns sum
        to 1, so the output is unchanged); returns a new dict."""
        return self._processed(state_dict, fold_value_biases=True)

    def refactor_factored_attn_matrices(self, state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
        """TL's ``refactor_factored_attn_matrices`` (``W_O`` a rotation, QK and OV kept up to the
        SVDs' rounding); returns a new dict."""
        return self._processed(state_dict, refactor_factored_attn_matrices=True)

    def _processed(self, state_dict: dict[str, Tensor], **step: bool) -> dict[str, Tensor]:
        from hooked_vit.weight_processing import processed_state_dict

        return processed_state_dict(self, state_dict, **step)

    @classmethod
    def from_pretrained_no_processing(cls, name: Any, **kwargs: Any) -> Any:
        """``from_pretrained`` with every weight-processing flag off (HookedViT's default too)."""
        flags = dict(fold_ln=False, center_writing_weights=False, center_unembed=False,
                     fold_value_biases=False, refactor_factored_attn_matrices=False, fold_layer_scale=False)
        return cls.from_pretrained(name, **{**flags, **kwargs})

    # ------------------------------------------------------------------ caching
    def get_caching_hooks(
        self,
        names_filter: Any = None,
        incl_bwd: bool = False,
        device: Any = None,
        remove_batch_dim: bool = False,
        cache: dict | None = None,
        pos_slice: Any = None,
    ) -> tuple[dict, list, list]:
        """TL's caching hooks, except for hooks without a position axis (``hook_pooled``, and an
        SAE's latents at CLS or patch tokens only), which ``pos_slice`` leaves whole. The forward
        hooks are marked read-only (:func:`hooked_vit.components.mark_read_only`)."""
        cache, fwd, bwd = super().get_caching_hooks(names_filter, incl_bwd, device, remove_batch_dim, cache,
                                                    pos_slice)
        from hooked_vit.saes import sae_hooks_without_positions

        unpositioned = set(POOLED_HOOKS) | sae_hooks_without_positions(self)

        def save_whole(tensor: Tensor, hook: Any, is_backward: bool) -> None:
            value = tensor.detach().to(device)
            cache[hook.name + ("_grad" if is_backward else "")] = value[0] if remove_batch_dim else value

        fwd = [(n, partial(save_whole, is_backward=False) if n in unpositioned else h) for n, h in fwd]
        bwd = [(n, partial(save_whole, is_backward=True) if n in unpositioned else h) for n, h in bwd]
        for _, hook in fwd:  # they only read: the forward pass need not copy values for them
            mark_read_only(hook)
        return cache, fwd, bwd

    # ------------------------------------------------------------------ cfg.device and cfg.dtype kept current
    def setup(self) -> None:
        """TL's ``setup`` (names every module, builds ``hook_dict``), leaving out the optional hooks
        whose flag is off (``hook_attn_in``, ``hook_q_input``, ... : see :meth:`set_use_attn_in`)."""
        super().setup()
        for name in self.disabled_hooks():
            self.hook_dict.pop(name, None)
            self.mod_dict.pop(name, None)
        self._sync_device()

    def disabled_hooks(self) -> dict[str, str]:
        """``{hook name: config flag}`` of the optional TransformerLens hooks that are switched off."""
        return {f"blocks.{layer}.{name}": flag for layer in range(self.cfg.n_layers)
                for name, flag in OPTIONAL_HOOK_FLAGS.items() if not getattr(self.cfg, flag)}

    def _apply(self, fn: Callable, recurse: bool = True) -> Any:
        out = super()._apply(fn, recurse)
        self._sync_device()
        return out

    def load_state_dict(self, *args: Any, **kwargs: Any) -> Any:
        out = super().load_state_dict(*args, **kwargs)
        self._sync_device()
        return out

    def _sync_device(self) -> None:
        param = next(self.parameters(), None)
        if param is not None and param.device.type != "meta":
            self.cfg.device = str(param.device)
        if param is not None:
            self.cfg.dtype = param.dtype
