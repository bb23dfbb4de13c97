"""Classifiers for headless models (issue 20, requirement 5): the linear probe against scikit-learn's
logistic regression on features taken from the timm twin, its saved file reused without retraining,
the zero-shot fold against CLIP's cosine logits re-derived from timm's image embedding, attaching
(forward, ``W_U``, ``to_timm``), the ``--classifier`` option of a level, and the one-line refusals."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import make_timm

L2 = 1e-2  # the probes' L2 weight here (mean cross-entropy + L2/2 |W|^2 on standardised features)


@pytest.fixture(scope="module")
def headless():
    """The embedded digits model with its head removed (timm's reset_classifier(0)): (timm twin,
    HookedViT, 120 images to train probes on, 120 others to score them, from the digits val split)."""
    from hooked_vit import HookedViT
    from hooked_vit.data import load_dataset

    timm_model = HookedViT.from_pretrained("deit3_tiny_digits").to_timm()
    timm_model.reset_classifier(0)
    model = HookedViT.from_timm(timm_model)
    images = load_dataset("digits", split="val", model=model)
    return timm_model, model, images.subset(range(0, len(images), 3)), images.subset(range(1, len(images), 3))


def _images(dataset):
    return torch.stack([dataset[i][0] for i in range(len(dataset))])


def test_probe_reaches_its_accuracy_and_matches_sklearn(headless):
    """Trained on 120 images at L2: >= 0.95 top-1 on 120 others (the digits model's own head:
    0.99), and the same predictions as scikit-learn's L-BFGS logistic regression (C = 1 / (L2 n)) on
    the timm twin's pooled features, standardised by StandardScaler, on >= 99 % of them."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    from hooked_vit import HookedViT
    from hooked_vit.classifier import attach_classifier, linear_probe

    timm_model, model, train, val = headless
    probe = linear_probe(model, train, l2=L2, cache=False)
    with torch.no_grad():
        train_features, val_features = timm_model(_images(train)).numpy(), timm_model(_images(val)).numpy()
    scaler = StandardScaler().fit(train_features)
    reference = LogisticRegression(C=1 / (L2 * len(train)), max_iter=1000, tol=1e-6)
    reference.fit(scaler.transform(train_features), train.labels.numpy())
    expected = reference.predict(scaler.transform(val_features))

    with torch.no_grad():
        logits = attach_classifier(HookedViT.from_timm(timm_model), probe)(_images(val))
    predicted = logits.argmax(-1).numpy()
    accuracy = float((predicted == val.labels.numpy()).mean())
    assert accuracy >= 0.95 and probe.train_accuracy >= 0.95 and probe.val_accuracy >= 0.9, accuracy
    assert (predicted == expected).mean() >= 0.99
    # the weights too: sklearn's coefficients over the scaler's std are the probe's raw-feature weights
    weight = torch.from_numpy(reference.coef_ / scaler.scale_).float()
    assert float((probe.weight - weight).norm() / weight.norm()) < 2e-3
    assert probe.l2 == L2 and probe.settings["dataset"]["n"] == len(train) and probe.path is None


def test_probe_is_saved_and_reused_without_training(headless, tmp_path, monkeypatch):
    """The L2 sweep picks a grid value; the second call reads the file (no features, no fit: both are
    made to fail), a changed setting trains anew, and a corrupt file is moved aside and retrained to
    the same weights."""
    from hooked_vit import classifier

    _, model, train, _ = headless
    small = train.subset(range(0, len(train), 2))
    probe = classifier.linear_probe(model, small, directory=tmp_path, max_iter=30)
    assert probe.l2 in classifier.L2_GRID and not probe.reused and probe.path.parent == tmp_path
    assert probe.path.name.startswith(f"{model.cfg.model_name}-digits-val-")
    mtime = probe.path.stat().st_mtime_ns

    def refuse(*args, **kwargs):
        raise AssertionError("retrained a saved probe")

    with monkeypatch.context() as patch:
        patch.setattr(classifier, "pooled_features", refuse)
        patch.setattr(classifier, "fit_logistic", refuse)
        again = classifier.linear_probe(model, small, directory=tmp_path, max_iter=30)
        assert again.reused and again.path == probe.path and probe.path.stat().st_mtime_ns == mtime
        assert torch.equal(again.weight, probe.weight) and torch.equal(again.bias, probe.bias)
        assert again.l2 == probe.l2 and again.val_accuracy == probe.val_accuracy
        with pytest.raises(AssertionError, match="retrained"):  # another seed is another probe
            classifier.linear_probe(model, small, directory=tmp_path, max_iter=30, seed=1)
    probe.path.write_bytes(b"not a safetensors file")
    with pytest.warns(RuntimeWarning, match="moved it to"):
        rebuilt = classifier.linear_probe(model, small, directory=tmp_path, max_iter=30)
    assert not rebuilt.reused and torch.equal(rebuilt.weight, probe.weight)
    assert len(list(tmp_path.glob("*.corrupt-*"))) == 1


