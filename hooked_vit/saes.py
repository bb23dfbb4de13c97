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

A sae-lens transcoder (metadata ``hook_name_out`` differing from ``hook_name``, e.g.
``blocks.3.ln2.hook_normalized -> blocks.3.hook_mlp_out``) is spliced as sae-lens splices it: a
permanent forward hook captures its input at ``hook_name``, the splice takes the place of the
output hook's HookPoint, whose value at the SAE's tokens becomes ``decode(encode(input))`` (plus
``output - clean reconstruction`` with ``use_error_term``); its hook points appear under the output
hook (``blocks.3.hook_mlp_out.hook_sae_acts_post``) and ``acts_to_saes`` is keyed by the input hook.
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
from hooked_vit.hook_table import hook_names
from hooked_vit.tokens import HookLayout, check_tokens, hook_layout, select_tokens, token_positions

# A sae-lens ``SAE`` (an nn.Module with encode/decode and ``cfg.metadata``); sae-lens itself is not
# imported here, as importing it takes seconds.
SAE = nn.Module

SAE_HOOK_SUFFIXES: tuple[str, ...] = ("input", "acts_pre", "acts_post", "recons", "error", "output")
_SPLICE_OWN_HOOKS = ("hook_sae_error", "hook_sae_output")  # the SAE's other hook points are shared


def sae_hook_names(sae: SAE) -> tuple[str, str]:
    """The hooks an SAE reads and writes: ``(metadata.hook_name, metadata.hook_name_out)``, the same
    hook twice for an SAE, two hooks for a sae-lens transcoder (a ``Transcoder``, with ``cfg.d_out``)."""
    name = sae.cfg.metadata.hook_name
    if not name:
        raise InvalidArgumentError("this SAE's metadata has no hook_name; set sae.cfg.metadata.hook_name")
    name_out = getattr(sae.cfg.metadata, "hook_name_out", None) or name
    if name_out != name and getattr(sae.cfg, "d_out", None) is None:
        raise NotImplementedError(f"this SAE's metadata names a transcoder ({name} -> {name_out}) but it is a "
                                  f"{type(sae).__name__}, not a sae-lens Transcoder (no cfg.d_out); clear "
                                  "metadata.hook_name_out or load it as a Transcoder")
    return str(name), str(name_out)


def sae_hook_name(sae: SAE) -> str:
    """The HookedViT hook an SAE reads and writes (from its metadata); a transcoder, which reads
    one hook and writes another, is refused: use :func:`sae_hook_names`."""
    name, name_out = sae_hook_names(sae)
    if name_out != name:
        raise NotImplementedError(f"this is a transcoder ({name} -> {name_out}), which reads one hook and writes "
                                  "another; use sae_hook_names(sae) for its two hooks")
    return name


def sae_d_out(sae: SAE) -> int:
    """The width an SAE writes: ``cfg.d_out`` for a transcoder, ``cfg.d_in`` otherwise."""
    d_out = getattr(sae.cfg, "d_out", None)
    return int(sae.cfg.d_in if d_out is None else d_out)


def _check_no_special_tokens(exclude_special_tokens: bool | list[int]) -> None:
    if exclude_special_tokens is not False:
        raise NotImplementedError("exclude_special_tokens has no meaning for an image classifier (no special "
                                  "tokens): choose the SAE's positions with tokens='cls', 'patch' or 'all'")


def sae_tokens(sae: SAE) -> str:
    """The token choice an SAE was trained on (from its metadata; ``cls`` if absent)."""
    return check_tokens(str(sae.cfg.metadata.tokens or "cls"))


def sae_hook(hook_name: str, which: str = "acts_post") -> str:
    """Name of an attached SAE's hook: ``f"{hook_name}.hook_sae_{which}"`` with ``which`` one of
    ``input`` (``[batch n_tok d_in]``), ``recons`` / ``error`` / ``output`` (``[batch n_tok d_out]``,
    ``d_out = d_in`` but for a transcoder), ``acts_pre`` (encoder pre-activations) or ``acts_post``
    (feature activations), both ``[batch n_tok d_sae]``. For a transcoder ``hook_name`` is its output
    hook (``metadata.hook_name_out``), where sae-lens puts them."""
    if which not in SAE_HOOK_SUFFIXES:
        raise InvalidArgumentError(f"which must be one of {', '.join(SAE_HOOK_SUFFIXES)}, got {which!r}")
    return f"{hook_name}.hook_sae_{which}"


