"""Bad inputs, per CLI command and per public function: each is refused before any work starts, with
a one-line message naming what was wrong and what would be right.

The two tables below are the record of what was tried: ``CLI_BAD_INPUTS`` (argv, expected text in
the one-line error) and ``API_BAD_INPUTS`` (call, expected exception class, expected text).
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch

# ------------------------------------------------------------------------------------ CLI
# (argv, text the one-line error must contain). Option errors are found while parsing (no torch import);
# the rest (marked "run") are found by the command before any work.
CLI_BAD_INPUTS = [
    # info
    (["info", "--model", ""], "argument --model: must be a model alias"),
    (["info", "--model", "./no_such_dir"], "model directory './no_such_dir' does not exist"),
    (["info", "--device", "gpu"], "argument --device: must be a torch device"),
    (["info", "--model", "deit3_tiny_digitz"], "Unknown model 'deit3_tiny_digitz'. Did you mean 'deit3_tiny_digits'"),  # run
    (["info", "--model", "alias:no_such_alias"], "Unknown model 'no_such_alias'"),  # run
    # train-default
    (["train-default", "--epochs", "-1"], "argument --epochs: must be a whole number >= 1; got '-1'"),
    (["train-default", "--epochs", "0"], "argument --epochs: must be a whole number >= 1; got '0'"),
    (["train-default", "--epochs", "two"], "argument --epochs: must be a whole number >= 1; got 'two'"),
    (["train-default", "--seed", "1.5"], "argument --seed: must be a whole number; got '1.5'"),
    (["train-default", "--out", ""], "argument --out: must be a folder path"),
    (["train-default", "--out", "pyproject.toml"], "argument --out: 'pyproject.toml' is a file"),
    (["train-default", "--device", "cuda:x"], "argument --device: must be a torch device"),
    # evaluate
    (["evaluate", "--data", "/no/such/folder"], "argument --data: unknown dataset source '/no/such/folder'"),
    (["evaluate", "--batch-size", "0"], "argument --batch-size: must be a whole number >= 1; got '0'"),
    (["evaluate", "--split", "nosuch"], "digits has splits train, val, all; got split='nosuch'"),  # run
    # sweep-sparsity
    (["sweep-sparsity", "--sparsities", ""], "argument --sparsities: must list at least one number"),
    (["sweep-sparsity", "--sparsities", ","], "argument --sparsities: must list at least one number"),
    (["sweep-sparsity", "--sparsities", "0,1.5"], "each sparsity must be in [0, 1)"),
    (["sweep-sparsity", "--sparsities", "70"], "each sparsity must be in [0, 1)"),
    (["sweep-sparsity", "--sparsities", "0,half"], "must be comma-separated numbers"),
    (["sweep-sparsity", "--sparsities", "nan"], "each sparsity must be in [0, 1)"),
    (["sweep-sparsity", "--methods", "sparsegpt"], "argument --methods: unknown method 'sparsegpt'"),
    (["sweep-sparsity", "--methods", ""], "argument --methods: must list at least one of wanda, magnitude"),
    (["sweep-sparsity", "--finetune-epochs", "-1"], "argument --finetune-epochs: must be a whole number >= 0"),
    (["sweep-sparsity", "--finetune-lr", "0"], "argument --finetune-lr: must be a number > 0"),
    (["sweep-sparsity", "--finetune-batch-size", "0"], "argument --finetune-batch-size: must be a whole number >= 1"),
    (["sweep-sparsity", "--n-calib", "-5"], "argument --n-calib: must be a whole number >= 1"),
    (["sweep-sparsity", "--calib-sampling", "random"], "argument --calib-sampling: invalid choice: 'random'"),
    (["sweep-sparsity", "--data", "nowhere"], "argument --data: unknown dataset source 'nowhere'"),
    (["sweep-sparsity", "--methods", "magnitude_col"], "argument --methods: unknown method 'magnitude_col'"),
    (["sweep-sparsity", "--batch-size", "0"], "argument --batch-size: must be a whole number >= 1"),
    (["sweep-sparsity", "--out", ""], "argument --out: must be a folder path"),
    # the levels: options from their configs' fields (type, list and choice errors while parsing; value
    # errors when the config is built, before any model is loaded)
    (["neuron", "--finetune-epochs", "-1"], "finetune_epochs must be a whole number >= 0, got -1"),
    (["neuron", "--method", "sparsegpt"], "argument --method: expected one of wanda, magnitude, magnitude_row"),
    (["neuron", "--sparsities", ""], "argument --sparsities: expected a comma-separated list (a,b,c), got ''"),
    (["neuron", "--sparsities", "0,1.5"], "sparsities must lie in [0, 1), got 1.5"),
    (["neuron", "--sparsities", "0,half"], "argument --sparsities: expected float or int, got 'half'"),
    (["neuron", "--top-k", "0"], "top_k must be a whole number >= 1, got 0"),
    (["neuron", "--blocks", ""], "argument --blocks: expected a comma-separated list (a,b,c)"),
    (["neuron", "--blocks", "first"], "argument --blocks: expected int, got 'first'"),
    (["neuron", "--sites", "neurons"], "argument --sites: expected one of norm1, q, k, v, attn_out"),
    (["neuron", "--classes", ""], "argument --classes: expected a comma-separated list (a,b,c)"),
    (["neuron", "--classes", "-1"], "class indices must be >= 0, got [-1]"),
    (["neuron", "--n-means-images", "0"], "n_means_images must be a whole number >= 1 (or None), got 0"),
    (["neuron", "--selection", "best"], "argument --selection: expected one of drop, absolute, got 'best'"),
    (["neuron", "--data", "nowhere"], "unknown dataset source 'nowhere'"),  # run
    (["neuron", "--n-calib", "0"], "n_calib must be a whole number >= 1, got 0"),
    (["neuron", "--calib-sampling", "all"], "argument --calib-sampling: expected one of quick, reference"),
    (["neuron", "--out", ""], "argument --out: must be a folder path"),
    (["neuron", "--out", "pyproject.toml"], "argument --out: 'pyproject.toml' is a file"),
    (["neuron", "--model", ""], "model name must be a non-empty alias"),
    (["layer", "--finetune-epochs", "1.5"], "argument --finetune-epochs: expected int, got '1.5'"),
    (["layer", "--sae.dead-feature-window", "0"], "dead_feature_window must be >= 1, got 0"),
    (["layer", "--sweep-k", "abc"], "argument --sweep-k: expected float or int, got 'abc'"),
    (["layer", "--sweep-k", "0,16"], "sweep_k: each k must be > 0"),
    (["layer", "--sweep-expansion-factor", "0"], "each expansion factor must be a whole number >= 1"),
    (["layer", "--sweep-expansion-factor", "1.5"], "argument --sweep-expansion-factor: expected int, got '1.5'"),
    (["layer", "--sweep-tokens", "cls,image"], "argument --sweep-tokens: expected one of cls, patch, all, got 'image'"),
    (["layer", "--sae.cache-dir", ""], "cache_dir must be a folder path"),
    (["layer", "--sae.k", "0"], "k must be positive, got 0.0"),
    (["layer", "--sae.k", "inf"], "k must be positive, got inf"),
    (["layer", "--sae.expansion-factor", "0"], "expansion_factor must be a whole number >= 1, got 0"),
    (["layer", "--sae.training-samples", "-1"], "training_samples must be a whole number >= 1, got -1"),
    (["layer", "--sae.lr", "-0.1"], "lr must be a number > 0, got -0.1"),
    (["layer", "--sae.n-checkpoints", "-1"], "n_checkpoints must be >= 0, got -1"),
    (["layer", "--sae.lr-warm-up-steps", "-1"], "lr_warm_up_steps must be >= 0, got -1"),
    (["layer", "--sae.tokens", "image"], "argument --sae.tokens: expected one of cls, patch, all, got 'image'"),
    (["layer", "--top-k", "0"], "top_k must be a whole number >= 1, got 0"),
    (["layer", "--batch-size", "-5"], "batch_size must be a whole number >= 1 (or None), got -5"),
    (["layer", "--sae.hook-name", "blocks.99.x", "--sparsities", "0"], "Unknown hook name(s): 'blocks.99.x'"),  # run
    (["accuracy", "--batch-size", "0"], "batch_size must be a whole number >= 1 (or None), got 0"),
    (["accuracy", "--sparsities", "0.1,1"], "sparsities must lie in [0, 1), got 1.0"),
    (["accuracy", "--split", "nosuch", "--sparsities", "0"], "digits has splits train, val, all; got split='nosuch'"),  # run
    (["circuit", "--steps", "0"], "steps=0 is invalid: must be a finite number > 0"),
    (["circuit", "--loss", "mse"], "argument --loss: expected one of bce_margin, ce_true_label, got 'mse'"),
    (["circuit", "--k", "-1"], "k=-1.0 is invalid: must be a finite number >= 0"),
    (["circuit", "--classes", "0,x"], "unknown class 'x' for dataset 'digits'"),  # run
    (["model", "--methods", "gradcam"], "argument --methods: expected one of chefer, attnlrp, cp_lrp, rollout"),
    (["model", "--n-images", "0"], "n_images must be >= 1 (or None for all), got 0"),
    (["model", "--reference", "noise"], "argument --reference: expected one of zero, black, blur, mean, got 'noise'"),
    (["model", "--step", "0"], "step must be >= 1 pixel, got 0"),
    # impact
    (["impact", "--levels", "neuron,pixels"], "unknown level(s) ['pixels']; choose from accuracy, neuron, layer"),
    (["impact", "--sparsities", "0.3,0.5"], "sparsities must include 0"),
    (["impact", "--methods", "sparsegpt"], "argument --methods: expected one of wanda, magnitude, magnitude_row"),
    (["impact", "--preset", "slow"], "argument --preset: expected one of quick, full, paper, got 'slow'"),
    # the top level
    (["no-such-command"], "argument COMMAND: invalid choice: 'no-such-command'"),
    ([], "the following arguments are required: COMMAND"),
]


@pytest.fixture(scope="module")
def cli():
    import hooked_vit.cli as cli

    return cli


@pytest.mark.parametrize("argv, expected", CLI_BAD_INPUTS, ids=[" ".join(a) or "(none)" for a, _ in CLI_BAD_INPUTS])
def test_cli_refuses_bad_input_with_one_line(cli, capsys, monkeypatch, tmp_path, argv, expected):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "pyproject.toml").write_text("")  # a file where a folder is expected
    assert cli.main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    command = next((a for a in argv if not a.startswith("-")), None)
    prefix = f"hooked-vit {command}: error: " if command in cli.SUBCOMMANDS else "hooked-vit: error: "
    assert lines[0].startswith(prefix) and expected in lines[0], lines[0]
    assert captured.out == ""  # nothing ran


def test_help_and_option_errors_do_not_import_torch():
    code = textwrap.dedent("""
        import sys, contextlib, io
        import hooked_vit.cli as cli
        cli.build_parser()  # every subcommand's options
        for argv in (["--help"], ["layer", "--help"], ["circuit", "--help"], ["train-default", "--epochs", "-1"],
                     ["neuron", "--top-k", "0"], ["circuit", "--steps", "0"]):
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                cli.main(argv)
        heavy = sorted(m for m in ("torch", "timm", "transformer_lens", "sae_lens", "numpy") if m in sys.modules)
        print(heavy)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_project_errors_print_one_line_and_debug_shows_the_traceback(cli, capsys, monkeypatch):
    from hooked_vit.errors import CorruptFileError

    monkeypatch.setattr(cli, "SUBCOMMANDS", dict(cli.SUBCOMMANDS))

    def fail(args):
        if args.kind == "project":
            raise CorruptFileError("/x/result.json", "a result file (JSON)", "delete it and rerun")
        raise RuntimeError("a bug")

    cli.register("fail", "fails", lambda p: p.add_argument("--kind", default="project"), fail)
    assert cli.main(["fail"]) == 2
    assert capsys.readouterr().err == ("hooked-vit fail: error: /x/result.json is not a result file (JSON); "
                                       "delete it and rerun\n")
    with pytest.raises(CorruptFileError):
        cli.main(["--debug", "fail"])
    with pytest.raises(CorruptFileError):
        cli.main(["fail", "--debug"])
    with pytest.raises(RuntimeError, match="a bug"):  # not ours: a bug keeps its traceback
        cli.main(["fail", "--kind", "other"])


