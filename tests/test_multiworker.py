"""Several server processes over one library: gunicorn workers reading while a separate `clipsearch watch` writes.

Also the pieces that make it safe: vector-file saves racing across processes, and the session key that worker
processes starting together must share.
"""

from __future__ import annotations

import http.cookiejar
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from clipsearch import server_link
from clipsearch.library import Library
from clipsearch.store import VectorStore
from tests.fakes import make_image
from tests.test_serve import cli_env
from tests.test_watch_cli import start_watch

REPO = Path(__file__).resolve().parents[1]
GUNICORN = (
    "import sys; sys.path.insert(0, {repo!r}); from tests.fakes import register_fake_encoder; "
    "register_fake_encoder(); from gunicorn.app.wsgiapp import run; sys.argv[0] = 'gunicorn'; run()"
).format(repo=str(REPO))
TOKEN = "multi-worker-token"
WORKERS = 3
CLIENTS = 8
ADDED = 60
NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback only, whatever the environment says


# --- vector-file saves racing across processes ---------------------------------------------------------
class CatalogBounds:
    """What save() asks a catalog: the oldest generation readers can catch up from, and the newest."""

    def __init__(self, floor: int, newest: int):
        self.floor, self.newest = floor, newest

    def log_state(self) -> tuple[int, int]:
        return self.floor, self.newest


DIM = 8
NEWEST = 10_000


def store_at(path: Path, generation: int) -> VectorStore:
    """A store whose contents follow from its generation (count and vectors), so a file mixing two saves shows."""
    from clipsearch.store import new_flat_index

    count = generation % 50 + 1
    vectors = np.random.default_rng(generation).standard_normal((count, DIM)).astype(np.float32)
    index = new_flat_index(DIM)
    index.add_with_ids(vectors, np.arange(count, dtype=np.int64))
    return VectorStore(path, "m", DIM, index=index, generation=generation)


def save_many(path: str, seed: int, rounds: int) -> int:
    """Save stores of random generations (run in a separate process); the newest generation saved."""
    rng = np.random.default_rng(seed)
    newest = 0
    for _ in range(rounds):
        generation = int(rng.integers(1, NEWEST))
        store_at(Path(path), generation).save(CatalogBounds(0, NEWEST))
        newest = max(newest, generation)
    return newest


def load_until(path: str, stop_file: str) -> int:
    """Load the file over and over until stop_file appears: it must always be whole and never go back in time."""
    loads, last = 0, 0
    while not os.path.exists(stop_file):
        try:
            store = VectorStore.load(Path(path))
        except FileNotFoundError:
            continue
        expected = store_at(Path(path), store.generation)
        assert store.count == expected.count, "header and index of two different saves"
        assert np.allclose(store.reconstruct(0), expected.reconstruct(0))
        assert store.generation >= last, f"the saved generation went back from {last} to {store.generation}"
        last = store.generation
        loads += 1
    return loads


def test_saves_racing_across_processes_never_corrupt_the_file_nor_put_an_older_one_back(tmp_path):
    path = tmp_path / "vectors.faiss"
    stop_file = tmp_path / "stop"
    with ProcessPoolExecutor(4, mp_context=multiprocessing.get_context("spawn")) as pool:
        reader = pool.submit(load_until, str(path), str(stop_file))
        try:
            savers = [pool.submit(save_many, str(path), seed, 60) for seed in range(3)]
            newest = max(saver.result(timeout=120) for saver in savers)
        finally:
            stop_file.touch()  # a failed saver must not leave the reader looping (the pool would wait for it forever)
        assert reader.result(timeout=60) > 0
    final = VectorStore.load(path)
    assert final.generation == newest and final.count == store_at(path, newest).count
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]  # no temp file left behind


def test_a_saved_file_the_catalog_cannot_use_is_replaced(tmp_path):
    path = tmp_path / "vectors.faiss"
    store_at(path, 500).save()
    store_at(path, 300).save(CatalogBounds(0, 1000))
    assert VectorStore.load(path).generation == 500  # newer and usable: kept
    store_at(path, 300).save(CatalogBounds(0, 400))  # stamped past the catalog (a catalog restored from a backup)
    assert VectorStore.load(path).generation == 300
    store_at(path, 700).save(CatalogBounds(0, 1000))
    store_at(path, 600).save(CatalogBounds(800, 1000))  # 700 is older than the pruned log: readers would rebuild
    assert VectorStore.load(path).generation == 600
    store_at(path, 200).save()  # no catalog given: written as asked (a writer that knows best)
    assert VectorStore.load(path).generation == 200


# --- the session key shared by worker processes starting together ----------------------------------------
def key_after_barrier(data_dir: str, barrier) -> str:
    from clipsearch.webui.security import load_secret_key

    barrier.wait()
    return load_secret_key(Path(data_dir)).hex()


