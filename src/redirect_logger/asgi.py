"""``app`` for ``hypercorn -k trio redirect_logger.asgi:app``.

The config file is named by ``REDIRECT_LOGGER_CONFIG``. Each Hypercorn worker
process imports this module and so has its own pipeline and producer, run from
the ASGI lifespan. TLS is Hypercorn's (``--certfile``, ``--keyfile``): a
config that sets ``server.certfile`` is refused, so that it never serves
plain HTTP where HTTPS was meant.
"""

from __future__ import annotations

import os

from .app import create_app
from .config import ConfigError, load_settings
from .logs import configure_logging
from .service import Service

ENV_VAR = "REDIRECT_LOGGER_CONFIG"


def _load() -> Service:
    path = os.environ.get(ENV_VAR)
    if not path:
        raise ConfigError(f"{ENV_VAR} is not set: it must name the TOML config file")
    settings = load_settings(path)
    if settings.server.certfile:  # Hypercorn owns its sockets, and so their TLS
        raise ConfigError(
            f"{path}: server.certfile, server.keyfile: not used under hypercorn, whose TLS is "
            "its own: remove them and pass --certfile and --keyfile to hypercorn"
        )
    configure_logging(settings.logging)
    return Service(settings)


app = create_app(_load(), own_lifecycle=True)
