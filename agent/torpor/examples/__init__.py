"""Examples of engines built on the agent (`python -m torpor.examples.engine`)."""
