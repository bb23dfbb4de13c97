"""Cost per unit of the MIS: the activations of every image at one site (one forward pass), the task
draws, the image embeddings (once per image, shared by every unit) and the scores.

    python benchmarks/bench_mis.py [--model deit3_tiny_digits] [--site blocks.3.mlp.hook_post] \
        [--similarity pixels] [--data builtin] [--split train] [--repeats 3] [--device cpu|cuda]

Prints the median wall time of each step and the cost per unit with and without the shared
forward pass and embeddings.
"""

from __future__ import annotations

import argparse

from timing import timed

from analyses.mis.config import MISConfig
from analyses.mis.score import machine_interpretability_score
from analyses.mis.similarity import EmbeddingCache, embed
from analyses.mis.tasks import make_tasks
from hooked_vit import HookedViT
from hooked_vit.data import load_dataset


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="deit3_tiny_digits")
    parser.add_argument("--site", default="blocks.3.mlp.hook_post")
    parser.add_argument("--similarity", default="pixels")
    parser.add_argument("--data", default="builtin", help="'builtin' (the model's dataset) or an image folder root")
    parser.add_argument("--split", default="train")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    model = HookedViT.from_pretrained(args.model).to(args.device).eval()
    images = load_dataset(args.data, split=args.split, model=model).tensors(show_progress=False)[0]
    config = MISConfig(model=args.model, similarity=args.similarity)
    units = model.units(args.site, position=config.position)
    forward, acts = timed(lambda: units.activations(model, images, batch_size=config.batch_size), args.device,
                          args.repeats)
    draw, tasks = timed(lambda: make_tasks(model, units, images, config, activations=acts), args.device, args.repeats)
    embedding, _ = timed(lambda: embed(args.similarity, images, mean=tasks.mean, std=tasks.std), args.device,
                         args.repeats)
    cache = EmbeddingCache()
    machine_interpretability_score(tasks, args.similarity, embeddings=cache)  # embeddings computed once
    score, scores = timed(lambda: machine_interpretability_score(tasks, args.similarity, embeddings=cache),
                          args.device, args.repeats)
    n = len(units)
    print(f"{args.model} {args.site}: {n} {units.kind}s, {images.shape[0]} images ({args.split}), "
          f"similarity {args.similarity}, {config.n_tasks} tasks x {config.n_references} references, {args.device}")
    print(f"  activations (one pass, all units): {forward:.3f} s")
    print(f"  task draws (all units):            {draw:.3f} s")
    print(f"  embeddings (once per image):       {embedding:.3f} s")
    print(f"  scores (all units):                {score:.3f} s")
    print(f"  per unit: {1e3 * (forward + draw + embedding + score) / n:.2f} ms in all, "
          f"{1e3 * (draw + score) / n:.2f} ms once activations and embeddings are shared; "
          f"mean MIS {scores.summary()['mean']:.3f} ({scores.summary()['n_tied']} tied units)")


if __name__ == "__main__":
    main()
