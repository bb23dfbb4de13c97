"""Loading (aliases, checkpoints, hub, save/load), supported architectures and input validation."""

from __future__ import annotations

import argparse
import time

import pytest
import timm
import torch
from conftest import make_timm
from safetensors.torch import save_file


def test_random_init_is_seeded_and_leaves_global_rng_alone():
    from hooked_vit import HookedViT

    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = HookedViT.from_pretrained("deit3_small", pretrained=False, seed=0)
    assert torch.equal(torch.rand(1), before)
    b = HookedViT.from_pretrained("deit3_small_patch16_224", pretrained=False, seed=0)
    c = HookedViT.from_pretrained("deit3_small", pretrained=False, seed=1)
    assert torch.equal(a.blocks[3].mlp.fc1.weight, b.blocks[3].mlp.fc1.weight)
    assert not torch.equal(a.blocks[3].mlp.fc1.weight, c.blocks[3].mlp.fc1.weight)
    assert a.cfg.model_name == "deit3_small" and a.cfg.timm_name == "deit3_small_patch16_224.fb_in1k"
    assert a.cfg.preprocessing["crop_pct"] == 0.9 and a.cfg.dataset == "imagenet-1k"


@pytest.mark.parametrize("fmt", ["pth", "safetensors", "original_deit3"])
def test_checkpoint_file_loads_with_identical_logits(tmp_path, timm_deit3_base, images_224, fmt):
    from hooked_vit import HookedViT

    state_dict = timm_deit3_base.state_dict()
    path = tmp_path / f"ckpt.{'safetensors' if fmt == 'safetensors' else 'pth'}"
    if fmt == "safetensors":
        save_file({k: v.contiguous() for k, v in state_dict.items()}, path)
    elif fmt == "pth":
        torch.save(state_dict, path)
    else:  # as distributed by the DeiT-III authors: nested under "model", gamma_1/gamma_2, plus args
        renamed = {k.replace("ls1.gamma", "gamma_1").replace("ls2.gamma", "gamma_2"): v for k, v in state_dict.items()}
        torch.save({"model": renamed, "args": argparse.Namespace(lr=1e-3)}, path)
    model = HookedViT.from_pretrained("deit3_base", checkpoint_path=path)
    with torch.no_grad():
        assert torch.equal(model(images_224), timm_deit3_base(images_224))


def test_bad_checkpoints_list_what_is_wrong(tmp_path):
    from hooked_vit import HookedViT
    from hooked_vit.loading import CheckpointMismatchError

    state_dict = make_timm("deit3_small_patch16_224", depth=12).state_dict()
    del state_dict["blocks.3.mlp.fc2.bias"]
    state_dict["blocks.0.attn.qkv.weight"] = torch.zeros(3, 3)
    state_dict["extra.weight"] = torch.zeros(1)
    torch.save(state_dict, tmp_path / "bad.pth")
    with pytest.raises(CheckpointMismatchError) as err:
        HookedViT.from_pretrained("deit3_small", checkpoint_path=tmp_path / "bad.pth")
    message = str(err.value)
    assert "missing keys (1): blocks.3.mlp.fc2.bias" in message
    assert "unexpected keys (1): extra.weight" in message
    assert "blocks.0.attn.qkv.weight: checkpoint [3, 3] vs model [1152, 384]" in message
    # A checkpoint of another resolution is not silently resampled.
    torch.save(make_timm("deit3_small_patch16_384", depth=12).state_dict(), tmp_path / "384.pth")
    with pytest.raises(CheckpointMismatchError, match=r"pos_embed: checkpoint \[1, 576, 384\] vs model \[1, 196, 384\]"):
        HookedViT.from_pretrained("deit3_small", checkpoint_path=tmp_path / "384.pth")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        HookedViT.from_pretrained("deit3_small", checkpoint_path=tmp_path / "missing.pth")


def test_unknown_alias_lists_known_ones():
    from hooked_vit import HookedViT

    with pytest.raises(ValueError, match=r"Did you mean 'deit3_base'.*Known aliases: .*deit3_small"):
        HookedViT.from_pretrained("deit3_bse")


def test_pretrained_weights_offline_fail_fast_with_instructions(tmp_path, monkeypatch):
    from hooked_vit import HookedViT
    from hooked_vit.loading import OfflineWeightsError

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))  # nothing cached
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path))
    start = time.monotonic()
    try:
        HookedViT.from_pretrained("deit3_base")
    except OfflineWeightsError as err:
        assert "checkpoint_path=" in str(err) and "cache" in str(err)
        assert time.monotonic() - start < 30
    else:  # a machine with network access downloads instead; nothing to check there
        pytest.skip("the Hugging Face hub is reachable from this machine")


def test_hf_cached_weights_are_used_offline(tmp_path, monkeypatch, timm_deit3_base, images_224):
    from hooked_vit import HookedViT

    snapshot = tmp_path / "models--timm--deit3_base_patch16_224.fb_in1k" / "snapshots" / "abc"
    snapshot.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in timm_deit3_base.state_dict().items()}, snapshot / "model.safetensors")
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("abc")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr("hooked_vit.loading._hub_reachable", lambda timeout=3.0: pytest.fail("network used"))
    model = HookedViT.from_pretrained("deit3_base")
    with torch.no_grad():
        assert torch.equal(model(images_224), timm_deit3_base(images_224))