def test_worker_processes_starting_together_share_one_session_key(tmp_path):
    context = multiprocessing.get_context("spawn")
    with context.Manager() as manager, ProcessPoolExecutor(4, mp_context=context) as pool:
        for attempt in range(8):  # the race is narrow: run it several times
            folder = tmp_path / str(attempt)
            folder.mkdir()
            barrier = manager.Barrier(4)
            keys = {key.result(timeout=60) for key in [pool.submit(key_after_barrier, str(folder), barrier) for _ in range(4)]}
            assert len(keys) == 1, f"attempt {attempt}: {len(keys)} different keys"
            saved = folder / "webui-secret.key"
            assert saved.read_bytes().hex() in keys and saved.stat().st_mode & 0o077 == 0
            assert [p.name for p in folder.iterdir()] == ["webui-secret.key"]  # no temp file left behind


# --- gunicorn workers and a separate watcher ---------------------------------------------------------------
class Gunicorn:
    """`gunicorn -c python:clipsearch.webui.gunicorn_conf -w N 'clipsearch.webui.wsgi:create_app_from_env()'`."""

    def __init__(self, settings, workers: int, env: dict[str, str], cwd: Path):
        self.settings = settings
        args = ["-c", "python:clipsearch.webui.gunicorn_conf", "-w", str(workers), "-b", "127.0.0.1:0",
                "--access-logfile", "-", "--access-logformat", "access %(p)s %(s)s", "clipsearch.webui.wsgi:create_app_from_env()"]
        self.process = subprocess.Popen([sys.executable, "-c", GUNICORN, *args], env=env, cwd=cwd,
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.access: list[tuple[str, str]] = []  # (worker pid, status) of every request
        self.log: list[str] = []
        threading.Thread(target=self._pump_access, daemon=True).start()
        threading.Thread(target=lambda: self.log.extend(self.process.stderr), daemon=True).start()
        self.url = self._wait_for_announcement()

    def _pump_access(self) -> None:
        for line in self.process.stdout:
            if line.startswith("access "):
                _, pid, status = line.split()
                self.access.append((pid, status))

    def _wait_for_announcement(self, timeout: float = 60) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            info = server_link.running_server(self.settings.data_dir)
            if info is not None and info["pid"] == self.process.pid:
                return info["url"]
            if self.process.poll() is not None:
                break
            time.sleep(0.1)
        self.stop()
        raise AssertionError(f"gunicorn did not start: {''.join(self.log)}")

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)  # graceful: workers finish their requests
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


def call(url: str, data: dict | None = None) -> tuple[int, dict]:
    """(status, JSON answer) of a GET, or of a POST of `data` as JSON, with the access token."""
    body = json.dumps(data).encode() if data is not None else None
    request = urllib.request.Request(url, data=body, headers={"Authorization": f"Bearer {TOKEN}"})
    if body is not None:
        request.add_header("Content-Type", "application/json")
    try:
        with NO_PROXY.open(request, timeout=30) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as e:
        return e.code, {}


def upload(url: str, image: Path) -> tuple[int, dict]:
    """POST an image to search with, as the browser's form does (multipart field `image`)."""
    boundary = "clipsearch-test-boundary"
    body = (f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{image.name}"\r\n'
            f"Content-Type: application/octet-stream\r\n\r\n").encode() + image.read_bytes() + f"\r\n--{boundary}--\r\n".encode()
    request = urllib.request.Request(url, data=body, headers={"Authorization": f"Bearer {TOKEN}",
                                                              "Content-Type": f"multipart/form-data; boundary={boundary}"})
    with NO_PROXY.open(request, timeout=30) as response:
        return response.status, json.load(response)


