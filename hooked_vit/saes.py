"""SAEs spliced into a HookedViT, as sae-lens's ``HookedSAETransformer`` splices them into a
HookedTransformer: ``model.run_with_saes(images, saes=[sae])``, ``run_with_cache_with_saes``,
``run_with_hooks_with_saes``, ``add_sae`` / ``reset_saes`` and the ``saes()`` context, for any
sae-lens ``SAE`` (trained by :mod:`analyses.layer.sae` or loaded with ``SAE.load_from_disk``).

An SAE's metadata names its hook (``sae.cfg.metadata.hook_name``) and, for SAEs trained here, its
tokens (``metadata.tokens``: ``cls``, ``patch`` or ``all``; ``cls`` when absent, the paper's probe).
At those tokens the hook's value is replaced by the reconstruction (plus, with ``use_error_term``,
the reconstruction error, so the forward pass is unchanged until a latent is edited); other tokens
pass through. As in sae-lens, the SAE's own hook points (``hook_sae_input``, ``hook_sae_acts_pre``,
``hook_sae_acts_post``, ``hook_sae_recons``) appear under the hook, next to the splice's
``hook_sae_error`` and ``hook_sae_output``, e.g. ``blocks.3.hook_resid_post.hook_sae_acts_post``
``[batch n_tok d_sae]``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor, nn
from transformer_lens.hook_points import HookPoint

from hooked_vit.errors import InvalidArgumentError
from hooked_vit.tokens import HookLayout, check_tokens, hook_layout, select_tokens, token_positions

# A sae-lens ``SAE`` (an nn.Module with encode/decode and ``cfg.metadata``); sae-lens itself is not
# imported here, as importing it takes seconds.
SAE = nn.Module

SAE_HOOK_SUFFIXES: tuple[str, ...] = ("input", "acts_pre", "acts_post", "recons", "error", "output")
_SPLICE_OWN_HOOKS = ("hook_sae_error", "hook_sae_output")  # the SAE's other hook points are shared


def sae_hook_name(sae: SAE) -> str:
    """The HookedViT hook an SAE was trained on (from its metadata)."""
    name = sae.cfg.metadata.hook_name
    if not name:
        raise InvalidArgumentError("this SAE's metadata has no hook_name; set sae.cfg.metadata.hook_name")
    name_out = getattr(sae.cfg.metadata, "hook_name_out", None)
    if name_out not in (None, name):
        raise NotImplementedError(f"this is a transcoder ({name} -> {name_out}); only SAEs, which read and write "
                                  "the same hook, can be spliced into a HookedViT")
    return str(name)


def _check_no_special_tokens(exclude_special_tokens: bool | list[int]) -> None:
    if exclude_special_tokens is not False:
        raise NotImplementedError("exclude_special_tokens has no meaning for an image classifier (no special "
                                  "tokens): choose the SAE's positions with tokens='cls', 'patch' or 'all'")


def sae_tokens(sae: SAE) -> str:
    """The token choice an SAE was trained on (from its metadata; ``cls`` if absent)."""
    return check_tokens(str(sae.cfg.metadata.tokens or "cls"))


def sae_hook(hook_name: str, which: str = "acts_post") -> str:
    """Name of an attached SAE's hook: ``f"{hook_name}.hook_sae_{which}"`` with ``which`` one of
    ``input`` / ``recons`` / ``error`` / ``output`` (``[batch n_tok d_in]``), ``acts_pre`` (encoder
    pre-activations) or ``acts_post`` (feature activations), both ``[batch n_tok d_sae]``."""
    if which not in SAE_HOOK_SUFFIXES:
        raise InvalidArgumentError(f"which must be one of {', '.join(SAE_HOOK_SUFFIXES)}, got {which!r}")
    return f"{hook_name}.hook_sae_{which}"


class SAESplice(HookPoint):
    """Takes the place of the HookPoint at an SAE's hook: at the SAE's tokens the hook's value
    becomes the SAE reconstruction (plus the error ``x - x_hat`` of the unedited input, computed
    without gradient and with the SAE's hooks off, when ``use_error_term``, as sae-lens does);
    other tokens pass through. Hooks added at the hook's own name see the spliced value (the one
    used downstream). The SAE's hook points are registered here (so they fire inside its
    ``encode``/``decode`` under the model's names), the SAE itself is not: the model's parameters
    and state dict are unchanged."""

    def __init__(self, sae: SAE, layout: HookLayout, tokens: str, n_ctx: int, use_error_term: bool,
                 original: HookPoint):
        super().__init__()
        self.__dict__["sae"] = sae
        self.__dict__["original"] = original
        self.layout = layout
        self.tokens = tokens
        self.n_ctx = n_ctx
        self.use_error_term = use_error_term
        # The SAE's hook points: hook_sae_input, hook_sae_acts_pre, hook_sae_acts_post (features
        # [batch, n_tok, d_sae]), hook_sae_recons (reconstruction from the (edited) features).
        for name, hook in sae.hook_dict.items():
            if name not in _SPLICE_OWN_HOOKS:
                setattr(self, name, hook)
        self.hook_sae_error = HookPoint()  # [batch, n_tok, d_in]: x - x_hat of the unedited input
        self.hook_sae_output = HookPoint()  # [batch, n_tok, d_in]: what replaces the input

    def forward(self, x: Float[Tensor, "batch *dims"]) -> Float[Tensor, "batch *dims"]:
        sae: SAE = self.__dict__["sae"]
        selected = select_tokens(x, self.layout, self.tokens, self.n_ctx)
        out = sae.decode(sae.encode(selected))
        if self.use_error_term:
            from sae_lens.saes.sae import _disable_hooks  # sae-lens's own: the clean reconstruction

            with torch.no_grad(), _disable_hooks(sae):
                error = selected - sae.decode(sae.encode(selected))
            out = out + self.hook_sae_error(error)
        out = self.hook_sae_output(out).to(x.dtype)
        if not self.layout.has_positions or self.tokens == "all":
            return out.reshape(x.shape)
        index = token_positions(self.tokens, self.n_ctx).to(x.device)
        return x.index_copy(1, index, out.reshape(x.shape[0], index.numel(), *x.shape[2:]))


def _module_at(model: nn.Module, path: str) -> tuple[nn.Module, str]:
    parent = model
    *parents, last = path.split(".")
    for part in parents:
        parent = parent[int(part)] if part.isdigit() else getattr(parent, part)
    return parent, last


def attach_sae(model: nn.Module, sae: SAE, *, use_error_term: bool = False, tokens: str | None = None) -> SAESplice:
    """Splice ``sae`` into ``model`` at its hook (``sae.cfg.metadata.hook_name``), at ``tokens``
    (default: ``metadata.tokens``), until :func:`detach_sae`. The SAE moves to the model's device
    and dtype. New hooks ``{hook}.hook_sae_{input,acts_pre,acts_post,recons,error,output}`` appear
    in ``model.hook_dict``."""
    hook_name = sae_hook_name(sae)
    tokens = sae_tokens(sae) if tokens is None else check_tokens(tokens)
    current = model.hook_dict.get(hook_name)
    if isinstance(current, SAESplice):
        raise InvalidArgumentError(f"an SAE is already attached at {hook_name}; detach_sae(model, {hook_name!r}) first")
    layout = hook_layout(model, hook_name)
    if layout.d_in != sae.cfg.d_in:
        raise InvalidArgumentError(f"the SAE reads {sae.cfg.d_in}-wide activations but {hook_name} gives {layout.d_in}")
    if current.has_hooks():
        raise InvalidArgumentError(f"{hook_name} has hooks attached; remove them (model.reset_hooks()) before "
                                   "splicing an SAE")
    if getattr(sae, "hook_z_reshaping_mode", False):
        raise InvalidArgumentError("this SAE reshapes [..., n_heads, d_head] inputs itself (hook_z reshaping), but "
                                   "the splice gives it [batch, n_tok, n_heads * d_head]: call "
                                   "sae.turn_off_forward_pass_hook_z_reshaping() first")
    param = next(model.parameters())
    sae.to(device=param.device, dtype=param.dtype)
    splice = SAESplice(sae, layout, tokens, model.cfg.n_ctx, use_error_term, current)
    parent, attr = _module_at(model, hook_name)
    setattr(parent, attr, splice)
    model.setup()
    return splice


def detach_sae(model: nn.Module, hook_name: str) -> SAE:
    """Remove the SAE spliced at ``hook_name`` (restoring the original HookPoint); returns it."""
    splice = model.hook_dict.get(hook_name)
    if not isinstance(splice, SAESplice):
        raise InvalidArgumentError(f"no SAE is attached at {hook_name!r}")
    parent, attr = _module_at(model, hook_name)
    setattr(parent, attr, splice.__dict__["original"])
    model.setup()
    sae = splice.__dict__["sae"]
    sae.setup()  # its hook points get back their own names
    return sae


@contextmanager
def spliced(model: nn.Module, sae: SAE, *, use_error_term: bool = False) -> Iterator[SAESplice]:
    """``with spliced(model, sae, use_error_term=True): ...`` attaches ``sae`` for the block."""
    splice = attach_sae(model, sae, use_error_term=use_error_term)
    try:
        yield splice
    finally:
        model.reset_hooks()
        detach_sae(model, splice.layout.hook_name)


def sae_hooks_without_positions(model: nn.Module) -> set[str]:
    """Names of spliced SAEs' hooks whose token axis is not the model's positions (SAEs on CLS or
    patch tokens only, or on ``hook_pooled``): a cache's ``pos_slice`` must leave them whole."""
    names = set()
    for name, module in model.hook_dict.items():
        if isinstance(module, SAESplice) and (module.tokens != "all" or not module.layout.has_positions):
            names.update(sae_hook(name, which) for which in SAE_HOOK_SUFFIXES)
    return names


