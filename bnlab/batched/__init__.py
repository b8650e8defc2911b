"""``hydra/launcher=batched``: a sweep's runs that differ only in seed or optimizer settings,
trained as one vectorized program."""
