"""Attribution maps (analyses.model.lrp) on tiny DeiT-III models.

The Chefer map is re-derived here, image by image, by a module-by-module relevance propagation
written in this file on the *timm* model's modules (the reference's layer rules: alpha=1 beta=0
Linear through autograd, z-rule through the adds, clones, pooling and attention matmuls by
``autograd.grad``, pass-through LayerNorm/GELU/softmax), and must match the hooked implementation
to 1e-5. Further: batch == loop, conservation, CP-LRP sums to the logit, baselines, bad inputs.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import make_timm

STAB = 1e-9  # the reference's safe_divide stabiliser


@pytest.fixture(scope="module")
def timm_tiny64():
    """A 2-block DeiT-III (width 32, 2 heads, 16 patches), LayerScale O(1) with some negative gammas."""
    model = make_timm("deit3_small_patch16_224", depth=2, img_size=32, patch_size=8, embed_dim=32, num_heads=2)
    with torch.no_grad():
        model.blocks[0].ls1.gamma[:4] *= -1
    return model.double()


@pytest.fixture(scope="module")
def hooked_tiny64(timm_tiny64):
    from hooked_vit import HookedViT

    return HookedViT.from_timm(timm_tiny64)


@pytest.fixture(scope="module")
def hooked_tiny(timm_tiny64):
    from hooked_vit import HookedViT

    return HookedViT.from_timm(timm_tiny64).float()


@pytest.fixture(scope="module")
def images():
    return torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(5))


# ----------------------------------------------------------------------------- independent re-derivation
def safe(a, b):
    return torch.where(b != 0, a / (b + STAB), torch.zeros_like(a))


def z_rule(fn, inputs, relevance):
    """The reference's simple rule: R_i = x_i * d/dx_i <Z, R / Z>."""
    inputs = [x.detach().requires_grad_(True) for x in inputs]
    with torch.enable_grad():
        out = fn(*inputs)
        grads = torch.autograd.grad(out, inputs, safe(relevance, out))
    return [x.detach() * g for x, g in zip(inputs, grads)]


def alpha1(x, weight, relevance):
    """The reference's Linear rule with alpha=1, beta=0 (no bias), through autograd."""
    px = x.clamp(min=0).detach().requires_grad_(True)
    nx = x.clamp(max=0).detach().requires_grad_(True)
    with torch.enable_grad():
        z1, z2 = F.linear(px, weight.clamp(min=0)), F.linear(nx, weight.clamp(max=0))
        s = safe(relevance, z1 + z2)
        c1 = torch.autograd.grad(z1, px, s)[0]
        c2 = torch.autograd.grad(z2, nx, s)[0]
    return px.detach() * c1 + nx.detach() * c2


def add_rule(x0, x1, relevance):
    a, b = z_rule(lambda u, v: u + v, [x0, x1], relevance)
    a_sum, b_sum = a.sum(), b.sum()  # one image: the reference's sums over everything
    a_fact = safe(a_sum.abs(), a_sum.abs() + b_sum.abs()) * relevance.sum()
    b_fact = safe(b_sum.abs(), a_sum.abs() + b_sum.abs()) * relevance.sum()
    return a * safe(a_fact, a.sum()), b * safe(b_fact, b.sum())


def clone_rule(x, relevances):
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        outs = [x * 1 for _ in relevances]
        grad = torch.autograd.grad(outs, [x], [safe(r, o) for r, o in zip(relevances, outs)])[0]
    return x.detach() * grad


