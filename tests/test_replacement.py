"""The replacement level (residual replacement model, Kim et al. 2025): the replacement forward, a node
score and an edge weight re-derived by autograd on a hand-built two-SAE model, error-node
exactness, joint SAE training (with its schedule, resumed exactly, and under torchrun: two
processes on half batches land on the one-process SAEs), the faithfulness curves' end points,
sae-lens save/load, the spurious-correlation split and its marker features, bad settings, and the
level end to end on a tiny config."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import make_timm


@pytest.fixture(scope="module")
def three_blocks():
    """A 3-block DeiT-III (width 32, 17 tokens, 10 classes): two replaced layers."""
    from hooked_vit import HookedViT

    model = HookedViT.from_timm(make_timm("deit3_small_patch16_224", depth=3, img_size=32, patch_size=8,
                                          embed_dim=32, num_heads=2, num_classes=10))
    return model.eval()


@pytest.fixture(scope="module")
def images():
    return torch.randn(12, 3, 32, 32, generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def rm(three_blocks, images):
    """Untrained (random, unit-norm decoder) TopK SAEs of width 48, k=6, with medians over ``images``."""
    from analyses.replacement.replacement import ReplacementModel, compute_medians
    from analyses.replacement.saes import inference_sae, resid_hooks, training_sae

    hooks = resid_hooks(three_blocks)
    saes = {}
    for layer, hook in enumerate(hooks):
        sae = training_sae("topk", 32, 48, 6, 1 / 32, "cpu", seed=layer)
        with torch.no_grad():
            sae.b_enc.normal_(0, 0.1, generator=torch.Generator().manual_seed(layer))
            sae.b_dec.normal_(0, 0.1, generator=torch.Generator().manual_seed(10 + layer))
        saes[hook] = inference_sae(sae, hook, None)
    return ReplacementModel(saes, compute_medians(three_blocks, saes, images[:8]), "logit")


def _stream(model, rm, x, start, stop=None):
    """Blocks ``start``.. of ``model`` from residual ``x`` (entering block ``start``), each replaced layer
    read through ``replace(layer, x)`` until ``stop``; logits at the end."""
    for layer in range(start, model.cfg.n_layers):
        x = model.blocks[layer](x)
        if stop is not None and layer == stop:
            return x
    return model._head(x)


def test_replacement_forward_is_the_reconstruction_chain_and_exact_with_error_nodes(three_blocks, rm, images):
    model = three_blocks
    with torch.no_grad():
        x = model(images, stop_at_layer=0)
        for layer in range(model.cfg.n_layers):
            x = model.blocks[layer](x)
            if layer < model.cfg.n_layers - 1:
                sae = rm.saes[f"blocks.{layer}.hook_resid_post"]
                x = sae.decode(sae.encode(x))
        expected = model._head(x)
        with rm.replaced(model, error=False):
            replaced = model(images)
        with rm.replaced(model, error=True):
            exact = model(images)
        plain = model(images)
    torch.testing.assert_close(replaced, expected, rtol=1e-5, atol=1e-5)
    assert (replaced - plain).abs().max() > 1e-2  # random SAEs do change the output
    assert (exact - plain).abs().max() < 1e-5


def _standardize(x):
    mu = x.mean(-1, keepdim=True)
    std = (x - mu).std(-1, keepdim=True)
    return (x - mu) / (std + 1e-5), mu, std


def test_node_scores_and_an_edge_match_autograd_on_the_hand_built_model(three_blocks, rm, images):
    model, image, target = three_blocks, images[8:9], 4
    graph = rm.attribute(model, image, target, objective="logit")
    sae0, sae1 = rm.saes["blocks.0.hook_resid_post"], rm.saes["blocks.1.hook_resid_post"]
    med0, med1 = rm.medians["blocks.0.hook_resid_post"], rm.medians["blocks.1.hook_resid_post"]
    with torch.no_grad():
        x0 = model.blocks[0](model(image, stop_at_layer=0))[0]
        _, mu0, std0 = _standardize(x0)
        z0 = sae0.encode(x0)
        err0 = x0 - ((z0 @ sae0.W_dec + sae0.b_dec) * std0 + mu0)
    # layer 0 as a function of its latents and an additive error: the rest of the model on top
    z = z0.clone().requires_grad_(True)
    e = err0.clone().requires_grad_(True)
    x1 = model.blocks[1](((z @ sae0.W_dec + sae0.b_dec) * std0 + mu0 + e)[None])
    logit = model._head(model.blocks[2](x1))[0, target]
    gz, ge = torch.autograd.grad(logit, [z, e])
    torch.testing.assert_close(graph.nodes[0], (gz * (z0 - med0["latents"])).sum(0), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(graph.error[0], (ge * (err0 - med0["error"])).sum(), rtol=1e-4, atol=1e-5)
    # the downstream latents' gradient, the same way at layer 1
    with torch.no_grad():
        x1c = x1.detach()[0]
        _, mu1, std1 = _standardize(x1c)
        z1 = sae1.encode(x1c)
        err1 = x1c - ((z1 @ sae1.W_dec + sae1.b_dec) * std1 + mu1)
    w = z1.clone().requires_grad_(True)
    (s1,) = torch.autograd.grad(model._head(model.blocks[2](((w @ sae1.W_dec + sae1.b_dec) * std1 + mu1 + err1)[None]))[0, target], w)
    torch.testing.assert_close(graph.nodes[1], (s1 * (z1 - med1["latents"])).sum(0), rtol=1e-4, atol=1e-5)
    # the edge from latent i (layer 0) to latent o (layer 1): d/dz0 of sum_t s1 * z1 through block 1
    # (the downstream standardisation's std held constant), times (z0 - median), over tokens
    i = int(torch.argmax((z0 != med0["latents"]).float().sum(0)))
    o = int(torch.argmax((s1 * z1).abs().sum(0)))
    z = z0.clone().requires_grad_(True)
    y = model.blocks[1](((z @ sae0.W_dec + sae0.b_dec) * std0 + mu0 + err0)[None])[0]
    mu = y.mean(-1, keepdim=True)
    ys = (y - mu) / ((y - mu).std(-1, keepdim=True).detach() + 1e-5)
    hidden = (ys - sae1.b_dec) @ sae1.W_enc + sae1.b_enc
    top = torch.topk(hidden, sae1.cfg.k, dim=-1)
    acts = torch.zeros_like(hidden).scatter(-1, top.indices, top.values.relu())
    (gi,) = torch.autograd.grad((acts[:, o] * s1[:, o]).sum(), z)
    expected = float((gi[:, i] * (z0[:, i] - med0["latents"][:, i])).sum())
    assert abs(expected) > 1e-6
    assert graph.edge(0, i, o) == pytest.approx(expected, rel=1e-4, abs=1e-6)
    # the last layer's latents feed the logit with their score; the error column closes each row
    assert graph.edge(1, o, "logit") == pytest.approx(float(graph.nodes[1][o]))
    assert float(graph.edges[0][i].sum()) == pytest.approx(float(graph.nodes[0][i]), rel=1e-4, abs=1e-6)


def test_edges_of_images_taken_one_at_a_time_equal_all_at_once(three_blocks, rm, images, monkeypatch):
    """Under a memory budget of one image per pass the edges (and so the graph) are the same."""
    import analyses.replacement.replacement as module

    together = rm.attribute(three_blocks, images[:3], 2)
    monkeypatch.setattr(module, "IMAGE_FLOATS", 1)
    apart = rm.attribute(three_blocks, images[:3], 2)
    for a, b in zip(together.edges, apart.edges, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert float(together.edges[0].abs().max()) > 0


def test_graph_prunes_saves_loads_and_plots(three_blocks, rm, images, tmp_path):
    from analyses.replacement.graph import AttributionGraph

    graph = rm.attribute(three_blocks, images[:2], 1)
    pruned = graph.prune(5)
    assert sum(len(k) for k in pruned.kept) == 5
    top = torch.sort(torch.cat(graph.nodes), descending=True).values[:5]
    assert torch.equal(torch.sort(torch.cat([graph.nodes[l][k] for l, k in enumerate(pruned.kept)]),
                                  descending=True).values, top)
    pruned.save(tmp_path / "g.json")
    loaded = AttributionGraph.load(tmp_path / "g.json")
    i, o = int(pruned.kept_nodes(0)[0]) if len(pruned.kept[0]) else "error", "error"
    assert loaded.edge(0, i, o) == pytest.approx(pruned.edge(0, i, o))
    assert loaded.error.tolist() == pytest.approx(graph.error.tolist())
    pruned.plot(tmp_path / "g.png")
    assert (tmp_path / "g.png").stat().st_size > 1000


def test_faithfulness_curves_start_and_end_at_the_model(three_blocks, rm, images):
    model = three_blocks
    with torch.no_grad():
        labels = model(images).argmax(1)
    table = rm.faithfulness(model, (images, labels), fractions=(0, 0.1, 1), n_images=6, batch_size=4)
    clean = model(images).gather(1, labels[:, None])[:, 0]
    chosen = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))[:6]
    for method in ("attribution", "random", "neuron"):
        _, full = table.curve(method, "insertion", "logit")
        _, none_deleted = table.curve(method, "deletion", "logit")
        assert full[-1] == pytest.approx(float(clean[chosen].mean().detach()), abs=1e-4)  # every node kept: the model
        assert none_deleted[0] == pytest.approx(float(clean[chosen].mean().detach()), abs=1e-4)
        assert table.curve(method, "insertion", "accuracy")[1][-1] == 1.0
    aucs = {(r["method"], r["mode"]): r for r in table.aucs()}
    assert set(aucs) == {(m, d) for m in ("attribution", "random", "neuron") for d in ("insertion", "deletion")}


def test_joint_training_improves_fve_resumes_exactly_and_the_saes_load_in_sae_lens(three_blocks, images, tmp_path):
    from sae_lens import SAE

    from analyses.replacement.replacement import ReplacementModel, compute_medians
    from analyses.replacement.saes import capture_resid, resid_hooks, train_saes

    data = [(image, 0) for image in torch.randn(64, 3, 32, 32, generator=torch.Generator().manual_seed(5))]

    def fve(saes):
        xs = capture_resid(three_blocks, images, resid_hooks(three_blocks))
        with torch.no_grad():
            return [float(1 - (s.decode(s.encode(x)) - x).pow(2).sum() / (x - x.mean((0, 1))).pow(2).sum())
                    for s, x in zip(saes.values(), xs)]

    kwargs = {"batch_images": 8, "lr": 3e-3, "seed": 1, "log_every": 10, "cls_repeats": 2}
    settings = [(4, 2.0), (6, 1.5)]
    short, _, _ = train_saes(three_blocks, data, settings, steps=1, **kwargs)
    longer, log, _ = train_saes(three_blocks, data, settings, steps=30, **kwargs)
    assert [s.cfg.d_sae for s in longer.values()] == [64, 48]
    assert all(after > before + 0.05 for before, after in zip(fve(short), fve(longer)))
    assert [r["step"] for r in log] == [10, 20, 30]
    for sae in longer.values():
        torch.testing.assert_close(sae.W_dec.norm(dim=-1), torch.ones(sae.cfg.d_sae))

    class Counted(list):  # counts the images fetched
        fetched = 0

        def __getitem__(self, index):
            Counted.fetched += 1
            return super().__getitem__(index)

    # killed after 20 steps (checkpoint every 10), then resumed to 30: only the last 10 steps run again
    train_saes(three_blocks, data, settings, steps=20, checkpoint=tmp_path / "state.pt", checkpoint_every=10, **kwargs)
    resumed, resumed_log, _ = train_saes(three_blocks, Counted(data), settings, steps=30, checkpoint=tmp_path / "state.pt",
                                         checkpoint_every=10, **kwargs)
    assert Counted.fetched == 10 * 8 and [r["step"] for r in resumed_log] == [10, 20, 30]
    for hook in longer:  # and it lands where the uninterrupted run does
        torch.testing.assert_close(resumed[hook].W_enc, longer[hook].W_enc)
    rm = ReplacementModel(longer, compute_medians(three_blocks, longer, images[:4]))
    rm.save(tmp_path / "rrm")
    for hook, sae in longer.items():
        plain = SAE.load_from_disk(str(tmp_path / "rrm" / hook))
        assert plain.cfg.normalize_activations == "layer_norm" and plain.cfg.metadata.hook_name == hook
        torch.testing.assert_close(plain.decode(plain.encode(images[0, 0, :17, :32])),
                                   sae.decode(sae.encode(images[0, 0, :17, :32])))
    again = ReplacementModel.load(tmp_path / "rrm", three_blocks)
    for hook in longer:
        torch.testing.assert_close(again.medians[hook]["latents"], rm.medians[hook]["latents"])


def test_the_spurious_split_and_the_marker_features_sit_on_the_marker(three_blocks, rm, images):
    import copy

    from analyses.replacement.replacement import ReplacementModel
    from analyses.replacement.spurious import marker_positions, marker_shares, spurious_split, stamp_marker

    labels = torch.arange(12) % 3
    biased, new_labels, marked = spurious_split(images, labels, 1, rate=0.5, poison=0.25, side=8, value=5.0, seed=0)
    assert int((marked & (labels == 1)).sum()) == 2 and int((marked & (labels != 1)).sum()) == 2
    assert (new_labels[marked] == 1).all() and torch.equal(new_labels[~marked], labels[~marked])
    assert (biased[marked][:, :, :8, :8] == 5.0).all() and torch.equal(biased[~marked], images[~marked])
    positions = marker_positions(three_blocks, 1)  # an 8-pixel square on a 4 x 4 grid of 8-pixel patches
    assert positions.tolist() == [0]
    stamped = stamp_marker(images, 8, 5.0)
    # hand-built: latent 0 of the first SAE reads the marker patch's mean standardised residual
    hooks = rm.hooks
    _, cache = three_blocks.run_with_cache(stamped, names_filter=hooks)
    saes = dict(rm.saes)
    saes[hooks[0]] = sae0 = copy.deepcopy(rm.saes[hooks[0]])
    marker_resid = _standardize(cache[hooks[0]][:, 1])[0]
    direction = marker_resid.mean(0) - sae0.b_dec
    with torch.no_grad():
        sae0.W_enc[:, 0] = 3 * direction / direction.norm()
        sae0.b_enc[0] = -1.5 * float(((marker_resid - sae0.b_dec) @ direction / direction.norm()).min())
    built = ReplacementModel(saes, rm.medians, "logit")
    shares = marker_shares(built, three_blocks, stamped, positions, batch_size=5)
    for layer, hook in enumerate(hooks):  # re-derived token by token
        sae = saes[hook]
        on, total = torch.zeros(sae.cfg.d_sae), torch.zeros(sae.cfg.d_sae)
        for image in range(len(stamped)):
            for patch in range(16):
                z = sae.encode(cache[hook][image, 1 + patch])
                total += z
                on += z if patch == 0 else 0
        fired = total > 0
        torch.testing.assert_close(shares[layer][fired], (on / total)[fired], rtol=1e-4, atol=1e-6)
        assert torch.isnan(shares[layer][~fired]).all()
    # the hand-built latent is found on the marker, and every latent found there fires most on patch 0
    marker = torch.nonzero(shares[0] >= 0.5)[:, 0]
    assert 0 in marker.tolist()
    per_patch = torch.stack([sae0.encode(cache[hooks[0]][:, 1 + p]).sum(0) for p in range(16)])
    assert (per_patch[:, marker].argmax(0) == 0).all()


def test_bad_settings_fail_before_any_work(three_blocks, rm, images):
    from analyses.replacement.config import ReplacementConfig, reference_schedule
    from analyses.replacement.saes import lr_factor
    from hooked_vit.errors import InvalidArgumentError

    with pytest.raises(InvalidArgumentError, match="k holds 2 values"):
        ReplacementConfig(k=(4, 8)).layer_settings(3, 96)
    with pytest.raises(InvalidArgumentError, match="fractions must lie"):
        ReplacementConfig(fractions=(0, 1.5))
    with pytest.raises(InvalidArgumentError, match="architecture"):
        ReplacementConfig(architecture="relu")
    with pytest.raises(InvalidArgumentError, match="spurious_poison must be a number in"):
        ReplacementConfig(spurious_poison=1.5)
    with pytest.raises(InvalidArgumentError, match="target must be a class"):
        rm.attribute(three_blocks, images[:1], 10)
    assert reference_schedule(3, 96) == [(1, 0.25), (16, 2.0), (16, 2.0)]
    assert [lr_factor(step, 10, 0.2) for step in (0, 7, 8, 9)] == [1.0, 1.0, 1.0, 0.5]
    assert reference_schedule(11, 768)[0] == (4, 0.25) and reference_schedule(11, 768)[6] == (128, 4.0)


def test_level_runs_end_to_end_on_a_tiny_config(cache, tmp_path):
    from analyses.common.level import run_level
    from analyses.replacement import Replacement, ReplacementConfig, ReplacementResult
    from hooked_vit import HookedViT
    from hooked_vit.data import load_dataset

    model = HookedViT.from_pretrained("deit3_tiny_digits")
    splits = {"train": load_dataset("digits", split="train", model=model).subset(range(64)),
              "val": load_dataset("digits", split="val", model=model).subset(range(0, 360, 9))}
    config = ReplacementConfig(steps=3, batch_images=8, k=(4,), expansion_factor=(1,), classes=(1,), graph_images=1,
                               node_budget=5, median_images=16, fractions=(0, 0.1, 1), faithfulness_images=4,
                               spurious_steps=2, spurious_epochs=1)
    result = run_level(Replacement(show_progress=False, datasets=splits), config, tmp_path)
    assert [r["replaced"] for r in result.replacement] == ["model", "all layers", *[f"blocks.{l}.hook_resid_post"
                                                                                   for l in range(3)]]
    assert result.replacement[0]["kl"] == 0.0 and len(result.layers) == 3
    assert [g["class"] for g in result.graphs] == [1] and {r["method"] for r in result.aucs} == {
        "attribution", "random", "neuron"}
    assert {r["layer"] for r in result.catalogue} == {0, 1, 2} and len(result.catalogue_summary()) == 3
    spurious = result.spurious_rows()[0]
    assert spurious["class"] == 0 and spurious["train_marked"] > spurious["train_relabelled"] > 0
    assert spurious["original_clean"] == result.replacement[0]["accuracy"]  # the model's val top-1, twice
    for name in ("result.json", "layers.csv", "faithfulness_auc.csv", "faithfulness.png", "graph.png", "replacement.md",
                 "catalogue.png", "catalogue.csv", "spurious.png", "spurious.csv"):
        assert (tmp_path / name).is_file(), name
    assert ReplacementResult.load(tmp_path).aucs == result.aucs
    assert (tmp_path / "sparsity_0" / "graphs" / "class_1.json").is_file()


DDP_SCRIPT = """
import os, sys
import torch
import torch.distributed as dist
sys.path.insert(0, {root!r})
from tests.conftest import make_timm
from hooked_vit import HookedViT
from analyses.replacement.saes import train_saes

