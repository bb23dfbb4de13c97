"""The IMPACT analyses, one level per subpackage, each working only through a HookedViT's hooks::

    analyses/common/     what every level shares: the level interface and its driver (level), config
                         fields and options (family, options), variants, results, units, ablation
                         means, metrics and their names, class resolution, labels
    analyses/accuracy/   Table 1: top-1/top-5 of every variant
    analyses/neuron/     Figure 2: attribution patching, the neuron metrics per class
    analyses/layer/      Table 2, Figure 3: BatchTopK SAEs (sae-lens) and their latents
    analyses/circuit/    Table 3: learnable node masks at the 96 circuit sites
    analyses/model/      Table 4, Figure 4: LRP / Chefer attribution, insertion and deletion
    analyses/impact/     the whole study as one command (``hooked-vit impact``) and its report

Every level has the same shape (:class:`analyses.common.level.Level`): ``config.py`` (a dataclass
whose fields are its command-line options and TOML keys), ``compute.py`` (its units of work, each
saved and resumed by the one driver, and how they combine) and ``result.py`` (a result that loads
from disk and writes its tables and figures). No level imports another.
"""
