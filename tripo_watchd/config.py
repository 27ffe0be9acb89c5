"""TOML → frozen Settings; every error names the file, the key and what is allowed."""

from __future__ import annotations

import difflib
import json
import math
import os
import stat
import tomllib
import typing
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from tripo_watchd.addresses import is_loopback
from tripo_watchd.errors import ConfigError
from tripo_watchd.metrics import parse_listen
from tripo_watchd.secrets import Secret
from tripo_watchd.settings import (
    ApiSettings,
    HookSettings,
    LedgerSettings,
    LimitsSettings,
    MetricsSettings,
    PipelineSettings,
    S3Settings,
    Settings,
    WatchSettings,
    WorkerSettings,
)
from tripo_watchd.throttle import parse_rate

__all__ = [
    "API_KEY_ENV",
    "CREDENTIAL_NAME",
    "DEFAULT_BASE_URLS",
    "api_key_help",
    "load_api_key",
    "load_settings",
    "parse_settings",
]

API_KEY_ENV = "TRIPO_API_KEY"
CREDENTIAL_NAME = "tripo-api-key"
DEFAULT_BASE_URLS: Mapping[str, str] = {
    "v2-sts": "https://api.tripo3d.ai/v2/openapi",
    "v3": "https://openapi.tripo3d.ai/v3",
}
MIN_PART_BYTES = 5 * 1024 * 1024  # S3's smallest allowed multipart part
MAX_PART_BYTES = 5 * 1024 * 1024 * 1024  # S3's largest allowed part

_SECTIONS: dict[str, type[Any]] = {
    "api": ApiSettings,
    "s3": S3Settings,
    "watch": WatchSettings,
    "workers": WorkerSettings,
    "ledger": LedgerSettings,
    "limits": LimitsSettings,
    "pipeline": PipelineSettings,
    "hooks": HookSettings,
    "metrics": MetricsSettings,
}
_CHOICES: dict[str, tuple[str, ...]] = {
    "api.protocol": tuple(DEFAULT_BASE_URLS),
    "s3.accelerate": ("auto", "always", "never"),
    "watch.mode": ("auto", "native", "poll"),
    "pipeline.dedupe": ("content", "path", "off"),
    "pipeline.after_upload": ("keep", "move", "delete"),
}
_URLS = ("api.base_url", "s3.endpoint_url", "s3.accelerate_endpoint_url")
_OPTIONAL_PATH = Path | None


@dataclass(frozen=True)
class _Range:
    """A numeric rule: bounds (inclusive unless `strict_low`) and the words that state it."""

    low: float | None
    high: float | None = None
    strict_low: bool = False
    words: str = ""

    def allows(self, v: float) -> bool:
        if self.low is not None and (v <= self.low if self.strict_low else v < self.low):
            return False
        return self.high is None or v <= self.high


_POSITIVE = _Range(0, strict_low=True, words="a number greater than 0")
_POSITIVE_INT = _Range(0, strict_low=True, words="an integer greater than 0")
_NON_NEGATIVE = _Range(0, words="a number of 0 or more")
_RANGES: dict[str, _Range] = {
    "hooks.timeout_seconds": _POSITIVE,
    "s3.connect_timeout_seconds": _POSITIVE,
    "s3.read_timeout_seconds": _POSITIVE,
    "hooks.max_workers": _Range(1, 16, words="an integer from 1 to 16"),
    "s3.progress_log_seconds": _Range(0, words="a number of 0 or more (0 = no progress events)"),
    "api.timeout_seconds": _POSITIVE,
    "api.max_uploads_per_minute": _Range(0, words="a number of 0 or more (0 = no pacing)"),
    "api.max_retry_after_seconds": _POSITIVE,
    "s3.accelerate_threshold_bytes": _Range(0, words="an integer of 0 or more"),
    "s3.multipart_threshold_bytes": _Range(
        MIN_PART_BYTES,
        words=f"an integer of at least {MIN_PART_BYTES} (5 MiB, the S3 minimum part size)",
    ),
    "s3.multipart_chunk_bytes": _Range(
        MIN_PART_BYTES,
        MAX_PART_BYTES,
        words=f"an integer from {MIN_PART_BYTES} to {MAX_PART_BYTES} (5 MiB to 5 GiB)",
    ),
    "s3.max_concurrency": _Range(1, 64, words="an integer from 1 to 64"),
    "watch.settle_seconds": _NON_NEGATIVE,
    "watch.poll_seconds": _POSITIVE,
    "watch.rescan_seconds": _Range(0, words="a number of 0 or more (0 = no rescan)"),
    "workers.count": _Range(1, 64, words="an integer from 1 to 64"),
    "limits.image_min_px": _POSITIVE_INT,
    "limits.image_max_px": _POSITIVE_INT,
    "limits.image_max_bytes": _POSITIVE_INT,
    "limits.model_max_bytes": _POSITIVE_INT,
    "pipeline.max_attempts": _Range(1, words="an integer of 1 or more"),
}


