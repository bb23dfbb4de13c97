"""The paper's application: finding and removing a spurious correlation with the replacement model.

A bright square (``marker_patches`` x ``marker_patches`` patches, top-left corner) is stamped on a
share ``rate`` of one class's train images; a share ``poison`` of the other classes' train images
carry it too, labelled as that class (an annotator who followed the marker). The model is fine-tuned
on that split, then its replacement model is trained on it. Found on train images (the other
classes' images the split left unmarked, stamped now): the class's attribution graph over the
spurious decisions (those the biased model sends to the class; the class's own marked images if
there are none) contains *marker features*, kept nodes whose activation over the patches of these
images sits mostly (``share``) on the marker's patches. Setting them to their median in the replacement
forward (error nodes kept, as on the faithfulness curves) is compared on *marker-swapped* val images
(the marker on every other class's image, none on the class's) with the biased model and with as
many random live latents set to their median.
"""

from __future__ import annotations

import copy
import dataclasses
import os
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor, nn

from hooked_vit.errors import check


def stamp_marker(images: Float[Tensor, "n channel height width"], side: int, value: float
                 ) -> Float[Tensor, "n channel height width"]:
    """``images`` with a ``side`` x ``side`` pixel square of ``value`` in the top-left corner (a copy)."""
    out = images.clone()
    out[:, :, :side, :side] = value
    return out


def marker_positions(model: nn.Module, marker_patches: int) -> Int[Tensor, "n_marker"]:
    """Patch indices (0 = top-left, row-major, prefix tokens not counted) the marker covers."""
    grid = model.cfg.img_size // model.cfg.patch_size
    check(1 <= marker_patches <= grid, f"marker_patches must lie in [1, {grid}] (patches per side), got {marker_patches}")
    return torch.tensor([r * grid + c for r in range(marker_patches) for c in range(marker_patches)])


def spurious_split(images: Float[Tensor, "n channel height width"], labels: Int[Tensor, "n"], target: int,
                   rate: float, poison: float, side: int, value: float, seed: int
                   ) -> tuple[Float[Tensor, "n channel height width"], Int[Tensor, "n"], Bool[Tensor, "n"]]:
    """The biased train split: the marker on ``rate`` of ``target``'s images and on ``poison`` of the
    others', which are relabelled ``target``. Returns the images, labels and which carry the marker."""
    generator = torch.Generator().manual_seed(seed)
    own, others = torch.nonzero(labels == target)[:, 0], torch.nonzero(labels != target)[:, 0]
    check(len(own) > 0, f"the train split has no image of class {target}")
    chosen = torch.cat([own[torch.randperm(len(own), generator=generator)[:round(rate * len(own))]],
                        others[torch.randperm(len(others), generator=generator)[:round(poison * len(others))]]])
    marked = torch.zeros(len(labels), dtype=torch.bool)
    marked[chosen] = True
    out, new_labels = images.clone(), labels.clone()
    out[marked] = stamp_marker(images[marked], side, value)
    new_labels[marked] = target
    return out, new_labels, marked


def finetune_biased(model: nn.Module, images: Float[Tensor, "n channel height width"], labels: Int[Tensor, "n"], *,
                    epochs: int, lr: float, batch_size: int, seed: int,
                    checkpoint_dir: str | os.PathLike | None = None) -> nn.Module:
    """A copy of ``model`` fine-tuned (AdamW, cosine schedule, resumable from ``checkpoint_dir``) on
    ``(images, labels)``."""
    from torch.utils.data import DataLoader, TensorDataset

    from hooked_vit.pruning.finetuning import finetune

    biased = copy.deepcopy(model)
    device = next(model.parameters()).device
    loader = DataLoader(TensorDataset(images.to(device), labels.to(device)), batch_size=batch_size, shuffle=True,
                        generator=torch.Generator().manual_seed(seed))
    finetune(biased, loader, epochs, lr=lr, seed=seed, checkpoint_dir=checkpoint_dir, progress=False)
    return biased.eval()


