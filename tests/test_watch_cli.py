"""`clipsearch watch` and `clipsearch serve --watch` as real processes, with the fake encoder registered."""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time

from click.testing import CliRunner

from clipsearch.cli import main
from clipsearch.library import Library
from tests.fakes import make_image
from tests.test_serve import LAUNCH, Server, cli_env


class Lines:
    """The lines a stream writes, collected by a thread, waited for by content."""

    def __init__(self, stream):
        self.seen: list[str] = []
        self._queue: queue.Queue[str] = queue.Queue()
        threading.Thread(target=lambda: [self._queue.put(line) for line in stream], daemon=True).start()

    def wait_for(self, text: str, timeout: float = 60) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self._queue.get(timeout=0.2)
            except queue.Empty:
                continue
            self.seen.append(line)
            if text in line:
                return line
        raise AssertionError(f"no line with {text!r} in {''.join(self.seen)!r}")


def start_watch(settings, *args: str) -> tuple[subprocess.Popen, Lines, Lines]:
    env = {**cli_env(settings), "CLIPSEARCH_WATCH_SETTLE_SECONDS": "0.3"}
    process = subprocess.Popen([sys.executable, "-c", LAUNCH, "watch", *args], env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    return process, Lines(process.stdout), Lines(process.stderr)


def catch_up_and_terminate(settings, expected: str = "caught up") -> Lines:
    """`clipsearch watch` on the library's own folders until its start-up rescan reports; SIGTERM ends it with 0."""
    process, out, err = start_watch(settings)
    try:
        out.wait_for(expected)
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 0
    finally:
        process.kill()
        process.wait()
    return err


def test_watch_command_reports_batches_and_stops_cleanly(tmp_path, settings):
    photos = tmp_path / "photos"
    photos.mkdir()
    process, out, err = start_watch(settings, str(photos))
    try:
        err.wait_for("watching " + str(photos))
        out.wait_for("caught up: added 0")
        make_image(photos / "red.png", "red")
        out.wait_for("changes: added 1, updated 0, moved 0, removed 0, failed 0")
        process.send_signal(signal.SIGINT)
        assert process.wait(30) == 130  # Ctrl-C, as `clipsearch index`
        err.wait_for("stopped watching")
    finally:
        process.kill()
        process.wait()
    # Again on the library's own folders: a deletion made meanwhile is caught up at start.
    (photos / "red.png").unlink()
    err = catch_up_and_terminate(settings, "caught up: added 0, updated 0, moved 0, removed 1")
    assert not any("Traceback" in line for line in err.seen)


def catalog_counts(settings) -> dict:
    library = Library(settings)
    try:
        return library.catalog.counts() if library.exists else {"images": 0, "embeddings": 0}
    finally:
        library.close()


def test_a_killed_watcher_loses_nothing_the_next_start_does_not_recover(tmp_path, settings):
    photos = tmp_path / "photos"
    photos.mkdir()
    process, out, _ = start_watch(settings, str(photos), "--batch-size", "1", "--workers", "1")  # many small commits
    try:
        out.wait_for("caught up")
        for n in range(200):
            make_image(photos / f"img{n:03d}.png", (n, 90, 250 - n), noise=n + 1)
        wait_until(lambda: catalog_counts(settings)["images"] > 0)
        process.kill()  # kill -9 in the middle of the burst
    finally:
        process.kill()
        process.wait()
    counts = catalog_counts(settings)
    assert counts["images"] == counts["embeddings"] < 200  # committed batches are whole
    catch_up_and_terminate(settings)
    counts = catalog_counts(settings)
    assert counts["images"] == counts["embeddings"] == 200


def test_watch_without_folders_on_an_empty_library_says_what_to_do(settings):
    result = CliRunner().invoke(main, ["watch"], env=cli_env(settings))
    assert result.exit_code == 1 and "no folders to watch" in result.output and "clipsearch watch ~/Pictures" in result.output


def names(server: Server, query: str) -> list[str]:
    _, _, body = server.get(f"/api/search?q={query}&k=20")
    return [os.path.basename(hit["path"]) for hit in json.loads(body)["results"]]


def wait_until(condition, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def test_serve_watch_shows_new_photos_and_never_deleted_ones(settings, photo_library):
    server = Server(settings, "--watch", "--watch-settle-seconds", "0.3")
    try:
        assert "magenta1.png" not in names(server, "magenta")
        make_image(photo_library["home/red1.png"].parent / "magenta1.png", "magenta", noise=99)
        wait_until(lambda: names(server, "magenta")[:1] == ["magenta1.png"])
        photo_library["trip/red3.jpg"].unlink()
        wait_until(lambda: "red3.jpg" not in names(server, "red"))
        assert {"red1.png", "red2.jpg"} <= set(names(server, "red"))
    finally:
        assert server.stop() == 0
