"""What every level shares: the model family and its variants, results on disk, units of work and shards, ablation means."""
