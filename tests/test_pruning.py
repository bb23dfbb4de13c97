"""Wanda / magnitude / N:M pruning, masks, masked fine-tuning, save/load, to_timm and the
pruned-model cache of HookedViT.from_pretrained.

References are computed from the definitions, independently of the hooks: input norms from the
inputs each nn.Linear actually receives (torch forward pre-hooks), masks by sorting each row in
Python. hooked_vit is imported inside tests so jaxtyping's import hook instruments it.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

PRUNED = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")


# ----------------------------------------------------------------------------- helpers
def tiny_model(seed: int = 0, n_classes: int = 5):
    """A 2-block ViT (d_model 32, 4 heads, d_mlp 64, 16x16 images, 8x8 patches) with every
    parameter random, LayerNorm scales in U(0.1, 3) so input-feature norms are far from uniform."""
    from timm.models.vision_transformer import VisionTransformer

    from hooked_vit import HookedViT

    torch.manual_seed(seed)
    timm_model = VisionTransformer(img_size=16, patch_size=8, embed_dim=32, depth=2, num_heads=4, mlp_ratio=2,
                                   num_classes=n_classes, init_values=1.0, no_embed_class=True)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in timm_model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                param.copy_(torch.rand(param.shape, generator=generator) * 2.9 + 0.1)
            elif "norm" in name or name.endswith("gamma") or name.endswith("bias"):
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
    return HookedViT.from_timm(timm_model.eval())


def tiny_images(n: int = 6, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


def captured_input_norms(model, images):
    """||X_j||_2 of each pruned Linear's input, from explicitly captured inputs (float64)."""
    inputs, handles = {}, []
    for i, block in enumerate(model.blocks):
        for rel in PRUNED:
            name = f"blocks.{i}.{rel}"
            handles.append(block.get_submodule(rel).register_forward_pre_hook(
                lambda mod, args, name=name: inputs.setdefault(name, []).append(args[0].detach().clone())))
    with torch.no_grad():
        model(images)
    for handle in handles:
        handle.remove()
    return {name: torch.cat([x.reshape(-1, x.shape[-1]) for x in xs]).double().pow(2).sum(0).sqrt()
            for name, xs in inputs.items()}


def reference_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Definition: in each row, the int(in_features * sparsity) lowest scores are pruned."""
    out_features, in_features = scores.shape
    k = int(in_features * sparsity)
    mask = torch.ones(out_features, in_features, dtype=torch.bool)
    for r in range(out_features):
        row = scores[r].tolist()
        for j in sorted(range(in_features), key=lambda j: (row[j], j))[:k]:
            mask[r, j] = False
    return mask


def linears(model):
    return {f"blocks.{i}.{rel}": block.get_submodule(rel) for i, block in enumerate(model.blocks) for rel in PRUNED}


def images_labels_loader(n: int = 24, batch_size: int = 4, n_classes: int = 5,
                         own_generator: bool = False) -> DataLoader:
    """Shuffled (images, labels) batches; the order comes from the global RNG, or with
    ``own_generator`` from the loader's own generator (as hooked_vit.data.make_loader builds)."""
    generator = torch.Generator().manual_seed(3)
    dataset = TensorDataset(torch.randn(n, 3, 16, 16, generator=generator),
                            torch.randint(0, n_classes, (n,), generator=generator))
    return DataLoader(dataset, batch_size=batch_size, shuffle=True,
                      generator=torch.Generator().manual_seed(7) if own_generator else None)


# ----------------------------------------------------------------------------- Wanda / magnitude
def test_wanda_matches_brute_force_definition():
    from hooked_vit.pruning import input_norms, prune

    model, images = tiny_model(), tiny_images()
    dense = {name: lin.weight.detach().clone() for name, lin in linears(model).items()}
    reference_norms = captured_input_norms(model, images)
    norms, n_tokens = input_norms(model, images, batch_size=4)  # 2 batches: accumulation across batches
    assert n_tokens == 6 * model.cfg.n_ctx
    for name, ref in reference_norms.items():
        torch.testing.assert_close(norms[name], ref, rtol=1e-6, atol=0)

    info = prune(model, "wanda", 0.6, calibration=images, batch_size=4)
    for name, lin in linears(model).items():
        expected = reference_mask(dense[name].abs().double() * reference_norms[name], 0.6)
        assert torch.equal(lin.weight_mask, expected), name
        assert torch.equal(lin.weight, dense[name] * expected), name  # kept weights untouched
        assert (lin.weight == 0).sum(1).tolist() == [int(lin.in_features * 0.6)] * lin.out_features
    assert info.method == "wanda" and info.n_calibration_tokens == 6 * model.cfg.n_ctx
    assert info.calibration["kind"] == "tensor" and info.calibration["n"] == 6