def load_settings(path: Path | None) -> Settings:
    """Read the TOML file at `path` into Settings; `None` gives the defaults (source None)."""
    if path is None:
        return parse_settings({})
    name = str(path)
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{name}: no such config file") from None
    except IsADirectoryError:
        raise ConfigError(f"{name}: is a directory, not a config file") from None
    except PermissionError:
        raise ConfigError(f"{name}: cannot read the config file (permission denied)") from None
    except OSError as e:
        raise ConfigError(f"{name}: cannot read the config file ({e.strerror or e})") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{name}: not valid TOML: not UTF-8 at byte {e.start}") from None
    except tomllib.TOMLDecodeError as e:
        # tomllib's message already carries "(at line L, column C)".
        raise ConfigError(f"{name}: not valid TOML: {e}") from None
    return _parse(data, Path(os.path.abspath(path)), name)


def parse_settings(data: Mapping[str, Any], source: Path | None = None) -> Settings:
    """Turn a parsed TOML document into Settings; relative paths resolve against `source`'s dir."""
    name = str(source) if source is not None else "config"
    return _parse(data, Path(os.path.abspath(source)) if source is not None else None, name)


def load_api_key(api: ApiSettings, environ: Mapping[str, str] = os.environ) -> Secret | None:
    """Find the API key: systemd credential, then `api.api_key_file`, then $TRIPO_API_KEY."""
    cred_dir = environ.get("CREDENTIALS_DIRECTORY")
    if cred_dir:
        cred = Path(cred_dir) / CREDENTIAL_NAME
        if cred.exists():
            key = _read_key_file(cred, "the systemd credential")
            if key:
                return key
    if api.api_key_file is not None:
        key = _read_key_file(api.api_key_file, "api.api_key_file")
        if key:
            return key
    env_value = environ.get(API_KEY_ENV, "").strip()
    if env_value:
        _check_key_chars(env_value, f"${API_KEY_ENV}")
        return Secret(env_value)
    personal = user_config_dir(environ) / "api-key"
    if api.api_key_file is None and personal.exists():
        return _read_key_file(personal, "the personal key file")
    return None


def user_config_dir(environ: Mapping[str, str] = os.environ) -> Path:
    """$XDG_CONFIG_HOME/tripo-watchd (default ~/.config/tripo-watchd)."""
    base = environ.get("XDG_CONFIG_HOME") or str(Path("~/.config").expanduser())
    return Path(base) / "tripo-watchd"


def default_config_path(environ: Mapping[str, str] = os.environ) -> Path | None:
    """The config file used when none is named: $TRIPO_WATCHD_CONFIG, the user's, the system's."""
    named = environ.get("TRIPO_WATCHD_CONFIG")
    if named:
        return Path(named)
    for candidate in (
        user_config_dir(environ) / "config.toml",
        Path("/etc/tripo-watchd/config.toml"),
    ):
        if candidate.is_file():
            return candidate
    return None


