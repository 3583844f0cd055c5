"""The Docker image's entrypoint and default command, run here with a fake and then the real `clipsearch`."""

from __future__ import annotations

import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.fakes import make_image
from tests.test_docker import DOCKERFILES, ENTRYPOINT, REPO, exec_form, final_stage, healthcheck_command, the


# --- The entrypoint, with a fake `clipsearch` that records how it is called.

FAKE_CLI = """#!/bin/sh
echo "$*" >> "$FAKE_CALLS"
if [ "$1" = status ]; then [ -z "${FAKE_STATUS_FAILS:-}" ] || exit 5; printf '{"roots": %s}\\n' "$FAKE_ROOTS"; fi
if [ "$1" = index ] && [ -n "${FAKE_INDEX_FAILS:-}" ]; then exit 1; fi
if [ "$1" = index ] && [ -n "${FAKE_INDEX_SLEEPS:-}" ]; then echo $$ > "$FAKE_CALLS.pid"; exec sleep 60; fi
exit 0
"""
STATUS_CALL = "status --json --failures 1"


def executable(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(0o755)
    return path


@pytest.fixture
def entrypoint(tmp_path):
    """Run docker/entrypoint.sh with the image's server settings and a fake clipsearch; returns (result, calls)."""
    bin_dir = executable(tmp_path / "bin" / "clipsearch", FAKE_CLI).parent
    calls = tmp_path / "calls.txt"

    def run(*command: str, roots: str = '["/photos"]', photos: bool = True, background: bool = False, **env: str):
        (tmp_path / "photos").mkdir(exist_ok=True) if photos else None
        full_env = {**os.environ, "PATH": os.pathsep.join([str(bin_dir), str(Path(sys.executable).parent),
                                                           os.environ["PATH"]]),
                    "FAKE_CALLS": str(calls), "FAKE_ROOTS": roots, "CLIPSEARCH_HOST": "0.0.0.0",
                    "CLIPSEARCH_DATA_DIR": str(tmp_path / "library"),
                    "PHOTOS_MOUNT": str(tmp_path / ("photos" if photos else "nothing-mounted")), **env}
        if background:
            return subprocess.Popen(["sh", str(ENTRYPOINT), *command], env=full_env, cwd=tmp_path,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        result = subprocess.run(["sh", str(ENTRYPOINT), *command], env=full_env, cwd=tmp_path, capture_output=True,
                                text=True, timeout=60)
        recorded = calls.read_text().splitlines() if calls.exists() else []
        calls.unlink(missing_ok=True)
        return result, recorded

    return run


def test_entrypoint_refuses_to_serve_without_a_token(entrypoint):
    result, calls = entrypoint("clipsearch", "serve", "--watch")
    assert result.returncode == 2 and calls == []
    assert "CLIPSEARCH_ACCESS_TOKEN" in result.stderr and "CLIPSEARCH_INSECURE=true" in result.stderr


@pytest.mark.parametrize("way", ["token", "insecure", "flag"])
def test_entrypoint_serves_with_a_token_or_when_told_insecure(entrypoint, way):
    env = {"token": {"CLIPSEARCH_ACCESS_TOKEN": "t0ken"}, "insecure": {"CLIPSEARCH_INSECURE": "true"}}.get(way, {})
    extra = ["--access-token", "t0ken"] if way == "flag" else []
    result, calls = entrypoint("clipsearch", "serve", "--watch", *extra, **env)
    assert result.returncode == 0, result.stderr
    assert calls == [STATUS_CALL, " ".join(["serve", "--watch", *extra])]


def test_entrypoint_indexes_the_photos_first_in_a_new_library(entrypoint, tmp_path):
    result, calls = entrypoint("clipsearch", "serve", "--watch", roots="[]", CLIPSEARCH_ACCESS_TOKEN="t0ken")
    assert result.returncode == 0, result.stderr
    assert calls == [STATUS_CALL, f"index {tmp_path / 'photos'}", "serve --watch"]
    assert "indexing" in result.stderr


def test_entrypoint_stops_when_the_library_or_first_index_fails_or_nothing_is_mounted(entrypoint, tmp_path):
    result, calls = entrypoint("clipsearch", "serve", "--watch", CLIPSEARCH_ACCESS_TOKEN="t0ken", FAKE_STATUS_FAILS="1")
    assert result.returncode == 5 and calls == [STATUS_CALL]  # status said why; serving would only say it again
    result, calls = entrypoint("clipsearch", "serve", "--watch", roots="[]", CLIPSEARCH_ACCESS_TOKEN="t0ken",
                               FAKE_INDEX_FAILS="1")
    assert result.returncode != 0 and calls == [STATUS_CALL, f"index {tmp_path / 'photos'}"]
    result, calls = entrypoint("clipsearch", "serve", "--watch", roots="[]", photos=False,
                               CLIPSEARCH_ACCESS_TOKEN="t0ken")
    assert result.returncode == 2 and calls == [STATUS_CALL]
    assert "nothing is mounted" in result.stderr


def running(pid: int) -> bool:
    """Whether a process runs (an exited one may linger as a zombie until its new parent reaps it)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_docker_stop_during_the_first_index_stops_it_at_once(entrypoint, tmp_path):
    process = entrypoint("clipsearch", "serve", "--watch", roots="[]", background=True, CLIPSEARCH_ACCESS_TOKEN="t0ken",
                         FAKE_INDEX_SLEEPS="1")
    pid_file, deadline = tmp_path / "calls.txt.pid", time.monotonic() + 30
    while not pid_file.exists() or not pid_file.read_text().strip():
        assert process.poll() is None and time.monotonic() < deadline, "the first index did not start"
        time.sleep(0.05)
    indexer = int(pid_file.read_text())  # the fake indexer: `sleep 60`
    started = time.monotonic()
    process.send_signal(signal.SIGTERM)  # what `docker stop` sends to PID 1, the entrypoint's shell
    assert process.wait(timeout=10) == 143 and time.monotonic() - started < 5
    while running(indexer) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not running(indexer), "the indexer kept running"


def test_entrypoint_runs_other_commands_as_they_are(entrypoint):
    assert entrypoint("clipsearch", "status")[1] == ["status"]  # no token needed, nothing indexed
    assert entrypoint("clipsearch", "serve", roots="[]", CLIPSEARCH_ACCESS_TOKEN="t0ken")[1] == ["serve"]
    result, calls = entrypoint("sh", "-c", "echo hello")
    assert result.stdout == "hello\n" and calls == []


# --- What the image runs, for real: first start, health check, stop, second start (loopback; the fake encoder,
# so that the model costs nothing: the tiny open_clip model's imports alone take many seconds on a loaded machine).

# The real CLI, with the deterministic colour encoder registered first (as tests/browser_server.py runs it).
CLI_WITH_FAKE_ENCODER = (
    "import sys; sys.path.insert(0, {repo!r}); from tests.fakes import register_fake_encoder; "
    "register_fake_encoder(); from clipsearch.cli import run; run(sys.argv[1:])"
).format(repo=str(REPO))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_container_command(env: dict[str, str], log: Path) -> subprocess.Popen:
    """The image's ENTRYPOINT and CMD, from the Dockerfile, with the repository's entrypoint script."""
    command = ["sh", str(ENTRYPOINT), *exec_form(the(final_stage(DOCKERFILES["cpu"]), "CMD"))]
    with open(log, "ab") as out:
        process = subprocess.Popen(command, env=env, cwd=log.parent, stdout=out, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while "serving on" not in log.read_text():
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"the server did not start ({process.wait()}):\n{log.read_text()}")
        time.sleep(0.05)
    return process


def stop_like_docker(process: subprocess.Popen) -> int:
    """`docker stop`: SIGTERM to PID 1 (the server, which the entrypoint exec'd), SIGKILL after 10 s."""
    process.send_signal(signal.SIGTERM)
    try:
        return process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        pytest.fail("the server ignored SIGTERM: docker stop would have to kill it")


def test_first_start_indexes_serves_passes_the_healthcheck_and_restarts_without_indexing(tmp_path):
    photos = tmp_path / "photos"
    make_image(photos / "red.png", "red")
    make_image(photos / "album" / "blue.jpg", "blue", noise=1)
    cli = f"#!/bin/sh\nexec {shlex.quote(sys.executable)} -c {shlex.quote(CLI_WITH_FAKE_ENCODER)} \"$@\"\n"
    bin_dir = executable(tmp_path / "bin" / "clipsearch", cli).parent
    token = "health-check-token"
    # The image's settings, but on loopback: this machine is shared (the exposure check passes there too).
    env = {**os.environ, "PATH": os.pathsep.join([str(bin_dir), str(Path(sys.executable).parent), os.environ["PATH"]]),
           "CLIPSEARCH_DATA_DIR": str(tmp_path / "library"), "CLIPSEARCH_HOST": "127.0.0.1",
           "CLIPSEARCH_PORT": str(free_port()), "CLIPSEARCH_ACCESS_TOKEN": token, "PHOTOS_MOUNT": str(photos),
           "CLIPSEARCH_MODEL": "test-colors", "CLIPSEARCH_PRETRAINED": "v1", "CLIPSEARCH_WORKERS": "2",
           "PYTHONUNBUFFERED": "1"}
    healthcheck = healthcheck_command(DOCKERFILES["cpu"])

    def healthy(**overrides: str) -> bool:
        return subprocess.run(healthcheck, env={**env, **overrides}, capture_output=True, timeout=30).returncode == 0

    first_log = tmp_path / "first.log"
    server = start_container_command(env, first_log)
    try:
        assert "indexing" in first_log.read_text()
        assert healthy()
        assert not healthy(CLIPSEARCH_ACCESS_TOKEN="wrong"), "the health check must fail on a refused token"
        request = urllib.request.Request(f"http://127.0.0.1:{env['CLIPSEARCH_PORT']}/api/status",
                                         headers={"Authorization": f"Bearer {token}"})
        with urllib.request.urlopen(request, timeout=30) as response:
            status = json.load(response)
        assert status["counts"]["embeddings"] == 2 and status["roots"] == [str(photos)]
    finally:
        assert stop_like_docker(server) == 0, first_log.read_text()
    second_log = tmp_path / "second.log"
    server = start_container_command(env, second_log)
    try:
        assert "indexing" not in second_log.read_text(), "a library with folders is served at once"
        assert f"watching {photos}" in second_log.read_text()
        assert healthy()
    finally:
        assert stop_like_docker(server) == 0, second_log.read_text()