class SAEMixin:
    """sae-lens's ``HookedSAETransformer`` methods on a HookedViT (same names, arguments and
    semantics; ``tokens`` overrides the SAE's token choice)."""

    @property
    def acts_to_saes(self) -> dict[str, SAE]:
        """Hook name -> the SAE spliced there."""
        return {name: m.__dict__["sae"] for name, m in self.hook_dict.items() if isinstance(m, SAESplice)}

    def add_sae(self, sae: SAE, use_error_term: bool | None = None, exclude_special_tokens: bool | list[int] = False,
                tokens: str | None = None) -> None:
        """Splice ``sae`` in at its hook until :meth:`reset_saes` (replacing an SAE already there).
        ``use_error_term=None`` keeps the SAE's own ``use_error_term``."""
        _check_no_special_tokens(exclude_special_tokens)
        hook_name = sae_hook_name(sae)
        if isinstance(self.hook_dict.get(hook_name), SAESplice):
            detach_sae(self, hook_name)
        attach_sae(self, sae, use_error_term=sae.use_error_term if use_error_term is None else use_error_term,
                   tokens=tokens)

    def reset_saes(self, act_names: str | Sequence[str] | None = None) -> None:
        """Remove the SAEs at ``act_names`` (default: all)."""
        names = [act_names] if isinstance(act_names, str) else list(act_names or self.acts_to_saes)
        for name in names:
            detach_sae(self, name)

    @contextmanager
    def saes(
        self, saes: SAE | Sequence[SAE] = (), reset_saes_end: bool = True, use_error_term: bool | None = None,
        exclude_special_tokens: bool | list[int] = False, tokens: str | None = None,
    ) -> Iterator[Any]:
        """Splice ``saes`` for the ``with`` block; at its end they are removed and SAEs they
        replaced are put back (unless ``reset_saes_end=False``)."""
        _check_no_special_tokens(exclude_special_tokens)
        saes = [saes] if isinstance(saes, SAE) else list(saes)
        previous = []
        try:
            for sae in saes:
                hook_name = sae_hook_name(sae)
                splice = self.hook_dict.get(hook_name)
                previous.append((hook_name, splice if isinstance(splice, SAESplice) else None))
                self.add_sae(sae, use_error_term=use_error_term, tokens=tokens)
            yield self
        finally:
            if reset_saes_end:
                for hook_name, splice in reversed(previous):
                    if isinstance(self.hook_dict.get(hook_name), SAESplice):
                        detach_sae(self, hook_name)
                    if splice is not None:
                        attach_sae(self, splice.__dict__["sae"], use_error_term=splice.use_error_term,
                                   tokens=splice.tokens)

    def run_with_saes(
        self, *model_args: Any, saes: SAE | Sequence[SAE] = (), reset_saes_end: bool = True,
        use_error_term: bool | None = None, exclude_special_tokens: bool | list[int] = False,
        tokens: str | None = None, **model_kwargs: Any,
    ) -> Tensor:
        """``model(*model_args, **model_kwargs)`` with ``saes`` spliced in for this run."""
        with self.saes(saes, reset_saes_end, use_error_term, exclude_special_tokens, tokens):
            return self(*model_args, **model_kwargs)

    def run_with_cache_with_saes(
        self, *model_args: Any, saes: SAE | Sequence[SAE] = (), reset_saes_end: bool = True,
        use_error_term: bool | None = None, exclude_special_tokens: bool | list[int] = False,
        return_cache_object: bool = True, remove_batch_dim: bool = False, tokens: str | None = None, **kwargs: Any,
    ) -> tuple[Tensor, Any]:
        """``run_with_cache`` with ``saes`` spliced in: the cache holds their ``hook_sae_*`` values."""
        with self.saes(saes, reset_saes_end, use_error_term, exclude_special_tokens, tokens):
            return self.run_with_cache(*model_args, return_cache_object=return_cache_object,
                                       remove_batch_dim=remove_batch_dim, **kwargs)

    def run_with_hooks_with_saes(
        self, *model_args: Any, saes: SAE | Sequence[SAE] = (), reset_saes_end: bool = True,
        exclude_special_tokens: bool | list[int] = False, fwd_hooks: Sequence = (), bwd_hooks: Sequence = (),
        reset_hooks_end: bool = True, clear_contexts: bool = False, tokens: str | None = None, **model_kwargs: Any,
    ) -> Tensor:
        """``run_with_hooks`` with ``saes`` spliced in (hooks may target their ``hook_sae_*``); as in
        sae-lens, each SAE keeps its own ``use_error_term`` (use :meth:`saes` to set it)."""
        with self.saes(saes, reset_saes_end, exclude_special_tokens=exclude_special_tokens, tokens=tokens):
            return self.run_with_hooks(*model_args, fwd_hooks=list(fwd_hooks), bwd_hooks=list(bwd_hooks),
                                       reset_hooks_end=reset_hooks_end, clear_contexts=clear_contexts,
                                       **model_kwargs)
