"""structlog set-up (JSON for journald, plain console for people) and the redaction processor."""

from __future__ import annotations

import logging
import re
import sys
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any, TextIO

import structlog
from structlog.typing import EventDict, Processor

from .secrets import Secret

MASK = "***"

# Compared after lower-casing and turning "-" into "_", so header names match too.
SECRET_KEYS = frozenset(
    {
        "api_key",
        "apikey",
        "x_api_key",
        "authorization",
        "proxy_authorization",
        "cookie",
        "set_cookie",
        "sts_ak",
        "sts_sk",
        "session_token",
        "secret",
        "secret_key",
        "client_secret",
        "access_token",
        "refresh_token",
        "aws_access_key_id",
        "aws_secret_access_key",
        "aws_session_token",
        "x_amz_security_token",
        "password",
        "token",
    }
)

# Free-text shapes a secret takes in URLs, headers and library debug output.
_PATTERNS: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"(?i)\b(Bearer\s+)[^\s\"'\\,;]+"), r"\1" + MASK),
    (
        re.compile(r"(?i)\b((?:X-Amz-)?(?:Security-Token|Signature|Credential)=)[^&\s\"'\\,;]+"),
        r"\1" + MASK,
    ),
)

# Shorter values would blank ordinary words all over the logs.
MIN_SECRET_LENGTH = 8
MAX_RECENT_SECRETS = 128

LIBRARY_LOGGERS = (
    "botocore",
    "boto3",
    "s3transfer",
    "urllib3",
    "requests",
    "watchdog",
    "PIL",
)


class _SecretValues:
    """The registered secret values: pinned ones forever, the rest the most recent 128."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pinned: dict[str, None] = {}
        self._recent: OrderedDict[str, None] = OrderedDict()
        self._snapshot: tuple[str, ...] = ()
        self._stale = False

    def add(self, value: str, *, pinned: bool) -> None:
        if len(value) < MIN_SECRET_LENGTH:
            return
        with self._lock:
            if pinned:
                self._pinned[value] = None
                self._recent.pop(value, None)
            elif value not in self._pinned:
                self._recent[value] = None
                self._recent.move_to_end(value)
                while len(self._recent) > MAX_RECENT_SECRETS:
                    self._recent.popitem(last=False)
            self._stale = True  # a token registers three values; sort once, when next needed

    def values(self) -> tuple[str, ...]:
        if self._stale:
            with self._lock:
                # Longest first, so a secret that contains another is masked whole.
                values = [*self._pinned, *self._recent]
                self._snapshot = tuple(sorted(values, key=len, reverse=True))
                self._stale = False
        return self._snapshot

    def clear(self) -> None:
        with self._lock:
            self._pinned.clear()
            self._recent.clear()
            self._snapshot = ()
            self._stale = False


_SECRETS = _SecretValues()


def register_secret(value: str, *, pinned: bool = False) -> None:
    """Scrub this secret value from everything logged; `pinned` keeps it forever (the API key)."""
    _SECRETS.add(value, pinned=pinned)


def forget_secrets() -> None:
    """Drop every registered value (for tests)."""
    _SECRETS.clear()


def scrub_text(text: str) -> str:
    """Mask registered secret values and secret-shaped substrings in free text."""
    for value in _SECRETS.values():
        if value in text:
            text = text.replace(value, MASK)
    for pattern, replacement in _PATTERNS:
        text = pattern.sub(replacement, text)
    return text


def _is_secret_key(key: object) -> bool:
    return isinstance(key, str) and key.lower().replace("-", "_") in SECRET_KEYS


def _scrub(value: Any, depth: int = 0) -> Any:
    # Strings are left to the rendered line's scrub (`_scrubbed`): one pass over the line
    # instead of one per value, which was a third of the cost of every log line.
    if isinstance(value, Secret):
        return MASK
    if depth > 20:  # a cycle or absurd nesting: the rendered line is still scrubbed
        return value
    if isinstance(value, Mapping):
        return {k: MASK if _is_secret_key(k) else _scrub(v, depth + 1) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_scrub(v, depth + 1) for v in value]
    return value


def redact(logger: Any, method_name: str, event_dict: EventDict) -> EventDict:
    """structlog processor: mask secret keys (nested too) and Secret values.

    Registered values and secret-shaped text are masked in the rendered line by `_scrubbed`,
    which must come last.
    """
    return {k: MASK if _is_secret_key(k) else _scrub(v) for k, v in event_dict.items()}


def _scrubbed(renderer: Callable[..., Any]) -> Processor:
    """Wrap the renderer so the final line is scrubbed once more (tracebacks, reprs)."""

    def render(logger: Any, method_name: str, event_dict: EventDict) -> Any:
        out = renderer(logger, method_name, event_dict)
        return scrub_text(out) if isinstance(out, str) else out

    return render


_handler: logging.Handler | None = None
_configure_lock = threading.Lock()


def configure_logging(
    *,
    json_output: bool | None = None,
    level: str = "info",
    stream: TextIO | None = None,
    library_level: str = "warning",
) -> None:
    """Route structlog and stdlib logging to `stream` (stderr), redacted; safe to call again."""
    global _handler
    out = stream if stream is not None else sys.stderr
    if json_output is None:
        json_output = not (hasattr(out, "isatty") and out.isatty())
    numeric = logging.getLevelNamesMapping()[level.upper()]

    shared: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.StackInfoRenderer(),
        structlog.processors.format_exc_info,
    ]
    renderer: Callable[..., Any] = (
        structlog.processors.JSONRenderer(sort_keys=False)
        if json_output
        else structlog.dev.ConsoleRenderer(
            colors=False, exception_formatter=structlog.dev.plain_traceback
        )
    )
    final = _scrubbed(renderer)

    with _configure_lock:
        structlog.reset_defaults()
        structlog.configure(
            processors=[*shared, redact, final],
            wrapper_class=structlog.make_filtering_bound_logger(numeric),
            logger_factory=structlog.WriteLoggerFactory(file=out),
            cache_logger_on_first_use=False,
        )

        handler = logging.StreamHandler(out)
        handler.setFormatter(
            structlog.stdlib.ProcessorFormatter(
                foreign_pre_chain=[structlog.stdlib.add_logger_name, *shared],
                processors=[
                    structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                    redact,
                    final,
                ],
            )
        )
        root = logging.getLogger()
        if _handler is not None:
            root.removeHandler(_handler)
        root.addHandler(handler)
        root.setLevel(numeric)
        _handler = handler
        lib_level = max(numeric, logging.getLevelNamesMapping()[library_level.upper()])
        for name in LIBRARY_LOGGERS:
            logging.getLogger(name).setLevel(lib_level)
        # Python warnings (deprecations, library oddities) become log events, not raw stderr text.
        logging.captureWarnings(True)


def reset_logging() -> None:
    """Undo configure_logging: structlog defaults, our stdlib handler removed (for tests)."""
    global _handler
    with _configure_lock:
        structlog.reset_defaults()
        if _handler is not None:
            logging.getLogger().removeHandler(_handler)
            _handler = None
