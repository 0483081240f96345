"""Where and how a run computes: device and AMP, torchrun processes and shards, the progress reporter."""
