"""timm's Eva (issue 20): EVA-02 and DINOv3, checked against timm and against re-derivations written
here from timm's parameters: rotary position embeddings on q and k (EVA-02's interleaved pairs, DINOv3's
half rotation; prefix tokens unrotated), SwiGLU MLPs (``act(fc1_g x) * fc1_x x``; timm's separate
``SwiGLU`` and its packed ``GluMlp``), EVA-02's inner LayerNorms (on the MLP's hidden activation and on
the heads' concatenated outputs), unfused q/k/v and Eva's q/v-only biases, DINOv3's registers without an
absolute position embedding; Wanda on the gated MLP's two input matrices, the LRP rules for rotations and
gated products, circuit edges (the Eva refusals are in tests/test_families.py).

Random weights at the real widths and patch sizes, 2 blocks, small images; LayerScale set to O(1).
Tolerances: the default path runs timm's kernels on identically laid-out tensors (bit-identical); the
explicit path and the re-derivations are within 1e-5 relative (fp32 summation order).
"""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F

RTOL = 1e-5

# id: (timm name, kwargs, prefix token labels)
FAMILIES = {
    # unfused q/k/v, SwiGLU with its inner norm, a norm on the heads' outputs, 'cat' RoPE, CLS + projection
    "eva02_clip": ("eva02_base_patch16_clip_224", dict(img_size=64), ["CLS"]),
    # fused q/k/v with q/v biases, packed SwiGLU (GluMlp), average pooling + fc_norm, a 10-class head
    "eva02_packed": ("eva02_tiny_patch14_224", dict(img_size=56, num_classes=10), ["CLS"]),
    # 4 registers, LayerScale, DINOv3 RoPE (half rotation), no absolute position embedding, eps 1e-5
    "dinov3": ("vit_small_patch16_dinov3", dict(img_size=64, global_pool="token", num_classes=10),
               ["CLS", "REG0", "REG1", "REG2", "REG3"]),
}


def _make(name: str, seed: int = 0, depth: int = 2, **kwargs) -> torch.nn.Module:
    """Random-init timm Eva (2 blocks by default) with O(1) LayerScale (Eva's ``gamma_1``/``gamma_2``) and
    non-zero biases, in eval mode."""
    torch.manual_seed(seed)
    model = timm.create_model(name, pretrained=False, depth=depth, **kwargs).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param_name, param in model.named_parameters():
            if param_name.endswith(("gamma_1", "gamma_2")):
                param.copy_(torch.rand(param.shape, generator=generator) + 0.5)
            elif param_name.endswith(("bias", "q_bias", "v_bias")):
                param.add_(0.02 * torch.randn(param.shape, generator=generator))
    return model


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request):
    """(id, timm model, HookedViT, images)."""
    from hooked_vit import HookedViT

    name, kwargs, _ = FAMILIES[request.param]
    timm_model = _make(name, **kwargs)
    size = kwargs["img_size"]
    images = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(3))
    return request.param, timm_model, HookedViT.from_timm(timm_model), images


def _close(actual: torch.Tensor, expected: torch.Tensor, rtol: float = RTOL) -> None:
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    error = float(((actual - expected).abs().max() / expected.abs().max()).detach())
    assert error <= rtol, error


def test_output_equals_timm_and_round_trips(family, tmp_path):
    from hooked_vit import HookedViT

    key, timm_model, model, images = family
    with torch.no_grad():
        expected = timm_model(images)
        assert torch.equal(model(images), expected)  # bit-identical on the default path
        logits, cache = model.run_with_cache(images)
        assert torch.equal(model.to_timm()(images), expected)
    _close(logits, expected)  # every hook cached: explicit attention and LayerNorm scales
    assert model.to_str_tokens()[:len(FAMILIES[key][2]) + 1] == FAMILIES[key][2] + ["r0c0"]
    model.save_pretrained(tmp_path / key)
    loaded = HookedViT.from_pretrained(tmp_path / key)
    assert loaded.cfg == model.cfg
    with torch.no_grad():
        assert torch.equal(loaded(images), expected)


