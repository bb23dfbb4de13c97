"""The cross-layer transcoder (CLT): one encoder per block reading ``blocks.l.ln2.hook_normalized``
into ``d_latent`` sparse codes, and decoders from every block ``i <= l`` to block ``l``'s MLP output
``blocks.l.hook_mlp_out`` (after LayerScale)::

    z_i = sparsify(W_enc[i] x_i + b_enc[i])                       [batch, pos, d_latent]
    y_l = sum_{i <= l} W_dec[i -> l] z_i + b_dec[l] (+ W_skip[l] x_l)   [batch, pos, d_model]

Nothing decodes backwards in depth. The weights are held in circuit-tracer's CLT layout:
``W_enc`` ``[n_layers, d_latent, d_model]``, ``b_enc`` ``[n_layers, d_latent]``, ``threshold``
``[n_layers, d_latent]`` (JumpReLU), ``W_dec[i]`` ``[d_latent, n_layers - i, d_model]`` (source ``i``
to targets ``i..n_layers-1``), ``b_dec`` ``[n_layers, d_model]``, ``W_skip`` ``[n_layers, d_model, d_model]``
(``x @ W_skip[l]``). Decoding is one matmul per target layer (the codes of its sources concatenated).

With ``cross_layer=False`` the same class is a set of per-layer transcoders (only ``W_dec[i -> i]``);
with ``input_hook="hook_mlp_out"`` too, per-layer SAEs on the MLP outputs: the baselines on equal
total latents, trained by the same loop. Their layer ``l`` is a sae-lens dictionary (``plt[l]``,
:mod:`analyses.transcoders.per_layer`) and they save in sae-lens's format, one folder per layer.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn

from analyses.transcoders.config import ACTIVATIONS
from hooked_vit.errors import InvalidArgumentError, check

INPUT_HOOKS: tuple[str, ...] = ("ln2.hook_normalized", "hook_mlp_out")
OUTPUT_HOOK = "hook_mlp_out"
POSITIONS: tuple[str, ...] = ("all", "cls", "patches")
CONFIG_FILE = "config.json"


class JumpReLUFunction(torch.autograd.Function):
    """``x * H(x - threshold)`` with the straight-through threshold gradient of Rajamanoharan et al.
    (2024): ``d/d threshold = -(threshold / bandwidth) * rect((x - threshold) / bandwidth)``."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(x, threshold)
        ctx.bandwidth = bandwidth
        return x * (x > threshold)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, Tensor, None]:
        x, threshold = ctx.saved_tensors
        window = ((x - threshold).abs() < ctx.bandwidth / 2).to(x.dtype)
        grad_threshold = -(threshold / ctx.bandwidth) * window * grad
        grad_threshold = grad_threshold.reshape(-1, threshold.shape[-1]).sum(0).reshape(threshold.shape)
        return grad * (x > threshold), grad_threshold, None


