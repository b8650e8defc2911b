"""Measurements during training that never change it: activation statistics and batch noise,
gradient ICS, the loss landscape along the gradient, the loss's curvature, and the
normalization's stochastic disturbance."""
