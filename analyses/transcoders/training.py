"""Training a transcoder on activations streamed from the model.

The stream: each forward of ``images_per_forward`` training images (drawn epoch by epoch in a
seeded order) caches every layer's input and MLP output at once (one ``run_with_cache`` with a
names filter); its tokens are shuffled and cut into ``forward_tokens // train_batch_size`` training
batches. Step ``s`` therefore always sees the same batch, so a resumed training continues the
stream exactly where the checkpoint left it. Under ``torchrun`` (:mod:`analyses.common.data_parallel`)
process ``rank`` of ``world`` takes the forwards ``rank, rank + world, ...`` of that order and the
processes average their gradients: ``world`` times the tokens per step, the same weights everywhere.

The loss per step: the sum over layers of the normalised MSE (the batch's fraction of variance
unexplained), plus for JumpReLU the sparsity penalty (``tanh(c * z * |W_dec|)`` or the L0, ramped
up linearly over a warm-up) and for TopK/AbsTopK the AuxK loss of Gao et al. (2024): the largest
``aux_k`` dead latents (no firing for ``dead_steps`` steps) reconstruct the remaining error.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from analyses.transcoders.clt import (
    OUTPUT_HOOK,
    CrossLayerTranscoder,
    HeavisideFunction,
    topk_pairs,
)
from analyses.common.data_parallel import DataParallel
from hooked_vit.errors import CheckpointMismatchError, check

CHECKPOINT_FILE = "checkpoint.pt"
ONE_PROCESS = DataParallel()
FINAL_DIR = "final"
TRAINING_FILE = "training.json"


def layer_batches(model: Any, images: Float[Tensor, "batch channel height width"], input_hook: str
                  ) -> tuple[Float[Tensor, "tokens n_layers d_model"], Float[Tensor, "tokens n_layers d_model"]]:
    """Every layer's ``input_hook`` and ``hook_mlp_out`` for all tokens of ``images``, from one forward."""
    n_layers = model.cfg.n_layers
    inputs = [f"blocks.{l}.{input_hook}" for l in range(n_layers)]
    outputs = [f"blocks.{l}.{OUTPUT_HOOK}" for l in range(n_layers)]
    wanted = set(inputs) | set(outputs)
    with torch.no_grad():
        _, cache = model.run_with_cache(images, names_filter=lambda name: name in wanted, return_type=None)
    x = torch.stack([cache[name] for name in inputs], dim=2)
    y = torch.stack([cache[name] for name in outputs], dim=2)
    return x.flatten(0, 1), y.flatten(0, 1)


def token_stream(model: Any, dataset: Any, config: Any, input_hook: str, start_step: int = 0,
                 device: torch.device | None = None, *, rank: int = 0, world: int = 1
                 ) -> Iterator[tuple[Tensor, Tensor]]:
    """``(inputs, targets)`` ``[train_batch_size, n_layers, d_model]`` for steps ``start_step, ...``
    of process ``rank`` of ``world`` (see the module docstring; deterministic in ``config.seed``)."""
    n_images, per_forward = len(dataset), min(config.images_per_forward, len(dataset))
    per = _batches_per_forward(model, config, per_forward)
    forwards_per_epoch = n_images // per_forward
    step = start_step
    while True:
        forward = step // per
        epoch, slot = divmod(forward * world + rank, forwards_per_epoch)
        order = torch.randperm(n_images, generator=torch.Generator().manual_seed(config.seed * 1_000_003 + epoch))
        images, _ = dataset.subset(order[slot * per_forward:(slot + 1) * per_forward]).tensors(show_progress=False)
        x, y = layer_batches(model, images.to(device), input_hook)
        shuffle = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(
            config.seed * 7919 + forward * world + rank))
        x, y = x[shuffle.to(x.device)], y[shuffle.to(x.device)]
        for index in range(step - forward * per, per):
            part = slice(index * config.train_batch_size, (index + 1) * config.train_batch_size)
            yield x[part], y[part]
            step += 1


