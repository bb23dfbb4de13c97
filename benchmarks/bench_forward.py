"""Forward-pass overhead of HookedViT against timm for one model family (random weights), in one run.

``--model`` is an alias of ``pretrained_configs/`` (``deit3_base``, ``clip_vitb16``, ``siglip2_vitb16``,
...) or a timm model name; the timm architecture is built with random weights (``pretrained=False``,
seeded) and wrapped with ``HookedViT.from_timm``. Prints HookedViT forward / timm forward (target
<= 1.05) and run_with_cache over every hook / timm forward (target <= 1.5). Like the other CPU
benchmarks it retains freed memory as the ``hooked-vit`` command does (``--system-malloc`` to measure
with glibc's default, where each large activation of the full cache is faulted in afresh on every call).
Usage: python benchmarks/bench_forward.py [--model deit3_base] [--device cuda] [--batch 8] [--system-malloc]
"""

from __future__ import annotations

import argparse
import json

import timm
import torch

from hooked_vit import HookedViT
from hooked_vit.loading import create_timm_from_spec
from hooked_vit.pretrained import UnknownModelError, get_spec
from timing import add_malloc_option, apply_malloc_option, interleaved_medians


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="deit3_base", help="alias (pretrained_configs/) or timm model name")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    add_malloc_option(parser)
    args = parser.parse_args()
    malloc = apply_malloc_option(args)

    torch.manual_seed(args.seed)
    dtype = getattr(torch, args.dtype)
    try:
        timm_model = create_timm_from_spec(get_spec(args.model))
    except UnknownModelError:  # a timm name without an alias
        timm_model = timm.create_model(args.model, pretrained=False)
    timm_model = timm_model.eval().to(args.device, dtype)
    hooked = HookedViT.from_timm(timm_model)
    images = torch.randn(args.batch, 3, hooked.cfg.img_size, hooked.cfg.img_size, device=args.device, dtype=dtype)

    with torch.inference_mode():
        medians = interleaved_medians({"timm": lambda: timm_model(images), "hooked": lambda: hooked(images),
                                       "cache": lambda: hooked.run_with_cache(images)}, args.device, args.repeats,
                                      warmup=2)
    t_timm, t_hooked, t_cache = medians["timm"], medians["hooked"], medians["cache"]
    result = {
        "config": vars(args) | {"torch": torch.__version__, "timm": timm.__version__,
                                "device_name": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
                                "threads": torch.get_num_threads(), "malloc": malloc},
        "timm_forward_s": t_timm, "hooked_forward_s": t_hooked, "run_with_cache_all_s": t_cache,
        "hooked_forward_over_timm": t_hooked / t_timm, "run_with_cache_over_timm": t_cache / t_timm,
    }
    print(json.dumps(result, indent=2))
    print(f"HookedViT forward / timm forward:             {t_hooked / t_timm:.3f}  (target <= 1.05)")
    print(f"run_with_cache (all {len(hooked.hook_dict)} hooks) / timm forward: {t_cache / t_timm:.3f}  (target <= 1.5)")


if __name__ == "__main__":
    main()