def reference_map(timm_model, image, start_layer=0, layerscale_rule="identity", cp_attention=False):
    """The Chefer map of one image ``[1, C, H, W]``, module by module on the timm model."""
    records = []
    with torch.enable_grad():
        x = timm_model.patch_embed(image)
        x = x + timm_model.pos_embed  # no_embed_class: positions on the patches only
        x = torch.cat([timm_model.cls_token.expand(1, -1, -1), x], dim=1)
        for blk in timm_model.blocks:
            rec = {"pre": x}
            n1 = blk.norm1(x)
            heads, n = blk.attn.num_heads, x.shape[1]
            qkv = F.linear(n1, blk.attn.qkv.weight, blk.attn.qkv.bias).reshape(1, n, 3, heads, -1)
            q, k, v = qkv.permute(2, 0, 3, 1, 4)
            attn = torch.softmax(torch.einsum("bhid,bhjd->bhij", q, k) * blk.attn.scale, dim=-1)
            attn.retain_grad()
            ctx = torch.einsum("bhij,bhjd->bhid", attn, v).transpose(1, 2).reshape(1, n, -1)
            attn_branch = blk.ls1(blk.attn.proj(ctx))
            mid = x + attn_branch
            n2 = blk.norm2(mid)
            hidden = blk.mlp.act(blk.mlp.fc1(n2))
            mlp_branch = blk.ls2(blk.mlp.fc2(hidden))
            x = mid + mlp_branch
            rec.update(n1=n1, q=q, k=k, v=v, attn=attn, ctx=ctx, attn_branch=attn_branch, mid=mid, n2=n2,
                       hidden=hidden, mlp_branch=mlp_branch)
            records.append(rec)
        normed = timm_model.norm(x)
        logits = timm_model.head(normed[:, 0])
        target = int(logits.argmax())
        logits[0, target].backward()
    one_hot = F.one_hot(torch.tensor([target]), logits.shape[1]).to(image.dtype)

    def ls(relevance, module):
        return relevance if layerscale_rule == "identity" else relevance / (module.gamma.detach() + STAB)

    relevance = alpha1(normed[:, 0].detach(), timm_model.head.weight.detach(), one_hot)
    (relevance,) = z_rule(lambda t: t[:, 0], [normed.detach()], relevance)  # CLS pooling; final norm passes
    cams = {}
    for layer in range(len(records) - 1, start_layer - 1, -1):
        blk, rec = timm_model.blocks[layer], {k: v.detach() for k, v in records[layer].items()}
        r_res, r_mlp = add_rule(rec["mid"], rec["mlp_branch"], relevance)
        r_hidden = alpha1(rec["hidden"], blk.mlp.fc2.weight.detach(), ls(r_mlp, blk.ls2))
        r_n2 = alpha1(rec["n2"], blk.mlp.fc1.weight.detach(), r_hidden)
        relevance = clone_rule(rec["mid"], [r_res, r_n2])
        r_res, r_attn = add_rule(rec["pre"], rec["attn_branch"], relevance)
        r_ctx = alpha1(rec["ctx"], blk.attn.proj.weight.detach(), ls(r_attn, blk.ls1))
        r_ctx = r_ctx.reshape(1, -1, blk.attn.num_heads, rec["q"].shape[-1]).transpose(1, 2)
        r_attn_map, r_v = z_rule(lambda a, w: torch.einsum("bhij,bhjd->bhid", a, w), [rec["attn"], rec["v"]], r_ctx)
        r_attn_map = r_attn_map / 2
        if cp_attention:
            r_q, r_k = torch.zeros_like(rec["q"]), torch.zeros_like(rec["k"])
        else:
            r_v = r_v / 2
            r_q, r_k = z_rule(lambda a, b: torch.einsum("bhid,bhjd->bhij", a, b), [rec["q"], rec["k"]], r_attn_map)
            r_q, r_k = r_q / 2, r_k / 2
        r_qkv = torch.stack([r_q, r_k, r_v]).permute(1, 3, 0, 2, 4).reshape(1, r_q.shape[2], -1)
        r_n1 = alpha1(rec["n1"], blk.attn.qkv.weight.detach(), r_qkv)
        relevance = clone_rule(rec["pre"], [r_res, r_n1])
        grad = records[layer]["attn"].grad
        cams[layer] = (grad[0] * r_attn_map[0]).clamp(min=0).mean(0)
    joint = torch.eye(cams[start_layer].shape[0], dtype=image.dtype) + cams[start_layer]
    for layer in range(start_layer + 1, len(records)):
        joint = (torch.eye(joint.shape[0], dtype=image.dtype) + cams[layer]) @ joint
    return joint[0, 1:]


