"""Independent tests of the AttnLRP rules of analyses.model.lrp (Achtibat et al. 2024).

:func:`analyses.model.lrp.attn_lrp_hooks` implements AttnLRP as forward hooks that leave the
forward pass unchanged and rewrite the gradient, so that ``x * d(score)/dx`` is the relevance of
``x``. Every expected relevance here is written out in this file, by Python loops over tiny explicit
tensors or by short einsums over tensors cached from a tiny random DeiT-III; the code under test is
only run once per check and never used to produce an expectation. The rules checked:

* identity rule at GELU: the relevance at the GELU input equals the relevance at its output, per
  element (the epsilon rule of ``fc1`` then damps it by ``z / (z + eps sign z)``);
* uniform rule at the bilinear products ``q @ k.T`` and ``pattern @ v``: every product term's share
  of the output relevance is halved between its two operands, so each operand receives exactly half
  of the product's relevance (CP-LRP: the pattern is a constant and V receives all of it), with
  AttnLRP's softmax rule ``R_in = x (R_out - s sum R_out)`` in between;
* epsilon rule through LayerScale: ``gamma * (W h + b)`` passes relevance unchanged through
  ``gamma`` and applies the epsilon rule at the Linear output ``z = W h + b`` (before ``gamma``),
  i.e. ``R_h = h * W.T (R / (z + eps sign z))``; the hook implements this with ``eps * |gamma|``
  on the LayerScaled output, so a swapped or unscaled ``gamma`` would fail these checks;
* Chefer's ``layerscale_rule`` options (``identity``: unchanged, ``eq14``: ``R / (gamma + 1e-9)``)
  and its matmul z-rule;
* conservation where the rules imply it (no biases, ``epsilon=0``): per branch of each block.

Tolerances (float64 throughout): hand-made tensors ``rtol=1e-12``; model checks ``rtol=1e-9`` with
``atol=1e-12`` times the largest relevance compared (rounding of ~10^2-term sums).
"""

from __future__ import annotations

import copy
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from conftest import make_timm
from torch import nn

DT = torch.float64
EXACT = {"rtol": 1e-12, "atol": 1e-14}


def close(actual, expected, rtol=1e-9, atol_rel=1e-12):
    """``assert_close`` with an absolute tolerance relative to the largest expected value."""
    expected = torch.as_tensor(expected, dtype=DT)
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol_rel * float(expected.abs().max()) + 1e-300)


def sign(x: float) -> float:
    """The sign the epsilon rule uses: ``+1`` at zero."""
    return 1.0 if x >= 0 else -1.0


def damp(z: float, eps: float) -> float:
    """The epsilon rule's ``z / (z + eps sign z)``, written out (``1`` where the denominator is 0)."""
    d = z + eps * sign(z)
    return 1.0 if d == 0 else z / d


# ----------------------------------------------------------------------------- the hooks as functions
def rule_fns(epsilon: float, variant: str = "attnlrp", gamma1=None, gamma2=None) -> dict:
    """The AttnLRP hook functions of a one-block model whose LayerScales have ``gamma1`` / ``gamma2``
    (``None``: no LayerScale), by hook name, to be applied by hand to explicit tensors."""
    from analyses.model.lrp import attn_lrp_hooks
    from hooked_vit.components import LayerScale

    def layer_scale(gamma):
        if gamma is None:
            return nn.Identity()
        module = LayerScale(len(gamma)).to(DT)
        with torch.no_grad():
            module.gamma.copy_(torch.tensor(gamma, dtype=DT))
        return module

    block = nn.Module()
    block.ls1, block.ls2 = layer_scale(gamma1), layer_scale(gamma2)
    model = nn.Module()
    model.blocks = nn.ModuleList([block])
    model.cfg = SimpleNamespace(pooling="token")  # CLS readout, final norm ln_final: the hooks it names
    model.hook_dict = {"ln_final.hook_scale": None}
    hooks = attn_lrp_hooks(model, variant, epsilon)
    names = [name for name, _ in hooks]
    assert len(names) == len(set(names))  # one hook per site: the dict below loses nothing
    return dict(hooks)


