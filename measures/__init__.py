"""What training and pruning both measure of a model: perplexity, PES, and the evenly spread token sample the
per-token measures are taken on. It imports the engine only, so both can depend on it."""
