"""A discovered circuit: which nodes of the 96 sites are kept for one class, its metrics and the
settings that made it; saved as ``nodes.safetensors`` + ``circuit.json`` and loaded back."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jaxtyping import Bool, Float
from safetensors import safe_open
from torch import Tensor, nn

from analyses.common.ablation import ActivationMeans
from analyses.circuit.config import CircuitConfig
from analyses.circuit.gates import nodes_to_vector
from analyses.circuit.replacement import gate_hooks, gated_logits, site_references
from analyses.common.results import config_from_dict, config_to_dict, read_json, write_json
from hooked_vit import atomic
from hooked_vit.errors import InvalidArgumentError, MissingFileError

NODES_FILE = "nodes.safetensors"
CIRCUIT_FILE = "circuit.json"
LOGITS_KEY = "__mask_logits__"


@dataclass
class ClassCircuit:
    """The circuit of class ``class_id``: ``nodes[hook name]`` is a bool ``[width]`` (``[n_heads]``
    at q/k/v) of the kept nodes; ``mask_logits`` ``[n_units]`` the trained logits; ``metrics`` has
    node_frac, edge_frac, edges, acc, acc_full, acc_ablated, ncq, ncq_eq12, collapsed (val split);
    ``k``, ``sparsity``, ``model_key`` and ``config`` say what made it; ``history`` samples the
    training (step, loss, task loss, node fraction, batch accuracy)."""

    class_id: int
    class_name: str
    nodes: dict[str, Tensor]
    mask_logits: Tensor
    metrics: dict[str, Any]
    k: float
    sparsity: float
    model_key: str
    config: CircuitConfig
    history: list[dict[str, Any]] = field(default_factory=list)
    means_path: str | None = None
    references: dict[str, Tensor] | None = field(default=None, repr=False, compare=False)

    # ------------------------------------------------------------------ running
    def node_vector(self, model: nn.Module) -> Bool[Tensor, "n_units"]:
        """The kept nodes over all units of ``model`` (registry order); checks the architecture."""
        return nodes_to_vector(model.sites, self.nodes)

    def _gates(self, model: nn.Module, complement: bool) -> dict[str, Tensor]:
        if self.references is None:
            raise InvalidArgumentError("this circuit has no replacement values: load it with "
                                       "ClassCircuit.load(dir, model, means=...) "
                                       "or set circuit.references = site_references(model, reference, means)")
        param = next(model.parameters())
        keep = self.node_vector(model)
        keep = ~keep if complement else keep
        widths = [site.width for site in model.sites]
        gates = keep.to(device=param.device, dtype=param.dtype).reshape(1, -1).split(widths, dim=-1)
        return dict(zip(model.sites.hook_names, gates))

    @contextlib.contextmanager
    def applied(self, model: nn.Module, *, complement: bool = False) -> Iterator[nn.Module]:
        """Within the block, ``model`` runs with every node outside the circuit replaced by its
        reference (with ``complement``: the circuit's own nodes replaced, the rest kept)."""
        if self.config.freeze_ln:
            raise InvalidArgumentError("a circuit found with freeze_ln=True needs a clean pass per batch: use "
                                       "circuit.logits(model, images) instead of circuit.applied(model)")
        with model.hooks(fwd_hooks=gate_hooks(model, self._gates(model, complement), self.references)):
            yield model

    def logits(self, model: nn.Module, images: Float[Tensor, "batch channel height width"], *,
               complement: bool = False) -> Float[Tensor, "batch n_classes"]:
        """The circuit's logits on ``images`` (honours ``config.freeze_ln``)."""
        return gated_logits(model, images, self._gates(model, complement), self.references,
                            freeze_ln=self.config.freeze_ln)

    # ------------------------------------------------------------------ files
    def save(self, directory: str | os.PathLike) -> Path:
        """Write ``nodes.safetensors`` then ``circuit.json`` (each atomically; the JSON, written
        last, marks the circuit as complete)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {name: mask.detach().bool().cpu().contiguous() for name, mask in self.nodes.items()}
        tensors[LOGITS_KEY] = self.mask_logits.detach().float().cpu().contiguous()
        atomic.save_safetensors(tensors, directory / NODES_FILE,
                                metadata={"class_id": str(self.class_id), "model_key": self.model_key})
        write_json(directory / CIRCUIT_FILE, {
            "class_id": self.class_id, "class_name": self.class_name, "k": self.k, "sparsity": self.sparsity,
            "model_key": self.model_key, "metrics": self.metrics, "history": self.history,
            "means_path": self.means_path, "config": config_to_dict(self.config)})
        return directory

    @staticmethod
    def is_saved(directory: str | os.PathLike) -> bool:
        """Whether ``directory`` holds a complete saved circuit."""
        return (Path(directory) / CIRCUIT_FILE).is_file() and (Path(directory) / NODES_FILE).is_file()

    @classmethod
    def load(cls, directory: str | os.PathLike, model: nn.Module | None = None, *,
             means: ActivationMeans | None = None) -> ClassCircuit:
        """The circuit saved in ``directory``. With ``model``, its nodes are checked against the
        model's sites and its replacement values are prepared from ``means`` (default: the means
        file it was made with, if still present)."""
        directory = Path(directory)
        if not cls.is_saved(directory):
            raise MissingFileError(f"{directory} holds no complete circuit ({CIRCUIT_FILE} and {NODES_FILE} "
                                   "are written by ClassCircuit.save)")
        info = read_json(directory / CIRCUIT_FILE)
        with safe_open(str(directory / NODES_FILE), framework="pt") as handle:
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
        logits = tensors.pop(LOGITS_KEY)
        circuit = cls(info["class_id"], info["class_name"], tensors, logits, info["metrics"], info["k"],
                      info["sparsity"], info["model_key"], config_from_dict(CircuitConfig, info["config"]),
                      info.get("history", []), info.get("means_path"))
        if model is not None:
            if logits.numel() != model.sites.n_units:
                raise InvalidArgumentError(f"{directory} holds {logits.numel()} mask logits but the model has "
                                           f"{model.sites.n_units} nodes: the circuit was made for another "
                                           "architecture")
            circuit.node_vector(model)
            if circuit.config.reference != "zero" and means is None:
                means = circuit._stored_means(directory)
            param = next(model.parameters())
            circuit.references = site_references(model, circuit.config.reference,
                                                 means.to(param.device, param.dtype) if means is not None else None)
        return circuit

    def _stored_means(self, directory: Path) -> ActivationMeans:
        path = Path(self.means_path) if self.means_path else None
        if path is None or not path.is_file():
            raise MissingFileError(f"the means circuit {directory} was made with ({self.means_path}) are gone: pass "
                                   "means=load_or_compute_means(model, train_images) to ClassCircuit.load")
        means = ActivationMeans.load(path)
        if means.model_key != self.model_key:
            raise InvalidArgumentError(f"the means file {path} belongs to model {means.model_key}, "
                                       f"the circuit to {self.model_key}")
        return means

