"""`bnlab report`: runs read back, grouped over seeds, claims judged, tables and figures.

Never imports the training side: reading runs needs neither torch's modules nor the trainer.
"""
