"""The MIS level (issue 24): 2AFC tasks re-derived by hand, the MIS formula and the temperature fit
re-derived, synthetic units with known behaviour, the export layout, units of every kind on the
embedded model, CLT latents from a hand-written transcoder folder, and the level end to end on a
tiny setting (with the layer level's SAE layout, the replacement level's and the transcoders level's)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import shutil

import numpy as np
import pytest
import torch

N_IMAGES = 150


@pytest.fixture(scope="module")
def model():
    from hooked_vit import HookedViT

    return HookedViT.from_pretrained("deit3_tiny_digits")


@pytest.fixture(scope="module")
def digits(model):
    from hooked_vit.data import load_dataset

    return load_dataset("digits", split="val", model=model).subset(range(N_IMAGES))


@pytest.fixture(scope="module")
def images(digits):
    return digits.tensors(show_progress=False)


class FakeUnits:
    """Stands in for SiteUnits when activations are made up (synthetic units)."""

    hook_name, kind, layer, position = "synthetic", "synthetic", None, "cls"

    def __init__(self, n: int):
        self.indices = tuple(range(n))

    def __len__(self) -> int:
        return len(self.indices)

    def describe(self) -> dict:
        return {"hook_name": self.hook_name, "indices": list(self.indices)}


def _tasks(acts, images, *, n_tasks=20, n_references=9, quantile=0.1, seed=0, mean=(0.0,) * 3, std=(1.0,) * 3):
    from analyses.mis.tasks import Tasks, draw_tasks

    draws = draw_tasks(acts, n_tasks=n_tasks, n_references=n_references, quantile=quantile, seed=seed)
    return Tasks(FakeUnits(acts.shape[1]), images, acts, draws, n_tasks, n_references, quantile, seed, mean, std)


def test_tasks_are_drawn_as_specified_by_hand():
    """Per unit: sort by activation, pools of ceil(q n); per task K+1 uniform draws (the seeded
    generator, max pool first), the K most extreme are references, the remaining one the query."""
    from analyses.mis.tasks import draw_tasks

    acts = torch.randn(23, 3, generator=torch.Generator().manual_seed(5))
    acts[:, 2] = torch.tensor([float(i % 4) for i in range(23)])  # ties: broken by a seeded shuffle of the images
    n_tasks, k, quantile, seed = 4, 2, 0.2, 7
    draws = draw_tasks(acts, n_tasks=n_tasks, n_references=k, quantile=quantile, seed=seed)
    pool = math.ceil(quantile * 23)
    generator = torch.Generator().manual_seed(seed)
    u_max = torch.rand(3, n_tasks, pool, generator=generator)
    u_min = torch.rand(3, n_tasks, pool, generator=generator)
    shuffled = torch.randperm(23, generator=generator).tolist()
    for u in range(3):
        a = acts[:, u].tolist()
        descending = sorted(range(23), key=lambda i: (-a[i], shuffled.index(i)))
        top, bottom = descending[:pool], descending[::-1][:pool]  # bottom: least activating first
        for t in range(n_tasks):
            for uniform, pool_images, refs, query in (
                    (u_max, top, draws.max_refs, draws.max_query),
                    (u_min, bottom, draws.min_refs, draws.min_query)):
                picked = [pool_images[j] for j in np.argsort(uniform[u, t].numpy(), kind="stable")[:k + 1]]
                picked.sort(key=lambda i: pool_images.index(i))  # most extreme first
                assert refs[u, t].tolist() == picked[:k] and int(query[u, t]) == picked[k]
    with pytest.raises(ValueError, match="n_references"):
        draw_tasks(acts, n_tasks=1, n_references=9, quantile=0.1, seed=0)


def test_ties_of_sparse_units_are_drawn_at_random():
    """A latent active on 3 of 100 images: its max pool is those 3 (most active first) and zeros, its
    min pool zeros; the tied zeros are drawn from all the zero images (a seeded shuffle), not the
    first/last ones in image order, and the unit is counted as tied."""
    from analyses.mis.score import machine_interpretability_score

    g = torch.Generator().manual_seed(2)
    acts = torch.zeros(100, 2)
    acts[[50, 5, 90], 0] = torch.tensor([3.0, 2.0, 1.0])
    acts[:, 1] = torch.randn(100, generator=g)
    images = torch.randn(100, 1, 2, 2, generator=g)
    seen_max, seen_min = set(), set()
    for seed in range(10):
        tasks = _tasks(acts, images, n_tasks=4, n_references=9, quantile=0.1, seed=seed)
        d = tasks.draws
        assert tasks.tied.tolist() == [True, False]
        assert (d.max_refs[0, :, :3] == torch.tensor([50, 5, 90])).all()  # the pool is 10 images: all drawn
        assert (acts[d.max_query[0], 0] == 0).all() and (acts[d.min_query[0], 0] == 0).all()  # undecidable tasks
        seen_max |= set(d.max_refs[0, :, 3:].flatten().tolist()) | set(d.max_query[0].tolist())
        seen_min |= set(d.min_refs[0].flatten().tolist()) | set(d.min_query[0].tolist())
        top10 = set(acts[:, 1].argsort(descending=True)[:10].tolist())  # a dense unit: its 10 most active images
        assert set(d.max_refs[1, 0].tolist()) == top10 - {int(d.max_query[1, 0])}
    # in image order the zeros of the max pool would always be images 0-6 and the min pool 89-99
    assert len(seen_max - {50, 5, 90}) > 30 and len(seen_min) > 30
    scores = machine_interpretability_score(tasks, "pixels")
    summary = scores.summary()
    assert (summary["n_tied"], summary["n_units"]) == (1, 2)
    assert summary["mean_untied"] == pytest.approx(float(scores.mis[1]))
    assert summary["mean"] == pytest.approx(float(scores.mis.mean()))


def test_mis_formula_by_hand_and_temperature_fit(tmp_path):
    """margin = [s(q+,E+) - s(q+,E-)] - [s(q-,E+) - s(q-,E-)], s the mean cosine to a set; MIS the mean of
    sigmoid(margin / T), with the pixels' correlation as similarity; the temperature refit on human answers maximises their likelihood."""
    from analyses.mis.score import fit_temperature, machine_interpretability_score

    g = torch.Generator().manual_seed(0)
    images = torch.randn(40, 3, 4, 4, generator=g)
    acts = torch.randn(40, 3, generator=g)
    tasks = _tasks(acts, images, n_tasks=5, n_references=3, quantile=0.25)
    scores = machine_interpretability_score(tasks, "pixels", temperature=0.3)

    def cos(i, j):  # the pixels backend: the correlation of the two images' pixels
        x, y = images[i].flatten() - images[i].mean(), images[j].flatten() - images[j].mean()
        return float(x @ y / (x.norm() * y.norm()))

    d = tasks.draws
    for u in range(3):
        probabilities = []
        for t in range(5):
            s = {(qn, en): sum(cos(int(q[u, t]), int(e)) for e in refs[u, t]) / 3
                 for qn, q in (("+", d.max_query), ("-", d.min_query)) for en, refs in (("+", d.max_refs), ("-", d.min_refs))}
            margin = (s["+", "+"] - s["+", "-"]) - (s["-", "+"] - s["-", "-"])
            assert scores.margin[u, t].item() == pytest.approx(margin, abs=1e-5)
            probabilities.append(1 / (1 + math.exp(-margin / 0.3)))
        assert scores.mis[u].item() == pytest.approx(sum(probabilities) / 5, abs=1e-5)
    assert scores.similarity == "pixels" and scores.summary()["similarity"] == "pixels"

    # the fit: the log-likelihood's derivative (autograd) vanishes at the fitted slope, and a large
    # sample drawn at a known temperature gives it back
    margins = torch.randn(4000, generator=g)
    answers = torch.rand(4000, generator=g) < torch.sigmoid(margins / 0.25)
    fitted = fit_temperature(margins, answers)
    assert fitted == pytest.approx(0.25, rel=0.1)
    slope = torch.tensor(1 / fitted, dtype=torch.float64, requires_grad=True)
    p = torch.sigmoid(slope * margins.double())
    loglik = (answers.double() * p.log() + (1 - answers.double()) * (1 - p).log()).sum()
    loglik.backward()
    assert abs(slope.grad.item()) < 1e-6
    with pytest.raises(ValueError, match="both correct and incorrect"):
        fit_temperature(margins[:5], torch.ones(5, dtype=torch.bool))

    # refit from a CSV of task ids (the exported trial folders) and answers
    ids = tasks.task_ids()
    correct = (scores.margin.reshape(-1) > 0).tolist()
    correct[0] = not correct[0]
    csv = tmp_path / "answers.csv"
    csv.write_text("task_id,correct\n" + "".join(f"{i},{int(c)}\n" for i, c in zip(ids, correct)))
    refit = machine_interpretability_score(tasks, "pixels", human_csv=csv)
    expected = fit_temperature(scores.margin.reshape(-1), torch.tensor(correct))
    assert refit.temperature == pytest.approx(expected) and refit.temperature_source == str(csv)
    csv.write_text("task_id,correct\ntask_9/trial_1,1\n")
    with pytest.raises(ValueError, match="not among"):
        machine_interpretability_score(tasks, "pixels", human_csv=csv)


