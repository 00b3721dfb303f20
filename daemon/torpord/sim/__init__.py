"""The trace simulator: replays a trace against the real policy code
(torpord.policies) with a simulated clock and node."""