def test_one_block_at_the_real_shapes_equals_timm():
    """EVA-02-CLIP B/16 (every Eva part but registers) and DINOv3 B/16 at 224 px: width 768, 12 heads,
    196 patches; bit-identical by default, 1e-5 with every hook cached."""
    from hooked_vit import HookedViT

    images = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(8))
    for name, kwargs in (("eva02_base_patch16_clip_224", {}), ("vit_base_patch16_dinov3", dict(global_pool="token"))):
        timm_model = _make(name, img_size=224, depth=1, **kwargs)
        model = HookedViT.from_timm(timm_model)
        with torch.no_grad():
            expected = timm_model(images)
            assert torch.equal(model(images), expected)
            _close(model.run_with_cache(images)[0], expected)


def _rotate(x: torch.Tensor, table: torch.Tensor, half: bool) -> torch.Tensor:
    """``x * cos + rotate(x) * sin`` with sin, cos = the table's halves; pairs (2j, 2j+1) or (i, i + d/2)."""
    sin, cos = table.chunk(2, dim=-1)
    if half:
        first, second = x.chunk(2, dim=-1)
        rotated = torch.cat([-second, first], dim=-1)
    else:
        rotated = torch.stack([-x[..., 1::2], x[..., ::2]], dim=-1).flatten(-2)
    return x * cos + rotated * sin


def _layer_norm(x: torch.Tensor, norm: torch.nn.Module) -> torch.Tensor:
    centred = x - x.mean(-1, keepdim=True)
    return centred / (centred.pow(2).mean(-1, keepdim=True) + norm.eps).sqrt() * norm.weight + norm.bias


def test_block_equals_a_rederivation_from_timms_parameters(family):
    """Block 1 computed by hand from timm's Eva parameters and timm's rotary table (the rotation
    itself written here), hook by hook."""
    key, timm_model, model, images = family
    with torch.no_grad():
        _, cache = model.run_with_cache(images)
    block, cfg = timm_model.blocks[1], model.cfg
    attn, mlp, p = block.attn, block.mlp, "blocks.1."
    x = cache[p + "hook_resid_pre"]
    batch, pos, d_model = x.shape
    heads, d_head = attn.num_heads, attn.head_dim
    h = _layer_norm(x, block.norm1)
    if attn.qkv is not None:
        bias = torch.cat([attn.q_bias, torch.zeros_like(attn.q_bias), attn.v_bias]) if attn.q_bias is not None else None
        q, k, v = F.linear(h, attn.qkv.weight, bias).view(batch, pos, 3, heads, d_head).unbind(2)
    else:
        q, k, v = (proj(h).view(batch, pos, heads, d_head) for proj in (attn.q_proj, attn.k_proj, attn.v_proj))
    n = cfg.n_prefix_tokens
    table = timm_model.rope.get_embed(shape=[cfg.grid_size] * 2)  # [n_patches, 2 d_head]
    half = timm_model.rope.rotate_half
    rot_q = torch.cat([q[:, :n], _rotate(q[:, n:].transpose(1, 2), table, half).transpose(1, 2)], dim=1)
    rot_k = torch.cat([k[:, :n], _rotate(k[:, n:].transpose(1, 2), table, half).transpose(1, 2)], dim=1)
    for name, expected in (("q", q), ("k", k), ("v", v), ("rot_q", rot_q), ("rot_k", rot_k)):
        _close(cache[p + f"attn.hook_{name}"], expected)
    scores = torch.einsum("bqhd,bkhd->bhqk", rot_q, rot_k) / d_head**0.5
    z = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v)
    _close(cache[p + "attn.hook_z"], z)
    z = z.reshape(batch, pos, d_model)
    if cfg.attn_norm:
        z = _layer_norm(z, attn.norm)
        _close(cache[p + "attn.norm.hook_normalized"], z)
    attn_out = attn.proj(z) * (block.gamma_1 if block.gamma_1 is not None else 1)
    _close(cache[p + "hook_attn_out"], attn_out)
    h2 = _layer_norm(x + attn_out, block.norm2)
    if cfg.gated_mlp:
        fc1_g = mlp.fc1_g if hasattr(mlp, "fc1_g") else None
        gate, linear = (fc1_g(h2), mlp.fc1_x(h2)) if fc1_g is not None else mlp.fc1(h2).chunk(2, dim=-1)
        _close(cache[p + "mlp.hook_pre"], gate)
        _close(cache[p + "mlp.hook_pre_linear"], linear)
        hidden = gate * torch.sigmoid(gate) * linear  # SiLU(gate) * linear
    else:
        pre = mlp.fc1(h2)
        _close(cache[p + "mlp.hook_pre"], pre)
        hidden = F.gelu(pre)
    _close(cache[p + "mlp.hook_post"], hidden)
    if cfg.mlp_norm:
        hidden = _layer_norm(hidden, mlp.norm)
        _close(cache[p + "mlp.norm.hook_normalized"], hidden)
    mlp_out = mlp.fc2(hidden) * (block.gamma_2 if block.gamma_2 is not None else 1)
    _close(cache[p + "hook_mlp_out"], mlp_out)
    _close(cache[p + "hook_resid_post"], x + attn_out + mlp_out)