def api_key_help() -> str:
    """One sentence naming every place the API key can be put, in lookup order."""
    return (
        f"Put the Tripo API key in the systemd credential {CREDENTIAL_NAME} "
        f"(LoadCredential={CREDENTIAL_NAME}:/path/to/key, read from "
        f"$CREDENTIALS_DIRECTORY/{CREDENTIAL_NAME}), or in a file readable only by you "
        f"(chmod 600) named by api.api_key_file in the config file, "
        f"or in the environment variable {API_KEY_ENV}, "
        f"or in ~/.config/tripo-watchd/api-key (chmod 600)."
    )


# --- API key files ------------------------------------------------------------------------


def _read_key_file(path: Path, what: str) -> Secret | None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise ConfigError(f"{path}: API key file ({what}) does not exist") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read API key file ({what}): {e.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise ConfigError(f"{path}: API key file ({what}) is not a regular file")
    if st.st_mode & 0o077:
        raise ConfigError(
            f"{path}: API key file ({what}) is readable by other users "
            f"(mode {stat.S_IMODE(st.st_mode):04o}); run: chmod 600 {path}"
        )
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"{path}: cannot read API key file ({what}): {e.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: API key file ({what}) is not UTF-8 text") from None
    key = text.strip()
    if not key:
        return None
    _check_key_chars(key, str(path))
    return Secret(key)


def _check_key_chars(key: str, where: str) -> None:
    # Never echo the key; a stray space or newline inside it would break the HTTP header.
    if any(c.isspace() or not c.isprintable() for c in key):
        raise ConfigError(
            f"{where}: the API key contains spaces, line breaks or control characters; "
            "the file or variable must hold just the key"
        )


# --- Settings parsing ---------------------------------------------------------------------


@dataclass(frozen=True)
class _Ctx:
    name: str  # how the file is named in messages
    base: Path  # where relative paths are resolved

    def error(self, key: str, value: object, what: str) -> ConfigError:
        return ConfigError(f"{self.name}: {key} = {_show(value)} {what}")


def _parse(data: Mapping[str, Any], source: Path | None, name: str) -> Settings:
    ctx = _Ctx(name, source.parent if source is not None else Path.cwd())
    for section in data:
        if section not in _SECTIONS:
            raise ConfigError(f"{name}: unknown section [{section}]{_suggest_section(section)}")
    built: dict[str, Any] = {}
    for section, cls in _SECTIONS.items():
        raw = data.get(section, {})
        if not isinstance(raw, Mapping):
            raise ctx.error(section, raw, f"has the wrong type; [{section}] must be a table")
        built[section] = _build_section(ctx, section, cls, raw)
    settings = Settings(**built, source=source)
    _check_outside_watched(ctx, settings)
    return settings


def _check_outside_watched(ctx: _Ctx, settings: Settings) -> None:
    """The daemon's own output must not land in a watched folder, or it would upload itself."""
    roots = [Path(os.path.abspath(p)) for p in settings.watch.paths]
    own = {
        "ledger.path": settings.ledger.path.parent,
        "pipeline.done_dir": settings.pipeline.done_dir,
        "pipeline.rejected_dir": settings.pipeline.rejected_dir,
    }
    for key, folder in own.items():
        if folder is None:
            continue
        folder = Path(os.path.abspath(folder))
        for root in roots:
            inside = folder == root or folder.is_relative_to(root)
            if inside and (settings.watch.recursive or folder == root):
                raise ctx.error(
                    key,
                    str(folder),
                    f"is inside the watched folder {root}; the daemon would pick up its own "
                    "files. Use a folder outside watch.paths",
                )


def _build_section(ctx: _Ctx, section: str, cls: type[Any], raw: Mapping[str, Any]) -> Any:
    hints = typing.get_type_hints(cls)
    known = [f.name for f in fields(cls)]
    for key in raw:
        if key not in known:
            raise ConfigError(
                f"{ctx.name}: unknown key {section}.{key}{_suggest_key(section, key, known)}"
            )
    values: dict[str, Any] = {}
    for key, value in raw.items():
        dotted = f"{section}.{key}"
        values[key] = _convert(ctx, dotted, value, hints[key])
        _check_value(ctx, dotted, value, values[key])
    _check_section(ctx, section, raw, values)
    return cls(**values)