@pytest.mark.parametrize("sparsity", [0.1, 0.33, 0.5, 0.9])
@pytest.mark.parametrize("method", ["wanda", "magnitude_row"])
def test_exact_per_row_zero_counts(method, sparsity):
    from hooked_vit.pruning import measured_sparsity, prune

    model = tiny_model()
    info = prune(model, method, sparsity, calibration=tiny_images())
    total = zeros = 0
    for name, lin in linears(model).items():
        k = int(lin.in_features * sparsity)  # 32 -> qkv/proj/fc1, 64 -> fc2
        assert (lin.weight == 0).sum(1).tolist() == [k] * lin.out_features, name
        assert ((~lin.weight_mask).sum(1) == k).all()
        assert info.layer_sparsity[name] == k / lin.in_features
        total, zeros = total + lin.weight.numel(), zeros + k * lin.out_features
    assert info.overall_sparsity == zeros / total == measured_sparsity(model)[1]


def test_magnitude_row_is_brute_force_and_differs_from_wanda_on_nonuniform_norms():
    from hooked_vit.pruning import prune

    images = tiny_images()
    wanda, magnitude = tiny_model(), tiny_model()
    dense = {name: lin.weight.detach().clone() for name, lin in linears(magnitude).items()}
    norms = captured_input_norms(wanda, images)
    assert min(float(n.max() / n.min()) for n in norms.values()) > 2  # the premise: non-uniform norms
    prune(wanda, "wanda", 0.5, calibration=images)
    info = prune(magnitude, "magnitude_row", 0.5)
    assert info.calibration is None and info.n_calibration_tokens is None
    for name, lin in linears(magnitude).items():
        assert torch.equal(lin.weight_mask, reference_mask(dense[name].abs().double(), 0.5)), name
        disagreement = (lin.weight_mask != linears(wanda)[name].weight_mask).float().mean()
        assert disagreement > 0.05, name


@pytest.mark.parametrize("sparsity", [0.3, 0.7])
def test_magnitude_is_per_layer_as_han_et_al(sparsity):
    """``magnitude`` ranks |W| over the whole layer (Han et al. 2015): re-derived here with a
    threshold loop over the sorted magnitudes; rows end up with different sparsities."""
    from hooked_vit.pruning import prune

    model = tiny_model()
    with torch.no_grad():  # rows of very different scale, so a per-layer and a per-row rule disagree
        for lin in linears(model).values():
            lin.weight.mul_(torch.linspace(0.2, 3.0, lin.out_features)[:, None])
    dense = {name: lin.weight.detach().clone() for name, lin in linears(model).items()}
    info = prune(model, "magnitude", sparsity)
    for name, lin in linears(model).items():
        flat = sorted(dense[name].abs().reshape(-1).tolist())
        n_pruned = int(len(flat) * sparsity)
        threshold = flat[n_pruned]  # smallest kept magnitude (no ties in random weights)
        expected = dense[name].abs() >= threshold
        assert torch.equal(lin.weight_mask, expected), name
        assert int((~lin.weight_mask).sum()) == n_pruned and info.layer_sparsity[name] == n_pruned / len(flat)
        per_row = (~lin.weight_mask).sum(1)
        assert per_row.max() > per_row.min(), name  # not the per-row rule


