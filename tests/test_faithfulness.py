"""Insertion / deletion (analyses.model.faithfulness): AUCs computed by hand on a model whose output is a
known function of the pixels, a per-image RISE-style loop, batching, references, bad inputs."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn


class PixelSum(nn.Module):
    """Logits ``[sum_p w_p x_p (over channels too), 0]``: class 0's probability is sigmoid(w . x)."""

    def __init__(self, weights: torch.Tensor):
        super().__init__()
        self.weights = nn.Parameter(weights.clone(), requires_grad=False)

    def forward(self, images):
        score = (images * self.weights).flatten(1).sum(1)
        return torch.stack([score, torch.zeros_like(score)], dim=1)


def sigmoid(v: float) -> float:
    return 1 / (1 + math.exp(-v))


def test_auc_by_hand():
    from analyses.model.faithfulness import insertion_deletion

    weights = torch.tensor([[[[3.0, 1.0], [0.0, -2.0]]]])  # pixels p0..p3 (row-major)
    model = PixelSum(weights)
    image = torch.ones(1, 1, 2, 2)
    scores = insertion_deletion(model, image, weights[:, 0], "zero", step=1)
    # Clean logit 2 > 0: class 0 is explained. Order: p0 (3), p1 (1), p2 (0), p3 (-2).
    insertion = [sigmoid(s) for s in (0, 3, 4, 4, 2)]  # revealed: {}, {p0}, {p0,p1}, +p2, +p3
    deletion = [sigmoid(s) for s in (2, -1, -2, -2, 0)]  # removed in the same order
    torch.testing.assert_close(scores.curves["insertion"][0], torch.tensor(insertion))
    torch.testing.assert_close(scores.curves["deletion"][0], torch.tensor(deletion))
    trapezoid = lambda ys: (sum(ys) - ys[0] / 2 - ys[-1] / 2) / 4  # noqa: E731
    assert scores.insertion_auc[0].item() == pytest.approx(trapezoid(insertion), abs=1e-6)
    assert scores.deletion_auc[0].item() == pytest.approx(trapezoid(deletion), abs=1e-6)
    torch.testing.assert_close(scores.fractions, torch.tensor([0, 0.25, 0.5, 0.75, 1.0]))
    assert scores.target.tolist() == [0]


def test_ties_keep_pixel_order_and_step_of_two():
    from analyses.model.faithfulness import insertion_deletion

    weights = torch.tensor([[[[1.0, 2.0], [4.0, 8.0]]]])
    scores = insertion_deletion(PixelSum(weights), torch.ones(1, 1, 2, 2), torch.zeros(1, 2, 2), step=2)
    # All relevances tie: pixels go in index order p0, p1 then p2, p3 (2 per step).
    insertion = [sigmoid(s) for s in (0, 3, 15)]
    torch.testing.assert_close(scores.curves["insertion"][0], torch.tensor(insertion))


def rise_loop(model, image, saliency, reference, step):
    """One image at a time, as RISE's CausalMetric.single_run (probabilities of the clean argmax)."""
    n_pixels = image.shape[-1] * image.shape[-2]
    n_steps = (n_pixels + step - 1) // step
    target = int(model(image).argmax())
    order = torch.sort(saliency.reshape(-1), descending=True, stable=True).indices
    curves = {}
    for kind, (start, finish) in {"insertion": (reference, image), "deletion": (image, reference)}.items():
        current = start.clone().reshape(1, image.shape[1], -1)
        flat_finish = finish.reshape(1, image.shape[1], -1)
        scores = []
        for i in range(n_steps + 1):
            scores.append(float(model(current.reshape(image.shape)).softmax(-1)[0, target]))
            coords = order[step * i: step * (i + 1)]
            current[0, :, coords] = flat_finish[0, :, coords]
        curves[kind] = torch.tensor(scores)
    return curves