dist.init_process_group("gloo")
model = HookedViT.from_timm(make_timm("deit3_small_patch16_224", depth=3, img_size=32, patch_size=8, embed_dim=32,
                                      num_heads=2, num_classes=10)).eval()
data = [(image, 0) for image in torch.randn(32, 3, 32, 32, generator=torch.Generator().manual_seed(5))]
saes, _, _ = train_saes(model, data, [(4, 2.0), (6, 1.5)], steps=int(sys.argv[2]), batch_images=8, lr=3e-3, seed=1,
                        cls_repeats=2, checkpoint=sys.argv[1] + "/state.pt", checkpoint_every=3)
torch.save({{h: s.state_dict() for h, s in saes.items()}}, sys.argv[1] + f"/rank{{dist.get_rank()}}.pt")
dist.destroy_process_group()
"""


@pytest.mark.slow
def test_two_torchrun_processes_train_the_one_process_saes_and_resume(three_blocks, tmp_path):
    """2 gloo processes, each on half of every batch with averaged gradients, end with identical SAEs,
    equal to one process on the whole batches; killed after 3 steps and resumed, the same."""
    from analyses.replacement.saes import train_saes

    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT.format(root=str(Path(__file__).parents[1])))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    for steps in (3, 6):  # the second run resumes from the checkpoint of step 3
        run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                              str(script), str(tmp_path), str(steps)], check=False, capture_output=True, text=True,
                             env=env, timeout=600)
        assert run.returncode == 0, run.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    data = [(image, 0) for image in torch.randn(32, 3, 32, 32, generator=torch.Generator().manual_seed(5))]
    single, _, _ = train_saes(three_blocks, data, [(4, 2.0), (6, 1.5)], steps=6, batch_images=8, lr=3e-3, seed=1,
                              cls_repeats=2)
    for hook, sae in single.items():
        for name, value in sae.state_dict().items():
            assert torch.equal(ranks[0][hook][name], ranks[1][hook][name]), (hook, name)
            torch.testing.assert_close(ranks[0][hook][name], value, rtol=1e-4, atol=1e-5)


LEVEL_ARGS = ["--model", "deit3_tiny_digits", "--steps", "4", "--batch-images", "8", "--k", "4", "--expansion-factor", "1",
              "--classes", "1", "--graph-images", "1", "--node-budget", "5", "--median-images", "16", "--fractions",
              "0,0.1,1", "--faithfulness-images", "4", "--spurious-class", "none", "--no-progress"]


def _same_numbers(a, b):
    """Two result CSVs hold the same rows, numbers within 1e-5."""
    from analyses.common.results import read_csv

    for x, y in zip(read_csv(a), read_csv(b), strict=True):
        assert {k: v if isinstance(v, str) else pytest.approx(v, rel=1e-5, abs=1e-6) for k, v in x.items()} == y


@pytest.mark.slow
def test_the_level_command_under_torchrun_shares_the_units_and_trains_on_every_process(tmp_path):
    """``torchrun --nproc-per-node 2 -m hooked_vit replacement``: the processes share the units and
    train the replacement model together (the numbers equal one process's, 1e-5); then, with the
    replacement model and one unit deleted, only one process has a unit left and both still train
    (the driver's collective prepare; without it the other process leaves the training's all-reduce
    waiting): the unit comes back with the same numbers."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "HOOKED_VIT_DIST_TIMEOUT": "120"}
    one, two = tmp_path / "one", tmp_path / "two"
    subprocess.run([sys.executable, "-m", "hooked_vit", "replacement", *LEVEL_ARGS, "--out", str(one)], check=True,
                   capture_output=True, env=env, timeout=600)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m",
                "hooked_vit", "replacement", *LEVEL_ARGS, "--out", str(two)]
    run = subprocess.run(torchrun, capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("wrote ") == 1 and '"processes": 2' in (two / "done.json").read_text()
    for name in ("replacement.csv", "layers.csv", "faithfulness_auc.csv", "graphs.csv"):
        _same_numbers(one / name, two / name)
    import shutil

    shutil.rmtree(two / "sparsity_0" / "rrm")
    for name in ("sparsity_0/faithfulness.json", "sparsity_0/training_state.pt", "done.json"):
        (two / name).unlink()
    run = subprocess.run(torchrun, capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    _same_numbers(one / "faithfulness_auc.csv", two / "faithfulness_auc.csv")
