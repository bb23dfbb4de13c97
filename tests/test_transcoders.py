"""Cross-layer transcoders (analyses/transcoders): every result re-derived in the test itself, by
loops over layers and latents, hand-written hooks and the raw safetensors files."""

from __future__ import annotations

import json

import pytest
import torch

D_LATENT = 24


def random_clt(n_layers: int = 3, d_model: int = 8, *, seed: int = 0, **options):
    """A CLT whose every weight is random (biases and thresholds too), so no term vanishes."""
    from analyses.transcoders import CrossLayerTranscoder

    clt = CrossLayerTranscoder(n_layers, d_model, D_LATENT, seed=seed, **options)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in clt.named_parameters():
            if name != "log_threshold":
                param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
    return clt


def by_hand_target(clt, codes, l, inputs=None):
    """y_l = sum_{i <= l} z_i @ W_dec[i][:, l - i] + b_dec[l] (+ x_l @ W_skip[l]), a loop over sources."""
    y = clt.b_dec[l].expand(*codes[0].shape[:-1], clt.d_model).clone()
    for i in range(l + 1):
        y = y + codes[i] @ clt.W_dec[i][:, l - i, :]
    if clt.W_skip is not None:
        y = y + inputs[l] @ clt.W_skip[l]
    return y


def by_hand_decode(clt, codes, inputs=None):
    return {l: by_hand_target(clt, codes, l, inputs) for l in range(clt.n_layers)}


def by_hand_codes(clt, layer, x):
    """The sparsifier written out: pre-activations, then per token the k largest (or the threshold)."""
    pre = (x @ clt.W_enc[layer].T + clt.b_enc[layer]).detach()
    flat = pre.reshape(-1, pre.shape[-1])
    codes = torch.zeros_like(flat)
    for row in range(flat.shape[0]):
        values = flat[row]
        if clt.activation == "jumprelu":
            codes[row] = torch.where(values > clt.threshold[layer], values, torch.zeros_like(values))
            continue
        keys = values.abs() if clt.activation == "abstopk" else values
        for j in sorted(range(values.numel()), key=lambda j: -float(keys[j]))[:clt.k]:
            codes[row, j] = values[j] if clt.activation == "abstopk" else max(float(values[j]), 0.0)
    return codes.reshape(pre.shape)


@pytest.mark.parametrize("activation", ["topk", "abstopk", "jumprelu"])
def test_each_sparsifier_matches_its_definition(activation):
    clt = random_clt(activation=activation, k=5, threshold_init=0.2)
    x = torch.randn(2, 7, 8, generator=torch.Generator().manual_seed(3))
    for layer in range(clt.n_layers):
        torch.testing.assert_close(clt.encode_layer(layer, x), by_hand_codes(clt, layer, x))


def test_jumprelu_threshold_gets_the_straight_through_gradient():
    from analyses.transcoders.clt import JumpReLUFunction

    x = torch.tensor([[0.06, 0.12, 0.3, 0.21]])
    threshold = torch.tensor([0.1, 0.1, 0.1, 0.25], requires_grad=True)
    x.requires_grad_(True)
    JumpReLUFunction.apply(x, threshold, 0.1).sum().backward()
    # d/d theta = -(theta / eps) * 1[|x - theta| < eps / 2]; d/dx = 1[x > theta]
    assert torch.allclose(threshold.grad, torch.tensor([-1.0, -1.0, 0.0, -2.5]))
    assert torch.equal(x.grad, torch.tensor([[0.0, 1.0, 1.0, 0.0]]))


@pytest.mark.parametrize("skip", [False, True])
def test_decoding_is_triangular_and_matches_the_loop(skip):
    clt = random_clt(n_layers=4, skip=skip)
    generator = torch.Generator().manual_seed(5)
    codes = {l: torch.randn(2, 3, D_LATENT, generator=generator) for l in range(4)}
    inputs = {l: torch.randn(2, 3, 8, generator=generator) for l in range(4)}
    decoded = clt.decode(codes, inputs)
    expected = by_hand_decode(clt, codes, inputs)
    for l in range(4):
        torch.testing.assert_close(decoded[l], expected[l])
    for i in range(4):  # perturbing layer i's codes never changes a layer before i, and changes layer i
        perturbed = clt.decode({**codes, i: codes[i] + 1.0}, inputs)
        for l in range(4):
            assert torch.equal(perturbed[l], decoded[l]) == (l < i), (i, l)