def test_hooks_fire_in_the_tables_order_with_its_shapes_and_sites_exist(family):
    from hooked_vit.hook_table import hook_names, hook_shape

    key, _, model, images = family
    fired = []
    with torch.no_grad():
        model.run_with_hooks(images[:1], fwd_hooks=[(lambda name: True,
                                                     lambda act, hook: fired.append((hook.name, tuple(act.shape))))])
    table = [n for n in hook_names(model.cfg.n_layers, model.cfg) if not n.endswith("hook_result")]
    assert [name for name, _ in fired] == table
    assert all(shape == hook_shape(name, model.cfg, 1) for name, shape in fired)
    cfg = model.cfg
    expected = {"attn.hook_rot_q": cfg.rope is not None, "mlp.hook_pre_linear": cfg.gated_mlp,
                "mlp.norm.hook_normalized": cfg.mlp_norm, "attn.norm.hook_normalized": cfg.attn_norm,
                "attn.hook_result": not cfg.attn_norm}
    for name, present in expected.items():
        assert (f"blocks.0.{name}" in model.hook_dict) == present, name
    assert len(model.sites) == 8 * cfg.n_layers and model.sites[1, "mlp_act"].hook_name == "blocks.1.mlp.hook_post"
    assert model.units("blocks.1.mlp.hook_post").kind == "neuron"


def test_wanda_prunes_both_gated_inputs_and_the_norms_outputs_by_its_definition():
    """EVA-02 CLIP layout: fc1_g and fc1_x read ln2's output, proj reads the norm on z, fc2 the MLP's
    inner norm; each scored |W| * ||input|| over every calibration token (re-derived from hooks here).
    The layout at a quarter of the width (the scores do not depend on it)."""
    from hooked_vit import HookedViT
    from hooked_vit.pruning import prune

    timm_model = _make("eva02_base_patch16_clip_224", img_size=32, num_classes=10, embed_dim=192, num_heads=3)
    model = HookedViT.from_timm(timm_model)
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    inputs = {"attn.qkv": "ln1.hook_normalized", "attn.proj": "attn.norm.hook_normalized",
              "mlp.fc1_g": "ln2.hook_normalized", "mlp.fc1_x": "ln2.hook_normalized", "mlp.fc2": "mlp.norm.hook_normalized"}
    with torch.no_grad():
        _, cache = model.run_with_cache(images)
    dense = {name: model.blocks[1].get_submodule(name).weight.detach().clone() for name in inputs}
    prune(model, "wanda", 0.5, calibration=images)
    for name, hook in inputs.items():
        x = cache[f"blocks.1.{hook}"].double().flatten(0, 1)
        score = dense[name].abs().double() * x.norm(dim=0)
        n_pruned = int(dense[name].shape[1] * 0.5)
        expected = torch.ones_like(score, dtype=torch.bool)
        expected.scatter_(1, score.argsort(dim=1)[:, :n_pruned], False)
        assert torch.equal(model.blocks[1].get_submodule(name).weight_mask.bool(), expected), name
    with torch.no_grad():  # the pruned model converts back to timm's unfused layout
        _close(model.to_timm()(images), model(images), rtol=1e-6)


