"""The SAE whose latents the MIS level scores: one the layer level saved (read with sae-lens's
``SAE.load_from_disk``, without importing the layer level), or a small sae-lens TopK SAE trained
here on the variant's activations (MSE, Adam; saved in sae-lens's format and reused when its
settings match)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

os.environ.setdefault("WANDB_MODE", "disabled")  # sae-lens imports wandb; never log to it from here

from sae_lens import SAE, TopKSAE, TopKSAEConfig  # noqa: E402

from hooked_vit import atomic  # noqa: E402
from hooked_vit.errors import MissingFileError  # noqa: E402
from hooked_vit.reading import read_json  # noqa: E402

SETTINGS_FILE = "mis_sae_settings.json"


def layer_level_sae(sae_from: str | os.PathLike, variant_key: str) -> Any:
    """The SAE the layer level saved for ``variant_key`` under its output ``sae_from``
    (``<sae_from>/<variant>/<sae>/cfg.json``; the first in name order if it trained several, as with
    a sweep), or, when ``sae_from`` is itself an SAE folder (``cfg.json``), that SAE for every variant."""
    if (Path(sae_from) / "cfg.json").is_file():
        return SAE.load_from_disk(str(sae_from), device="cpu").eval()
    found = sorted(p.parent for p in (Path(sae_from) / variant_key).glob("*/cfg.json"))
    if not found:
        raise MissingFileError(f"no SAE under {Path(sae_from) / variant_key} (expected <sae>/cfg.json as the layer level "
                               f"saves): run hooked-vit layer --out {sae_from} first, or drop --sae-from to train one here")
    return SAE.load_from_disk(str(found[0]), device="cpu").eval()


def token_activations(model: Any, images: Float[Tensor, "n channel height width"], hook_name: str, tokens: str, *,
                      batch_size: int) -> Float[Tensor, "rows d"]:
    """The hook's value at the chosen ``tokens`` (``cls`` or ``patch``) of every image, one row each."""
    layer = int(hook_name.split(".")[1])
    n_prefix = model.cfg.n_prefix_tokens
    rows = []
    with torch.no_grad():
        for start in range(0, images.shape[0], batch_size):
            _, cache = model.run_with_cache(images[start:start + batch_size], names_filter=[hook_name],
                                            stop_at_layer=layer + 1, return_cache_object=False)
            act = cache[hook_name]
            rows.append(act[:, 0] if tokens == "cls" else act[:, n_prefix:].reshape(-1, act.shape[-1]))
    return torch.cat(rows).float()


def train_small_sae(activations: Float[Tensor, "rows d"], *, hook_name: str, tokens: str, expansion_factor: int, k: int,
                    steps: int, batch_size: int, lr: float, seed: int) -> Any:
    """A sae-lens TopK SAE (``d_sae = expansion_factor * d``, ``k`` active latents) fitted to
    ``activations`` by ``steps`` Adam steps on the reconstruction MSE (batches drawn with ``seed``)."""
    d_in = activations.shape[1]
    cfg = TopKSAEConfig(d_in=d_in, d_sae=expansion_factor * d_in, k=min(k, expansion_factor * d_in))
    cfg.metadata.hook_name, cfg.metadata.tokens = hook_name, tokens
    generator = torch.Generator().manual_seed(int(seed))
    with torch.random.fork_rng():
        torch.manual_seed(int(seed))
        sae = TopKSAE(cfg)
    with torch.no_grad():  # start at the data: b_dec the mean, encoder the decoder's transpose
        sae.b_dec.copy_(activations.mean(0))
        sae.W_dec.copy_(torch.nn.functional.normalize(sae.W_dec, dim=1) * 0.1)
        sae.W_enc.copy_(sae.W_dec.T)
    optimizer = torch.optim.Adam(sae.parameters(), lr=lr)
    for _ in range(steps):
        batch = activations[torch.randint(0, activations.shape[0], (batch_size,), generator=generator)]
        loss = (sae.decode(sae.encode(batch)) - batch).pow(2).sum(-1).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return sae.eval()


def cached_small_sae(directory: str | os.PathLike, settings: dict[str, Any], train: Any) -> Any:
    """The SAE saved in ``directory`` with the same ``settings``, else ``train()``'s, saved there
    (sae-lens's files and the settings, each file whole)."""
    directory = Path(directory)
    saved = directory / SETTINGS_FILE
    if saved.is_file() and read_json(saved, "the in-level SAE's settings (JSON)") == settings:
        return SAE.load_from_disk(str(directory), device="cpu").eval()
    sae = train()
    with atomic.files_into(directory) as tmp:
        sae.save_model(tmp)
    atomic.write_json(saved, settings)
    return sae


__all__ = ["cached_small_sae", "layer_level_sae", "token_activations", "train_small_sae"]