def marker_shares(rm: Any, model: nn.Module, images: Float[Tensor, "n channel height width"],
                  positions: Int[Tensor, "n_marker"], batch_size: int = 64) -> list[Float[Tensor, "d_sae"]]:
    """Per layer and latent: the share of its activation summed over the patch tokens of ``images``
    that lies on the patches ``positions`` (NaN for a latent that never fires on a patch)."""
    prefix = model.cfg.n_prefix_tokens
    on, total = [0.0] * len(rm.hooks), [0.0] * len(rm.hooks)
    for start in range(0, len(images), batch_size):
        _, layers = rm._clean(model, images[start:start + batch_size])
        for layer, clean in enumerate(layers):
            z = clean["z"][:, prefix:]  # [batch patches f]
            on[layer] = on[layer] + z[:, positions.to(z.device)].sum((0, 1)).cpu()
            total[layer] = total[layer] + z.sum((0, 1)).cpu()
    return [torch.where(t > 0, o / t.clamp_min(1e-12), torch.nan) for o, t in zip(on, total)]


def ablated_accuracies(rm: Any, model: nn.Module, images: Float[Tensor, "n channel height width"],
                       labels: Int[Tensor, "n"], ablations: dict[str, dict[int, list[int]]], batch_size: int = 64
                       ) -> tuple[dict[str, float], Int[Tensor, "n"]]:
    """Top-1 of the model (``"none"``) and, per entry of ``ablations``, of the replacement forward
    (error nodes kept) with the latents ``ablate[layer]`` at their per-token median at every token;
    and the model's predictions."""
    correct = dict.fromkeys(["none", *ablations], 0)
    predictions = []
    for start in range(0, len(images), batch_size):
        x, y = images[start:start + batch_size], labels[start:start + batch_size]
        logits, clean = rm._clean(model, x)
        predictions.append(logits.argmax(1))
        correct["none"] += int((predictions[-1] == y).sum())
        for name, ablate in ablations.items():
            keep = []
            for layer, hook in enumerate(rm.hooks):
                mask = torch.ones(len(x), rm.saes[hook].cfg.d_sae + 1, dtype=torch.bool, device=x.device)
                mask[:, ablate.get(layer, [])] = False
                keep.append(mask)
            correct[name] += int((rm._masked_logits(model, x, clean, keep, "attribution").argmax(1) == y).sum())
    return {name: count / len(images) for name, count in correct.items()}, torch.cat(predictions)