def test_sparse_decoding_equals_the_dense_one():
    from analyses.transcoders.clt import topk_pairs

    clt = random_clt(n_layers=3, k=4)
    x = torch.randn(10, 3, 8, generator=torch.Generator().manual_seed(6))
    codes = {l: clt.encode_layer(l, x[:, l]) for l in range(3)}
    values, indices = topk_pairs(torch.stack([clt.preactivations(l, x[:, l]) for l in range(3)], 1), 4, signed=False)
    dense = by_hand_decode(clt, codes)
    torch.testing.assert_close(clt.decode_sparse(values, indices), torch.stack([dense[l] for l in range(3)], 1))


def test_topk_indices_match_a_full_sort():
    from analyses.transcoders.clt import topk_indices

    scores = torch.randn(50, 96, generator=torch.Generator().manual_seed(7))
    for k in (1, 6, 12):  # two-stage for k <= 96 / 8 chunks of 8, else the plain topk
        found = topk_indices(scores, k).sort(-1).values
        assert torch.equal(found, scores.argsort(-1, descending=True)[:, :k].sort(-1).values)


def by_hand_hooks(clt, replaced, place=lambda out, y: y):
    """Forward hooks computing every layer's codes by hand at its ``ln2`` output (into ``seen``, returned
    with them) and writing ``place(out, by-hand target)`` into the MLP outputs of ``replaced``."""
    seen = {}

    def store(layer):
        def hook(x, hook):
            seen[layer] = by_hand_codes(clt, layer, x)
        return hook

    def substitute(layer):
        def hook(out, hook):
            return place(out, by_hand_target(clt, seen, layer))
        return hook

    hooks = [(f"blocks.{l}.ln2.hook_normalized", store(l)) for l in range(clt.n_layers)]
    return hooks + [(f"blocks.{l}.hook_mlp_out", substitute(l)) for l in replaced], seen


def model_clt(model, seed=0, **options):
    """A random CLT on ``model``'s blocks, at the scale of its activations."""
    clt = random_clt(model.cfg.n_layers, model.cfg.d_model, seed=seed, **options)
    with torch.no_grad():
        for w in clt.W_dec:
            w.mul_(0.3)
    return clt


@pytest.mark.parametrize("positions", ["all", "cls", "patches"])
def test_the_replaced_forward_equals_hand_written_hooks(tiny, positions):
    clt = model_clt(tiny, k=4)
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(8))
    layers = {"all": None, "cls": [1], "patches": [0]}[positions]
    tokens = {"all": slice(None), "cls": slice(0, 1), "patches": slice(1, None)}[positions]  # one prefix token

    def place(out, y):
        out = out.clone()
        out[:, tokens] = y[:, tokens]
        return out

    hooks, _ = by_hand_hooks(clt, [0, 1] if layers is None else layers, place)
    with torch.no_grad():
        expected = tiny.run_with_hooks(images, fwd_hooks=hooks)
        with clt.replaced(tiny, layers=layers, positions=positions):
            logits = tiny(images)
        plain = tiny(images)
    torch.testing.assert_close(logits, expected)
    assert not torch.allclose(logits, plain)  # the replacement changed something


