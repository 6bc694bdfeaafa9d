"""Using a loaded model: choosing tokens (sampling.py), a sequence's cache and the prefix it
holds (sequence_cache.py), log-likelihoods for evaluation (scoring.py), continuous batching for
the server (engine.py), and the command line (cli.py)."""