@pytest.mark.parametrize("start_layer,rule,cp", [(0, "identity", False), (1, "identity", False),
                                                 (0, "eq14", False), (0, "identity", True)])
def test_chefer_matches_module_by_module_rederivation(timm_tiny64, hooked_tiny64, images, start_layer, rule, cp):
    from analyses.model.lrp import transformer_attribution

    images = images.double()
    maps = transformer_attribution(hooked_tiny64, images, start_layer=start_layer, layerscale_rule=rule,
                                   cp_attention=cp)
    assert maps.shape == (3, 4, 4)
    for i in range(images.shape[0]):
        expected = reference_map(timm_tiny64, images[i:i + 1], start_layer, rule, cp).reshape(4, 4)
        assert (expected.abs() > 1e-6).sum() > 4  # a map with content, not zeros
        torch.testing.assert_close(maps[i], expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))


def test_chefer_with_a_zero_layerscale_gamma_matches_rederivation(timm_tiny64, images):
    """A zero ``gamma`` hides a Linear's output in the cache: the propagation must recompute it."""
    import copy

    from analyses.model.lrp import transformer_attribution
    from hooked_vit import HookedViT

    timm_model = copy.deepcopy(timm_tiny64)
    with torch.no_grad():
        timm_model.blocks[1].ls1.gamma[3] = 0.0
        timm_model.blocks[1].ls2.gamma[5] = 0.0
    images = images.double()
    maps = transformer_attribution(HookedViT.from_timm(timm_model), images)
    assert maps.isfinite().all()
    for i in range(images.shape[0]):
        expected = reference_map(timm_model, images[i:i + 1], 0, "identity", False).reshape(4, 4)
        torch.testing.assert_close(maps[i], expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))


def test_lrp_linear_sums_cancelling_rows_term_by_term():
    """With the layer's output given, ``x+ w+ + x- w-`` is ``(xW + |x||W|) / 2``, which cancels
    where nearly every contribution is negative; there the rule must still equal the reference's
    term-by-term sum (written out here as loops, in float64)."""
    from analyses.model.lrp import lrp_linear

    g = torch.Generator().manual_seed(0)
    x = torch.rand(4, 48, generator=g) + 0.5  # positive inputs
    w = torch.randn(3, 48, generator=g)
    w[0] = -w[0].abs()  # output 0: every contribution negative, so x+ w+ + x- w- = 0 exactly
    w[1] = -w[1].abs()
    w[1, 7] = 1e-3  # output 1: one tiny positive contribution among large negative ones
    relevance = torch.rand(4, 3, generator=g)
    expected = torch.zeros(4, 48, dtype=torch.float64)
    for b in range(4):
        for j in range(3):
            terms = [max(float(x[b, i]), 0) * max(float(w[j, i]), 0) + min(float(x[b, i]), 0) * min(float(w[j, i]), 0)
                     for i in range(48)]
            z = sum(terms)
            if z != 0:
                for i in range(48):
                    expected[b, i] += terms[i] * float(relevance[b, j]) / (z + STAB)
    got = lrp_linear(x, w, relevance, product=x @ w.T)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lrp_linear(x, w, relevance).double(), expected, rtol=1e-5, atol=1e-6)


def test_chefer_float32_and_float64_propagation_agree(hooked_tiny, images):
    from analyses.model.lrp import transformer_attribution

    fast = transformer_attribution(hooked_tiny, images)
    exact = transformer_attribution(hooked_tiny, images, dtype=torch.float64)
    assert exact.dtype == torch.float64
    torch.testing.assert_close(fast.double(), exact, rtol=1e-3, atol=1e-4 * float(exact.abs().max()))


