"""bnlab's Hydra launcher ``hydra/launcher=batched``: a sweep's runs that differ only in seed,
learning rate, momentum or weight decay are trained as one vectorized program (bnlab.batched.launch)."""