def test_rotary_relevance_is_the_z_rule_through_the_rotation_matrix():
    """Chefer's relevance through RoPE against the z-rule on the explicit per-position rotation matrix."""
    from analyses.model.lrp import _rotary_relevance
    from hooked_vit import HookedViT

    for name, kwargs in (("eva02_tiny_patch14_224", dict(img_size=28)), ("vit_small_patch16_dinov3", dict(img_size=32))):
        model = HookedViT.from_timm(_make(name, **kwargs))
        attn, cfg = model.blocks[0].attn, model.cfg
        generator = torch.Generator().manual_seed(1)
        x = torch.randn(2, cfg.n_heads, cfg.n_ctx, cfg.d_head, generator=generator, dtype=torch.float64)
        relevance = torch.randn(x.shape, generator=generator, dtype=torch.float64)
        table = model.rope.get_embed(shape=[cfg.grid_size] * 2).double()
        eye = torch.eye(cfg.d_head, dtype=torch.float64)
        # column j of position t's matrix: the rotation of the unit vector e_j
        matrices = _rotate(eye[None], table[:, None], model.rope.rotate_half).transpose(-1, -2)  # [t, out, in]
        n = cfg.n_prefix_tokens
        rotated = torch.cat([x[:, :, :n], torch.einsum("toi,bhti->bhto", matrices, x[:, :, n:])], dim=2)
        terms = torch.einsum("toi,bhti->bhtoi", matrices, x[:, :, n:])  # contribution of input i to output o
        stabilised = rotated[:, :, n:, :, None] + 1e-9  # the reference's stabiliser (lrp.safe_divide)
        expected = (terms / stabilised * relevance[:, :, n:, :, None]).sum(-2)
        actual = _rotary_relevance(attn, x, rotated, relevance)
        torch.testing.assert_close(actual[:, :, n:], expected, rtol=1e-9, atol=1e-9)
        assert torch.equal(actual[:, :, :n], relevance[:, :, :n])


