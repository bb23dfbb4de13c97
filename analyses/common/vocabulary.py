"""Names every level shares (standard library only, so configs can offer them as choices)."""

from hooked_vit.names import SITE_NAMES

# The four per-unit metrics of the neuron level (IMPACT sec. 3.2), also computed for SAE latents.
METRICS: tuple[str, ...] = ("ablation", "selectivity", "class_variance", "label_entropy")
METRIC_LABELS: dict[str, str] = {"ablation": "Ablation impact", "selectivity": "Selectivity (AUROC)",
                                 "class_variance": "Class variance (CV)", "label_entropy": "Label entropy (nats)"}
# How negative activations enter eqs. 4-7 (analyses.common.metrics): clamped at 0, or shifted by the minimum.
NEGATIVE_RULES: tuple[str, ...] = ("clamp", "shift")
# The units an ablation can address: the circuit sites, and attention heads as single units (their
# output's L2 norm over d_head, IMPACT appendix A.2).
HEAD_SITE = "attn_head"
ALL_SITE_NAMES: tuple[str, ...] = (*SITE_NAMES, HEAD_SITE)