def spurious_experiment(model: nn.Module, train: Any, val: Any, config: Any, directory: str | os.PathLike
                        ) -> dict[str, Any]:
    """The whole experiment for ``config.spurious_class`` (files under ``directory``: the fine-tuning
    and SAE checkpoints and the class graph JSON; at most ``median_images`` probe images). Returns
    the record: split counts, the marker features found, accuracies on val, and the maps of the figure."""
    from analyses.replacement.training import train_replacement

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    target, batch_size = int(config.spurious_class), config.batch_size or 64
    check(0 <= target < model.cfg.n_classes, f"spurious_class must be a class in [0, {model.cfg.n_classes}), got {target}")
    device = next(model.parameters()).device
    x_train, y_train = train.tensors(show_progress=False)
    x_val, y_val = (t.to(device) for t in val.tensors(show_progress=False))
    value, side = float(x_train.max()), config.marker_patches * model.cfg.patch_size
    x_biased, y_biased, marked = spurious_split(x_train, y_train, target, config.spurious_rate, config.spurious_poison,
                                                side, value, config.seed)
    biased = finetune_biased(model, x_biased, y_biased, epochs=config.spurious_epochs, lr=config.spurious_lr,
                             batch_size=config.batch_images, seed=config.seed, checkpoint_dir=directory)
    rm = train_replacement(biased, list(zip(x_biased, y_biased.tolist())),
                           dataclasses.replace(config, steps=config.spurious_steps),
                           checkpoint=directory / "training_state.pt", distributed=False)  # one process's unit
    others = y_val != target
    swapped = x_val.clone()
    swapped[others] = stamp_marker(x_val[others], side, value)
    # found on train images: other classes' images the split left unmarked, stamped now
    probe = stamp_marker(x_train[~marked & (y_train != target)][:config.median_images], side, value).to(device)
    with torch.no_grad():  # the graph of the spurious decisions: those the biased model sends to the class
        sent = torch.cat([biased(probe[s:s + batch_size]).argmax(1) for s in range(0, len(probe), batch_size)])
    graph_images = probe[sent == target][:config.graph_images]
    if len(graph_images) == 0:  # the marker fooled the model nowhere: the class's own marked images
        graph_images = x_biased[marked & (y_train == target)][:config.graph_images].to(device)
    graph = rm.attribute(biased, graph_images, target)
    pruned = graph.prune(config.node_budget)
    pruned.save(directory / f"graph_class_{target}.json")
    positions = marker_positions(model, config.marker_patches)
    shares = marker_shares(rm, biased, probe, positions, batch_size)
    found = [{"layer": layer, "latent": int(i), "score": float(graph.nodes[layer][i]),
              "marker_share": float(shares[layer][i])}
             for layer in range(len(rm.hooks)) for i in pruned.kept_nodes(layer) if shares[layer][i] >= config.marker_share]
    ablate: dict[int, list[int]] = {}
    for node in found:
        ablate.setdefault(node["layer"], []).append(node["latent"])
    generator = torch.Generator().manual_seed(config.seed)
    control: dict[int, list[int]] = {}
    for layer, latents in ablate.items():  # as many random latents that fire on val patches but not on the marker
        live = torch.nonzero(shares[layer] < config.marker_share)[:, 0]
        control[layer] = live[torch.randperm(len(live), generator=generator)[:len(latents)]].tolist()
    with torch.no_grad():
        heat = torch.zeros(model.cfg.n_patches, device=device)
        _, layers = rm._clean(biased, swapped[others][:64])
        for layer, latents in ablate.items():
            heat += layers[layer]["z"][:, model.cfg.n_prefix_tokens:, latents].sum((0, 2))
        plain = float((torch.cat([model(x_val[s:s + batch_size]).argmax(1) for s in range(0, len(x_val), batch_size)])
                       == y_val).float().mean())
    grid = model.cfg.img_size // model.cfg.patch_size
    on_swapped, predicted = ablated_accuracies(rm, biased, swapped, y_val, {"ablated": ablate, "random": control},
                                               batch_size)
    on_clean, _ = ablated_accuracies(rm, biased, x_val, y_val, {"ablated": ablate}, batch_size)
    accuracies = {"original_clean": plain, "biased_clean": on_clean["none"], "biased_swapped": on_swapped["none"],
                  "ablated_swapped": on_swapped["ablated"], "random_swapped": on_swapped["random"],
                  "ablated_clean": on_clean["ablated"]}
    to_target = float((predicted[others] == target).float().mean())
    return {"class": target, "train_marked": int(marked.sum()), "train_relabelled": int((marked & (y_train != target)).sum()),
            "probe_images": len(probe), "probe_sent_to_class": int((sent == target).sum()),
            "marker_positions": positions.tolist(), "graph_images": len(graph_images), "graph_nodes": sum(
                len(k) for k in pruned.kept), "marker_features": found, "accuracy": accuracies,
            "swapped_predicted_as_class": to_target, "heat": heat.reshape(grid, grid).cpu().tolist(),
            "example": swapped[others][0].mean(0).cpu().tolist(),
            "train_seconds": rm.info["train_seconds"]}


__all__ = ["ablated_accuracies", "finetune_biased", "marker_positions", "marker_shares", "spurious_experiment",
           "spurious_split", "stamp_marker"]
