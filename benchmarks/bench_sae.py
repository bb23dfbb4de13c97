"""Throughput of the layer level's data path and SAE training, in one run.

1. Activation store against a plain forward pass of the same blocks (``model(images,
   stop_at_layer=L+1)``), in activations per second: the store recomputing every epoch (source
   "model": hook capture, token selection, shuffling buffer, batching), serving an epoch held in
   memory, and reading its on-disk cache. The ratio store/forward near 1 means the store adds
   little beyond the forward pass.
2. SAE training steps per second: sae-lens's ``SAETrainer.fit`` fed by the store (memory source)
   against a bare step of the same BatchTopK SAE (``training_forward_pass`` + backward + Adam on a
   fixed batch): the ratio is the trainer's and the store's overhead.

Timings are medians of interleaved rounds (after a warm-up round), so machine load hits every
variant alike. Usage: ``python benchmarks/bench_sae.py [--device cuda] [--model deit3_tiny_digits]``
(``--pretrained`` off: random weights of the model's architecture; the timings do not depend on them).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile

os.environ.setdefault("WANDB_MODE", "disabled")

import torch  # noqa: E402

from analyses.layer.activation_store import (  # noqa: E402
    ActivationStore,
    ActivationStoreConfig,
    default_hook_name,
    hook_layout,
)
from analyses.layer.config import SAETrainConfig  # noqa: E402
from analyses.layer.sae import BatchTopKTrainingSAE  # noqa: E402
from hooked_vit import HookedViT  # noqa: E402
from hooked_vit.data import LabelledImages  # noqa: E402
from sae_lens.saes.sae import TrainStepInput  # noqa: E402
from sae_lens.training.sae_trainer import SAETrainer  # noqa: E402
from timing import interleaved_medians  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="deit3_tiny_digits")
    parser.add_argument("--pretrained", action="store_true", help="load the model's weights (default: random)")
    parser.add_argument("--hook", default=None, help="default blocks.{n_layers-1}.hook_resid_post")
    parser.add_argument("--tokens", default="all", choices=["cls", "patch", "all"])
    parser.add_argument("--images", type=int, default=256, help="images per epoch")
    parser.add_argument("--image-batch", type=int, default=64)
    parser.add_argument("--train-batch", type=int, default=4096, help="activations per training batch")
    parser.add_argument("--k", type=float, default=32)
    parser.add_argument("--expansion", type=int, default=32)
    parser.add_argument("--steps", type=int, default=10, help="training steps per timed round")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    model = HookedViT.from_pretrained(args.model, pretrained=args.pretrained, seed=args.seed, device=args.device)
    hook = args.hook or default_hook_name(model)
    stop = hook_layout(model, hook).stop_at_layer
    size = model.cfg.img_size
    images = torch.randn(args.images, 3, size, size, generator=torch.Generator().manual_seed(args.seed))
    dataset = LabelledImages.from_tensors(images, torch.zeros(args.images, dtype=torch.long), ["x"])
    on_device = images.to(args.device)

    def store(**overrides) -> ActivationStore:
        cfg = dict(hook_names=(hook,), tokens=args.tokens, train_batch_size=args.train_batch,
                   buffer_size=4 * args.train_batch, image_batch_size=args.image_batch, progress=False,
                   memory_limit_bytes=0, device=args.device, num_workers=0)
        return ActivationStore(model, dataset, ActivationStoreConfig(**{**cfg, **overrides}))

    streamed = store()
    per_epoch = streamed.activations_per_epoch
    batches_per_epoch = per_epoch // args.train_batch
    if batches_per_epoch < 1:
        raise SystemExit(f"one epoch has {per_epoch} activations, fewer than --train-batch {args.train_batch}")
    memory = store(memory_limit_bytes=2**40)
    memory.next_batch()  # materialise the epoch once
    cache_dir = tempfile.mkdtemp(prefix="bench_sae_")
    disk = store(cache_dir=cache_dir, images_per_shard=args.image_batch)
    disk.build_cache()

    def forward_epoch() -> None:
        for start in range(0, args.images, args.image_batch):
            model(on_device[start:start + args.image_batch], stop_at_layer=stop)

    def drain(source: ActivationStore):
        return lambda: [source.next_batch() for _ in range(batches_per_epoch)]

    with torch.no_grad():  # not inference_mode: the store's tensors feed training afterwards
        store_times = interleaved_medians({"forward": forward_epoch, "store_model": drain(streamed),
                                           "store_memory": drain(memory), "store_disk": drain(disk)},
                                          args.device, args.repeats)
    served = batches_per_epoch * args.train_batch
    rates = {"forward": per_epoch / store_times["forward"],
             **{name: served / store_times[name] for name in ("store_model", "store_memory", "store_disk")}}

    sae_cfg = SAETrainConfig(hook_name=hook, tokens=args.tokens, k=args.k, expansion_factor=args.expansion,
                             training_samples=args.train_batch * args.steps, train_batch_size=args.train_batch)
    d_in = memory.d_in

    def trainer_round() -> None:
        sae = BatchTopKTrainingSAE(sae_cfg.sae_config(d_in, args.device))
        SAETrainer(sae_cfg.trainer_config(args.device, None), sae, memory).fit()

    bare_sae = BatchTopKTrainingSAE(sae_cfg.sae_config(d_in, args.device))
    optimizer = torch.optim.Adam(bare_sae.parameters(), lr=sae_cfg.lr)
    fixed = memory.next_batch()[hook]

    def bare_round() -> None:
        for step in range(args.steps):
            out = bare_sae.training_forward_pass(TrainStepInput(sae_in=fixed, coefficients={}, dead_neuron_mask=None,
                                                                n_training_steps=step, is_logging_step=False))
            out.loss.backward()
            optimizer.step()
            optimizer.zero_grad()

    import contextlib
    import io

    with contextlib.redirect_stderr(io.StringIO()):  # sae-lens's progress bar
        train_times = interleaved_medians({"trainer": trainer_round, "bare": bare_round}, args.device, args.repeats)
    steps_per_s = {name: args.steps / t for name, t in train_times.items()}

    result = {
        "config": vars(args) | {"hook": hook, "d_in": d_in, "d_sae": d_in * args.expansion,
                                "activations_per_epoch": per_epoch, "torch": torch.__version__,
                                "threads": torch.get_num_threads(),
                                "device_name": (torch.cuda.get_device_name() if args.device.startswith("cuda")
                                                else "cpu")},
        "activations_per_s": rates, "train_steps_per_s": steps_per_s,
        "store_model_over_forward": rates["store_model"] / rates["forward"],
        "store_memory_over_forward": rates["store_memory"] / rates["forward"],
        "store_disk_over_forward": rates["store_disk"] / rates["forward"],
        "trainer_over_bare_step": steps_per_s["trainer"] / steps_per_s["bare"],
    }
    print(json.dumps(result, indent=2))
    print(f"activations/s: forward {rates['forward']:.3g}, store from model {rates['store_model']:.3g}, "
          f"from memory {rates['store_memory']:.3g}, from disk {rates['store_disk']:.3g}")
    print(f"store (recomputing) / plain forward of the same blocks: {result['store_model_over_forward']:.3f}")
    print(f"store (memory) / plain forward: {result['store_memory_over_forward']:.1f}; "
          f"store (disk) / plain forward: {result['store_disk_over_forward']:.1f}")
    print(f"SAE training steps/s: sae-lens trainer + store {steps_per_s['trainer']:.3g}, bare step "
          f"{steps_per_s['bare']:.3g}; ratio {result['trainer_over_bare_step']:.3f} "
          f"(d_in {d_in}, d_sae {d_in * args.expansion}, batch {args.train_batch})")


if __name__ == "__main__":
    main()
