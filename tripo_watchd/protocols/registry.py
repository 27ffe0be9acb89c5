"""Which upload protocol `api.protocol` names, built for one worker."""

from __future__ import annotations

from collections.abc import Callable

from tripo_watchd.errors import ConfigError
from tripo_watchd.protocols import ProgressFactory, UploadProtocol
from tripo_watchd.secrets import Secret
from tripo_watchd.settings import Settings


def make_protocol(
    settings: Settings,
    api_key: Callable[[], Secret],
    on_secret: Callable[[str], None] = lambda value: None,
    progress_for: ProgressFactory | None = None,
) -> UploadProtocol:
    """A fresh protocol instance (its own connections) for one worker."""
    name = settings.api.protocol
    if name == "v2-sts":
        from tripo_watchd.protocols.v2_sts import V2Sts

        return V2Sts(settings, api_key, on_secret, progress_for)
    if name == "v3":
        from tripo_watchd.protocols.v3 import V3Presign

        return V3Presign(settings, api_key, on_secret, progress_for)
    raise ConfigError(f'api.protocol = {name!r} is not known; use "v2-sts" or "v3"')