def test_conservation(hooked_tiny64, images, monkeypatch):
    """Every rule of the default propagation is conservative: the relevance of each block's input
    sums to the seed (1). With the reference's 1e-9 stabiliser removed it is exact; eq. 14 is not."""
    import analyses.model.lrp as lrp

    images = images.double()
    cache = lrp.chefer_cache(hooked_tiny64, images)
    stabilised = lrp.chefer_propagate(hooked_tiny64, cache)
    for relevance in stabilised.resid_pre.values():
        torch.testing.assert_close(relevance.sum((1, 2)), torch.ones(3, dtype=torch.float64), rtol=0, atol=1e-2)
    eq14 = lrp.chefer_propagate(hooked_tiny64, cache, layerscale_rule="eq14")
    assert (eq14.resid_pre[0].sum((1, 2)) - 1).abs().max() > 1e-2
    monkeypatch.setattr(lrp, "REFERENCE_STABILISER", 0.0)
    exact = lrp.chefer_propagate(hooked_tiny64, cache)
    for relevance in exact.resid_pre.values():
        torch.testing.assert_close(relevance.sum((1, 2)), torch.ones(3, dtype=torch.float64), rtol=0, atol=1e-9)
    cp = lrp.chefer_propagate(hooked_tiny64, cache, cp_attention=True)
    for relevance in cp.resid_pre.values():
        torch.testing.assert_close(relevance.sum((1, 2)), torch.ones(3, dtype=torch.float64), rtol=0, atol=1e-9)


@pytest.mark.parametrize("method", ["chefer", "attnlrp", "cp_lrp", "rollout", "gradxinput"])
def test_batch_equals_loop(hooked_tiny64, images, method):
    from analyses.model.lrp import attribution_map

    images = images.double()
    target = torch.tensor([1, 4, 7])
    batched = attribution_map(method, hooked_tiny64, images, target)
    looped = torch.cat([attribution_map(method, hooked_tiny64, images[i:i + 1], int(target[i]))
                        for i in range(3)])
    torch.testing.assert_close(batched, looped, rtol=1e-9, atol=1e-12)


def test_pool_row_has_no_effect_with_a_class_token(hooked_tiny64, images):
    from analyses.model.lrp import transformer_attribution

    x = images.double()
    torch.testing.assert_close(transformer_attribution(hooked_tiny64, x, pool_row="pattern"),
                               transformer_attribution(hooked_tiny64, x, pool_row="chefer"), rtol=0, atol=0)


def test_target_changes_chefer_map(hooked_tiny64, images):
    from analyses.model.lrp import transformer_attribution

    images = images.double()
    a, b = transformer_attribution(hooked_tiny64, images, 0), transformer_attribution(hooked_tiny64, images, 5)
    assert not torch.allclose(a, b)


def test_cp_lrp_sums_to_target_logit_without_biases(timm_tiny64, images):
    """On a model without biases, CP-LRP is conservative: block 0's input relevance sums to the logit."""
    from analyses.model.lrp import attn_lrp_hooks, resolve_target
    from hooked_vit import HookedViT

    model = HookedViT.from_timm(timm_tiny64)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.zero_()
    images = images.double()
    logits = model(images)
    target = resolve_target(None, logits)
    tokens = []
    hooks = attn_lrp_hooks(model, "cp_lrp", epsilon=0.0) + [("hook_full_embed", lambda a, hook: tokens.append(a))]
    with torch.enable_grad(), model.hooks(fwd_hooks=hooks):
        out = model(images)
        grad = torch.autograd.grad(out.gather(1, target[:, None]).sum(), tokens[0])[0]
    total = (tokens[0].detach() * grad).sum((1, 2))
    torch.testing.assert_close(total, logits.gather(1, target[:, None])[:, 0], rtol=1e-9, atol=1e-9)
    # ... and the map the public function returns is that relevance at the patch tokens.
    from analyses.model.lrp import attn_lrp

    maps = attn_lrp(model, images, variant="cp_lrp", epsilon=0.0)
    torch.testing.assert_close(maps.reshape(3, -1), (tokens[0].detach() * grad).sum(-1)[:, 1:])


