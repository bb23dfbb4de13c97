"""What the level measures of a trained transcoder on held-out images.

* :func:`layer_quality`: per layer, over every token, the cosine similarity of the reconstructed
  and true MLP outputs (mean over tokens), the FVU ``sum |y - y_hat|^2 / sum |y - mean(y)|^2`` and
  R2 = 1 - FVU, the L0 (mean active latents of the layer's encoder per token) and the dead fraction
  (latents of the layer that never fire on these tokens).
* :func:`replacement_rows`: top-1 accuracy and the KL divergence ``KL(p_model || p_replaced)`` (mean
  over images) with the MLP outputs replaced: all tokens at all layers, the CLS token at all layers,
  and the patch tokens from each layer on.
* :func:`contribution_curves`: the contribution scores per image, their mean per class, and the
  accuracy when the top-scored layers' terms are dropped (removal) or only they are kept (keep-top-k).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor

from analyses.transcoders.clt import CrossLayerTranscoder
from analyses.transcoders.replacement import contributions
from analyses.transcoders.training import layer_batches


@torch.no_grad()
def layer_quality(model: Any, clt: CrossLayerTranscoder, images: Float[Tensor, "n channel height width"],
                  batch_size: int = 64) -> list[dict[str, Any]]:
    """One row per layer: ``cosine``, ``fvu``, ``r2``, ``mse``, ``l0``, ``dead_fraction`` (see the module docstring)."""
    n_layers = clt.n_layers
    sums = {name: torch.zeros(n_layers, dtype=torch.float64) for name in ("error", "y", "y2", "cosine", "l0")}
    sum_y = torch.zeros(n_layers, clt.d_model, dtype=torch.float64)
    fired = torch.zeros(n_layers, clt.d_latent, dtype=torch.bool)
    n_tokens = 0
    for start in range(0, images.shape[0], batch_size):
        x, y = layer_batches(model, images[start:start + batch_size], clt.input_hook)
        codes = {l: clt.encode_layer(l, x[:, l]) for l in range(n_layers)}
        inputs = {l: x[:, l] for l in range(n_layers)}
        pred = torch.stack([clt.decode_layer(l, codes, inputs) for l in range(n_layers)], dim=1)
        sums["error"] += (y - pred).pow(2).sum(dim=(0, 2)).double().cpu()
        sums["y2"] += y.pow(2).sum(dim=(0, 2)).double().cpu()
        sum_y += y.sum(0).double().cpu()
        sums["cosine"] += F.cosine_similarity(pred, y, dim=-1).sum(0).double().cpu()
        active = torch.stack([codes[l] != 0 for l in range(n_layers)], dim=1)
        sums["l0"] += active.sum(dim=(0, 2)).double().cpu()
        fired |= active.any(0).cpu()
        n_tokens += x.shape[0]
    variance = sums["y2"] - sum_y.pow(2).sum(-1) / n_tokens
    rows = []
    for l in range(n_layers):
        fvu = float(sums["error"][l] / variance[l])
        rows.append({"layer": l, "cosine": float(sums["cosine"][l] / n_tokens), "fvu": fvu, "r2": 1.0 - fvu,
                     "mse": float(sums["error"][l] / (n_tokens * clt.d_model)), "l0": float(sums["l0"][l] / n_tokens),
                     "dead_fraction": float(1.0 - fired[l].float().mean()), "n_tokens": n_tokens})
    return rows


def replacement_settings(n_layers: int) -> list[tuple[str, list[int], str]]:
    """The replacements measured: (name, layers, positions): all tokens at all layers, CLS at all
    layers, then the patch tokens from each layer on."""
    settings = [("all tokens, all layers", list(range(n_layers)), "all"),
                ("CLS, all layers", list(range(n_layers)), "cls")]
    settings += [(f"patches, layers {s}-{n_layers - 1}", list(range(s, n_layers)), "patches") for s in range(n_layers)]
    return settings


def _kl(reference: Tensor, logits: Tensor) -> Tensor:
    """``KL(softmax(reference) || softmax(logits))`` per image."""
    return (reference.softmax(-1) * (reference.log_softmax(-1) - logits.log_softmax(-1))).sum(-1)


@torch.no_grad()
def _logits(model: Any, images: Tensor, batch_size: int, context: Any = None, hooks: list | None = None) -> Tensor:
    import contextlib

    out = []
    for start in range(0, images.shape[0], batch_size):
        with (context() if context is not None else contextlib.nullcontext()):
            out.append(model.run_with_hooks(images[start:start + batch_size], fwd_hooks=hooks or []))
    return torch.cat(out)


def replacement_rows(model: Any, clt: CrossLayerTranscoder, images: Float[Tensor, "n channel height width"],
                     labels: Int[Tensor, "n"], batch_size: int = 64) -> list[dict[str, Any]]:
    """Accuracy and KL of the model with its MLP outputs replaced, one row per
    :func:`replacement_settings` entry, after the model's own row."""
    reference = _logits(model, images, batch_size)
    base = float((reference.argmax(-1) == labels).float().mean())
    rows = [{"setting": "model", "layers": "", "positions": "", "accuracy": base, "delta": 0.0, "kl": 0.0}]
    for name, layers, positions in replacement_settings(clt.n_layers):
        logits = _logits(model, images, batch_size, lambda: clt.replaced(model, layers, positions))
        accuracy = float((logits.argmax(-1) == labels).float().mean())
        rows.append({"setting": name, "layers": ",".join(map(str, layers)), "positions": positions,
                     "accuracy": accuracy, "delta": accuracy - base, "kl": float(_kl(reference, logits).mean())})
    return rows