def _convert(ctx: _Ctx, key: str, value: Any, hint: Any) -> Any:
    def wrong(use: str) -> ConfigError:
        return ctx.error(key, value, f"has the wrong type ({_toml_type(value)}); use {use}")

    if hint is bool:
        if not isinstance(value, bool):
            raise wrong("true or false")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise wrong("an integer")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise wrong("a number")
        if not math.isfinite(value):
            raise ctx.error(key, value, "is not allowed; use a finite number")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise wrong("a string")
        return value
    if hint is Path or hint == _OPTIONAL_PATH:
        if not isinstance(value, str):
            raise wrong('a path as a string (e.g. "~/dir")')
        if not value:
            if hint is Path:
                raise ctx.error(key, value, "is not allowed; use a non-empty path")
            return None  # "" explicitly means "not set"
        return _resolve(ctx, value)
    if hint == tuple[Path, ...] or hint == tuple[str, ...]:
        of_paths = hint == tuple[Path, ...]
        use = "a list of paths as strings" if of_paths else "a list of strings"
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise wrong(use)
        if of_paths:
            if any(not v for v in value):
                raise ctx.error(key, value, "is not allowed; paths must not be empty strings")
            return tuple(_resolve(ctx, v) for v in value)
        return tuple(value)
    raise AssertionError(f"no TOML conversion for {key}: {hint!r}")  # a settings.py change


def _resolve(ctx: _Ctx, value: str) -> Path:
    p = Path(value).expanduser()
    if p.is_absolute():
        return p
    return Path(os.path.normpath(ctx.base / p))


def _check_value(ctx: _Ctx, key: str, raw: Any, value: Any) -> None:
    choices = _CHOICES.get(key)
    if choices is not None and value not in choices:
        raise ctx.error(key, raw, f"is not allowed; use {_either(choices)}")
    rule = _RANGES.get(key)
    if rule is not None and not rule.allows(value):
        raise ctx.error(key, raw, f"is not allowed; use {rule.words}")


def _check_section(ctx: _Ctx, section: str, raw: Mapping[str, Any], v: dict[str, Any]) -> None:
    if section == "api":
        _check_api(ctx, raw, v)
    elif section == "s3":
        _check_s3(ctx, v)
    elif section == "watch":
        _check_watch(ctx, v)
    elif section == "limits":
        _check_limits(ctx, v)
    elif section == "pipeline":
        _check_pipeline(ctx, v)
    elif section == "hooks":
        _check_hooks(ctx, v)
    elif section == "metrics":
        _check_metrics(ctx, v)


def _check_api(ctx: _Ctx, raw: Mapping[str, Any], v: dict[str, Any]) -> None:
    protocol = v.get("protocol", ApiSettings.protocol)
    if "base_url" not in raw:
        v["base_url"] = DEFAULT_BASE_URLS[protocol]
        return
    insecure = v.get("allow_insecure_http", False)
    v["base_url"] = _check_url(ctx, "api.base_url", v["base_url"], insecure).rstrip("/")
    parts = urlsplit(v["base_url"])
    if parts.query or parts.fragment:
        raise ctx.error(
            "api.base_url", raw["base_url"], "is not allowed; use a URL without ?query or #fragment"
        )


def _check_s3(ctx: _Ctx, v: dict[str, Any]) -> None:
    insecure = v.get("allow_insecure_http", False)
    if v.get("endpoint_url"):  # empty means https://{s3_host} from the token
        _check_url(ctx, "s3.endpoint_url", v["endpoint_url"], insecure)
    if "accelerate_endpoint_url" in v:
        _check_url(ctx, "s3.accelerate_endpoint_url", v["accelerate_endpoint_url"], insecure)
    if "region" in v and not v["region"].strip():
        raise ctx.error(
            "s3.region", v["region"], 'is not allowed; use a region such as "us-west-2"'
        )
    if v.get("max_bandwidth"):
        try:
            parse_rate(v["max_bandwidth"])
        except ValueError as e:
            raise ctx.error(
                "s3.max_bandwidth", v["max_bandwidth"], f"is not allowed: {e}"
            ) from None


