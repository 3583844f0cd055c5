"""Who may use the server and how its responses are hardened: access token, bind checks, security headers."""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
import os
import secrets
import tempfile
from pathlib import Path
from urllib.parse import urlsplit

from flask import Flask, Response, current_app, jsonify, redirect, request, session, url_for

from clipsearch.config import Settings
from clipsearch.errors import ConfigError, LibraryError

log = logging.getLogger(__name__)

SECRET_FILE_NAME = "webui-secret.key"
SESSION_KEY = "access"
# Inline scripts and styles are not allowed: every script and stylesheet is a file under /static.
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; img-src 'self' data: blob:; style-src 'self'; script-src 'self'; "
    "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
OPEN_ENDPOINTS = frozenset({"pages.login", "static"})
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def is_cross_site() -> bool:
    """Whether a request was sent by a page of another site (a browser says so in Sec-Fetch-Site or Origin).

    A server on 127.0.0.1 without a token is reachable by any page the user visits: such a page could post a form
    that edits labels. Browsers label those requests; scripts and curl send neither header and are not affected.
    """
    fetch_site = request.headers.get("Sec-Fetch-Site")
    if fetch_site is not None:
        return fetch_site not in ("same-origin", "none")
    origin = request.headers.get("Origin")
    if origin is None:
        return False
    return origin == "null" or urlsplit(origin).netloc.lower() != request.host.lower()


def is_loopback(host: str) -> bool:
    """Whether an address only accepts connections from this machine."""
    if host.strip("[]").lower() in ("localhost", "localhost.localdomain"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


def check_exposure(settings: Settings) -> None:
    """Refuse to serve beyond this machine without an access token, unless the user explicitly chose insecure."""
    if is_loopback(settings.host) or settings.access_token or settings.insecure:
        return
    raise ConfigError(
        f"serving on {settings.host} would show your photos to anyone who can reach this machine",
        "set an access token (--access-token or CLIPSEARCH_ACCESS_TOKEN), or pass --insecure if the network is trusted",
    )


def load_secret_key(data_dir: Path) -> bytes:
    """The key that signs session cookies: kept in the library folder (mode 0600) so log-ins survive restarts."""
    path = Path(data_dir) / SECRET_FILE_NAME
    key = _read_key(path)
    if key is not None:
        return key
    key = secrets.token_bytes(32)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _publish_key(path, key)
    except OSError as e:
        log.warning("cannot save the session key to %s (%s): log-ins will not survive a restart", path, e)
        return key
    # Worker processes of one server start at once: all of them must sign with the key that got there first.
    return _read_key(path) or key


def _read_key(path: Path) -> bytes | None:
    """The saved key, or None when there is none (or a damaged one, too short to use)."""
    try:
        key = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise LibraryError(f"cannot read {path}: {e}", "check the permissions of the library folder") from e
    return key if len(key) >= 32 else None


def _publish_key(path: Path, key: bytes) -> None:
    """Save a key whole (readers never see part of it); of processes saving at once, the first one's is kept."""
    fd, tmp = tempfile.mkstemp(prefix=".webui-secret.", dir=path.parent)  # created with mode 0600
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(key)
            out.flush()
            os.fsync(out.fileno())
        try:
            os.link(tmp, path)  # atomic and refuses to replace: another process's key, once there, stays
        except OSError:  # there already (kept unless damaged), or a file system without hard links
            if _read_key(path) is None:
                os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def token_fingerprint(token: str) -> str:
    """What a session remembers of the token: changing the token logs every session out."""
    return hashlib.sha256(b"clipsearch-session:" + token.encode()).hexdigest()[:32]


def token_matches(given: str | None, token: str) -> bool:
    """Constant-time comparison of a presented token with the configured one."""
    return given is not None and hmac.compare_digest(given.encode(), token.encode())


def is_authorised() -> bool:
    """Whether the current request may proceed: no token configured, a valid session, or a bearer token."""
    token = current_app.config.get("ACCESS_TOKEN")
    if not token:
        return True
    if session.get(SESSION_KEY) == token_fingerprint(token):
        return True
    header = request.headers.get("Authorization", "")
    scheme, _, value = header.partition(" ")
    return scheme.lower() == "bearer" and token_matches(value.strip(), token)


def safe_next(target: str | None) -> str:
    """A post-login redirect target on this site only (no open redirects)."""
    if not target:
        return url_for("pages.search")
    parts = urlsplit(target)
    if parts.scheme or parts.netloc or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return url_for("pages.search")
    return target


def install(app: Flask) -> None:
    """Register the access check and the security headers on an app."""

    @app.before_request
    def refuse_cross_site_changes():
        if request.method not in SAFE_METHODS and is_cross_site():
            response = jsonify(error={"code": 403, "message": "a page of another site tried to change this library",
                                      "hint": "make changes from clipsearch's own pages or with an API client"})
            response.status_code = 403
            return response
        return None

    @app.before_request
    def require_access():
        if request.endpoint in OPEN_ENDPOINTS or is_authorised():
            return None
        if request.path.startswith("/api/"):
            response = jsonify(error={"code": 401, "message": "an access token is required",
                                      "hint": "send the header 'Authorization: Bearer TOKEN'"})
            response.status_code = 401
            response.headers["WWW-Authenticate"] = 'Bearer realm="clipsearch"'
            return response
        return redirect(url_for("pages.login", next=request.full_path.rstrip("?")))

    @app.after_request
    def harden(response: Response) -> Response:
        headers = response.headers
        headers.setdefault("Content-Security-Policy", CONTENT_SECURITY_POLICY)
        headers.setdefault("X-Content-Type-Options", "nosniff")
        headers.setdefault("X-Frame-Options", "DENY")
        # Queries are in URLs: do not hand them to other sites.
        headers.setdefault("Referrer-Policy", "no-referrer")
        headers.setdefault("Cross-Origin-Opener-Policy", "same-origin")
        headers.setdefault("Cross-Origin-Resource-Policy", "same-origin")
        if current_app.config.get("ACCESS_TOKEN") and "Cache-Control" not in headers:
            headers["Cache-Control"] = "private, no-store"
        return response
