"""Reconstruction quality of an SAE on held-out activations (IMPACT Table 2) and sweeps over its
settings (Tables 5 and 6).

Definitions, over the ``N`` held-out activations ``x_i`` (rows, ``d_in`` wide) and their
reconstructions ``x_hat_i``, with ``mu`` the mean activation:

* NMSE = ``sum_i ||x_i - x_hat_i||^2 / sum_i ||x_i - mu||^2`` (squared error relative to the
  activations' total variance);
* fraction of variance explained FVE = ``1 - NMSE`` (so the paper's NMSE and FVE columns add to 1);
* dead latents: latents whose activation is never > 0 on any of the ``N`` held-out activations
  (the window is those ``N`` tokens, reported as ``n_tokens``);
* L0: mean number of latents > 0 per activation (the inference SAE's, see :mod:`analyses.layer.sae`).

:class:`QualityAccumulator` computes them in one streaming pass (float64 sums), so the held-out
set need not fit in memory; :func:`evaluate_sae` runs it over a dataset.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch
from jaxtyping import Bool, Float
from torch import Tensor, nn
from torch.utils.data import Dataset

from analyses.common.results import AnalysisResult, markdown_table
from analyses.layer.activation_store import ActivationStore, ActivationStoreConfig
from analyses.layer.config import SAETrainConfig, check_tokens, sae_label  # noqa: F401  (sae_label: re-exported)
from analyses.layer.sae import SAE, SAETrainingRun, sae_hook_name, sae_tokens
from hooked_vit.errors import InvalidArgumentError

SAE_BATCH_ROWS = 8192


# ----------------------------------------------------------------------------- formulas
def nmse(x: Float[Tensor, "n d_in"], x_hat: Float[Tensor, "n d_in"]) -> float:
    """``sum ||x - x_hat||^2 / sum ||x - mean(x)||^2`` over the rows (unitless, float64 sums)."""
    x, x_hat = x.double(), x_hat.double()
    total = (x - x.mean(dim=0)).pow(2).sum()
    if not total > 0:
        raise InvalidArgumentError("NMSE is undefined for activations without variance (fewer than 2 distinct rows)")
    return float((x - x_hat).pow(2).sum() / total)


def explained_variance(x: Float[Tensor, "n d_in"], x_hat: Float[Tensor, "n d_in"]) -> float:
    """Fraction of variance explained, ``1 - nmse(x, x_hat)``."""
    return 1.0 - nmse(x, x_hat)


def dead_latents(feature_acts: Float[Tensor, "n d_sae"]) -> Bool[Tensor, "d_sae"]:
    """Latents never > 0 on any of the ``n`` rows."""
    return ~(feature_acts > 0).any(dim=0)


# ----------------------------------------------------------------------------- accumulator
@dataclass(frozen=True)
class SAEQuality:
    """Held-out reconstruction quality (see the module docstring). ``mse`` is per element;
    ``dead_latents`` a count out of ``d_sae`` over a window of ``n_tokens`` activations."""

    nmse: float
    explained_variance: float
    mse: float
    l0: float
    dead_latents: int
    d_sae: int
    n_tokens: int

    @property
    def dead_fraction(self) -> float:
        return self.dead_latents / self.d_sae

    def as_row(self) -> dict[str, float | int]:
        return {**dataclasses.asdict(self), "dead_fraction": self.dead_fraction}


@dataclass
class QualityAccumulator:
    """Streaming sums for :class:`SAEQuality`; :meth:`update` with batches, :meth:`result` at the end."""

    d_in: int
    d_sae: int
    n: int = 0
    sum_x: Tensor = field(init=False)
    sum_sq: float = 0.0
    sum_err: float = 0.0
    active: float = 0.0
    fired: Tensor = field(init=False)

    def __post_init__(self) -> None:
        self.sum_x = torch.zeros(self.d_in, dtype=torch.float64)
        self.fired = torch.zeros(self.d_sae, dtype=torch.bool)

    def update(
        self,
        x: Float[Tensor, "n d_in"],
        x_hat: Float[Tensor, "n d_in"],
        feature_acts: Float[Tensor, "n d_sae"],
    ) -> None:
        """Add ``n`` activations, their reconstructions and feature activations."""
        x64 = x.detach().double().cpu()
        self.n += x64.shape[0]
        self.sum_x += x64.sum(dim=0)
        self.sum_sq += float(x64.pow(2).sum())
        self.sum_err += float((x64 - x_hat.detach().double().cpu()).pow(2).sum())
        on = feature_acts.detach() > 0
        self.active += float(on.sum())
        self.fired |= on.any(dim=0).cpu()

    def result(self) -> SAEQuality:
        if self.n < 2:
            raise InvalidArgumentError(f"quality needs at least 2 activations, got {self.n}")
        total = self.sum_sq - float(self.sum_x.pow(2).sum()) / self.n
        if not total > 0:
            raise InvalidArgumentError("NMSE is undefined: the held-out activations have no variance")
        value = self.sum_err / total
        return SAEQuality(nmse=value, explained_variance=1.0 - value, mse=self.sum_err / (self.n * self.d_in),
                          l0=self.active / self.n, dead_latents=int((~self.fired).sum()), d_sae=self.d_sae,
                          n_tokens=self.n)


@torch.no_grad()
def evaluate_sae(
    model: nn.Module,
    sae: SAE,
    dataset: Dataset,
    *,
    image_batch_size: int | None = None,
    cache_dir: str | None = None,
    progress: bool = True,
) -> SAEQuality:
    """Quality of ``sae`` on ``model``'s activations over ``dataset`` (held-out images), at the
    SAE's own hook and tokens (its metadata), in one streaming pass."""
    store = ActivationStore(model, dataset, ActivationStoreConfig(
        hook_names=(sae_hook_name(sae),), tokens=sae_tokens(sae), shuffle=False,
        image_batch_size=image_batch_size, cache_dir=cache_dir, progress=progress,
        device=str(sae.device)))
    acc = QualityAccumulator(sae.cfg.d_in, sae.cfg.d_sae)
    sae.eval()
    for acts, _ in store.ordered_chunks():
        x_all = acts[store.hook_name]
        for start in range(0, x_all.shape[0], SAE_BATCH_ROWS):
            x = x_all[start:start + SAE_BATCH_ROWS].to(sae.dtype)
            feature_acts = sae.encode(x)
            acc.update(x, sae.decode(feature_acts), feature_acts)
    return acc.result()


