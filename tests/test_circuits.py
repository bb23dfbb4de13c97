"""Circuit level (analyses.circuit): exactness of the gates (all on == unmasked, all off == the
all-means model), the surrogate gradient of eq. 13, edge counts against a loop over weights,
batched classes == one class at a time, save/load, the objective, and bad input."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch


@pytest.fixture(scope="module")
def digits_model():
    from hooked_vit import HookedViT

    return HookedViT.from_pretrained("deit3_tiny_digits")


@pytest.fixture(scope="module")
def digits(digits_model):
    """(train, val): 300 train and 120 val images of the builtin digits."""
    from hooked_vit.data import calibration_sample, load_dataset

    train = calibration_sample(load_dataset("digits", split="train", model=digits_model), 300, seed=0)
    val = calibration_sample(load_dataset("digits", split="val", model=digits_model), 120, seed=0)
    return train, val


@pytest.fixture(scope="module")
def digits_means(digits_model, digits, tmp_path_factory):
    from analyses.common.ablation import load_or_compute_means

    return load_or_compute_means(digits_model, digits[0], directory=tmp_path_factory.mktemp("means"),
                                 hooks=digits_model.sites.hook_names, show_progress=False)


@pytest.fixture(scope="module")
def tiny_means(tiny):
    from analyses.common.ablation import compute_means

    images = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    return compute_means(tiny, torch.utils.data.TensorDataset(images, torch.zeros(6, dtype=torch.long)),
                         hooks=tiny.sites.hook_names, show_progress=False)


def all_gates(model, value: float, n_masks: int = 1) -> dict[str, torch.Tensor]:
    return {site.hook_name: torch.full((n_masks, site.width), value) for site in model.sites}


QUICK = dict(steps=6, batch_size=4, lr=0.2, n_eval=6)


# ----------------------------------------------------------------------------- gates
def test_all_masks_on_give_the_unmasked_logits_exactly(tiny, tiny_means):
    from analyses.circuit.replacement import gated_logits, site_references

    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        clean = tiny(images)
        for reference in ("mean", "pooled_mean", "zero"):
            refs = site_references(tiny, reference, tiny_means)
            assert torch.equal(gated_logits(tiny, images, all_gates(tiny, 1.0), refs), clean)
        owner = torch.tensor([0, 1, 1, 0])  # two mask rows, both all-on
        refs = site_references(tiny, "mean", tiny_means)
        assert torch.equal(gated_logits(tiny, images, all_gates(tiny, 1.0, 2), refs, owner), clean)


def test_all_masks_off_give_the_all_means_model(tiny, tiny_means):
    from analyses.circuit.replacement import gated_logits, site_references

    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    # Independent: every site's activation replaced wholesale by its per-position mean.
    hooks = [(site.hook_name, lambda act, hook: tiny_means.means[hook.name].expand_as(act).clone())
             for site in tiny.sites]
    with torch.no_grad():
        expected = tiny.run_with_hooks(images, fwd_hooks=hooks)
        got = gated_logits(tiny, images, all_gates(tiny, 0.0), site_references(tiny, "mean", tiny_means))
        assert torch.equal(got, expected)
        assert not torch.allclose(got, tiny(images))


def test_each_image_sees_only_its_own_mask_row(tiny, tiny_means):
    from analyses.circuit.replacement import gated_logits, site_references

    refs = site_references(tiny, "mean", tiny_means)
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(6))
    generator = torch.Generator().manual_seed(7)
    rows = [{s.hook_name: (torch.rand(1, s.width, generator=generator) > 0.4).float() for s in tiny.sites}
            for _ in range(2)]
    stacked = {name: torch.cat([rows[0][name], rows[1][name]]) for name in rows[0]}
    owner = torch.tensor([1, 0, 0, 1])
    with torch.no_grad():
        batched = gated_logits(tiny, images, stacked, refs, owner)
        for i, row in enumerate(owner.tolist()):
            alone = gated_logits(tiny, images[i:i + 1], rows[row], refs)
            torch.testing.assert_close(batched[i:i + 1], alone, rtol=1e-5, atol=1e-5)
        # The training layout: row c owns 2 consecutive images, applied as a view.
        blocks = gated_logits(tiny, images, stacked, refs, 2)
        torch.testing.assert_close(blocks, gated_logits(tiny, images, stacked, refs, torch.tensor([0, 0, 1, 1])),
                                   rtol=1e-6, atol=1e-6)


def test_surrogate_gradient_matches_eq13():
    from analyses.circuit.gates import heaviside_gate

    m = torch.tensor([-1.0, -0.3, -1e-3, 0.0, 2e-3, 0.5, 1.0], dtype=torch.float64, requires_grad=True)
    for tau in (1.0, 2.5):
        gate = heaviside_gate(m, tau)
        assert torch.equal(gate.detach(), (m.detach() > 0).double())  # exact Heaviside forward
        (grad,) = torch.autograd.grad(gate.sum(), m)
        # eq. 13 evaluated numerically: a central difference of s(tau m).
        h = 1e-6
        numeric = [(1 / (1 + math.exp(-tau * (x + h))) - 1 / (1 + math.exp(-tau * (x - h)))) / (2 * h)
                   for x in m.detach().tolist()]
        torch.testing.assert_close(grad, torch.tensor(numeric, dtype=torch.float64), rtol=1e-6, atol=1e-9)


def test_node_masks_init_and_clamp(tiny):
    from analyses.circuit.gates import NodeMasks

    masks = NodeMasks(tiny.sites, 3, generator=torch.Generator().manual_seed(0))
    assert masks.logits.shape == (3, tiny.sites.n_units)
    logits = masks.logits.detach()
    assert abs(float(logits.mean()) - 0.5) < 0.01 and abs(float(logits.std()) - 0.01) < 0.002
    with torch.no_grad():
        masks.logits.mul_(300.0)
    masks.clamp_(1.0)
    assert float(masks.logits.detach().abs().max()) == 1.0
    parts = masks.split(masks.gates())
    assert [p.shape[1] for p in parts.values()] == [s.width for s in tiny.sites]


# ----------------------------------------------------------------------------- edges
def test_edge_count_matches_a_loop_over_weights(tiny):
    from analyses.circuit.edges import dense_edge_count, edge_counts
    from hooked_vit import HookedViT
    from hooked_vit.pruning.masks import set_mask

    model = HookedViT.from_timm(tiny.to_timm())
    generator = torch.Generator().manual_seed(8)
    for block in model.blocks:  # a hand-made pruning pattern on every matrix
        for linear in (block.attn.qkv, block.attn.proj, block.mlp.fc1, block.mlp.fc2):
            set_mask(linear, torch.rand(linear.weight.shape, generator=generator) > 0.3)
    nodes = torch.rand(2, model.sites.n_units, generator=generator) > 0.5
    cfg = model.cfg
    expected = []
    for c in range(2):
        active = dict(zip(((s.layer, s.name) for s in model.sites),
                          nodes[c].split([s.width for s in model.sites])))
        count = 0
        for layer, block in enumerate(model.blocks):
            a = {name: active[(layer, name)].tolist() for name in ("norm1", "q", "k", "v", "attn_out", "norm2",
                                                                   "mlp_act", "mlp_out")}
            qkv = block.attn.qkv.weight_mask.tolist()
            for r in range(3 * cfg.d_model):
                part, head = ("q", "k", "v")[r // cfg.d_model], (r % cfg.d_model) // cfg.d_head
                for j in range(cfg.d_model):
                    count += qkv[r][j] and a[part][head] and a["norm1"][j]
            proj = block.attn.proj.weight_mask.tolist()
            for r in range(cfg.d_model):
                for j in range(cfg.d_model):
                    count += proj[r][j] and a["attn_out"][r] and a["v"][j // cfg.d_head]
            fc1, fc2 = block.mlp.fc1.weight_mask.tolist(), block.mlp.fc2.weight_mask.tolist()
            for r in range(cfg.d_mlp):
                for j in range(cfg.d_model):
                    count += fc1[r][j] and a["mlp_act"][r] and a["norm2"][j]
            for r in range(cfg.d_model):
                for j in range(cfg.d_mlp):
                    count += fc2[r][j] and a["mlp_out"][r] and a["mlp_act"][j]
        expected.append(count)
    assert edge_counts(model, nodes).tolist() == expected
    every = torch.ones(1, model.sites.n_units, dtype=torch.bool)
    n_present = sum(int(m.weight_mask.sum()) for b in model.blocks
                    for m in (b.attn.qkv, b.attn.proj, b.mlp.fc1, b.mlp.fc2))
    assert edge_counts(model, every).tolist() == [n_present]
    assert dense_edge_count(model) == cfg.n_layers * (4 * cfg.d_model**2 + 2 * cfg.d_model * cfg.d_mlp)
    assert edge_counts(tiny, every).tolist() == [dense_edge_count(tiny)]  # unpruned: every weight


def test_dense_edge_count_of_deit3_base_is_the_issue_number():
    import timm

    from analyses.circuit.edges import dense_edge_count
    from hooked_vit import HookedViT

    with torch.device("meta"):
        model = HookedViT.from_timm(timm.create_model("deit3_base_patch16_224", pretrained=False))
    assert dense_edge_count(model) == 84_934_656
    assert model.sites.n_units == 12 * (4 * 768 + 3 * 12 + 3072)


# ----------------------------------------------------------------------------- objective and metrics
def test_task_losses_match_their_definitions():
    from analyses.circuit.discovery import task_loss

    logits = torch.randn(2, 4, 5, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    classes = torch.tensor([1, 3])
    labels = torch.tensor([[1, 1, 0, 2], [3, 4, 3, 0]])
    got = task_loss(logits, classes, labels, "bce_margin")
    for row, c in enumerate(classes.tolist()):
        total = 0.0
        for i in range(4):
            others = [logits[row, i, j] for j in range(5) if j != c]
            z = float(logits[row, i, c] - torch.logsumexp(torch.stack(others), 0))
            y = float(labels[row, i] == c)
            total += -(y * math.log(1 / (1 + math.exp(-z))) + (1 - y) * math.log(1 - 1 / (1 + math.exp(-z))))
        assert float(got[row]) == pytest.approx(total / 4, rel=1e-9)
    ce = task_loss(logits, classes, labels, "ce_true_label")
    for row in range(2):
        expected = sum(float(torch.logsumexp(logits[row, i], 0) - logits[row, i, labels[row, i]]) for i in range(4)) / 4
        assert float(ce[row]) == pytest.approx(expected, rel=1e-9)


def test_balanced_accuracy_and_ncq():
    from analyses.circuit.metrics import balanced_accuracy, ncq_edges, ncq_eq12

    predicted = torch.tensor([True, False, True, True, False, False])
    is_target = torch.tensor([True, True, False, False, True, False])
    owner = torch.tensor([0, 0, 0, 0, 1, 1])
    # row 0: TPR 1/2, TNR 0/2 -> 0.25; row 1: TPR 0/1, TNR 1/1 -> 0.5
    assert balanced_accuracy(predicted, is_target, owner, 2).tolist() == [0.25, 0.5]
    assert ncq_edges(0.8912, 0.3242) == pytest.approx(0.602, abs=5e-4)  # the paper's dense Table 3 row
    assert ncq_eq12(0.9, 1.0, 0.3) == pytest.approx(0.63)


def test_step_and_linear_schedules():
    from analyses.circuit.config import CircuitConfig
    from analyses.circuit.discovery import lr_schedule

    for schedule, expected in (("step", [1e-2] * 2 + [2e-3] * 2 + [4e-4] * 2),
                               ("linear", [1e-2 * (1 - s / 6) for s in range(6)])):
        param = torch.nn.Parameter(torch.zeros(1))
        optimizer = torch.optim.AdamW([param], lr=1e-2)
        scheduler = lr_schedule(optimizer, CircuitConfig(steps=6, schedule=schedule))
        lrs = []
        for _ in range(6):
            lrs.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            scheduler.step()
        assert lrs == pytest.approx(expected)


# ----------------------------------------------------------------------------- discovery
def test_batched_classes_equal_one_class_at_a_time(digits_model, digits, digits_means):
    from analyses.circuit import CircuitConfig, discover_circuits

    train, val = digits
    config = CircuitConfig(**QUICK)
    together = discover_circuits(digits_model, train, [2, 5], config, val=val, means=digits_means, show_progress=False)
    for circuit in together:
        alone = discover_circuits(digits_model, train, [circuit.class_id], config, val=val, means=digits_means,
                                  show_progress=False)[0]
        torch.testing.assert_close(circuit.mask_logits, alone.mask_logits, rtol=0, atol=1e-5)
        assert all(torch.equal(circuit.nodes[n], alone.nodes[n]) for n in circuit.nodes)
        for key in ("node_frac", "edge_frac", "acc", "acc_full", "acc_ablated", "ncq", "ncq_eq12"):
            assert circuit.metrics[key] == pytest.approx(alone.metrics[key], abs=1e-12)
    # The optimiser moved the masks: some nodes are off, not all.
    assert 0.0 < together[0].metrics["node_frac"] < 1.0


def test_discovery_freezes_the_model_and_keeps_pruned_weights_zero(digits, tmp_path):
    from analyses.circuit import CircuitConfig, discover_circuit
    from hooked_vit import HookedViT
    from hooked_vit.data import train_val_split
    from hooked_vit.pruning import prune

    train, _ = digits
    model = HookedViT.from_pretrained("deit3_tiny_digits").train()
    prune(model, "wanda", 0.5, calibration=train.tensors(show_progress=False)[0][:64])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    # No val given: metrics on a stratified 20 % of train held out from the optimiser.
    circuit = discover_circuit(model, train, 4, CircuitConfig(**QUICK), means_directory=tmp_path,
                               show_progress=False)
    held_out = train_val_split(train, val_fraction=0.2, seed=0)[1]
    assert circuit.metrics["n_eval"] == 2 * min(6, int((held_out.labels == 4).sum()))
    assert circuit.means_path is not None and Path(circuit.means_path).is_file()
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.requires_grad for p in model.parameters()) and model.training  # restored
    assert all(bool((m.weight[~m.weight_mask] == 0).all()) for m in (model.blocks[0].attn.qkv, model.blocks[3].mlp.fc2))
    assert circuit.sparsity == 0.5 and circuit.k == 1e-3  # the embedded model's preset
    assert circuit.metrics["edge_frac"] <= 0.5 + 1e-9  # half the weights are gone


def test_circuit_applied_save_and_load_round_trip(digits_model, digits, digits_means, tmp_path):
    from analyses.circuit import CircuitConfig, discover_circuit
    from analyses.circuit.circuit import ClassCircuit
    from analyses.circuit.replacement import gated_logits

    train, val = digits
    circuit = discover_circuit(digits_model, train, "3", CircuitConfig(**QUICK), val=val, means=digits_means,
                               show_progress=False)
    assert circuit.nodes["blocks.2.mlp.hook_post"].shape == (384,)
    q_heads = circuit.nodes["blocks.1.attn.hook_q"]
    assert q_heads.shape == (4,) and q_heads.dtype == torch.bool
    images = val.tensors(show_progress=False)[0][:8]
    with torch.no_grad(), circuit.applied(digits_model):
        inside = digits_model(images)
    with torch.no_grad():
        gates = {n: m.float().reshape(1, -1) for n, m in circuit.nodes.items()}
        assert torch.equal(inside, gated_logits(digits_model, images, gates, circuit.references))
        assert not torch.equal(inside, digits_model(images))  # hooks removed on exit
    circuit.save(tmp_path / "c3")
    loaded = ClassCircuit.load(tmp_path / "c3", digits_model, means=digits_means)
    assert loaded.class_id == 3 and loaded.metrics == circuit.metrics and loaded.config == circuit.config
    assert all(torch.equal(loaded.nodes[n], circuit.nodes[n]) for n in circuit.nodes)
    assert torch.equal(loaded.mask_logits, circuit.mask_logits)
    with torch.no_grad(), loaded.applied(digits_model):
        assert torch.equal(digits_model(images), inside)
        assert torch.equal(loaded.logits(digits_model, images), inside)
    m = circuit.metrics
    assert m["ncq"] == pytest.approx(m["acc"] * (1 - m["edge_frac"]))
    assert m["ncq_eq12"] == pytest.approx(m["acc"] / m["acc_full"] * (1 - m["node_frac"]))
    assert m["n_nodes"] == sum(int(v.sum()) for v in circuit.nodes.values())


def test_options_ce_loss_pooled_zero_and_frozen_layer_norm(digits_model, digits, digits_means):
    from analyses.circuit import CircuitConfig, discover_circuit
    from analyses.circuit.replacement import gated_logits, site_references

    train, val = digits
    for options in (dict(loss="ce_true_label"), dict(reference="pooled_mean"), dict(reference="zero"),
                    dict(freeze_ln=True, schedule="linear")):
        circuit = discover_circuit(digits_model, train, 1, CircuitConfig(**{**QUICK, "steps": 2, **options}),
                                   val=val, means=digits_means, show_progress=False)
        assert circuit.config.loss == options.get("loss", "bce_margin")  # the choice travels with the result
        assert 0.0 <= circuit.metrics["acc"] <= 1.0
    images = val.tensors(show_progress=False)[0][:4]
    refs = site_references(digits_model, "mean", digits_means)
    with torch.no_grad():  # all on with frozen LayerNorm scales: the clean model (explicit LN, so to rounding)
        frozen = gated_logits(digits_model, images, all_gates(digits_model, 1.0), refs, freeze_ln=True)
        torch.testing.assert_close(frozen, digits_model(images), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("kwargs, message", [
    (dict(k=-1.0), "k=-1.0 is invalid"), (dict(steps=0), "steps=0 is invalid"), (dict(batch_size=-2), "batch_size"),
    (dict(loss="mse"), "loss='mse' is invalid"), (dict(sparsities=(0.0, 1.0)), "sparsities"),
    (dict(reference="median"), "reference"), (dict(schedule="cosine"), "schedule"), (dict(lr=0.0), "lr=0.0"),
])
def test_bad_config_is_a_one_line_error(kwargs, message):
    from analyses.circuit import CircuitConfig

    with pytest.raises(ValueError, match=message) as info:
        CircuitConfig(**kwargs)
    assert "\n" not in str(info.value)


def test_bad_class_and_foreign_mask_are_errors(digits_model, digits, digits_means, tiny, tmp_path):
    from analyses.circuit import CircuitConfig, discover_circuit
    from analyses.circuit.circuit import ClassCircuit

    train, val = digits
    with pytest.raises(ValueError, match=r"class index 12 out of range \[0, 10\)"):
        discover_circuit(digits_model, train, 12, CircuitConfig(**QUICK), val=val, means=digits_means)
    circuit = discover_circuit(digits_model, train, 0, CircuitConfig(**{**QUICK, "steps": 1}), val=val,
                               means=digits_means, show_progress=False)
    circuit.save(tmp_path / "c0")
    with pytest.raises(ValueError, match="another architecture"):
        ClassCircuit.load(tmp_path / "c0", tiny)
    with pytest.raises(FileNotFoundError, match="holds no complete circuit"):
        ClassCircuit.load(tmp_path / "nothing", digits_model)