def test_every_subcommand_is_registered_by_name_only(cli):
    import hooked_vit.cli_args  # noqa: F401

    assert set(cli.SUBCOMMANDS) >= {"info", "train-default", "evaluate", "sweep-sparsity", "impact", "accuracy",
                                    "neuron", "layer", "circuit", "model"}
    for command in cli.SUBCOMMANDS.values():  # names, or the level subcommands' partials over a level's name
        for target in (command.configure, command.run):
            assert isinstance(target, str) or isinstance(getattr(target, "args", (None,))[0], str), command.name
        assert callable(cli.resolve(command.configure)) and callable(cli.resolve(command.run))


@pytest.mark.parametrize("old, new", [("neuron-metrics", "neuron"), ("sae-train", "layer"), ("sae-eval", "layer"),
                                      ("circuits", "circuit"), ("attribution", "model")])
def test_earlier_subcommand_names_are_aliases_with_a_notice(cli, capsys, old, new):
    assert cli.main([old, "--top-k" if new in ("neuron", "layer") else "--batch-size", "0"]) == 2
    notice, error = capsys.readouterr().err.strip().splitlines()
    assert notice == f"hooked-vit: notice: `{old}` is now `hooked-vit {new}` (same options); the old name goes in the next release"
    assert error.startswith(f"hooked-vit {old}: error: ")


