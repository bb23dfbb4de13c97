"""Where a hook's value has its tokens, and which tokens an SAE reads: CLS (``"cls"``), the
patches (``"patch"``) or all of them (``"all"``, CLS then patches)."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn

from hooked_vit.errors import InvalidArgumentError, InvalidTypeError
from hooked_vit.names import TOKEN_CHOICES, check_tokens  # noqa: F401  (public here)
from hooked_vit.hook_table import EMBED_HOOKS, hook_shape
from hooked_vit.validation import check_hook_names

_BLOCK_HOOK = re.compile(r"^blocks\.(\d+)\.")
_NO_TOKEN_AXIS = ("attn.hook_attn_scores", "attn.hook_pattern")


@dataclass(frozen=True)
class HookLayout:
    """Where hook ``hook_name`` fires and how its value becomes activations: ``stop_at_layer``
    (blocks that must run; ``None`` = the whole model), whether dim 1 is the token position,
    ``d_in`` (trailing dims flattened) and ``n_prefix`` (tokens before the patches: CLS, DIST,
    registers)."""

    hook_name: str
    stop_at_layer: int | None
    has_positions: bool
    d_in: int
    n_prefix: int = 1


def hook_layout(model: nn.Module, hook_name: str) -> HookLayout:
    """The :class:`HookLayout` of ``hook_name`` in ``model``; unknown hooks fail with the closest
    names, and hooks without a per-token feature vector (attention scores/patterns) are refused."""
    if not isinstance(hook_name, str):
        raise InvalidTypeError(f"a hook name is a string, got {type(hook_name).__name__}")
    check_hook_names([hook_name], model.hook_dict)
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
    elif hook_name in {name for name, _, _ in EMBED_HOOKS}:
        stop = 0
    else:
        stop = None
    has_positions = len(shape) > 2
    return HookLayout(hook_name, stop, has_positions, math.prod(shape[2:] if has_positions else shape[1:]),
                      model.cfg.n_prefix_tokens)


def token_positions(tokens: str, n_ctx: int, n_prefix: int = 1) -> Int[Tensor, "n_tok"]:
    """Token positions of a choice: ``cls`` -> [0], ``patch`` -> n_prefix..n_ctx-1 (after CLS, DIST
    and registers), ``all`` -> 0..n_ctx-1."""
    check_tokens(tokens)
    if tokens == "cls":
        return torch.zeros(1, dtype=torch.long)
    return torch.arange(n_prefix if tokens == "patch" else 0, n_ctx)


def select_tokens(
    act: Float[Tensor, "batch *dims"], layout: HookLayout, tokens: str, n_ctx: int
) -> Float[Tensor, "batch n_tok d_in"]:
    """The chosen tokens of a hook's value, trailing dims flattened: ``[batch, n_tok, d_in]``.
    A hook without a token axis (``hook_pooled``, the final-norm CLS token) allows only ``"cls"``."""
    if not layout.has_positions:
        if check_tokens(tokens) != "cls":
            raise InvalidArgumentError(f"{layout.hook_name} is the CLS token only (no token axis): use tokens='cls'")
        return act.reshape(act.shape[0], 1, layout.d_in)
    index = token_positions(tokens, n_ctx, layout.n_prefix).to(act.device)
    picked = act if tokens == "all" else act.index_select(1, index)
    return picked.reshape(act.shape[0], index.numel(), layout.d_in)
