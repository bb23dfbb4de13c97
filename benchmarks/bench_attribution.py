"""Model-level attribution speed, in one run on deit3_base (random weights, random images):

* Chefer maps for a batch / one plain forward of that batch (target <= 3);
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
from analyses.model.lrp import transformer_attribution
from hooked_vit import HookedViT
from timing import timed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="deit3_base")
    parser.add_argument("--images", type=int, default=4, help="images per batch")
    parser.add_argument("--step", type=int, default=3584, help="pixels per insertion/deletion step")
    parser.add_argument("--batch-size", type=int, default=16, help="perturbed images per forward")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    model = HookedViT.from_pretrained(args.model, pretrained=False, seed=args.seed, device=args.device)
    size = model.cfg.img_size
    generator = torch.Generator().manual_seed(args.seed)
    images = torch.randn(args.images, 3, size, size, generator=generator).to(args.device)

    with torch.no_grad():
        forward, _ = timed(lambda: model(images), args.device, args.repeats)
    chefer, maps = timed(lambda: transformer_attribution(model, images), args.device, args.repeats)
    print(f"{args.model}, {args.images} images on {args.device} ({torch.get_num_threads()} threads)")
    print(f"  one forward of the batch: {forward * 1e3:.0f} ms; Chefer maps: {chefer * 1e3:.0f} ms; "
          f"ratio {chefer / forward:.2f} (target <= 3)")

    n_forwards = 2 * args.images * (math.ceil(size * size / args.step) + 1) + args.images  # + the clean pass
    perturbed = torch.randn(args.batch_size, 3, size, size, generator=generator).to(args.device)

    def plain() -> None:
        with torch.no_grad():
            for first in range(0, n_forwards, args.batch_size):
                model(perturbed[: min(args.batch_size, n_forwards - first)])

    reference, _ = timed(plain, args.device, 1)
    scores_time, _ = timed(lambda: insertion_deletion(model, images, maps, step=args.step,
                                                      batch_size=args.batch_size), args.device, 1)
    print(f"  {n_forwards} plain forwards at batch {args.batch_size}: {reference:.2f} s; insertion + deletion: "
          f"{scores_time:.2f} s; ratio {scores_time / reference:.2f} (target <= 1.1)")


if __name__ == "__main__":
    main()
