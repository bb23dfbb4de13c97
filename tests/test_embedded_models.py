"""The embedded models of other families: vit_tiny_digits_reg (class token + 4 registers, LayerScale)
and siglip_tiny_digits (no class token, attention-pool head). Shipped files and accuracy; each
level's core computation on a one-class slice, with the readout of a model without a class token
re-derived by hand; AttnLRP's conservation through the attention-pool head re-derived module by
module; (slow) the quick study on each."""

from __future__ import annotations

import json
import math
from importlib import resources
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

ALIASES = ("vit_tiny_digits_reg", "siglip_tiny_digits")
TARGET = 3


@pytest.fixture(scope="module", params=ALIASES)
def embedded(request):
    """(alias, model, val split, 100 class-balanced train images)."""
    from hooked_vit import HookedViT
    from hooked_vit.data import calibration_sample, load_dataset

    model = HookedViT.from_pretrained(request.param)
    val = load_dataset("digits", split="val", model=model)
    train = calibration_sample(load_dataset("digits", split="train", model=model), 100, seed=0)
    return request.param, model, val, train


def val_slice(val):
    """100 class-balanced val images (the analysed images of the level tests)."""
    from hooked_vit.data import calibration_sample

    return calibration_sample(val, 100, seed=0)


def spec_of(alias: str) -> tuple[dict, Path]:
    folder = Path(str(resources.files("pretrained_configs")))
    return json.loads((folder / f"{alias}.json").read_text()), folder / f"{alias}.safetensors"


def test_shipped_model_loads_offline_and_reaches_its_accuracy(embedded):
    from safetensors.torch import load_file
    from timm.models.vision_transformer import VisionTransformer

    from hooked_vit.evaluation import evaluate
    from hooked_vit.training import EMBEDDED_MODELS

    alias, model, val, _ = embedded
    spec, weights = spec_of(alias)
    assert spec["alias"] == alias and spec["timm_kwargs"] == EMBEDDED_MODELS[alias].timm_kwargs
    assert spec["training"]["command"] == f"hooked-vit train-default --model {alias} --seed 0 --out pretrained_configs"
    assert spec["training"]["val_top1"] >= 0.97 and "protocol" in spec
    result = evaluate(model, val)
    assert result["n"] == 360 and result["top1"] >= 0.97
    assert abs(result["top1"] - spec["training"]["val_top1"]) <= 1 / 360 + 1e-4
    timm_model = VisionTransformer(**spec["timm_kwargs"]).eval()
    timm_model.load_state_dict(load_file(weights))  # strict: timm's own key names
    images = val.tensors(show_progress=False)[0][:8]
    with torch.no_grad():
        torch.testing.assert_close(model(images), timm_model(images), rtol=1e-5, atol=1e-5)
    tokens = model.to_str_tokens()
    if alias == "vit_tiny_digits_reg":
        assert tokens[:6] == ["CLS", "REG0", "REG1", "REG2", "REG3", "r0c0"] and model.cfg.pooling == "token"
    else:
        assert tokens[0] == "r0c0" and model.cfg.n_prefix_tokens == 0 and model.cfg.pooling == "map"