def test_a_contribution_score_by_hand(tiny):
    clt = model_clt(tiny, k=4)
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(9))
    scores = clt.contributions(tiny, images)
    assert scores.shape == (3, 2)
    # By hand: replace every MLP output, keep the codes, the last residual stream and the pooled output.
    hooks, seen = by_hand_hooks(clt, [0, 1])
    kept = {}

    def keep(name):
        def hook(x, hook):
            kept[name] = x
        return hook

    names = ["hook_full_embed", "blocks.0.hook_attn_out", "blocks.1.hook_attn_out", "blocks.1.hook_resid_post",
             "hook_pooled"]
    hooks += [(name, keep(name)) for name in names]
    with torch.no_grad():
        tiny.run_with_hooks(images, fwd_hooks=hooks)
    resid, pooled = kept["blocks.1.hook_resid_post"][:, 0], kept["hook_pooled"]
    ln = tiny.ln_final
    sigma = ((resid - resid.mean(-1, keepdim=True)) ** 2).mean(-1, keepdim=True).add(ln.eps).sqrt()

    def share(piece):  # the piece's part of the pooled CLS after the final LayerNorm (scale frozen)
        mapped = (piece - piece.mean(-1, keepdim=True)) / sigma * ln.weight
        return (mapped * pooled).sum(-1) / (pooled * pooled).sum(-1)

    with torch.no_grad():
        for source in range(2):
            term = sum(seen[source][:, 0] @ clt.W_dec[source][:, l - source] for l in range(source, 2))
            torch.testing.assert_close(scores[:, source], share(term))
        # every piece of the last residual stream (and the LayerNorm bias) together make up all of it
        others = [kept[n][:, 0] for n in names[:3]] + [clt.b_dec[0].expand(3, -1), clt.b_dec[1].expand(3, -1)]
        bias_share = (ln.bias * pooled).sum(-1) / (pooled * pooled).sum(-1)
        total = scores.sum(1) + sum(share(p) for p in others) + bias_share
    torch.testing.assert_close(total, torch.ones(3))


def tiny_images(n: int = 24):
    from hooked_vit.data.dataset import LabelledImages

    generator = torch.Generator().manual_seed(10)
    return LabelledImages.from_tensors(torch.randn(n, 3, 32, 32, generator=generator),
                                       torch.arange(n) % 3, ["a", "b", "c"])


def small_config(**fields):
    from analyses.transcoders import CLTConfig

    base = dict(model="deit3_tiny_digits", steps=20, train_batch_size=64, images_per_forward=8, expansion_factor=2,
                k=4, checkpoint_every=10, lr=1e-2, dead_steps=5)
    return CLTConfig(**{**base, **fields})


@pytest.mark.parametrize("activation", ["topk", "jumprelu"])
def test_a_few_training_steps_reduce_the_loss(tiny, activation, capsys):
    from analyses.transcoders import train_clt

    clt = train_clt(tiny, tiny_images(), small_config(activation=activation, sparsity_coefficient=1e-4),
                    progress=False)
    history = clt.training_history
    assert history[-1]["fvu"] < 0.6 * history[0]["fvu"]
    assert "parameters" in capsys.readouterr().out  # the parameter count is printed before training


def test_a_killed_training_resumes_from_its_checkpoint_exactly(tiny, tmp_path, monkeypatch):
    from analyses.transcoders import CrossLayerTranscoder, train_clt, training

    config = small_config()
    whole = train_clt(tiny, tiny_images(), config, out_dir=tmp_path / "whole", progress=False)
    original = training.step_loss

    def dies_at_step_15(clt, x, y, cfg, step, since_fired, **options):
        if step == 15:
            raise KeyboardInterrupt
        return original(clt, x, y, cfg, step, since_fired, **options)

    monkeypatch.setattr(training, "step_loss", dies_at_step_15)
    with pytest.raises(KeyboardInterrupt):
        train_clt(tiny, tiny_images(), config, out_dir=tmp_path / "killed", progress=False)
    assert (tmp_path / "killed" / training.CHECKPOINT_FILE).is_file()
    monkeypatch.setattr(training, "step_loss", original)
    resumed = train_clt(tiny, tiny_images(), config, out_dir=tmp_path / "killed", progress=False)
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, msg=name)
    loaded = CrossLayerTranscoder.load(tmp_path / "killed" / training.FINAL_DIR)
    torch.testing.assert_close(loaded.W_enc, resumed.W_enc)


DATA_PARALLEL_SCRIPT = """
import sys
import torch
sys.path.insert(0, {tests!r})
from test_transcoders import small_config, tiny_images
from analyses.transcoders import train_clt, training
from hooked_vit import HookedViT

out, rank = {out!r}, int(__import__("os").environ["RANK"])
model = HookedViT.from_pretrained("deit3_tiny_digits").eval()
config = small_config()
whole = train_clt(model, tiny_images(), config, out_dir=out + "/whole", progress=False)
torch.save(whole.state_dict(), f"{{out}}/whole_{{rank}}.pt")
original = training.step_loss

def dies_at_step_15(clt, x, y, cfg, step, since_fired, **options):
    if step == 15:
        raise KeyboardInterrupt
    return original(clt, x, y, cfg, step, since_fired, **options)

training.step_loss = dies_at_step_15
try:
    train_clt(model, tiny_images(), config, out_dir=out + "/killed", progress=False)
except KeyboardInterrupt:
    pass
training.step_loss = original
resumed = train_clt(model, tiny_images(), config, out_dir=out + "/killed", progress=False)
torch.save(resumed.state_dict(), f"{{out}}/resumed_{{rank}}.pt")
"""


