"""The API key as the daemon holds it: read once, re-read when the operator replaces it."""

from __future__ import annotations

import os
import threading
from collections.abc import Mapping

from tripo_watchd.config import api_key_help, load_api_key
from tripo_watchd.errors import ConfigError
from tripo_watchd.secrets import Secret
from tripo_watchd.settings import ApiSettings


class ApiKeySource:
    """Thread-safe holder of the current API key; `reload()` re-reads its source."""

    def __init__(self, api: ApiSettings, environ: Mapping[str, str] = os.environ) -> None:
        self._api = api
        self._environ = environ
        self._lock = threading.Lock()
        key = load_api_key(api, environ)
        if key is None:
            raise ConfigError(f"no Tripo API key was found; {api_key_help()}")
        self._key = key

    def __call__(self) -> Secret:
        with self._lock:
            return self._key

    def reload(self) -> bool:
        """Read the key again; True when it changed. A missing key keeps the old one."""
        try:
            key = load_api_key(self._api, self._environ)
        except ConfigError:
            return False
        with self._lock:
            changed = key is not None and key != self._key
            if changed and key is not None:
                self._key = key
        return changed
