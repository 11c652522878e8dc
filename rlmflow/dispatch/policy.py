"""The policy file: an operator's lanes, retries and shared state, read as a checked contract.

A TOML file with four tables, each optional (``docs/policies.md`` documents every key)::

    [lanes."bedrock:anthropic.claude-3-5-haiku-20241022-v1:0"]   # a model string, as --root takes
    rpm = 600
    max_concurrency = 32
    [lanes.openai]                                                # every model of a provider
    tpm = 2_000_000
    [retry]
    max_attempts = 4
    [shared]
    url = "redis://127.0.0.1:6379/0"
    [sandbox]                                                     # read by the command line
    kind = "agentcore"
    region = "us-west-2"
    [cache]                                                       # read by the command line
    path = "cache.sqlite"

Every value is checked on load against the type of the field it sets (an integer where an
integer is meant: ``4.5`` and ``true`` are refused, as is ``"600"``; numbers must be finite) and
against its range; unknown tables and keys are refused. Every error is a
:class:`~rlmflow.ConfigurationError` that names the file, the table (the lane) and the key.
Lanes are keyed by a provider, a lane key (``aws.bedrock:<model-id>``) or a model string
(``bedrock:<model-id>``, ``local:<name>``), which is turned into the lane key it stands for.
``[sandbox]`` and ``[cache]`` are plain data for whoever builds the sandbox and the sub-call
cache (the CLI, through :mod:`rlmflow.sandbox.choice` and :mod:`rlmflow.durable.choice`): the
Dispatcher reads neither.
"""

from __future__ import annotations

import math
import sys
import types
import typing
from dataclasses import MISSING, dataclass, fields, replace
from pathlib import Path
from typing import Any, TypeVar

from .._exceptions import ConfigurationError
from .._sandbox_string import KINDS, check_identifier, check_region, join_sandbox_string, split_sandbox_string
from .limits import Limits
from .retry import RetryPolicy
from .shared import SharedConfig

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

__all__ = ["CacheSettings", "Policy", "lane_key_of", "load_policy"]

# model-string prefixes (what --root takes) -> gen_ai.provider.name (what lanes are keyed by)
_PROVIDER_OF_PREFIX = {"bedrock": "aws.bedrock", "local": "llama.cpp"}

_TABLES = ("lanes", "retry", "shared", "sandbox", "cache")

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class CacheSettings:
    """The ``[cache]`` table: the sub-call cache's ``path`` (an SQLite file; relative to the
    policy file's folder) or ``url`` (``redis://...``), exactly one; ``ttl`` in seconds (default
    a week); ``max_bytes`` (an SQLite cache's size cap) or ``max_entries`` (a Redis cache's);
    ``roots``: whether root calls are answered from it too (default true).
    """

    path: str | None = None
    url: str | None = None
    ttl: float | None = None
    max_bytes: int | None = None
    max_entries: int | None = None
    roots: bool = True

    def __post_init__(self) -> None:
        if (self.path is None) == (self.url is None):
            raise ValueError("give the cache's path (an SQLite file) or its url (redis://...), one of them")
        if self.ttl is not None and not self.ttl > 0:
            raise ValueError(f"ttl must be a positive number of seconds, not {self.ttl!r}")
        for key, value in (("max_bytes", self.max_bytes), ("max_entries", self.max_entries)):
            if value is not None and value <= 0:
                raise ValueError(f"{key} must be a positive integer, not {value!r}")
        if self.url is not None and self.max_bytes is not None:
            raise ValueError("max_bytes caps an SQLite cache (path = ...); a Redis cache takes max_entries")
        if self.path is not None and self.max_entries is not None:
            raise ValueError("max_entries caps a Redis cache (url = ...); an SQLite cache takes max_bytes")


@dataclass(frozen=True, slots=True)
class Policy:
    """What a policy file sets: limits per lane key, the retry policy, the shared state, where
    the root's code runs (``sandbox``: a ``--sandbox`` string, ``None`` when the file has no
    ``[sandbox]``; :func:`rlmflow.sandbox.choice.build_sandbox` builds it) and the sub-call
    cache (``cache``; :func:`rlmflow.durable.choice.cache_from_settings` opens it)."""

    limits: dict[str, Limits]
    retry: RetryPolicy | None = None
    shared: SharedConfig | None = None
    sandbox: str | None = None
    cache: CacheSettings | None = None


@dataclass(frozen=True, slots=True)
class _SandboxTable:
    """The ``[sandbox]`` table: ``kind`` ``"local"`` or ``"agentcore"``; for ``agentcore``, the code
    interpreter's ``identifier`` (default ``aws.codeinterpreter.v1``) and its AWS ``region``
    (default: the AWS chain's). :attr:`spec` is the same choice as a ``--sandbox`` string."""

    kind: str
    identifier: str | None = None
    region: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind must be {' or '.join(map(repr, KINDS))}, not {self.kind!r}")
        for key, value, check in (("identifier", self.identifier, check_identifier),
                                  ("region", self.region, check_region)):
            if value is None:
                continue
            if self.kind == "local":
                raise ValueError(f"{key} is for kind = 'agentcore' only: the local sandbox takes none")
            try:
                check(value)
            except ValueError as exc:
                raise ValueError(f"{key}: {exc}") from None

    @property
    def spec(self) -> str:
        return join_sandbox_string(self.kind, self.identifier, self.region)