def test_unsupported_architectures_name_what_is_missing():
    from hooked_vit import HookedViT
    from hooked_vit.loading import UnsupportedModelError
    from timm.models.vision_transformer import VisionTransformer

    # Registers, avg pooling, fc_norm and norm_pre (CLIP) are supported since issue 20 (tests/test_families*.py).
    odd = VisionTransformer(img_size=32, patch_size=8, embed_dim=64, depth=1, num_heads=2, num_classes=5,
                            reg_tokens=4, qk_norm=True, global_pool="max", pre_norm=True)
    with pytest.raises(UnsupportedModelError) as err:
        HookedViT.from_timm(odd)
    for feature in ("global_pool='max'", "qk_norm"):
        assert feature in str(err.value)
    assert "\n" not in str(err.value)
    with pytest.raises(UnsupportedModelError, match="not a timm VisionTransformer"):
        HookedViT.from_timm(timm.create_model("resnet18", pretrained=False))


def test_save_pretrained_round_trip(tmp_path, small_hooked, images_64):
    from hooked_vit import HookedViT

    small_hooked.save_pretrained(tmp_path / "saved")
    loaded = HookedViT.from_pretrained(tmp_path / "saved")
    assert loaded.cfg == small_hooked.cfg
    assert torch.equal(loaded(images_64), small_hooked(images_64))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json is missing"):
        HookedViT.from_pretrained(tmp_path / "empty")


def test_transform_is_timms_eval_transform(small_hooked):
    from PIL import Image

    from hooked_vit import HookedViT

    model = HookedViT.from_pretrained("deit3_base", pretrained=False, seed=0)
    transform = model.transform()
    image = Image.new("RGB", (320, 260), color=(255, 128, 0))
    x = transform(image)
    assert x.shape == (3, 224, 224)
    expected = (torch.tensor([1.0, 128 / 255, 0.0]) - torch.tensor([0.485, 0.456, 0.406])) / torch.tensor([0.229, 0.224, 0.225])
    torch.testing.assert_close(x[:, 100, 100], expected, rtol=0, atol=1e-5)
    assert "Resize" in repr(transform) and "CenterCrop" in repr(transform)


def test_bad_images_get_clear_errors(small_hooked, images_64):
    cases = [
        (images_64[:, :, :32], ValueError, "expects 64x64"),
        (images_64[:, :1], ValueError, "1 channels, the model expects 3"),
        (images_64[0], ValueError, r"images\[None\]"),
        ((images_64 * 255).to(torch.uint8), TypeError, "model.transform()"),
        (images_64.double(), TypeError, "torch.float64 but the model is torch.float32"),
        (images_64.to("meta"), ValueError, "are on meta but the model is on cpu"),
        (images_64.clone().index_fill_(0, torch.tensor([1]), float("nan")), ValueError, "NaN"),
        ([1, 2, 3], TypeError, "must be a torch.Tensor"),
    ]
    from hooked_vit.validation import check_images

    for images, error, match in cases:
        with pytest.raises(error, match=match):
            check_images(images, small_hooked.cfg, small_hooked.cls_token)
    # Through the model: inputs that pass the jaxtyping annotation reach the same checks (those
    # that do not, e.g. a 3-D tensor, fail jaxtyping's check first when its import hook is on).
    for images, error, match in cases[:2] + cases[4:7]:
        with pytest.raises(error, match=match):
            small_hooked(images)


def test_unknown_hook_names_suggest_close_matches(small_hooked, images_64):
    with pytest.raises(KeyError, match=r"'blocks.0.attn.hook_patern' \(did you mean 'blocks.0.attn.hook_pattern'"):
        small_hooked.run_with_hooks(images_64, fwd_hooks=[("blocks.0.attn.hook_patern", lambda a, hook: a)])
    with pytest.raises(KeyError, match="hook_mlp_out"):
        small_hooked.run_with_cache(images_64, names_filter=["blocks.1.hook_mlp_outt"])
    with pytest.raises(KeyError, match="Unknown hook"):
        small_hooked.add_hook("blocks.9.hook_resid_pre", lambda a, hook: a)
    with pytest.raises(ValueError, match="set_use_attn_result"):
        small_hooked.run_with_hooks(images_64, fwd_hooks=[("blocks.0.attn.hook_result", lambda a, hook: a)])
    assert not any(hp.has_hooks() for hp in small_hooked.hook_points())


def test_lower_precision_and_device_arguments():
    from hooked_vit import HookedViT

    model = HookedViT.from_pretrained("deit3_small", pretrained=False, seed=0, dtype=torch.bfloat16, device="cpu")
    assert model.cls_token.dtype == torch.bfloat16
    logits = model(torch.randn(1, 3, 224, 224, dtype=torch.bfloat16))
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()


def test_jaxtyping_shapes_are_checked_at_run_time(small_hooked):
    """The suite runs with jaxtyping's import hook (pyproject addopts): wrong shapes are caught."""
    from jaxtyping import TypeCheckError

    with pytest.raises(TypeCheckError):
        small_hooked.sites[0, "norm1"].unit_activation(torch.zeros(3))
    with pytest.raises(TypeCheckError):
        small_hooked.blocks[0].mlp(torch.zeros(2, 17))