@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_gelu_identity_rule_by_hand(eps):
    """fc1 output -> GELU under the hooks: R at the GELU input == R at its output, element by element;
    at fc1's raw output (before the hook) the epsilon rule's damping ``x / (x + eps sign x)``."""
    fns = rule_fns(eps)
    values, seed = [-3.0, -0.5, 0.0, 0.25, 2.0], [1.0, -2.0, 0.5, 3.0, -1.0]
    x = torch.tensor(values, dtype=DT, requires_grad=True)
    g = torch.tensor(seed, dtype=DT)
    y = fns["blocks.0.mlp.hook_pre"](x, None)
    post = fns["blocks.0.mlp.hook_post"](F.gelu(y), None)
    torch.testing.assert_close(post, F.gelu(x), **EXACT)  # the forward is unchanged
    grad_y, grad_x = torch.autograd.grad((post * g).sum(), [y, x])
    r_out, r_in, r_raw = post.detach() * g, y.detach() * grad_y, x.detach() * grad_x

    gelu = [0.5 * v * (1 + math.erf(v / math.sqrt(2))) for v in values]
    expected_out = [a * b for a, b in zip(gelu, seed)]
    expected_raw = [damp(v, eps) * r for v, r in zip(values, expected_out)]
    torch.testing.assert_close(r_out, torch.tensor(expected_out, dtype=DT), **EXACT)
    torch.testing.assert_close(r_in, r_out, **EXACT)  # the identity rule
    torch.testing.assert_close(r_raw, torch.tensor(expected_raw, dtype=DT), **EXACT)
    # The plain chain rule would give x * gelu'(x) * g instead: the rule is really active.
    dgelu = [0.5 * (1 + math.erf(v / math.sqrt(2))) + v * math.exp(-v * v / 2) / math.sqrt(2 * math.pi)
             for v in values]
    plain = torch.tensor([v * d * s for v, d, s in zip(values, dgelu, seed)], dtype=DT)
    assert (r_in - plain).abs().max() > 0.1


@pytest.mark.parametrize("a_site,b_site", [("attn.hook_pattern", "attn.hook_v"), ("attn.hook_q", "attn.hook_k")])
def test_uniform_rule_single_product_splits_in_half(a_site, b_site):
    """One product ``a * b`` with relevance ``R = a b g``: each operand receives exactly ``R / 2``."""
    fns = rule_fns(0.0)
    a = torch.tensor([[0.75]], dtype=DT, requires_grad=True)
    b = torch.tensor([[-2.0]], dtype=DT, requires_grad=True)
    out = fns["blocks.0." + a_site](a, None) @ fns["blocks.0." + b_site](b, None)
    assert out.item() == -1.5
    grad_a, grad_b = torch.autograd.grad(1.5 * out.sum(), [a, b])
    # R_out = 0.75 * -2 * 1.5 = -2.25; half of it to each operand.
    assert (a * grad_a).item() == pytest.approx(-1.125, rel=1e-15)
    assert (b * grad_b).item() == pytest.approx(-1.125, rel=1e-15)


def attention_core(fns, q, k, v, scale):
    """The hooked model's attention for one image and one head ``[pos, d_head]``, hooks applied
    where the model applies them (q, k, v, pattern)."""
    qh, kh, vh = (fns[f"blocks.0.attn.hook_{n}"](t, None) for n, t in zip("qkv", (q, k, v)))
    scores = (qh * scale) @ kh.T
    pattern = scores.softmax(-1).clone()
    z = fns["blocks.0.attn.hook_pattern"](pattern, None) @ vh
    return scores, pattern, z


Q = [[0.3, -1.2], [0.8, 0.1], [-0.5, 0.9]]
K = [[1.1, 0.4], [-0.7, 0.6], [0.2, -1.3]]
V = [[0.5, -0.4], [1.5, 0.7], [-0.9, 0.3]]
G = [[1.0, -0.5], [0.25, 2.0], [-1.5, 0.75]]  # d(score)/dz: an arbitrary upstream gradient


