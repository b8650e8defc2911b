"""The run directory: its file names, the writer, the reader, the lock and the outcome lines.

Shared by the training side (which writes runs) and the report (which reads them); imports
nothing of either.
"""