def test_attnlrp_gated_product_gives_each_operand_half_and_maps_run(family):
    """AttnLRP's uniform rule at ``act(gate) * linear``: relevance (input x gradient under the rule's
    hooks) at the gate's and the linear branch's pre-activations sums to that of the product; Chefer's
    and AttnLRP's maps are finite on every Eva layout, and Chefer's relevance is conserved per block."""
    from analyses.model.lrp import attn_lrp, attn_lrp_hooks, chefer_cache, chefer_propagate, transformer_attribution

    key, _, model, images = family
    if model.cfg.n_classes != 10:
        pytest.skip("needs a classifier head")
    if model.cfg.gated_mlp:
        taken = {}

        def take(act, hook):
            taken[hook.name] = act
            return act

        names = ["blocks.1.mlp.hook_pre", "blocks.1.mlp.hook_pre_linear", "blocks.1.mlp.hook_post"]
        with torch.enable_grad(), model.hooks(fwd_hooks=attn_lrp_hooks(model) + [(n, take) for n in names]):
            score = model(images)[:, 3].sum()
            grads = torch.autograd.grad(score, [taken[n] for n in names])
        pre, pre_linear, post = ((taken[n].detach() * g).sum(-1) for n, g in zip(names, grads))
        torch.testing.assert_close(pre, post / 2, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(pre_linear, post / 2, rtol=1e-4, atol=1e-6)
        assert float(post.abs().sum()) > 0
    for maps in (transformer_attribution(model, images), attn_lrp(model, images)):
        assert maps.shape == (2, model.cfg.grid_size, model.cfg.grid_size) and bool(torch.isfinite(maps).all())
    relevance = chefer_propagate(model, chefer_cache(model, images), dtype=torch.float64)
    for layer in range(model.cfg.n_layers):
        torch.testing.assert_close(relevance.resid_pre[layer].sum((1, 2)), torch.ones(2, dtype=torch.float64), rtol=1e-5, atol=0)


def test_circuit_edges_count_both_gated_matrices():
    from analyses.circuit.edges import dense_edge_count, edge_counts
    from hooked_vit import HookedViT

    model = HookedViT.from_timm(_make("eva02_tiny_patch14_224", img_size=28))
    d, d_mlp = model.cfg.d_model, model.cfg.d_mlp
    per_block = 3 * d * d + d * d + 2 * d_mlp * d + d_mlp * d  # qkv, proj, fc1_g, fc1_x, fc2
    assert dense_edge_count(model) == model.cfg.n_layers * per_block
    nodes = torch.ones(1, model.sites.n_units, dtype=torch.bool)
    assert int(edge_counts(model, nodes)[0]) == dense_edge_count(model)
    only_act = torch.zeros_like(nodes)  # mlp_act and norm2 of block 0: the two fc1 matrices' edges
    offsets = torch.tensor([0] + [s.width for s in model.sites]).cumsum(0)
    for i, site in enumerate(model.sites):
        if (site.layer, site.name) in ((0, "mlp_act"), (0, "norm2")):
            only_act[0, offsets[i]:offsets[i + 1]] = True
    assert int(edge_counts(model, only_act)[0]) == 2 * d_mlp * d


def test_tl_weight_processing_and_per_head_results_are_refused_where_they_do_not_apply():
    from hooked_vit import HookedViT
    from hooked_vit.errors import InvalidArgumentError

    model = HookedViT.from_timm(_make("eva02_base_patch16_clip_224", img_size=32))
    with pytest.raises(InvalidArgumentError, match="attn_norm"):
        model.set_use_attn_result(True)
    with pytest.raises(InvalidArgumentError, match="timm Eva"):
        model.process_weights_(fold_ln=True)
    assert torch.equal(model.W_gate[1], model.blocks[1].mlp.fc1_g.weight.T)
    assert torch.equal(model.W_pos, model.pos_embed[0])  # EVA-02 adds a learned absolute embedding to RoPE
    dinov3 = HookedViT.from_timm(_make("vit_small_patch16_dinov3", img_size=32))
    assert dinov3.pos_embed is None and not bool(dinov3.W_pos.any())  # RoPE only


def test_each_levels_core_runs_on_an_eva_with_every_part(tmp_path):
    """A 2-block Eva with RoPE, SwiGLU, both inner norms and a 10-class head on 32 px digits (random
    weights): the neuron level's unit ranking on the gated product, an SAE at the last block, a learned
    circuit mask over all 16 sites, every model-level map, and Wanda, each on a small slice."""
    from analyses.circuit.config import CircuitConfig
    from analyses.circuit.discovery import discover_circuit
    from analyses.common.ablation import load_or_compute_means
    from analyses.layer.config import SAETrainConfig
    from analyses.layer.sae import train_sae
    from analyses.model.lrp import METHODS, attribution_map
    from analyses.neuron.analysis import ModelAnalysis
    from analyses.neuron.config import NeuronConfig
    from hooked_vit import HookedViT
    from hooked_vit.data import calibration_sample, load_dataset
    from hooked_vit.evaluation import evaluate
    from hooked_vit.pruning import prune

    timm_model = _make("eva02_tiny_patch14_224", img_size=32, patch_size=4, embed_dim=64, num_heads=2,
                       num_classes=10, scale_mlp=True, scale_attn_inner=True)
    model = HookedViT.from_timm(timm_model)
    assert (model.cfg.gated_mlp, model.cfg.mlp_norm, model.cfg.attn_norm, model.cfg.rope["rope_type"]) == (
        True, True, True, "cat")
    val = calibration_sample(load_dataset("digits", split="val", model=model), 40, seed=0)
    train = calibration_sample(load_dataset("digits", split="train", model=model), 100, seed=0)
    name = "eva_digits_test"
    means = load_or_compute_means(model, train, show_progress=False)
    record = ModelAnalysis(model, val, means, NeuronConfig(model=name, top_k=2, blocks=(1,), classes=(3,)),
                           show_progress=False).class_record(3)["blocks"]["1"]
    assert len(record["units"]) == 2 and all(0.0 <= s <= 1.0 for s in record["unit_selectivity"])
    run = train_sae(model, train, SAETrainConfig(k=4, expansion_factor=2, training_samples=256, train_batch_size=32,
                                                 buffer_size=128), progress=False)
    assert run.sae.cfg.d_in == model.cfg.d_model
    circuit = discover_circuit(model, train, 3, CircuitConfig(model=name, steps=2, batch_size=4, n_eval=4),
                               show_progress=False)
    assert 0.0 <= circuit.metrics["node_frac"] <= 1.0
    images = val.tensors(show_progress=False)[0][:2]
    for method in METHODS:
        maps = attribution_map(method, model, images)
        assert maps.shape == (2, 8, 8) and bool(torch.isfinite(maps).all()), method
    prune(model, "wanda", 0.5, calibration=train.tensors(show_progress=False)[0][:16])
    assert float((model.blocks[0].mlp.fc1_x.weight == 0).float().mean()) == pytest.approx(0.5, abs=0.01)
    assert 0.0 <= evaluate(model, val, progress=False)["top1"] <= 1.0
