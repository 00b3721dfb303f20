"""torporctl, the command-line client of torpord (`python -m torpor.cli`)."""
