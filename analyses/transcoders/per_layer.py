"""The per-layer baselines as sae-lens objects, saved and loaded in sae-lens's format.

A per-layer dictionary trains as a :class:`~analyses.transcoders.clt.CrossLayerTranscoder` with
``cross_layer=False`` (the same loop, loss and sparsifier as the CLT); layer ``l`` of it is one
sae-lens dictionary (:func:`to_sae_lens`, ``plt[l]``):

=================  ============================================  ==========================================
sparsifier         per-layer transcoder (``plt``; ``+ skip``)    per-layer SAE on the MLP output (``sae``)
=================  ============================================  ==========================================
``jumprelu``       ``JumpReLUTranscoder`` (``JumpReLUSkipTranscoder``)  ``JumpReLUSAE``
``topk``           ``TopKTranscoder`` (``TopKSkipTranscoder``)   ``TopKSAE``
``abstopk``        ``AbsTopKTranscoder`` (``AbsTopKSkipTranscoder``)   ``AbsTopKSAE``
=================  ============================================  ==========================================

sae-lens ships transcoders with ReLU and JumpReLU codes only; the TopK and AbsTopK transcoders are
sae-lens ``Transcoder`` / ``SkipTranscoder`` subclasses with sae-lens's own ``TopK`` / ``AbsTopK``
activation, registered in sae-lens's architecture registry when this module is imported (so
``sae_lens.SAE.load_from_disk`` loads them after ``import analyses.transcoders.per_layer``; the
JumpReLU ones and the SAEs load with sae-lens alone). The weights map as ``W_enc = ours.W_enc[l].T``
``[d_in, d_sae]``, ``W_dec = ours.W_dec[l][:, 0]`` ``[d_sae, d_out]``, ``W_skip = ours.W_skip[l].T``
``[d_out, d_in]``, ``threshold = ours.threshold[l]``; inputs are not shifted by ``b_dec``
(``apply_b_dec_to_input=False``) and not normalised.

Files (:func:`save`): ``<dir>/layer_<l>/`` with sae-lens's ``cfg.json`` and
``sae_weights.safetensors`` per layer (its metadata names ``hook_name`` and, for transcoders,
``hook_name_out``), and our ``config.json`` beside them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("WANDB_MODE", "disabled")  # sae-lens imports wandb; never log to it from here

import torch
from sae_lens import (
    SAE,
    AbsTopKSAE,
    AbsTopKSAEConfig,
    JumpReLUSAE,
    JumpReLUSAEConfig,
    JumpReLUSkipTranscoder,
    JumpReLUSkipTranscoderConfig,
    JumpReLUTranscoder,
    JumpReLUTranscoderConfig,
    SkipTranscoder,
    TopKSAE,
    TopKSAEConfig,
    Transcoder,
    TranscoderConfig,
)
from sae_lens.registry import SAE_CLASS_REGISTRY, register_sae_class
from sae_lens.saes.abstopk_sae import AbsTopK
from sae_lens.saes.sae import SAEMetadata
from sae_lens.saes.topk_sae import TopK

from hooked_vit.errors import check

LAYER_DIR = "layer_{}"


@dataclass
class TopKTranscoderConfig(TranscoderConfig):
    """A sae-lens transcoder whose codes are ReLU-TopK: the ``k`` largest pre-activations per token."""

    k: int = 16
    # sae-lens's loader passes the metadata of cfg.json as a dict, then replaces it by SAEMetadata
    metadata: Any = field(default_factory=SAEMetadata)

    @classmethod
    def architecture(cls) -> str:
        return "topk_transcoder"


class TopKTranscoder(Transcoder):
    """sae-lens's ``Transcoder`` with sae-lens's ``TopK`` activation."""

    cfg: TopKTranscoderConfig

    def get_activation_fn(self) -> Any:
        return TopK(self.cfg.k)


@dataclass
class AbsTopKTranscoderConfig(TopKTranscoderConfig):
    """Codes AbsTopK: the ``k`` largest pre-activations in magnitude per token, sign kept."""

    @classmethod
    def architecture(cls) -> str:
        return "abstopk_transcoder"


class AbsTopKTranscoder(TopKTranscoder):
    """sae-lens's ``Transcoder`` with sae-lens's ``AbsTopK`` activation."""

    cfg: AbsTopKTranscoderConfig

    def get_activation_fn(self) -> Any:
        return AbsTopK(self.cfg.k)


@dataclass
class TopKSkipTranscoderConfig(TopKTranscoderConfig):
    @classmethod
    def architecture(cls) -> str:
        return "topk_skip_transcoder"


class TopKSkipTranscoder(TopKTranscoder, SkipTranscoder):
    """:class:`TopKTranscoder` with sae-lens's learned skip connection ``x @ W_skip.T``."""

    cfg: TopKSkipTranscoderConfig


@dataclass
class AbsTopKSkipTranscoderConfig(AbsTopKTranscoderConfig):
    @classmethod
    def architecture(cls) -> str:
        return "abstopk_skip_transcoder"


class AbsTopKSkipTranscoder(AbsTopKTranscoder, SkipTranscoder):
    """:class:`AbsTopKTranscoder` with sae-lens's learned skip connection ``x @ W_skip.T``."""

    cfg: AbsTopKSkipTranscoderConfig


for _cls, _cfg in ((TopKTranscoder, TopKTranscoderConfig), (AbsTopKTranscoder, AbsTopKTranscoderConfig),
                   (TopKSkipTranscoder, TopKSkipTranscoderConfig),
                   (AbsTopKSkipTranscoder, AbsTopKSkipTranscoderConfig)):
    if _cfg.architecture() not in SAE_CLASS_REGISTRY:
        register_sae_class(_cfg.architecture(), _cls, _cfg)

