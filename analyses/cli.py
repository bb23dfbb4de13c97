"""The analyses' ``hooked-vit`` subcommands, registered as a plugin of :mod:`hooked_vit.cli` (the
``hooked_vit.subcommands`` entry point in ``pyproject.toml``). Only names are registered here: each
subcommand's argument module is imported when it is chosen, its run module after its arguments
are checked, so ``hooked-vit --help`` stays fast.
"""

from hooked_vit.cli import register

register("impact", "the whole IMPACT study in one resumable command: the dense and pruned models at the accuracy, "
         "neuron, layer, circuit and model levels, with report.md/.html (runs under torchrun too)",
         "analyses.impact.cli:add_arguments", "analyses.impact.cli:main")
register("neuron-metrics", "neuron-level metrics (ablation impact, selectivity, class variance, label entropy) "
         "vs sparsity (IMPACT Fig. 2)", "analyses.neuron.cli:add_arguments", "analyses.neuron.level:main")
register("sae-train", "train BatchTopK SAEs (sae-lens) on a hook of the dense and pruned models, resumable; "
         "with --sweep-* the SAE sweep (IMPACT Tables 5/6)",
         "analyses.layer.cli:add_train_arguments", "analyses.layer.level:train_main")
register("sae-eval", "SAE quality (NMSE, explained variance, dead latents; IMPACT Table 2) and latent metrics "
         "vs sparsity (IMPACT Fig. 3) of the SAEs trained by sae-train",
         "analyses.layer.cli:add_eval_arguments", "analyses.layer.level:eval_main")
register("circuits", "node-mask circuits (node and edge fractions, accuracy, NCQ; IMPACT Table 3, Table 7 with "
         "--sweep-k) of the dense and pruned models, resumable", "analyses.circuits.cli:add_arguments",
         "analyses.circuits.cli:main")
register("attribution", "model-level attribution maps (Chefer, AttnLRP, rollout, random) and their insertion/deletion "
         "AUCs (IMPACT Table 4, Figure 4) of the dense and pruned models, resumable",
         "analyses.model.cli:add_arguments", "analyses.model.cli:main")
