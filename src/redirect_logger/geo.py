"""Countries of client addresses, from a MaxMind DB (``records.geoip_database``).

The database is read through the ``maxminddb`` package (its C extension when
installed, memory-mapped); each address is looked up once, then answered from
a bounded cache. docs/configuration.md#geoip_database says which databases fit.
"""

from __future__ import annotations

import functools
import ipaddress

import maxminddb
from maxminddb import InvalidDatabaseError

__all__ = ["CACHE_SIZE", "Countries", "InvalidDatabaseError", "database_problem"]

# Addresses whose country is kept (entries, least recently used dropped first).
CACHE_SIZE = 16_384


def database_problem(path: str) -> str | None:
    """Why ``path`` is not a MaxMind DB that can be read, or None when it is."""
    try:
        with maxminddb.open_database(path) as reader:
            reader.metadata()
    except FileNotFoundError:
        return f"{path!r}: no such file"
    except OSError as exc:
        return f"{path!r}: cannot read: {exc.strerror or exc}"
    except (InvalidDatabaseError, ValueError) as exc:
        return f"{path!r}: not a MaxMind DB: {exc}"
    return None


class Countries:
    """ISO 3166-1 alpha-2 country codes by client address."""

    def __init__(self, path: str, cache_size: int = CACHE_SIZE) -> None:
        """Opens the database; raises OSError or ``maxminddb.InvalidDatabaseError``."""
        self._reader = maxminddb.open_database(path)
        self.path = path
        self.of = functools.lru_cache(maxsize=cache_size)(self._lookup)

    def _lookup(self, address: str) -> str | None:
        """The country of ``address`` (an IPv4 or IPv6 address as text): the
        database's ``country.iso_code``; None for what it does not know, or
        what is not an address."""
        try:
            found = self._reader.get(ipaddress.ip_address(address))
        except ValueError:  # not an address; IPv6 in an IPv4-only database
            return None
        if not isinstance(found, dict):
            return None
        country = found.get("country")
        code = country.get("iso_code") if isinstance(country, dict) else None
        return code if isinstance(code, str) else None

    def close(self) -> None:
        self._reader.close()