def by_hand_data_parallel(model, images, config, world):
    """``world`` processes simulated in one: process r's stream, the scales and decoder-bias start
    averaged, a latent alive if it fired on any process, the gradients averaged, one Adam step."""
    from analyses.transcoders import CrossLayerTranscoder
    from analyses.common.data_parallel import DataParallel
    from analyses.transcoders.training import lr_factor, step_loss, token_stream

    clt = CrossLayerTranscoder.for_model(model, expansion_factor=config.expansion_factor, k=config.k, seed=config.seed)
    optimizer = torch.optim.Adam([p for p in clt.parameters() if p.requires_grad], lr=config.lr)
    streams = [token_stream(model, images, config, clt.input_hook, rank=r, world=world) for r in range(world)]
    since_fired = torch.zeros(clt.n_layers, clt.d_latent)
    for step in range(config.steps):
        batches = [next(stream) for stream in streams]
        if step == 0:
            scales = [torch.stack([b[j].pow(2).mean(dim=(0, 2)) for b in batches]).mean(0).sqrt() for j in (0, 1)]
        batches = [(x / scales[0][:, None], y / scales[1][:, None]) for x, y in batches]
        if step == 0:
            with torch.no_grad():
                clt.b_dec.copy_(torch.stack([y.mean(0) for _, y in batches]).mean(0))
        union = torch.zeros(clt.n_layers, clt.d_latent, dtype=torch.bool)
        with torch.no_grad():
            for x, _ in batches:
                pre = torch.einsum("nld,lfd->nlf", x, clt.W_enc) + clt.b_enc
                top = pre.topk(config.k, dim=-1)
                for l in range(clt.n_layers):
                    union[l, top.indices[:, l][top.values[:, l] > 0]] = True

        class AnyProcess(DataParallel):  # what every process sees after combining the fired latents
            def any_(self, mask, union=union):
                return union

        grads, updated = [], None
        for x, y in batches:
            copy = since_fired.clone()
            loss, _ = step_loss(clt, x, y, config, step, copy, processes=AnyProcess())
            grads.append(torch.autograd.grad(loss, [p for p in clt.parameters() if p.requires_grad],
                                             allow_unused=True))
            updated = copy
        since_fired = updated
        for group in optimizer.param_groups:
            group["lr"] = config.lr * lr_factor(step, config)
        for i, p in enumerate(p for p in clt.parameters() if p.requires_grad):
            p.grad = sum(g[i] if g[i] is not None else torch.zeros_like(p) for g in grads) / world
        optimizer.step()
    with torch.no_grad():
        clt.fold_scales(*scales)
    return clt


