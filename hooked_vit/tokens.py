"""Where a hook's value has its tokens, and which tokens an SAE reads: CLS (``"cls"``), the
patches (``"patch"``) or all of them (``"all"``, CLS then patches). A model without a class token
(SigLIP) has no ``"cls"`` choice at its token positions."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn

from hooked_vit.errors import InvalidArgumentError, InvalidTypeError
from hooked_vit.names import TOKEN_CHOICES, check_tokens  # noqa: F401  (public here)
from hooked_vit.hook_table import embed_hooks, hook_shape
from hooked_vit.validation import check_hook_names

_BLOCK_HOOK = re.compile(r"^blocks\.(\d+)\.")
_NO_TOKEN_AXIS = ("attn.hook_attn_scores", "attn.hook_pattern")
# The attention pool's keys and values run over the patch tokens only, not the model's positions.
_POOL_KEYS = ("attn_pool.hook_k", "attn_pool.hook_v", "attn_pool.hook_attn_scores", "attn_pool.hook_pattern")


@dataclass(frozen=True)
class HookLayout:
    """Where hook ``hook_name`` fires and how its value becomes activations: ``stop_at_layer``
    (blocks that must run; ``None`` = the whole model), whether dim 1 is the token position,
    ``d_in`` (trailing dims flattened), ``n_prefix`` (tokens before the patches: CLS, DIST,
    registers) and ``class_token`` (whether position 0 is CLS)."""

    hook_name: str
    stop_at_layer: int | None
    has_positions: bool
    d_in: int
    n_prefix: int = 1
    class_token: bool = True


def hook_layout(model: nn.Module, hook_name: str) -> HookLayout:
    """The :class:`HookLayout` of ``hook_name`` in ``model``; unknown hooks fail with the closest
    names, and hooks without a per-token feature vector (attention scores/patterns) are refused."""
    if not isinstance(hook_name, str):
        raise InvalidTypeError(f"a hook name is a string, got {type(hook_name).__name__}")
    check_hook_names([hook_name], model.hook_dict)
    if hook_name in _POOL_KEYS:
        raise InvalidArgumentError(f"{hook_name} runs over the patch tokens inside the attention pool, not the model's "
                                   "positions; use the last block's hook_resid_post or attn_pool.hook_z/hook_attn_out")
    if hook_name.endswith(_NO_TOKEN_AXIS):
        raise InvalidArgumentError(f"{hook_name} has shape [batch head query_pos key_pos]: no per-token feature vector to "
                         "train an SAE on; use attn.hook_z, hook_attn_out or the residual stream")
    if hook_name.endswith("attn.hook_result") and not model.cfg.use_attn_result:
        raise InvalidArgumentError(f"{hook_name} only fires with per-head results on: call model.set_use_attn_result(True)")
    try:
        shape = hook_shape(hook_name, model.cfg, 1)
    except KeyError:
        raise InvalidArgumentError(f"{hook_name} is not a HookedViT activation hook (see hooked_vit.hook_table)") from None
    match = _BLOCK_HOOK.match(hook_name)
    if match:
        stop: int | None = int(match.group(1)) + 1
    elif hook_name in {name for name, _, _ in embed_hooks(model.cfg)}:
        stop = 0
    else:
        stop = None
    # [batch, pos, ...] over the model's positions; the attention pool's [batch, latent, ...] has one
    # vector per image (its latent), like hook_pooled
    has_positions = len(shape) > 2 and not hook_name.startswith("attn_pool.")
    return HookLayout(hook_name, stop, has_positions, math.prod(shape[2:] if has_positions else shape[1:]),
                      model.cfg.n_prefix_tokens, model.cfg.class_token)


def token_positions(tokens: str, n_ctx: int, n_prefix: int = 1, class_token: bool = True) -> Int[Tensor, "n_tok"]:
    """Token positions of a choice: ``cls`` -> [0], ``patch`` -> n_prefix..n_ctx-1 (after CLS, DIST
    and registers), ``all`` -> 0..n_ctx-1; ``cls`` is refused without a class token."""
    check_tokens(tokens)
    if tokens == "cls":
        if not class_token:
            raise InvalidArgumentError("this model has no class token (e.g. SigLIP): choose tokens='patch' or 'all', "
                                       "or read the pooled features at hook_pooled")
        return torch.zeros(1, dtype=torch.long)
    return torch.arange(n_prefix if tokens == "patch" else 0, n_ctx)


def select_tokens(
    act: Float[Tensor, "batch *dims"], layout: HookLayout, tokens: str, n_ctx: int
) -> Float[Tensor, "batch n_tok d_in"]:
    """The chosen tokens of a hook's value, trailing dims flattened: ``[batch, n_tok, d_in]``.
    A hook without a token axis (``hook_pooled``, the pooled features; the attention pool's latent)
    allows only ``"cls"`` (one vector per image)."""
    if not layout.has_positions:
        if check_tokens(tokens) != "cls":
            raise InvalidArgumentError(f"{layout.hook_name} is the CLS token only or the pooled features (no token "
                                       "axis, one vector per image): use tokens='cls'")
        return act.reshape(act.shape[0], 1, layout.d_in)
    index = token_positions(tokens, n_ctx, layout.n_prefix, layout.class_token).to(act.device)
    picked = act if tokens == "all" else act.index_select(1, index)
    return picked.reshape(act.shape[0], index.numel(), layout.d_in)
