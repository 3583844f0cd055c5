"""`clipsearch serve` under waitress in a real process, its address file, and the CLI asking it instead of loading a model."""

from __future__ import annotations

import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from click.testing import CliRunner

from clipsearch import server_link
from clipsearch.cli import main
from clipsearch.encoders import register_encoder
from tests.fakes import FAKE_MODEL, ColorWordEncoder, register_fake_encoder

REPO = Path(__file__).resolve().parents[1]
LAUNCH = (
    "import sys; sys.path.insert(0, {repo!r}); from tests.fakes import register_fake_encoder; "
    "register_fake_encoder(); from clipsearch.cli import run; run(sys.argv[1:])"
).format(repo=str(REPO))


def cli_env(settings) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLIPSEARCH_")}
    env.update(CLIPSEARCH_DATA_DIR=str(settings.data_dir), CLIPSEARCH_MODEL=FAKE_MODEL, CLIPSEARCH_PRETRAINED="v1")
    if settings.db:
        env["CLIPSEARCH_DB"] = settings.db
    return env


class Server:
    """A `clipsearch serve --port 0` subprocess with the fake encoder registered."""

    def __init__(self, settings, *args: str, env: dict[str, str] | None = None):
        self.process = subprocess.Popen(
            [sys.executable, "-c", LAUNCH, "serve", "--port", "0", *args], env=env or cli_env(settings),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()
        self.url = self._wait_for_url()

    def _pump(self) -> None:
        for line in self.process.stderr:
            self.lines.put(line)

    def _wait_for_url(self, timeout: float = 60) -> str:
        deadline = time.monotonic() + timeout
        seen = []
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=0.5)
            except queue.Empty:
                if self.process.poll() is not None:
                    break
                continue
            seen.append(line)
            if line.startswith("serving on "):
                return line.split()[2]
        self.stop()
        raise AssertionError(f"server did not start: {''.join(seen)}")

    def get(self, path: str):
        with urllib.request.urlopen(self.url.rstrip("/") + path, timeout=10) as response:
            return response.status, dict(response.headers), response.read()

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


@pytest.fixture
def server(settings, photo_library):
    running = Server(settings)
    yield running
    running.stop()


def test_serve_answers_over_http_and_announces_itself(server, settings):
    status, headers, body = server.get("/api/search?q=red&k=3")
    assert status == 200 and headers["Server"] == "clipsearch"
    names = [os.path.basename(hit["path"]) for hit in json.loads(body)["results"]]
    assert set(names) == {"red1.png", "red2.jpg", "red3.jpg"}
    status, headers, body = server.get("/?q=red")
    assert status == 200 and "Content-Security-Policy" in headers
    info = server_link.running_server(settings.data_dir)
    assert info is not None and info["url"] == server.url and info["pid"] == server.process.pid
    assert server.stop() == 0
    assert not server_link.server_file(settings.data_dir).exists()  # withdrawn on a clean stop


class RefusingEncoder(ColorWordEncoder):
    """Fails if the CLI loads a model at all: the running server should answer instead."""

    def encode_texts(self, texts):
        raise AssertionError("the CLI embedded the query itself instead of asking the server")


def test_cli_search_asks_the_running_server(server, settings):
    runner = CliRunner()
    register_encoder(FAKE_MODEL, RefusingEncoder)
    try:
        result = runner.invoke(main, ["search", "red", "-k", "2", "--json"], env=cli_env(settings))
        assert result.exit_code == 0, result.output
        hits = json.loads(result.stdout)
        assert {os.path.basename(h["path"]) for h in hits} <= {"red1.png", "red2.jpg", "red3.jpg"} and len(hits) == 2
        assert {"id", "path", "score"} <= set(hits[0])
        refused = runner.invoke(main, ["search", "red", "k", "--json"], env=cli_env(settings))
        assert refused.exit_code != 0  # two queries: a usage error, reported locally
        bad = runner.invoke(main, ["search", "--", "-people"], env=cli_env(settings))
        assert bad.exit_code == 2 and "error:" in bad.output and "hint:" in bad.output  # the server's 400, relayed
        combined = runner.invoke(main, ["search", "red -blue", "-k", "1"], env=cli_env(settings))
        assert combined.exit_code == 0 and "red" in combined.output
        local = runner.invoke(main, ["search", "red", "--local"], env=cli_env(settings))
        assert local.exit_code != 0  # --local really loads the model here (which refuses in this test)
    finally:
        register_fake_encoder()


def test_cli_searches_locally_when_the_server_is_gone(settings, photo_library):
    server_link.announce(settings.data_dir, "http://127.0.0.1:9/", token_required=False)  # nothing listens on port 9
    result = CliRunner().invoke(main, ["search", "blue", "-k", "1"], env=cli_env(settings))
    assert result.exit_code == 0 and "blue" in result.output
    stale = server_link.server_file(settings.data_dir)
    stale.write_text(json.dumps({"url": "http://127.0.0.1:9/", "pid": 2**22 + 12345}))
    assert server_link.running_server(settings.data_dir) is None  # that process does not exist


def test_serve_refuses_public_address_without_token(settings):
    result = CliRunner().invoke(main, ["serve", "--host", "0.0.0.0"], env=cli_env(settings))
    assert result.exit_code == 2 and "access token" in result.output and "--insecure" in result.output
    result = CliRunner().invoke(main, ["serve", "--debug", "--host", "0.0.0.0", "--access-token", "x"], env=cli_env(settings))
    assert result.exit_code == 2 and "debug" in result.output


def test_serve_reports_a_busy_port(settings, photo_library):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = CliRunner().invoke(main, ["serve", "--port", str(port)], env=cli_env(settings))
    assert result.exit_code == 2 and f"127.0.0.1:{port}" in result.output and "--port" in result.output


def test_serve_with_token_requires_it(settings, photo_library):
    running = Server(settings, "--access-token", "tok123")
    try:
        with pytest.raises(urllib.error.HTTPError) as refused:
            running.get("/api/search?q=red")
        assert refused.value.code == 401
        request = urllib.request.Request(running.url + "api/search?q=red", headers={"Authorization": "Bearer tok123"})
        with urllib.request.urlopen(request, timeout=10) as response:
            assert response.status == 200
        # The CLI passes its own token on to the server.
        env = {**cli_env(settings), "CLIPSEARCH_ACCESS_TOKEN": "tok123"}
        register_encoder(FAKE_MODEL, RefusingEncoder)
        try:
            result = CliRunner().invoke(main, ["search", "red", "-k", "1"], env=env)
        finally:
            register_fake_encoder()
        assert result.exit_code == 0 and "red" in result.output
    finally:
        running.stop()


def test_serve_an_empty_library_without_loading_a_model(settings):
    from clipsearch.library import Library

    Library(settings).catalog.close()  # the catalog exists (e.g. after `clipsearch status`), but nothing is indexed
    running = Server(settings, env={**cli_env(settings), "CLIPSEARCH_MODEL": "no-such-model"})  # a model load would fail
    try:
        status, _, body = running.get("/")
        assert status == 200 and b"empty-library" in body
    finally:
        assert running.stop() == 0


def test_start_up_objects_are_exempt_from_the_cyclic_gc(app, photo_library):
    import gc

    from clipsearch.webui.server import prepare
    from clipsearch.webui.services import EXTENSION_KEY

    gc.unfreeze()
    try:
        info = prepare(app.extensions[EXTENSION_KEY])
        assert info["model"] and gc.get_freeze_count() > 0  # no full collection walks them during requests
    finally:
        gc.unfreeze()  # this test process keeps collecting as before
