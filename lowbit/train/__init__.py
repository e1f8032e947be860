"""Training: server shards, workers, the loop."""
