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
    # neuron-metrics
    (["neuron-metrics", "--finetune-epochs", "-1"], "argument --finetune-epochs: must be a whole number >= 0"),
    (["neuron-metrics", "--method", "sparsegpt"], "argument --method: invalid choice: 'sparsegpt'"),
    (["neuron-metrics", "--sparsities", ""], "argument --sparsities: must list at least one number"),
    (["neuron-metrics", "--top-k", "0"], "argument --top-k: must be a whole number >= 1"),
    (["neuron-metrics", "--blocks", ""], "argument --blocks: must list at least one number"),
    (["neuron-metrics", "--blocks", "-1"], "block indices must be >= 0"),
    (["neuron-metrics", "--blocks", "first"], "argument --blocks: must be comma-separated numbers"),
    (["neuron-metrics", "--sites", "neurons"], "argument --sites: unknown site 'neurons'"),
    (["neuron-metrics", "--classes", ""], "argument --classes: must be comma-separated class indices"),
    (["neuron-metrics", "--classes", "-1"], "class indices must be >= 0"),
    (["neuron-metrics", "--n-means-images", "0"], "argument --n-means-images: must be a whole number >= 1"),
    (["neuron-metrics", "--selection", "best"], "argument --selection: invalid choice: 'best'"),
    (["neuron-metrics", "--data", "nowhere"], "argument --data: unknown dataset source 'nowhere'"),
    (["neuron-metrics", "--n-calib", "0"], "argument --n-calib: must be a whole number >= 1"),
    (["neuron-metrics", "--calib-sampling", "all"], "argument --calib-sampling: invalid choice: 'all'"),
    (["sae-train", "--finetune-epochs", "1.5"], "argument --finetune-epochs: must be a whole number >= 0"),
    (["sae-train", "--dead-window", "0"], "argument --dead-window: must be a whole number >= 1"),
    # sae-train
    (["sae-train", "--sweep-k", "abc"], "argument --sweep-k: must be comma-separated numbers"),
    (["sae-train", "--sweep-k", "0,16"], "each k must be > 0"),
    (["sae-train", "--sweep-expansion", "0"], "each expansion factor must be >= 1"),
    (["sae-train", "--sweep-expansion", "1.5"], "argument --sweep-expansion: must be comma-separated numbers"),
    (["sae-train", "--sweep-tokens", "cls,image"], "argument --sweep-tokens: unknown token choice 'image'"),
    (["sae-train", "--cache-dir", ""], "argument --cache-dir: must be a folder path"),
    (["sae-train", "--k", "0"], "argument --k: must be a number > 0"),
    (["sae-train", "--k", "inf"], "argument --k: must be a number > 0"),
    (["sae-train", "--expansion", "0"], "argument --expansion: must be a whole number >= 1"),
    (["sae-train", "--samples", "-1"], "argument --samples: must be a whole number >= 1"),
    (["sae-train", "--lr", "-0.1"], "argument --lr: must be a number > 0"),
    (["sae-train", "--checkpoints", "-1"], "argument --checkpoints: must be a whole number >= 0"),
    (["sae-train", "--lr-warm-up-steps", "-1"], "argument --lr-warm-up-steps: must be a whole number >= 0"),
    (["sae-train", "--finetune-epochs", "-1"], "argument --finetune-epochs: must be a whole number >= 0"),
    (["sae-train", "--tokens", "image"], "argument --tokens: invalid choice: 'image'"),
    # sae-eval
    (["sae-eval", "--top-k", "0"], "argument --top-k: must be a whole number >= 1"),
    (["sae-eval", "--out", ""], "argument --out: must be a folder path"),
    (["sae-eval", "--batch-size", "-5"], "argument --batch-size: must be a whole number >= 1"),
    (["sae-eval", "--out", "/no/such/run"], "/no/such/run holds no layer-level run"),  # run
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
        for argv in (["--help"], ["sae-train", "--help"], ["train-default", "--epochs", "-1"]):
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

    assert set(cli.SUBCOMMANDS) >= {"info", "train-default", "evaluate", "sweep-sparsity", "neuron-metrics",
                                    "sae-train", "sae-eval"}
    for command in cli.SUBCOMMANDS.values():
        assert isinstance(command.configure, str) and isinstance(command.run, str)
        assert callable(cli.resolve(command.configure)) and callable(cli.resolve(command.run))


def test_light_copies_of_defaults_agree_with_the_heavy_modules():
    from analyses import layer_level, layer_level_cli, neuron_level, neuron_level_cli, sae
    from analyses.common.ablation import ALL_SITE_NAMES
    from analyses.layer.activation_store import TOKEN_CHOICES
    from analyses.neuron.metrics import NEGATIVE_RULES
    from hooked_vit import cli_args, training
    from hooked_vit.data import BUILTIN_DATASETS
    from hooked_vit.pruning import DEFAULT_CALIB_SEED, DEFAULT_N_CALIB, METHODS
    from hooked_vit.pruning.sweep import DEFAULT_SPARSITIES

    assert (cli_args.DEFAULT_ALIAS, cli_args.DEFAULT_SEED) == (training.DEFAULT_ALIAS, training.DEFAULT_SEED)
    assert cli_args.BUILTIN_DATASETS == tuple(BUILTIN_DATASETS) and cli_args.PRUNING_METHODS == METHODS
    assert (cli_args.DEFAULT_N_CALIB, cli_args.DEFAULT_CALIB_SEED) == (DEFAULT_N_CALIB, DEFAULT_CALIB_SEED)
    assert cli_args.SWEEP_SPARSITIES == DEFAULT_SPARSITIES
    assert neuron_level_cli.DEFAULT_SPARSITIES == neuron_level.DEFAULT_SPARSITIES
    assert neuron_level_cli.NEURON_SITES == neuron_level.NEURON_SITES
    assert neuron_level_cli.SITE_NAMES == ALL_SITE_NAMES and neuron_level_cli.SELECTIONS == neuron_level.SELECTIONS
    assert neuron_level_cli.NEGATIVE_RULES == layer_level_cli.NEGATIVE_RULES == NEGATIVE_RULES
    assert layer_level_cli.DEFAULT_SPARSITIES == layer_level.DEFAULT_SPARSITIES
    assert layer_level_cli.TOKEN_CHOICES == TOKEN_CHOICES and layer_level_cli.LR_SCHEDULERS == sae.LR_SCHEDULERS
    defaults = sae.SAETrainConfig(dead_feature_window=None)
    assert defaults.dead_feature_window == sae.dead_window_steps(defaults.train_batch_size, defaults.training_samples)
    light = {**layer_level_cli.SAE_DEFAULTS, "dead_feature_window": defaults.dead_feature_window}
    assert layer_level_cli.SAE_DEFAULTS["dead_feature_window"] is None  # resolved by SAETrainConfig
    assert {k: getattr(defaults, k) for k in layer_level_cli.SAE_DEFAULTS} == light
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
    from analyses.neuron.level import NeuronLevelResult

    return lambda model: NeuronLevelResult.load(directory)


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


def test_sae_train_checks_the_sweep_before_training(tmp_path, capsys):
    """`sae-train --sweep-k abc` used to fail only after training every SAE."""
    from hooked_vit.cli import main

    start = json.dumps(sorted(p.name for p in tmp_path.iterdir()))
    assert main(["sae-train", "--out", str(tmp_path / "run"), "--samples", "64", "--sweep-k", "abc"]) == 2
    assert "argument --sweep-k" in capsys.readouterr().err
    assert json.dumps(sorted(p.name for p in tmp_path.iterdir())) == start  # nothing written
