"""Speed of circuit discovery (analyses.circuit), in one run, on deit3_base (random weights) and the
embedded deit3_tiny_digits:

1. a mask-training step over all 96 (embedded: 32) sites (gated forward, backward to the mask
   logits, AdamW update, clamp) / a plain forward+backward of the same batch through the unmasked
   model (parameter gradients, as in training) -- target <= 1.5;
2. time per class with C classes trained together in one batch / one class at a time (same images
   per class) -- on a GPU the target is C = 8 at least 4x faster per class; on CPU, where the work is
   bound by arithmetic, batched must not be slower (ratio <= 1).

Usage: python benchmarks/bench_circuits.py [--device cuda] [--classes 8] [--repeats 3]
[--base-batch 8] [--tiny-batch 32] [--models deit3_base,deit3_tiny_digits]. ``--*-batch`` is the
images per class and side (a step sees 2 x batch images per class).
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from analyses.common.ablation import compute_means
from analyses.circuit.config import CircuitConfig
from analyses.circuit.discovery import MaskTrainer, frozen
from analyses.circuit.replacement import site_references
from hooked_vit import HookedViT
from timing import add_malloc_option, apply_malloc_option, interleaved_medians


def bench_model(name: str, batch: int, n_classes: int, device: str, repeats: int) -> dict[str, float]:
    model = HookedViT.from_pretrained(name, pretrained=name != "deit3_base", seed=0, device=device)
    cfg = model.cfg
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(2 * batch * n_classes, cfg.in_chans, cfg.img_size, cfg.img_size, generator=generator)
    labels = torch.randint(cfg.n_classes, (images.shape[0],), generator=generator)
    images, labels = images.to(device), labels.to(device)
    data = torch.utils.data.TensorDataset(images[:2 * batch].cpu(), labels[:2 * batch].cpu())
    means = compute_means(model, data, hooks=model.sites.hook_names, show_progress=False)
    refs = site_references(model, "mean", means.to(device))
    config = CircuitConfig(model=name, steps=10**6, batch_size=batch)
    one = slice(0, 2 * batch)

    def plain() -> None:
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(images[one]), labels[one]).backward()

    with frozen(model):
        single = MaskTrainer(model, [0], config, refs, 1e-3)
        batched = MaskTrainer(model, list(range(n_classes)), config, refs, 1e-3)

    def mask_step(trainer: MaskTrainer, batch_images: torch.Tensor, batch_labels: torch.Tensor) -> None:
        with frozen(model):
            trainer.step(batch_images, batch_labels)

    t = interleaved_medians({"plain": plain, "mask_step": lambda: mask_step(single, images[one], labels[one]),
               "batched": lambda: mask_step(batched, images, labels)}, device, repeats)
    return {"sites": len(model.sites), "images": 2 * batch, "C": n_classes, **t}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="deit3_base,deit3_tiny_digits")
    parser.add_argument("--classes", type=int, default=4, help="classes trained together (C)")
    parser.add_argument("--base-batch", type=int, default=4, help="deit3_base images per class and side")
    parser.add_argument("--tiny-batch", type=int, default=32, help="embedded-model images per class and side")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=3)
    add_malloc_option(parser)
    args = parser.parse_args()
    malloc = apply_malloc_option(args)
    print(f"device {args.device}, torch threads {torch.get_num_threads()}, C = {args.classes}, malloc {malloc}")
    for name in args.models.split(","):
        batch = args.base_batch if name == "deit3_base" else args.tiny_batch
        r = bench_model(name, batch, args.classes, args.device, args.repeats)
        per_class = r["batched"] / r["C"]
        print(f"{name}: {r['sites']} sites, {r['images']} images per class-step")
        print(f"  plain forward+backward {r['plain'] * 1e3:.1f} ms, mask-training step {r['mask_step'] * 1e3:.1f} ms"
              f" -> ratio {r['mask_step'] / r['plain']:.2f} (target <= 1.5)")
        print(f"  one class at a time {r['mask_step'] * 1e3:.1f} ms/class, {r['C']} classes batched "
              f"{per_class * 1e3:.1f} ms/class -> batched/one-at-a-time {per_class / r['mask_step']:.2f} "
              f"(speed-up {r['mask_step'] / per_class:.2f}x; CPU target: ratio <= 1)")


if __name__ == "__main__":
    main()