# ----------------------------------------------------------------------------- sweeps
@dataclass
class SweepConfig:
    """Variations of ``base`` to train and evaluate (Tables 5/6): by default one factor at a time
    (``ks`` with the base expansion and tokens, then ``expansion_factors``, then ``tokens``), as
    the paper's tables; ``grid=True`` trains every combination."""

    base: SAETrainConfig | dict[str, Any] = field(default_factory=SAETrainConfig)  # a dict (JSON) is converted
    ks: tuple[float | int, ...] = (32, 64, 128, 256)
    expansion_factors: tuple[int, ...] = (16, 32, 64)
    tokens: tuple[str, ...] = ("cls", "all", "patch")
    grid: bool = False

    def __post_init__(self) -> None:
        self.base = SAETrainConfig(**self.base) if isinstance(self.base, dict) else self.base
        for choice in self.tokens:
            check_tokens(choice)

    def settings(self) -> list[SAETrainConfig]:
        """The SAE configs of the sweep, without repeats, base first."""
        base = self.base
        if self.grid:
            variants = [dataclasses.replace(base, k=k, expansion_factor=e, tokens=t)
                        for t in self.tokens for e in self.expansion_factors for k in self.ks]
        else:
            variants = ([base] + [dataclasses.replace(base, k=k) for k in self.ks]
                        + [dataclasses.replace(base, expansion_factor=e) for e in self.expansion_factors]
                        + [dataclasses.replace(base, tokens=t) for t in self.tokens])
        unique: dict[tuple, SAETrainConfig] = {}
        for cfg in variants:
            unique.setdefault((cfg.tokens, cfg.k, cfg.expansion_factor), cfg)
        return list(unique.values())


@dataclass
class SweepResult(AnalysisResult):
    """Rows of a sweep: model, tokens, k, expansion factor, FVE, NMSE, dead latents, L0."""

    CONFIG_CLASS = SweepConfig
    rows: list[dict[str, Any]] = field(default_factory=list)

    def tables(self) -> dict[str, list[dict[str, Any]]]:
        return {"sweep": self.rows}

    def markdown(self) -> str:
        """Tables 5/6 layout: model, tokens, k, expansion factor, FVE, NMSE, dead latents (count of
        d_sae and fraction), L0."""
        rows = [{"Model": r["model"], "Tokens": r["tokens"], "k": f"{r['k']:g}", "Expansion": r["expansion"],
                 "FVE ↑": f"{r['fve']:.4f}", "NMSE ↓": f"{r['nmse']:.4f}",
                 "Dead": f"{r['dead_latents']} / {r['d_sae']} ({r['dead_latents'] / r['d_sae']:.3f})", "L0": f"{r['l0']:.1f}"} for r in self.rows]
        return markdown_table(rows)


def sweep_row(
    model: nn.Module, run: SAETrainingRun, held_out: Dataset, image_batch_size: int | None = None, *,
    progress: bool = True,
) -> dict[str, Any]:
    """One sweep row: the run's settings and its held-out quality."""
    setting = run.config
    quality = evaluate_sae(model, run.sae, held_out, image_batch_size=image_batch_size, progress=progress)
    return {"tokens": setting.tokens, "k": setting.k, "expansion": setting.expansion_factor,
            "fve": quality.explained_variance, "nmse": quality.nmse, "dead_latents": quality.dead_latents,
            "dead_fraction": quality.dead_fraction, "l0": quality.l0, "d_sae": quality.d_sae,
            "n_tokens": quality.n_tokens, "train_seconds": round(run.seconds, 1)}