@pytest.mark.parametrize("method", ["wanda", "magnitude", "magnitude_row"])
@pytest.mark.parametrize("nm", [(2, 4), (1, 4), (3, 8)])
def test_nm_keeps_top_n_of_every_group_of_m(method, nm):
    from hooked_vit.pruning import prune

    model, images = tiny_model(), tiny_images()
    n, m = nm
    norms = captured_input_norms(model, images)
    dense = {name: lin.weight.detach().clone() for name, lin in linears(model).items()}
    info = prune(model, method, calibration=images, nm=nm)
    assert info.nm == nm and info.sparsity == 1 - n / m
    for name, lin in linears(model).items():
        groups = lin.weight_mask.reshape(lin.out_features, -1, m)
        assert (groups.sum(-1) == n).all(), name  # exactly N kept in every group
        assert ((lin.weight != 0).reshape(groups.shape).sum(-1) == n).all(), name
        scores = dense[name].abs().double() * (norms[name] if method == "wanda" else 1.0)
        kept_min = scores.reshape(groups.shape).masked_fill(~groups, math.inf).amin(-1)
        pruned_max = scores.reshape(groups.shape).masked_fill(groups, -math.inf).amax(-1)
        assert (kept_min > pruned_max).all(), name  # the kept N are the highest-scoring


def test_argument_errors_are_clear():
    from hooked_vit.pruning import MissingCalibrationError, prune

    model = tiny_model()
    for bad in (1.0, -0.1, 70, float("nan")):
        with pytest.raises(ValueError, match=r"sparsity must be in \[0, 1\)"):
            prune(model, "wanda", bad, calibration=tiny_images())
    with pytest.raises(ValueError, match="percentage"):
        prune(model, "magnitude", 70)
    with pytest.raises(ValueError, match="Unknown pruning method 'snip'"):
        prune(model, "snip", 0.5)
    with pytest.raises(ValueError, match="0 < N < M"):
        prune(model, "magnitude", nm=(4, 2))
    with pytest.raises(ValueError, match="i.e. sparsity 0.5"):
        prune(model, "magnitude", 0.7, nm=(2, 4))
    with pytest.raises(ValueError, match="not a multiple of M=5"):
        prune(model, "magnitude", nm=(2, 5))
    with pytest.raises(MissingCalibrationError, match="calibration="):  # from_timm: no builtin dataset
        prune(model, "wanda", 0.5)
    assert not any(hasattr(lin, "weight_mask") for lin in linears(model).values())  # nothing half-done
    prune(model, "magnitude", 0.5)
    with pytest.raises(ValueError, match="already pruned"):
        prune(model, "magnitude", 0.7)


def test_masks_are_buffers_and_sparsity_is_measured_from_weights():
    from hooked_vit.pruning import measured_sparsity, prune

    model = tiny_model()
    prune(model, "magnitude_row", 0.25)
    mask_keys = sorted(k for k in model.state_dict() if k.endswith("weight_mask"))
    assert mask_keys == sorted(f"{name}.weight_mask" for name in linears(model))  # not head, not patch_embed
    assert all(model.state_dict()[k].dtype == torch.bool for k in mask_keys)
    with torch.no_grad():
        model.blocks[0].mlp.fc2.weight[0, :] = 0.0  # zeros beyond the mask count as sparsity
    per_layer, _ = measured_sparsity(model)
    fc2 = model.blocks[0].mlp.fc2
    assert per_layer["blocks.0.mlp.fc2"] == (16 * (fc2.out_features - 1) + 64) / fc2.weight.numel()


@pytest.fixture(scope="module")
def deit3_base_logits(timm_deit3_base, images_224):
    """timm's deit3_base (random init) logits on the two 224px test images."""
    with torch.no_grad():
        return timm_deit3_base(images_224)


def test_sparsity_zero_is_identical_to_timm_on_deit3_base(timm_deit3_base, images_224, deit3_base_logits):
    from hooked_vit import HookedViT
    from hooked_vit.pruning import prune

    model = HookedViT.from_timm(timm_deit3_base)
    info = prune(model, "wanda", 0.0, calibration=images_224)
    assert info.overall_sparsity < 1e-6  # random init has no exact zeros to speak of
    with torch.no_grad():
        assert torch.equal(model(images_224), deit3_base_logits)