@pytest.mark.parametrize("variant,eps", [("attnlrp", 0.0), ("attnlrp", 0.05), ("cp_lrp", 0.0), ("cp_lrp", 0.05)])
def test_attention_rules_by_hand(variant, eps):
    """One head, 3 tokens: relevance of the pattern, the scores, q, k and v by explicit loops.

    ``R_z[i][d] = z g``; ``pattern @ v``: the term ``A[i][j] v[j][d]`` carries ``A v g`` and gives
    half to each operand (AttnLRP) or all to v (CP-LRP); softmax: ``R_s = s (R_A - A sum_k R_A)``;
    ``(q scale) @ k.T``: half to each; at q, k, v (raw qkv outputs) the epsilon rule's damping."""
    fns = rule_fns(eps, variant)
    scale = 0.5**0.5
    q, k, v = (torch.tensor(t, dtype=DT, requires_grad=True) for t in (Q, K, V))
    g = torch.tensor(G, dtype=DT)
    scores, pattern, z = attention_core(fns, q, k, v, scale)
    grads = torch.autograd.grad((z * g).sum(), [q, k, v, pattern, scores], allow_unused=True)
    r_q, r_k, r_v, r_pattern, r_scores = (x.detach() * (gr if gr is not None else torch.zeros_like(x))
                                          for x, gr in zip((q, k, v, pattern, scores), grads))
    r_z = z.detach() * g

    n, dh = 3, 2
    S = [[sum(Q[i][d] * scale * K[j][d] for d in range(dh)) for j in range(n)] for i in range(n)]
    A = [[math.exp(S[i][j]) / sum(math.exp(S[i][m]) for m in range(n)) for j in range(n)] for i in range(n)]
    Z = [[sum(A[i][j] * V[j][d] for j in range(n)) for d in range(dh)] for i in range(n)]
    half = 0.5 if variant == "attnlrp" else 1.0  # CP-LRP: v gets all of the matmul's relevance
    # d(score)/dA through the uniform rule (CP-LRP: A is a constant, no gradient).
    gA = [[0.5 * sum(V[j][d] * G[i][d] for d in range(dh)) if variant == "attnlrp" else 0.0 for j in range(n)]
          for i in range(n)]
    RA = [[A[i][j] * gA[i][j] for j in range(n)] for i in range(n)]
    RS = [[S[i][j] * (RA[i][j] - A[i][j] * sum(RA[i])) for j in range(n)] for i in range(n)]  # softmax rule
    gS = [[A[i][j] * (gA[i][j] - sum(A[i][m] * gA[i][m] for m in range(n))) for j in range(n)] for i in range(n)]
    Rq = [[damp(Q[i][d], eps) * 0.5 * Q[i][d] * scale * sum(K[j][d] * gS[i][j] for j in range(n))
           for d in range(dh)] for i in range(n)]
    Rk = [[damp(K[j][d], eps) * 0.5 * K[j][d] * scale * sum(Q[i][d] * gS[i][j] for i in range(n))
           for d in range(dh)] for j in range(n)]
    Rv = [[damp(V[j][d], eps) * half * V[j][d] * sum(A[i][j] * G[i][d] for i in range(n))
           for d in range(dh)] for j in range(n)]

    torch.testing.assert_close(z.detach(), torch.tensor(Z, dtype=DT), **EXACT)  # forward unchanged
    for actual, expected in ((r_pattern, RA), (r_scores, RS), (r_q, Rq), (r_k, Rk), (r_v, Rv)):
        torch.testing.assert_close(actual, torch.tensor(expected, dtype=DT), **EXACT)
    if eps == 0.0:  # the uniform rule's sums: each operand exactly half of the product's relevance
        if variant == "attnlrp":
            for i in range(n):  # per query, the pattern row carries half of that query's z relevance
                assert r_pattern[i].sum().item() == pytest.approx(0.5 * r_z[i].sum().item(), rel=1e-12)
            assert r_v.sum().item() == pytest.approx(0.5 * r_z.sum().item(), rel=1e-12)
            assert r_q.sum().item() == pytest.approx(0.5 * r_scores.sum().item(), rel=1e-12)
            assert r_k.sum().item() == pytest.approx(0.5 * r_scores.sum().item(), rel=1e-12)
        else:
            assert r_v.sum().item() == pytest.approx(r_z.sum().item(), rel=1e-12)
            assert r_q.abs().max() == r_k.abs().max() == r_pattern.abs().max() == 0


