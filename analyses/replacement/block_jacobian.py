"""A transformer block split where its Jacobian is cheap to take: the token-local part before the
attention core (``ln1``, ``qkv``, the rotation: :func:`core_inputs`), the softmax-attention core, the
only part that mixes tokens (:func:`attention_core`), and the token-local part after it (the heads'
norm and projection, LayerScale, the residual and the MLP: :func:`after_core`).
``after_core(x, attention_core(*core_inputs(x))[0])`` is the block's forward.

:func:`block_products` takes the block's Jacobian between many input moves and many output
cotangents (the replacement level's edges) at a fraction of a backward pass per cotangent: each
(token, cotangent) pair goes back through the part after the core as one token of a batch, each
move goes forward through the part before it (JVPs), and the two meet in the core's backward,
written out per query token (its score and query parts) and per output (its value part).
"""

from __future__ import annotations

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn
from torch.func import jvp

from hooked_vit.components import rotary_table
from hooked_vit.errors import check

TOKENS_PER_PASS = 8192  # (token, cotangent) pairs per pass through the part after the core
# largest intermediate of block_products on a CPU (4 MB in float32: passes that stay in its caches run
# faster); a GPU takes GPU_PASS_FACTOR times more per pass (fewer kernel launches)
FLOATS_PER_PASS = 2**20
GPU_PASS_FACTOR = 64


def core_inputs(block: nn.Module, x: Float[Tensor, "batch pos d_model"]
                ) -> tuple[Float[Tensor, "batch head pos d_head"], ...]:
    """The attention core's inputs ``q, k, v`` of ``block`` at residual ``x`` (rotated q and k with RoPE)."""
    attn = block.attn
    batch, pos, _ = x.shape
    qkv = attn.qkv(block.ln1(x)).view(batch, pos, 3, attn.n_heads, attn.d_head)
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
    if attn.rope is not None:
        table = rotary_table(attn.rope, attn.grid_size)
        q, k = attn._rotate(q, table, v), attn._rotate(k, table, v)
    return q, k, v


def attention_core(q: Float[Tensor, "batch head pos d_head"], k: Float[Tensor, "batch head pos d_head"],
                   v: Float[Tensor, "batch head pos d_head"], scale: float
                   ) -> tuple[Float[Tensor, "batch pos d_model"], Float[Tensor, "batch head pos pos"]]:
    """Softmax attention: the heads' outputs ``z`` (concatenated) and the pattern."""
    pattern = ((q * scale) @ k.transpose(-2, -1)).softmax(dim=-1)
    z = (pattern @ v).transpose(1, 2)
    return z.reshape(*z.shape[:2], -1), pattern


def after_core(block: nn.Module, x: Float[Tensor, "batch pos d_model"], z: Float[Tensor, "batch pos d_model"]
               ) -> Float[Tensor, "batch pos d_model"]:
    """The block's output from its input ``x`` and the heads' outputs ``z``; token by token."""
    attn = block.attn
    mid = x + attn.layer_scale(attn.proj(attn.norm(z) if hasattr(attn, "norm") else z))
    return mid + block.mlp(block.ln2(mid))


def check_split(block: nn.Module, x: Float[Tensor, "batch pos d_model"], y: Float[Tensor, "batch pos d_model"]
                ) -> None:
    """Refuse a block whose forward the split does not reproduce (a block layout it does not know)."""
    with torch.no_grad():
        expected = block(x)
    error = float((y - expected).abs().max() / expected.abs().max().clamp_min(1e-12))
    check(error < 1e-4, f"the split into token-local parts and the attention core does not reproduce the block "
                        f"(relative error {error:.1e}); exact edges need a pre-norm attention + MLP block")


def core_input_jvp(block: nn.Module, x: Float[Tensor, "batch pos d_model"],
                   tangents: Float[Tensor, "n batch pos d_model"]) -> Float[Tensor, "n batch pos three_d_model"]:
    """The moves of ``[q | k | v]`` (heads concatenated, rotated q and k) per token for ``n`` moves of
    the block input ``x``: forward-mode derivatives of :func:`core_inputs`, the moves as a batch."""
    n, batch, pos, d = tangents.shape

    def qkv(inputs: Tensor) -> Tensor:
        return torch.cat([t.transpose(1, 2).reshape(len(inputs), pos, -1) for t in core_inputs(block, inputs)], dim=-1)

    _, out = jvp(qkv, (x.repeat(n, 1, 1),), (tangents.reshape(n * batch, pos, d),))
    return out.view(n, batch, pos, -1)


def pull_after_core(block: nn.Module, x: Float[Tensor, "batch pos d_model"], z: Float[Tensor, "batch pos d_model"],
                    cotangents: Float[Tensor, "batch pos n d_model"]) -> tuple[Float[Tensor, "batch pos n d_model"], ...]:
    """``n`` cotangents of the block output per token pulled back through :func:`after_core` onto that
    token's ``x`` (the residual path) and ``z``: every (token, cotangent) pair a token of one batch."""
    batch, pos, n, d = cotangents.shape
    gx, gz = torch.empty_like(cotangents), torch.empty(batch, pos, n, z.shape[-1], device=z.device)
    flat_x, flat_z = gx.view(-1, d), gz.view(-1, z.shape[-1])
    tokens = [t.detach()[:, :, None].expand(batch, pos, n, t.shape[-1]).reshape(-1, 1, t.shape[-1]) for t in (x, z)]
    cotangents = cotangents.reshape(-1, 1, d)
    for start in range(0, len(cotangents), TOKENS_PER_PASS):
        part = slice(start, start + TOKENS_PER_PASS)
        xs, zs = (t[part].requires_grad_(True) for t in tokens)
        with torch.enable_grad():
            grad_x, grad_z = torch.autograd.grad(after_core(block, xs, zs), (xs, zs), cotangents[part])
        flat_x[part], flat_z[part] = grad_x[:, 0], grad_z[:, 0]
    return gx, gz


