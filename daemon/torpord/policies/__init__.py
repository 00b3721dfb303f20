"""The daemon's decisions, apart from their mechanism.

Pure functions of a snapshot of the node (`NodeView`: models, sizes, tiers,
activity, pools, the clock) that return actions (`actions.py`). The daemon
(`torpord.core.pilot`) builds the view from its live state and runs each
action as an ordinary transition with its cause; the trace simulator
(`torpord.sim`) builds it from a simulated node and clock. Both run this very
code, so what the simulator measures is what the daemon does.

Nothing here does I/O, reads a clock, or imports anything of torpord but its
leaf modules (`torpord.types`).
"""
