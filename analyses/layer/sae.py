"""BatchTopK sparse autoencoders on HookedViT activations, trained by sae-lens (IMPACT sec. 3.3).

Training (:func:`train_sae`) is sae-lens's own: its ``BatchTopKTrainingSAE`` (eq. 8-9: ``f(x) =
BatchTopK(W_enc x + b_enc)``, ``x_hat = W_dec f(x) + b_dec``, MSE plus the dead-latent auxiliary
loss) and its ``SAETrainer``, fed by an :class:`~analyses.layer.activation_store.ActivationStore`. No
wandb: metrics are logged every ``log_every`` steps to the returned log and
``<out_dir>/training_log.jsonl``, next to sae-lens's progress bar. With ``n_checkpoints`` the
trainer saves checkpoints (sae-lens's layout, plus the store's position) and a rerun resumes from
the latest.

A trained SAE is saved in sae-lens's format (``cfg.json`` + ``sae_weights.safetensors``; as
sae-lens does for BatchTopK, the inference SAE is a JumpReLU SAE whose threshold is the learned
BatchTopK threshold) and loads with ``sae_lens.SAE.load_from_disk``. Its metadata carries
``hook_name`` and ``tokens``, which :func:`attach_sae` uses to splice it into a HookedViT: the
hook's value at those tokens is replaced by the reconstruction (plus, with ``use_error_term``,
the reconstruction error, so the forward pass is unchanged until a feature is edited). The splice
exposes sae-lens's hook names under the hook, e.g. ``blocks.3.hook_resid_post.hook_sae_acts_post``
``[batch n_tok d_sae]``, where :func:`zero_ablate_features` / :func:`patch_features` edit features
as one edits neurons.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn
from torch.utils.data import Dataset

os.environ.setdefault("WANDB_MODE", "disabled")  # sae-lens imports wandb; never log to it from here

from sae_lens import SAE, BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig  # noqa: E402, F401  (config.py uses these)
from sae_lens.config import LoggingConfig, SAETrainerConfig  # noqa: E402, F401
from sae_lens.constants import SAE_CFG_FILENAME, SAE_WEIGHTS_FILENAME, SPARSITY_FILENAME  # noqa: E402
from sae_lens.training.sae_trainer import SAETrainer  # noqa: E402

from hooked_vit import atomic  # noqa: E402
from hooked_vit.errors import CorruptFileError, InvalidArgumentError, MissingFileError, short_exception  # noqa: E402
from hooked_vit.reading import read_json  # noqa: E402
from hooked_vit.saes import (  # noqa: E402, F401  (the splice lives in hooked_vit, for HookedViT.run_with_saes)
    SAE_HOOK_SUFFIXES,
    SAESplice,
    attach_sae,
    detach_sae,
    sae_hook,
    sae_hook_name,
    sae_tokens,
    spliced,
)

from analyses.layer.activation_store import ActivationStore, hook_layout  # noqa: E402
from analyses.layer.config import (  # noqa: E402, F401  (the SAE's settings live in the light config module)
    LR_SCHEDULERS,
    NORMALIZATIONS,
    OPERATIONAL_FIELDS,
    SAETrainConfig,
    dead_window_steps,
)

TRAIN_CONFIG_FILE = "train_config.json"
TRAINING_FILE = "training.json"
LOG_FILE = "training_log.jsonl"
STORE_STATE_FILE = "store_state.json"
CHECKPOINT_DIR = "checkpoints"


# ----------------------------------------------------------------------------- trainer
def _log_record(trainer: SAETrainer, output: Any, started: float) -> dict[str, float | int]:
    """One training-log line from sae-lens's own step metrics."""
    raw = trainer.build_train_step_log_dict(output=output, n_training_samples=trainer.n_training_samples)
    record: dict[str, float | int] = {"step": trainer.n_training_steps, "samples": trainer.n_training_samples}
    names = {"losses/overall_loss": "loss", "losses/mse_loss": "mse_loss",
             "losses/auxiliary_reconstruction_loss": "aux_loss", "metrics/explained_variance": "explained_variance",
             "metrics/l0": "l0", "sparsity/dead_features": "dead_latents",
             "details/current_learning_rate": "lr", "metrics/topk_threshold": "topk_threshold"}
    for key, short in names.items():
        if key in raw:
            record[short] = float(raw[key])
    record["seconds"] = round(time.perf_counter() - started, 3)
    return record


