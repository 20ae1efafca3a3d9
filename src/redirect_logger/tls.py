"""The checks of ``server.certfile`` and ``server.keyfile``, made when the
config is read (``serve``, ``check``, a reload), so that a certificate
Hypercorn could not load refuses the start with the key named, instead of
failing inside Hypercorn's first listener."""

from __future__ import annotations

import ssl


class _Encrypted(Exception):
    """The key asks for a password: refused, not prompted for on the terminal."""


def _no_password() -> bytes:
    raise _Encrypted


def tls_problem(certfile: str, keyfile: str) -> tuple[str, str] | None:
    """None when both are empty, or name a PEM certificate (chain) and the
    unencrypted private key of its first certificate; else the key at fault
    (``"certfile"`` or ``"keyfile"``) and the reason."""
    if not certfile and not keyfile:
        return None
    if not keyfile:
        return "keyfile", "not set, but server.certfile is: set both (HTTPS) or neither"
    if not certfile:
        return "certfile", "not set, but server.keyfile is: set both (HTTPS) or neither"
    for key, path in (("certfile", certfile), ("keyfile", keyfile)):
        try:
            with open(path, "rb") as file:
                file.read()
        except OSError as exc:
            return key, f"cannot read {path!r}: {exc.strerror or exc}"
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:  # reads the PEM certificates of the file, and only those
        context.load_verify_locations(cafile=certfile)
    except ssl.SSLError as exc:
        return "certfile", f"{certfile!r} holds no PEM certificate ({exc})"
    try:
        context.load_cert_chain(certfile, keyfile, password=_no_password)
    except _Encrypted:
        return "keyfile", f"{keyfile!r} is encrypted (a password-protected key is not supported)"
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            return "keyfile", f"{keyfile!r} does not match the certificate of server.certfile"
        return "keyfile", f"{keyfile!r} holds no PEM private key ({exc})"
    return None
