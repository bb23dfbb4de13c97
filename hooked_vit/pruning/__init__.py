"""Unstructured and N:M pruning of HookedViT blocks (Wanda; magnitude per layer or per row) and
masked fine-tuning.

>>> from hooked_vit.pruning import prune, finetune
>>> info = prune(model, method="wanda", sparsity=0.7, calibration=images)  # in place
>>> finetune(model, train_loader, epochs=2)  # pruned weights stay exactly zero
"""

from hooked_vit.pruning.cached import cache_root
from hooked_vit.pruning.calibration import (
    DEFAULT_CALIB_SEED,
    DEFAULT_N_CALIB,
    REFERENCE_N_CALIB,
    SAMPLINGS,
    MissingCalibrationError,
    resolve_calibration,
)
from hooked_vit.pruning.finetuning import FinetuneResult, finetune
from hooked_vit.pruning.layers import prunable_layers
from hooked_vit.pruning.masks import (
    apply_masks,
    is_pruned,
    mask_gradients,
    masked_linears,
    measured_sparsity,
    remove_masks,
    set_mask,
)
from hooked_vit.pruning.metadata import PruningInfo, get_info
from hooked_vit.pruning.pruner import layer_keep_mask, prune
from hooked_vit.pruning.scores import keep_mask, magnitude_scores, wanda_scores
from hooked_vit.pruning.statistics import input_norms
from hooked_vit.pruning.validation import METHODS, check_method, check_nm, check_sparsity

__all__ = [
    "DEFAULT_CALIB_SEED", "DEFAULT_N_CALIB", "METHODS", "REFERENCE_N_CALIB", "SAMPLINGS", "FinetuneResult",
    "MissingCalibrationError", "PruningInfo",
    "apply_masks", "cache_root", "check_method", "check_nm", "check_sparsity", "finetune", "get_info",
    "input_norms", "is_pruned", "keep_mask", "layer_keep_mask", "magnitude_scores", "mask_gradients", "masked_linears",
    "measured_sparsity", "prunable_layers", "prune", "remove_masks", "resolve_calibration", "set_mask",
    "wanda_scores",
]
