"""Fixtures shared by the tests; plain helper functions are in helpers.py."""

from __future__ import annotations

import pytest

import helpers  # noqa: F401  (sets OPENBLAS_NUM_THREADS before any test imports numpy's BLAS)


@pytest.fixture(scope="session")
def digits():
    """scikit-learn's digits as bnlab loads them, on the CPU: loaded once per test process."""
    import torch

    from bnlab.config.schema import compose
    from bnlab.data import load_dataset

    return load_dataset(compose("data=digits").data, torch.device("cpu"))


@pytest.fixture
def digits_overrides() -> list[str]:
    """A small, fast experiment on scikit-learn's bundled digits."""
    return ["data=digits", "train.steps=60", "train.batch_size=32", "train.eval_every=30",
            "train.log_every=10", "train.checkpoint_every=30", "probe.every=20",
            "probe.batch_size=200"]