@pytest.mark.parametrize("site", ["hook_mlp_out", "hook_attn_out"])
@pytest.mark.parametrize("eps", [0.0, 0.5])
@pytest.mark.parametrize("with_layer_scale", [True, False])
def test_epsilon_rule_through_layerscale_by_hand(site, eps, with_layer_scale):
    """``out = gamma * (W h + b)`` under the hook at ``site``: LayerScale passes relevance, the
    epsilon rule acts at ``z = W h + b``: ``R_h[i] = sum_j h_i W_ji R_out_j / (z_j + eps sign z_j)``.
    The two LayerScales differ (one gamma negative), so using the other block's gamma would fail."""
    gamma_attn, gamma_mlp = [0.5, -2.0, 1.25], [1.5, 0.25, -0.75]
    gamma = (gamma_mlp if site == "hook_mlp_out" else gamma_attn) if with_layer_scale else [1.0, 1.0, 1.0]
    fns = rule_fns(eps, gamma1=gamma_attn if with_layer_scale else None,
                   gamma2=gamma_mlp if with_layer_scale else None)
    H, W, B, seed = [0.8, -1.1], [[1.0, 0.5], [-0.3, 0.9], [0.6, 0.2]], [0.1, -0.2, 0.05], [1.0, -0.5, 2.0]
    h = torch.tensor(H, dtype=DT, requires_grad=True)
    z_in = F.linear(h, torch.tensor(W, dtype=DT), torch.tensor(B, dtype=DT))  # LayerScale's input
    out = fns["blocks.0." + site](z_in * torch.tensor(gamma, dtype=DT), None)
    grad_h, grad_z = torch.autograd.grad((out * torch.tensor(seed, dtype=DT)).sum(), [h, z_in])
    r_h, r_z = h.detach() * grad_h, z_in.detach() * grad_z

    Z = [sum(W[j][i] * H[i] for i in range(2)) + B[j] for j in range(3)]
    r_out = [gamma[j] * Z[j] * seed[j] for j in range(3)]
    torch.testing.assert_close(out.detach(), torch.tensor([gamma[j] * Z[j] for j in range(3)], dtype=DT), **EXACT)
    expected_h = [sum(H[i] * W[j][i] * r_out[j] / (Z[j] + eps * sign(Z[j])) for j in range(3)) for i in range(2)]
    torch.testing.assert_close(r_h, torch.tensor(expected_h, dtype=DT), **EXACT)
    # At LayerScale's input: the output relevance, damped only by z / (z + eps sign z).
    expected_z = [damp(Z[j], eps) * r_out[j] for j in range(3)]
    torch.testing.assert_close(r_z, torch.tensor(expected_z, dtype=DT), **EXACT)
    if eps == 0.0:  # identity through LayerScale, and conservation through the bias-free part
        torch.testing.assert_close(r_z, torch.tensor(r_out, dtype=DT), **EXACT)
    elif with_layer_scale:  # epsilon applied to gamma*z (LayerScale folded into W) would differ
        folded = [sum(H[i] * W[j][i] * r_out[j] * gamma[j] / (gamma[j] * Z[j] + eps * sign(gamma[j] * Z[j]))
                      for j in range(3)) for i in range(2)]
        assert (r_h - torch.tensor(folded, dtype=DT)).abs().max() > 1e-3


def test_mlp_branch_conserves_relevance_by_hand():
    """A small random LayerNorm -> fc1 -> GELU -> fc2 -> LayerScale branch without biases, the hooks
    applied where the model applies them, ``epsilon=0``: the relevance of the LayerNorm input sums
    to the output's (LayerNorm with detached scale, Linear z-rule, identity, identity)."""
    gen = torch.Generator().manual_seed(0)
    d, d_mlp = 6, 12
    gamma = (torch.rand(d, generator=gen, dtype=DT) + 0.5).tolist()
    fns = rule_fns(0.0, gamma1=gamma, gamma2=gamma)
    w_ln = torch.rand(d, generator=gen, dtype=DT) + 0.5
    w1 = torch.randn(d_mlp, d, generator=gen, dtype=DT)
    w2 = torch.randn(d, d_mlp, generator=gen, dtype=DT)
    x = torch.randn(4, d, generator=gen, dtype=DT, requires_grad=True)
    seed = torch.randn(4, d, generator=gen, dtype=DT)
    centred = x - x.mean(-1, keepdim=True)
    scale = fns["blocks.0.ln2.hook_scale"]((centred.pow(2).mean(-1, keepdim=True) + 1e-6).sqrt(), None)
    ln = centred / scale * w_ln
    pre = fns["blocks.0.mlp.hook_pre"](ln @ w1.T, None)
    post = fns["blocks.0.mlp.hook_post"](F.gelu(pre), None)
    out = fns["blocks.0.hook_mlp_out"]((post @ w2.T) * torch.tensor(gamma, dtype=DT), None)
    plain = (F.gelu(F.layer_norm(x, (d,), w_ln, None, 1e-6) @ w1.T) @ w2.T) * torch.tensor(gamma, dtype=DT)
    torch.testing.assert_close(out, plain, rtol=1e-10, atol=1e-12)  # the forward is unchanged
    tensors = [x, ln, pre, post]
    grads = torch.autograd.grad((out * seed).sum(), tensors)
    r_out = (out.detach() * seed).sum(-1)
    assert r_out.abs().min() > 1e-3
    for t, gr in zip(tensors, grads):  # per row: every stage carries the output's relevance
        torch.testing.assert_close((t.detach() * gr).sum(-1), r_out, rtol=1e-10, atol=1e-12)


