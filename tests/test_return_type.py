"""TransformerLens's ``return_type`` on HookedViT: ``"logits"``, ``"loss"`` (cross-entropy against
``labels``), ``"both"``, ``None``, through ``forward``, ``run_with_hooks`` and ``run_with_cache``.
The loss is re-derived here image by image from the logits."""

from __future__ import annotations

import math

import pytest
import torch

LABELS = torch.tensor([3, 0, 7])


def loss_by_hand(logits: torch.Tensor, labels: torch.Tensor) -> list[float]:
    """-log softmax(logits)[label] per image, written out."""
    out = []
    for row, label in zip(logits.tolist(), labels.tolist()):
        top = max(row)
        out.append(-(row[label] - top - math.log(sum(math.exp(v - top) for v in row))))
    return out


def test_loss_both_and_none(tiny):
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    logits = tiny(images)
    per_image = loss_by_hand(logits, LABELS)
    torch.testing.assert_close(tiny(images, return_type="loss", labels=LABELS, loss_per_image=True),
                               torch.tensor(per_image))
    loss = tiny(images, return_type="loss", labels=LABELS)
    assert loss.shape == () and math.isclose(loss.item(), sum(per_image) / 3, rel_tol=1e-5)
    assert torch.equal(tiny.loss_fn(logits, LABELS), loss)
    torch.testing.assert_close(tiny.loss_fn(logits, LABELS, per_image=True), torch.tensor(per_image))
    both_logits, both_loss = tiny(images, return_type="both", labels=LABELS)
    assert torch.equal(both_logits, logits) and torch.equal(both_loss, loss)
    fired = []
    out = tiny.run_with_hooks(images, return_type=None, fwd_hooks=[("hook_pooled", lambda a, hook: fired.append(a))])
    assert out is None and len(fired) == 1
    assert tiny(images, return_type="logits").equal(logits)


def test_run_with_cache_backpropagates_the_loss_without_a_metric(tiny):
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    loss, cache = tiny.run_with_cache(images, return_type="loss", labels=LABELS, incl_bwd=True,
                                      names_filter="blocks.1.hook_resid_post")
    assert loss.shape == ()
    grad = cache["blocks.1.hook_resid_post_grad"]
    resid = cache["blocks.1.hook_resid_post"].clone().requires_grad_(True)
    with torch.enable_grad():
        again = torch.nn.functional.cross_entropy(
            tiny.head(tiny.ln_final(resid)[:, 0]), LABELS)  # the rest of the model after block 1
        (expected,) = torch.autograd.grad(again, resid)
    torch.testing.assert_close(grad, expected)


def test_return_type_errors_are_one_line(tiny):
    from hooked_vit.errors import HookedViTError
    from hooked_vit.validation import check_return_type

    images, n_classes = torch.randn(3, 3, 32, 32), tiny.cfg.n_classes
    for kwargs, needle in [({"return_type": "los"}, "unknown return_type 'los'"),
                           ({"return_type": "loss"}, "needs labels="),
                           ({"return_type": "both", "labels": torch.tensor([0, 1, n_classes])},
                            f"label {n_classes} is outside")]:
        with pytest.raises(HookedViTError, match=needle) as error:
            tiny(images, **kwargs)
        assert "\n" not in str(error.value)
    with pytest.raises(TypeError, match="integer tensor"):
        check_return_type("loss", torch.zeros(3), 3, n_classes)
    with pytest.raises(ValueError, match=r"do not fit 3 images"):
        check_return_type("loss", torch.zeros(2, dtype=torch.long), 3, n_classes)
    with pytest.raises(ValueError, match="label -1"):
        check_return_type("loss", torch.tensor([0, -1, 2]), 3, n_classes)
    check_return_type("logits", None, 3, n_classes)  # labels are only read for a loss
