"""Reading the file: TOML, its version, and typed access to its tables."""

from __future__ import annotations

import difflib
import tomllib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from torpord.config.model import CONFIG_VERSION, ConfigError
from torpord.config.values import Invalid, show

__all__ = ["Reader", "read_file", "suggest"]

_T = TypeVar("_T")


class Reader:
    """Typed access to one parsed file, raising ConfigErrors that name `where` and the key."""

    def __init__(
        self, where: str, data: Mapping[str, Any], schema: Mapping[str, tuple[str, ...]]
    ) -> None:
        """`schema`: the known keys of each table (dotted name; "" the top level)."""
        self.where = where
        self.schema = schema
        self.tables: dict[str, Mapping[str, Any]] = {"": data}
        self._check_keys("", data)

    def error(self, key: str, expected: str, got: object) -> ConfigError:
        return ConfigError(self.where, key, f"expected {expected}, got {show(got)}")

    def table(self, name: str) -> Mapping[str, Any]:
        """The sub-table `name` (dotted), {} when absent; unknown keys in it are errors."""
        if name in self.tables:
            return self.tables[name]
        parent, _, leaf = name.rpartition(".")
        value = self.table(parent).get(leaf, {})
        if not isinstance(value, dict):
            raise self.error(name, "a table", value)
        self._check_keys(name, value)
        self.tables[name] = value
        return value

    def get(self, key: str, check: Callable[[Any], _T], default: _T) -> _T:
        table, _, leaf = key.rpartition(".")
        values = self.table(table)
        if leaf not in values:
            return default
        try:
            return check(values[leaf])
        except Invalid as exc:
            raise self.error(key, exc.expected, values[leaf]) from None

    def get_list(self, key: str, check: Callable[[Any], _T]) -> tuple[_T, ...] | None:
        """Each element checked, errors naming `key[i]`; None when the key is absent."""
        table, _, leaf = key.rpartition(".")
        values = self.table(table)
        if leaf not in values:
            return None
        items = values[leaf]
        if not isinstance(items, list):
            raise self.error(key, "an array", items)
        checked: list[_T] = []
        for index, item in enumerate(items):
            try:
                checked.append(check(item))
            except Invalid as exc:
                raise self.error(f"{key}[{index}]", exc.expected, item) from None
        return tuple(checked)

    def _check_keys(self, table: str, values: Mapping[str, Any]) -> None:
        known = self.schema[table]
        for key in values:
            if key in known:
                continue
            dotted = f"{table}.{key}" if table else key
            raise ConfigError(
                self.where, dotted, f"unknown key; {suggest(key, table, self.schema)}"
            )


def suggest(key: str, table: str, schema: Mapping[str, tuple[str, ...]]) -> str:
    """A hint for an unknown key: the closest known one, or where it belongs."""
    known = schema[table]
    close = difflib.get_close_matches(key, known, n=1)
    if close:
        return f'did you mean "{close[0]}"?'
    # The right name in the wrong table ([server] level = ...) is a common slip.
    elsewhere = [
        f"{name}.{key}" if name else key
        for name, keys in schema.items()
        if name != table and key in keys
    ]
    if elsewhere:
        return f'did you mean "{elsewhere[0]}"?'
    where = f"[{table}]" if table else "the top level"
    return f"known keys in {where}: " + ", ".join(known)


def read_file(path: Path) -> Mapping[str, Any]:
    where = str(path)
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as exc:
        raise ConfigError(where, None, f"cannot read the config file: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(where, None, f"expected UTF-8 text: {exc}") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(where, None, f"invalid TOML: {exc}") from None
    if "version" not in data:
        raise ConfigError(
            where,
            "version",
            f'expected {CONFIG_VERSION} (add "version = {CONFIG_VERSION}" at '
            "the top of the file), got nothing",
        )
    version = data["version"]
    if isinstance(version, bool) or version != CONFIG_VERSION:
        expected = f"{CONFIG_VERSION} (the only version this torpord reads)"
        raise ConfigError(where, "version", f"expected {expected}, got {show(version)}")
    return data