def test_light_copies_of_defaults_agree_with_the_heavy_modules():
    from hooked_vit import cli_args, training
    from hooked_vit.data import BUILTIN_DATASETS
    from hooked_vit.pruning import DEFAULT_CALIB_SEED, DEFAULT_N_CALIB, METHODS
    from hooked_vit.pruning.sweep import DEFAULT_SPARSITIES

    assert (cli_args.DEFAULT_ALIAS, cli_args.DEFAULT_SEED) == (training.DEFAULT_ALIAS, training.DEFAULT_SEED)
    assert cli_args.EMBEDDED_ALIASES == tuple(training.EMBEDDED_MODELS)
    assert cli_args.BUILTIN_DATASETS == tuple(BUILTIN_DATASETS) and cli_args.PRUNING_METHODS == METHODS
    assert (cli_args.DEFAULT_N_CALIB, cli_args.DEFAULT_CALIB_SEED) == (DEFAULT_N_CALIB, DEFAULT_CALIB_SEED)
    assert cli_args.SWEEP_SPARSITIES == DEFAULT_SPARSITIES
    from hooked_vit.pruning.calibration import SAMPLINGS

    assert cli_args.CALIB_SAMPLINGS == SAMPLINGS


# ------------------------------------------------------------------------------------ API
@pytest.fixture(scope="module")
def digits():
    from hooked_vit import HookedViT

    return HookedViT.from_pretrained("deit3_tiny_digits")


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory):
    """Files a user might hand over by mistake."""
    root = tmp_path_factory.mktemp("bad_files")
    (root / "empty.pth").write_bytes(b"")
    (root / "notes.pth").write_text("these are my notes, not weights\n")
    torch.save([1, 2, 3], root / "list.pth")
    model = root / "model"
    model.mkdir()
    (model / "config.json").write_text("{\"d_model\": ")  # torn
    (model / "model.safetensors").write_bytes(b"")
    result = root / "result"
    result.mkdir()
    (result / "result.json").write_text("")
    (root / "finetune").mkdir()
    (root / "finetune" / "finetune_last.pt").write_bytes(b"PK\x03\x04 truncated zip")
    return root


