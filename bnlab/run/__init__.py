"""Training a run: the loop, its optimizer, checkpoints, resume, process set-up, evaluation."""
