"""Cache-and-patch on deit3_base: patch one head's value vectors from image B into image A's
run and watch the logits move.

    python demos/cache_and_patch.py                                # random weights, no download
    python demos/cache_and_patch.py --pretrained                   # timm hub weights
    python demos/cache_and_patch.py --checkpoint deit_3_base_224_1k.pth --image-a cat.jpg --image-b dog.jpg
"""

from __future__ import annotations

import argparse
from functools import partial

import torch
from jaxtyping import Float
from PIL import Image
from torch import Tensor
from transformer_lens.hook_points import HookPoint

from hooked_vit import HookedViT


def patch_head(
    value: Float[Tensor, "batch pos head d_head"],
    hook: HookPoint,
    head: int,
    source: Float[Tensor, "batch pos head d_head"],
) -> Float[Tensor, "batch pos head d_head"]:
    """Replace one head's slice of ``attn.hook_v`` with the source run's."""
    value = value.clone()
    value[:, :, head] = source[:, :, head]
    return value


def load_images(model: HookedViT, paths: list[str | None], seed: int) -> Float[Tensor, "2 channel height width"]:
    """Two images through the model's eval transform; random-pixel images where no path is given."""
    transform, generator = model.transform(), torch.Generator().manual_seed(seed)
    images = []
    for path in paths:
        if path is None:
            pixels = torch.randint(0, 256, (model.cfg.img_size, model.cfg.img_size, 3), generator=generator)
            image = Image.fromarray(pixels.to(torch.uint8).numpy())
        else:
            image = Image.open(path).convert("RGB")
        images.append(transform(image))
    return torch.stack(images)


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="deit3_base")
    parser.add_argument("--pretrained", action="store_true", help="download weights from timm's hub")
    parser.add_argument("--checkpoint", help="local checkpoint file (offline)")
    parser.add_argument("--image-a")
    parser.add_argument("--image-b")
    parser.add_argument("--layer", type=int, default=9)
    parser.add_argument("--head", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    model = HookedViT.from_pretrained(args.model, pretrained=args.pretrained, checkpoint_path=args.checkpoint,
                                      seed=args.seed)
    images = load_images(model, [args.image_a, args.image_b], args.seed)
    image_a, image_b = images[:1], images[1:]
    hook_name = f"blocks.{args.layer}.attn.hook_v"

    with torch.no_grad():
        clean_logits, clean_cache = model.run_with_cache(image_a, names_filter=[hook_name])
        source_logits, source_cache = model.run_with_cache(image_b, names_filter=[hook_name])
        patched_logits = model.run_with_hooks(
            image_a, fwd_hooks=[(hook_name, partial(patch_head, head=args.head, source=source_cache[hook_name]))]
        )
    label_a, label_b = clean_logits.argmax(-1).item(), source_logits.argmax(-1).item()
    delta = patched_logits - clean_logits
    report = {
        "label_a": label_a, "label_b": label_b,
        "clean_logit_a": clean_logits[0, label_a].item(), "patched_logit_a": patched_logits[0, label_a].item(),
        "clean_logit_b": clean_logits[0, label_b].item(), "patched_logit_b": patched_logits[0, label_b].item(),
        "max_abs_logit_change": delta.abs().max().item(),
    }
    print(f"Patched head {args.head} of {hook_name} from image B into image A's run")
    print(f"  A's top class {label_a}: logit {report['clean_logit_a']:+.6e} -> {report['patched_logit_a']:+.6e}")
    print(f"  B's top class {label_b}: logit {report['clean_logit_b']:+.6e} -> {report['patched_logit_b']:+.6e}")
    print(f"  largest change over all {model.cfg.n_classes} logits: {report['max_abs_logit_change']:.3e}")
    if not (args.pretrained or args.checkpoint):
        print("  (random weights with DeiT-III's 1e-6 LayerScale init: effects are tiny; load real weights)")
    return report


if __name__ == "__main__":
    main()