def test_wanda_on_deit3_base_counts_and_to_timm_parity(timm_deit3_base, images_224, deit3_base_logits):
    """Real architecture: per-row counts in all 48 Linears, and the exported timm model (zeroed
    weights, no masks) reproduces the pruned hooked logits."""
    from hooked_vit import HookedViT
    from hooked_vit.pruning import prune

    model = HookedViT.from_timm(timm_deit3_base)
    info = prune(model, "wanda", 0.7, calibration=images_224)
    assert len(info.layer_sparsity) == 48
    for name, lin in linears(model).items():
        assert ((lin.weight == 0).sum(1) == int(lin.in_features * 0.7)).all(), name
    assert model.head.weight.count_nonzero() == model.head.weight.numel()
    exported = model.to_timm()
    assert not [k for k in exported.state_dict() if "mask" in k]
    assert exported.blocks[5].mlp.fc2.weight.eq(0).sum() == model.blocks[5].mlp.fc2.weight_mask.logical_not().sum()
    with torch.no_grad():
        pruned_logits = model(images_224)
        torch.testing.assert_close(exported(images_224), pruned_logits, rtol=0, atol=1e-5)
        assert not torch.allclose(pruned_logits, deit3_base_logits, atol=1e-3)  # pruning did something


# ----------------------------------------------------------------------------- save / load
def test_save_load_round_trip_and_metadata(tmp_path):
    from hooked_vit import HookedViT
    from hooked_vit.pruning import prune

    model, images = tiny_model(), tiny_images()
    prune(model, "wanda", 0.7, calibration=images)
    model.save_pretrained(tmp_path / "m")
    meta = json.loads((tmp_path / "m" / "pruning.json").read_text())
    assert meta["method"] == "wanda" and meta["sparsity"] == 0.7 and meta["nm"] is None
    assert meta["calibration"]["sha256"] == model.pruning_info.calibration["sha256"]
    assert set(meta["layer_sparsity"]) == set(linears(model)) and meta["finetune"] == []

    loaded = HookedViT.from_pretrained(tmp_path / "m")
    for name, lin in linears(loaded).items():
        assert torch.equal(lin.weight_mask, linears(model)[name].weight_mask)
    assert loaded.pruning_info == model.pruning_info
    with torch.no_grad():
        assert torch.equal(loaded(images), model(images))
        torch.testing.assert_close(loaded.to_timm()(images), model(images), rtol=0, atol=1e-5)

    dense = tiny_model()  # saving a dense model into the same folder removes the stale metadata
    dense.save_pretrained(tmp_path / "m")
    assert not (tmp_path / "m" / "pruning.json").exists()
    assert not any(hasattr(m, "weight_mask") for m in HookedViT.from_pretrained(tmp_path / "m").modules())


# ----------------------------------------------------------------------------- masked fine-tuning
@pytest.mark.parametrize("make_optimizer", [
    lambda params: torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1),
    lambda params: torch.optim.SGD(params, lr=1e-1, momentum=0.9, weight_decay=0.1),
], ids=["adamw_weight_decay", "sgd_momentum"])
def test_finetune_keeps_pruned_weights_exactly_zero(make_optimizer):
    from hooked_vit.pruning import finetune, prune
    from hooked_vit.pruning.finetuning import training_loss

    model = tiny_model()
    prune(model, "magnitude", 0.6)
    masks = {name: lin.weight_mask.clone() for name, lin in linears(model).items()}
    before = {name: lin.weight.detach().clone() for name, lin in linears(model).items()}
    images, labels = next(iter(images_labels_loader()))
    training_loss(model, images, labels).backward()  # the premise: pruned weights do get gradient
    assert all(lin.weight.grad[~masks[n]].abs().sum() > 0 for n, lin in linears(model).items())
    model.zero_grad(set_to_none=True)

    result = finetune(model, images_labels_loader(), epochs=2, optimizer=make_optimizer, progress=False)
    assert result.steps == 12
    for name, lin in linears(model).items():
        assert torch.equal(lin.weight_mask, masks[name])
        assert lin.weight[~masks[name]].eq(0).all() and not lin.weight[~masks[name]].signbit().any(), name
        assert not torch.equal(lin.weight[masks[name]], before[name][masks[name]]), name  # it trained
    assert model.pruning_info.finetune[0]["epochs"] == 2
    assert not model.training