def by_hand_readout(model, act: torch.Tensor, pool_pattern: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image the activation at the CLS token (or, without one, the attention pool's head-averaged
    weighting of the patch tokens, written as a loop over patches) and the max over the patch tokens."""
    n_prefix = model.cfg.n_prefix_tokens
    patches = act[:, n_prefix:]
    if model.cfg.class_token:
        return act[:, 0], patches.amax(1)
    weights = pool_pattern.mean(1)[:, 0]  # [batch n_patches]
    readout = sum(weights[:, p] * patches[:, p] for p in range(patches.shape[1]))
    return readout, patches.amax(1)


def test_neuron_core_uses_the_readout_and_skips_prefix_tokens(embedded):
    """One class, the last block: selectivity of the top unit from its readout activation and its
    class variance from the max over the patch tokens (registers excluded), both re-derived."""
    from sklearn.metrics import roc_auc_score

    from analyses.common.ablation import load_or_compute_means
    from analyses.neuron.analysis import ModelAnalysis
    from analyses.neuron.config import NeuronConfig

    alias, model, val, train = embedded
    val = val_slice(val)
    last = model.cfg.n_layers - 1
    config = NeuronConfig(model=alias, top_k=3, blocks=(last,), classes=(TARGET,))
    means = load_or_compute_means(model, train, show_progress=False)
    images, labels = val.tensors(show_progress=False)
    analysis = ModelAnalysis(model, val, means, config, show_progress=False)
    record = analysis.class_record(TARGET)["blocks"][str(last)]
    site, index = record["units"][0].split(":")
    hook = f"blocks.{last}.mlp.hook_post" if site == "mlp_act" else f"blocks.{last}.attn.hook_z"
    names = [hook] + (["attn_pool.hook_pattern"] if not model.cfg.class_token else [])
    _, cache = model.run_with_cache(images, names_filter=names)
    act = cache[hook][..., int(index)] if site == "mlp_act" else cache[hook][:, :, int(index)].norm(dim=-1)
    readout, patch_max = by_hand_readout(model, act, cache["attn_pool.hook_pattern"] if len(names) > 1 else None)
    assert record["unit_selectivity"][0] == pytest.approx(roc_auc_score((labels == TARGET).numpy(), readout.numpy()),
                                                          abs=1e-6)
    own = patch_max[labels == TARGET].clamp_min(0).double()
    assert record["unit_class_variance"][0] == pytest.approx(float(own.std(correction=0) / own.mean()), rel=1e-4)


def test_layer_core_reads_the_readout(embedded, tmp_path):
    """An SAE at the default hook (the last block's CLS token; the pooled features without a class
    token) trains, is evaluated and scores latents; 'cls' at a token hook of a class-token-less model
    is refused before any work."""
    from analyses.layer.activation_store import check_token_choice, hook_layout
    from analyses.layer.config import SAETrainConfig
    from analyses.layer.latents import held_out_pass, latent_scores
    from analyses.layer.sae import train_sae
    from hooked_vit.errors import InvalidArgumentError

    alias, model, val, train = embedded
    cfg = SAETrainConfig(k=4, expansion_factor=2, training_samples=512, train_batch_size=64, buffer_size=256)
    expected_hook = "blocks.3.hook_resid_post" if model.cfg.class_token else "hook_pooled"
    assert cfg.resolved_hook(model) == expected_hook
    run = train_sae(model, train, cfg, progress=False)
    val = val_slice(val)
    quality, tables = held_out_pass(model, run.sae, val, show_progress=False)
    assert tables.cls.shape == (100, 2 * model.cfg.d_model) and quality.n_tokens == 100  # one readout per image
    assert math.isfinite(quality.nmse) and quality.d_sae == 2 * model.cfg.d_model
    images = val.tensors(show_progress=False)[0][val.labels == TARGET][:4]
    scores = latent_scores(model, run.sae, images, TARGET, batch_size=4)
    assert scores.shape == (2 * model.cfg.d_model,) and torch.isfinite(scores).all()
    if not model.cfg.class_token:
        with pytest.raises(InvalidArgumentError, match="no class token"):
            check_token_choice(model, hook_layout(model, "blocks.3.hook_resid_post"), "cls")


def test_circuit_core_masks_every_site_and_freezes_every_norm(embedded):
    from analyses.circuit.config import CircuitConfig
    from analyses.circuit.discovery import discover_circuit
    from analyses.circuit.replacement import ln_scale_hooks

    alias, model, val, train = embedded
    norms = ln_scale_hooks(model)
    assert "ln_final.hook_scale" in norms and len(norms) == 2 * model.cfg.n_layers + 1 + (not model.cfg.class_token)
    config = CircuitConfig(model=alias, steps=3, batch_size=4, lr=0.2, n_eval=5, freeze_ln=True)
    circuit = discover_circuit(model, train, TARGET, config, show_progress=False)
    assert 0.0 <= circuit.metrics["node_frac"] <= 1.0 and 0.0 <= circuit.metrics["acc"] <= 1.0


def test_model_level_maps_on_the_patch_grid(embedded):
    from analyses.model.faithfulness import insertion_deletion
    from analyses.model.lrp import METHODS, attribution_map

    alias, model, val, _ = embedded
    images = val.tensors(show_progress=False)[0][:2]
    for method in METHODS:
        maps = attribution_map(method, model, images)
        assert maps.shape == (2, 8, 8) and torch.isfinite(maps).all(), method
        if method != "random":
            assert maps.abs().sum() > 0, method
    scores = insertion_deletion(model, images, attribution_map("chefer", model, images), "blur", step=256)
    assert scores.insertion_auc.shape == (2,)


def test_accuracy_core_prunes_the_family(embedded):
    import copy

    from hooked_vit.evaluation import evaluate
    from hooked_vit.pruning import prune

    alias, model, val, train = embedded
    pruned = copy.deepcopy(model)
    prune(pruned, "wanda", 0.5, calibration=train.tensors(show_progress=False)[0][:32], n_calib=32)
    fc1 = pruned.blocks[0].mlp.fc1.weight
    assert float((fc1 == 0).float().mean()) == pytest.approx(0.5, abs=0.01)
    assert 0.0 <= evaluate(pruned, val.subset(torch.arange(60)), progress=False)["top1"] <= 1.0


def test_attnlrp_conserves_relevance_through_the_attention_pool():
    """With the pool's and the classifier's biases zero, AttnLRP's relevance at the pool's input
    tokens (the final-norm patch tokens) equals gradient x input of the pool written out by hand with
    its rules' constants (pattern, LayerNorm scale, GELU ratio) and sums to the target logit."""
    from analyses.model.lrp import attn_lrp_hooks
    from hooked_vit import HookedViT
    from hooked_vit.training import build_embedded_model

    model = HookedViT.from_timm(build_embedded_model("siglip_tiny_digits", seed=1)).double().eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.startswith("attn_pool.") or name.startswith("head."):
                param.zero_() if name.endswith("bias") else param.normal_(0, 0.3, generator=generator)
    images = torch.randn(2, 3, 32, 32, dtype=torch.float64, generator=generator)
    target = torch.tensor([TARGET, 7])

    captured: dict[str, torch.Tensor] = {}

    def keep(act, hook):
        captured[hook.name] = act
        return act

    def grab(act, hook):
        captured[hook.name] = act.detach()

    names = ["attn_pool.hook_pattern", "attn_pool.norm.hook_scale", "attn_pool.mlp.hook_pre"]
    hooks = attn_lrp_hooks(model, "attnlrp", epsilon=0.0) + [("ln_final.hook_normalized", keep)] + [
        (name, grab) for name in names]
    with torch.enable_grad(), model.hooks(fwd_hooks=hooks):
        logits = model(images)
        picked = logits.gather(1, target[:, None]).sum()
        x = captured["ln_final.hook_normalized"]
        (grad,) = torch.autograd.grad(picked, x)
    relevance = x.detach() * grad  # [batch n_patches d_model]

    # The pool by hand with the rules' constants: pattern P, norm scale s, GELU ratio g(h)/h.
    pool, d, heads = model.attn_pool, model.cfg.d_model, model.cfg.n_heads
    d_head = d // heads
    pattern = captured["attn_pool.hook_pattern"][:, :, 0]  # [batch head n_patches]
    scale = captured["attn_pool.norm.hook_scale"][:, 0]  # [batch 1]
    pre = captured["attn_pool.mlp.hook_pre"][:, 0]  # [batch d_mlp]
    ratio = torch.where(pre != 0, F.gelu(pre) / pre, torch.zeros_like(pre))
    w_v = pool.kv.weight[d:].detach()  # the value half of kv, heads in order

    def linear_pool(tokens: torch.Tensor) -> torch.Tensor:
        per_head = []
        for h in range(heads):
            v = tokens @ w_v[h * d_head:(h + 1) * d_head].T  # [batch n_patches d_head]
            per_head.append(torch.einsum("bp,bpd->bd", pattern[:, h], v))
        a = torch.cat(per_head, dim=-1) @ pool.proj.weight.detach().T
        normed = (a - a.mean(-1, keepdim=True)) / scale * pool.norm.weight.detach()
        hidden = (normed @ pool.mlp.fc1.weight.detach().T) * ratio
        pooled = a + hidden @ pool.mlp.fc2.weight.detach().T
        return (pooled * model.head.weight.detach()[target]).sum()

    tokens = x.detach().clone().requires_grad_(True)
    (expected_grad,) = torch.autograd.grad(linear_pool(tokens), tokens)
    torch.testing.assert_close(relevance, tokens.detach() * expected_grad, rtol=1e-9, atol=1e-12)
    assert float(relevance.sum()) == pytest.approx(float(picked.detach()), rel=1e-9)


def test_chefer_pattern_pool_row_reads_the_rollout_with_the_pool_pattern():
    """On an attention-pool model, ``pool_row="pattern"`` is the head-averaged pool pattern (captured
    by a hook) times the rollout ``(I + M_L) ... (I + M_0)`` multiplied out here from the per-block
    Chefer maps, over the patches; the default ``"chefer"`` row gives a different map."""
    from analyses.model.lrp import chefer_cache, chefer_propagate, transformer_attribution
    from hooked_vit import HookedViT
    from hooked_vit.training import build_embedded_model

    model = HookedViT.from_timm(build_embedded_model("siglip_tiny_digits", seed=1)).double().eval()
    images = torch.randn(2, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    target = torch.tensor([TARGET, 7])
    captured: list[torch.Tensor] = []
    model.run_with_hooks(images, fwd_hooks=[("attn_pool.hook_pattern", lambda act, hook: captured.append(act))])
    row = captured[0].detach().mean(dim=1)[:, 0]  # [batch n_patches]
    maps = chefer_propagate(model, chefer_cache(model, images, target)).maps
    eye = torch.eye(maps[0].shape[-1], dtype=torch.float64)
    joint = eye.expand_as(maps[0])
    for layer in range(model.cfg.n_layers):
        joint = (maps[layer] + eye) @ joint
    grid = model.cfg.grid_size
    expected = torch.stack([row[b] @ joint[b] for b in range(2)]).reshape(2, grid, grid)  # no prefix tokens

    pattern = transformer_attribution(model, images, target, pool_row="pattern")
    torch.testing.assert_close(pattern, expected, rtol=1e-10, atol=1e-12)
    chefer = transformer_attribution(model, images, target)
    assert not torch.allclose(chefer / chefer.abs().amax(), pattern / pattern.abs().amax(), atol=1e-3)


@pytest.mark.slow
@pytest.mark.parametrize("alias", ALIASES)
def test_quick_study_runs_offline_through_every_level(alias, tmp_path):
    """`hooked-vit impact --model X` (the quick preset) on each embedded model of another family."""
    from hooked_vit.cli import main

    out = tmp_path / "study"
    assert main(["impact", "--model", alias, "--out", str(out), "--no-progress"]) == 0
    report = (out / "report.md").read_text()
    for level in ("accuracy", "neuron", "layer", "circuit", "model"):
        assert any((out / level).rglob("done.json")), level
    assert alias in report
