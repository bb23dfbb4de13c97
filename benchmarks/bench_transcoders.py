"""Cross-layer transcoder training speed, in one run on the embedded model (or any ``--model``):

* one CLT training step (the stream's share of a model forward, encode, sparse decode into every
  later layer, loss, backward, Adam) / one plain forward+backward of the model on the images that
  step's tokens come from;
* the same for the per-layer transcoders (the baseline on equal total latents).

Usage: python benchmarks/bench_transcoders.py [--device cuda] [--model deit3_tiny_digits]
[--expansion-factor 8] [--k 16] [--train-batch-size 1024] [--repeats 5]
"""

from __future__ import annotations

import argparse

import torch
from timing import add_malloc_option, apply_malloc_option, interleaved_medians

from analyses.transcoders import CLTConfig, CrossLayerTranscoder
from analyses.transcoders.training import layer_batches, step_loss
from hooked_vit import HookedViT


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="deit3_tiny_digits")
    parser.add_argument("--expansion-factor", type=int, default=8)
    parser.add_argument("--k", type=int, default=16)
    parser.add_argument("--train-batch-size", type=int, default=1024, help="tokens per training step")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    add_malloc_option(parser)
    args = parser.parse_args()
    malloc = apply_malloc_option(args)

    model = HookedViT.from_pretrained(args.model, device=args.device).eval()
    cfg = model.cfg
    n_images = -(-args.train_batch_size // (cfg.n_patches + cfg.n_prefix_tokens))  # images whose tokens fill a step
    generator = torch.Generator().manual_seed(args.seed)
    images = torch.randn(n_images, 3, cfg.img_size, cfg.img_size, generator=generator).to(args.device)
    labels = torch.randint(0, max(cfg.n_classes, 1), (n_images,), generator=generator).to(args.device)
    config = CLTConfig(model=args.model, k=args.k, expansion_factor=args.expansion_factor,
                       train_batch_size=args.train_batch_size)

    def plain() -> None:
        model.zero_grad(set_to_none=True)
        model(images, return_type="loss", labels=labels).backward()

    def trainer(kind: str):
        clt = CrossLayerTranscoder.for_model(model, kind=kind, expansion_factor=args.expansion_factor,
                                             k=args.k).to(args.device)
        optimizer = torch.optim.Adam(clt.parameters(), lr=1e-3)
        since_fired = torch.zeros(clt.n_layers, clt.d_latent, device=args.device)

        def step() -> None:
            x, y = layer_batches(model, images, clt.input_hook)
            loss, _ = step_loss(clt, x[:args.train_batch_size], y[:args.train_batch_size], config, 0, since_fired)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        return clt, step

    clt, clt_step = trainer("clt")
    plt_, plt_step = trainer("plt")
    t = interleaved_medians({"plain": plain, "clt": clt_step, "plt": plt_step}, args.device, args.repeats)
    print(f"{args.model}, {args.train_batch_size} tokens per step ({n_images} images) on {args.device} "
          f"({torch.get_num_threads()} threads, malloc {malloc})")
    print(f"  plain forward+backward of the {n_images} images: {t['plain'] * 1e3:.1f} ms")
    for name, model_clt in (("CLT", clt), ("per-layer transcoders", plt_)):
        key = "clt" if name == "CLT" else "plt"
        print(f"  {name} ({model_clt.n_parameters():,} parameters): one training step {t[key] * 1e3:.1f} ms, "
              f"ratio {t[key] / t['plain']:.2f}")


if __name__ == "__main__":
    main()
