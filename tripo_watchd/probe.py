"""`check --online`: which Tripo API protocol this key works on, by one cheap call on each."""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit

from tripo_watchd.config import DEFAULT_BASE_URLS
from tripo_watchd.errors import AuthError, NetworkError, TripoWatchdError
from tripo_watchd.protocols.tripo_api import TripoApi
from tripo_watchd.secrets import Secret
from tripo_watchd.settings import Settings

_BALANCE_PATHS = {"v2-sts": "/user/balance", "v3": "/account/balance"}
_API_PATHS = {"v2-sts": "/v2/openapi", "v3": "/v3"}


def base_urls(settings: Settings) -> dict[str, str]:
    """The base URL to try for each protocol: the configured one, the other derived from it."""
    configured = settings.api.base_url.rstrip("/")
    if configured in DEFAULT_BASE_URLS.values():
        urls = dict(DEFAULT_BASE_URLS)
    else:
        parts = urlsplit(configured)
        urls = {
            name: urlunsplit((parts.scheme, parts.netloc, path, "", ""))
            for name, path in _API_PATHS.items()
        }
    urls[settings.api.protocol] = configured
    return urls


def probe_protocols(settings: Settings, key: Secret) -> dict[str, str]:
    """protocol -> "works" or a short reason why not."""
    verdicts: dict[str, str] = {}
    for name, url in base_urls(settings).items():
        api = TripoApi(
            url,
            lambda: key,
            timeout=min(15.0, settings.api.timeout_seconds),
            ca_bundle=settings.api.ca_bundle,
        )
        try:
            api.request("GET", _BALANCE_PATHS[name])
            verdicts[name] = "works"
        except AuthError:
            verdicts[name] = f"key refused at {url}"
        except NetworkError as exc:
            verdicts[name] = f"unreachable: {exc.message}"
        except TripoWatchdError as exc:
            verdicts[name] = f"does not work: {exc.message}"
        finally:
            api.close()
    return verdicts
