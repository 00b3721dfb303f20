"""promtool (Debian's `prometheus` package) for the tests that need it.

Where it is missing the test is skipped, unless $TORPOR_REQUIRE_PROMTOOL is
1 (CI, whose .ci/run installs it): then it fails, so that those tests can't
be skipped there unnoticed.
"""

from __future__ import annotations

import os
import shutil

import pytest

__all__ = ["REQUIRED", "promtool"]

REQUIRED = "TORPOR_REQUIRE_PROMTOOL"


def promtool() -> str:
    """promtool's path; or skip (fail where $TORPOR_REQUIRE_PROMTOOL=1)."""
    found = shutil.which("promtool")
    if found is None:
        why = "promtool is not installed (Debian: apt-get install prometheus)"
        if os.environ.get(REQUIRED) == "1":
            pytest.fail(f"promtool must run here ({REQUIRED}=1): {why}")
        pytest.skip(why)
    return found