@torch.no_grad()
def _dropped_accuracy(model: Any, clt: CrossLayerTranscoder, images: Tensor, labels: Tensor, dropped: list[int],
                      ablation: str, batch_size: int) -> float:
    """Accuracy of the replaced model (all layers, all tokens) without the terms of ``dropped``:
    subtracted from the last residual stream (``final``) or their codes dropped in the forward (``forward``)."""
    keep = [l for l in range(clt.n_layers) if l not in dropped]
    if ablation == "forward" or not dropped:
        logits = _logits(model, images, batch_size, lambda: clt.replaced(model, keep=keep))
        return float((logits.argmax(-1) == labels).float().mean())
    last = f"blocks.{clt.n_layers - 1}.hook_resid_post"
    correct = 0
    for start in range(0, images.shape[0], batch_size):
        chunk = images[start:start + batch_size]
        with clt.replaced(model) as state:
            def subtract(resid: Tensor, hook: Any) -> Tensor:
                return resid - sum(clt.source_term(i, state["codes"][i], state["inputs"][i]) for i in dropped)

            logits = model.run_with_hooks(chunk, fwd_hooks=[(last, subtract)])
        correct += int((logits.argmax(-1) == labels[start:start + batch_size]).sum())
    return correct / images.shape[0]


def contribution_curves(model: Any, clt: CrossLayerTranscoder, images: Float[Tensor, "n channel height width"],
                        labels: Int[Tensor, "n"], ablation: str = "final", batch_size: int = 64) -> dict[str, Any]:
    """``scores`` (per image, ``[n][n_layers]``), ``per_class`` rows (mean score of each layer per
    class), ``ranking`` (layers by mean score, highest first) and the ``curves`` rows: for ``k``
    = 0..n_layers, the accuracy with the top-``k`` layers' terms dropped (``removal``) and with
    only them kept (``keep``)."""
    found = contributions(clt, model, images, batch_size=batch_size)
    scores = found["scores"]
    mean = scores.mean(0)
    ranking = [int(i) for i in mean.argsort(descending=True)]
    per_class = []
    for c in sorted(set(labels.tolist())):
        row = {"class": c, "n": int((labels == c).sum())}
        row.update({f"layer_{l}": float(scores[labels == c, l].mean()) for l in range(clt.n_layers)})
        per_class.append(row)
    curves = []
    for k in range(clt.n_layers + 1):
        top = ranking[:k]
        curves.append({"k": k, "layers": ",".join(map(str, top)),
                       "removal": _dropped_accuracy(model, clt, images, labels, top, ablation, batch_size),
                       "keep": _dropped_accuracy(model, clt, images, labels, ranking[k:], ablation, batch_size)})
    replaced_accuracy = float((found["logits"].argmax(-1) == labels).float().mean())
    return {"scores": scores.tolist(), "mean": mean.tolist(), "ranking": ranking, "per_class": per_class,
            "curves": curves, "replaced_accuracy": replaced_accuracy}


__all__ = ["contribution_curves", "layer_quality", "replacement_rows", "replacement_settings"]