@pytest.fixture(scope="module")
def clip():
    """A 1-block CLIP tower (QuickGELU, ln_pre) of width 64 whose projection head (random bias) gives
    24-wide image embeddings: (timm model, HookedViT, images, 5 class embeddings)."""
    from hooked_vit import HookedViT

    timm_model = make_timm("vit_base_patch32_clip_quickgelu_224", depth=1, img_size=64, embed_dim=64, num_heads=2,
                           num_classes=24)
    with torch.no_grad():
        timm_model.head.bias.normal_(generator=torch.Generator().manual_seed(3))
    images = torch.randn(6, 3, 64, 64, generator=torch.Generator().manual_seed(4))
    classes = torch.randn(5, 24, generator=torch.Generator().manual_seed(5))
    return timm_model, HookedViT.from_timm(timm_model), images, classes


def test_zero_shot_fold_is_clip_times_the_embedding_norm_and_cosine_is_exact(clip, tmp_path):
    """CLIP's logits re-derived from timm's image embedding E: s cos(E, T). The fold gives them times
    |E| (same argmax); the cosine head gives them exactly; attached, the fold is the forward, W_U,
    the head of to_timm() and of the saved model loaded back."""
    from hooked_vit import HookedViT
    from hooked_vit.classifier import (
        attach_classifier,
        zero_shot_cosine_head,
        zero_shot_head,
    )

    timm_model, _, images, classes = clip
    model = HookedViT.from_timm(timm_model)
    with torch.no_grad():
        embedding = timm_model(images)
        reference = 100.0 * F.normalize(embedding, dim=-1) @ F.normalize(classes, dim=-1).T
        _, cache = model.run_with_cache(images, names_filter="hook_pooled")
        cosine = zero_shot_cosine_head(model, classes)(cache["hook_pooled"])
        attach_classifier(model, zero_shot_head(model, classes))
        folded = model(images)
        twin = model.to_timm()
        twin_logits = twin(images)
        reloaded = HookedViT.from_pretrained(model.save_pretrained(tmp_path / "zero_shot"))(images)
    torch.testing.assert_close(cosine, reference, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(folded, reference * embedding.norm(dim=-1, keepdim=True), rtol=1e-5, atol=1e-4)
    assert torch.equal(folded.argmax(-1), reference.argmax(-1))
    assert model.cfg.n_classes == 5 and model.W_U.shape == (64, 5) and model.cfg.timm_kwargs["num_classes"] == 5
    assert twin.head.out_features == 5 and torch.equal(twin_logits, folded) and torch.equal(reloaded, folded)


def test_zero_shot_without_a_projection_uses_the_pooled_features(headless):
    """A tower whose pooled output is the embedding (SigLIP, DINOv2; head nn.Identity): W = s T_n, b = 0."""
    from hooked_vit.classifier import zero_shot_head

    _, model, _, _ = headless
    classes = torch.randn(3, model.cfg.d_model, generator=torch.Generator().manual_seed(6))
    head = zero_shot_head(model, classes, logit_scale=50.0)
    torch.testing.assert_close(head.weight.detach(), 50.0 * classes / classes.norm(dim=-1, keepdim=True))
    assert not head.bias.any()


def _digits_folder(root, per_class: dict[str, int]) -> None:
    """An image-folder dataset root/<split>/<digit>/*.png of the first sklearn digits of each class."""
    from PIL import Image

    from hooked_vit.data.digits import digits_arrays

    images, labels = digits_arrays()
    for digit in range(10):
        rows = np.flatnonzero(labels == digit)
        start = 0
        for split, n in per_class.items():
            (root / split / str(digit)).mkdir(parents=True)
            for row in rows[start:start + n]:
                Image.fromarray(images[row]).save(root / split / str(digit) / f"{row}.png")
            start += n


def test_a_level_runs_on_a_headless_model_with_a_probe(cache, tmp_path, monkeypatch, capsys):
    """`hooked-vit accuracy --classifier probe` on a saved random-init headless model and a small
    digits folder (10 train, 4 val images per class): the probe is trained on the train split, saved
    under the cache's probes/, and the model scores above chance; without --classifier the command
    stops in one line naming the option."""
    import json

    from hooked_vit import HookedViT, classifier, cli

    monkeypatch.setattr(classifier, "L2_GRID", (L2,))  # one fit: this test is about the wiring
    _digits_folder(tmp_path / "digits", {"train": 10, "val": 4})
    timm_model = make_timm("vit_tiny_patch16_224", num_classes=0, depth=1, img_size=32, patch_size=8, embed_dim=32,
                           num_heads=2)
    folder = tmp_path / "headless"
    HookedViT.from_timm(timm_model).save_pretrained(folder)
    base = ["accuracy", "--model", str(folder), "--data", str(tmp_path / "digits"), "--sparsities", "0",
            "--out", str(tmp_path / "out"), "--no-progress"]
    assert cli.main(base) == 2
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and "is headless" in error and "--classifier probe" in error
    assert cli.main([*base, "--classifier", "probe"]) == 0
    saved = json.loads((tmp_path / "out" / "sparsity_0" / "model.json").read_text())
    assert saved["settings"]["classifier"] == "probe" and saved["record"]["n"] == 40
    assert saved["record"]["top1"] > 0.2, saved["record"]  # chance: 0.1
    assert len(list((cache / "probes").glob("*-digits-train-*.safetensors"))) == 1


def test_a_level_that_reads_no_logits_takes_a_headless_model_as_it_is(tmp_path):
    """MIS reads unit activations only: its dense headless model loads with ``--classifier model``; a
    fine-tuned variant (trained on labels) still needs a classifier, and says so before any work."""
    from analyses.common.level import Level
    from analyses.common.variants import load_variant
    from analyses.mis.compute import MIS
    from hooked_vit import HookedViT
    from hooked_vit.errors import InvalidArgumentError

    folder = tmp_path / "headless"
    HookedViT.from_timm(make_timm("vit_tiny_patch16_224", num_classes=0, depth=1, img_size=32, patch_size=8,
                                  embed_dim=32, num_heads=2)).save_pretrained(folder)
    assert Level.needs_logits and not MIS.needs_logits
    model = load_variant(str(folder), 0.0, device="cpu", needs_logits=False)
    assert model.cfg.n_classes == 0
    with pytest.raises(InvalidArgumentError, match="is headless"):
        load_variant(str(folder), 0.0, device="cpu")
    with pytest.raises(InvalidArgumentError, match="is headless"):
        load_variant(str(folder), 0.5, finetune_epochs=2, device="cpu", needs_logits=False)


def test_bad_inputs_give_one_line(clip, tmp_path):
    from safetensors.torch import save_file

    from analyses.accuracy.config import AccuracyConfig
    from analyses.common.variants import with_family_classifier
    from hooked_vit import HookedViT
    from hooked_vit.classifier import (
        attach_classifier,
        load_class_embeddings,
        zero_shot_cosine_head,
        zero_shot_head,
    )
    from hooked_vit.errors import HookedViTError

    timm_model, model, _, classes = clip
    as_preset = HookedViT.from_timm(timm_model, model_name="clip_vitb16")  # a CLIP preset: its head is the projection
    save_file({"a": classes, "b": classes.clone()}, tmp_path / "two.safetensors")
    torch.save(classes[0].clone(), tmp_path / "row.pt")
    cases = {
        "is 24 wide": lambda: zero_shot_head(model, torch.randn(5, 64)),
        "(a 1-d torch.float32 tensor [24])": lambda: load_class_embeddings(tmp_path / "row.pt"),
        "positive number": lambda: zero_shot_head(model, classes, logit_scale=0.0),
        "no all-zero row": lambda: zero_shot_head(model, torch.cat([classes, torch.zeros(1, 24)])),
        "not linear": lambda: attach_classifier(model, zero_shot_cosine_head(model, classes)),
        "reads 24 features": lambda: attach_classifier(model, torch.nn.Linear(24, 5)),
        "2 entries": lambda: load_class_embeddings(tmp_path / "two.safetensors"),
        "does not exist": lambda: load_class_embeddings(tmp_path / "none.pt"),
        ".pt, .pth or .safetensors file": lambda: load_class_embeddings(tmp_path / "classes.npy"),
        "outputs are an image embedding, not classes": lambda: with_family_classifier(as_preset, "model"),
        "got 'probe:0'": lambda: AccuracyConfig(classifier="probe:0"),
        "got 'zero-shot:classes.npy'": lambda: AccuracyConfig(classifier="zero-shot:classes.npy"),
    }
    for expected, call in cases.items():
        with pytest.raises(HookedViTError) as error:
            call()
        assert expected in str(error.value) and "\n" not in str(error.value), (expected, str(error.value))
    assert AccuracyConfig(classifier="zero-shot:runs/classes.safetensors").classifier.endswith(".safetensors")
