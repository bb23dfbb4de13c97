"""The replacement model's SAEs: sae-lens TopK (or BatchTopK) SAEs, one on the residual stream after
every block but the last, trained together from one model forward per batch.

Inputs are standardised per token as the reference does (``(x - mean) / (std + 1e-5)``, the
unbiased std over ``d_model``), which is exactly sae-lens's ``normalize_activations="layer_norm"``:
the training SAEs (``normalize_activations="none"``) see standardised tokens, and the inference
SAEs they become carry ``"layer_norm"``, so ``sae.decode(sae.encode(x))`` reconstructs the raw
activations. Decoder rows are kept at unit norm after every step (the reference's
``make_decoder_weights_and_grad_unit_norm``); dead latents (no firing for ``dead_steps`` steps)
train on the residual through sae-lens's AuxK loss. Under ``torchrun`` (a process group of more than
one process) every process trains on its share of each step's images and the gradients are
averaged over the processes before every step, so all processes hold the same SAEs.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn
from torch.nn import functional as F

os.environ.setdefault("WANDB_MODE", "disabled")  # sae-lens imports wandb; never log to it from here

from sae_lens import SAE
from sae_lens.saes.batchtopk_sae import BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig
from sae_lens.saes.sae import TrainingSAE, TrainStepInput
from sae_lens.saes.topk_sae import TopK, TopKTrainingSAE, TopKTrainingSAEConfig

from analyses.common.data_parallel import DataParallel
from hooked_vit import atomic
from hooked_vit.errors import InvalidArgumentError, check

LN_EPS = 1e-5  # sae-lens's layer_norm and the reference's input_unit_norm


def standardize(x: Float[Tensor, "*tokens d"], *, detach_std: bool = False
                ) -> tuple[Float[Tensor, "*tokens d"], Float[Tensor, "*tokens 1"], Float[Tensor, "*tokens 1"]]:
    """Per-token standardisation ``((x - mu) / (std + 1e-5), mu, std)``, as sae-lens's
    ``layer_norm`` (``detach_std``: the std is a constant for gradients, as in the reference's edges)."""
    mu = x.mean(dim=-1, keepdim=True)
    centred = x - mu
    std = centred.std(dim=-1, keepdim=True)
    if detach_std:
        std = std.detach()
    return centred / (std + LN_EPS), mu, std


def resid_hooks(model: nn.Module) -> list[str]:
    """The replaced hooks: ``blocks.l.hook_resid_post`` for every block but the last."""
    check(model.cfg.n_layers >= 2, f"a replacement model needs at least 2 blocks, the model has {model.cfg.n_layers}")
    return [f"blocks.{layer}.hook_resid_post" for layer in range(model.cfg.n_layers - 1)]


def encode_latents(sae: SAE, x: Float[Tensor, "*tokens d"], *, detach_std: bool = False) -> Float[Tensor, "*tokens f"]:
    """``sae.encode(x)`` of a ``layer_norm`` SAE written out (differentiable, hooks-free), with the
    standardisation's std optionally held constant."""
    xs, _, _ = standardize(x, detach_std=detach_std)
    hidden = (xs - sae.b_dec * sae.cfg.apply_b_dec_to_input) @ sae.W_enc + sae.b_enc
    acts = sae.activation_fn(hidden)
    if hasattr(sae, "threshold"):  # JumpReLU (the inference form of BatchTopK)
        acts = acts * (hidden > sae.threshold).to(acts.dtype)
    return acts


def decode_latents(sae: SAE, z: Float[Tensor, "*tokens f"], mu: Float[Tensor, "*tokens 1"],
                   std: Float[Tensor, "*tokens 1"]) -> Float[Tensor, "*tokens d"]:
    """The raw-space reconstruction ``(z W_dec + b_dec) * std + mu``."""
    return (z @ sae.W_dec + sae.b_dec) * std + mu


def reconstruct(sae: SAE, x: Float[Tensor, "*tokens d"]) -> Float[Tensor, "*tokens d"]:
    """``sae.decode(sae.encode(x))`` fused: for a TopK SAE the decoder sums only the ``k`` rows each
    token selects (an ``embedding_bag``) instead of multiplying the mostly-zero code by the whole
    decoder; other SAEs go through sae-lens."""
    if not isinstance(sae.activation_fn, TopK) or sae.cfg.rescale_acts_by_decoder_norm \
            or sae.cfg.normalize_activations != "layer_norm":
        return sae.decode(sae.encode(x))
    xs, mu, std = standardize(x)
    hidden = (xs - sae.b_dec * sae.cfg.apply_b_dec_to_input) @ sae.W_enc + sae.b_enc
    values, indices = hidden.topk(sae.activation_fn.k, dim=-1, sorted=False)
    k = indices.shape[-1]
    rows = F.embedding_bag(indices.reshape(-1, k), sae.W_dec, per_sample_weights=values.relu().reshape(-1, k), mode="sum")
    return (rows.reshape(x.shape) + sae.b_dec) * std + mu


def training_sae(architecture: str, d_in: int, d_sae: int, k: int, aux_coefficient: float, device: str,
                 seed: int) -> TrainingSAE:
    """A sae-lens training SAE on standardised inputs: unit-norm decoder rows, encoder its transpose."""
    common = {"d_in": d_in, "d_sae": d_sae, "k": k, "aux_loss_coefficient": aux_coefficient,
              "rescale_acts_by_decoder_norm": False, "decoder_init_norm": None, "normalize_activations": "none",
              "device": device}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if architecture == "topk":
            sae = TopKTrainingSAE(TopKTrainingSAEConfig(**common))
        elif architecture == "batchtopk":
            sae = BatchTopKTrainingSAE(BatchTopKTrainingSAEConfig(**common))
        else:
            raise InvalidArgumentError(f"architecture must be topk or batchtopk, got {architecture!r}")
    with torch.no_grad():
        sae.W_dec /= sae.W_dec.norm(dim=-1, keepdim=True)
    return sae


def inference_sae(sae: TrainingSAE, hook_name: str, model_name: str | None) -> SAE:
    """The sae-lens inference SAE of a training SAE, with ``normalize_activations="layer_norm"`` so it
    reads and writes raw activations (TopK stays TopK; BatchTopK becomes sae-lens's JumpReLU)."""
    state = {k: v.detach().clone() for k, v in sae.state_dict().items()}
    sae.process_state_dict_for_saving_inference(state)
    cfg = sae.cfg.get_inference_sae_cfg_dict()
    cfg["normalize_activations"] = "layer_norm"
    cfg["metadata"] = {**cfg.get("metadata", {}), "hook_name": hook_name, "model_name": model_name}
    device, cfg["device"] = cfg.get("device", "cpu"), "cpu"
    out = SAE.from_dict(cfg)
    out.process_state_dict_for_loading(state)
    out.load_state_dict(state)
    out.cfg.device = device
    return out.to(device).eval()


@dataclass
class TrainingState:
    """Where joint training stands: the training SAEs, their optimizer, steps done, steps since
    each latent fired (per SAE) and the log."""

    saes: list[TrainingSAE]
    optimizer: torch.optim.Optimizer
    step: int
    since_fired: list[Tensor]
    log: list[dict[str, Any]]

    def state_dict(self, identity: dict[str, Any]) -> dict[str, Any]:
        return {"identity": identity, "step": self.step, "saes": [s.state_dict() for s in self.saes],
                "optimizer": self.optimizer.state_dict(), "since_fired": self.since_fired, "log": self.log}

    def load(self, saved: dict[str, Any]) -> None:
        for sae, state in zip(self.saes, saved["saes"]):
            sae.load_state_dict(state)
        self.optimizer.load_state_dict(saved["optimizer"])
        self.step, self.since_fired, self.log = int(saved["step"]), list(saved["since_fired"]), list(saved["log"])


def batch_indices(n: int, step: int, batch: int, seed: int) -> Int[Tensor, "n_batch"]:
    """The images of training step ``step``: consecutive slices of a seeded permutation per epoch
    (a function of the step alone, so a resumed run sees the same stream)."""
    per_epoch = max(n // batch, 1)
    epoch, position = divmod(step, per_epoch)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
    return order[position * batch:(position + 1) * batch] if n >= batch else order


def lr_factor(step: int, steps: int, decay: float) -> float:
    """The learning-rate factor of step ``step`` of ``steps``: 1, then linear to 0 over the last
    ``decay`` fraction of the steps."""
    tail = decay * steps
    return 1.0 if tail <= 0 else min(1.0, (steps - step) / tail)


def capture_resid(model: nn.Module, images: Float[Tensor, "batch channel height width"],
                  hooks: Sequence[str]) -> list[Float[Tensor, "batch pos d_model"]]:
    """The residual stream at ``hooks`` from one forward that stops before the last block."""
    seen: dict[str, Tensor] = {}

    def keep(value: Tensor, hook: Any) -> None:
        seen[hook.name] = value.detach()

    with model.hooks(fwd_hooks=[(name, keep) for name in hooks]):
        model(images, stop_at_layer=model.cfg.n_layers - 1)
    return [seen[name] for name in hooks]


def train_saes(
    model: nn.Module,
    dataset: Any,
    layer_settings: Sequence[tuple[int, float]],
    *,
    architecture: str = "topk",
    steps: int = 1500,
    batch_images: int = 32,
    lr: float = 1e-3,
    aux_coefficient: float = 1 / 32,
    dead_steps: int = 60,
    lr_decay: float = 0.0,
    cls_repeats: int = 1,
    seed: int = 0,
    checkpoint: str | os.PathLike | None = None,
    checkpoint_every: int = 250,
    log_every: int = 50,
    identity: dict[str, Any] | None = None,
    distributed: bool = True,
) -> tuple[dict[str, SAE], list[dict[str, Any]], float]:
    """Train one SAE per :func:`resid_hooks` hook (settings ``(k, expansion)`` each) on ``dataset``
    (items ``(image, label)``): each step runs the model once on ``batch_images`` images and steps
    every SAE on all their tokens (one Adam over all SAEs; per-parameter, so as separate optimizers),
    the CLS token (position 0) counted ``cls_repeats`` times; the learning rate decays linearly to 0
    over the last ``lr_decay`` fraction of the steps. Under ``torchrun`` each process takes every
    world-th image of a step and the gradients are averaged (see the module docstring; with
    ``distributed=False`` this process trains alone, for a call only one process makes). With
    ``checkpoint`` (a file) the state is saved (by the first process) every ``checkpoint_every``
    steps and a run with the same ``identity`` there resumes from it. Returns the inference SAEs by
    hook, the log and the seconds this call took."""
    started = time.perf_counter()
    hooks = resid_hooks(model)
    check(len(layer_settings) == len(hooks), f"layer_settings holds {len(layer_settings)} entries, the model has "
                                             f"{len(hooks)} replaced layers")
    check(len(dataset) >= 1, "the training split is empty")
    check(0.0 <= lr_decay <= 1.0, f"lr_decay must lie in [0, 1] (a fraction of the steps), got {lr_decay!r}")
    check(isinstance(cls_repeats, int) and cls_repeats >= 1, f"cls_repeats must be a whole number >= 1, got {cls_repeats!r}")
    parallel = DataParallel.start(None if distributed else False)
    check(batch_images >= parallel.world,
          f"batch_images ({batch_images}) must be at least the number of processes ({parallel.world})")
    device = str(next(model.parameters()).device)
    d = model.cfg.d_model
    saes = []
    for layer, (k, expansion) in enumerate(layer_settings):
        d_sae = max(1, round(expansion * d))
        check(k <= d_sae, f"layer {layer}: k={k} exceeds the dictionary size {d_sae} ({expansion:g} x {d})")
        saes.append(training_sae(architecture, d, d_sae, k, aux_coefficient, device, seed + layer))
    parameters = [p for s in saes for p in s.parameters()]
    optimizer = torch.optim.Adam(parameters, lr=lr, betas=(0.9, 0.999))
    state = TrainingState(saes, optimizer, 0, [torch.zeros(s.cfg.d_sae, device=device) for s in saes], [])
    identity = {"layer_settings": [list(map(float, s)) for s in layer_settings], "architecture": architecture,
                "lr": lr, "aux_coefficient": aux_coefficient, "dead_steps": dead_steps, "seed": seed,
                "batch_images": batch_images, "lr_decay": lr_decay, "cls_repeats": cls_repeats, **(identity or {})}
    path = Path(checkpoint) if checkpoint is not None else None
    if path is not None and path.is_file():
        saved = torch.load(path, map_location=device, weights_only=False)
        if saved.get("identity") == identity:
            state.load(saved)
    model.eval()
    for sae in saes:
        sae.train()
    while state.step < steps:
        idx = batch_indices(len(dataset), state.step, batch_images, seed)[parallel.rank::parallel.world]
        for group in optimizer.param_groups:
            group["lr"] = lr * lr_factor(state.step, steps, lr_decay)
        images = torch.stack([dataset[int(i)][0] for i in idx]).to(device)
        with torch.no_grad():
            acts = capture_resid(model, images, hooks)
        total = 0.0
        record: dict[str, Any] = {"step": state.step + 1}
        optimizer.zero_grad(set_to_none=True)
        for layer, (sae, x) in enumerate(zip(saes, acts)):
            tokens = x.reshape(-1, d) if cls_repeats == 1 else torch.cat([x.reshape(-1, d)] + [x[:, 0]] * (cls_repeats - 1))
            xs, _, _ = standardize(tokens)
            dead = state.since_fired[layer] >= dead_steps
            output = sae.training_forward_pass(TrainStepInput(sae_in=xs, coefficients={}, dead_neuron_mask=dead,
                                                              n_training_steps=state.step, is_logging_step=False))
            total = total + output.loss
            with torch.no_grad():
                fired = parallel.any_((output.feature_acts > 0).any(dim=0))  # fired in any process
                state.since_fired[layer] = torch.where(fired, 0.0, state.since_fired[layer] + 1)
                if (state.step + 1) % log_every == 0 or state.step + 1 == steps:
                    fve = 1 - (output.sae_out - xs).pow(2).sum() / (xs - xs.mean(0)).pow(2).sum()
                    record[f"fve_std_{layer}"] = float(fve)
                    record[f"dead_{layer}"] = int(dead.sum())
        total.backward()
        parallel.mean_gradients_(parameters)
        optimizer.step()
        with torch.no_grad():
            for sae in saes:
                sae.W_dec /= sae.W_dec.norm(dim=-1, keepdim=True)
        state.step += 1
        if len(record) > 1:
            record["loss"] = float(total.detach())
            record["seconds"] = round(time.perf_counter() - started, 2)
            state.log.append(record)
        if path is not None and parallel.is_main and (state.step % checkpoint_every == 0 or state.step == steps):
            atomic.torch_save(state.state_dict(identity), path)
    model_name = getattr(model.cfg, "model_name", None)
    out = {hook: inference_sae(sae.eval(), hook, model_name) for hook, sae in zip(hooks, saes)}
    return out, state.log, time.perf_counter() - started


__all__ = ["LN_EPS", "capture_resid", "decode_latents", "encode_latents", "inference_sae",
           "lr_factor", "reconstruct", "resid_hooks", "standardize", "train_saes", "training_sae"]