def test_attnlrp_identity_rule_and_uniform_split(hooked_tiny64, images):
    """AttnLRP's hooks leave the forward unchanged and change the gradient: it differs from the plain
    gradient x input, and its pixel map sums over patches to its token map's scale."""
    from analyses.model.lrp import attn_lrp, attn_lrp_hooks

    images = images.double()
    plain = hooked_tiny64(images)
    hooked = hooked_tiny64.run_with_hooks(images, fwd_hooks=attn_lrp_hooks(hooked_tiny64, "attnlrp"))
    torch.testing.assert_close(hooked, plain)
    attn, cp = attn_lrp(hooked_tiny64, images), attn_lrp(hooked_tiny64, images, variant="cp_lrp")
    assert attn.shape == cp.shape == (3, 4, 4) and not torch.allclose(attn, cp)
    assert attn_lrp(hooked_tiny64, images, at="pixels").shape == (3, 32, 32)


def test_rollout_matches_formula(hooked_tiny64, images):
    from analyses.model.lrp import attention_rollout

    images = images.double()
    _, cache = hooked_tiny64.run_with_cache(images, names_filter=lambda n: n.endswith("hook_pattern"))
    joint = torch.eye(17, dtype=torch.float64)
    for layer in range(2):
        a = cache[f"blocks.{layer}.attn.hook_pattern"].mean(1)
        a = 0.5 * a + 0.5 * torch.eye(17, dtype=torch.float64)
        joint = (a / a.sum(-1, keepdim=True)) @ joint
    torch.testing.assert_close(attention_rollout(hooked_tiny64, images), joint[:, 0, 1:].reshape(3, 4, 4))


def test_gradient_x_input_per_patch(hooked_tiny64, images):
    from analyses.model.lrp import gradient_x_input

    images = images.double().requires_grad_(True)
    logits = hooked_tiny64(images)
    target = logits.argmax(-1)
    (grad,) = torch.autograd.grad(logits.gather(1, target[:, None]).sum(), images)
    pixels = (grad * images).sum(1).detach()
    expected = pixels.reshape(3, 4, 8, 4, 8).sum((2, 4))
    torch.testing.assert_close(gradient_x_input(hooked_tiny64, images.detach()), expected)


def test_random_map_is_seeded(hooked_tiny, images):
    from analyses.model.lrp import random_map

    a, b, c = random_map(hooked_tiny, images, seed=1), random_map(hooked_tiny, images, seed=1), random_map(
        hooked_tiny, images, seed=2)
    assert a.shape == (3, 4, 4) and torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("call,needle", [
    (lambda m, x: __import__("analyses.model.lrp").model.lrp.transformer_attribution(m, x, target=1000), "1000"),
    (lambda m, x: __import__("analyses.model.lrp").model.lrp.transformer_attribution(m, x, target=-1), "-1"),
    (lambda m, x: __import__("analyses.model.lrp").model.lrp.transformer_attribution(m, x, layerscale_rule="fold"), "'fold'"),
    (lambda m, x: __import__("analyses.model.lrp").model.lrp.transformer_attribution(m, x, start_layer=2), "start_layer 2"),
    (lambda m, x: __import__("analyses.model.lrp").model.lrp.transformer_attribution(m, x, pool_row="mean"), "'mean'"),
    (lambda m, x: __import__("analyses.model.lrp").model.lrp.attn_lrp(m, x, variant="lrp"), "'lrp'"),
    (lambda m, x: __import__("analyses.model.lrp").model.lrp.attn_lrp(m, x, at="patches"), "'patches'"),
    (lambda m, x: __import__("analyses.model.lrp").model.lrp.attribution_map("gradcam", m, x), "'gradcam'"),
    (lambda m, x: __import__("analyses.model.lrp").model.lrp.transformer_attribution(m, x[:, :, :16, :16]), "16x16"),
])
def test_bad_inputs_fail_in_one_line(hooked_tiny, images, call, needle):
    with pytest.raises(ValueError) as error:
        call(hooked_tiny, images)
    message = str(error.value)
    assert needle in message and "\n" not in message