# ----------------------------------------------------------------------------- Chefer's rules
def test_chefer_layerscale_options_by_hand():
    """``identity``: relevance unchanged; ``eq14``: ``R / (gamma + 1e-9)``; no LayerScale: unchanged."""
    from analyses.model.lrp import _layerscale
    from hooked_vit.components import LayerScale

    ls = LayerScale(3).to(DT)
    with torch.no_grad():
        ls.gamma.copy_(torch.tensor([0.5, -1.0, 2.0], dtype=DT))
    r = torch.tensor([[1.0, -2.0, 3.0]], dtype=DT)
    torch.testing.assert_close(_layerscale(r, ls, "identity", DT), r, rtol=0, atol=0)
    expected = torch.tensor([[1.0 / (0.5 + 1e-9), -2.0 / (-1.0 + 1e-9), 3.0 / (2.0 + 1e-9)]], dtype=DT)
    torch.testing.assert_close(_layerscale(r, ls, "eq14", DT), expected, **EXACT)
    assert _layerscale(r, ls, "eq14", DT)[0, 0].item() == pytest.approx(2.0, rel=1e-8)
    for rule in ("identity", "eq14"):
        torch.testing.assert_close(_layerscale(r, nn.Identity(), rule, DT), r, rtol=0, atol=0)


def test_lrp_matmul_by_hand():
    """Chefer's matmul z-rule: ``R_a[i][j] = sum_k a_ij b_jk R_ik / (z_ik + 1e-9)`` (and symmetric),
    each operand receiving the full relevance (halved afterwards by the caller)."""
    from analyses.model.lrp import lrp_matmul

    a_, b_, r_ = [[0.6, 0.4], [0.1, 0.9]], [[1.0, -2.0], [0.5, 2.5]], [[0.2, -0.1], [0.7, 0.4]]
    a, b, r = (torch.tensor(t, dtype=DT) for t in (a_, b_, r_))
    r_a, r_b = lrp_matmul(a, b, r)
    z = [[sum(a_[i][j] * b_[j][k] for j in range(2)) for k in range(2)] for i in range(2)]
    ea = [[sum(a_[i][j] * b_[j][k] * r_[i][k] / (z[i][k] + 1e-9) for k in range(2)) for j in range(2)]
          for i in range(2)]
    eb = [[sum(a_[i][j] * b_[j][k] * r_[i][k] / (z[i][k] + 1e-9) for i in range(2)) for k in range(2)]
          for j in range(2)]
    torch.testing.assert_close(r_a, torch.tensor(ea, dtype=DT), **EXACT)
    torch.testing.assert_close(r_b, torch.tensor(eb, dtype=DT), **EXACT)
    for part in (r_a, r_b):
        assert part.sum().item() == pytest.approx(r.sum().item(), rel=1e-8)


