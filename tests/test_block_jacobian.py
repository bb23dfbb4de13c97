"""The block Jacobian products of the replacement level's edges (``analyses.replacement.block_jacobian``)
against the block's full Jacobian taken by autograd and contracted in a loop here, on the block layouts
HookedViT holds: DeiT-III (LayerScale), EVA-02 CLIP (RoPE, SwiGLU with its inner norm, a norm on the
heads' outputs) and DINOv3 (registers, half-rotation RoPE, LayerScale); and the refusal of a block the
split into token-local parts and the attention core does not reproduce. Random weights, 2 images;
tolerance 1e-4 relative to the largest product (fp32 summation order)."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import make_timm

LAYOUTS = {
    "deit3": ("deit3_small_patch16_224", dict(img_size=32, patch_size=8, embed_dim=32, num_heads=2)),
    "eva02_clip": ("eva02_base_patch16_clip_224", dict(img_size=32, patch_size=8, embed_dim=32, num_heads=2)),
    "dinov3": ("vit_small_patch16_dinov3", dict(img_size=32, patch_size=8, embed_dim=32, num_heads=2,
                                                global_pool="token", num_classes=10)),
}


@pytest.fixture(scope="module", params=list(LAYOUTS))
def block_and_input(request):
    """Block 1 of a 2-block model of the layout, and the residual stream entering it for 2 images."""
    from hooked_vit import HookedViT

    name, kwargs = LAYOUTS[request.param]
    model = HookedViT.from_timm(make_timm(name, depth=2, **kwargs))
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        x = model.blocks[0](model(images, stop_at_layer=0))
    return model.blocks[1], x


def test_products_equal_the_autograd_jacobian_contracted_in_a_loop(block_and_input, monkeypatch):
    import analyses.replacement.block_jacobian as module
    from analyses.replacement.block_jacobian import block_products

    block, x = block_and_input
    batch, pos, d = x.shape
    generator = torch.Generator().manual_seed(1)
    w, n, n_out = 3, 4, 5
    tangents = torch.randn(w, batch, pos, d, generator=generator)
    cotangents = torch.randn(batch, pos, n, d, generator=generator)
    # distinct outputs per token (as active latents are), several tokens feeding each output
    slots = torch.stack([torch.randperm(n_out, generator=generator)[:n] for _ in range(batch * pos)]).view(batch, pos, n)
    out = block_products(block, x, tangents, cotangents, slots, n_out)

    expected = torch.zeros(batch, n_out, pos, w)
    for b in range(batch):
        jac = torch.autograd.functional.jacobian(lambda image: block(image[None])[0], x[b])  # [pos d pos d]
        for t in range(pos):
            for j in range(n):
                read = torch.einsum("d,dse->se", cotangents[b, t, j], jac[t])  # d(cotangent . y_t) / d x
                expected[b, slots[b, t, j]] += torch.einsum("se,wse->sw", read, tangents[:, b])
    scale = float(expected.abs().max())
    assert scale > 1e-3
    assert float((out - expected).abs().max()) <= 1e-4 * scale
    # in the smallest passes (one query token, one output, 7 pairs at a time): the same products
    for name, value in (("FLOATS_PER_PASS", 1), ("TOKENS_PER_PASS", 7)):
        monkeypatch.setattr(module, name, value)
    torch.testing.assert_close(block_products(block, x, tangents, cotangents, slots, n_out), out, rtol=1e-5, atol=1e-6)


def test_a_block_the_split_does_not_reproduce_is_refused(block_and_input):
    from analyses.replacement.block_jacobian import block_products
    from hooked_vit.errors import InvalidArgumentError

    block, x = block_and_input
    batch, pos, d = x.shape

    def mix_tokens(value, hook):  # a token-mixing step after the attention core: not a ViT block
        return value + value.roll(1, dims=1)

    block.hook_resid_post.add_hook(mix_tokens)
    try:
        with pytest.raises(InvalidArgumentError, match="does not reproduce the block"):
            block_products(block, x, torch.zeros(1, batch, pos, d), torch.zeros(batch, pos, 1, d),
                           torch.zeros(batch, pos, 1, dtype=torch.long), 1)
    finally:
        block.hook_resid_post.remove_hooks()