def concurrently(function, times: int) -> list:
    """function() called `times` times at once (so that the requests spread over the workers); the answers."""
    outcomes: list = []

    def run() -> None:
        try:
            outcomes.append(function())
        except BaseException as e:  # raised below, in the test's thread
            outcomes.append(e)

    threads = [threading.Thread(target=run) for _ in range(times)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for outcome in outcomes:
        if isinstance(outcome, BaseException):
            raise outcome
    return outcomes


def served_names(url: str, folder: Path) -> set[str]:
    """Names of the photos a search restricted to `folder` returns (all of them: k is past their number)."""
    status, answer = call(url + "api/search?" + urllib.parse.urlencode({"q": "red", "k": 500, "folder": str(folder)}))
    assert status == 200
    return {os.path.basename(hit["path"]) for hit in answer["results"]}


@pytest.mark.both_catalogs  # PostgreSQL: the catalog of a library that several servers share
def test_gunicorn_workers_search_while_a_separate_watcher_indexes(settings, photo_library, tmp_path):
    root = photo_library["home/red1.png"].parents[1]
    added_dir = root / "new"
    watcher, watch_out, _ = start_watch(settings)
    server = None
    try:
        watch_out.wait_for("caught up")
        # XDG_RUNTIME_DIR: where gunicorn puts its control socket (else under $HOME).
        env = {**cli_env(settings), "CLIPSEARCH_ACCESS_TOKEN": TOKEN, "XDG_RUNTIME_DIR": str(tmp_path)}
        server = Gunicorn(settings, WORKERS, env, tmp_path)
        # Every worker answers once it has booted (requests wait in the listen queue meanwhile).
        status, answer = call(server.url + "api/status")
        assert status == 200, (answer, "".join(server.log[-40:]))

        # A browser log-in made with one worker is honoured by all of them: they share the session key.
        jar = http.cookiejar.CookieJar()
        browser = urllib.request.build_opener(urllib.request.ProxyHandler({}), urllib.request.HTTPCookieProcessor(jar))
        login = urllib.request.Request(server.url + "login", data=urllib.parse.urlencode({"token": TOKEN}).encode())
        browser.open(login, timeout=30).close()
        for _ in range(3 * WORKERS):
            with browser.open(server.url + "api/status", timeout=30) as response:  # no bearer token: the cookie only
                assert response.status == 200

        # An image search's next page may go to another worker than the one that embedded the upload.
        status, first = upload(server.url + "api/search?k=2", photo_library["trip/blue2.jpg"])
        assert status == 200 and first["upload_id"]
        pages = concurrently(lambda: call(server.url + f"api/search?upload={first['upload_id']}&k=2&offset=2"), 3 * WORKERS)
        assert [status for status, _ in pages] == [200] * 3 * WORKERS

        errors: list[str] = []
        done = threading.Event()
        counts = [0] * CLIENTS

        def client(n: int) -> None:
            colours = ["red", "blue", "green", "magenta", "yellow"]
            while not done.is_set():
                query = colours[(n + counts[n]) % len(colours)]
                try:
                    status, answer = call(server.url + f"api/search?q={query}&k=10")
                    if status != 200 or not answer["results"]:
                        errors.append(f"{query}: {status}")
                except OSError as e:
                    errors.append(f"{query}: {e}")
                counts[n] += 1

        clients = [threading.Thread(target=client, args=(n,), daemon=True) for n in range(CLIENTS)]
        for thread in clients:
            thread.start()
        added = []
        for n in range(ADDED):
            added.append(make_image(added_dir / f"added{n:03d}.png", "magenta" if n % 2 else "cyan", noise=1000 + n).name)
            time.sleep(0.1)
            if n == ADDED // 2:
                # A label edit from the web UI waits for the watcher's batch to release the writer lock.
                status, answer = call(server.url + "api/labels", {"set": "colours", "label": "magenta",
                                                                  "prompts": ["a magenta photo"]})
                assert status == 201 and answer["created"], answer

        # Every added photo becomes searchable in every worker: ask several at once, each answer must hold all.
        deadline = time.monotonic() + 30
        while True:
            answers = concurrently(lambda: served_names(server.url, added_dir), 3 * WORKERS)
            if all(answer == set(added) for answer in answers):
                break
            assert time.monotonic() < deadline, f"still missing: {sorted(set(added) - min(answers, key=len))[:10]}"
            time.sleep(0.5)
        done.set()
        for thread in clients:
            thread.join(30)

        assert not errors, errors[:10]
        assert sum(counts) >= CLIENTS * 5
        pids = {pid for pid, _ in server.access}
        assert len(pids) >= 2, "the requests were not spread over several workers"
        assert {status for _, status in server.access} <= {"200", "201", "303"}

        assert server.stop() == 0
        assert not server_link.server_file(settings.data_dir).exists()  # the master withdrew its announcement
    finally:
        if server is not None:
            server.stop()
        watcher.send_signal(signal.SIGTERM)
        try:
            watcher.wait(30)
        finally:
            watcher.kill()
    # The watcher saved the vector file last: whole, current, and holding every photo.
    library = Library(settings)
    try:
        store = VectorStore.load(library.vector_store_path)
        assert store.generation == library.catalog.generation()
        assert store.count == library.catalog.counts()["embeddings"] == len(photo_library) + ADDED
    finally:
        library.close()


def test_gunicorn_conf_refuses_a_public_address_without_a_token(settings, tmp_path):
    args = ["-c", "python:clipsearch.webui.gunicorn_conf", "-b", "0.0.0.0:0", "clipsearch.webui.wsgi:create_app_from_env()"]
    env = {**cli_env(settings), "XDG_RUNTIME_DIR": str(tmp_path)}
    refused = subprocess.run([sys.executable, "-c", GUNICORN, *args], env=env, cwd=tmp_path, capture_output=True,
                             text=True, timeout=60)
    assert refused.returncode != 0 and "access token" in refused.stderr and "--insecure" in refused.stderr
    assert not server_link.server_file(settings.data_dir).exists()