# ----------------------------------------------------------------------------- a tiny random DeiT-III
@pytest.fixture(scope="module")
def model():
    """A 2-block random DeiT-III (width 32, 2 heads, 17 tokens), float64, O(1) LayerScale with some
    negative gammas (so ``|gamma|`` matters), ``qkv`` weights x8 so that attention is far from
    uniform (at timm's init the patterns are ~1/17 everywhere and q, k get ~1e-9 relevance)."""
    from hooked_vit import HookedViT

    timm_model = make_timm("deit3_small_patch16_224", depth=2, img_size=32, patch_size=8, embed_dim=32,
                           num_heads=2, seed=3)
    with torch.no_grad():
        timm_model.blocks[0].ls1.gamma[:4] *= -1
        timm_model.blocks[1].ls2.gamma[::3] *= -1
        for block in timm_model.blocks:
            block.attn.qkv.weight *= 8
    return HookedViT.from_timm(timm_model.double())


@pytest.fixture(scope="module")
def images():
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(7), dtype=DT)


# Sites read before AttnLRP's hook (the raw value, gradient = what the rule passes on) and after it
# (the value downstream sees, gradient = what arrives from downstream).
RAW = ["attn.hook_q", "attn.hook_k", "attn.hook_v", "attn.hook_pattern", "mlp.hook_pre"]
OUT = ["ln1.hook_normalized", "attn.hook_attn_scores", "attn.hook_z", "hook_attn_out", "ln2.hook_normalized",
       "mlp.hook_pre", "mlp.hook_post", "hook_mlp_out"]


def run_rules(model, images, epsilon, variant="attnlrp"):
    """One forward under AttnLRP's hooks plus capturing hooks; the gradient of the summed argmax
    logits at every captured tensor. Returns (values, gradients, relevances) keyed by
    ``(when, layer, site)``."""
    from analyses.model.lrp import attn_lrp_hooks

    caps: dict = {}

    def grab(key):
        def hook(act, hook):
            caps[key] = act
        return hook

    layers = range(model.cfg.n_layers)
    fwd = ([(f"blocks.{l}.{s}", grab(("raw", l, s))) for l in layers for s in RAW]
           + attn_lrp_hooks(model, variant, epsilon)
           + [(f"blocks.{l}.{s}", grab(("out", l, s))) for l in layers for s in OUT])
    with torch.enable_grad(), model.hooks(fwd_hooks=fwd):
        logits = model(images)
        score = logits.gather(1, logits.argmax(-1, keepdim=True)).sum()
        keys = list(caps)
        # (CP-LRP detaches the pattern: its raw value is then outside the graph, gradient 0)
        grads = torch.autograd.grad(score, [caps[key] for key in keys], allow_unused=True)
    values = {key: caps[key].detach() for key in keys}
    grads = {key: torch.zeros_like(values[key]) if g is None else g for key, g in zip(keys, grads)}
    return values, grads, {key: values[key] * grads[key] for key in keys}


def eps_denominator(z, eps):
    return z + eps * torch.where(z >= 0, 1.0, -1.0).to(z.dtype)


def test_model_forward_unchanged_by_rule_hooks(model, images):
    from analyses.model.lrp import attn_lrp_hooks

    with torch.no_grad():
        plain = model(images)
        hooked = model.run_with_hooks(images, fwd_hooks=attn_lrp_hooks(model, "attnlrp", 0.01))
    torch.testing.assert_close(hooked, plain, rtol=1e-12, atol=1e-12)


def test_model_mlp_rules_by_hand(model, images):
    """Per block: identity at GELU (R at fc1's output == R at GELU's output, per element), epsilon
    rule through LayerScale + fc2 and through fc1, each re-derived from the captured activations."""
    eps = 0.01  # comparable to the tiny random model's Linear outputs, so the epsilon terms matter
    values, _, rel = run_rules(model, images, eps)
    for layer, block in enumerate(model.blocks):
        def key(when, site, layer=layer):
            return (when, layer, site)

        pre, post = values[key("raw", "mlp.hook_pre")], values[key("out", "mlp.hook_post")]
        close(post, F.gelu(pre), rtol=1e-12)  # forward unchanged
        r_post, r_pre = rel[key("out", "mlp.hook_post")], rel[key("out", "mlp.hook_pre")]
        assert r_post.abs().max() > 1e-6
        close(r_pre, r_post, rtol=1e-10)  # identity rule, per element
        # LayerScale + fc2: epsilon rule at z2 = fc2(post), before gamma.
        w2, b2 = block.mlp.fc2.weight.detach(), block.mlp.fc2.bias.detach()
        z2 = post @ w2.T + b2
        r_mlp_out = rel[key("out", "hook_mlp_out")]
        close(r_post, post * ((r_mlp_out / eps_denominator(z2, eps)) @ w2))
        # ... and it is not the epsilon rule on the folded gamma * z2.
        gamma = block.ls2.gamma.detach()
        folded = post * ((r_mlp_out / eps_denominator(gamma * z2, eps) * gamma) @ w2)
        assert (folded - r_post).abs().max() > 1e-3 * r_post.abs().max()
        # fc1: epsilon rule at z1 = fc1(ln2), with the GELU output's relevance.
        w1 = block.mlp.fc1.weight.detach()
        ln2 = values[key("out", "ln2.hook_normalized")]
        close(rel[key("out", "ln2.hook_normalized")], ln2 * ((r_post / eps_denominator(pre, eps)) @ w1))