@pytest.mark.parametrize("reference", ["zero", "blur", "mean"])
def test_matches_per_image_loop(reference):
    from analyses.model.faithfulness import insertion_deletion, reference_images

    generator = torch.Generator().manual_seed(0)
    weights = torch.randn(1, 3, 6, 6, generator=generator)
    model = PixelSum(weights)
    images = torch.randn(4, 3, 6, 6, generator=generator)
    saliency = torch.randn(4, 6, 6, generator=generator)
    scores = insertion_deletion(model, images, saliency, reference, step=5, batch_size=7)  # 8 steps, 9 scores
    refs = reference_images(model, images, reference)
    for i in range(4):
        expected = rise_loop(model, images[i:i + 1], saliency[i], refs[i:i + 1], 5)
        torch.testing.assert_close(scores.curves["insertion"][i], expected["insertion"])
        torch.testing.assert_close(scores.curves["deletion"][i], expected["deletion"])
    assert scores.curves["insertion"].shape == (4, 9)


def test_low_resolution_map_is_upsampled_bilinearly():
    from analyses.model.faithfulness import pixel_ranks

    coarse = torch.tensor([[[0.0, 1.0], [2.0, 3.0]]])
    ranks = pixel_ranks(coarse, 4, 4)
    # The most relevant pixel is the bottom-right corner, the least the top-left.
    assert ranks[0, 15] == 0 and ranks[0, 0] == 15


def test_references():
    from analyses.model.faithfulness import gaussian_blur, reference_images

    model = PixelSum(torch.ones(1))
    model.cfg = SimpleNamespace(preprocessing={"mean": [0.5, 0.25, 0.0], "std": [0.5, 0.25, 1.0]})
    images = torch.randn(2, 3, 16, 16)
    black = reference_images(model, images, "black")
    torch.testing.assert_close(black[1, :, 3, 4], torch.tensor([-1.0, -1.0, 0.0]))
    assert torch.equal(reference_images(model, images, "zero"), torch.zeros_like(images))
    mean = reference_images(model, images, "mean")
    torch.testing.assert_close(mean[0, 2, 5, 5], images[0, 2].mean())
    constant = torch.ones(1, 1, 32, 32)
    torch.testing.assert_close(gaussian_blur(constant)[0, 0, 16, 16], torch.tensor(1.0))  # normalised kernel


def test_hooked_model_batch_equals_loop(tiny):
    from analyses.model.faithfulness import insertion_deletion

    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    maps = torch.rand(3, 4, 4, generator=torch.Generator().manual_seed(4))
    batched = insertion_deletion(tiny, images, maps, batch_size=10)
    for i in range(3):
        single = insertion_deletion(tiny, images[i:i + 1], maps[i:i + 1], batch_size=33)
        torch.testing.assert_close(batched.curves["insertion"][i], single.curves["insertion"][0])
        torch.testing.assert_close(batched.curves["deletion"][i], single.curves["deletion"][0])
    assert batched.curves["insertion"].shape == (3, 33)  # 32 px, step 32: 32 steps
    clean = tiny(images).softmax(-1).max(-1).values
    torch.testing.assert_close(batched.curves["deletion"][:, 0], clean)
    torch.testing.assert_close(batched.curves["insertion"][:, -1], clean)


@pytest.mark.parametrize("kwargs,needle", [
    ({"reference": "noise"}, "'noise'"),
    ({"maps": torch.zeros(2, 4, 4)}, "[2, 4, 4]"),
    ({"maps": torch.zeros(3, 16)}, "[3, 16]"),
    ({"step": 0}, "step 0"),
    ({"images": torch.zeros(3, 3, 16, 16)}, "16x16"),
])
def test_bad_inputs_fail_in_one_line(tiny, kwargs, needle):
    from analyses.model.faithfulness import insertion_deletion

    args = {"images": torch.zeros(3, 3, 32, 32), "maps": torch.zeros(3, 4, 4), "reference": "zero", **kwargs}
    step = args.pop("step", None)
    with pytest.raises(ValueError) as error:
        insertion_deletion(tiny, args["images"], args["maps"], args["reference"], step=step)
    assert needle in str(error.value) and "\n" not in str(error.value)