def _hook_returning(value):
    def hook(activation, hook):
        return value(activation)

    return hook


def _wrong_shape(model):
    images = torch.zeros(1, 3, 32, 32)
    return model.run_with_hooks(images, fwd_hooks=[("blocks.0.hook_resid_post", _hook_returning(lambda a: a[:, :3]))])


def _not_a_tensor(model):
    images = torch.zeros(1, 3, 32, 32)
    return model.run_with_hooks(images, fwd_hooks=[("blocks.1.mlp.hook_post", _hook_returning(lambda a: 1.0))])


def _wrong_shape_via_add_hook(model):
    model.reset_hooks()
    model.add_hook(lambda name: name == "hook_pooled", _hook_returning(lambda a: a[None]))
    try:
        return model(torch.zeros(2, 3, 32, 32))
    finally:
        model.reset_hooks()


def _finetune_from(directory, epochs=1):
    from hooked_vit.pruning import finetune

    def run(model):
        loader = [(torch.zeros(2, 3, 32, 32), torch.tensor([0, 1]))]
        return finetune(model, loader, epochs, checkpoint_dir=directory, progress=False)

    return run


def _load_model(name, **kwargs):
    from hooked_vit import HookedViT

    return lambda model: HookedViT.from_pretrained(name, **kwargs)


