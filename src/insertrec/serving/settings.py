"""Every knob of the service, from the command line, the environment or a config file.

Precedence is command line > environment (``INSERTREC_*``) > config file
(YAML, ``--config`` or ``INSERTREC_CONFIG``) > defaults, so that a container
can override one value of a shared file without copying it. The resolved
settings are handed to worker processes through the environment (see
`Settings.to_environ`), which is the only channel uvicorn gives spawned workers.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import yaml

from insertrec.errors import InsertrecError

__all__ = ["PREFIX", "ROLES", "Settings", "SettingsError"]

ROLES: tuple[str, ...] = ("decide", "feedback", "admin")
PREFIX = "INSERTREC_"


class SettingsError(InsertrecError):
    """A setting that is missing or malformed: names the setting and its source."""


@dataclass(frozen=True)
class Settings:
    """Resolved service settings. Field ``x`` is read from ``INSERTREC_X`` or key ``x`` of the file.

    ``db_synchronous`` is SQLite's ``PRAGMA synchronous`` in WAL mode:
    ``NORMAL`` (default) keeps every committed decision through a crash or a
    SIGKILL of the server; only a power loss or kernel crash can lose the last
    transactions. ``FULL`` survives those too, at the price of an fsync per
    decision.

    ``db_deadline_ms`` bounds every wait of a request on the decision log: the
    writer's turn, a lock, a slow statement. Past it the order is answered from the
    catalog's rules and spooled, instead of a worker that hangs with the database.

    ``spool_dir`` holds the decisions answered while the log is unavailable
    (`insertrec.serving.spool`) until they are replayed into it: one directory
    per decision log, on a local disk, shared by the workers of one server.
    """

    model: str | None = None
    catalog: str | None = None            # the rules to fall back on when the model cannot load
    db_url: str = "sqlite:///insertrec-decisions.db"
    db_synchronous: str = "NORMAL"
    db_deadline_ms: int = 50              # longest wait of a database operation on the request path
    spool_dir: str | None = None          # decisions made while the log is down (default: beside the SQLite
    #                                       file, <file>-spool, else ./insertrec-spool)
    host: str = "127.0.0.1"
    port: int = 8000
    workers: int = 1
    api_keys: str | None = None           # "KEY:role,KEY:role"
    api_keys_file: str | None = None      # one KEY:role a line, '#' comments
    insecure_dev: bool = False
    max_body_bytes: int = 64 * 1024
    max_batch_body_bytes: int = 4 * 1024 * 1024
    log_level: str = "INFO"
    reload_poll_seconds: float = 2.0      # how soon every worker follows a reload asked of one
    alias_poll_seconds: float = 30.0      # how often a models:/NAME@ALIAS model is checked for a move
    metrics_dir: str | None = None        # prometheus_client multiprocess directory (workers > 1)
    keys: dict[str, frozenset[str]] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def load(cls, config_file: str | os.PathLike[str] | None = None,
             environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Resolve settings; ``overrides`` are command-line values (None = not given)."""
        environ = os.environ if environ is None else environ
        config_file = config_file or environ.get(PREFIX + "CONFIG")
        values: dict[str, Any] = {}
        if config_file:
            values.update(_read_config(Path(config_file)))
        for f in _FIELDS:
            if PREFIX + f.name.upper() in environ:
                values[f.name] = environ[PREFIX + f.name.upper()]
        values.update({k: v for k, v in overrides.items() if v is not None and v is not False})
        unknown = sorted(set(values) - {f.name for f in _FIELDS})
        if unknown:
            raise SettingsError(f"{config_file}: unknown setting {unknown[0]!r}")
        settings = cls(**{name: _coerce(name, value) for name, value in values.items()})
        return replace(settings, keys=settings._read_keys())

    def to_environ(self) -> dict[str, str]:
        """The environment that makes `Settings.load()` in a worker give these settings back."""
        out = {}
        for f in _FIELDS:
            value = getattr(self, f.name)
            if value is not None and value != f.default:
                out[PREFIX + f.name.upper()] = str(value).lower() if isinstance(value, bool) else str(value)
        return out

    def _read_keys(self) -> dict[str, frozenset[str]]:
        entries: list[tuple[str, str]] = []
        if self.api_keys:
            entries += [(f"{PREFIX}API_KEYS item {i + 1}", item.strip())
                        for i, item in enumerate(self.api_keys.split(",")) if item.strip()]
        if self.api_keys_file:
            path = Path(self.api_keys_file)
            try:
                lines = path.read_text().splitlines()
            except OSError as exc:
                raise SettingsError(f"{PREFIX}API_KEYS_FILE {str(path)!r}: cannot read ({exc.strerror})") from None
            entries += [(f"{path} line {n}", line.strip()) for n, line in enumerate(lines, 1)
                        if line.strip() and not line.lstrip().startswith("#")]
        keys: dict[str, set[str]] = {}
        for where, entry in entries:
            key, sep, role = entry.rpartition(":")
            if not sep or not key:
                raise SettingsError(f"{where}: expected KEY:role")
            if role not in ROLES:
                raise SettingsError(f"{where}: unknown role {role!r} (expected one of {', '.join(ROLES)})")
            if len(key) < 16:
                raise SettingsError(f"{where}: key too short (at least 16 characters)")
            keys.setdefault(key, set()).add(role)
        return {k: frozenset(v) for k, v in keys.items()}


_FIELDS = tuple(f for f in fields(Settings) if f.name != "keys")
_TYPES = {f.name: type(f.default) if f.default is not None else str for f in _FIELDS}
_TYPES["reload_poll_seconds"] = float


def _coerce(name: str, value: Any) -> Any:
    kind = _TYPES[name]
    if isinstance(value, kind) and not (kind is int and isinstance(value, bool)):
        return value
    text = str(value).strip()
    try:
        if kind is bool:
            if text.lower() not in ("1", "true", "yes", "0", "false", "no"):
                raise ValueError
            return text.lower() in ("1", "true", "yes")
        if kind is int:
            number = int(text)
            if number < 1:
                raise ValueError
            return number
        if kind is float:
            positive = float(text)
            if not positive > 0:
                raise ValueError
            return positive
    except ValueError:
        raise SettingsError(f"setting {name!r} ({PREFIX}{name.upper()}): expected a positive "
                            f"{kind.__name__}, got {text!r}") from None
    if name == "db_synchronous" and text.upper() not in ("NORMAL", "FULL"):
        raise SettingsError(f"setting 'db_synchronous': expected NORMAL or FULL, got {text!r}")
    return text.upper() if name in ("db_synchronous", "log_level") else text


def _read_config(path: Path) -> dict[str, Any]:
    try:
        content = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise SettingsError(f"config file {str(path)!r}: cannot read ({exc.strerror})") from None
    except yaml.YAMLError as exc:
        line = getattr(getattr(exc, "problem_mark", None), "line", None)
        where = f" line {line + 1}" if line is not None else ""
        raise SettingsError(f"config file {str(path)!r}{where}: not valid YAML") from None
    if content is None:
        return {}
    if not isinstance(content, dict):
        raise SettingsError(f"config file {str(path)!r}: expected a mapping of setting: value")
    return {str(k): v for k, v in content.items()}