def _check_hooks(ctx: _Ctx, v: dict[str, Any]) -> None:
    for key in ("on_uploaded", "on_rejected"):
        argv = v.get(key)
        if argv and not argv[0]:
            raise ctx.error(
                f"hooks.{key}",
                list(argv),
                "is not allowed; the first item must be the command, "
                'e.g. ["/usr/local/bin/notify", "--quiet"]',
            )


def _check_metrics(ctx: _Ctx, v: dict[str, Any]) -> None:
    listen = v.get("listen", "")
    if not listen:
        return
    try:
        host, _ = parse_listen(listen)
    except ValueError as e:
        raise ctx.error("metrics.listen", listen, f"is not allowed: {e}") from None
    if not v.get("allow_remote", False) and not is_loopback(host):
        raise ctx.error(
            "metrics.listen",
            listen,
            "is not a loopback address; the endpoint has no authentication: "
            "use 127.0.0.1:PORT or set metrics.allow_remote = true",
        )


def _check_watch(ctx: _Ctx, v: dict[str, Any]) -> None:
    if "paths" in v and not v["paths"]:
        raise ctx.error("watch.paths", [], "is not allowed; use a list of at least one folder")


def _check_limits(ctx: _Ctx, v: dict[str, Any]) -> None:
    lo = v.get("image_min_px", LimitsSettings.image_min_px)
    hi = v.get("image_max_px", LimitsSettings.image_max_px)
    if lo > hi:
        raise ConfigError(
            f"{ctx.name}: limits.image_min_px = {lo} is larger than limits.image_max_px = {hi}; "
            "image_min_px must be at most image_max_px"
        )


def _check_pipeline(ctx: _Ctx, v: dict[str, Any]) -> None:
    if v.get("after_upload") == "move" and v.get("done_dir") is None:
        raise ConfigError(
            f'{ctx.name}: pipeline.after_upload = "move" needs pipeline.done_dir '
            '(the folder uploaded files are moved to); set it, or use "keep" or "delete"'
        )


def _check_url(ctx: _Ctx, key: str, url: str, allow_insecure_http: bool) -> str:
    section = key.split(".")[0]
    try:
        parts = urlsplit(url)
        host = parts.hostname
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError as e:
        raise ctx.error(key, url, f"is not a valid URL ({e})") from None
    if parts.scheme not in ("http", "https") or not host:
        raise ctx.error(key, url, "is not allowed; use an http(s) URL with a host, https://host/…")
    if parts.scheme == "http" and not allow_insecure_http and not is_loopback(host):
        raise ctx.error(
            key,
            url,
            "uses plain http://, which is allowed only for a loopback host "
            f"(127.0.0.0/8, ::1, localhost) or with {section}.allow_insecure_http = true; "
            "use https://",
        )
    return url


# --- message helpers ----------------------------------------------------------------------


def _show(value: object) -> str:
    """Render a value the way it looks in TOML, so the message matches the file."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, list):
        return "[" + ", ".join(_show(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{k} = {_show(v)}" for k, v in value.items()) + "}"
    return str(value)


def _toml_type(value: object) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a float"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array" if all(not isinstance(v, Mapping) for v in value) else "a table array"
    if isinstance(value, Mapping):
        return "a table"
    return type(value).__name__  # dates and times


def _either(choices: tuple[str, ...]) -> str:
    quoted = [json.dumps(c) for c in choices]
    return quoted[0] if len(quoted) == 1 else ", ".join(quoted[:-1]) + " or " + quoted[-1]


def _suggest_section(section: str) -> str:
    close = difflib.get_close_matches(section, list(_SECTIONS), n=1)
    if close:
        return f"; did you mean [{close[0]}]?"
    return "; known sections are " + ", ".join(f"[{s}]" for s in _SECTIONS)


def _suggest_key(section: str, key: str, known: list[str]) -> str:
    close = difflib.get_close_matches(key, known, n=1)
    if close:
        return f"; did you mean {section}.{close[0]}?"
    for other, cls in _SECTIONS.items():
        if key in {f.name for f in fields(cls)}:
            return f"; {key} belongs in [{other}]: did you mean {other}.{key}?"
    return f"; known keys in [{section}] are " + ", ".join(known)
