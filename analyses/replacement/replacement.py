"""The residual replacement model (Kim et al., NeurIPS 2025): sae-lens SAEs on the residual stream
after every block but the last, each block output read as its SAE's reconstruction plus an error
node; per-token medians that nodes are ablated to; the replacement forward, node scores, edges
and the faithfulness curves.

A node's score is ``gradient x (activation - median)`` of the attributed logit, summed over tokens:
for a latent the gradient is the residual gradient pulled back through the decoder,
``std * grad @ W_dec.T`` (the standardisation's mean, std and the error held constant), for the
error node it is the residual gradient itself. An edge from latent ``i`` of layer ``l`` to latent
``o`` of layer ``l + 1`` is the Jacobian of ``sum_tokens s_o * z_o`` (``s_o`` the downstream node's
gradient, held constant) through block ``l + 1`` times ``(z_i - median_i)``, summed over tokens (the
reference computes the same Jacobian with ``torch.func.jacrev``; here the block's Jacobian is
assembled from its token-local parts and its attention core, :mod:`block_jacobian`, exactly and at
a fraction of a backward pass per downstream latent).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn

from analyses.replacement.block_jacobian import block_products
from analyses.replacement.graph import AttributionGraph
from analyses.replacement.saes import (
    LN_EPS,
    capture_resid,
    decode_latents,
    encode_latents,
    reconstruct,
    resid_hooks,
    standardize,
)
from hooked_vit import atomic
from hooked_vit.errors import InvalidArgumentError, MissingFileError, check
from hooked_vit.reading import read_json

MODEL_FILE = "replacement.json"
MEDIANS_FILE = "medians.safetensors"
METHODS = ("attribution", "random", "neuron")
MODES = ("insertion", "deletion")
METRICS = ("logit", "adjusted_logit", "probability", "accuracy")
IMAGE_FLOATS = 2**26  # images per pass of the edges: their Jacobian products fit in this many floats (256 MB)


def _batches(n: int, size: int) -> Iterator[slice]:
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


def _objective(logits: Float[Tensor, "batch classes"], target: Int[Tensor, "batch"], objective: str
               ) -> Float[Tensor, "batch"]:
    picked = logits.gather(1, target[:, None])[:, 0]
    return picked - logits.mean(dim=1) if objective == "logit_minus_mean" else picked


@dataclass
class ReplacementModel:
    """The SAEs (``saes[hook]``, sae-lens ``SAE``s reading raw activations), the per-token medians
    (``medians[hook]``: ``latents [pos, d_sae]``, ``error [pos, d_model]``, ``resid [pos, d_model]``)
    and ``info`` (training settings and log)."""

    saes: dict[str, Any]
    medians: dict[str, dict[str, Tensor]]
    objective: str = "logit_minus_mean"
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def hooks(self) -> list[str]:
        return list(self.saes)

    def _check_model(self, model: nn.Module) -> None:
        expected = resid_hooks(model)
        check(self.hooks == expected, f"this replacement model replaces {self.hooks}; the model's replaced layers are "
                                      f"{expected} (a model of another depth?)")
        d_in = {sae.cfg.d_in for sae in self.saes.values()}
        check(d_in == {model.cfg.d_model}, f"the SAEs read width {sorted(d_in)}, the model's d_model is "
                                           f"{model.cfg.d_model}")

    # ------------------------------------------------------------------ forward
    @contextmanager
    def replaced(self, model: nn.Module, error: bool = True, layers: Sequence[str] | None = None) -> Iterator[nn.Module]:
        """Within the block, ``model``'s forward reads every hook of ``layers`` (default all) as its
        SAE's reconstruction, plus the reconstruction error if ``error`` (then the output equals the
        model's up to rounding; the error carries no gradient, as sae-lens's error term)."""
        self._check_model(model)
        names = self.hooks if layers is None else list(layers)
        unknown = [n for n in names if n not in self.saes]
        check(not unknown, f"no SAE at {unknown}; replaced layers: {self.hooks}")

        def swap(x: Tensor, hook: Any) -> Tensor:
            rec = reconstruct(self.saes[hook.name], x)
            return rec + (x - rec).detach() if error else rec

        with model.hooks(fwd_hooks=[(name, swap) for name in names]):
            yield model

    def _clean(self, model: nn.Module, images: Tensor) -> tuple[Tensor, list[dict[str, Tensor]]]:
        """Logits and, per layer, resid ``x``, latents ``z``, ``mu``, ``std`` and the error of a clean forward."""
        seen: dict[str, Tensor] = {}

        def keep(x: Tensor, hook: Any) -> None:
            seen[hook.name] = x.detach()

        with torch.no_grad(), model.hooks(fwd_hooks=[(h, keep) for h in self.hooks]):
            logits = model(images)
        layers = []
        with torch.no_grad():
            for hook in self.hooks:
                x, sae = seen[hook], self.saes[hook]
                _, mu, std = standardize(x)
                z = encode_latents(sae, x)
                layers.append({"x": x, "z": z, "mu": mu, "std": std, "error": x - decode_latents(sae, z, mu, std)})
        return logits, layers

    # ------------------------------------------------------------------ attribution
    def _node_scores(self, model: nn.Module, images: Tensor, target: Tensor, objective: str
                     ) -> tuple[Tensor, list[dict[str, Tensor]]]:
        """Per image: the objective, and per layer the residual ``x``, its gradient ``g``, latents
        ``z``, ``std``, error, latent gradient ``s`` and the node scores (``latents [batch, d_sae]``,
        ``error [batch]``, ``resid [batch, d_model]`` for the raw-neuron graph)."""
        seen: dict[str, Tensor] = {}

        def keep(x: Tensor, hook: Any) -> Tensor:
            if not seen:  # cut below the first replaced layer: nothing there is attributed
                x = x.detach().requires_grad_(True)
            seen[hook.name] = x
            return x

        with torch.enable_grad(), model.hooks(fwd_hooks=[(h, keep) for h in self.hooks]):
            value = _objective(model(images), target, objective)
            grads = torch.autograd.grad(value.sum(), [seen[h] for h in self.hooks])
        layers = []
        with torch.no_grad():
            for hook, g in zip(self.hooks, grads):
                x, sae, med = seen[hook].detach(), self.saes[hook], self.medians[hook]
                _, mu, std = standardize(x)
                z = encode_latents(sae, x)
                error = x - decode_latents(sae, z, mu, std)
                s = (std * g) @ sae.W_dec.T
                layers.append({"x": x, "g": g, "z": z, "std": std, "error": error, "s": s,
                               "latents": (s * (z - med["latents"])).sum(1),
                               "error_score": (g * (error - med["error"])).sum((1, 2)),
                               "resid": (g * (x - med["resid"])).sum(1)})
        return value.detach(), layers

    def _edges(self, model: nn.Module, layer: int, up: dict[str, Tensor], down: dict[str, Tensor]
               ) -> Float[Tensor, "batch fi_plus_1 fo_plus_1"]:
        """Edges from layer ``layer`` to ``layer + 1`` per image (error row and column included):
        the block's Jacobian between the upstream latents' moves and the downstream latents'
        gradients, exactly, through :func:`block_products`."""
        hook = self.hooks[layer]
        sae_up, sae_down = self.saes[hook], self.saes[self.hooks[layer + 1]]
        x = up["x"]
        batch, pos, d = x.shape
        f_in, f_out = sae_up.cfg.d_sae, sae_down.cfg.d_sae
        with torch.no_grad():
            # d(sum_tokens s_o z_o) / d(block output) at each token, the standardisation's std held
            # constant: s_o * [z_o > 0] * (W_enc[:, o] - its mean) / (std + eps); per token only the
            # active latents (padded to the most any token has, zero cotangents)
            gate = down["s"] * (down["z"] > 0) / (down["std"] + LN_EPS)  # [batch pos f_out]
            n = max(int((gate != 0).sum(-1).max()), 1)
            active = (gate != 0).float().topk(n, dim=-1).indices  # [batch pos n]
            direction = sae_down.W_enc - sae_down.W_enc.mean(dim=0, keepdim=True)  # [d f_out]
            cotangents = gate.gather(-1, active)[..., None] * direction.T[active]  # [batch pos n d]
            # the upstream latents' moves (z - median) * std * W_dec row: per token only the few that
            # differ, and the error node's move (error - median) last
            coeff = up["std"] * (up["z"] - self.medians[hook]["latents"])  # [batch pos f_in]
            width = max(int((coeff != 0).sum(-1).max()), 1)
            moved = coeff.abs().topk(width, dim=-1).indices  # [batch pos width]
            moves = sae_up.W_dec[moved] * coeff.gather(-1, moved)[..., None]  # [batch pos width d]
            tangents = torch.cat([moves.permute(2, 0, 1, 3), (up["error"] - self.medians[hook]["error"])[None]])
        edges = torch.zeros(batch, f_in + 1, f_out + 1, device=x.device)
        group = max(1, IMAGE_FLOATS // (f_out * pos * (width + 1)))  # images whose products fit in IMAGE_FLOATS
        for g in _batches(batch, group):
            per_move = block_products(model.blocks[layer + 1], x[g], tangents[:, g], cotangents[g], active[g], f_out)
            with torch.no_grad():  # [images f_out pos width+1] summed over tokens into the upstream latents
                images = per_move.shape[0]
                target = (torch.arange(images, device=x.device)[:, None, None] * f_in + moved[g]).reshape(-1)
                summed = torch.zeros(f_out, images * f_in, device=x.device).index_add_(
                    1, target, per_move[..., :width].transpose(0, 1).reshape(f_out, -1))
                edges[g, :f_in, :f_out] = summed.view(f_out, images, f_in).permute(1, 2, 0)
                edges[g, f_in, :f_out] = per_move[..., width].sum(2)
        with torch.no_grad():
            node_totals = torch.cat([up["latents"], up["error_score"][:, None]], dim=1)
            edges[:, :, f_out] = node_totals - edges[:, :, :f_out].sum(2)
        return edges

    def attribute(self, model: nn.Module, images: Float[Tensor, "batch channel height width"], target: int,
                  *, objective: str | None = None) -> AttributionGraph:
        """The attribution graph of ``target`` over ``images`` (scores and edges averaged over them):
        node scores of every layer's latents and error node, and the edges between adjacent layers
        (exact, through each block's Jacobian assembled from its parts: :func:`block_products`)."""
        self._check_model(model)
        objective = objective or self.objective
        check(objective in ("logit", "logit_minus_mean"), f"objective must be logit or logit_minus_mean, got {objective!r}")
        check(images.ndim == 4 and len(images) >= 1, f"images must be a batch [batch, channel, height, width], "
                                                     f"got shape {tuple(images.shape)}")
        check(0 <= int(target) < model.cfg.n_classes, f"target must be a class in [0, {model.cfg.n_classes}), got {target}")
        model.eval()
        labels = torch.full((len(images),), int(target), dtype=torch.long, device=images.device)
        value, layers = self._node_scores(model, images, labels, objective)
        edges = [self._edges(model, l, layers[l], layers[l + 1]).mean(0) for l in range(len(self.hooks) - 1)]
        return AttributionGraph(self.hooks, int(target), objective, len(images),
                                [layer["latents"].mean(0).cpu() for layer in layers],
                                torch.stack([layer["error_score"].mean(0) for layer in layers]).cpu(),
                                [e.cpu() for e in edges], meta={"objective_value": float(value.mean())})

    # ------------------------------------------------------------------ faithfulness
    def _masked_logits(self, model: nn.Module, images: Tensor, clean: list[dict[str, Tensor]],
                       keep: list[Tensor], method: str) -> Tensor:
        """Logits with the nodes outside ``keep`` (``[batch, nodes]`` per layer) at their median: latents
        and error nodes (``keep[:, -1]``) of the replacement model, or residual dimensions."""

        def swap(x: Tensor, hook: Any) -> Tensor:
            layer = self.hooks.index(hook.name)
            med, mask = self.medians[hook.name], keep[layer]
            if method == "neuron":
                return torch.where(mask[:, None, :], x, med["resid"])
            sae = self.saes[hook.name]
            _, mu, std = standardize(x)
            z = torch.where(mask[:, None, :-1], encode_latents(sae, x), med["latents"])
            error = torch.where(mask[:, None, -1:], clean[layer]["error"], med["error"])
            return decode_latents(sae, z, mu, std) + error

        with torch.no_grad(), model.hooks(fwd_hooks=[(h, swap) for h in self.hooks]):
            return model(images)

    def faithfulness(self, model: nn.Module, val: Any, fractions: Sequence[float | int] = (0, .001, .01, .05, .1, .2, .5, 1),
                     *, n_images: int | None = 100, seed: int = 0, batch_size: int = 64,
                     objective: str | None = None) -> FaithfulnessTable:
        """Insertion (keep the top fraction of nodes per layer, the rest at their median) and deletion
        (the top fraction at their median) curves of ``n_images`` correctly classified images of
        ``val`` (``LabelledImages`` or ``(images, labels)``), for nodes ranked by attribution, random
        nodes, and the raw-neuron graph (residual dimensions ranked by ``grad x (x - median)``). Per
        layer ``int(fraction x max nodes)`` nodes are kept (the reference's top-n, max over layers of
        ``d_sae + 1``; ``d_model`` for neurons). Curves hold the mean logit, adjusted logit, probability
        and accuracy of the image's class."""
        self._check_model(model)
        fractions = [float(f) for f in fractions]
        check(fractions and all(0 <= f <= 1 for f in fractions), f"fractions must lie in [0, 1], got {fractions}")
        images, labels = val.tensors(show_progress=False) if hasattr(val, "tensors") else val
        device = next(model.parameters()).device
        model.eval()
        with torch.no_grad():
            preds = torch.cat([model(images[s].to(device)).argmax(1).cpu() for s in _batches(len(images), batch_size)])
        correct = torch.nonzero(preds == labels)[:, 0]
        check(len(correct) > 0, "no image of val is classified correctly: faithfulness needs correctly classified images")
        generator = torch.Generator().manual_seed(seed)
        chosen = correct[torch.randperm(len(correct), generator=generator)[:n_images or len(correct)]]
        objective = objective or self.objective
        max_nodes = max(s.cfg.d_sae for s in self.saes.values()) + 1
        sums: dict[tuple[str, str, float], Tensor] = {}
        for part in _batches(len(chosen), batch_size):
            x, y = images[chosen[part]].to(device), labels[chosen[part]].to(device)
            _, layers = self._node_scores(model, x, y, objective)
            _, clean = self._clean(model, x)
            for method in METHODS:
                if method == "neuron":
                    scores = [layer["resid"] for layer in layers]
                    total = model.cfg.d_model
                else:
                    scores = [torch.cat([layer["latents"], layer["error_score"][:, None]], 1) for layer in layers]
                    total = max_nodes
                if method == "random":
                    scores = [torch.rand(s.shape, generator=generator).to(device) for s in scores]
                order = [torch.argsort(s, dim=1, descending=True) for s in scores]
                for fraction in fractions:
                    count = int(fraction * total)
                    top = [torch.zeros_like(s, dtype=torch.bool).scatter(1, o[:, :count], True)
                           for s, o in zip(scores, order)]
                    for mode in MODES:
                        keep = top if mode == "insertion" else [~t for t in top]
                        logits = self._masked_logits(model, x, clean, keep, method)
                        row = torch.stack([logits.gather(1, y[:, None])[:, 0], _objective(logits, y, "logit_minus_mean"),
                                           logits.softmax(1).gather(1, y[:, None])[:, 0],
                                           (logits.argmax(1) == y).float()], 1).sum(0).cpu()
                        key = (method, mode, fraction)
                        sums[key] = sums.get(key, 0) + row
        rows = [{"method": m, "mode": mode, "fraction": f, **{name: float(v / len(chosen))
                                                               for name, v in zip(METRICS, sums[(m, mode, f)])}}
                for m in METHODS for mode in MODES for f in fractions]
        return FaithfulnessTable(rows, len(chosen), objective)

    # ------------------------------------------------------------------ files
    def save(self, path: str | os.PathLike) -> Path:
        """Every SAE in sae-lens's format (``<path>/<hook>/``), the medians and ``replacement.json``."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        for hook, sae in self.saes.items():
            with atomic.files_into(path / hook) as tmp:
                sae.save_model(tmp)
        atomic.save_safetensors({f"{h}.{name}": t.contiguous().cpu() for h, med in self.medians.items()
                                 for name, t in med.items()}, path / MEDIANS_FILE)
        atomic.write_json(path / MODEL_FILE, {"hooks": self.hooks, "objective": self.objective, "info": self.info})
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, model: nn.Module) -> ReplacementModel:
        """The replacement model saved at ``path`` by :meth:`save`, for ``model`` (its device)."""
        from sae_lens import SAE
        from safetensors.torch import load_file

        path = Path(path)
        if not (path / MODEL_FILE).is_file():
            raise MissingFileError(f"{path} holds no saved replacement model ({MODEL_FILE} is missing)")
        saved = read_json(path / MODEL_FILE, "a replacement model's description (JSON)",
                          "delete the folder and train the replacement model again")
        device = str(next(model.parameters()).device)
        saes = {hook: SAE.load_from_disk(str(path / hook), device=device).eval() for hook in saved["hooks"]}
        flat = load_file(str(path / MEDIANS_FILE), device=device)
        medians: dict[str, dict[str, Tensor]] = {h: {} for h in saved["hooks"]}
        for key, tensor in flat.items():
            hook, name = key.rsplit(".", 1)
            medians[hook][name] = tensor
        out = cls(saes, medians, saved.get("objective", "logit_minus_mean"), saved.get("info", {}))
        out._check_model(model)
        return out


@dataclass
class FaithfulnessTable:
    """Mean faithfulness curves (``rows``: method, mode, fraction and the metrics) over ``n_images``."""

    rows: list[dict[str, Any]]
    n_images: int
    objective: str

    def curve(self, method: str, mode: str, metric: str) -> tuple[list[float], list[float]]:
        points = [(r["fraction"], r[metric]) for r in self.rows if r["method"] == method and r["mode"] == mode]
        if not points:
            raise InvalidArgumentError(f"no {method} {mode} curve; methods {METHODS}, modes {MODES}")
        return [p[0] for p in points], [p[1] for p in points]

    def aucs(self) -> list[dict[str, Any]]:
        """Area under each curve, the fraction grid's points equally spaced on [0, 1] (trapezoids)."""
        out = []
        for method in METHODS:
            for mode in MODES:
                row: dict[str, Any] = {"method": method, "mode": mode}
                for metric in METRICS:
                    _, values = self.curve(method, mode, metric)
                    v = torch.tensor(values)
                    row[metric] = float(torch.trapezoid(v, dx=1 / max(len(v) - 1, 1))) if len(v) > 1 else float(v[0])
                out.append(row)
        return out


def compute_medians(model: nn.Module, saes: dict[str, Any], images: Float[Tensor, "n channel height width"],
                    batch_size: int = 64) -> dict[str, dict[str, Tensor]]:
    """Per-token medians over ``images`` of each SAE's latents, reconstruction error and the residual."""
    device = next(model.parameters()).device
    hooks = list(saes)
    parts: dict[str, dict[str, list[Tensor]]] = {h: {"latents": [], "error": [], "resid": []} for h in hooks}
    with torch.no_grad():
        for s in _batches(len(images), batch_size):
            for hook, x in zip(hooks, capture_resid(model, images[s].to(device), hooks)):
                sae = saes[hook]
                _, mu, std = standardize(x)
                z = encode_latents(sae, x)
                parts[hook]["latents"].append(z)
                parts[hook]["error"].append(x - decode_latents(sae, z, mu, std))
                parts[hook]["resid"].append(x)
    return {h: {name: torch.cat(v).median(dim=0).values for name, v in d.items()} for h, d in parts.items()}


def layer_metrics(model: nn.Module, rm: ReplacementModel, images: Float[Tensor, "n channel height width"],
                  labels: Int[Tensor, "n"], batch_size: int = 64) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Per SAE: FVE of the CLS token, the patches and all tokens (raw space), L0 and the fraction of
    latents never active on ``images``; per replacement (none, every layer, each single layer, all
    without error nodes): accuracy and the mean KL divergence from the model's predictions."""
    device = next(model.parameters()).device
    n_prefix = model.cfg.n_prefix_tokens
    stats = {h: {"cls": torch.zeros(3, dtype=torch.float64), "patch": torch.zeros(3, dtype=torch.float64),
                 "l0": 0.0, "tokens": 0, "fired": torch.zeros(s.cfg.d_sae, dtype=torch.bool, device=device)}
             for h, s in rm.saes.items()}
    settings = [("model", None), ("all layers", rm.hooks)] + [(h, [h]) for h in rm.hooks]
    correct = {name: 0 for name, _ in settings}
    kl = {name: 0.0 for name, _ in settings}
    sum_x = {h: {"cls": 0, "patch": 0} for h in rm.hooks}
    with torch.no_grad():
        for s in _batches(len(images), batch_size):
            x_img, y = images[s].to(device), labels[s].to(device)
            logits, clean = rm._clean(model, x_img)
            base = logits.log_softmax(1)
            for name, layers in settings:
                if layers is None:
                    out = logits
                else:
                    with rm.replaced(model, error=False, layers=layers):
                        out = model(x_img)
                correct[name] += int((out.argmax(1) == y).sum())
                kl[name] += float((base.exp() * (base - out.log_softmax(1))).sum())
            for hook, layer in zip(rm.hooks, clean):
                for part, tokens in (("cls", slice(0, 1)), ("patch", slice(n_prefix, None))):
                    x = layer["x"][:, tokens].reshape(-1, layer["x"].shape[-1]).double()
                    e = layer["error"][:, tokens].reshape(-1, x.shape[-1]).double()
                    stats[hook][part] += torch.tensor([float(e.pow(2).sum()), float(x.pow(2).sum()), len(x)],
                                                      dtype=torch.float64)
                    sum_x[hook][part] = sum_x[hook][part] + x.sum(0)
                active = layer["z"] > 0
                stats[hook]["l0"] += float(active.sum())
                stats[hook]["tokens"] += active.shape[0] * active.shape[1]
                stats[hook]["fired"] |= active.any(1).any(0)
    rows = []
    for layer, hook in enumerate(rm.hooks):
        row: dict[str, Any] = {"layer": layer, "hook": hook, "d_sae": rm.saes[hook].cfg.d_sae,
                               "k": int(getattr(rm.saes[hook].cfg, "k", 0) or 0)}
        err_all, tot_all = 0.0, 0.0
        for part in ("cls", "patch"):
            err, sq, n = stats[hook][part].tolist()
            total = sq - float(sum_x[hook][part].pow(2).sum()) / n
            row[f"fve_{part}"] = 1 - err / total
            err_all, tot_all = err_all + err, tot_all + total
        row["fve"] = 1 - err_all / tot_all
        row["l0"] = stats[hook]["l0"] / stats[hook]["tokens"]
        row["dead_fraction"] = 1 - float(stats[hook]["fired"].float().mean())
        rows.append(row)
    replacement = [{"replaced": name, "accuracy": correct[name] / len(images), "kl": kl[name] / len(images)}
                   for name, _ in settings]
    return rows, replacement


__all__ = ["METHODS", "METRICS", "MODES", "FaithfulnessTable", "ReplacementModel", "compute_medians", "layer_metrics"]
