"""The saved dictionaries of two other levels, read from their files alone (a level never imports
another): the replacement level's per-layer SAEs (sae-lens folders ``<hook>/cfg.json`` beside
``replacement.json``, under ``<out>/<variant>/rrm/``) and the transcoders level's cross-layer
transcoder (circuit-tracer's layout: ``W_enc_<l>.safetensors`` holding ``W_enc_<l>`` ``[d_latent,
d_model]``, ``b_enc_<l>``, ``threshold_<l>`` for JumpReLU, and ``config.json``, under
``<out>/<variant>/clt/final/``). A CLT layer's encoder becomes a :class:`CLTEncoder`, whose
``encode`` the units of ``hooked_vit.units`` apply at ``blocks.<l>.ln2.hook_normalized``."""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from jaxtyping import Float
from safetensors.torch import load_file
from torch import Tensor

from hooked_vit.errors import InvalidArgumentError, MissingFileError
from hooked_vit.reading import read_json

REPLACEMENT_FILE = "replacement.json"  # the replacement level's description of its saved model
REPLACEMENT_DIR = "rrm"  # its folder under <out>/<variant>
CLT_CONFIG = "config.json"
CLT_DIRS = ("clt", "final")  # <out>/<variant>/clt/final
CLT_ACTIVATIONS = ("topk", "abstopk", "jumprelu")


def _folder(root: str | os.PathLike, variant_key: str, marker: str, below: tuple[str, ...], what: str,
            hint: str) -> Path:
    """``root`` if it holds ``marker`` (one dictionary for every variant), else ``root/variant/*below``."""
    root = Path(root)
    if (root / marker).is_file():
        return root
    folder = root.joinpath(variant_key, *below)
    if not (folder / marker).is_file():
        raise MissingFileError(f"no {what} at {root} or {folder} (expected {marker}): {hint}")
    return folder


def replacement_sae(replacement_from: str | os.PathLike, variant_key: str, layer: int) -> Any:
    """The replacement model's SAE at ``blocks.<layer>.hook_resid_post`` for ``variant_key``, from the
    replacement level's output ``replacement_from`` (``<variant>/rrm/``) or one saved replacement
    model's folder (used for every variant)."""
    from analyses.mis.sae import SAE

    folder = _folder(replacement_from, variant_key, REPLACEMENT_FILE, (REPLACEMENT_DIR,), "saved replacement model",
                     f"run hooked-vit replacement --out {replacement_from} first, or pass its rrm folder")
    hooks = read_json(folder / REPLACEMENT_FILE, "a replacement model's description (JSON)")["hooks"]
    hook = f"blocks.{layer}.hook_resid_post"
    if hook not in hooks:
        raise MissingFileError(f"the replacement model at {folder} has no SAE at {hook} (it has {', '.join(hooks)}): "
                               "choose --layers among those")
    return SAE.load_from_disk(str(folder / hook), device="cpu").eval()


class CLTEncoder:
    """Layer ``layer``'s encoder of a saved cross-layer transcoder: ``encode(x)`` =
    ``sparsify(x @ W_enc.T + b_enc)`` with the saved ``activation`` (``topk``: the ``k`` largest
    pre-activations, ReLU'd; ``abstopk``: the ``k`` largest in magnitude, signed; ``jumprelu``:
    ``x * (x > threshold)``). It reads ``blocks.<layer>.<input_hook>`` and carries the fields
    ``hooked_vit.units`` asks of a dictionary (``cfg.d_sae``, ``cfg.metadata``, ``W_enc``,
    ``unit_kind``)."""

    unit_kind = "clt_latent"

    def __init__(self, directory: str | os.PathLike, layer: int):
        directory = Path(directory)
        config = read_json(directory / CLT_CONFIG, "a cross-layer transcoder's config (JSON)")
        self.activation, self.k = str(config.get("activation")), int(config.get("k", 0))
        if self.activation not in CLT_ACTIVATIONS:
            raise InvalidArgumentError(f"{directory / CLT_CONFIG} names activation {self.activation!r}; this reader "
                                       f"knows {', '.join(CLT_ACTIVATIONS)}")
        n_layers = int(config["n_layers"])
        if not 0 <= layer < n_layers:
            raise InvalidArgumentError(f"the transcoder at {directory} has layers 0..{n_layers - 1}, not {layer}")
        path = directory / f"W_enc_{layer}.safetensors"
        if not path.is_file():
            raise MissingFileError(f"{path} is missing: the transcoder's folder is incomplete, train it again")
        tensors = load_file(str(path), device="cpu")
        self.W_enc: Float[Tensor, "d_latent d_model"] = tensors[f"W_enc_{layer}"].float()
        self.b_enc: Float[Tensor, " d_latent"] = tensors[f"b_enc_{layer}"].float()
        self.threshold: Float[Tensor, " d_latent"] | None = tensors.get(f"threshold_{layer}")
        if self.activation == "jumprelu" and self.threshold is None:
            raise MissingFileError(f"{path} lacks threshold_{layer}, which a jumprelu transcoder needs")
        if self.activation != "jumprelu" and not 1 <= self.k <= self.W_enc.shape[0]:
            raise InvalidArgumentError(f"{directory / CLT_CONFIG}: k must lie in [1, {self.W_enc.shape[0]}], "
                                       f"got {self.k}")
        hook = f"blocks.{layer}.{config.get('feature_input_hook') or config.get('input_hook') or 'ln2.hook_normalized'}"
        self.layer, self.directory = layer, directory
        self.cfg = SimpleNamespace(d_sae=int(self.W_enc.shape[0]), d_in=int(self.W_enc.shape[1]),
                                   metadata=SimpleNamespace(hook_name=hook, hook_name_out=None, tokens="all"))

    def encode(self, x: Float[Tensor, "*batch d_model"]) -> Float[Tensor, "*batch d_latent"]:
        """The layer's codes of the transcoder's input ``x``."""
        pre = x.to(self.W_enc.device) @ self.W_enc.T + self.b_enc
        if self.activation == "jumprelu":
            return pre * (pre > self.threshold.to(pre))
        signed = self.activation == "abstopk"
        indices = (pre.abs() if signed else pre).topk(self.k, dim=-1).indices
        values = pre.gather(-1, indices)
        return torch.zeros_like(pre).scatter(-1, indices, values if signed else values.relu())


def clt_encoder(clt_from: str | os.PathLike, variant_key: str, layer: int) -> CLTEncoder:
    """Layer ``layer``'s encoder of the CLT for ``variant_key``: from the transcoders level's output
    ``clt_from`` (``<variant>/clt/final/``) or one saved transcoder folder (used for every variant)."""
    folder = _folder(clt_from, variant_key, CLT_CONFIG, CLT_DIRS, "saved cross-layer transcoder",
                     f"run hooked-vit transcoders --out {clt_from} first, or pass its final/ folder")
    return CLTEncoder(folder, layer)


__all__ = ["CLTEncoder", "clt_encoder", "replacement_sae"]