@pytest.mark.slow
def test_two_torchrun_processes_train_one_transcoder_data_parallel(tmp_path):
    """2 gloo processes: each streams its own share, gradients averaged: both end with the same
    weights, those of a by-hand 2-process simulation, and a killed run resumes to them on both."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from hooked_vit import HookedViT

    script = tmp_path / "data_parallel.py"
    script.write_text(DATA_PARALLEL_SCRIPT.format(tests=str(Path(__file__).parent), out=str(tmp_path)))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          str(script)], check=False, capture_output=True, text=True, env=env, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("parameters") == 3  # by rank 0 alone, once per training (whole, killed, resumed)
    assert "on each of 2 processes, resuming at step 10" in run.stdout
    whole = [torch.load(tmp_path / f"whole_{r}.pt") for r in range(2)]
    resumed = [torch.load(tmp_path / f"resumed_{r}.pt") for r in range(2)]
    model = HookedViT.from_pretrained("deit3_tiny_digits").eval()
    expected = by_hand_data_parallel(model, tiny_images(), small_config(), world=2).state_dict()
    for name in expected:
        assert torch.equal(whole[0][name], whole[1][name]), name
        torch.testing.assert_close(whole[0][name], expected[name], msg=name)
        for r in range(2):
            torch.testing.assert_close(resumed[r][name], whole[r][name], msg=name)
    assert (tmp_path / "whole" / "final" / "config.json").is_file()


def test_save_and_load_round_trip(tmp_path):
    from analyses.transcoders import CrossLayerTranscoder

    clt = random_clt(activation="jumprelu", skip=True, threshold_init=0.05)
    clt.save(tmp_path / "clt")
    loaded = CrossLayerTranscoder.load(tmp_path / "clt")
    assert loaded.config() == clt.config()
    for (name, a), b in zip(clt.state_dict().items(), loaded.state_dict().values()):
        torch.testing.assert_close(a, b, msg=name)


@pytest.mark.parametrize("kind, activation, skip", [("plt", "topk", False), ("plt", "abstopk", True),
                                                     ("plt", "jumprelu", True), ("sae", "jumprelu", False)])
def test_per_layer_baselines_are_sae_lens_dictionaries(tmp_path, kind, activation, skip):
    """``plt[l]`` is a sae-lens object whose own forward is the layer's transcoder written out; the
    files load with ``sae_lens.SAE.load_from_disk`` (JumpReLU: as sae-lens's own classes)."""
    import sae_lens

    from analyses.transcoders import CrossLayerTranscoder

    hook = "ln2.hook_normalized" if kind == "plt" else "hook_mlp_out"
    dictionary = random_clt(cross_layer=False, input_hook=hook, activation=activation, k=5, skip=skip,
                            threshold_init=0.2)
    dictionary.save(tmp_path / "d")
    x = torch.randn(6, 3, 8, generator=torch.Generator().manual_seed(12))
    own = {("plt", False): sae_lens.JumpReLUTranscoder, ("plt", True): sae_lens.JumpReLUSkipTranscoder,
           ("sae", False): sae_lens.JumpReLUSAE}
    for layer in range(3):
        with torch.no_grad():  # by hand: the layer's codes, its one decoder, its skip
            expected = by_hand_codes(dictionary, layer, x[:, layer]) @ dictionary.W_dec[layer][:, 0]
            expected += dictionary.b_dec[layer] + (x[:, layer] @ dictionary.W_skip[layer] if skip else 0)
            loaded = sae_lens.SAE.load_from_disk(tmp_path / "d" / f"layer_{layer}")
            for sae in (dictionary[layer], loaded):
                assert isinstance(sae, sae_lens.Transcoder if kind == "plt" else sae_lens.SAE)
                torch.testing.assert_close(sae(x[:, layer]), expected)
        assert loaded.cfg.metadata.hook_name == f"blocks.{layer}.{hook}"
        if activation == "jumprelu":
            assert type(loaded) is own[(kind, skip)]
    again = CrossLayerTranscoder.load(tmp_path / "d")
    for (name, a), b in zip(dictionary.state_dict().items(), again.state_dict().values()):
        if name != "log_threshold" or activation == "jumprelu":  # a TopK dictionary has no threshold
            torch.testing.assert_close(a, b, msg=name)


def test_the_circuit_tracer_layout_reads_with_plain_safetensors(tmp_path):
    """Read back with safetensors and the documented layout alone (no class of ours)."""
    from safetensors.torch import load_file

    clt = random_clt(n_layers=3, activation="jumprelu", threshold_init=0.05)
    clt.save(tmp_path / "clt")
    config = json.loads((tmp_path / "clt" / "config.json").read_text())
    assert config["feature_input_hook"] == "ln2.hook_normalized" and config["feature_output_hook"] == "hook_mlp_out"
    n = len(list((tmp_path / "clt").glob("W_enc_*.safetensors")))
    assert n == 3 == len(list((tmp_path / "clt").glob("W_dec_*.safetensors")))
    x = torch.randn(4, 3, 8, generator=torch.Generator().manual_seed(11))
    codes, recon = [], []
    for i in range(n):
        enc = load_file(tmp_path / "clt" / f"W_enc_{i}.safetensors")
        assert enc[f"W_enc_{i}"].shape == (D_LATENT, 8) and enc[f"threshold_{i}"].shape == (D_LATENT,)
        pre = x[:, i] @ enc[f"W_enc_{i}"].T + enc[f"b_enc_{i}"]
        codes.append(pre * (pre > enc[f"threshold_{i}"]))
    for l in range(n):
        y = load_file(tmp_path / "clt" / f"W_enc_{l}.safetensors")[f"b_dec_{l}"]
        for i in range(l + 1):
            w_dec = load_file(tmp_path / "clt" / f"W_dec_{i}.safetensors")[f"W_dec_{i}"]
            assert w_dec.shape == (D_LATENT, n - i, 8)  # source i to targets i..n-1
            y = y + codes[i] @ w_dec[:, l - i]
        recon.append(y)
    with torch.no_grad():
        ours = clt.decode({l: clt.encode_layer(l, x[:, l]) for l in range(n)})
    for l in range(n):
        torch.testing.assert_close(recon[l], ours[l])


def test_the_level_runs_end_to_end_on_a_tiny_config(tmp_path):
    from analyses.common.level import run_level
    from analyses.transcoders import CLTResult, Transcoders
    from hooked_vit import HookedViT
    from hooked_vit.data import load_dataset

    model = HookedViT.from_pretrained("deit3_tiny_digits").eval()
    train = load_dataset("digits", split="train", model=model).subset(range(64))
    held_out = load_dataset("digits", split="val", model=model).subset(range(16))
    level = Transcoders(model_loader=lambda config, variant: model, datasets={"train": train, "val": held_out},
                        show_progress=False)
    config = small_config(steps=8, baselines=("plt",), batch_size=8)
    result = run_level(level, config, tmp_path)
    assert {(r["kind"], r["layer"]) for r in result.quality} == {(k, l) for k in ("clt", "plt") for l in range(4)}
    assert all(0 <= r["dead_fraction"] <= 1 and r["l0"] <= config.k for r in result.quality)
    settings = [r["setting"] for r in result.replacement if r["kind"] == "clt"]
    assert settings[:3] == ["model", "all tokens, all layers", "CLS, all layers"] and len(settings) == 7
    curves = result.curves
    assert [c["k"] for c in curves] == [0, 1, 2, 3, 4]
    assert curves[0]["removal"] == curves[-1]["keep"]  # nothing removed = everything kept
    assert len(result.per_class) == len(set(held_out.labels.tolist()))
    assert (tmp_path / "contributions.png").is_file() and (tmp_path / "sparsity_0" / "clt" / "final").is_dir()
    assert (tmp_path / "sparsity_0" / "plt" / "final" / "layer_3" / "cfg.json").is_file()  # sae-lens's format
    assert CLTResult.load(tmp_path) == result
    assert "Replacement" in result.markdown()


def test_bad_inputs_are_refused_in_one_line(tiny):
    from analyses.transcoders import CLTConfig, CrossLayerTranscoder, train_clt
    from hooked_vit.errors import InvalidArgumentError

    clt = model_clt(tiny, k=4)
    images = torch.zeros(1, 3, 32, 32)
    for call, message in [
        (lambda: CLTConfig(activation="relu"), "activation must be one of"),
        (lambda: CLTConfig(baselines=("clt",)), "baselines must be among"),
        (lambda: CLTConfig(lr_decay_fraction=2), "lr_decay_fraction must lie in"),
        (lambda: CLTConfig(skip=True, baselines=("sae",)), "sae-lens SAEs have no skip connection"),
        (lambda: clt[0], "only per-layer dictionaries"),
        (lambda: train_clt(tiny, tiny_images(), small_config(), distributed=True), "launch with torchrun"),
        (lambda: CrossLayerTranscoder(2, 8, 4, k=5), "k=5 exceeds d_latent=4"),
        (lambda: clt.replaced(tiny, layers=[2]).__enter__(), "layers must lie in 0..1"),
        (lambda: clt.replaced(tiny, positions="tokens").__enter__(), "positions must be one of"),
        (lambda: clt.encode({}), "the cache lacks blocks.0.ln2.hook_normalized"),
        (lambda: clt.decode({0: torch.zeros(1, D_LATENT)}), "missing [1]"),
        (lambda: CrossLayerTranscoder.for_model(tiny, kind="sae", expansion_factor=1, k=4).contributions(tiny, images),
         "not one reading hook_mlp_out"),
    ]:
        with pytest.raises(InvalidArgumentError, match=message.replace("[", r"\[").replace("]", r"\]")):
            call()
