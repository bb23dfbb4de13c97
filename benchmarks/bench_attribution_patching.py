"""Attribution patching for every unit of one site against exact activation patching, in one run.

Both estimate the per-image change of the target logit when each unit is mean-ablated alone:
attribution patching from one forward and one backward pass, exact patching from one patched
forward pass per unit (units batched: ``--exact-batch`` images per pass). Prints the median times,
the speed-up (exact / attribution) and the Spearman rank correlation of the two.

Usage: python benchmarks/bench_attribution_patching.py [--device cuda] [--model deit3_tiny_digits]
[--site mlp_act] [--block -1] [--images 16]. With ``--random``, the model gets random weights
(e.g. ``--model deit3_base --random`` on a GPU) and random images stand in for data.
"""

from __future__ import annotations

import argparse
import json

import torch
from scipy.stats import spearmanr

from analyses.common.ablation import compute_means, resolve_site
from analyses.common.attribution_patching import attribution_patching, exact_patching
from hooked_vit import HookedViT
from timing import timed
from hooked_vit.data import LabelledImages, load_dataset


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="deit3_tiny_digits")
    parser.add_argument("--random", action="store_true", help="random weights and random images")
    parser.add_argument("--site", default="mlp_act", help="site name: norm1 q k v attn_out norm2 mlp_act mlp_out attn_head")
    parser.add_argument("--block", type=int, default=-1)
    parser.add_argument("--images", type=int, default=16, help="images patched (each unit, each image)")
    parser.add_argument("--exact-batch", type=int, default=1024, help="images per forward pass in exact patching")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    model = HookedViT.from_pretrained(args.model, pretrained=not args.random, seed=args.seed, device=args.device)
    site = resolve_site(model, (args.block, args.site))
    generator = torch.Generator().manual_seed(args.seed)
    if args.random:
        size = model.cfg.img_size
        images = torch.randn(args.images + 64, 3, size, size, generator=generator)
        data = LabelledImages.from_tensors(images, torch.randint(0, model.cfg.n_classes, (images.shape[0],),
                                                                 generator=generator), [str(i) for i in range(model.cfg.n_classes)])
        means_data, patched = data.subset(range(args.images, images.shape[0])), data.subset(range(args.images))
    else:
        means_data = load_dataset("builtin", split="train", model=model)
        val = load_dataset("builtin", split="val", model=model)
        patched = val.subset(torch.randperm(len(val), generator=generator)[:args.images])
    means = compute_means(model, means_data, hooks=[site.hook_name], show_progress=False)
    images, labels = patched.tensors(show_progress=False)
    images, labels = images.to(args.device), labels.to(args.device)

    t_attr, attr = timed(lambda: attribution_patching(model, images, [site], targets=labels, means=means),
                         args.device, args.repeats)
    t_exact, exact = timed(lambda: exact_patching(model, images, site, targets=labels, means=means,
                                                  batch_size=args.exact_batch), args.device, args.repeats)
    estimate = attr.estimates[site.hook_name].cpu()
    exact = exact.cpu()
    rho_pairs = float(spearmanr(estimate.flatten(), exact.flatten()).statistic)
    rho_units = float(spearmanr(estimate.mean(0), exact.mean(0)).statistic)
    result = {
        "config": vars(args) | {"torch": torch.__version__, "threads": torch.get_num_threads(),
                                "device_name": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"},
        "site": site.hook_name, "units": site.width, "images": images.shape[0],
        "attribution_s": t_attr, "exact_s": t_exact, "speedup": t_exact / t_attr,
        "spearman_image_unit": rho_pairs, "spearman_unit_mean": rho_units,
    }
    print(json.dumps(result, indent=2))
    print(f"{site.hook_name} ({site.width} {site.unit} units, {images.shape[0]} images, {args.device}): "
          f"attribution {t_attr * 1e3:.1f} ms, exact {t_exact * 1e3:.1f} ms, "
          f"speed-up {t_exact / t_attr:.1f}x, Spearman {rho_pairs:.3f} (image x unit) / {rho_units:.3f} (unit means)")


if __name__ == "__main__":
    main()
