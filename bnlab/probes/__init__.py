"""Measurements during training that never change it: activation statistics, gradient ICS,
the loss landscape along the gradient."""
