"""TransformerLens's activation-patching helpers for images, under TL's names and signatures.

``get_act_patch_resid_pre(model, corrupted_images, clean_cache, patching_metric)`` and the rest of
``transformer_lens.patching`` take a corrupted image batch ``[batch, channel, height, width]``, the
cache of the clean run and a metric on the patched logits (a scalar). They run TL's own
``generic_activation_patch`` and patch setters; only the position axis differs: TL takes its length
from the input's last axis (tokens), here it is the model's ``n_ctx`` (CLS then the patches,
``model.to_str_tokens()`` labels them). Results have TL's shapes, e.g. ``[n_layers, n_ctx]`` for
``get_act_patch_resid_pre`` and ``[n_layers, n_ctx, n_heads]`` for
``get_act_patch_attn_head_out_by_pos``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor
from transformer_lens import patching as tl_patching
from transformer_lens.ActivationCache import ActivationCache

from hooked_vit.cache import ViTActivationCache
from hooked_vit.errors import InvalidArgumentError
from hooked_vit.validation import check_images

Metric = Callable[[Float[Tensor, "batch n_classes"]], Float[Tensor, ""]]


def axis_sizes(model: Any, axis_names: Sequence[str]) -> list[int]:
    """Length of each of TL's patching axes for ``model``: layers, positions (CLS + patches), heads."""
    sizes = {"layer": model.cfg.n_layers, "pos": model.cfg.n_ctx, "src_pos": model.cfg.n_ctx,
             "dest_pos": model.cfg.n_ctx, "head": model.cfg.n_heads, "head_index": model.cfg.n_heads}
    unknown = [a for a in axis_names if a not in sizes]
    if unknown:
        raise InvalidArgumentError(f"unknown patching axes {unknown}; TL's axes are {sorted(sizes)}")
    return [sizes[a] for a in axis_names]


def check_patching_inputs(
    model: Any, corrupted_images: Float[Tensor, "batch channel height width"], clean_cache: ViTActivationCache
) -> None:
    """One-line errors, before any patching run, for images the model cannot take and for a clean
    cache without the corrupted batch's size on a batch axis (TL patches example by example)."""
    check_images(corrupted_images, model.cfg, model.patch_embed.proj.weight)
    if not isinstance(clean_cache, ActivationCache) or not clean_cache.has_batch_dim:
        raise InvalidArgumentError("clean_cache must be the ActivationCache of model.run_with_cache(clean_images), "
                                   "with its batch axis (not remove_batch_dim=True)")
    sizes = {value.shape[0] for value in clean_cache.values()}
    if sizes != {corrupted_images.shape[0]}:
        raise InvalidArgumentError(f"clean_cache holds batch size {sorted(sizes)} but corrupted_images has "
                                   f"{corrupted_images.shape[0]}: run the clean and corrupted images as equal batches")


def generic_activation_patch(
    model: Any,
    corrupted_images: Float[Tensor, "batch channel height width"],
    clean_cache: ViTActivationCache,
    patching_metric: Metric,
    patch_setter: Callable,
    activation_name: str,
    index_axis_names: Sequence[str] | None = None,
    index_df: pd.DataFrame | None = None,
    return_index_df: bool = False,
) -> Tensor | tuple[Tensor, pd.DataFrame]:
    """TL's ``generic_activation_patch`` on images: with ``index_axis_names`` the result has one axis
    per name (positions = ``n_ctx``); with ``index_df`` one entry per row, as in TL."""
    if (index_axis_names is None) == (index_df is None):
        raise InvalidArgumentError("pass exactly one of index_axis_names (e.g. ('layer', 'pos')) and index_df")
    check_patching_inputs(model, corrupted_images, clean_cache)
    shape = None
    if index_df is None:
        shape = axis_sizes(model, index_axis_names)
        index_df = tl_patching.make_df_from_ranges(shape, list(index_axis_names))
    flat, index_df = tl_patching.generic_activation_patch(
        model, corrupted_images, clean_cache, patching_metric, patch_setter=patch_setter,
        activation_name=activation_name, index_df=index_df, return_index_df=True,
    )
    result = flat if shape is None else flat.reshape(shape)
    return (result, index_df) if return_index_df else result