def _sweep(**changes):
    from hooked_vit.pruning.sweep import SweepConfig, run_sweep

    return lambda model, tmp_path: run_sweep(SweepConfig(**changes), tmp_path)


def _store_config(**kwargs):
    from analyses.layer.activation_store import ActivationStoreConfig

    return lambda model: ActivationStoreConfig(hook_names=("blocks.0.hook_resid_post",), **kwargs)


def _result_load(directory):
    from analyses.neuron import NeuronResult

    return lambda model: NeuronResult.load(directory)


def _read_info(directory):
    from hooked_vit.pruning.metadata import read_info

    (directory / "pruning.json").write_text("[1, 2")
    return lambda model: read_info(directory)


# (name, call(model, bad_files), exception class name in hooked_vit.errors or builtins, text the message contains)
API_BAD_INPUTS = [
    ("from_pretrained unknown alias", lambda m, f: _load_model("deit3_tiny")(m),
     "UnknownNameError", "Unknown model 'deit3_tiny'"),
    ("from_pretrained missing directory", lambda m, f: _load_model("./no_such_model")(m),
     "MissingFileError", "model directory no_such_model does not exist"),
    ("from_pretrained empty string", lambda m, f: _load_model("")(m), "InvalidArgumentError", "non-empty alias"),
    ("from_pretrained sparsity 1.5", lambda m, f: _load_model("deit3_tiny_digits", sparsity=1.5)(m),
     "InvalidArgumentError", "sparsity must be in [0, 1)"),
    ("from_pretrained finetune -1", lambda m, f: _load_model("deit3_tiny_digits", sparsity=0.5, finetune=-1)(m),
     "InvalidArgumentError", "finetune epochs must be a whole number >= 0; got -1"),
    ("from_pretrained finetune batch 0",
     lambda m, f: _load_model("deit3_tiny_digits", sparsity=0.5, finetune={"epochs": 1, "batch_size": 0})(m),
     "InvalidArgumentError", "finetune batch_size must be a whole number >= 1"),
    ("from_pretrained method", lambda m, f: _load_model("deit3_tiny_digits", sparsity=0.5, method="obs")(m),
     "InvalidArgumentError", "Unknown pruning method 'obs'"),
    ("checkpoint_path empty .pth", lambda m, f: _load_model("deit3_tiny_digits", checkpoint_path=f / "empty.pth")(m),
     "CorruptFileError", "empty.pth is not a model checkpoint"),
    ("checkpoint_path text file", lambda m, f: _load_model("deit3_tiny_digits", checkpoint_path=f / "notes.pth")(m),
     "CorruptFileError", "notes.pth is not a model checkpoint"),
    ("checkpoint_path a pickled list", lambda m, f: _load_model("deit3_tiny_digits", checkpoint_path=f / "list.pth")(m),
     "CorruptFileError", "list.pth is not a model checkpoint"),
    ("checkpoint_path missing", lambda m, f: _load_model("deit3_tiny_digits", checkpoint_path=f / "none.pth")(m),
     "MissingFileError", "none.pth' does not exist"),
    ("saved model with torn config.json", lambda m, f: _load_model(f / "model")(m),
     "CorruptFileError", "config.json is not a HookedViT config (JSON)"),
    ("forward stop_at_layer=99", lambda m, f: m(torch.zeros(1, 3, 32, 32), stop_at_layer=99),
     "InvalidArgumentError", "stop_at_layer=99 is out of range for a model with 4 blocks"),
    ("forward stop_at_layer=-5", lambda m, f: m(torch.zeros(1, 3, 32, 32), stop_at_layer=-5),
     "InvalidArgumentError", "out of range"),
    ("run_with_cache stop_at_layer=True", lambda m, f: m.run_with_cache(torch.zeros(1, 3, 32, 32), stop_at_layer=True),
     "InvalidTypeError", "stop_at_layer must be None or an int, got bool True"),
    ("hook returns a wrong shape", lambda m, f: _wrong_shape(m),
     "InvalidArgumentError", "hook on blocks.0.hook_resid_post returned a tensor of shape [1, 3, 96]"),
    ("hook returns a float", lambda m, f: _not_a_tensor(m),
     "InvalidTypeError", "hook on blocks.1.mlp.hook_post returned a float"),
    ("add_hook (name filter) returns a wrong shape", lambda m, f: _wrong_shape_via_add_hook(m),
     "InvalidArgumentError", "hook on hook_pooled returned a tensor of shape [1, 2, 96]"),
    ("unknown hook name", lambda m, f: m.run_with_cache(torch.zeros(1, 3, 32, 32), names_filter="blocks.0.hook_resid"),
     "UnknownNameError", "Unknown hook name(s): 'blocks.0.hook_resid'"),
    ("images of the wrong size", lambda m, f: m(torch.zeros(1, 3, 64, 64)),
     "InvalidArgumentError", "images are 64x64 pixels, the model expects 32x32"),
    ("finetune epochs -1", lambda m, f: _finetune_from(None, -1)(m),
     "InvalidArgumentError", "epochs must be a whole number >= 0; got -1"),
    ("finetune resume from a corrupt checkpoint", lambda m, f: _finetune_from(f / "finetune")(m),
     "CorruptFileError", "finetune_last.pt is not a fine-tuning checkpoint"),
    ("run_sweep sparsities=()", lambda m, f: _sweep(sparsities=())(m, f / "sweep"),
     "InvalidArgumentError", "sparsities must list at least one fraction"),
    ("run_sweep finetune_epochs=-1", lambda m, f: _sweep(finetune_epochs=-1)(m, f / "sweep"),
     "InvalidArgumentError", "finetune_epochs must be a whole number >= 0; got -1"),
    ("run_sweep methods=()", lambda m, f: _sweep(methods=())(m, f / "sweep"),
     "InvalidArgumentError", "methods must name at least one"),
    ("ActivationStoreConfig cache_dir=''", lambda m, f: _store_config(cache_dir="")(m),
     "InvalidArgumentError", "cache_dir must be a folder path, or None"),
    ("result.json empty", lambda m, f: _result_load(f / "result")(m),
     "CorruptFileError", "result.json is not a result file (JSON) (an empty file"),
    ("pruning.json torn", lambda m, f: _read_info(f / "result")(m),
     "CorruptFileError", "pruning.json is not pruning metadata (JSON)"),
]


