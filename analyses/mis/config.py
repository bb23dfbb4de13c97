"""Settings of the MIS level: per-unit interpretability without humans (Zimmermann, Klindt & Brendel,
NeurIPS 2024), on the 2AFC tasks of Zimmermann, Klein & Brendel (NeurIPS 2023). Standard library
only (``hooked-vit mis --help`` imports no torch)."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

from analyses.common.family import ModelFamily, check_choice, check_positive, setting
from hooked_vit.errors import InvalidArgumentError, MissingFileError

# Unit kinds per block: a circuit site's name, "resid" (the block's output residual stream),
# "heads" (each head's output norm at attn.hook_z), "rrm" (the replacement level's SAE latents at the
# block's output), "clt" (the transcoders level's CLT latents, read at the block's ln2 output) or
# "sae" (latents of one SAE at one block).
UNIT_KINDS: tuple[str, ...] = ("mlp_act", "mlp_out", "attn_out", "q", "k", "v", "norm1", "norm2", "resid", "heads",
                               "rrm", "clt", "sae")
DICTIONARY_KINDS: tuple[str, ...] = ("sae", "rrm", "clt")  # latents of a dictionary, not of the model
POSITIONS: tuple[str, ...] = ("patch_max", "patch_mean", "cls")  # as hooked_vit.units.POSITIONS
SIMILARITIES = "pixels, features:ALIAS (a HookedViT's pooled features; ALIAS a model alias or folder) or dreamsim"
PAPER_TEMPERATURE = 0.16
N_TASKS, N_REFERENCES, QUANTILE = 20, 9, 0.1
DREAMSIM_CACHE = "~/.cache/dreamsim"  # where the DreamSim backend keeps (and looks for) DreamSim's weights
DREAMSIM_HELP = ("similarity='dreamsim' needs the dreamsim package and its weights: pip install 'hooked-vit[mis]' "
                 f"(or pip install dreamsim), then run it once online, which downloads the weights to {DREAMSIM_CACHE} "
                 "(its backbones to torch's hub cache); offline, use similarity='pixels' or 'features:ALIAS'")


def check_similarity(value: str) -> str:
    """One-line error unless ``value`` names a similarity backend (and, for ``dreamsim``, the package
    is installed)."""
    if not isinstance(value, str) or not (value in ("pixels", "dreamsim") or
                                          (value.startswith("features:") and len(value) > len("features:"))):
        raise InvalidArgumentError(f"similarity must be {SIMILARITIES}, got {value!r}")
    if value == "dreamsim":
        import importlib.util

        if importlib.util.find_spec("dreamsim") is None:
            raise MissingFileError(DREAMSIM_HELP)
    return value


@dataclass
class MISConfig(ModelFamily):
    """Settings of a MIS run: for each model variant, the ``units`` kinds at each of ``layers``
    (default every block), each unit's ``n_tasks`` 2AFC tasks (``n_references`` reference images per
    side, drawn from the ``quantile`` most/least activating images of ``split``, seeded by ``seed``),
    scored with the ``similarity`` backend and the sigmoid of ``temperature``, or of the temperature
    refit on the human answers of ``human_csv`` (to the tasks ``export_tasks`` writes). SAE latents come from the layer
    level's output ``sae_from``, else a small SAE (``sae_*``) is trained on the variant at
    ``sae_layer`` (default the last block); ``rrm`` latents from the replacement level's output
    ``replacement_from`` and ``clt`` latents from the transcoders level's output ``clt_from`` (each
    kind is scored when its folder is given)."""

    units: tuple[str, ...] = setting(("mlp_act", "resid", "sae"), "unit kinds scored per block: "
                                     + ", ".join(UNIT_KINDS))
    layers: tuple[int, ...] | None = setting(None, "blocks scored (default: every block)")
    max_units: int | None = setting(None, "first units per site scored (default: all)")
    position: str = setting("patch_max", "one value per image: max or mean over the patch tokens, or the CLS token",
                            choices=POSITIONS)
    split: str = setting("train", "images the tasks are drawn from (the papers: the training set)")
    n_tasks: int = setting(N_TASKS, "2AFC tasks per unit")
    n_references: int = setting(N_REFERENCES, "reference images per side (max and min) of a task")
    quantile: float = setting(QUANTILE, "fraction of most (least) activating images the max (min) draws come from")
    similarity: str = setting("pixels", f"image similarity: {SIMILARITIES}")
    temperature: float = setting(PAPER_TEMPERATURE, "sigmoid temperature: P(correct) = sigmoid(margin / temperature)")
    human_csv: str | None = setting(None, "CSV of human 2AFC answers (columns task_id, correct; one row per answer; "
                                    "task ids <unit>/task_<u>/trial_<t>, e.g. mlp_act/3/task_1/trial_2, the tasks "
                                    "of the first variant): refit the temperature on them (maximum likelihood) and "
                                    "use it for every score instead of --temperature")
    seed: int = setting(0, "seed of the task draws (and of the in-level SAE)")
    export_tasks: str | None = setting(None, "also export every unit of work's tasks in the human experiment's layout "
                                       "to <export_tasks>/<variant>/<unit>/ (task_<u>/trials/trial_<t>/*.png: n_tasks "
                                       "x 2 x (n_references + 1) images per unit; use with --max-units)")
    sae_from: str | None = setting(None, "layer-level output folder whose <variant>/<sae> SAEs are read, or one "
                                   "sae-lens SAE folder for every variant")
    replacement_from: str | None = setting(None, "replacement-level output folder whose <variant>/rrm SAEs are "
                                           "read (units rrm), or one saved replacement model for every variant")
    clt_from: str | None = setting(None, "transcoders-level output folder whose <variant>/clt/final CLT is read "
                                   "(units clt), or one saved transcoder folder for every variant")
    sae_layer: int | None = setting(None, "block of the in-level SAE (default: the last)")
    sae_expansion_factor: int = setting(4, "in-level SAE: d_sae = expansion factor x d_model")
    sae_k: int = setting(8, "in-level SAE: active latents per token (TopK)")
    sae_steps: int = setting(300, "in-level SAE: Adam steps")
    sae_batch_size: int = setting(512, "in-level SAE: activations per step")
    sae_lr: float = setting(1e-3, "in-level SAE: Adam learning rate")
    batch_size: int = setting(256, "images per forward pass")

    def __post_init__(self) -> None:
        super().__post_init__()
        self.units, self.layers = tuple(self.units), None if self.layers is None else tuple(self.layers)
        for kind, folder in (("rrm", "replacement_from"), ("clt", "clt_from")):
            if getattr(self, folder) is not None and kind not in self.units:
                self.units += (kind,)  # naming a dictionary's folder scores its latents
            if kind in self.units and getattr(self, folder) is None:
                raise InvalidArgumentError(f"units {kind} need {folder} (--{folder.replace('_', '-')} DIR): the "
                                           f"folder the {'replacement' if kind == 'rrm' else 'transcoders'} level saved")
        if not self.units or any(u not in UNIT_KINDS for u in self.units):
            raise InvalidArgumentError(f"units must be a non-empty list of {', '.join(UNIT_KINDS)}, got {self.units}")
        if self.layers is not None and (not self.layers or any(isinstance(x, bool) or not isinstance(x, int) or x < 0
                                                               for x in self.layers)):
            raise InvalidArgumentError(f"layers must be block indices >= 0, got {self.layers}")
        check_positive(self, "max_units")
        check_positive(self, "n_tasks", "n_references", "sae_expansion_factor", "sae_k", "sae_steps",
                       "sae_batch_size", "batch_size", allow_none=False)
        check_choice(self, "position", POSITIONS)
        check_similarity(self.similarity)
        if not (isinstance(self.quantile, (int, float)) and 0 < self.quantile <= 0.5):
            raise InvalidArgumentError(f"quantile must lie in (0, 0.5] (max and min draws must not overlap), "
                                       f"got {self.quantile!r}")
        for name in ("temperature", "sae_lr"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise InvalidArgumentError(f"{name} must be a number > 0, got {value!r}")
        if self.human_csv is not None and not os.path.isfile(self.human_csv):
            raise MissingFileError(f"human_csv {self.human_csv} does not exist: give a CSV with columns task_id, "
                                   "correct")
        if self.sae_layer is not None and (isinstance(self.sae_layer, bool) or self.sae_layer < 0):
            raise InvalidArgumentError(f"sae_layer must be a block index >= 0, got {self.sae_layer!r}")


PRESETS = {"quick": {"max_units": 48, "sae_steps": 200}}
REDUCED = {"quick": "the first 48 units per site and block; the in-level SAE trained 200 steps"}

CONFIG = MISConfig
