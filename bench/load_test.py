"""Load test of several server processes over one library (run by hand, not a test): one JSON object to stdout.

The deployment the README documents for several server processes, on 127.0.0.1 only:
  gunicorn -c python:clipsearch.webui.gunicorn_conf -w WORKERS 'clipsearch.webui.wsgi:create_app_from_env()'
  clipsearch watch                                  (one separate process: the library's single writer)
A library of --initial photos is indexed first; then --clients threads issue text searches (GET /api/search,
a fifth of them sorted by date) for --duration seconds while --files new photos are written into a watched
folder at an even pace over the first three quarters of it. Reported: requests, errors (any non-200 answer or
failed connection, and worker timeouts or restarts in gunicorn's log: zero is required), requests/s, latency
p50/p95/p99/max, and the time from the last photo written until every added photo is returned by a search
restricted to their folder, confirmed by 2 x WORKERS concurrent searches (so every worker is asked). At the end
the vector file the watcher saved must load cleanly and match the catalog.

Photos are 1600x1200 JPEGs (bench/watch_latency.py's). The model is the tiny open_clip config with random
weights (every cost real, results meaningless), or `--model fake` (the tests' colour encoder).

    python bench/load_test.py                         # 4 workers, 20 clients, 60 s, 500 files
    python bench/load_test.py --duration 10 --files 60 --clients 8 --workers 2 --model fake   # quick
    python bench/load_test.py --server serve          # the same load on one `clipsearch serve` (waitress, 8 threads)
Writes the JSON to bench/results/load_test-<timestamp>.json as well (or --out FILE).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import queue
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from datetime import datetime, timezone
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never download weights

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
sys.path.insert(0, str(REPO))

from clipsearch import server_link  # noqa: E402
from clipsearch.config import hide_password, load_settings  # noqa: E402
from clipsearch.library import Library  # noqa: E402
from clipsearch.store import VectorStore  # noqa: E402
from report import save_report  # noqa: E402
from watch_latency import photo_bytes  # noqa: E402

log = logging.getLogger("bench")
NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback only, whatever the environment says
QUERIES = ["a dog on the beach", "sunset over the sea", "red car", "snowy mountains", "birthday party", "city at night",
           "a cat asleep", "flowers in a garden", "a boat on a lake", "people dancing", "forest path", "breakfast"]
FAKE = "from tests.fakes import register_fake_encoder; register_fake_encoder(); "


class Process:
    """A subprocess whose output lines are collected by threads."""

    def __init__(self, argv: list[str], env: dict[str, str], cwd: Path):
        self.argv = argv
        self.popen = subprocess.Popen(argv, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.out: list[str] = []
        self.err: list[str] = []
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._pump, args=(self.popen.stdout, self.out), daemon=True).start()
        threading.Thread(target=self._pump, args=(self.popen.stderr, self.err), daemon=True).start()

    def _pump(self, stream, kept: list[str]) -> None:
        for line in stream:
            kept.append(line)
            self.lines.put(line)

    def wait_for(self, test, what: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not test():
            if self.popen.poll() is not None:
                raise RuntimeError(f"{what}: the process exited with {self.popen.returncode}: {''.join(self.err[-20:])}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{what}: timed out; {''.join(self.err[-20:])}")
            time.sleep(0.1)

    def stop(self, timeout: float = 60) -> int:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        return self.popen.returncode


def command(args, *argv: str, program: str) -> list[str]:
    """The command line of `clipsearch ...` or `gunicorn ...` (with the fake encoder registered first for --model fake)."""
    if args.model != "fake":
        return [sys.executable, "-m", program, *argv]
    run = "from clipsearch.cli import run; run(sys.argv[1:])" if program == "clipsearch" else \
        "from gunicorn.app.wsgiapp import run; sys.argv[0] = 'gunicorn'; run()"
    return [sys.executable, "-c", f"import sys; sys.path.insert(0, {str(REPO)!r}); {FAKE}{run}", *argv]


def get(url: str, timeout: float = 60) -> tuple[int, bytes]:
    try:
        with NO_PROXY.open(url, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def served_paths(base: str, folder: Path, expected: int) -> set[str]:
    """Paths a search restricted to `folder` returns, all pages."""
    paths: set[str] = set()
    offset = 0
    while True:
        query = urllib.parse.urlencode({"q": "a photo", "k": 500, "offset": offset, "folder": str(folder)})
        status, body = get(f"{base}api/search?{query}")
        if status != 200:
            raise RuntimeError(f"folder search answered {status}: {body[:200]!r}")
        results = json.loads(body)["results"]
        paths.update(hit["path"] for hit in results)
        offset += len(results)
        if len(results) < 500 or offset >= expected:
            return paths


def all_workers_serve(base: str, folder: Path, wanted: set[str], asks: int) -> bool:
    """Whether `asks` concurrent folder searches (spread over the workers) all return every wanted path."""
    answers: list[bool] = []
    threads = [threading.Thread(target=lambda: answers.append(wanted <= served_paths(base, folder, len(wanted))))
               for _ in range(asks)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return len(answers) == asks and all(answers)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def run_load(args, base: str, added_dir: Path, photos: list[bytes]) -> dict:
    """Clients searching for args.duration seconds while the photos are written; figures and the searchable delay."""
    records: list[tuple[float, int]] = []  # (latency s, status; 0 = no answer)
    failures: list[str] = []
    stop = threading.Event()

    def client(n: int) -> None:
        i = n
        while not stop.is_set():
            params = {"q": QUERIES[i % len(QUERIES)], "k": 20}
            if i % 5 == 0:
                params["sort"] = "newest"
            i += 1
            started = time.perf_counter()
            try:
                status, body = get(f"{base}api/search?{urllib.parse.urlencode(params)}")
            except OSError as e:
                status, body = 0, str(e).encode()
            records.append((time.perf_counter() - started, status))
            if status != 200 and len(failures) < 20:
                failures.append(f"{status}: {body[:200]!r}")

    wanted: set[str] = set()
    written_at: list[float] = []
    searchable: dict[str, float] = {}

    def writer() -> None:
        span = args.duration * 0.75
        start = time.monotonic()
        for n, data in enumerate(photos):
            time.sleep(max(0.0, start + span * n / len(photos) - time.monotonic()))
            path = added_dir / f"{n // 100:02d}" / f"added_{n:05d}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".part")  # written whole, then renamed in: as a camera import or rsync does
            tmp.write_bytes(data)
            os.replace(tmp, path)
            wanted.add(str(path))
        written_at.append(time.monotonic())
        while not searchable and time.monotonic() - written_at[0] < args.timeout:
            try:
                if wanted <= served_paths(base, added_dir, len(wanted)):
                    searchable["at"] = time.monotonic()
                    return
            except (OSError, RuntimeError) as e:
                log.warning("searchable check failed: %s", e)
            time.sleep(0.25)

    clients = [threading.Thread(target=client, args=(n,), daemon=True) for n in range(args.clients)]
    write_thread = threading.Thread(target=writer, daemon=True)
    started = time.monotonic()
    for thread in clients:
        thread.start()
    write_thread.start()
    stop.wait(args.duration)
    stop.set()
    for thread in clients:
        thread.join(120)
    elapsed = time.monotonic() - started
    write_thread.join(args.timeout)
    confirmed = bool(searchable) and all_workers_serve(base, added_dir, wanted, 2 * (args.workers if args.server == "gunicorn" else 1))
    latencies = [latency * 1000 for latency, _ in records]
    errors = sum(1 for _, status in records if status != 200)
    return {
        "requests": len(records),
        "errors": errors,
        "error_samples": failures,
        "requests_per_s": round(len(records) / elapsed, 1),
        "latency_ms": {"p50": round(percentile(latencies, 50), 1), "p95": round(percentile(latencies, 95), 1),
                       "p99": round(percentile(latencies, 99), 1), "mean": round(statistics.fmean(latencies), 1),
                       "max": round(max(latencies), 1)} if latencies else None,
        "files_written": len(wanted),
        "write_rate_per_s": round(len(photos) / (args.duration * 0.75), 1),
        "searchable_after_last_write_s": round(searchable["at"] - written_at[0], 2) if searchable else None,
        "every_added_file_searchable": confirmed,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--server", choices=("gunicorn", "serve"), default="gunicorn",
                   help="gunicorn workers, or one `clipsearch serve` process (for comparison)")
    p.add_argument("--workers", type=int, default=4, help="gunicorn worker processes")
    p.add_argument("--worker-class", default="sync", help="gunicorn worker class (sync, gthread)")
    p.add_argument("--threads", type=int, help="threads per worker (gthread; default 1) or of serve (default 8)")
    p.add_argument("--clients", type=int, default=20, help="concurrent search clients")
    p.add_argument("--duration", type=float, default=60, help="seconds of searching")
    p.add_argument("--files", type=int, default=500, help="photos added while the clients search")
    p.add_argument("--initial", type=int, default=200, help="photos indexed before the test")
    p.add_argument("--model", default="clipsearch-tiny", help="open_clip model, or `fake` for the tests' colour encoder")
    p.add_argument("--pretrained", default="none")
    p.add_argument("--settle", type=float, default=0.5, help="watch_settle_seconds of the watcher")
    p.add_argument("--timeout", type=float, default=300, help="seconds to wait for the added photos to be searchable")
    p.add_argument("--db", help="catalog database URL, an empty PostgreSQL database (createdb NAME) shared by the watcher "
                   "and the workers; default: SQLite in the scratch library folder")
    p.add_argument("--out", type=Path, help="write the JSON here instead of bench/results/")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="[bench] %(message)s", stream=sys.stderr)
    logging.getLogger("clipsearch").setLevel(logging.WARNING)
    started_at = datetime.now(timezone.utc)

    with tempfile.TemporaryDirectory(prefix="clipsearch-bench-load-") as scratch:
        scratch = Path(scratch)
        root = scratch / "photos"
        env = {k: v for k, v in os.environ.items() if not k.startswith("CLIPSEARCH_")}
        env.update(CLIPSEARCH_DATA_DIR=str(scratch / "library"), CLIPSEARCH_MODEL_CACHE_DIR=str(scratch / "models"),
                   CLIPSEARCH_MODEL="test-colors" if args.model == "fake" else args.model,
                   CLIPSEARCH_PRETRAINED="v1" if args.model == "fake" else args.pretrained,
                   CLIPSEARCH_WATCH_SETTLE_SECONDS=str(args.settle), PYTHONUNBUFFERED="1",
                   XDG_RUNTIME_DIR=str(scratch))  # gunicorn's control socket goes there (else under $HOME)
        if args.db:
            env["CLIPSEARCH_DB"] = args.db
        log.info("generating %d photos", args.initial + args.files)
        photos = photo_bytes(args.initial + args.files)
        for n, data in enumerate(photos[: args.initial]):
            path = root / "initial" / f"photo_{n:05d}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        log.info("indexing %d photos", args.initial)
        indexed = subprocess.run(command(args, "index", str(root), program="clipsearch"), env=env, cwd=scratch,
                                 capture_output=True, text=True)
        if indexed.returncode != 0:
            raise RuntimeError(f"indexing failed: {indexed.stderr}")
        watcher = Process(command(args, "watch", program="clipsearch"), env, scratch)
        server = None
        try:
            watcher.wait_for(lambda: any("caught up" in line for line in watcher.out), "watcher start", 300)
            if args.server == "gunicorn":
                server_args = ["-c", "python:clipsearch.webui.gunicorn_conf", "-w", str(args.workers), "-k", args.worker_class,
                               "--threads", str(args.threads or 1), "-b", "127.0.0.1:0",
                               "clipsearch.webui.wsgi:create_app_from_env()"]
                ready, workers = "ready:", args.workers  # each worker logs "worker PID ready: ..." (log level info)
            else:
                server_args = ["serve", "--port", "0", "--threads", str(args.threads or 8)]
                ready, workers = "serving on", 1
            server = Process(command(args, *server_args, program=args.server if args.server == "gunicorn" else "clipsearch"),
                             {**env, "CLIPSEARCH_LOG_LEVEL": "info"}, scratch)
            data_dir = scratch / "library"
            server.wait_for(lambda: (server_link.running_server(data_dir) or {}).get("pid") == server.popen.pid,
                            "server start", 120)
            base = server_link.running_server(data_dir)["url"]
            server.wait_for(lambda: sum(ready in line for line in server.err) >= workers, "server ready", 300)
            log.info("%s ready at %s; %d clients for %.0f s while %d photos are added", args.server, base,
                     args.clients, args.duration, args.files)
            load_before = [round(x, 2) for x in os.getloadavg()]
            load = run_load(args, base, root / "added", photos[args.initial :])
            load["load_average_before"] = load_before
            load["load_average_after"] = [round(x, 2) for x in os.getloadavg()]  # other work on the machine shows here
            log.info("load: %s", load)
        finally:
            server_exit = server.stop() if server is not None else None
            watcher_exit = watcher.stop()
        gunicorn_log = "".join(server.err) if server is not None else ""
        settings = load_settings({"data_dir": data_dir, "db": args.db}, env={})
        library = Library(settings)
        try:
            store = VectorStore.load(library.vector_store_path)  # raises if the file is damaged
            counts = library.catalog.counts()
            store_check = {"loads": True, "vectors": store.count, "catalog_embeddings": counts["embeddings"],
                           "generation": store.generation, "catalog_generation": library.catalog.generation(),
                           "matches_catalog": store.count == counts["embeddings"] == args.initial + args.files
                           and store.generation == library.catalog.generation()}
        finally:
            library.close()

    restarts = max(0, gunicorn_log.count("Booting worker") - args.workers) if args.server == "gunicorn" else 0
    timeouts = gunicorn_log.count("WORKER TIMEOUT")
    # What gunicorn_conf's post_fork gives each worker (unless OMP_NUM_THREADS was set): cores / workers.
    threads = os.environ.get("OMP_NUM_THREADS") or (max(1, len(os.sched_getaffinity(0)) // args.workers)
                                                    if args.server == "gunicorn" else "all cores")

    report = {
        "timestamp": started_at.isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "config": {k: (str(v) if isinstance(v, Path) else hide_password(v) if k == "db" and v else v)
                   for k, v in vars(args).items()},
        "catalog": "postgresql" if args.db else "sqlite",
        "commands": {"server": ("gunicorn " if args.server == "gunicorn" else "clipsearch ") + " ".join(server_args),
                     "watcher": "clipsearch watch"},
        "omp_threads_per_process": threads,
        **load,
        "worker_restarts": restarts,
        "worker_timeouts": timeouts,
        "server_exit": server_exit,
        "watcher_exit": watcher_exit,
        "store": store_check,
    }
    report["passed"] = (load["errors"] == 0 and not restarts and not timeouts and load["every_added_file_searchable"]
                        and store_check["matches_catalog"] and server_exit == 0 and watcher_exit == 0)
    log.info("wrote %s", save_report("load_test", report, started_at, args.out))


if __name__ == "__main__":
    main()