def _image_version(name: str) -> Callable[..., Tensor]:
    """The image version of TL's partial ``transformer_lens.patching.<name>``."""
    tl_partial = getattr(tl_patching, name)
    keywords = tl_partial.keywords
    patch = partial(generic_activation_patch, patch_setter=keywords["patch_setter"],
                    activation_name=keywords["activation_name"], index_axis_names=keywords["index_axis_names"])

    def patcher(model: Any, corrupted_images: Float[Tensor, "batch channel height width"],
                clean_cache: ViTActivationCache, patching_metric: Metric) -> Tensor:
        return patch(model, corrupted_images, clean_cache, patching_metric)

    axes = ", ".join("n_ctx" if "pos" in a else f"n_{a.split('_')[0]}s" for a in keywords["index_axis_names"])
    patcher.__name__ = name
    patcher.__doc__ = (f"TL's ``{name}`` on images: patch ``{keywords['activation_name']}`` from the clean "
                       f"cache into the corrupted images' run, one patch per index; returns the metric "
                       f"``[{axes}]``.")
    return patcher


get_act_patch_resid_pre = _image_version("get_act_patch_resid_pre")
get_act_patch_resid_mid = _image_version("get_act_patch_resid_mid")
get_act_patch_attn_out = _image_version("get_act_patch_attn_out")
get_act_patch_mlp_out = _image_version("get_act_patch_mlp_out")
get_act_patch_attn_head_out_by_pos = _image_version("get_act_patch_attn_head_out_by_pos")
get_act_patch_attn_head_q_by_pos = _image_version("get_act_patch_attn_head_q_by_pos")
get_act_patch_attn_head_k_by_pos = _image_version("get_act_patch_attn_head_k_by_pos")
get_act_patch_attn_head_v_by_pos = _image_version("get_act_patch_attn_head_v_by_pos")
get_act_patch_attn_head_pattern_by_pos = _image_version("get_act_patch_attn_head_pattern_by_pos")
get_act_patch_attn_head_pattern_dest_src_pos = _image_version("get_act_patch_attn_head_pattern_dest_src_pos")
get_act_patch_attn_head_out_all_pos = _image_version("get_act_patch_attn_head_out_all_pos")
get_act_patch_attn_head_q_all_pos = _image_version("get_act_patch_attn_head_q_all_pos")
get_act_patch_attn_head_k_all_pos = _image_version("get_act_patch_attn_head_k_all_pos")
get_act_patch_attn_head_v_all_pos = _image_version("get_act_patch_attn_head_v_all_pos")
get_act_patch_attn_head_pattern_all_pos = _image_version("get_act_patch_attn_head_pattern_all_pos")


def get_act_patch_attn_head_all_pos_every(
    model: Any, corrupted_images: Float[Tensor, "batch channel height width"],
    clean_cache: ViTActivationCache, metric: Metric,
) -> Float[Tensor, "5 layer head"]:
    """Every head patched over all positions, for its output, q, k, v and pattern (TL's order)."""
    patchers = (get_act_patch_attn_head_out_all_pos, get_act_patch_attn_head_q_all_pos,
                get_act_patch_attn_head_k_all_pos, get_act_patch_attn_head_v_all_pos,
                get_act_patch_attn_head_pattern_all_pos)
    return torch.stack([p(model, corrupted_images, clean_cache, metric) for p in patchers])


def get_act_patch_attn_head_by_pos_every(
    model: Any, corrupted_images: Float[Tensor, "batch channel height width"],
    clean_cache: ViTActivationCache, metric: Metric,
) -> Float[Tensor, "5 layer pos head"]:
    """Every head patched at each position, for its output, q, k, v and pattern (TL's order; the
    pattern's ``[layer, head, pos]`` result transposed to ``[layer, pos, head]`` as TL does)."""
    patchers = (get_act_patch_attn_head_out_by_pos, get_act_patch_attn_head_q_by_pos,
                get_act_patch_attn_head_k_by_pos, get_act_patch_attn_head_v_by_pos)
    results = [p(model, corrupted_images, clean_cache, metric) for p in patchers]
    pattern = get_act_patch_attn_head_pattern_by_pos(model, corrupted_images, clean_cache, metric)
    return torch.stack(results + [pattern.transpose(1, 2)])


def get_act_patch_block_every(
    model: Any, corrupted_images: Float[Tensor, "batch channel height width"],
    clean_cache: ViTActivationCache, metric: Metric,
) -> Float[Tensor, "3 layer pos"]:
    """The residual stream entering each block, each attention output and each MLP output, patched
    at each position (TL's order)."""
    patchers = (get_act_patch_resid_pre, get_act_patch_attn_out, get_act_patch_mlp_out)
    return torch.stack([p(model, corrupted_images, clean_cache, metric) for p in patchers])
