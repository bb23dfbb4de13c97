"""Activation store: exact activations for every token choice and source (model, memory, disk
cache), stop_at_layer, shuffling, resume and errors."""

from __future__ import annotations

import json

import pytest
import torch


HOOK = "blocks.0.hook_resid_post"


@pytest.fixture(scope="module")
def images():
    return torch.randn(10, 3, 32, 32, generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def dataset(images):
    from hooked_vit.data import LabelledImages

    return LabelledImages.from_tensors(images, torch.arange(10) % 3, ["a", "b", "c"])


@pytest.fixture(scope="module")
def store_module():
    import analyses.layer.activation_store as store_module

    return store_module


def expected(model, images, hook, tokens, store_module):
    """What run_with_cache gives at ``hook`` for ``tokens``, flattened to [n_images * n_tok, d_in]."""
    _, cache = model.run_with_cache(images, names_filter=[hook])
    act = cache[hook]
    if act.ndim == 2:  # hook_pooled: the CLS token only
        return act
    picked = act[:, store_module.token_positions(tokens, model.cfg.n_ctx)]
    return picked.reshape(picked.shape[0] * picked.shape[1], -1)


@pytest.mark.parametrize("tokens", ["cls", "patch", "all"])
@pytest.mark.parametrize("hook", [HOOK, "blocks.1.attn.hook_z", "blocks.1.mlp.hook_post"])
def test_store_gives_the_activations_of_run_with_cache(tiny, images, dataset, store_module, tokens, hook):
    cfg = store_module.ActivationStoreConfig(hook_names=(hook,), tokens=tokens, train_batch_size=5, shuffle=False,
                                             image_batch_size=4, progress=False)
    ref = expected(tiny, images, hook, tokens, store_module)
    for limit in (0, 2**30):  # recomputed from the model per batch / held in memory
        store = store_module.ActivationStore(tiny, dataset, store_module.ActivationStoreConfig(
            **{**cfg.__dict__, "memory_limit_bytes": limit}))
        assert store.source == ("model" if limit == 0 else "memory")
        acts, image_index = store.collect()
        assert torch.equal(acts[hook], ref)
        n_tok = store.tokens_per_image
        assert torch.equal(image_index, torch.arange(10).repeat_interleave(n_tok))
        batches = [next(store) for _ in range(ref.shape[0] // 5)]  # unshuffled stream: dataset order
        assert all(b.shape == (5, ref.shape[1]) for b in batches)
        assert torch.equal(torch.cat(batches), ref[: len(batches) * 5])


def test_pooled_hook_and_several_hooks_in_one_pass(tiny, images, dataset, store_module):
    hooks = ("hook_pooled", HOOK, "blocks.1.attn.hook_z")
    store = store_module.ActivationStore(tiny, dataset, store_module.ActivationStoreConfig(
        hook_names=hooks, tokens="cls", train_batch_size=4, shuffle=False, progress=False))
    acts, _ = store.collect()
    for hook in hooks:
        assert torch.equal(acts[hook], expected(tiny, images, hook, "cls", store_module))
    batch = store.next_batch()
    assert set(batch) == set(hooks) and batch["blocks.1.attn.hook_z"].shape == (4, 32)
    with pytest.raises(ValueError, match="use next_batch"):
        next(store)


def test_disk_cache_is_exact_resumable_and_keyed(tiny, images, dataset, store_module, tmp_path):
    cfg = store_module.ActivationStoreConfig(hook_names=(HOOK,), tokens="all", train_batch_size=17, shuffle=False,
                                             cache_dir=str(tmp_path), images_per_shard=3, progress=False)
    store = store_module.ActivationStore(tiny, dataset, cfg)
    ref = expected(tiny, images, HOOK, "all", store_module)
    acts, image_index = store.collect()
    assert store.source == "disk" and torch.equal(acts[HOOK], ref)
    assert torch.equal(image_index, torch.arange(10).repeat_interleave(17))
    meta = json.loads((tmp_path / "meta.json").read_text())
    assert meta["complete"] and meta["shards_done"] == [0, 1, 2, 3] and meta["n_images"] == 10

    # Interrupted build: shard 2 missing -> only its 3 images run through the model again.
    (tmp_path / "shard_00002.safetensors").unlink()
    seen = []
    tiny.add_hook("hook_embed", lambda act, hook: seen.append(act.shape[0]), is_permanent=True)
    try:
        again = store_module.ActivationStore(tiny, dataset, cfg)
        assert torch.equal(again.collect()[0][HOOK], ref)
    finally:
        tiny.reset_hooks(including_permanent=True)
    assert sum(seen) == 3

    # Served from disk: the stream equals the activations, and the model is not run.
    seen.clear()
    tiny.add_hook("hook_embed", lambda act, hook: seen.append(act.shape[0]), is_permanent=True)
    try:
        store = store_module.ActivationStore(tiny, dataset, cfg)
        assert torch.equal(torch.cat([next(store) for _ in range(10)]), ref)
    finally:
        tiny.reset_hooks(including_permanent=True)
    assert seen == []

    other = store_module.ActivationStoreConfig(hook_names=(HOOK,), tokens="cls", cache_dir=str(tmp_path),
                                               images_per_shard=3, progress=False, train_batch_size=2)
    with pytest.raises(ValueError, match="different .*tokens"):
        store_module.ActivationStore(tiny, dataset, other).collect()


@pytest.mark.parametrize("source", ["memory", "model", "disk"])
def test_shuffled_epochs_are_seeded_permutations(tiny, dataset, store_module, tmp_path, source):
    kwargs = dict(hook_names=(HOOK,), tokens="patch", train_batch_size=16, buffer_size=48, progress=False,
                  image_batch_size=3, images_per_shard=4,
                  memory_limit_bytes=0 if source != "memory" else 2**30,
                  cache_dir=str(tmp_path) if source == "disk" else None)
    natural = store_module.ActivationStore(tiny, dataset, store_module.ActivationStoreConfig(
        **kwargs, shuffle=False)).collect()[0][HOOK]
    store = store_module.ActivationStore(tiny, dataset, store_module.ActivationStoreConfig(**kwargs, seed=1))
    epoch = torch.cat([next(store) for _ in range(10)])  # 160 activations = one epoch exactly
    assert store.epoch == 0 and store.batches_in_epoch == 10
    assert not torch.equal(epoch, natural)
    assert torch.equal(epoch.sort(dim=0).values, natural.sort(dim=0).values)
    assert torch.equal(epoch[:, 0].sort().values, natural[:, 0].sort().values)  # every row exactly once
    next(store)
    assert store.epoch == 1 and store.batches_in_epoch == 1
    same = store_module.ActivationStore(tiny, dataset, store_module.ActivationStoreConfig(**kwargs, seed=1))
    assert torch.equal(torch.cat([next(same) for _ in range(10)]), epoch)
    other = store_module.ActivationStore(tiny, dataset, store_module.ActivationStoreConfig(**kwargs, seed=2))
    assert not torch.equal(torch.cat([next(other) for _ in range(10)]), epoch)


def test_a_pass_spans_epochs_when_an_epoch_is_smaller_than_a_batch(tiny, dataset, store_module):
    natural = store_module.ActivationStore(tiny, dataset, store_module.ActivationStoreConfig(
        hook_names=(HOOK,), tokens="cls", shuffle=False, progress=False)).collect()[0][HOOK]
    store = store_module.ActivationStore(tiny, dataset, store_module.ActivationStoreConfig(
        hook_names=(HOOK,), tokens="cls", train_batch_size=16, progress=False))
    assert store.epochs_per_pass == 2  # 10 CLS tokens per epoch
    batch = next(store)
    assert batch.shape == (16, 32) and store.epoch == 0
    counts = torch.stack([(batch == row).all(dim=1).sum() for row in natural])
    assert counts.sum() == 16 and counts.max() <= 2  # each image at most once per epoch
    next(store)
    assert store.epoch == 1 and store.batches_in_epoch == 1


def test_stream_resumes_from_its_state(tiny, dataset, store_module):
    cfg = store_module.ActivationStoreConfig(hook_names=(HOOK,), tokens="all", train_batch_size=32, buffer_size=64,
                                             memory_limit_bytes=0, image_batch_size=2, progress=False)
    store = store_module.ActivationStore(tiny, dataset, cfg)
    for _ in range(7):  # into the second epoch (5 batches per epoch)
        next(store)
    state = json.loads(json.dumps(store.state_dict()))
    following = [next(store) for _ in range(4)]
    resumed = store_module.ActivationStore(tiny, dataset, cfg)
    resumed.load_state_dict(state)
    assert all(torch.equal(a, next(resumed)) for a in following)
    bad = store_module.ActivationStoreConfig(**{**cfg.__dict__, "seed": 5})
    with pytest.raises(ValueError, match="seed"):
        store_module.ActivationStore(tiny, dataset, bad).load_state_dict(state)


def test_stop_at_layer_runs_only_the_blocks_up_to_the_hook(tiny, images, store_module):
    fired = []
    later = ["blocks.1.hook_resid_pre", "blocks.1.hook_resid_post", "ln_final.hook_normalized", "hook_pooled"]
    for name in later + ["blocks.0.hook_resid_post"]:
        tiny.add_hook(name, lambda act, hook: fired.append(hook.name), is_permanent=True)
    try:
        acts = store_module.capture_activations(tiny, images[:2], [HOOK], "cls")
        assert fired == ["blocks.0.hook_resid_post"] and acts[HOOK].shape == (2, 1, 32)
        assert store_module.hook_layout(tiny, "hook_embed").stop_at_layer == 0
        assert store_module.hook_layout(tiny, "blocks.1.ln1.hook_normalized").stop_at_layer == 2
        assert store_module.hook_layout(tiny, "hook_pooled").stop_at_layer is None
        fired.clear()
        store_module.capture_activations(tiny, images[:2], ["hook_pooled"], "cls")
        assert set(later) <= set(fired)
    finally:
        tiny.reset_hooks(including_permanent=True)


def test_clear_errors(tiny, dataset, store_module):
    with pytest.raises(KeyError, match="did you mean 'blocks.0.hook_resid_post'"):
        store_module.hook_layout(tiny, "blocks.0.hook_resid_posts")
    with pytest.raises(ValueError, match="no per-token feature vector"):
        store_module.hook_layout(tiny, "blocks.0.attn.hook_pattern")
    with pytest.raises(ValueError, match="tokens must be one of cls, patch, all"):
        store_module.ActivationStoreConfig(hook_names=(HOOK,), tokens="patches")
    with pytest.raises(ValueError, match="CLS token only"):
        store_module.ActivationStore(tiny, dataset, store_module.ActivationStoreConfig(
            hook_names=("hook_pooled",), tokens="all"))
    with pytest.raises(ValueError, match="buffer_size"):
        store_module.ActivationStoreConfig(hook_names=(HOOK,), train_batch_size=64, buffer_size=32)
