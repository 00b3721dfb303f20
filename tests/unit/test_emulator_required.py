"""Where the emulated driver must run (CI), its tests fail instead of skipping."""

from __future__ import annotations

import pytest

from tests import emulator


def test_cuda_h_comes_from_the_dev_extras_wheel_without_a_toolkit() -> None:
    include = emulator.cuda_include(candidates=[])
    assert include is not None and (include / "cuda.h").is_file()
    assert "nvidia" in include.parts


def test_a_missing_emulator_skips_where_allowed_and_fails_where_required(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(emulator, "unavailable", lambda: "no C compiler")
    monkeypatch.delenv(emulator.REQUIRED, raising=False)
    with pytest.raises(pytest.skip.Exception, match="no C compiler"):
        emulator.require()
    monkeypatch.setenv(emulator.REQUIRED, "1")
    with pytest.raises(pytest.fail.Exception, match=r"must run here.*no C compiler"):
        emulator.require()


def test_the_emulator_is_available_here() -> None:
    # This machine and CI have gcc and cuda.h (the dev extra): if this fails,
    # every emulated-driver test is being skipped.
    assert emulator.unavailable() is None