class SAESplice(HookPoint):
    """Takes the place of the HookPoint at an SAE's (output) hook: at the SAE's tokens the hook's
    value becomes the SAE reconstruction (plus the error ``x - x_hat`` of the unedited input, computed
    without gradient and with the SAE's hooks off, when ``use_error_term``, as sae-lens does);
    other tokens pass through. For a transcoder (``input_layout`` given) the SAE's input is the value
    captured at the input hook earlier in the same forward (:meth:`capture_input`, a permanent hook
    there) and the error is ``output - x_hat``. Hooks added at the hook's own name see the spliced
    value (the one used downstream). The SAE's hook points are registered here (so they fire inside
    its ``encode``/``decode`` under the model's names), the SAE itself is not: the model's parameters
    and state dict are unchanged."""

    def __init__(self, sae: SAE, layout: HookLayout, tokens: str, n_ctx: int, use_error_term: bool,
                 original: HookPoint, input_layout: HookLayout | None = None):
        super().__init__()
        self.__dict__["sae"] = sae
        self.__dict__["original"] = original
        self.__dict__["captured"] = None  # a transcoder's input, set by capture_input
        self.__dict__["capture_handle"] = None  # the LensHandle of the capturing hook (transcoders)
        self.layout = layout
        self.input_layout = input_layout
        self.tokens = tokens
        self.n_ctx = n_ctx
        self.use_error_term = use_error_term
        # The SAE's hook points: hook_sae_input, hook_sae_acts_pre, hook_sae_acts_post (features
        # [batch, n_tok, d_sae]), hook_sae_recons (reconstruction from the (edited) features).
        for name, hook in sae.hook_dict.items():
            if name not in _SPLICE_OWN_HOOKS:
                setattr(self, name, hook)
        self.hook_sae_error = HookPoint()  # [batch, n_tok, d_out]: x - x_hat of the unedited input
        self.hook_sae_output = HookPoint()  # [batch, n_tok, d_out]: what replaces the (output) hook's value

    @property
    def input_name(self) -> str:
        """The hook the SAE reads (its ``acts_to_saes`` key); the splice's own hook for an SAE."""
        return (self.input_layout or self.layout).hook_name

    def capture_input(self, act: Float[Tensor, "batch *dims"], hook: Any = None) -> None:
        """Forward hook at a transcoder's input hook: keep its value for the output hook (unchanged)."""
        self.__dict__["captured"] = act

    def forward(self, x: Float[Tensor, "batch *dims"]) -> Float[Tensor, "batch *dims"]:
        sae: SAE = self.__dict__["sae"]
        selected = select_tokens(x, self.layout, self.tokens, self.n_ctx)
        if self.input_layout is None:
            sae_in = selected
        else:
            captured, self.__dict__["captured"] = self.__dict__["captured"], None
            if captured is None:
                raise InvalidArgumentError(f"the transcoder at {self.layout.hook_name} has no input: its input hook "
                                           f"{self.input_layout.hook_name} did not fire first (its capturing hook was "
                                           "removed?); reset_saes() and add it again")
            sae_in = select_tokens(captured, self.input_layout, self.tokens, self.n_ctx)
        out = sae.decode(sae.encode(sae_in))
        if self.use_error_term:
            from sae_lens.saes.sae import _disable_hooks  # sae-lens's own: the clean reconstruction

            with torch.no_grad(), _disable_hooks(sae):
                error = selected - sae.decode(sae.encode(sae_in))
            out = out + self.hook_sae_error(error)
        out = self.hook_sae_output(out).to(x.dtype)
        if not self.layout.has_positions or self.tokens == "all":
            return out.reshape(x.shape)
        index = token_positions(self.tokens, self.n_ctx, self.layout.n_prefix, self.layout.class_token).to(x.device)
        return x.index_copy(1, index, out.reshape(x.shape[0], index.numel(), *x.shape[2:]))


def _module_at(model: nn.Module, path: str) -> tuple[nn.Module, str]:
    parent = model
    *parents, last = path.split(".")
    for part in parents:
        parent = parent[int(part)] if part.isdigit() else getattr(parent, part)
    return parent, last


