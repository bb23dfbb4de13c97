"""Image similarity backends of the MIS: each maps images to unit-norm embeddings once per image, and
the similarity of two images is the cosine of their embeddings.

* ``"pixels"``: the flattened image, centred per image (the similarity is the pixels' correlation,
  unchanged by the model-ready normalisation; small images and tests);
* ``"features:ALIAS"``: the pooled features (``hook_pooled``, the classifier head's input) of any
  HookedViT (``ALIAS`` a model alias or a saved model folder), on the same model-ready images;
* ``"dreamsim"``: DreamSim's embedding (Fu et al. 2023), the 2024 paper's choice; an optional
  extra (``pip install 'hooked-vit[mis]'``; its weights download on first use, to
  ``~/.cache/dreamsim``).
"""

from __future__ import annotations

import os
import zipfile
from typing import Any

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor

from analyses.mis.config import DREAMSIM_CACHE, DREAMSIM_HELP, check_similarity
from hooked_vit.errors import InvalidArgumentError, MissingFileError


def _pixels(images: Float[Tensor, "n channel height width"]) -> Float[Tensor, "n d"]:
    flat = images.flatten(1).float()
    return flat - flat.mean(dim=1, keepdim=True)  # cosine of centred pixels: their correlation


def _features(alias: str, images: Float[Tensor, "n channel height width"], batch_size: int) -> Float[Tensor, "n d"]:
    from hooked_vit import HookedViT

    model = HookedViT.from_pretrained(alias).eval()
    size = tuple(model.cfg.preprocessing.get("input_size", images.shape[1:]))
    if tuple(images.shape[1:]) != size:
        raise InvalidArgumentError(f"features:{alias} takes images of shape {list(size)}, the tasks' images are "
                                   f"{list(images.shape[1:])}: use a model of the same input size, or 'pixels'")
    parts = []
    with torch.no_grad():
        for start in range(0, images.shape[0], batch_size):
            _, cache = model.run_with_cache(images[start:start + batch_size], names_filter=["hook_pooled"],
                                            return_cache_object=False)
            parts.append(cache["hook_pooled"].float())
    return torch.cat(parts)


def _dreamsim(images: Float[Tensor, "n channel height width"], mean: tuple[float, ...], std: tuple[float, ...],
              batch_size: int) -> Float[Tensor, "n d"]:
    try:
        from dreamsim import dreamsim
    except ImportError:
        raise MissingFileError(DREAMSIM_HELP) from None
    try:
        model, _ = dreamsim(pretrained=True, device="cpu", cache_dir=os.path.expanduser(DREAMSIM_CACHE))
    except (OSError, RuntimeError, zipfile.BadZipFile) as error:  # no weights and no network, or a partial download
        raise MissingFileError(f"{DREAMSIM_HELP} ({type(error).__name__})") from None
    pixels = (images * torch.tensor(std).view(-1, 1, 1) + torch.tensor(mean).view(-1, 1, 1)).clamp(0, 1)
    if pixels.shape[1] == 1:
        pixels = pixels.expand(-1, 3, -1, -1)
    parts = []
    with torch.no_grad():
        for start in range(0, pixels.shape[0], batch_size):
            batch = F.interpolate(pixels[start:start + batch_size], size=(224, 224), mode="bilinear", align_corners=False)
            parts.append(model.embed(batch).float())
    return torch.cat(parts)


def embed(similarity: str, images: Float[Tensor, "n channel height width"], *, mean: tuple[float, ...] = (0.0,),
          std: tuple[float, ...] = (1.0,), batch_size: int = 256) -> Float[Tensor, "n d"]:
    """Unit-norm embeddings of ``images`` under backend ``similarity`` (``mean``/``std`` undo the
    model-ready normalisation for DreamSim, which takes [0, 1] pixels)."""
    check_similarity(similarity)
    if similarity == "pixels":
        vectors = _pixels(images)
    elif similarity == "dreamsim":
        vectors = _dreamsim(images, mean, std, batch_size)
    else:
        vectors = _features(similarity.removeprefix("features:"), images, batch_size)
    return F.normalize(vectors.float(), dim=-1)


class EmbeddingCache:
    """Embeddings of the images of one image set, computed once per backend and reused by every
    unit's tasks (keyed by backend and the images' identity)."""

    def __init__(self) -> None:
        self._cache: dict[tuple[str, int], tuple[Tensor, Tensor]] = {}  # (images kept alive, embeddings)

    def __call__(self, similarity: str, images: Float[Tensor, "n channel height width"], **kwargs: Any) -> Float[Tensor, "n d"]:
        """:func:`embed` of ``images``, computed once per backend and image tensor."""
        key = (similarity, id(images))
        if key not in self._cache or self._cache[key][0] is not images:
            self._cache[key] = (images, embed(similarity, images, **kwargs))
        return self._cache[key][1]


__all__ = ["DREAMSIM_HELP", "EmbeddingCache", "embed"]
