"""How a running `clipsearch serve` announces itself in its library folder, and how the CLI asks it instead of loading a model."""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

SERVER_FILE_NAME = "server.json"
ASK_TIMEOUT_S = 5.0  # a warm server answers in milliseconds; a hung one must not stall the CLI for long


def server_file(data_dir: Path) -> Path:
    """Where a running server for this library writes its address."""
    return Path(data_dir) / SERVER_FILE_NAME


def announce(data_dir: Path, url: str, token_required: bool) -> Path:
    """Write this process's server address into the library folder (atomically)."""
    path = server_file(data_dir)
    info = {"url": url, "pid": os.getpid(), "token_required": token_required, "started_at": time.time()}
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".server.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as out:
            json.dump(info, out)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def withdraw(data_dir: Path) -> None:
    """Remove the address file if this process wrote it (another server may have replaced it since)."""
    path = server_file(data_dir)
    info = running_server(data_dir, check_alive=False)
    if info is not None and info.get("pid") == os.getpid():
        path.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    except OSError:
        return False
    return True


def running_server(data_dir: Path, check_alive: bool = True) -> dict[str, Any] | None:
    """The address file of a server for this library, or None (absent, unreadable, or its process is gone)."""
    try:
        info = json.loads(server_file(data_dir).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(info, dict) or not isinstance(info.get("url"), str) or not isinstance(info.get("pid"), int):
        return None
    if check_alive and not _alive(info["pid"]):
        return None
    return info


def ask_server(info: dict[str, Any], path: str, params: dict[str, Any], token: str | None) -> dict[str, Any] | None:
    """GET a JSON API path from a running server (its `running_server` info); None when it cannot answer.

    Errors the server reports about the query itself (4xx) are returned as {"error": ...} so the caller can show
    them; anything else (no server, refused, timeout, 5xx) returns None and the caller searches locally.
    """
    if info.get("token_required") and not token:
        log.debug("the running server needs an access token and none is set: searching locally")
        return None
    url = info["url"].rstrip("/") + path + "?" + urllib.parse.urlencode(params)
    request = urllib.request.Request(url, headers={"Accept": "application/json"})
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    # Loopback only: never send the token through a proxy configured for the outside world.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(request, timeout=ASK_TIMEOUT_S) as response:
            return json.load(response)
    except urllib.error.HTTPError as e:
        if 400 <= e.code < 500 and e.code not in (401, 403, 404):
            try:
                return json.load(e)
            except ValueError:
                return None
        log.debug("server at %s answered %s: searching locally", info["url"], e.code)
        return None
    except (OSError, ValueError) as e:
        log.debug("server at %s did not answer (%s): searching locally", info["url"], e)
        return None