@pytest.mark.parametrize("variant", ["attnlrp", "cp_lrp"])
def test_model_attention_rules_by_hand(model, images, variant):
    """Per block, from the captured q, k, v, pattern and d(score)/dz: the uniform rule at ``pattern @ v``
    and ``q @ k.T`` (CP-LRP: all to v), the softmax rule, the epsilon rule through LayerScale + proj
    and through qkv, each written as an einsum here."""
    eps = 0.01
    values, grads, rel = run_rules(model, images, eps, variant)
    attnlrp = variant == "attnlrp"
    for layer, block in enumerate(model.blocks):
        def key(when, site, layer=layer):
            return (when, layer, site)

        q, k, v = (values[key("raw", f"attn.hook_{n}")] for n in "qkv")  # [batch pos head d_head]
        pattern, scores = values[key("raw", "attn.hook_pattern")], values[key("out", "attn.hook_attn_scores")]
        z, gz = values[key("out", "attn.hook_z")], grads[key("out", "attn.hook_z")]
        scale = block.attn.scale
        # pattern @ v: the term A_ij v_jd carries A_ij v_jd gz_id; half to each operand (CP-LRP: all to v).
        ga = 0.5 * torch.einsum("bjhd,bihd->bhij", v, gz) if attnlrp else torch.zeros_like(pattern)
        u_v = (0.5 if attnlrp else 1.0) * v * torch.einsum("bhij,bihd->bjhd", pattern, gz)
        # softmax: gradient of the softmax; (q scale) @ k.T: half of each term to each operand.
        gs = pattern * (ga - (pattern * ga).sum(-1, keepdim=True))
        u_q = 0.5 * q * scale * torch.einsum("bhij,bjhd->bihd", gs, k)
        u_k = 0.5 * k * scale * torch.einsum("bhij,bihd->bjhd", gs, q)
        close(rel[key("raw", "attn.hook_pattern")], pattern * ga)
        close(rel[key("out", "attn.hook_attn_scores")], scores * gs)
        for name, u in (("q", u_q), ("k", u_k), ("v", u_v)):  # at the raw qkv output: epsilon damping
            raw = values[key("raw", f"attn.hook_{name}")]
            expected = u * raw / eps_denominator(raw, eps)
            if name == "v" or attnlrp:
                assert expected.abs().max() > 1e-8
            close(rel[key("raw", f"attn.hook_{name}")], expected)
        # qkv: epsilon rule at its outputs with the undamped operand relevances u.
        ln1 = values[key("out", "ln1.hook_normalized")]
        batch, pos = ln1.shape[:2]
        zqkv = torch.stack([q, k, v], dim=2).reshape(batch, pos, -1)
        u_qkv = torch.stack([u_q, u_k, u_v], dim=2).reshape(batch, pos, -1)
        w_qkv = block.attn.qkv.weight.detach()
        close(zqkv, ln1 @ w_qkv.T + block.attn.qkv.bias.detach(), rtol=1e-12)
        close(rel[key("out", "ln1.hook_normalized")], ln1 * ((u_qkv / eps_denominator(zqkv, eps)) @ w_qkv))
        # LayerScale + proj: epsilon rule at proj's output, before gamma.
        z_flat = z.reshape(batch, pos, -1)
        wp = block.attn.proj.weight.detach()
        zp = z_flat @ wp.T + block.attn.proj.bias.detach()
        r_attn_out = rel[key("out", "hook_attn_out")]
        close(rel[key("out", "attn.hook_z")].reshape(batch, pos, -1), z_flat * ((r_attn_out / eps_denominator(zp, eps)) @ wp))