def test_synthetic_units_score_as_expected_with_each_backend(model, images):
    """A unit that indicates one class scores high, a unit of random values (independent of the
    images) scores at chance, with the pixels and the features backends; same seed, same scores."""
    from analyses.mis.score import machine_interpretability_score
    from analyses.mis.similarity import EmbeddingCache

    x, labels = images
    g = torch.Generator().manual_seed(1)
    # classes with at least ceil(0.1 * 150) = 15 images, so that the max pool is the class
    indicator = torch.stack([(labels == c).float() + 1e-3 * torch.rand(len(labels), generator=g) for c in (0, 2)], 1)
    noise = torch.randn(len(labels), 64, generator=g) @ torch.randn(64, 32, generator=g)  # a random projection of noise
    acts = torch.cat([indicator, noise], 1)
    prep = model.cfg.preprocessing
    tasks = _tasks(acts, x, mean=tuple(prep["mean"]), std=tuple(prep["std"]))
    cache = EmbeddingCache()
    results = {}
    for backend in ("pixels", "features:deit3_tiny_digits"):
        scores = machine_interpretability_score(tasks, backend, embeddings=cache)
        results[backend] = scores.mis
        assert scores.mis[2:].mean().item() == pytest.approx(0.5, abs=0.06), backend
        assert scores.mis[0].item() > 0.8, backend  # the zeros look alike even in pixels
    assert results["pixels"][:2].mean() > results["pixels"][2:].mean() + 0.15
    assert results["features:deit3_tiny_digits"][:2].min().item() > 0.95  # near 1 in feature space
    again = machine_interpretability_score(_tasks(acts, x, mean=tasks.mean, std=tasks.std), "pixels")
    assert torch.equal(again.mis, results["pixels"])
    other = machine_interpretability_score(_tasks(acts, x, seed=1, mean=tasks.mean, std=tasks.std), "pixels")
    assert not torch.equal(other.mis, results["pixels"])