@pytest.mark.parametrize("own_generator", [False, True], ids=["global_rng_loader", "own_generator_loader"])
def test_finetune_resume_matches_uninterrupted_run(own_generator, tmp_path, capsys, monkeypatch):
    from hooked_vit.pruning import finetune, prune
    from hooked_vit.pruning import finetuning as finetune_module

    def pruned():
        model = tiny_model()
        prune(model, "magnitude", 0.5)
        return model

    def loader():
        return images_labels_loader(own_generator=own_generator)

    reference = pruned()
    expected = finetune(reference, loader(), epochs=2, lr=1e-3, progress=False)

    real_loss, calls = finetune_module.training_loss, []

    def dies_at_step_10(*args, **kwargs):  # the process dies during step 10 (epoch 2 of 6-step epochs)
        calls.append(1)
        if len(calls) == 10:
            raise KeyboardInterrupt
        return real_loss(*args, **kwargs)

    monkeypatch.setattr(finetune_module, "training_loss", dies_at_step_10)
    with pytest.raises(KeyboardInterrupt):
        finetune(pruned(), loader(), epochs=2, lr=1e-3, checkpoint_dir=tmp_path, checkpoint_every=4, progress=False)
    monkeypatch.setattr(finetune_module, "training_loss", real_loss)
    resumed = pruned()
    result = finetune(resumed, loader(), epochs=2, lr=1e-3, checkpoint_dir=tmp_path, checkpoint_every=4, progress=True)
    assert result.resumed_from_step == 8 and result.steps == 12  # the last checkpoint, after step 8
    assert "finetune" in capsys.readouterr().err  # the tqdm progress bar
    assert result.epoch_losses == expected.epoch_losses
    for key, value in reference.state_dict().items():
        assert torch.equal(resumed.state_dict()[key], value), key
    with pytest.raises(ValueError, match="other settings .*lr"):
        finetune(pruned(), loader(), epochs=2, lr=5e-4, checkpoint_dir=tmp_path, progress=False)


