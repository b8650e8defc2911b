"""bnlab: a command-line laboratory for internal covariate shift and normalization layers."""

__version__ = "0.1.0"