# (is a transcoder, activation, skip) -> the sae-lens class and its config
CLASSES: dict[tuple[bool, str, bool], tuple[type[SAE], type]] = {
    (True, "jumprelu", False): (JumpReLUTranscoder, JumpReLUTranscoderConfig),
    (True, "jumprelu", True): (JumpReLUSkipTranscoder, JumpReLUSkipTranscoderConfig),
    (True, "topk", False): (TopKTranscoder, TopKTranscoderConfig),
    (True, "topk", True): (TopKSkipTranscoder, TopKSkipTranscoderConfig),
    (True, "abstopk", False): (AbsTopKTranscoder, AbsTopKTranscoderConfig),
    (True, "abstopk", True): (AbsTopKSkipTranscoder, AbsTopKSkipTranscoderConfig),
    (False, "jumprelu", False): (JumpReLUSAE, JumpReLUSAEConfig),
    (False, "topk", False): (TopKSAE, TopKSAEConfig),
    (False, "abstopk", False): (AbsTopKSAE, AbsTopKSAEConfig),
}


def _is_transcoder(dictionary: Any) -> bool:
    return dictionary.input_hook == "ln2.hook_normalized"


@torch.no_grad()
def to_sae_lens(dictionary: Any, layer: int) -> SAE:
    """Layer ``layer`` of a per-layer ``dictionary`` (``CrossLayerTranscoder`` with
    ``cross_layer=False``) as a sae-lens object in eval mode (a copy of the weights)."""
    check(not dictionary.cross_layer, "a cross-layer transcoder's layer decodes into every later layer: only "
                                      "per-layer dictionaries (kind plt or sae) are sae-lens objects")
    check(0 <= layer < dictionary.n_layers, f"layer must lie in 0..{dictionary.n_layers - 1}, got {layer}")
    transcoder = _is_transcoder(dictionary)
    key = (transcoder, dictionary.activation, dictionary.W_skip is not None)
    check(key in CLASSES, "sae-lens SAEs have no skip connection: train per-layer SAEs without skip")
    sae_class, config_class = CLASSES[key]
    options: dict[str, Any] = {"d_in": dictionary.d_model, "d_sae": dictionary.d_latent,
                               "apply_b_dec_to_input": False, "device": str(dictionary.W_enc.device)}
    metadata = {"hook_name": dictionary.input_name(layer)}
    if transcoder:
        options["d_out"] = dictionary.d_model
        metadata["hook_name_out"] = dictionary.output_name(layer)
    if dictionary.activation != "jumprelu":
        options["k"] = dictionary.k
    sae = sae_class(config_class(**options, metadata=SAEMetadata(**metadata)))
    weights = {"W_enc": dictionary.W_enc[layer].T, "b_enc": dictionary.b_enc[layer],
               "W_dec": dictionary.W_dec[layer][:, 0], "b_dec": dictionary.b_dec[layer]}
    if dictionary.activation == "jumprelu":
        weights["threshold"] = dictionary.threshold[layer]
    if dictionary.W_skip is not None:
        weights["W_skip"] = dictionary.W_skip[layer].T
    sae.load_state_dict({name: value.detach().clone().contiguous() for name, value in weights.items()})
    return sae.eval()


@torch.no_grad()
def load_layers(dictionary: Any, directory: str | os.PathLike) -> None:
    """Fill the per-layer ``dictionary`` (in place) from the sae-lens folders ``<directory>/layer_<l>``,
    each loaded with ``sae_lens.SAE.load_from_disk``."""
    from hooked_vit.errors import CorruptFileError, MissingFileError

    for layer in range(dictionary.n_layers):
        folder = Path(directory) / LAYER_DIR.format(layer)
        if not folder.is_dir():
            raise MissingFileError(f"{folder} is missing: save the per-layer dictionary again")
        try:
            sae = SAE.load_from_disk(folder)
        except (OSError, ValueError, KeyError) as error:
            raise CorruptFileError(f"{folder} is not a readable sae-lens dictionary ({error}); save it again") from None
        expected = CLASSES[(_is_transcoder(dictionary), dictionary.activation, dictionary.W_skip is not None)][0]
        check(type(sae) is expected and sae.cfg.d_sae == dictionary.d_latent and sae.cfg.d_in == dictionary.d_model,
              f"{folder} holds a {type(sae).__name__} of {sae.cfg.d_sae} latents, expected a {expected.__name__} "
              f"of {dictionary.d_latent}")
        dictionary.W_enc[layer] = sae.W_enc.T
        dictionary.b_enc[layer] = sae.b_enc
        dictionary.W_dec[layer][:, 0] = sae.W_dec
        dictionary.b_dec[layer] = sae.b_dec
        if dictionary.activation == "jumprelu":
            dictionary.log_threshold[layer] = sae.threshold.log()
        if dictionary.W_skip is not None:
            dictionary.W_skip[layer] = sae.W_skip.T


def save_layers(dictionary: Any, folder: Path) -> None:
    """Write every layer of the per-layer ``dictionary`` into ``folder/layer_<l>`` with sae-lens's
    ``save_model`` (``folder`` is the caller's temporary folder, made whole by its rename)."""
    for layer in range(dictionary.n_layers):
        to_sae_lens(dictionary, layer).save_model(folder / LAYER_DIR.format(layer))


__all__ = ["CLASSES", "LAYER_DIR", "AbsTopKSkipTranscoder", "AbsTopKTranscoder", "TopKSkipTranscoder",
           "TopKTranscoder", "load_layers", "save_layers", "to_sae_lens"]
