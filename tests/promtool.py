"""promtool and prometheus (Debian's `prometheus` package) for the tests
that need them.

Where one is missing the test is skipped, unless $TORPOR_REQUIRE_PROMTOOL is
1 (CI, whose .ci/run installs it): then it fails, so that those tests can't
be skipped there unnoticed.
"""

from __future__ import annotations

import os
import shutil

import pytest

__all__ = ["REQUIRED", "prometheus", "promtool"]

REQUIRED = "TORPOR_REQUIRE_PROMTOOL"


def promtool() -> str:
    """promtool's path; or skip (fail where $TORPOR_REQUIRE_PROMTOOL=1)."""
    return _found("promtool")


def prometheus() -> str:
    """The Prometheus server's path; or skip (fail where $TORPOR_REQUIRE_PROMTOOL=1)."""
    return _found("prometheus")


def _found(command: str) -> str:
    found = shutil.which(command)
    if found is None:
        why = f"{command} is not installed (Debian: apt-get install prometheus)"
        if os.environ.get(REQUIRED) == "1":
            pytest.fail(f"{command} must run here ({REQUIRED}=1): {why}")
        pytest.skip(why)
    return found