class HeavisideFunction(torch.autograd.Function):
    """``H(x - threshold)`` (the L0 count) with the straight-through threshold gradient
    ``-(1 / bandwidth) * rect((x - threshold) / bandwidth)`` (no gradient to ``x``)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(x, threshold)
        ctx.bandwidth = bandwidth
        return (x > threshold).to(x.dtype)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[None, Tensor, None]:
        x, threshold = ctx.saved_tensors
        window = ((x - threshold).abs() < ctx.bandwidth / 2).to(x.dtype)
        grad_threshold = (-(1.0 / ctx.bandwidth) * window * grad).reshape(-1, threshold.shape[-1]).sum(0)
        return None, grad_threshold.reshape(threshold.shape), None


def topk_indices(scores: Float[Tensor, "*batch d_latent"], k: int) -> Int[Tensor, "*batch k"]:
    """The indices of the ``k`` largest ``scores`` along the last axis (in no particular order).
    Two-stage when the width splits into at least ``k`` chunks: every top-``k`` element lies in one
    of the ``k`` chunks with the largest maxima, so ``topk`` runs over ``k`` chunk maxima and then
    over those chunks' elements (CPU ``topk`` over the full width is the training step's slowest part)."""
    width = scores.shape[-1]
    size = next((s for s in (16, 8, 4) if width % s == 0 and width // s >= k), None)
    if size is None:
        return scores.topk(k, dim=-1, sorted=False).indices
    chunks = scores.reshape(*scores.shape[:-1], width // size, size)
    best = chunks.amax(dim=-1).topk(k, dim=-1, sorted=False).indices  # [*batch, k] chunks
    candidates = (best.unsqueeze(-1) * size + torch.arange(size, device=scores.device)).flatten(-2)
    chosen = scores.gather(-1, candidates).topk(k, dim=-1, sorted=False).indices
    return candidates.gather(-1, chosen)


def topk_pairs(pre: Float[Tensor, "*batch d_latent"], k: int, *, signed: bool
               ) -> tuple[Float[Tensor, "*batch k"], Int[Tensor, "*batch k"]]:
    """ReLU-TopK (``signed=False``: the ``k`` largest pre-activations, ReLU'd) or AbsTopK
    (``signed=True``: the ``k`` largest in magnitude, sign kept), as values and latent indices."""
    indices = topk_indices(pre.abs() if signed else pre, k)
    values = pre.gather(-1, indices)
    return (values if signed else values.relu()), indices


def topk_codes(pre: Float[Tensor, "*batch d_latent"], k: int, *, signed: bool) -> Float[Tensor, "*batch d_latent"]:
    """:func:`topk_pairs` as dense codes (the other latents 0)."""
    values, indices = topk_pairs(pre, k, signed=signed)
    return torch.zeros_like(pre).scatter(-1, indices, values)


class CrossLayerTranscoder(nn.Module):
    """A CLT over ``n_layers`` blocks of width ``d_model`` (see the module docstring), with
    ``d_latent`` latents per layer and sparsifier ``activation`` (``topk``/``abstopk`` with ``k``,
    ``jumprelu`` with ``threshold_init``/``bandwidth``)."""

    def __init__(self, n_layers: int, d_model: int, d_latent: int, *, activation: str = "topk", k: int = 16,
                 skip: bool = False, cross_layer: bool = True, input_hook: str = "ln2.hook_normalized",
                 threshold_init: float = 0.1, bandwidth: float = 0.1, seed: int = 0):
        super().__init__()
        check(activation in ACTIVATIONS, f"activation must be one of {', '.join(ACTIVATIONS)}, got {activation!r}")
        check(input_hook in INPUT_HOOKS, f"input_hook must be one of {', '.join(INPUT_HOOKS)}, got {input_hook!r}")
        for name, value in (("n_layers", n_layers), ("d_model", d_model), ("d_latent", d_latent), ("k", k)):
            check(isinstance(value, int) and not isinstance(value, bool) and value >= 1,
                  f"{name} must be a whole number >= 1, got {value!r}")
        check(activation == "jumprelu" or k <= d_latent, f"k={k} exceeds d_latent={d_latent}")
        self.n_layers, self.d_model, self.d_latent = n_layers, d_model, d_latent
        self.activation, self.k, self.skip, self.cross_layer = activation, k, skip, cross_layer
        self.input_hook, self.bandwidth = input_hook, float(bandwidth)
        generator = torch.Generator().manual_seed(seed)

        def uniform(*shape: int, bound: float) -> nn.Parameter:
            return nn.Parameter((torch.rand(*shape, generator=generator) * 2 - 1) * bound)

        self.W_enc = uniform(n_layers, d_latent, d_model, bound=d_model ** -0.5)
        self.b_enc = nn.Parameter(torch.zeros(n_layers, d_latent))
        n_sources = n_layers if cross_layer else 1
        bound = (n_sources * d_latent) ** -0.5
        self.W_dec = nn.ParameterList(uniform(d_latent, self.n_targets(i), d_model, bound=bound) for i in range(n_layers))
        self.b_dec = nn.Parameter(torch.zeros(n_layers, d_model))
        self.log_threshold = nn.Parameter(torch.full((n_layers, d_latent), float(threshold_init)).log(),
                                          requires_grad=activation == "jumprelu")
        self.W_skip = nn.Parameter(torch.zeros(n_layers, d_model, d_model)) if skip else None

    # ------------------------------------------------------------------ layout
    def n_targets(self, source: int) -> int:
        """How many layers source ``source`` decodes to (``n_layers - source``; 1 per-layer)."""
        return self.n_layers - source if self.cross_layer else 1

    def sources(self, target: int) -> list[int]:
        """The source layers decoding into ``target`` (``0..target``; ``[target]`` per-layer)."""
        return list(range(target + 1)) if self.cross_layer else [target]

    def decoder(self, source: int, target: int) -> Float[Tensor, "d_latent d_model"]:
        """``W_dec[source -> target]``."""
        check(source in self.sources(target), f"no decoder from layer {source} to layer {target}")
        return self.W_dec[source][:, target - source if self.cross_layer else 0]

    @property
    def threshold(self) -> Float[Tensor, "n_layers d_latent"]:
        return self.log_threshold.exp()

    def input_name(self, layer: int) -> str:
        return f"blocks.{layer}.{self.input_hook}"

    def output_name(self, layer: int) -> str:
        return f"blocks.{layer}.{OUTPUT_HOOK}"

    def config(self) -> dict[str, Any]:
        """The constructor's arguments (and the hooks read and written), as saved in ``config.json``."""
        return {"n_layers": self.n_layers, "d_model": self.d_model, "d_latent": self.d_latent,
                "activation": self.activation, "k": self.k, "skip": self.skip, "cross_layer": self.cross_layer,
                "input_hook": self.input_hook, "bandwidth": self.bandwidth,
                "feature_input_hook": self.input_hook, "feature_output_hook": OUTPUT_HOOK}

    def n_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def describe(self) -> str:
        """Parameter count and training memory (fp32 weights, gradients and Adam's two moments)."""
        n = self.n_parameters()
        decoders = sum(w.numel() for w in self.W_dec)
        return (f"{n:,} parameters ({decoders:,} in {sum(self.n_targets(i) for i in range(self.n_layers))} "
                f"decoders), {n * 4 / 2**20:.1f} MiB of weights, {n * 16 / 2**20:.1f} MiB with gradients and Adam")

    # ------------------------------------------------------------------ encode
    def preactivations(self, layer: int, x: Float[Tensor, "*batch d_model"]) -> Float[Tensor, "*batch d_latent"]:
        return x @ self.W_enc[layer].T + self.b_enc[layer]

    def sparsify(self, layer: int, pre: Float[Tensor, "*batch d_latent"]) -> Float[Tensor, "*batch d_latent"]:
        """The codes of layer ``layer`` from its pre-activations."""
        if self.activation == "jumprelu":
            return JumpReLUFunction.apply(pre, self.threshold[layer], self.bandwidth)
        return topk_codes(pre, self.k, signed=self.activation == "abstopk")

    def encode_layer(self, layer: int, x: Float[Tensor, "*batch d_model"]) -> Float[Tensor, "*batch d_latent"]:
        """Layer ``layer``'s codes from its input ``x`` (``blocks.layer.<input_hook>``)."""
        return self.sparsify(layer, self.preactivations(layer, x))

    def encode(self, cache: Any) -> dict[int, Float[Tensor, "*batch d_latent"]]:
        """``{layer: codes [batch, pos, d_latent]}`` from an ActivationCache (or a dict) holding every
        layer's input hook."""
        missing = [self.input_name(l) for l in range(self.n_layers) if self.input_name(l) not in cache]
        check(not missing, f"the cache lacks {', '.join(missing)}: run the model with a names_filter keeping "
                           f"'{self.input_hook}'")
        return {l: self.encode_layer(l, cache[self.input_name(l)]) for l in range(self.n_layers)}

    # ------------------------------------------------------------------ decode
    def decode_layer(self, target: int, codes: Mapping[int, Tensor], inputs: Mapping[int, Tensor] | None = None,
                     *, keep: Iterable[int] | None = None) -> Float[Tensor, "*batch d_model"]:
        """Layer ``target``'s MLP output from the codes of its sources (one matmul); sources not in
        ``keep`` (default all) contribute nothing. ``inputs[target]`` feeds the skip connection."""
        sources = [i for i in self.sources(target) if keep is None or i in set(keep)]
        first = codes[self.sources(target)[0]]
        out = self.b_dec[target].expand(*first.shape[:-1], self.d_model)
        if sources:
            z = torch.cat([codes[i] for i in sources], dim=-1)
            w = torch.cat([self.decoder(i, target) for i in sources], dim=0)
            out = out + z @ w
        if self.W_skip is not None and (keep is None or target in set(keep)):
            check(inputs is not None and target in inputs, "this transcoder has a skip connection: pass the inputs")
            out = out + inputs[target] @ self.W_skip[target]
        return out

    def decode(self, codes: Mapping[int, Tensor], inputs: Mapping[int, Tensor] | None = None
               ) -> dict[int, Float[Tensor, "*batch d_model"]]:
        """``{layer: reconstructed blocks.layer.hook_mlp_out [batch, pos, d_model]}`` from every layer's codes."""
        missing = [l for l in range(self.n_layers) if l not in codes]
        check(not missing, f"decode needs the codes of every layer 0..{self.n_layers - 1}; missing {missing}")
        return {l: self.decode_layer(l, codes, inputs) for l in range(self.n_layers)}

    def decode_sparse(self, values: Float[Tensor, "tokens n_layers k"], indices: Int[Tensor, "tokens n_layers k"],
                      inputs: Float[Tensor, "tokens n_layers d_model"] | None = None, *, affine: bool = True
                      ) -> Float[Tensor, "tokens n_layers d_model"]:
        """Every layer's MLP output from ``k`` active latents per token and layer (TopK codes given as
        values and latent indices): one ``embedding_bag`` per source layer gathers its decoder rows for
        every target at once, ``k / d_latent`` of the dense decode's work. ``affine=False``: the
        latents' terms alone (no decoder bias, no skip)."""
        n_tokens = values.shape[0]
        parts = [torch.nn.functional.embedding_bag(indices[:, i], self.W_dec[i].reshape(self.d_latent, -1),
                                                   per_sample_weights=values[:, i], mode="sum")
                 .reshape(n_tokens, self.n_targets(i), self.d_model) for i in range(self.n_layers)]
        targets = []
        for l in range(self.n_layers):
            targets.append(sum(parts[i][:, l - i if self.cross_layer else 0] for i in self.sources(l)))
        out = torch.stack(targets, dim=1)
        if not affine:
            return out
        out = out + self.b_dec
        if self.W_skip is not None:
            check(inputs is not None, "this transcoder has a skip connection: pass the inputs")
            out = out + torch.einsum("nld,lde->nle", inputs, self.W_skip)
        return out

    @torch.no_grad()
    def fold_scales(self, input_scale: Float[Tensor, "n_layers"], output_scale: Float[Tensor, "n_layers"]) -> None:
        """Fold the per-layer scalars a transcoder was trained with (inputs divided by
        ``input_scale``, targets by ``output_scale``) into its weights, so it reads and writes the
        model's own activations."""
        self.W_enc.div_(input_scale[:, None, None])
        for i in range(self.n_layers):
            targets = list(range(i, self.n_layers)) if self.cross_layer else [i]
            self.W_dec[i].mul_(output_scale[targets][None, :, None])
        self.b_dec.mul_(output_scale[:, None])
        if self.W_skip is not None:
            self.W_skip.mul_((output_scale / input_scale)[:, None, None])

    def source_term(self, source: int, z: Float[Tensor, "*batch d_latent"],
                    x: Float[Tensor, "*batch d_model"] | None = None) -> Float[Tensor, "*batch d_model"]:
        """What layer ``source``'s codes add to the residual stream: its decoded terms summed over
        the layers it writes to (``z @ sum_l W_dec[source -> l]``, plus its skip term)."""
        term = z @ self.W_dec[source].sum(dim=1)
        if self.W_skip is not None:
            check(x is not None, "this transcoder has a skip connection: pass the layer's input")
            term = term + x @ self.W_skip[source]
        return term

    # ------------------------------------------------------------------ the model with the CLT in it
    def replaced(self, model: Any, layers: Iterable[int] | None = None, positions: str = "all", *,
                 keep: Iterable[int] | None = None) -> contextlib.AbstractContextManager:
        """Context in which ``model``'s MLP outputs of ``layers`` (default all) at ``positions``
        (``all``, ``cls``: position 0, ``patches``: after the prefix tokens) are the CLT's, layer
        after layer: each layer's codes are encoded from the replaced model's own inputs. Codes of
        source layers not in ``keep`` (default all) are dropped."""
        from analyses.transcoders.replacement import replaced

        return replaced(self, model, layers, positions, keep=keep)

    def contributions(self, model: Any, images: Float[Tensor, "batch channel height width"], *,
                      batch_size: int = 64) -> Float[Tensor, "batch n_layers"]:
        """Each source layer's share of the final representation (see
        :func:`analyses.transcoders.replacement.contributions`)."""
        from analyses.transcoders.replacement import contributions

        return contributions(self, model, images, batch_size=batch_size)["scores"]

    def __getitem__(self, layer: int) -> Any:
        """Layer ``layer`` of per-layer transcoders / SAEs as a sae-lens object (``sae_lens.Transcoder``
        family / ``sae_lens.SAE``; a copy of the weights; see :mod:`analyses.transcoders.per_layer`)."""
        from analyses.transcoders.per_layer import to_sae_lens

        return to_sae_lens(self, layer)

    # ------------------------------------------------------------------ files
    def save(self, directory: str | os.PathLike) -> Path:
        """Write the transcoder into ``directory`` (whole or not at all), with ``config.json``. A CLT in
        circuit-tracer's CLT layout: per layer ``i``, ``W_enc_i.safetensors`` (``W_enc_i``
        ``[d_latent, d_model]``, ``b_enc_i``, ``b_dec_i``, ``threshold_i`` for JumpReLU, ``W_skip_i``
        ``[d_model, d_model]`` with a skip) and ``W_dec_i.safetensors`` (``W_dec_i``
        ``[d_latent, n_targets, d_model]``). Per-layer dictionaries in sae-lens's format, one folder
        ``layer_<l>`` per layer (:mod:`analyses.transcoders.per_layer`)."""
        from hooked_vit import atomic

        with atomic.atomic_directory(directory, replace=True) as folder:
            if self.cross_layer:
                self._save_circuit_tracer_layout(folder)
            else:
                from analyses.transcoders.per_layer import save_layers

                save_layers(self, folder)
            atomic.write_json(folder / CONFIG_FILE, self.config())
        return Path(directory)

    def _save_circuit_tracer_layout(self, folder: Path) -> None:
        from hooked_vit import atomic

        for i in range(self.n_layers):
            enc = {f"W_enc_{i}": self.W_enc[i], f"b_enc_{i}": self.b_enc[i], f"b_dec_{i}": self.b_dec[i]}
            if self.activation == "jumprelu":
                enc[f"threshold_{i}"] = self.threshold[i]
            if self.W_skip is not None:
                enc[f"W_skip_{i}"] = self.W_skip[i]
            atomic.save_safetensors({k: v.detach().cpu().contiguous() for k, v in enc.items()},
                                    folder / f"W_enc_{i}.safetensors")
            atomic.save_safetensors({f"W_dec_{i}": self.W_dec[i].detach().cpu().contiguous()},
                                    folder / f"W_dec_{i}.safetensors")

    @classmethod
    def load(cls, directory: str | os.PathLike, device: str | torch.device = "cpu") -> CrossLayerTranscoder:
        """A transcoder saved by :meth:`save`."""
        from hooked_vit.reading import load_safetensors, read_json

        directory = Path(directory)
        fix = "save it again with CrossLayerTranscoder.save"
        cfg = read_json(directory / CONFIG_FILE, "a transcoder's configuration (JSON)", fix)
        clt = cls(cfg["n_layers"], cfg["d_model"], cfg["d_latent"], activation=cfg["activation"], k=cfg["k"],
                  skip=cfg["skip"], cross_layer=cfg["cross_layer"], input_hook=cfg["input_hook"],
                  bandwidth=cfg["bandwidth"])
        if not clt.cross_layer:
            from analyses.transcoders.per_layer import load_layers

            load_layers(clt, directory)
            return clt.to(device)
        with torch.no_grad():
            for i in range(clt.n_layers):
                enc = load_safetensors(directory / f"W_enc_{i}.safetensors", "a transcoder's encoder", fix)
                dec = load_safetensors(directory / f"W_dec_{i}.safetensors", "a transcoder's decoder", fix)
                clt.W_enc[i] = enc[f"W_enc_{i}"]
                clt.b_enc[i] = enc[f"b_enc_{i}"]
                clt.b_dec[i] = enc[f"b_dec_{i}"]
                if clt.activation == "jumprelu":
                    clt.log_threshold[i] = enc[f"threshold_{i}"].log()
                if clt.W_skip is not None:
                    clt.W_skip[i] = enc[f"W_skip_{i}"]
                check(dec[f"W_dec_{i}"].shape == clt.W_dec[i].shape,
                      f"{directory}/W_dec_{i}.safetensors holds {tuple(dec[f'W_dec_{i}'].shape)}, expected "
                      f"{tuple(clt.W_dec[i].shape)}")
                clt.W_dec[i].copy_(dec[f"W_dec_{i}"])
        return clt.to(device)

    @classmethod
    def for_model(cls, model: Any, *, kind: str = "clt", expansion_factor: int = 8, **options: Any
                  ) -> CrossLayerTranscoder:
        """A fresh transcoder for ``model`` (``kind``: ``clt``, ``plt`` per-layer transcoders, ``sae``
        per-layer SAEs on the MLP outputs) with ``expansion_factor * d_model`` latents per layer."""
        kinds = {"clt": (True, INPUT_HOOKS[0]), "plt": (False, INPUT_HOOKS[0]), "sae": (False, INPUT_HOOKS[1])}
        if kind not in kinds:
            raise InvalidArgumentError(f"kind must be one of {', '.join(kinds)}, got {kind!r}")
        cross_layer, input_hook = kinds[kind]
        cfg = model.cfg
        return cls(cfg.n_layers, cfg.d_model, expansion_factor * cfg.d_model, cross_layer=cross_layer,
                   input_hook=input_hook, **options)


def firing_counts(codes: Mapping[int, Tensor]) -> Int[Tensor, "n_layers d_latent"]:
    """How many tokens fired each latent, per layer (``codes`` of every layer, any leading shape)."""
    return torch.stack([(codes[l] != 0).reshape(-1, codes[l].shape[-1]).sum(0) for l in sorted(codes)])


def check_positions(positions: str) -> None:
    check(positions in POSITIONS, f"positions must be one of {', '.join(POSITIONS)}, got {positions!r}")


def layer_iterator(layers: Iterable[int] | None, n_layers: int) -> Iterator[int]:
    """``layers`` checked against ``0..n_layers-1`` (default all)."""
    chosen = list(range(n_layers)) if layers is None else [int(l) for l in layers]
    bad = [l for l in chosen if not 0 <= l < n_layers]
    check(not bad, f"layers must lie in 0..{n_layers - 1}, got {bad}")
    return iter(chosen)


__all__ = [
    "CONFIG_FILE",
    "INPUT_HOOKS",
    "OUTPUT_HOOK",
    "POSITIONS",
    "CrossLayerTranscoder",
    "HeavisideFunction",
    "JumpReLUFunction",
    "check_positions",
    "firing_counts",
    "layer_iterator",
    "topk_codes",
    "topk_indices",
    "topk_pairs",
]