@pytest.mark.parametrize("name, call, error, expected", API_BAD_INPUTS, ids=[row[0] for row in API_BAD_INPUTS])
def test_api_refuses_bad_input(digits, bad_files, monkeypatch, name, call, error, expected):
    from hooked_vit import errors

    monkeypatch.chdir(bad_files)
    with pytest.raises(errors.HookedViTError) as raised:
        call(digits, bad_files)
    assert type(raised.value).__name__ == error or isinstance(raised.value, getattr(errors, error))
    message = str(raised.value)
    assert expected in message and "\n" not in message, message


def test_project_errors_keep_the_builtin_types_callers_catch():
    from hooked_vit import errors
    from hooked_vit.loading import CheckpointMismatchError, OfflineWeightsError, UnsupportedModelError
    from hooked_vit.pretrained import UnknownModelError
    from hooked_vit.pruning import MissingCalibrationError

    assert issubclass(errors.InvalidArgumentError, ValueError) and issubclass(errors.MissingFileError, FileNotFoundError)
    assert issubclass(errors.UnknownNameError, KeyError) and issubclass(UnknownModelError, ValueError)
    for cls in (CheckpointMismatchError, OfflineWeightsError, UnsupportedModelError, MissingCalibrationError,
                errors.CorruptFileError, errors.CacheLockTimeoutError):
        assert issubclass(cls, errors.HookedViTError)
    assert str(errors.UnknownNameError("no hook 'x'")) == "no hook 'x'"  # no KeyError quotes


def test_layer_checks_the_sweep_before_training(tmp_path, capsys):
    """`layer --sweep-k abc` (`sae-train` once failed only after training every SAE)."""
    from hooked_vit.cli import main

    start = json.dumps(sorted(p.name for p in tmp_path.iterdir()))
    assert main(["layer", "--out", str(tmp_path / "run"), "--sae.training-samples", "64", "--sweep-k", "abc"]) == 2
    assert "argument --sweep-k" in capsys.readouterr().err
    assert json.dumps(sorted(p.name for p in tmp_path.iterdir())) == start  # nothing written
