"""torpor: the client library, CLI and engine agent for the Torpor daemon."""