def block_products(block: nn.Module, x: Float[Tensor, "batch pos d_model"],
                   tangents: Float[Tensor, "w batch pos d_model"], cotangents: Float[Tensor, "batch pos n d_model"],
                   slots: Int[Tensor, "batch pos n"], n_out: int) -> Float[Tensor, "batch n_out pos w"]:
    """``out[b, o, s, w] = sum over (t, j) with slots[b, t, j] == o of
    cotangents[b, t, j] . (d block(x)[b, t] / d x[b, s]) tangents[w, b, s]``: the block's Jacobian
    between every moved input token ``s`` (``w`` moves each) and every read output token ``t`` (``n``
    cotangents each, summed into ``n_out`` outputs by ``slots``), exactly, without a backward pass per
    output. Refuses a block the split does not reproduce."""
    batch, pos, d = x.shape
    attn = block.attn
    heads, d_head, scale = attn.n_heads, attn.d_head, attn.scale
    n, w = cotangents.shape[2], tangents.shape[0]
    with torch.no_grad():
        q, k, v = core_inputs(block, x)
        z, pattern = attention_core(q, k, v, scale)
        check_split(block, x, after_core(block, x, z))
        z_heads = z.view(batch, pos, heads, d_head).transpose(1, 2)  # [batch head pos d_head]
        pushed = core_input_jvp(block, x, tangents).view(w, batch, pos, 3, heads, d_head)
        q_, k_, v_ = (pushed[:, :, :, i].permute(1, 3, 2, 4, 0).contiguous() for i in range(3))  # [b h pos e w]
        moves = tangents.permute(1, 2, 3, 0).contiguous()  # [batch pos d w]
    gx, gz = pull_after_core(block, x, z, cotangents)
    per_pass = FLOATS_PER_PASS * (1 if x.device.type == "cpu" else GPU_PASS_FACTOR)
    out = torch.zeros(batch, n_out, pos, w, device=x.device)
    rows = (torch.arange(batch, device=x.device)[:, None, None] * n_out + slots)  # [batch pos n]
    with torch.no_grad():
        dz = gz.view(batch, pos, n, heads, d_head).permute(0, 3, 1, 2, 4).contiguous()  # [b h t n e]
        # per query token: keys [b s n w], q . k' [b s h w], scores [b h n s]
        step = max(1, per_pass // (batch * pos * max(n * w, heads * w, heads * n)))
        for t0 in range(0, pos, step):  # query tokens t: the score and query parts of the core's backward
            t = slice(t0, min(t0 + step, pos))
            c = t.stop - t.start
            dz_t = dz[:, :, t]
            dp = (dz_t.reshape(batch, heads, c * n, d_head) @ v.transpose(-2, -1)).view(batch, heads, c, n, pos)
            # softmax's backward on row t: pattern * (dz . v_s - dz . z_t)
            ds = pattern[:, :, t, None] * (dp - (dz_t * z_heads[:, :, t, None]).sum(-1, keepdim=True))
            dq = (ds.view(batch, heads, c * n, pos) @ k).view(batch, heads, c, n, d_head) * scale
            own = (dq @ q_[:, :, t]).sum(1) + gx[:, t] @ moves[:, t]  # [b c n w]: at the query token itself
            token = torch.arange(t0, t.stop, device=x.device)[None, :, None].expand(batch, c, n)
            out.view(batch * n_out, pos, w).index_put_((rows[:, t], token), own, accumulate=True)
            # key part at every token s: scale * sum_h ds[h, s] (q_t . k'_s)
            qk = torch.einsum("bhte,bhsew->btshw", q[:, :, t], k_)  # [b c s h w]
            keys = (ds.permute(0, 2, 4, 3, 1) @ qk) * scale  # [b c s n w]
            out.view(batch * n_out, pos * w).index_add_(0, rows[:, t].reshape(-1),
                                                        keys.permute(0, 1, 3, 2, 4).reshape(-1, pos * w))
        # value part: dv_o[s] = sum over its (t, j) of pattern[t, s] dz[t, j], dotted with the moved v
        step = max(1, per_pass // (batch * pos * max(d, heads * w)))  # per output: [b h s e], [b h s w]
        for o0 in range(0, n_out, step):
            here = torch.nonzero((slots >= o0) & (slots < o0 + step), as_tuple=True)
            c = min(step, n_out - o0)
            dense = torch.zeros(batch, heads, pos, c, d_head, device=x.device)
            dense.permute(0, 2, 3, 1, 4).index_put_((here[0], here[1], slots[here] - o0),
                                                    dz[here[0], :, here[1], here[2]], accumulate=True)
            dv = (pattern.transpose(-2, -1) @ dense.view(batch, heads, pos, c * d_head)).view(dense.shape)
            out[:, o0:o0 + c] += (dv @ v_).sum(1).transpose(1, 2)
    return out


__all__ = ["after_core", "attention_core", "block_products", "check_split", "core_input_jvp", "core_inputs",
           "pull_after_core"]
