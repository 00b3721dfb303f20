"""Where the daemon finds the kernels' sources: at the top of a source
checkout (cuda_kernels/), and inside the package where the wheel installs
them (torpord/cuda_kernels/, as pyproject.toml packages them)."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
from torpord.cuda import kernels

ROOT = Path(__file__).resolve().parents[2]


def sources(directory: Path, names: list[str] | None = None) -> Path:
    directory.mkdir(parents=True)
    for name in kernels.KERNELS if names is None else names:
        (directory / name).write_text(f"// {directory}\n")
    return directory


def test_a_source_checkout_compiles_the_top_level_sources() -> None:
    assert kernels.sources_dir() == ROOT / "cuda_kernels"
    assert kernels.sources_dir(ROOT / "daemon" / "torpord") == ROOT / "cuda_kernels"
    assert kernels.source("checksum.cu") == (ROOT / "cuda_kernels" / "checksum.cu").read_text()


def test_an_installed_package_uses_its_own_copy(tmp_path: Path) -> None:
    package = tmp_path / "lib" / "python3.12" / "site-packages" / "torpord"
    inside = sources(package / "cuda_kernels")
    sources(tmp_path / "lib" / "python3.12" / "cuda_kernels")  # (not a checkout's)
    assert kernels.sources_dir(package) == inside


def test_an_installed_copy_comes_before_the_checkouts(tmp_path: Path) -> None:
    package = tmp_path / "repo" / "daemon" / "torpord"
    inside = sources(package / "cuda_kernels")
    sources(tmp_path / "repo" / "cuda_kernels")
    assert kernels.sources_dir(package) == inside


def test_only_a_directory_with_every_source_counts(tmp_path: Path) -> None:
    package = tmp_path / "repo" / "daemon" / "torpord"
    sources(package / "cuda_kernels", ["checksum.cu"])  # one missing
    top = sources(tmp_path / "repo" / "cuda_kernels")
    assert kernels.sources_dir(package) == top


def test_no_sources_is_an_error_naming_where_it_looked(tmp_path: Path) -> None:
    package = tmp_path / "site-packages" / "torpord"
    package.mkdir(parents=True)
    sources(tmp_path / "cuda_kernels")  # beside an installed package: never looked at
    with pytest.raises(FileNotFoundError) as err:
        kernels.sources_dir(package)
    assert str(package / "cuda_kernels") in str(err.value)
    assert str(tmp_path / "cuda_kernels") not in str(err.value).replace(str(package), "")


def test_the_wheel_installs_the_sources_inside_the_package() -> None:
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    directory = setuptools["package-dir"]["torpord.cuda_kernels"]
    assert (ROOT / directory).resolve() == ROOT / "cuda_kernels"
    data = setuptools["package-data"]["torpord.cuda_kernels"]
    assert data == ["*.cu"]
    assert set(kernels.KERNELS) == {p.name for p in (ROOT / directory).glob("*.cu")}


def test_the_wheel_lists_every_package_on_disk() -> None:
    # (The list is explicit so that torpord.cuda_kernels can come from the top.)
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    on_disk = {
        ".".join(init.parent.relative_to(ROOT / top).parts)
        for top in ("agent", "daemon")
        for init in (ROOT / top).rglob("__init__.py")
    }
    assert set(setuptools["packages"]) == on_disk | {"torpord.cuda_kernels"}
    for package in setuptools["packages"]:
        mapped = setuptools["package-dir"].get(package)
        if mapped is None:  # under its top package's directory
            top, *rest = package.split(".")
            mapped = str(Path(setuptools["package-dir"][top], *rest))
        assert (ROOT / mapped).is_dir(), package
