"""Defaults shared by the library and the commands, in a module light enough for `--help`."""

# Candidates the fusion model rescores per query (see benchmarks/rerank_latency.py for the cost).
DEFAULT_RERANK_K = 50
DEFAULT_K = 10  # results per kind

DEFAULT_PORT = 8765  # where itm-serve listens
SERVER_MAX_K = 1000  # most results, and rerank candidates, per kind that one query to a server may ask for