class _LoggingTrainer(SAETrainer):
    """sae-lens's ``SAETrainer``, unchanged, plus a metrics line every ``log_every`` steps (taken
    where ``fit()`` updates its progress bar) and a step count derived from samples on resume."""

    def __init__(self, *args: Any, log_every: int, on_log: Callable[[dict[str, float | int]], None], **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.log_every = log_every
        self.on_log = on_log
        self.started = time.perf_counter()

    def _update_pbar(self, step_output: Any, pbar: Any, update_interval: int = 100) -> None:
        last = self.n_training_samples >= self.cfg.total_training_samples
        if self.n_training_steps % self.log_every == 0 or last:
            record = _log_record(self, step_output, self.started)
            self.on_log(record)
            pbar.set_postfix(mse=f"{record.get('mse_loss', float('nan')):.4g}",
                             fve=f"{record.get('explained_variance', float('nan')):.3f}",
                             dead=int(record.get("dead_latents", 0)), refresh=False)
        super()._update_pbar(step_output, pbar, update_interval=self.log_every)

    def load_trainer_state(self, checkpoint_path: Path | str) -> None:
        # sae-lens calls torch.load without weights_only: torch >= 2.6 (our floor) defaults it to True.
        try:
            super().load_trainer_state(checkpoint_path)
        except (OSError, EOFError, RuntimeError, KeyError, ValueError, pickle.UnpicklingError) as error:
            raise CorruptFileError(checkpoint_path, "a complete sae-lens training checkpoint",
                                   "delete this checkpoint folder; training resumes from the one before (or anew)",
                                   found=short_exception(error)) from None
        # sae-lens saves the step counter before fit() increments it; every batch is full, so the
        # number of completed steps is exact from the samples seen.
        self.n_training_steps = self.n_training_samples // self.cfg.train_batch_size_samples
        self.checkpoint_thresholds = [t for t in self.checkpoint_thresholds if t >= self.n_training_samples]


# ----------------------------------------------------------------------------- results
@dataclass
class SAETrainingRun:
    """A trained SAE and how it was trained: ``sae`` (sae-lens inference SAE, JumpReLU with the
    learned BatchTopK threshold), ``training_sae`` (``None`` when loaded from a finished run),
    the ``log`` lines, wall-clock ``seconds`` of this call, ``out_dir`` and ``resumed_from``."""

    sae: SAE
    config: SAETrainConfig
    hook_name: str
    log: list[dict[str, float | int]] = field(default_factory=list)
    training_sae: BatchTopKTrainingSAE | None = None
    seconds: float = 0.0
    out_dir: Path | None = None
    resumed_from: Path | None = None


def to_inference_sae(training_sae: BatchTopKTrainingSAE) -> SAE:
    """The inference SAE sae-lens saves for a BatchTopK training SAE (a JumpReLU SAE: decoder
    norms folded in, threshold = the learned BatchTopK threshold), built in memory."""
    state = {k: v.detach().clone() for k, v in training_sae.state_dict().items()}
    training_sae.process_state_dict_for_saving_inference(state)
    cfg_dict = training_sae.cfg.get_inference_sae_cfg_dict()
    device = cfg_dict.get("device", "cpu")
    cfg_dict["device"] = "meta"
    sae = SAE.from_dict(cfg_dict)
    sae.cfg.device = device
    sae.process_state_dict_for_loading(state)
    sae.load_state_dict(state, assign=True)
    return sae.to(device=device).eval()


def load_sae(path: str | os.PathLike, device: str = "cpu") -> SAE:
    """An SAE saved by :func:`train_sae` (or any sae-lens SAE directory), via ``SAE.load_from_disk``."""
    path = Path(path)
    if not (path / SAE_CFG_FILENAME).is_file() or not (path / SAE_WEIGHTS_FILENAME).is_file():
        raise MissingFileError(f"{path} holds no saved SAE ({SAE_CFG_FILENAME} and {SAE_WEIGHTS_FILENAME} expected)")
    return SAE.load_from_disk(str(path), device=device).eval()


# ----------------------------------------------------------------------------- training
def _latest_checkpoint(directory: Path) -> Path | None:
    """The most advanced complete checkpoint (``<samples>/`` with the store state written last)."""
    if not directory.is_dir():
        return None
    done = [p for p in directory.iterdir() if p.name.isdigit() and (p / STORE_STATE_FILE).is_file()]
    return max(done, key=lambda p: int(p.name), default=None)


def _read_log(path: Path, up_to_samples: int | None) -> list[dict[str, float | int]]:
    if not path.is_file():
        return []
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    records = []
    for number, line in enumerate(lines, 1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if number < len(lines):  # only the last line can be torn (a kill while appending)
                raise CorruptFileError(path, "a training log (JSON lines)", "delete it (only the log is lost)",
                                       found=f"line {number} is not JSON") from None
    return [r for r in records if up_to_samples is None or r["samples"] <= up_to_samples]


def _identity(cfg: SAETrainConfig, hook_name: str, model: nn.Module, dataset: Dataset) -> dict[str, Any]:
    from analyses.common.ablation import dataset_key, model_key

    return {"config": cfg.identity(), "hook_name": hook_name, "model_key": model_key(model),
            "dataset_key": dataset_key(dataset)}


def train_sae(
    model: nn.Module,
    dataset: Dataset,
    cfg: SAETrainConfig,
    *,
    out_dir: str | os.PathLike | None = None,
    resume: bool = True,
    device: str | None = None,
    progress: bool = True,
) -> SAETrainingRun:
    """Train a BatchTopK SAE with sae-lens on ``model``'s activations over ``dataset`` (items
    ``(image, label)``) at ``cfg``'s hook and tokens, on ``device`` (default: the model's), with
    the activation store's progress bars if ``progress``.

    With ``out_dir``: the final SAE is saved there in sae-lens's format (plus ``sparsity``,
    ``train_config.json``, ``training.json`` and the log), checkpoints go to
    ``out_dir/checkpoints/<samples>/``; with ``resume`` a finished run is loaded instead of
    retrained and an unfinished one continues from its latest checkpoint (a run of another
    config, model or dataset there is an error). ``resume=False`` starts afresh.
    """
    started = time.perf_counter()
    hook_name = cfg.resolved_hook(model)
    hook_layout(model, hook_name)
    out = Path(out_dir) if out_dir is not None else None
    identity = _identity(cfg, hook_name, model, dataset) if out is not None else None
    if out is not None:
        finished = _check_out_dir(out, identity, resume)
        if finished is not None:
            return finished
    store = ActivationStore(model, dataset, cfg.store_config(model, device=device, progress=progress))
    device = str(store.device)
    checkpoints = out / CHECKPOINT_DIR if out is not None else None

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        training_sae = BatchTopKTrainingSAE(cfg.sae_config(store.d_in, device))
    metadata = training_sae.cfg.metadata
    metadata.hook_name = hook_name
    metadata.tokens = cfg.tokens
    metadata.model_name = getattr(model.cfg, "model_name", None)
    if identity is not None:
        metadata.model_key, metadata.dataset_key = identity["model_key"], identity["dataset_key"]

    log_path = out / LOG_FILE if out is not None else None
    resume_from = _latest_checkpoint(checkpoints) if (checkpoints is not None and resume) else None
    log: list[dict[str, float | int]] = []

    def on_log(record: dict[str, float | int]) -> None:
        log.append(record)
        if log_path is not None:
            with open(log_path, "a") as handle:
                handle.write(json.dumps(record) + "\n")

    def save_store_state(checkpoint_path: Path | None) -> None:
        if checkpoint_path is None:
            return
        atomic.write_json(checkpoint_path / STORE_STATE_FILE, store.state_dict(), indent=None)
        older = sorted((p for p in checkpoint_path.parent.iterdir() if p.name.isdigit() and p != checkpoint_path),
                       key=lambda p: int(p.name))
        for stale in older[: max(0, len(older) - (cfg.keep_checkpoints - 1))]:
            shutil.rmtree(stale, ignore_errors=True)

    trainer = _LoggingTrainer(cfg.trainer_config(device, checkpoints), training_sae, store,
                              save_checkpoint_fn=save_store_state, log_every=cfg.log_every, on_log=on_log)
    if resume_from is not None:
        trainer.load_trainer_state(resume_from)
        training_sae.load_weights_from_checkpoint(resume_from)
        store.load_state_dict(read_json(resume_from / STORE_STATE_FILE, "the activation store's position (JSON)",
                                        "delete this checkpoint folder; training resumes from the one before"))
        log[:] = _read_log(log_path, trainer.n_training_samples)
        atomic.write_text(log_path, "".join(json.dumps(r) + "\n" for r in log))
    elif log_path is not None:
        atomic.write_text(log_path, "")
    trainer.fit()
    training_sae.eval()
    sae = to_inference_sae(training_sae)
    run = SAETrainingRun(sae=sae, config=cfg, hook_name=hook_name, log=log, training_sae=training_sae,
                         seconds=time.perf_counter() - started, out_dir=out, resumed_from=resume_from)
    if out is not None:
        with atomic.files_into(out) as tmp:  # sae-lens writes in place: write aside, rename each file
            training_sae.save_inference_model(tmp)
        atomic.save_safetensors({"sparsity": trainer.log_feature_sparsity.contiguous()}, out / SPARSITY_FILENAME)
        summary = {"hook_name": hook_name, "steps": trainer.n_training_steps,
                   "samples": trainer.n_training_samples, "seconds_this_call": run.seconds,
                   "resumed_from": str(resume_from) if resume_from else None, "final": log[-1] if log else None}
        atomic.write_json(out / TRAINING_FILE, summary)
    return run


def _check_out_dir(out: Path, identity: dict[str, Any], resume: bool) -> SAETrainingRun | None:
    """Prepare ``out`` for a run: the finished run there if ``resume`` and it matches, else
    ``None`` (after clearing it when not resuming). A different run there is an error."""
    config_path = out / TRAIN_CONFIG_FILE
    if config_path.is_file() and resume:
        saved = read_json(config_path, "an SAE run's configuration (JSON)",
                          "delete the folder, or rerun with --no-resume (resume=False) to start it over")
        current = json.loads(json.dumps(identity))
        differing = sorted(k for k in current if saved.get(k) != current[k])
        if differing:
            detail = differing
            if "config" in differing:
                saved_config = saved.get("config", {})
                detail = [f"config.{k}" for k, v in current["config"].items() if saved_config.get(k) != v]
            raise InvalidArgumentError(f"{out} holds an SAE run with a different {', '.join(detail)}; use another output "
                                       "directory or resume=False (--no-resume) to overwrite it")
        if (out / TRAINING_FILE).is_file() and (out / SAE_WEIGHTS_FILENAME).is_file():
            cfg = SAETrainConfig(**saved["config"])
            sae = load_sae(out)
            return SAETrainingRun(sae=sae, config=cfg, hook_name=saved["hook_name"],
                                  log=_read_log(out / LOG_FILE, None), out_dir=out)
        return None
    if out.exists() and not resume:
        for name in (CHECKPOINT_DIR,):
            shutil.rmtree(out / name, ignore_errors=True)
        for name in (TRAINING_FILE, SAE_CFG_FILENAME, SAE_WEIGHTS_FILENAME, SPARSITY_FILENAME, LOG_FILE):
            (out / name).unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    atomic.write_json(config_path, identity)
    return None


# ----------------------------------------------------------------------------- splicing
def zero_ablate_features(features: Sequence[int] | Int[Tensor, "k"]) -> Callable[..., Tensor]:
    """A forward hook for ``sae_hook(hook_name, "acts_post")`` setting ``features`` to 0."""
    index = torch.as_tensor(features, dtype=torch.long).reshape(-1)

    def hook(acts: Float[Tensor, "batch n_tok d_sae"], hook: Any = None) -> Float[Tensor, "batch n_tok d_sae"]:
        return acts.index_fill(-1, index.to(acts.device), 0.0)

    return hook


def patch_features(
    features: Sequence[int] | Int[Tensor, "k"], values: Float[Tensor, "*value_dims"]
) -> Callable[..., Tensor]:
    """A forward hook for ``sae_hook(hook_name, "acts_post")`` setting ``features`` to ``values``
    (broadcast against ``[batch, n_tok, len(features)]``, e.g. activations from another image)."""
    index = torch.as_tensor(features, dtype=torch.long).reshape(-1)

    def hook(acts: Float[Tensor, "batch n_tok d_sae"], hook: Any = None) -> Float[Tensor, "batch n_tok d_sae"]:
        idx = index.to(acts.device)
        patched = values.to(device=acts.device, dtype=acts.dtype).expand(*acts.shape[:-1], idx.numel())
        return acts.index_copy(-1, idx, patched.contiguous())

    return hook
