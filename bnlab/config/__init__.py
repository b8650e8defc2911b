"""The configuration layer: schemas (Hydra's ConfigStore), bounds and the norms' options.

Torch-free and importing nothing of bnlab above it, so that a config composes, and
``bnlab train --help`` answers, without loading torch.
"""
