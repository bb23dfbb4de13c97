"""Model-level attribution speed, in one run on deit3_base (random weights, random images):

* Chefer maps for a batch / one plain forward of that batch (target <= 3), split into the caching
  forward with the backward to the attention patterns, and the relevance propagation;
* insertion + deletion for a batch / the same number of plain forwards at the same batch size
  (target <= 1.1): the perturbation bookkeeping must cost next to nothing beside the forwards.

Usage: python benchmarks/bench_attribution.py [--device cuda] [--images 4] [--step 3584]
[--batch-size 16]. ``--step`` (pixels per insertion/deletion step) only shortens the curves on a CPU
(the default 3584 = 16 rows at 224 px gives 15 steps); the ratio is per forward either way.
"""

from __future__ import annotations

import argparse
import math

import torch

from analyses.model.faithfulness import insertion_deletion
from analyses.model.lrp import chefer_cache, transformer_attribution
from hooked_vit import HookedViT
from timing import add_malloc_option, apply_malloc_option, interleaved_medians


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="deit3_base")
    parser.add_argument("--images", type=int, default=4, help="images per batch")
    parser.add_argument("--step", type=int, default=3584, help="pixels per insertion/deletion step")
    parser.add_argument("--batch-size", type=int, default=16, help="perturbed images per forward")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    add_malloc_option(parser)
    args = parser.parse_args()
    malloc = apply_malloc_option(args)

    model = HookedViT.from_pretrained(args.model, pretrained=False, seed=args.seed, device=args.device)
    size = model.cfg.img_size
    generator = torch.Generator().manual_seed(args.seed)
    images = torch.randn(args.images, 3, size, size, generator=generator).to(args.device)

    def forward() -> None:
        with torch.no_grad():
            model(images)

    t = interleaved_medians({"forward": forward, "cache": lambda: chefer_cache(model, images),
                             "chefer": lambda: transformer_attribution(model, images)}, args.device, args.repeats)
    forward, chefer = t["forward"], t["chefer"]
    maps = transformer_attribution(model, images)
    print(f"{args.model}, {args.images} images on {args.device} ({torch.get_num_threads()} threads, malloc {malloc})")
    print(f"  one forward of the batch: {forward * 1e3:.0f} ms; Chefer maps: {chefer * 1e3:.0f} ms; "
          f"ratio {chefer / forward:.2f} (target <= 3)")
    print(f"    of which the caching forward + backward to the patterns: {t['cache'] / forward:.2f} forwards; "
          f"the propagation: {(chefer - t['cache']) / forward:.2f} (3 matmuls per Linear, the floor of the "
          "alpha-beta rule given each Linear's cached output)")

    n_forwards = 2 * args.images * (math.ceil(size * size / args.step) + 1) + args.images  # + the clean pass
    perturbed = torch.randn(args.batch_size, 3, size, size, generator=generator).to(args.device)

    def plain() -> None:
        with torch.no_grad():
            for first in range(0, n_forwards, args.batch_size):
                model(perturbed[: min(args.batch_size, n_forwards - first)])

    t = interleaved_medians({"plain": plain, "scores": lambda: insertion_deletion(
        model, images, maps, step=args.step, batch_size=args.batch_size)}, args.device, repeats=2, warmup=0)
    reference, scores_time = t["plain"], t["scores"]
    print(f"  {n_forwards} plain forwards at batch {args.batch_size}: {reference:.2f} s; insertion + deletion: "
          f"{scores_time:.2f} s; ratio {scores_time / reference:.2f} (target <= 1.1)")


if __name__ == "__main__":
    main()