def _splices(model: nn.Module) -> list[SAESplice]:
    return [m for m in model.hook_dict.values() if isinstance(m, SAESplice)]


def _firing_order(model: nn.Module) -> list[str]:
    cfg = model.cfg
    return hook_names(cfg.n_layers, cfg, use_attn_in=cfg.use_attn_in, use_split_qkv_input=cfg.use_split_qkv_input,
                      use_hook_mlp_in=cfg.use_hook_mlp_in)


def _plan(model: nn.Module, sae: SAE, tokens: str | None) -> tuple[str, HookLayout, HookLayout | None]:
    """Check ``sae`` against ``model`` (hooks exist, widths, a transcoder's hook order) without
    changing anything: its tokens, the output hook's layout and, for a transcoder, the input's."""
    name_in, name_out = sae_hook_names(sae)
    tokens = sae_tokens(sae) if tokens is None else check_tokens(tokens)
    layout_in = hook_layout(model, name_in)
    layout = hook_layout(model, name_out) if name_out != name_in else layout_in
    if layout_in.d_in != sae.cfg.d_in:
        raise InvalidArgumentError(f"the SAE reads {sae.cfg.d_in}-wide activations but {name_in} gives "
                                   f"{layout_in.d_in}")
    if layout.d_in != sae_d_out(sae):
        raise InvalidArgumentError(f"the SAE writes {sae_d_out(sae)}-wide activations but {name_out} is "
                                   f"{layout.d_in} wide")
    if getattr(sae, "hook_z_reshaping_mode", False):
        raise InvalidArgumentError("this SAE reshapes [..., n_heads, d_head] inputs itself (hook_z reshaping), but "
                                   "the splice gives it [batch, n_tok, n_heads * d_head]: call "
                                   "sae.turn_off_forward_pass_hook_z_reshaping() first")
    if name_out == name_in:
        return tokens, layout, None
    order = _firing_order(model)
    if name_in in order and name_out in order and order.index(name_in) > order.index(name_out):
        raise InvalidArgumentError(f"the transcoder reads {name_in}, which fires after its output hook {name_out}: "
                                   "its input must come earlier in the forward pass")
    for name, layout_ in ((name_in, layout_in), (name_out, layout)):  # the same tokens on both hooks
        if not layout_.has_positions and tokens != "cls":
            raise InvalidArgumentError(f"{name} is the CLS token only (no token axis): use tokens='cls'")
    return tokens, layout, layout_in


def _check_free(model: nn.Module, name_in: str, name_out: str, replacing: Sequence[SAESplice] = ()) -> None:
    """Refuse to splice at hooks taken by other SAEs (except ``replacing``) or user hooks."""
    for splice in _splices(model):
        if any(splice is other for other in replacing):
            continue
        if splice.input_name == name_in:
            raise InvalidArgumentError(f"an SAE is already attached at {name_in}; detach_sae(model, {name_in!r}) first")
        if splice.layout.hook_name == name_out:
            raise InvalidArgumentError(f"an SAE ({splice.input_name}) already writes {name_out}; "
                                       f"detach_sae(model, {splice.input_name!r}) first")
        if name_in != name_out and splice.input_name == name_out and splice.input_layout is not None:
            raise InvalidArgumentError(f"the transcoder spliced at {splice.layout.hook_name} reads {name_out}, which "
                                       f"this SAE would write; detach_sae(model, {splice.input_name!r}) first")
        if name_in != name_out and splice.layout.hook_name == name_in:
            raise InvalidArgumentError(f"the transcoder's input {name_in} is spliced by the SAE at "
                                       f"{splice.input_name}; detach_sae(model, {splice.input_name!r}) first")
    current = model.hook_dict[name_out]
    if not isinstance(current, SAESplice) and current.has_hooks():
        raise InvalidArgumentError(f"{name_out} has hooks attached; remove them (model.reset_hooks()) before "
                                   "splicing an SAE")


def _conflicts(model: nn.Module, sae: SAE) -> list[SAESplice]:
    """The spliced SAEs that :meth:`SAEMixin.add_sae` replaces: the one keyed at ``sae``'s input
    hook and the one writing its output hook."""
    name_in, name_out = sae_hook_names(sae)
    return [s for s in _splices(model) if s.input_name == name_in or s.layout.hook_name == name_out]