# ----------------------------------------------------------------------------- from_pretrained
def test_cache_root_resolution(monkeypatch, tmp_path):
    from pathlib import Path

    from hooked_vit.pruning.cached import cache_root

    monkeypatch.delenv("HOOKED_VIT_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert cache_root() == Path.home() / ".cache" / "hooked_vit"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "xdg" / "hooked_vit"
    monkeypatch.setenv("HOOKED_VIT_CACHE", str(tmp_path / "hv"))
    assert cache_root() == tmp_path / "hv"


def test_from_pretrained_errors_without_calibration_and_on_bad_sparsity(monkeypatch, tmp_path):
    from hooked_vit import HookedViT
    from hooked_vit.pruning import MissingCalibrationError
    from hooked_vit.training import build_default_model

    monkeypatch.setenv("HOOKED_VIT_CACHE", str(tmp_path / "cache"))
    saved = HookedViT.from_timm(build_default_model(), model_name="imagenet_like", dataset="imagenet-1k")
    saved.save_pretrained(tmp_path / "imagenet_like")
    with pytest.raises(MissingCalibrationError, match="imagenet-1k.*calibration=.*magnitude"):
        HookedViT.from_pretrained(tmp_path / "imagenet_like", sparsity=0.5)
    with pytest.raises(ValueError, match=r"sparsity must be in \[0, 1\)"):  # checked before any loading
        HookedViT.from_pretrained("deit3_huge", sparsity=1.5, method="magnitude")
    with pytest.raises(ValueError, match="Unknown pruning method"):
        HookedViT.from_pretrained("deit3_huge", sparsity=0.5, method="random")
    assert not (tmp_path / "cache").exists()


@pytest.fixture(scope="module")
def digits_model_dir(tmp_path_factory):
    """The embedded digits architecture (4 blocks, width 96, 32x32 images) with random weights,
    saved as a directory; its dataset is the builtin "digits", so Wanda calibrates by default."""
    from hooked_vit import HookedViT
    from hooked_vit.data import DIGITS_PREPROCESSING
    from hooked_vit.training import build_default_model

    model = HookedViT.from_timm(build_default_model(seed=0), model_name="digits_test", dataset="digits",
                                preprocessing=dict(DIGITS_PREPROCESSING))
    return model.save_pretrained(tmp_path_factory.mktemp("models") / "digits_test")


def test_from_pretrained_prunes_with_default_calibration_and_caches(digits_model_dir, tmp_path, monkeypatch):
    from hooked_vit import HookedViT
    from hooked_vit.data import load_dataset
    from hooked_vit.pruning import recipe

    monkeypatch.setenv("HOOKED_VIT_CACHE", str(tmp_path))
    dense = HookedViT.from_pretrained(digits_model_dir)
    images, _ = load_dataset("digits", "val", model=dense).subset(range(8)).tensors()

    first = HookedViT.from_pretrained(digits_model_dir, sparsity=0.5, n_calib=64)
    calib = first.pruning_info.calibration
    described = (calib["kind"], calib["name"], calib["split"], calib["n"], calib["seed"])
    assert described == ("dataset", "digits", "train", 64, 0)
    entries = sorted((tmp_path / "pruned").iterdir())
    assert [e.name.split("-")[:3] for e in entries] == [["digits_test", "wanda", "s0.5"]]
    assert (entries[0] / "pruning.json").is_file() and (entries[0] / "cache_key.json").is_file()

    def no_pruning(*args, **kwargs):
        raise AssertionError("prune() called although the result is cached")

    monkeypatch.setattr(recipe, "prune", no_pruning)
    second = HookedViT.from_pretrained(digits_model_dir, sparsity=0.5, n_calib=64)  # loads from the cache
    with torch.no_grad():
        assert torch.equal(second(images), first(images))
    for a, b in zip(linears(first).values(), linears(second).values()):
        assert torch.equal(a.weight_mask, b.weight_mask)
    assert second.pruning_info == first.pruning_info
    for changed in ({"sparsity": 0.6}, {"n_calib": 32}, {"calib_seed": 1}, {"method": "magnitude"},
                    {"sparsity": None, "nm": (2, 4)}, {"calibration": images}):
        with pytest.raises(AssertionError, match="prune\\(\\) called"):  # every key part matters
            HookedViT.from_pretrained(digits_model_dir, **{"sparsity": 0.5, "n_calib": 64, **changed})

    zero = HookedViT.from_pretrained(digits_model_dir, sparsity=0)  # dense, uncached, no masks
    assert not any(hasattr(m, "weight_mask") for m in zero.modules())
    with torch.no_grad():
        assert torch.equal(zero(images), dense(images))
    assert len(list((tmp_path / "pruned").iterdir())) == 1


def test_from_pretrained_finetune_is_cached_and_recorded(digits_model_dir, tmp_path, monkeypatch):
    from hooked_vit import HookedViT
    from hooked_vit.data import load_dataset
    from hooked_vit.pruning import recipe

    monkeypatch.setenv("HOOKED_VIT_CACHE", str(tmp_path))
    dense = HookedViT.from_pretrained(digits_model_dir)
    train = load_dataset("digits", "train", model=dense).subset(range(64))
    settings = {"epochs": 1, "data": train, "batch_size": 32, "lr": 1e-3}
    tuned = HookedViT.from_pretrained(digits_model_dir, sparsity=0.5, method="magnitude", finetune=settings)
    record = tuned.pruning_info.finetune[0]
    assert (record["epochs"], record["lr"], record["batch_size"], record["steps_per_epoch"]) == (1, 1e-3, 32, 2)
    assert record["data"] == {"name": "digits", "split": "train", "len": 64}
    for name, lin in linears(tuned).items():
        assert lin.weight[~lin.weight_mask].eq(0).all(), name
        assert not torch.equal(lin.weight, linears(dense)[name].weight * lin.weight_mask), name  # it trained
    assert not list((tmp_path / "pruned").glob("*.finetune"))  # the resume checkpoint is cleaned up
    monkeypatch.setattr(recipe, "run_finetune", lambda *a, **k: pytest.fail("fine-tuned again"))
    again = HookedViT.from_pretrained(digits_model_dir, sparsity=0.5, method="magnitude", finetune=settings)
    assert all(torch.equal(a.weight, b.weight) for a, b in zip(linears(again).values(), linears(tuned).values()))
    with pytest.raises(ValueError, match="unknown finetune settings \\['epoch'\\]"):
        HookedViT.from_pretrained(digits_model_dir, sparsity=0.5, method="magnitude", finetune={"epoch": 1})


def test_calibration_from_folder_and_identity(digits_model_dir, tmp_path):
    from PIL import Image

    from hooked_vit import HookedViT
    from hooked_vit.pruning import prune, resolve_calibration

    model = HookedViT.from_pretrained(digits_model_dir)
    generator = torch.Generator().manual_seed(0)
    for i in range(5):
        pixels = (torch.rand(20, 24, 3, generator=generator) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(tmp_path / f"img{i}.png")
    (tmp_path / "notes.txt").write_text("not an image")
    first = resolve_calibration(model, tmp_path, n=3, seed=0)
    assert first.images.shape == (3, 3, 32, 32)  # resized by the model's transform
    assert first.identity["kind"] == "folder" and first.identity["n_files"] == 5
    assert resolve_calibration(model, tmp_path, n=3, seed=0).identity == first.identity
    assert resolve_calibration(model, tmp_path, n=3, seed=1).identity["sha256"] != first.identity["sha256"]
    info = prune(model, "wanda", 0.5, calibration=tmp_path, n_calib=3)
    assert info.calibration == first.identity and info.n_calibration_tokens == 3 * model.cfg.n_ctx


def test_reference_calibration_draws_with_replacement_and_training_augmentation(digits_model_dir, tmp_path):
    """Wanda's ViT calibration: n draws WITH replacement (more than the split holds), each through
    the training augmentation; deterministic given the seed, different from the eval-transform images."""
    from hooked_vit import HookedViT
    from hooked_vit.data import load_dataset
    from hooked_vit.pruning import resolve_calibration

    model = HookedViT.from_pretrained(digits_model_dir)
    train = load_dataset("digits", split="train", model=model)
    n = len(train) + 100  # impossible without replacement
    calib = resolve_calibration(model, "digits", n=n, seed=3, sampling="reference")
    assert calib.images.shape == (n, 3, 32, 32) and calib.identity["sampling"] == "reference"
    again = resolve_calibration(model, train, n=n, seed=3, sampling="reference")
    assert torch.equal(again.images, calib.images)
    positions = torch.randint(len(train), (n,), generator=torch.Generator().manual_seed(3))
    plain = train.subset(positions).tensors(show_progress=False)[0]
    assert (calib.images - plain).abs().amax(dim=(1, 2, 3)).gt(1e-3).float().mean() > 0.9  # augmented
    assert resolve_calibration(model, "digits", n=8, seed=4, sampling="reference").identity["sha256"] != \
        resolve_calibration(model, "digits", n=8, seed=5, sampling="reference").identity["sha256"]
    with pytest.raises(ValueError, match="calibration sampling must be one of quick, reference"):
        resolve_calibration(model, "digits", n=8, sampling="balanced")

    # an ImageNet-style root: the files are re-read through timm's (DeiT) training transform
    write_digit_folder(tmp_path, "train", {"n01440764": [0, 1, 2], "n01443537": [10, 11]})
    first = resolve_calibration(model, tmp_path, n=7, seed=0, sampling="reference")
    assert first.images.shape == (7, 3, 32, 32) and first.identity["path"] == str(tmp_path.resolve())
    assert torch.equal(resolve_calibration(model, tmp_path, n=7, seed=0, sampling="reference").images, first.images)


def write_digit_folder(root, split: str, classes: dict[str, list[int]]) -> None:
    """Digits (indices into sklearn's 1,797) as 8x8 greyscale PNGs in ``root/split/<class>/``."""
    from PIL import Image

    from hooked_vit.data.digits import digits_arrays

    images = digits_arrays()[0]
    for cls, indices in classes.items():
        (root / split / cls).mkdir(parents=True, exist_ok=True)
        for i in indices:
            Image.fromarray(images[i]).save(root / split / cls / f"{i:04d}.png")
