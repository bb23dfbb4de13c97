"""TransformerLens's ``ActivationCache`` with ViT conveniences: circuit-site keys, the CLS token and
patch tokens laid out on the image grid.

TL's analysis methods (``decompose_resid``, ``accumulated_resid``, ``apply_ln_to_stack``,
``logit_attrs``, ``stack_head_results``, ``get_full_resid_decomposition``, ...) are TL's own and
run on a HookedViT's cache with TL's semantics: positions are the prefix tokens (CLS, DIST,
registers; none for SigLIP) then the patches, the "unembed" is the classifier head, tokens are
classes (indices or names). A token-pooling head reads only CLS, so logit attributions are
meaningful at ``pos_slice=0``. ``hook_pooled`` (``[batch, d_model]``)
has no position axis: ``pos_slice`` leaves it whole.
"""

from __future__ import annotations

from typing import Any

from jaxtyping import Float
from torch import Tensor
from transformer_lens.ActivationCache import ActivationCache

from hooked_vit.errors import InvalidArgumentError
from hooked_vit.sites import SITE_NAMES


class ViTActivationCache(ActivationCache):
    """Activations of one :class:`~hooked_vit.HookedViT` run.

    Keys are hook names; TransformerLens shorthands (``cache["pattern", 3]``) and circuit-site names
    (``cache["mlp_act", 3]``) work too.
    """

    def __getitem__(self, key: Any) -> Tensor:
        if isinstance(key, tuple) and len(key) == 2 and key[0] in SITE_NAMES:
            key = self.model.sites[key[1], key[0]].hook_name
        if isinstance(key, str) and key not in self.cache_dict and "." in key:
            raise KeyError(
                f"{key!r} is not in this cache; it holds {len(self.cache_dict)} activations "
                f"(names_filter may have left it out). Cached: {list(self.cache_dict)[:8]} ..."
            )
        return super().__getitem__(key)

    def cls_token(self, key: Any) -> Float[Tensor, "batch *rest"]:
        """The activation at the CLS token (position 0); refused for a model without one (SigLIP)."""
        if not self.model.cfg.class_token:
            raise InvalidArgumentError(f"{self.model.cfg.model_name} has no class token (e.g. SigLIP): read the pooled "
                                       "features (cache['hook_pooled']) or the patches (cache.patch_grid(key))")
        act = self[key]
        return act[:, 0] if self.has_batch_dim else act[0]

    def patch_grid(self, key: Any) -> Float[Tensor, "batch grid_h grid_w *rest"]:
        """Patch-token activations (CLS, DIST and registers dropped) reshaped to the ``[grid, grid]``
        image layout."""
        act = self[key]
        if not self.has_batch_dim:
            act = act[None]
        grid = self.model.cfg.grid_size
        patches = act[:, self.model.cfg.n_prefix_tokens:]
        return patches.reshape(act.shape[0], grid, grid, *act.shape[2:])

    def apply_slice_to_batch_dim(self, batch_slice: Any) -> "ViTActivationCache":
        """TL's batch slicing (``batch_slice``: a ``transformer_lens.utilities.Slice`` or its input),
        keeping this class (and its ViT methods)."""
        sliced = super().apply_slice_to_batch_dim(batch_slice)
        return ViTActivationCache(sliced.cache_dict, self.model, has_batch_dim=sliced.has_batch_dim)
