"""A transcoder in place of the model's MLPs, and the contribution scores it makes possible.

:func:`replaced`: hooks on every layer's input hook encode the running (replaced) model's own
activations, hooks on ``blocks.l.hook_mlp_out`` substitute the decoded output at the chosen
positions, so replacement runs layer after layer as the paper's replacement model.

:func:`contributions`: with every MLP output replaced (all layers, all tokens) the last residual
stream is exactly ``embeddings + attention outputs + sum_i term_i + decoder biases``, where
``term_i = z_i @ sum_{l >= i} W_dec[i -> l]`` is source layer ``i``'s decoded term summed over the
layers it writes to. The final LayerNorm is linear once its scale is frozen at the run's value, so
each term maps onto the pooled representation ``h`` (the head's input) as
``p_i = pool((term_i - mean(term_i)) / scale * w)``; the score is ``<p_i, h> / <h, h>``, its share of
``h`` (the shares of every piece, the LayerNorm bias included, sum to 1).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from analyses.transcoders.clt import check_positions, layer_iterator
from hooked_vit.errors import check


def position_index(model: Any, positions: str) -> slice:
    """The token positions ``positions`` names: ``all``, ``cls`` (position 0) or ``patches`` (after
    the prefix tokens)."""
    check_positions(positions)
    n_prefix = model.cfg.n_prefix_tokens
    return {"all": slice(None), "cls": slice(0, 1), "patches": slice(n_prefix, None)}[positions]


@contextlib.contextmanager
def replaced(clt: Any, model: Any, layers: Iterable[int] | None = None, positions: str = "all", *,
             keep: Iterable[int] | None = None) -> Iterator[dict[str, Any]]:
    """Within the block, ``model``'s MLP outputs of ``layers`` (default all) at ``positions`` are
    ``clt``'s reconstructions from the codes of the model's own inputs in this forward; sources not
    in ``keep`` (default all) are dropped. Yields the live state (``codes``, ``inputs`` per layer of
    the last forward, at the replaced positions)."""
    check(clt.n_layers == model.cfg.n_layers and clt.d_model == model.cfg.d_model,
          f"the transcoder spans {clt.n_layers} layers of width {clt.d_model}; the model has "
          f"{model.cfg.n_layers} of width {model.cfg.d_model}")
    chosen = set(layer_iterator(layers, clt.n_layers))
    kept = None if keep is None else set(layer_iterator(keep, clt.n_layers))
    where = position_index(model, positions)
    state: dict[str, Any] = {"codes": {}, "inputs": {}}

    def read(layer: int):
        def hook(x: Tensor, hook: Any) -> None:
            x = x[:, where]
            state["inputs"][layer] = x
            state["codes"][layer] = clt.encode_layer(layer, x)
        return hook

    def write(layer: int):
        def hook(out: Tensor, hook: Any) -> Tensor:
            out = out.clone()
            out[:, where] = clt.decode_layer(layer, state["codes"], state["inputs"], keep=kept)
            return out
        return hook

    hooks = []
    for layer in range(clt.n_layers):  # inputs first: an SAE reads the hook it writes
        hooks.append((clt.input_name(layer), read(layer)))
        if layer in chosen:
            hooks.append((clt.output_name(layer), write(layer)))
    with model.hooks(fwd_hooks=hooks):
        yield state


def final_projection(model: Any, terms: Float[Tensor, "n_terms batch pos d_model"],
                     resid: Float[Tensor, "batch pos d_model"]) -> Float[Tensor, "n_terms batch d_pooled"]:
    """Each residual-stream term mapped onto the pooled representation by the final norm with its
    scale frozen at ``resid``'s (linear): centre, divide by the scale, times the norm's weight, pool
    (the CLS token, the patch mean, or both side by side for ``token_avg``)."""
    cfg = model.cfg

    def pool(x: Tensor) -> Tensor:
        mean = x[..., cfg.n_prefix_tokens:, :].mean(dim=-2)
        if cfg.pooling == "token_avg":
            return torch.cat([x[..., 0, :], mean], dim=-1)
        return x[..., 0, :] if cfg.pooling == "token" else mean

    def linear_norm(x: Tensor, reference: Tensor, norm: Any) -> Tensor:
        centred = reference - reference.mean(-1, keepdim=True)
        scale = (centred.pow(2).mean(-1, keepdim=True) + norm.eps).sqrt()
        return (x - x.mean(-1, keepdim=True)) / scale * norm.weight

    if cfg.fc_norm:
        return linear_norm(pool(terms), pool(resid), model.fc_norm)
    return pool(linear_norm(terms, resid, model.ln_final))


@torch.no_grad()
def contributions(clt: Any, model: Any, images: Float[Tensor, "batch channel height width"], *,
                  batch_size: int = 64) -> dict[str, Tensor]:
    """Per image: ``scores`` ``[batch, n_layers]`` (each source layer's share of the pooled
    representation, see the module docstring), ``terms`` ``[n_layers, batch, d_model]`` (the
    source terms mapped onto the pooled representation), ``pooled`` ``[batch, d_model]``, and the
    replaced model's ``logits`` ``[batch, n_classes]``."""
    check(clt.input_hook == "ln2.hook_normalized", "contribution scores need a transcoder reading the MLP inputs "
          f"(a CLT or per-layer transcoders), not one reading {clt.input_hook} (per-layer SAEs)")
    check(model.cfg.pooling != "map", "contribution scores project terms linearly onto the pooled representation; an "
          "attention-pool head (pooling 'map', SigLIP) is not linear in them: use a model with token, avg or "
          "token_avg pooling")
    last = f"blocks.{clt.n_layers - 1}.hook_resid_post"
    names = {clt.input_name(l) for l in range(clt.n_layers)} | {last, "hook_pooled"}
    out: dict[str, list[Tensor]] = {"scores": [], "terms": [], "pooled": [], "logits": []}
    for start in range(0, images.shape[0], batch_size):
        chunk = images[start:start + batch_size]
        with replaced(clt, model):
            logits, cache = model.run_with_cache(chunk, names_filter=lambda name: name in names)
        codes = clt.encode(cache)
        terms = torch.stack([clt.source_term(i, codes[i], cache[clt.input_name(i)]) for i in range(clt.n_layers)])
        mapped = final_projection(model, terms, cache[last])
        pooled = cache["hook_pooled"]
        out["scores"].append(torch.einsum("lbd,bd->bl", mapped, pooled) / pooled.pow(2).sum(-1, keepdim=True))
        out["terms"].append(mapped)
        out["pooled"].append(pooled)
        out["logits"].append(logits)
    return {"scores": torch.cat(out["scores"]), "terms": torch.cat(out["terms"], dim=1),
            "pooled": torch.cat(out["pooled"]), "logits": torch.cat(out["logits"])}


__all__ = ["contributions", "final_projection", "position_index", "replaced"]