def test_export_writes_the_trial_layout(tmp_path, model, images):
    from PIL import Image

    x = images[0][:30]
    acts = torch.randn(30, 2, generator=torch.Generator().manual_seed(3))
    prep = model.cfg.preprocessing
    tasks = _tasks(acts, x, n_tasks=2, n_references=2, quantile=0.2, mean=tuple(prep["mean"]), std=tuple(prep["std"]))
    out = tmp_path / "tasks"
    (out / "stale").mkdir(parents=True)  # replaced whole
    tasks.export(out)
    assert not (out / "stale").exists()
    index = json.loads((out / "index.json").read_text())
    assert index["n_tasks"] == 2 and index["n_references"] == 2 and index["seed"] == 0
    for u in range(2):
        task = json.loads((out / f"task_{u + 1}" / "index.json").read_text())
        assert task == {"task_name": f"task_{u + 1}", "n_reference_images": 2, "n_trials": 2, "unit": u,
                        "hook_name": "synthetic"}
        for t in range(2):
            trial = out / f"task_{u + 1}" / "trials" / f"trial_{t + 1}"
            names = sorted(p.relative_to(trial).as_posix() for p in trial.rglob("*.png"))
            assert names == ["queries/max.png", "queries/min.png", "references/max_0.png", "references/max_1.png",
                             "references/min_0.png", "references/min_1.png"]
            i = int(tasks.draws.max_query[u, t])
            expected = ((x[i] * 0.376 + 0.3054).clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
            assert np.array_equal(np.asarray(Image.open(trial / "queries" / "max.png")), expected)


def test_site_units_of_every_kind(model, images):
    """Neurons, heads (output norm), residual dims and SAE latents, each reduced by position, match
    the cached hook values reduced by hand."""
    from sae_lens import TopKSAE, TopKSAEConfig

    from hooked_vit.errors import InvalidArgumentError
    from hooked_vit.units import site_units

    x = images[0][:6]
    _, cache = model.run_with_cache(x)
    neurons = model.units("blocks.1.mlp.hook_post", indices=[0, 5, 7])
    assert (neurons.kind, neurons.layer, neurons.width) == ("neuron", 1, 384)
    assert torch.allclose(neurons.activations(model, x, batch_size=4),
                          cache["blocks.1.mlp.hook_post"][:, 1:, [0, 5, 7]].amax(1), atol=1e-6)
    heads = site_units(model, (2, "v"), position="cls")  # a circuit site's key
    assert heads.kind == "head" and heads.hook_name == "blocks.2.attn.hook_v"
    assert torch.allclose(heads.activations(model, x), cache["blocks.2.attn.hook_v"][:, 0].norm(dim=-1), atol=1e-5)
    z = model.units("blocks.0.attn.hook_z", position="patch_mean")
    assert torch.allclose(z.activations(model, x), cache["blocks.0.attn.hook_z"][:, 1:].norm(dim=-1).mean(1), atol=1e-5)
    resid = model.units("hook_pooled", position="cls")
    assert resid.kind == "residual" and torch.allclose(resid.activations(model, x), cache["hook_pooled"], atol=1e-6)
    with pytest.raises(InvalidArgumentError, match="position='cls'"):
        model.units("hook_pooled")
    with pytest.raises(InvalidArgumentError, match=r"indices must be"):
        model.units("blocks.1.mlp.hook_post", indices=[384])
    cfg = TopKSAEConfig(d_in=96, d_sae=32, k=4)
    cfg.metadata.hook_name, cfg.metadata.tokens = "blocks.3.hook_resid_post", "patch"
    sae = TopKSAE(cfg)
    latents = model.units("blocks.3.hook_resid_post", sae=sae)
    assert latents.kind == "sae_latent" and len(latents) == 32
    expected = sae.encode(cache["blocks.3.hook_resid_post"][:, 1:]).amax(1)
    assert torch.allclose(latents.activations(model, x), expected, atol=1e-5)
    with pytest.raises(InvalidArgumentError, match="reads blocks.3"):
        model.units("blocks.2.hook_resid_post", sae=sae)


def write_clt(folder, activation: str, *, k: int = 3, d_latent: int = 24, seed: int = 0) -> None:
    """A tiny cross-layer transcoder for the embedded model (4 blocks, d_model 96) in the documented
    layout (docs/transcoders.md), written by hand with safetensors."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    folder.mkdir(parents=True)
    for i in range(4):
        enc = {f"W_enc_{i}": torch.randn(d_latent, 96, generator=g) / 10, f"b_enc_{i}": torch.randn(d_latent, generator=g),
               f"b_dec_{i}": torch.zeros(96)}
        if activation == "jumprelu":
            enc[f"threshold_{i}"] = torch.rand(d_latent, generator=g) + 0.5
        save_file(enc, str(folder / f"W_enc_{i}.safetensors"))
        save_file({f"W_dec_{i}": torch.randn(d_latent, 4 - i, 96, generator=g)}, str(folder / f"W_dec_{i}.safetensors"))
    (folder / "config.json").write_text(json.dumps({
        "n_layers": 4, "d_model": 96, "d_latent": d_latent, "activation": activation, "k": k, "skip": False,
        "cross_layer": True, "input_hook": "ln2.hook_normalized", "bandwidth": 0.1,
        "feature_input_hook": "ln2.hook_normalized", "feature_output_hook": "hook_mlp_out"}))


@pytest.mark.parametrize("activation", ["topk", "abstopk", "jumprelu"])
def test_clt_latents_match_their_encoder_by_hand(tmp_path, model, images, activation):
    """A CLT layer's latents (read from its saved files) are its encoder's codes reduced by position:
    re-derived token by token with numpy's sort (the k-th largest value as the cut) or the threshold."""
    from safetensors.numpy import load_file

    from analyses.mis.dictionaries import clt_encoder
    from hooked_vit.errors import InvalidArgumentError

    write_clt(tmp_path / "clt", activation)
    x = images[0][:5]
    _, cache = model.run_with_cache(x)
    encoder = clt_encoder(tmp_path / "clt", "any variant", 2)
    units = model.units("blocks.2.ln2.hook_normalized", sae=encoder, indices=range(0, 24, 2), position="patch_mean")
    assert (units.kind, units.layer, units.width, len(units)) == ("clt_latent", 2, 24, 12)
    saved = load_file(str(tmp_path / "clt" / "W_enc_2.safetensors"))
    tokens = cache["blocks.2.ln2.hook_normalized"][:, 1:].double().numpy()  # [5, 64, 96]
    pre = tokens @ saved["W_enc_2"].T.astype(np.float64) + saved["b_enc_2"]
    if activation == "jumprelu":
        codes = np.where(pre > saved["threshold_2"], pre, 0.0)
    else:
        size = np.abs(pre) if activation == "abstopk" else pre
        cut = -np.sort(-size, axis=-1)[..., 2:3]  # the 3rd largest per token
        codes = np.where(size >= cut, pre, 0.0)
        codes = codes if activation == "abstopk" else np.maximum(codes, 0.0)
        assert ((codes != 0).sum(-1) <= 3).all()
    expected = torch.from_numpy(codes.mean(1)[:, ::2]).float()
    assert expected.abs().sum() > 0
    assert torch.allclose(units.activations(model, x, batch_size=2), expected, atol=1e-4)
    with pytest.raises(InvalidArgumentError, match="reads blocks.2.ln2"):
        model.units("blocks.3.ln2.hook_normalized", sae=encoder)
    with pytest.raises(InvalidArgumentError, match="layers 0..3, not 4"):
        clt_encoder(tmp_path / "clt", "any variant", 4)
    with pytest.raises(FileNotFoundError, match="hooked-vit transcoders"):
        clt_encoder(tmp_path, "sparsity_0", 2)


def test_bad_settings_fail_in_one_line():
    from analyses.mis.config import MISConfig
    from hooked_vit.errors import InvalidArgumentError, MissingFileError

    for bad in ({"quantile": 0.7}, {"similarity": "lpips"}, {"units": ("neurons",)}, {"temperature": 0.0}):
        with pytest.raises(InvalidArgumentError):
            MISConfig(**bad)
    with pytest.raises(MissingFileError, match="human_csv"):
        MISConfig(human_csv="no/such/answers.csv")


def test_dreamsim_errors_are_one_line_and_its_input_is_pixels(monkeypatch, model, images):
    """Without the extra, and without its weights (offline), similarity='dreamsim' stops in one line
    naming how to get them; with a stand-in DreamSim, it is given [0, 1] RGB images at 224 x 224."""
    import importlib.machinery
    import os
    import sys
    import types
    import urllib.error

    from analyses.mis.config import MISConfig
    from analyses.mis.similarity import embed
    from hooked_vit.errors import MissingFileError

    x, prep = images[0][:3], model.cfg.preprocessing
    monkeypatch.setitem(sys.modules, "dreamsim", None)  # the extra is not installed
    for call in (lambda: MISConfig(similarity="dreamsim"), lambda: embed("dreamsim", x)):
        with pytest.raises(MissingFileError, match=r"pip install 'hooked-vit\[mis\]'") as error:
            call()
        assert "\n" not in str(error.value) and "~/.cache/dreamsim" in str(error.value)
    fake, calls = types.ModuleType("dreamsim"), []
    fake.__spec__ = importlib.machinery.ModuleSpec("dreamsim", None)

    def offline(pretrained, device, cache_dir):
        calls.append(cache_dir)
        raise urllib.error.URLError("no network")

    fake.dreamsim = offline
    monkeypatch.setitem(sys.modules, "dreamsim", fake)
    with pytest.raises(MissingFileError, match=r"run it once online.*\(URLError\)$") as error:
        embed("dreamsim", x)
    assert "\n" not in str(error.value) and calls == [os.path.expanduser("~/.cache/dreamsim")]

    class StandIn:  # DreamSim's embed: [batch 3 224 224] in [0, 1] -> [batch d]
        def embed(self, batch):
            calls.append(batch)
            return batch.mean(dim=(2, 3))

    fake.dreamsim = lambda pretrained, device, cache_dir: (StandIn(), None)
    vectors = embed("dreamsim", x, mean=tuple(prep["mean"]), std=tuple(prep["std"]))
    given = calls[-1]
    assert given.shape == (3, 3, 224, 224) and 0 <= given.min() and given.max() <= 1
    pixels = (x * torch.tensor(prep["std"]).view(-1, 1, 1) + torch.tensor(prep["mean"]).view(-1, 1, 1)).clamp(0, 1)
    assert torch.allclose(given.mean(dim=(2, 3)), pixels.mean(dim=(2, 3)).expand(-1, 3), atol=1e-2)
    assert torch.allclose(vectors, given.mean(dim=(2, 3)) / given.mean(dim=(2, 3)).norm(dim=1, keepdim=True))


def test_level_end_to_end_on_a_tiny_setting(tmp_path, model, digits):
    """hooked-vit mis on the dense model: units per kind and block, an SAE trained in the level, the
    tables and the figure; resumed without recomputing; the layer level's SAE layout, the replacement
    level's SAEs and the transcoders level's CLT read back."""
    from analyses.common.level import run_level
    from analyses.mis import MIS, MISConfig, MISResult
    from hooked_vit.errors import InvalidArgumentError

    config = MISConfig(sparsities=(0.0,), layers=(3,), units=("mlp_act", "resid", "sae"), max_units=6, n_tasks=3,
                       n_references=3, quantile=0.2, sae_steps=5, sae_batch_size=64, split="val")
    level = MIS(show_progress=False, model_loader=lambda config, variant: model, datasets={"val": digits})
    assert level.units(config) == ["mlp_act/3", "resid/3", "sae"]
    result = run_level(level, config, tmp_path / "mis")
    kinds = [(r["kind"], r["layer"], r["n_units"] + r["n_constant"]) for r in result.summary()]
    assert kinds == [("mlp_act", 3, 6), ("resid", 3, 6), ("sae", 3, 6)]
    assert all(0 <= v <= 1 for r in result.rows for v in r["mis"]) and result.rows[0]["similarity"] == "pixels"
    assert [r["kind"] for r in result.neurons_vs_sae()] == ["sae", "mlp_act", "resid"]
    for name in ("mis_table.csv", "neurons_vs_sae.csv", "mis.md", "mis_vs_depth.png", "done.json"):
        assert (tmp_path / "mis" / name).is_file()
    assert MISResult.load(tmp_path / "mis").rows == result.rows

    # the SAE as the layer level saves it (<out>/<variant>/<sae>/cfg.json) gives the same latents' MIS
    layer_out = tmp_path / "layer"
    shutil.copytree(tmp_path / "mis" / "sparsity_0" / "sae_model", layer_out / "sparsity_0" / "some-sae")
    from_layer = run_level(MIS(show_progress=False, model_loader=lambda c, v: model, datasets={"val": digits}),
                           dataclasses.replace(config, units=("sae",), sae_from=str(layer_out)), tmp_path / "mis2")
    assert from_layer.rows[0]["mis"] == result.rows[2]["mis"]
    from analyses.mis.sae import layer_level_sae

    one = layer_level_sae(layer_out / "sparsity_0" / "some-sae", "any variant")  # one SAE folder for every variant
    assert torch.equal(one.W_enc, layer_level_sae(layer_out, "sparsity_0").W_enc)
    with pytest.raises(FileNotFoundError, match="hooked-vit layer"):
        layer_level_sae(layer_out, "sparsity_0.5")

    # the replacement level's SAEs (<out>/<variant>/rrm/<hook>/ beside replacement.json) and the
    # transcoders level's CLT (<out>/<variant>/clt/final/): latents per block, compared with neurons
    rrm = tmp_path / "replacement" / "sparsity_0" / "rrm"
    shutil.copytree(tmp_path / "mis" / "sparsity_0" / "sae_model", rrm / "blocks.3.hook_resid_post")
    (rrm / "replacement.json").write_text(json.dumps({"hooks": ["blocks.3.hook_resid_post"]}))
    write_clt(tmp_path / "transcoders" / "sparsity_0" / "clt" / "final", "topk")
    both = dataclasses.replace(config, units=("mlp_act", "sae"), sae_from=str(layer_out),
                               replacement_from=str(tmp_path / "replacement"), clt_from=str(tmp_path / "transcoders"))
    level = MIS(show_progress=False, model_loader=lambda c, v: model, datasets={"val": digits})
    assert level.units(both) == ["mlp_act/3", "sae", "rrm/3", "clt/3"]
    dictionaries = run_level(level, both, tmp_path / "mis3")
    rows = {r["kind"]: r for r in dictionaries.rows}
    assert rows["rrm"]["mis"] == rows["sae"]["mis"] == result.rows[2]["mis"]  # the same SAE, read as the rrm's
    assert rows["mlp_act"]["mis"] == result.rows[0]["mis"]  # reproducible from the seed
    assert (rows["clt"]["hook_name"], rows["clt"]["unit_kind"]) == ("blocks.3.ln2.hook_normalized", "clt_latent")
    assert [r["kind"] for r in dictionaries.neurons_vs_sae()] == ["sae", "rrm", "clt", "mlp_act"]
    from analyses.mis.dictionaries import replacement_sae

    with pytest.raises(FileNotFoundError, match="no SAE at blocks.2.hook_resid_post"):
        replacement_sae(tmp_path / "replacement", "sparsity_0", 2)
    with pytest.raises(InvalidArgumentError, match="need clt_from"):
        MISConfig(units=("clt",))


def test_level_refits_the_temperature_on_human_answers(tmp_path, model, digits):
    """human_csv: answers drawn at a known temperature from the margins of the level's tasks
    (re-derived here: the draws' pixel correlations) give that temperature back; every score uses
    the refit one and stores its source; the tasks are exported for the study; a unit's settings
    hold the answers' digest (a resumed run recomputes units when the answers change); unknown
    units fail."""
    from analyses.common.level import Variant, run_level
    from analyses.mis import MIS, MISConfig
    from analyses.mis.tasks import make_tasks
    from hooked_vit.errors import InvalidArgumentError

    digits = digits.subset(range(60))
    config = MISConfig(sparsities=(0.0,), layers=(3,), units=("mlp_act",), max_units=6, n_tasks=3, n_references=3,
                       quantile=0.2, split="val")
    x = digits.tensors(show_progress=False)[0]
    tasks = make_tasks(model, model.units(model.sites[3, "mlp_act"].hook_name, indices=range(6)), x, config)
    flat = x.flatten(1) - x.flatten(1).mean(1, keepdim=True)
    flat = flat / flat.norm(dim=1, keepdim=True)
    d = tasks.draws

    def s(q, refs):  # mean correlation of query image q with reference images refs
        return float((flat[refs] @ flat[q]).mean())

    margins = {f"mlp_act/3/task_{u + 1}/trial_{t + 1}":
               (s(d.max_query[u, t], d.max_refs[u, t]) - s(d.max_query[u, t], d.min_refs[u, t]))
               - (s(d.min_query[u, t], d.max_refs[u, t]) - s(d.min_query[u, t], d.min_refs[u, t]))
               for u in range(6) for t in range(3)}
    g = torch.Generator().manual_seed(0)
    csv = tmp_path / "answers.csv"

    def write_answers(temperature):
        rows = [f"{task},{int(torch.rand(1, generator=g) < 1 / (1 + math.exp(-m / temperature)))}\n"
                for task, m in margins.items() for _ in range(300)]
        csv.write_text("task_id,correct\n" + "".join(rows))

    write_answers(0.1)
    level = MIS(show_progress=False, model_loader=lambda c, v: model, datasets={"val": digits})
    config = dataclasses.replace(config, human_csv=str(csv), export_tasks=str(tmp_path / "study"))
    row = run_level(level, config, tmp_path / "mis").rows[0]  # the tasks also exported for the people answering them
    trial = tmp_path / "study" / "sparsity_0" / "mlp_act" / "3" / "task_6" / "trials" / "trial_3"
    assert json.loads((trial.parents[1] / "index.json").read_text())["unit"] == 5
    assert sorted(p.name for p in (trial / "references").iterdir()) == [f"{side}_{i}.png" for side in ("max", "min")
                                                                        for i in range(3)]
    assert row["temperature"] == pytest.approx(0.1, rel=0.15) and row["temperature_source"] == str(csv)
    expected = [sum(1 / (1 + math.exp(-margins[f"mlp_act/3/task_{u + 1}/trial_{t + 1}"] / row["temperature"]))
                    for t in range(3)) / 3 for u in range(6)]
    assert row["mis"] == pytest.approx(expected, abs=1e-5)
    saved = json.loads((tmp_path / "mis" / "sparsity_0" / "mlp_act" / "3.json").read_text())["settings"]
    write_answers(0.3)  # other answers in the same file
    assert level.settings(config, model, Variant("sparsity_0", 0.0, "dense")) \
        == {**saved, "human_csv_sha256": hashlib.sha256(csv.read_bytes()).hexdigest()} != saved
    csv.write_text("task_id,correct\nresid/3/task_1/trial_1,1\n")
    with pytest.raises(InvalidArgumentError, match="not among this run's mlp_act/3"):
        run_level(MIS(show_progress=False, model_loader=lambda c, v: model, datasets={"val": digits}), config,
                  tmp_path / "mis3")
