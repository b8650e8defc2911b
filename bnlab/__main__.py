from bnlab.cli import entry

entry()
