"""autoprune: multi-objective search for per-group structured pruning ratios."""

__version__ = "0.1.0"