def _batches_per_forward(model: Any, config: Any, per_forward: int) -> int:
    tokens = per_forward * (model.cfg.n_patches + model.cfg.n_prefix_tokens)
    per = tokens // config.train_batch_size
    check(per >= 1, f"one forward of {per_forward} images gives {tokens} tokens, fewer than train_batch_size="
                    f"{config.train_batch_size}: raise images_per_forward")
    return per


def fvu(pred: Float[Tensor, "tokens n_layers d_model"], target: Float[Tensor, "tokens n_layers d_model"]
        ) -> Float[Tensor, "n_layers"]:
    """Per layer, the fraction of variance unexplained: ``sum |y - pred|^2 / sum |y - mean(y)|^2``
    over the tokens."""
    error = (target - pred).pow(2).sum(dim=(0, 2))
    variance = (target - target.mean(0, keepdim=True)).pow(2).sum(dim=(0, 2))
    return error / variance.clamp_min(1e-12)


def step_loss(clt: CrossLayerTranscoder, x: Float[Tensor, "tokens n_layers d_model"],
              y: Float[Tensor, "tokens n_layers d_model"], config: Any, step: int,
              since_fired: Float[Tensor, "n_layers d_latent"], *, processes: DataParallel = ONE_PROCESS
              ) -> tuple[Float[Tensor, ""], dict[str, Any]]:
    """The training loss of one batch ``x``/``y`` ``[tokens, n_layers, d_model]`` and its parts;
    updates ``since_fired`` ``[n_layers, d_latent]`` (steps since each latent last fired on any of
    the ``processes``). TopK codes decode sparsely (:meth:`CrossLayerTranscoder.decode_sparse`),
    JumpReLU codes densely."""
    n_layers, n_latent = clt.n_layers, clt.d_latent
    pre = torch.einsum("nld,lfd->nlf", x, clt.W_enc) + clt.b_enc
    inputs = {l: x[:, l] for l in range(n_layers)}
    parts: dict[str, Any] = {}
    if clt.activation == "jumprelu":
        codes = {l: clt.sparsify(l, pre[:, l]) for l in range(n_layers)}
        pred = torch.stack([clt.decode_layer(l, codes, inputs) for l in range(n_layers)], dim=1)
        fired = torch.stack([(codes[l] != 0).any(0) for l in range(n_layers)])
        parts["l0"] = sum((codes[l] != 0).sum(-1).float().mean().item() for l in range(n_layers)) / n_layers
    else:
        values, indices = topk_pairs(pre, clt.k, signed=clt.activation == "abstopk")
        pred = clt.decode_sparse(values, indices, x)
        fired = torch.zeros(n_layers * n_latent, dtype=torch.bool, device=x.device)
        offsets = torch.arange(n_layers, device=x.device)[None, :, None] * n_latent
        fired[(indices + offsets)[values != 0]] = True
        fired = fired.reshape(n_layers, n_latent)
        parts["l0"] = (values != 0).sum(-1).float().mean().item()
    per_layer = fvu(pred, y)
    loss = per_layer.sum()
    since_fired.add_(1).masked_fill_(processes.any_(fired), 0)
    parts["fvu"] = per_layer.detach().mean().item()
    if clt.activation == "jumprelu":
        warm = config.sparsity_warmup_fraction * config.steps
        weight = config.sparsity_coefficient * (min(1.0, (step + 1) / warm) if warm > 0 else 1.0)
        if config.sparsity_penalty == "tanh":
            norms = torch.stack([clt.W_dec[l].pow(2).sum(dim=(1, 2)).sqrt() for l in range(n_layers)])
            penalty = sum(torch.tanh(config.tanh_scale * codes[l].abs() * norms[l]).sum(-1).mean()
                          for l in range(n_layers))
        else:
            penalty = sum(HeavisideFunction.apply(pre[:, l], clt.threshold[l], clt.bandwidth).sum(-1).mean()
                          for l in range(n_layers))
        loss = loss + weight * penalty
        parts["sparsity"] = penalty.item()
    elif config.aux_k_coefficient > 0:
        dead = since_fired > config.dead_steps
        n_dead = int(dead.sum(-1).min())
        if n_dead:
            fill = float("-inf") if clt.activation == "topk" else 0.0
            values, indices = topk_pairs(pre.masked_fill(~dead, fill), min(config.aux_k or max(1, clt.d_model // 2),
                                                                           n_dead), signed=clt.activation == "abstopk")
            aux = fvu(clt.decode_sparse(values, indices, affine=False), (y - pred).detach()).sum()
            loss = loss + config.aux_k_coefficient * aux
            parts["aux"] = aux.item()
        parts["dead"] = dead.float().mean().item()
    parts["loss"] = loss.item()
    return loss, parts


def lr_factor(step: int, config: Any) -> float:
    """Constant, then a linear decay to 0 over the last ``lr_decay_fraction`` of the steps."""
    decay = config.lr_decay_fraction * config.steps
    start = config.steps - decay
    return 1.0 if step < start or decay <= 0 else max(0.0, (config.steps - step) / decay)


def train_clt(model: Any, train: Any, config: Any, *, kind: str = "clt", out_dir: str | os.PathLike | None = None,
              device: str | torch.device | None = None, progress: bool = True,
              distributed: bool | None = None) -> CrossLayerTranscoder:
    """A transcoder of ``kind`` (``clt``; ``plt`` per-layer transcoders; ``sae`` per-layer SAEs on the
    MLP outputs) trained on ``model``'s activations over ``train`` (a
    :class:`~hooked_vit.data.LabelledImages`) as ``config`` (a :class:`CLTConfig`) says. With
    ``out_dir``: a checkpoint every ``checkpoint_every`` steps (a killed training resumes from it),
    the finished transcoder in ``<out_dir>/final`` (loaded instead of trained again) and
    ``training.json`` (losses, seconds). The parameter count and memory are printed first.
    ``distributed`` (default: whenever launched by ``torchrun`` with several processes): every
    process of the ``torchrun`` calls this and they train one transcoder data-parallel (see
    :mod:`analyses.common.data_parallel`); rank 0 writes the checkpoints and files, a resumed
    training continues from the last checkpoint on every process."""
    from hooked_vit import atomic
    from hooked_vit.data.loaders import resolve_device
    from hooked_vit.reading import torch_load

    check(len(train) >= 1, "train holds no images: pass a non-empty LabelledImages (e.g. the train split)")
    processes = DataParallel.start(distributed)
    device = resolve_device(device if device is not None else getattr(config, "device", None))
    out = Path(out_dir) if out_dir is not None else None
    if out is not None and (out / FINAL_DIR / "config.json").is_file():
        return CrossLayerTranscoder.load(out / FINAL_DIR, device)
    torch.manual_seed(config.seed)
    clt = CrossLayerTranscoder.for_model(model, kind=kind, expansion_factor=config.expansion_factor,
                                         activation=config.activation, k=config.k, skip=config.skip,
                                         threshold_init=config.threshold_init, bandwidth=config.bandwidth,
                                         seed=config.seed).to(device)
    optimizer = torch.optim.Adam([p for p in clt.parameters() if p.requires_grad], lr=config.lr)
    since_fired = torch.zeros(clt.n_layers, clt.d_latent, device=device)
    identity = {"kind": kind, "clt": clt.config(), "model_key": _model_key(model), "processes": processes.world,
                "training": {k: getattr(config, k) for k in TRAINING_FIELDS}}
    start, history, seconds, scales = 0, [], 0.0, None
    if out is not None and (out / CHECKPOINT_FILE).is_file():
        saved = torch_load(out / CHECKPOINT_FILE, "a transcoder training checkpoint", f"delete {out} to train again")
        if saved["identity"] != identity:
            raise CheckpointMismatchError(f"the checkpoint in {out} was made with other settings or weights; delete "
                                          "the folder to train again, or use another output folder")
        clt.load_state_dict(saved["clt"])
        optimizer.load_state_dict(saved["optimizer"])
        since_fired, start, history, seconds = saved["since_fired"].to(device), saved["step"], saved["history"], \
            saved["seconds"]
        scales = tuple(s.to(device) for s in saved["scales"])
    if processes.is_main:
        print(f"{kind}: {clt.describe()}; {config.steps} steps of {config.train_batch_size} tokens"
              + (f" on each of {processes.world} processes" if processes.world > 1 else "")
              + (f", resuming at step {start}" if start else ""))
    stream = token_stream(model, train, config, clt.input_hook, start, device, rank=processes.rank,
                          world=processes.world)
    began = time.perf_counter()
    from hooked_vit.data import progress as bar

    for step in bar(range(start, config.steps), desc=f"training {kind}", total=config.steps - start,
                    enabled=progress and processes.is_main):
        x, y = next(stream)
        if scales is None:  # inputs and targets of each layer trained at unit RMS, folded in at the end
            squares = [x.pow(2).mean(dim=(0, 2)), y.pow(2).mean(dim=(0, 2))]
            processes.mean_(squares)
            scales = (squares[0].sqrt(), squares[1].sqrt())
        x, y = x / scales[0][:, None], y / scales[1][:, None]
        if step == 0:  # decoder biases start at the targets' mean
            with torch.no_grad():
                mean = y.mean(0)
                processes.mean_([mean])
                clt.b_dec.copy_(mean)
        for group in optimizer.param_groups:
            group["lr"] = config.lr * lr_factor(step, config)
        loss, parts = step_loss(clt, x, y, config, step, since_fired, processes=processes)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        processes.mean_gradients_(clt.parameters())
        optimizer.step()
        if step % max(1, config.steps // 50) == 0 or step == config.steps - 1:
            history.append({"step": step, **{k: round(v, 6) for k, v in parts.items()}})
        done = step + 1
        if out is not None and processes.is_main and done < config.steps and done % config.checkpoint_every == 0:
            atomic.torch_save({"identity": identity, "clt": clt.state_dict(), "optimizer": optimizer.state_dict(),
                               "since_fired": since_fired, "step": done, "history": history, "scales": scales,
                               "seconds": seconds + time.perf_counter() - began}, out / CHECKPOINT_FILE)
    seconds += time.perf_counter() - began
    if scales is not None:
        clt.fold_scales(*scales)
    if out is not None and processes.is_main:
        clt.save(out / FINAL_DIR)
        atomic.write_json(out / TRAINING_FILE, {"kind": kind, "seconds": seconds, "steps": config.steps,
                                                "parameters": clt.n_parameters(), "history": history,
                                                **identity})
        (out / CHECKPOINT_FILE).unlink(missing_ok=True)
    processes.barrier()  # the files exist for every process once it returns
    clt.training_history = history
    clt.training_seconds = seconds
    return clt.eval()


TRAINING_FIELDS: tuple[str, ...] = (
    "activation", "k", "expansion_factor", "skip", "steps", "train_batch_size", "images_per_forward", "lr",
    "lr_decay_fraction", "sparsity_penalty", "sparsity_coefficient", "sparsity_warmup_fraction", "tanh_scale",
    "threshold_init", "bandwidth", "aux_k", "aux_k_coefficient", "dead_steps", "seed", "train_split")


def _model_key(model: Any) -> str:
    from analyses.common.ablation import model_key

    return model_key(model)


__all__ = ["CHECKPOINT_FILE", "FINAL_DIR", "TRAINING_FIELDS", "TRAINING_FILE", "fvu", "layer_batches",
           "lr_factor", "step_loss", "token_stream", "train_clt"]