def attach_sae(model: nn.Module, sae: SAE, *, use_error_term: bool = False, tokens: str | None = None) -> SAESplice:
    """Splice ``sae`` into ``model`` at its hook (``sae.cfg.metadata.hook_name``), at ``tokens``
    (default: ``metadata.tokens``), until :func:`detach_sae`. The SAE moves to the model's device
    and dtype. New hooks ``{hook}.hook_sae_{input,acts_pre,acts_post,recons,error,output}`` appear
    in ``model.hook_dict``. A transcoder is spliced at its output hook (``metadata.hook_name_out``,
    where its hooks appear) and reads its input hook through a permanent hook there."""
    tokens, layout, layout_in = _plan(model, sae, tokens)
    name_out = layout.hook_name
    name_in = name_out if layout_in is None else layout_in.hook_name
    _check_free(model, name_in, name_out)
    param = next(model.parameters())
    sae.to(device=param.device, dtype=param.dtype)
    current = model.hook_dict[name_out]
    splice = SAESplice(sae, layout, tokens, model.cfg.n_ctx, use_error_term, current, input_layout=layout_in)
    if layout_in is not None:
        point = model.hook_dict[name_in]
        point.add_hook(splice.capture_input, dir="fwd", is_permanent=True)
        splice.__dict__["capture_handle"] = point.fwd_hooks[-1]
    parent, attr = _module_at(model, name_out)
    setattr(parent, attr, splice)
    model.setup()
    return splice


def detach_sae(model: nn.Module, hook_name: str) -> SAE:
    """Remove the SAE spliced at ``hook_name`` (restoring the original HookPoint); returns it. For a
    transcoder, ``hook_name`` is its input hook (its ``acts_to_saes`` key) or its output hook; its
    capturing hook at the input hook is removed."""
    splices = _splices(model)
    splice = next((s for s in splices if s.input_name == hook_name), None)
    splice = splice or next((s for s in splices if s.layout.hook_name == hook_name), None)
    if splice is None:
        raise InvalidArgumentError(f"no SAE is attached at {hook_name!r}")
    handle = splice.__dict__["capture_handle"]
    if handle is not None:
        point = model.hook_dict[splice.input_name]
        handle.hook.remove()
        if handle in point.fwd_hooks:
            point.fwd_hooks.remove(handle)
        splice.__dict__["capture_handle"] = None
        splice.__dict__["captured"] = None
    parent, attr = _module_at(model, splice.layout.hook_name)
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
        detach_sae(model, splice.input_name)


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
    semantics, transcoders included; ``tokens`` overrides the SAE's token choice)."""

    @property
    def acts_to_saes(self) -> dict[str, SAE]:
        """Input hook name -> the SAE spliced there (a transcoder is keyed by the hook it reads)."""
        return {m.input_name: m.__dict__["sae"] for m in _splices(self)}

    def add_sae(self, sae: SAE, use_error_term: bool | None = None, exclude_special_tokens: bool | list[int] = False,
                tokens: str | None = None) -> None:
        """Splice ``sae`` in at its hook until :meth:`reset_saes` (replacing an SAE keyed at the same
        input hook or writing the same output hook). ``use_error_term=None`` keeps the SAE's own
        ``use_error_term``."""
        _check_no_special_tokens(exclude_special_tokens)
        _, layout, layout_in = _plan(self, sae, tokens)  # every check before anything changes
        replacing = _conflicts(self, sae)
        _check_free(self, (layout_in or layout).hook_name, layout.hook_name, replacing)
        for splice in replacing:
            detach_sae(self, splice.input_name)
        attach_sae(self, sae, use_error_term=sae.use_error_term if use_error_term is None else use_error_term,
                   tokens=tokens)

    def reset_saes(self, act_names: str | Sequence[str] | None = None) -> None:
        """Remove the SAEs at ``act_names`` (their input hooks, the keys of :attr:`acts_to_saes`;
        default: all)."""
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
        previous: list[tuple[str, list[SAESplice]]] = []
        try:
            for sae in saes:
                replaced = _conflicts(self, sae)
                self.add_sae(sae, use_error_term=use_error_term, tokens=tokens)
                previous.append((sae_hook_names(sae)[0], replaced))
            yield self
        finally:
            if reset_saes_end:
                for name_in, replaced in reversed(previous):
                    if name_in in self.acts_to_saes:
                        detach_sae(self, name_in)
                    for splice in replaced:
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