@pytest.fixture(scope="module")
def model_no_bias(model):
    m = copy.deepcopy(model)
    with torch.no_grad():
        for name, param in m.named_parameters():
            if name.endswith("bias"):
                param.zero_()
    return m


def test_model_conservation_without_biases(model_no_bias, images):
    """No biases, ``epsilon=0``: per image and block, the MLP branch conserves relevance stage by
    stage (ln2 output -> fc1 -> GELU -> fc2 -> LayerScale), ``pattern @ v`` gives exactly half to
    each operand per head, ``q @ k.T`` likewise, and proj + LayerScale and qkv conserve. (Softmax
    does not conserve under AttnLRP's rule, so the block as a whole need not.)"""
    _, _, rel = run_rules(model_no_bias, images, 0.0)
    def per_image(r):
        return r.flatten(1).sum(1)

    def per_head(r, head_dim):  # [batch head q k] (head_dim 1) or [batch pos head d] (2) -> [batch head]
        return r.sum((2, 3)) if head_dim == 1 else r.sum((1, 3))

    for layer in range(model_no_bias.cfg.n_layers):
        def r(when, site, layer=layer):
            return rel[(when, layer, site)]

        target = per_image(r("out", "hook_mlp_out"))
        assert target.abs().min() > 1e-6
        for site in ("mlp.hook_post", "mlp.hook_pre", "ln2.hook_normalized"):
            close(per_image(r("out", site)), target)
        # The uniform rule, per head: [batch pos head d] tensors sum over pos and d per head.
        r_z = per_head(r("out", "attn.hook_z"), 2)
        assert r_z.abs().min() > 1e-8
        close(per_head(r("raw", "attn.hook_pattern"), 1), 0.5 * r_z)
        close(per_head(r("raw", "attn.hook_v"), 2), 0.5 * r_z)
        r_scores = per_head(r("out", "attn.hook_attn_scores"), 1)
        close(per_head(r("raw", "attn.hook_q"), 2), 0.5 * r_scores)
        close(per_head(r("raw", "attn.hook_k"), 2), 0.5 * r_scores)
        # proj + LayerScale, and qkv, conserve.
        close(per_image(r("out", "attn.hook_z")), per_image(r("out", "hook_attn_out")))
        qkv = sum(per_image(r("raw", f"attn.hook_{n}")) for n in "qkv")
        close(per_image(r("out", "ln1.hook_normalized")), qkv)


# ----------------------------------------------------------------------------- Chefer's LayerScale in the model
@pytest.mark.parametrize("rule", ["identity", "eq14"])
def test_chefer_layerscale_rule_at_each_site(model, images, rule, monkeypatch):
    """In ``chefer_propagate`` the LayerScale rule is applied once per sub-block, last block first,
    MLP before attention, with that sub-block's own gamma: the relevance leaving each LayerScale is
    re-derived from the one entering it (``identity``: equal; ``eq14``: ``R / (gamma + 1e-9)``)."""
    from analyses.model import lrp

    calls = []
    original = lrp._layerscale

    def spy(relevance, ls, rule_, dtype):
        out = original(relevance, ls, rule_, dtype)
        calls.append((relevance, ls, rule_, out))
        return out

    cache = lrp.chefer_cache(model, images)
    monkeypatch.setattr(lrp, "_layerscale", spy)
    lrp.chefer_propagate(model, cache, layerscale_rule=rule)
    b0, b1 = model.blocks
    assert [c[1] for c in calls] == [b1.ls2, b1.ls1, b0.ls2, b0.ls1]
    for relevance, ls, rule_, out in calls:
        assert rule_ == rule and relevance.abs().max() > 1e-8
        expected = relevance if rule == "identity" else relevance / (ls.gamma.detach() + 1e-9)
        close(out, expected, rtol=1e-12)


def test_chefer_propagate_rejects_unknown_layerscale_rule(model, images):
    from analyses.model import lrp

    cache = lrp.chefer_cache(model, images)
    try:
        lrp.chefer_propagate(model, cache, layerscale_rule="Identity")
    except ValueError as error:
        assert "'Identity'" in str(error)
    else:
        raise AssertionError("chefer_propagate accepted layerscale_rule='Identity' (and applied eq14)")
