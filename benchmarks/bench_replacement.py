"""Speed of the replacement level (issue 22, requirement 9), as ratios measured in one run:

1. one joint training step of every SAE (one model forward to the last block, every SAE's TopK step)
   over one plain forward + backward of the model on the same images;
2. the replacement forward (with and without error nodes) over a plain forward (target <= 1.5);
3. one image's full attribution graph (node scores and every edge) in forward-equivalents: its time
   over one plain forward of that image (target <= 100 on the embedded model).

SAEs are random (timings do not depend on the weights); a model without shipped weights (``deit3_base``)
is built with random weights. ``--schedule reference`` gives every SAE the reference's (k, expansion)
for its depth (ViT-B/16: k 4..160, d_sae 0.25..4 x d_model) instead of ``--k``/``--expansion``; ``--parts``
picks what is timed. Timings are medians of interleaved rounds.
Usage: ``python benchmarks/bench_replacement.py [--k 32 --expansion 8 --batch 32 --device cuda]``;
the reference setting: ``--model deit3_base --schedule reference --batch 8 --parts forward``.
"""

from __future__ import annotations

import argparse
import json
import os

os.environ.setdefault("WANDB_MODE", "disabled")

import torch
from timing import interleaved_medians

from analyses.replacement.config import reference_schedule
from analyses.replacement.replacement import ReplacementModel, compute_medians
from analyses.replacement.saes import (
    inference_sae,
    resid_hooks,
    train_saes,
    training_sae,
)
from hooked_vit import HookedViT
from hooked_vit.pretrained import get_spec

PARTS = ("train", "forward", "graph")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="deit3_tiny_digits")
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--expansion", type=float, default=8)
    parser.add_argument("--batch", type=int, default=32, help="images per training step / forward")
    parser.add_argument("--steps", type=int, default=5, help="training steps per timed round")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--schedule", default="uniform", choices=("uniform", "reference"))
    parser.add_argument("--architecture", default="topk", choices=("topk", "batchtopk"),
                        help="batchtopk: a threshold per latent at inference (sae-lens's JumpReLU), no top-k")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, of {PARTS}")
    args = parser.parse_args()
    parts = args.parts.split(",")
    if not set(parts) <= set(PARTS):
        parser.error(f"--parts takes {PARTS}, got {args.parts!r}")

    # the alias's shipped weights, or random weights (seed 0) of its architecture
    model = HookedViT.from_pretrained(args.model, pretrained=get_spec(args.model).weights_path is not None, seed=0,
                                      device=args.device)
    size = model.cfg.img_size
    images = torch.randn(args.batch, 3, size, size, generator=torch.Generator().manual_seed(args.seed)).to(args.device)
    data = [(image, 0) for image in images.cpu()]
    hooks = resid_hooks(model)
    d = model.cfg.d_model
    settings = (reference_schedule(len(hooks), d) if args.schedule == "reference"
                else [(args.k, args.expansion)] * len(hooks))
    saes = {h: inference_sae(training_sae(args.architecture, d, round(e * d), k, 1 / 32, args.device, i), h, None)
            for i, (h, (k, e)) in enumerate(zip(hooks, settings))}
    rm = ReplacementModel(saes, compute_medians(model, saes, images), "logit")

    def plain_forward_backward() -> None:
        for _ in range(args.steps):
            model.zero_grad(set_to_none=True)
            model(images).logsumexp(1).sum().backward()

    def training_steps() -> None:
        train_saes(model, data, settings, architecture=args.architecture, steps=args.steps, batch_images=args.batch,
                   log_every=10**9)

    def plain() -> None:
        with torch.no_grad():
            model(images)

    def replaced(error: bool):
        def run() -> None:
            with torch.no_grad(), rm.replaced(model, error=error):
                model(images)
        return run

    def one_image_forward() -> None:
        with torch.no_grad():
            model(images[:1])

    def one_graph() -> None:
        rm.attribute(model, images[:1], 0)

    result: dict = {"config": vars(args) | {"layer_settings": [[k, round(e * d)] for k, e in settings],
                                            "layers": len(hooks), "torch": torch.__version__,
                                            "threads": torch.get_num_threads()}, "seconds": {}}
    if "train" in parts:
        train = interleaved_medians({"forward_backward": plain_forward_backward, "train": training_steps},
                                    args.device, args.repeats)
        result["seconds"].update(train)
        result["train_step_over_forward_backward"] = train["train"] / train["forward_backward"]
    if "forward" in parts:
        forward = interleaved_medians({"plain": plain, "replaced_error": replaced(True), "replaced": replaced(False)},
                                      args.device, args.repeats * 3)
        result["seconds"].update(forward)
        result["replaced_over_forward"] = forward["replaced"] / forward["plain"]
        result["replaced_with_error_over_forward"] = forward["replaced_error"] / forward["plain"]
    if "graph" in parts:
        graph = interleaved_medians({"forward_1": one_image_forward, "graph_1": one_graph}, args.device, args.repeats)
        result["seconds"].update(graph)
        result["graph_forward_equivalents"] = graph["graph_1"] / graph["forward_1"]
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