def lane_key_of(key: str) -> str:
    """The lane key a policy table's name stands for: ``bedrock:<id>@<region>`` becomes
    ``aws.bedrock:<id>@<region>``, ``local`` becomes ``llama.cpp``; lane keys stay as they are."""
    provider, sep, rest = key.partition(":")
    provider = _PROVIDER_OF_PREFIX.get(provider, provider)
    return f"{provider}{sep}{rest}"


def load_policy(path: str | Path) -> Policy:
    """Read and check a policy file; raises :class:`ConfigurationError` naming file, table and key."""
    try:
        document = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigurationError(f"cannot read the policy file {path}: {exc}") from exc
    unknown = sorted(set(document) - set(_TABLES))
    if unknown:
        raise ConfigurationError(f"invalid policy in {path}: unknown tables {unknown}; a policy has "
                                 "[lanes.<key>], [retry], [shared], [sandbox] and [cache]")
    lanes = document.get("lanes", {})
    if not isinstance(lanes, dict):
        raise ConfigurationError(f"invalid policy in {path}: 'lanes' must be tables, as [lanes.\"<model>\"]")
    limits: dict[str, Limits] = {}
    for name, table in lanes.items():
        key = lane_key_of(name)
        if key in limits:
            raise ConfigurationError(f"invalid policy in {path}: [lanes.{name!r}] sets lane {key!r} a second time")
        limits[key] = _build(Limits, table, f"{path}: [lanes.{name!r}]")
    retry = _build(RetryPolicy, document["retry"], f"{path}: [retry]") if "retry" in document else None
    shared = _build(SharedConfig, document["shared"], f"{path}: [shared]") if "shared" in document else None
    sandbox = _sandbox(document["sandbox"], path) if "sandbox" in document else None
    cache = _build(CacheSettings, document["cache"], f"{path}: [cache]") if "cache" in document else None
    if cache is not None and cache.path is not None:  # a path in the file is the file's, wherever it is run
        cache = replace(cache, path=str(Path(path).parent / Path(cache.path).expanduser()))
    return Policy(limits, retry, shared, sandbox, cache)


def _sandbox(table: Any, path: str | Path) -> str:
    """The ``--sandbox`` string of a ``[sandbox]`` table; a string in the flag's syntax is refused,
    with the table it stands for written out."""
    if isinstance(table, str):
        try:
            parts = zip(("kind", "identifier", "region"), split_sandbox_string(table), strict=True)
        except ValueError:
            instead = "kind, identifier and region"
        else:
            instead = "sandbox = { " + ", ".join(f'{key} = "{value}"' for key, value in parts if value) + " }"
        raise ConfigurationError(f"invalid policy in {path}: sandbox = {table[:60]!r} is the command line's syntax; "
                                 f"the policy file takes a [sandbox] table: {instead}")
    return _build(_SandboxTable, table, f"{path}: [sandbox]").spec


def _build(cls: type[T], table: Any, where: str) -> T:
    """``cls(**table)`` once every key is a field of ``cls`` and every value has the field's type."""
    if not isinstance(table, dict):
        raise ConfigurationError(f"invalid policy in {where}: expected a table of keys, got {_shown(table)}")
    hints = typing.get_type_hints(cls)
    known = [f.name for f in fields(cls) if f.init and not f.name.startswith("_")]  # type: ignore[arg-type]
    for key, value in table.items():
        if key not in known:
            raise ConfigurationError(f"invalid policy in {where}: unknown key {key!r}; known keys: {', '.join(known)}")
        expected = hints[key]
        if not _has_type(value, expected):
            raise ConfigurationError(
                f"invalid policy in {where}: {key} must be {_describe(expected)}, not {_shown(value)}"
            )
    required = [f.name for f in fields(cls)  # type: ignore[arg-type]
                if f.init and f.default is MISSING and f.default_factory is MISSING]
    missing = [key for key in required if key not in table]
    if missing:
        raise ConfigurationError(
            f"invalid policy in {where}: missing key {missing[0]!r}; known keys: {', '.join(known)}"
        )
    try:
        return cls(**table)
    except (TypeError, ValueError, ConfigurationError) as exc:  # the range checks of ``cls`` itself
        raise ConfigurationError(f"invalid policy in {where}: {getattr(exc, 'message', exc)}") from None


def _has_type(value: Any, expected: Any) -> bool:
    options = typing.get_args(expected) if isinstance(expected, types.UnionType) else (expected,)
    for option in options:
        if option is type(None) and value is None:
            return True
        if option is int and type(value) is int:  # a TOML boolean is not a number
            return True
        if option is bool and type(value) is bool:
            return True
        if option is float and type(value) in (int, float) and math.isfinite(value):
            return True
        if option is str and type(value) is str:
            return True
    return False


def _describe(expected: Any) -> str:
    names = {int: "an integer", float: "a finite number", str: "a string", bool: "true or false"}
    options = typing.get_args(expected) if isinstance(expected, types.UnionType) else (expected,)
    return " or ".join(names.get(option, getattr(option, "__name__", str(option))) for option in options
                       if option is not type(None)) + (" (or left out)" if type(None) in options else "")


def _shown(value: Any) -> str:
    kind = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", dict: "a table",
            list: "an array"}.get(type(value), type(value).__name__)
    return f"{kind} ({str(value)[:40]!r})" if not isinstance(value, dict | list) else kind
