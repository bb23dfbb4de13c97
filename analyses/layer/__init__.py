"""Layer level (IMPACT sec. 3.3 / 4.3, Table 2, Figure 3): the activation store, BatchTopK SAEs through sae-lens, their quality and latent metrics."""
