"""Search latency through the JSON API, end to end (run by hand, not a test): one JSON object to stdout, logs to stderr.

For each model x library size it builds a synthetic library in a temporary folder without decoding any image
(N catalog rows with fake paths /bench/photos/<year>/<month>/IMG_xxxxxx.<ext>, varied dates, sizes and formats,
and N clustered random unit vectors tagged with the model's id), opens the vector store as `clipsearch serve`
does before its first query and waits for the approximate index the server builds in the background (exact
below 40k vectors, IVF-SQ8 above: store.IVF_THRESHOLD; open_s and ready_s report both), starts the real
Flask app under waitress on 127.0.0.1 (a free port, --threads worker threads) in a background thread, warms it up,
then times, one request at a time over one keep-alive connection (http.client), round robin so that every case
sees the same machine load:
  search        GET /api/search?q=...&k=20                     text query, ranked by relevance
  newest        ... &sort=newest                               adaptive cutoff + range search + date sort
  newest_loose  ... &sort=newest&relevance=1                   a loose cutoff: thousands of relevant results
                                                               to date-sort (random weights leave few at 3)
  type_jpeg     ... &type=JPEG                                 format filter (about 3/4 of the library)
  folder        ... &folder=/bench/photos/2021                 folder filter (about 1/10 of the library)
  similar       GET /api/similar/<id>?k=20                     "more like this": no text encoding
and beside them, in the same process and the same loop:
  encode        encoder.encode_texts([q]) alone, with the same queries
  *.inprocess   the same search through Searcher.run (parse_search / similar_request, exactly what the API
                calls), without HTTP, Flask and JSON: api p50 - inprocess p50 is the HTTP/Flask overhead
Each case reports p50/p95/mean ms; text cases also api_p50 / encode_p50 (how much of a search is the model)
and the API's own timings_ms (embed/search/fetch) medians. Then a load phase: --concurrency clients at once,
mixed cases, reporting requests/s against one client's, latencies, non-200 answers, log warnings (e.g.
waitress queue depth) and answers whose result ids differ from the same request made alone (thread-safety check).

Weights are random (pretrained none, seeded), so results are meaningless but every cost is the real one.
Machines are shared and noisy: compare cases within one run (ratios), not absolute figures across runs.

    python bench/api_latency.py                                          # ViT-B-32 and clipsearch-tiny x 10k, 100k
    python bench/api_latency.py --models clipsearch-tiny --sizes 10000 --requests 50   # quick
Writes the JSON to bench/results/api_latency-<timestamp>.json as well (or --out FILE).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import sys
import tempfile
import threading
import time
from collections import Counter
from datetime import datetime, timedelta, timezone
from http.client import HTTPConnection, HTTPException
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from urllib.parse import urlencode

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never download weights

import numpy as np  # noqa: E402
from sqlalchemy import insert  # noqa: E402

from clipsearch.catalog import STATUS_OK, Catalog, EmbeddingRow, ImageRow, RootRow, vector_to_blob  # noqa: E402
from clipsearch.config import Settings  # noqa: E402
from clipsearch.encoders import EncoderSpec, load_encoder, model_id_for  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from query_latency import clustered, load_average, peak_rss_mb  # noqa: E402
from report import RESULTS_DIR, save_report  # noqa: E402

log = logging.getLogger("bench.api_latency")

CASES = ("search", "newest", "newest_loose", "type_jpeg", "folder", "similar")  # see make_cases
ROOT = "/bench/photos"
FOLDER_FILTER = f"{ROOT}/2021"
YEARS = list(range(2015, 2025))  # ten year folders: the folder filter keeps about a tenth
FORMATS = (("JPEG", ".jpg", 0.74), ("HEIF", ".heic", 0.13), ("PNG", ".png", 0.08), ("WEBP", ".webp", 0.05))
SHAPES = ((4032, 3024), (3024, 4032), (4000, 3000), (1920, 1080), (1080, 1920), (2048, 1536))

# What people type into a photo search box: short and long, objects, scenes, events.
QUERIES = (
    "dog", "a dog on the beach", "sunset over the sea", "birthday cake with candles", "kids playing in the snow",
    "red car parked on a street", "mountains", "a cat sleeping on a sofa", "wedding", "people dancing at a party",
    "eiffel tower", "plate of pasta", "christmas tree with presents", "a baby laughing", "waterfall in a forest",
    "city skyline at night", "screenshot", "receipt", "a group photo of friends at a restaurant", "fireworks",
    "a boat on a lake with mountains in the background", "breakfast", "my passport", "snowy street in winter",
    "hiking trail", "a horse in a field", "old black and white photo of my grandparents", "swimming pool",
    "flowers in a garden", "a bicycle leaning against a wall", "concert crowd with stage lights", "desert",
    "graduation ceremony", "a person holding an umbrella in the rain", "whiteboard with notes", "beach volleyball",
    "autumn leaves", "a bowl of ramen", "airplane wing view from the window", "selfie",
)


# --- synthetic library ------------------------------------------------------------------------------
def build_library(data_dir: Path, n: int, model: str, pretrained: str, dim: int, seed: int = 0) -> dict:
    """A catalog of n indexed images with vectors of `dim` dimensions, written in one transaction; no image files."""
    started = time.perf_counter()
    rng = np.random.default_rng(seed)
    vectors = clustered(n, dim, clusters=max(10, min(1000, n // 100)), seed=seed)
    model_id = model_id_for(model, pretrained)
    generated = time.perf_counter()

    year_index = rng.integers(0, len(YEARS), n)
    seconds_in_year = rng.integers(0, 365 * 86400, n)
    has_exif = rng.random(n) < 0.8  # the rest are dated by file time (screenshots, downloads, edits)
    format_index = rng.choice(len(FORMATS), n, p=[f[2] for f in FORMATS])
    shape_index = rng.integers(0, len(SHAPES), n)
    sizes = np.clip(rng.lognormal(np.log(3.0e6), 0.5, n), 50_000, 40e6).astype(np.int64)
    mtime_lag = rng.integers(0, 30 * 86400, n)  # copied to the computer some days later
    now = datetime.now(timezone.utc).replace(tzinfo=None)
    images, embeddings = [], []
    for i in range(n):
        image_id = i + 1
        taken = datetime(YEARS[year_index[i]], 1, 1) + timedelta(seconds=int(seconds_in_year[i]))
        fmt, ext, _ = FORMATS[format_index[i]]
        width, height = SHAPES[shape_index[i]]
        mtime = taken + timedelta(seconds=int(mtime_lag[i]))
        images.append({
            "id": image_id,
            "path": f"{ROOT}/{taken.year}/{taken.month:02d}/IMG_{image_id:06d}{ext}",
            "root": ROOT,
            "size": int(sizes[i]),
            "mtime_ns": int(mtime.replace(tzinfo=timezone.utc).timestamp()) * 1_000_000_000,
            "content_hash": f"{image_id:032x}",
            "width": width,
            "height": height,
            "format": fmt,
            "taken_at": taken if has_exif[i] else None,
            "status": STATUS_OK,
            "error": None,
            "indexed_at": now,
            "updated_at": now,
        })
        embeddings.append({"image_id": image_id, "model": model_id, "vector": vector_to_blob(vectors[i])})
    del vectors
    rows_made = time.perf_counter()

    catalog = Catalog(data_dir / "catalog.sqlite3")
    try:
        with catalog.write() as session:
            session.execute(insert(RootRow), [{"path": ROOT, "added_at": now, "last_indexed_at": now}])
            for start in range(0, n, 20_000):
                session.execute(insert(ImageRow), images[start : start + 20_000])
                session.execute(insert(EmbeddingRow), embeddings[start : start + 20_000])
            catalog.set_library_model(session, model_id, model, pretrained, dim)
        counts = catalog.counts()
    finally:
        catalog.close()
    finished = time.perf_counter()
    if counts["embeddings"] != n:
        raise RuntimeError(f"synthetic library holds {counts['embeddings']} embeddings, expected {n}")
    return {
        "images": n, "model_id": model_id, "dim": dim,
        "generate_s": round(generated - started, 2), "rows_s": round(rows_made - generated, 2),
        "insert_s": round(finished - rows_made, 2), "total_s": round(finished - started, 2),
        "catalog_mb": round((data_dir / "catalog.sqlite3").stat().st_size / 1e6, 1),
    }


# --- server -------------------------------------------------------------------------------------------
class BackgroundServer:
    """The app under waitress on 127.0.0.1:<free port>, served from a daemon thread."""

    def __init__(self, app, threads: int):
        from waitress import create_server

        self.server = create_server(app, host="127.0.0.1", port=0, threads=threads, ident="clipsearch")
        self.port = int(self.server.effective_port)
        self.thread = threading.Thread(target=self.server.run, name="bench-waitress", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        server = self.server

        def close_all() -> None:  # runs in the server's loop thread: no socket map changes under its feet
            server.close()  # the listening socket and the trigger
            for channel in list(server._map.values()):  # connections still open
                channel.handle_close()

        server.task_dispatcher.shutdown(timeout=10)  # first: a finishing task still pulls the trigger
        server.trigger.pull_trigger(close_all)  # with no sockets left the loop returns
        self.thread.join(10)


class Client:
    """One keep-alive HTTP/1.1 connection; reconnects after a connection error (which it reports as status 0)."""

    def __init__(self, port: int):
        self.port = port
        self.conn = HTTPConnection("127.0.0.1", port, timeout=120)

    def get(self, path: str) -> tuple[int, bytes, float]:
        started = time.perf_counter()
        try:
            self.conn.request("GET", path)
            response = self.conn.getresponse()
            body = response.read()
            status = response.status
        except (OSError, HTTPException) as e:
            self.conn.close()
            self.conn = HTTPConnection("127.0.0.1", self.port, timeout=120)
            return 0, repr(e).encode(), time.perf_counter() - started
        return status, body, time.perf_counter() - started

    def close(self) -> None:
        self.conn.close()


class LogCounter(logging.Handler):
    """Counts warnings and errors logged by the app and waitress (queue depth, 500s...) and keeps a few."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.counts: Counter = Counter()
        self.examples: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.name.startswith("bench") or "RANDOM weights" in record.getMessage():
            return
        self.counts[f"{record.name}:{record.levelname}"] += 1
        if len(self.examples) < 5:
            self.examples.append(f"{record.name}: {record.getMessage()[:300]}")

    def take(self) -> dict:
        out = {"counts": dict(self.counts), "examples": list(self.examples)}
        self.counts.clear()
        self.examples.clear()
        return out


# --- measuring ----------------------------------------------------------------------------------------
def ms_stats(seconds: list[float]) -> dict:
    arr = np.asarray(seconds or [np.nan], dtype=np.float64) * 1e3
    return {"n": len(seconds), "p50_ms": round(float(np.percentile(arr, 50)), 2),
            "p95_ms": round(float(np.percentile(arr, 95)), 2), "mean_ms": round(float(arr.mean()), 2)}


def make_cases(svc, k: int, n: int, requests: int, seed: int) -> dict:
    """name -> (api path of request i, in-process call of request i, text query of request i or None)."""
    from clipsearch.webui.forms import parse_search
    from clipsearch.webui.views import similar_request

    similar_ids = np.random.default_rng(seed).integers(1, n + 1, max(requests, 1))

    def query(i: int) -> str:
        return QUERIES[i % len(QUERIES)]

    def text_case(extra: dict):
        def api(i):
            return "/api/search?" + urlencode({"q": query(i), "k": k, **extra})

        def inprocess(i):
            return svc.searcher.run(parse_search({"q": query(i), "k": str(k), **extra}, svc, k).request)

        return api, inprocess, query

    return {
        "search": text_case({}),
        "newest": text_case({"sort": "newest"}),
        "newest_loose": text_case({"sort": "newest", "relevance": "1"}),
        "type_jpeg": text_case({"type": "JPEG"}),
        "folder": text_case({"folder": FOLDER_FILTER}),
        "similar": (
            lambda i: f"/api/similar/{int(similar_ids[i % len(similar_ids)])}?k={k}",
            lambda i: svc.searcher.run(similar_request(svc, int(similar_ids[i % len(similar_ids)]), k)),
            None,
        ),
    }


def answer_of(body: bytes) -> dict:
    data = json.loads(body)
    return {"ids": [hit["id"] for hit in data["results"]], "scores": [hit["score"] for hit in data["results"]],
            "total": data.get("total"), "relevant": data.get("relevant"), "timings_ms": data.get("timings_ms", {})}


def same_answer(a: dict, b: dict) -> str:
    """'same', 'float_noise' (order of near-ties differs by < 1e-4 in score) or 'different'."""
    if a["ids"] == b["ids"]:
        return "same"
    if len(a["scores"]) == len(b["scores"]) and a["scores"] and \
            max(abs(x - y) for x, y in zip(a["scores"], b["scores"])) < 1e-4:
        return "float_noise"
    return "different"


def measure_sequential(client: Client, encoder, cases: dict, requests: int) -> tuple[dict, dict]:
    """Round robin over every case, one request at a time: (report per case, answers by (case, i))."""
    times: dict[str, list[float]] = {"encode": []}
    for name in cases:
        times[name] = []
        times[f"{name}.inprocess"] = []
    statuses: dict[str, Counter] = {name: Counter() for name in cases}
    errors: list[str] = []
    server_timings: dict[str, dict[str, list[float]]] = {name: {} for name in cases}
    counts: dict[str, dict[str, list[int]]] = {name: {"total": [], "relevant": [], "hits": []} for name in cases}
    answers: dict[tuple[str, int], dict] = {}
    mismatch_inprocess: Counter = Counter()
    for i in range(requests):
        started = time.perf_counter()
        encoder.encode_texts([QUERIES[i % len(QUERIES)]])
        times["encode"].append(time.perf_counter() - started)
        for name, (api, inprocess, _) in cases.items():
            status, body, seconds = client.get(api(i))
            times[name].append(seconds)
            statuses[name][status] += 1
            started = time.perf_counter()
            result = inprocess(i)
            times[f"{name}.inprocess"].append(time.perf_counter() - started)
            if status != 200:
                if len(errors) < 5:
                    errors.append(f"{name} {api(i)} -> {status}: {body[:300]!r}")
                continue
            answer = answers[(name, i)] = answer_of(body)
            for key, value in answer["timings_ms"].items():
                server_timings[name].setdefault(key, []).append(value)
            counts[name]["total"].append(answer["total"])
            counts[name]["hits"].append(len(answer["ids"]))
            if answer["relevant"] is not None:
                counts[name]["relevant"].append(answer["relevant"])
            local = {"ids": [h.id for h in result.hits], "scores": [round(float(h.score), 6) for h in result.hits]}
            verdict = same_answer(answer, local)
            if verdict != "same":
                mismatch_inprocess[f"{name}:{verdict}"] += 1
    encode = ms_stats(times["encode"])
    report: dict = {"encode": encode}
    for name, (_, _, text) in cases.items():
        api, local = ms_stats(times[name]), ms_stats(times[f"{name}.inprocess"])
        entry = {
            "api": api,
            "inprocess": local,
            "http_overhead_p50_ms": round(api["p50_ms"] - local["p50_ms"], 2),
            "api_over_encode_p50": round(api["p50_ms"] / encode["p50_ms"], 2) if text else None,
            "server_timings_p50_ms": {key: round(float(np.median(v)), 2) for key, v in server_timings[name].items()},
            "statuses": {str(s): c for s, c in statuses[name].items()},
            "hits_p50": int(np.median(counts[name]["hits"])) if counts[name]["hits"] else None,
            "total_p50": int(np.median(counts[name]["total"])) if counts[name]["total"] else None,
        }
        if counts[name]["relevant"]:
            relevant = counts[name]["relevant"]
            entry["relevant_p50"] = int(np.median(relevant))
            entry["relevant_max"] = int(np.max(relevant))
        report[name] = entry
    report["api_vs_inprocess_mismatches"] = dict(mismatch_inprocess)
    report["errors"] = errors
    return report, answers


def measure_load(port: int, cases: dict, answers: dict, concurrency: int, total: int, known: int) -> dict:
    """`concurrency` clients sending mixed cases at once; answers checked against the `known` sequential ones."""
    names = list(cases)
    per_client = max(1, total // concurrency)
    results: list[list[tuple[str, int, int, float, bytes]]] = [[] for _ in range(concurrency)]
    barrier = threading.Barrier(concurrency + 1)

    def worker(c: int) -> None:
        client = Client(port)
        barrier.wait()
        for j in range(per_client):
            name = names[(c + j) % len(names)]
            i = (c * 7 + j) % max(1, known)  # requests also made alone, so their answers can be compared
            status, body, seconds = client.get(cases[name][0](i))
            results[c].append((name, i, status, seconds, body))
        client.close()

    threads = [threading.Thread(target=worker, args=(c,), daemon=True) for c in range(concurrency)]
    for t in threads:
        t.start()
    barrier.wait()
    started = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    flat = [r for rs in results for r in rs]
    statuses = Counter(r[2] for r in flat)
    verdicts: Counter = Counter()
    examples = []
    for name, i, status, _, body in flat:
        if status != 200:
            if len(examples) < 5:
                examples.append(f"{name} #{i} -> {status}: {body[:300]!r}")
            continue
        known = answers.get((name, i))
        if known is None:
            verdicts["unchecked"] += 1
            continue
        verdict = same_answer(answer_of(body), known)
        verdicts[verdict] += 1
        if verdict == "different" and len(examples) < 5:
            examples.append(f"{name} #{i}: ids {answer_of(body)['ids'][:5]}... alone {known['ids'][:5]}...")
    by_case = {name: ms_stats([r[3] for r in flat if r[0] == name]) for name in names}
    return {
        "concurrency": concurrency, "requests": len(flat), "wall_s": round(wall, 2),
        "requests_per_s": round(len(flat) / wall, 2), "all": ms_stats([r[3] for r in flat]), "by_case": by_case,
        "statuses": {str(s): c for s, c in statuses.items()}, "answers_vs_alone": dict(verdicts), "examples": examples,
    }


def measure_config(model: str, pretrained: str, n: int, encoder, args, logs: LogCounter) -> dict:
    from clipsearch.webui.app import create_app
    from clipsearch.webui.services import EXTENSION_KEY

    result: dict = {"model": model, "pretrained": pretrained, "size": n, "load_average_before": load_average()}
    scratch = Path(tempfile.mkdtemp(prefix="clipsearch-bench-api-"))
    try:
        log.info("%s x %d: building the synthetic library", model, n)
        result["library"] = build_library(scratch, n, model, pretrained, encoder.dim, seed=args.seed)
        log.info("%s x %d: library %s", model, n, result["library"])
        settings = Settings(data_dir=scratch, model=model, pretrained=pretrained, device=args.device,
                            precision=args.precision, top_k=args.k,
                            explicit=frozenset({"data_dir", "model", "pretrained", "device", "precision", "top_k"}))
        app = create_app(settings, encoder)
        svc = app.extensions[EXTENSION_KEY]
        started = time.perf_counter()
        store = svc.searcher.store()  # what `clipsearch serve` does before it listens: build the index from the catalog
        opened = time.perf_counter()
        first_kind = store.kind
        # The server answers at once with an exact index and builds an approximate one (IVF past 40k vectors) in
        # the background: wait for it, so that what is timed is the index the library runs on, on idle cores.
        if not store.wait_for_rebuild(timeout=1800):
            raise RuntimeError("the vector index was still being rebuilt after 30 minutes")
        result["store"] = {"open_s": round(opened - started, 2), "first_kind": first_kind,
                           "ready_s": round(time.perf_counter() - started, 2), "kind": store.kind,
                           "params": store.params, "count": store.count}
        log.info("%s x %d: vector store %s", model, n, result["store"])
        server = BackgroundServer(app, args.threads)
        client = Client(server.port)
        cases = make_cases(svc, args.k, n, args.requests, args.seed)
        try:
            for i in range(args.warmup):  # first calls pay lazy set-up: sample for cutoffs, SQL statement caches
                for name, (api, inprocess, _) in cases.items():
                    status, body, _ = client.get(api(i))
                    if status != 200:
                        raise RuntimeError(f"warm-up {name} {api(i)} answered {status}: {body[:500]!r}")
                    inprocess(i)
            logs.take()
            log.info("%s x %d: timing %d requests per case (port %d)", model, n, args.requests, server.port)
            sequential, answers = measure_sequential(client, encoder, cases, args.requests)
            result.update(sequential)
            result["log_warnings_sequential"] = logs.take()
            if args.concurrency > 1:
                log.info("%s x %d: load, %d clients", model, n, args.concurrency)
                load = measure_load(server.port, cases, answers, args.concurrency, args.load_requests or args.requests,
                                    args.requests)
                one_client = 1e3 / np.mean([result[name]["api"]["mean_ms"] for name in cases])
                load["one_client_requests_per_s"] = round(float(one_client), 2)
                load["throughput_ratio"] = round(load["requests_per_s"] / one_client, 2)
                load["log_warnings"] = logs.take()
                result["load"] = load
        finally:
            client.close()
            server.stop()
            svc.close()
        result["load_average_after"] = load_average()
        result["peak_rss_mb"] = peak_rss_mb()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return result


def table(configs: list[dict]) -> list[dict]:
    """One flat row per (model, size, case): the figures a closing note quotes."""
    rows = []
    for c in configs:
        if "error" in c:
            continue
        for name in CASES:
            e = c[name]
            rows.append({"model": c["model"], "size": c["size"], "case": name,
                         "api_p50_ms": e["api"]["p50_ms"], "api_p95_ms": e["api"]["p95_ms"],
                         "inprocess_p50_ms": e["inprocess"]["p50_ms"], "inprocess_p95_ms": e["inprocess"]["p95_ms"],
                         "http_overhead_p50_ms": e["http_overhead_p50_ms"],
                         "encode_p50_ms": c["encode"]["p50_ms"], "encode_p95_ms": c["encode"]["p95_ms"],
                         "api_over_encode_p50": e["api_over_encode_p50"]})
    return rows


def format_table(rows: list[dict]) -> str:
    head = f"{'model':<16}{'size':>8} {'case':<13}{'api p50':>9}{'p95':>8}{'inproc p50':>11}{'p95':>8}" \
           f"{'http':>7}{'encode p50':>11}{'p95':>8}{'api/enc':>8}"
    lines = [head]
    for r in rows:
        ratio = "" if r["api_over_encode_p50"] is None else f"{r['api_over_encode_p50']:.2f}"
        lines.append(f"{r['model']:<16}{r['size']:>8} {r['case']:<13}{r['api_p50_ms']:>9.2f}{r['api_p95_ms']:>8.2f}"
                     f"{r['inprocess_p50_ms']:>11.2f}{r['inprocess_p95_ms']:>8.2f}{r['http_overhead_p50_ms']:>7.2f}"
                     f"{r['encode_p50_ms']:>11.2f}{r['encode_p95_ms']:>8.2f}{ratio:>8}")
    return "\n".join(lines)


def pkg_version(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--models", default="ViT-B-32,clipsearch-tiny", help="comma-separated open_clip model names")
    p.add_argument("--pretrained", default="none", help="weights for every model (none: seeded random)")
    p.add_argument("--sizes", default="10000,100000", help="comma-separated library sizes")
    p.add_argument("--requests", type=int, default=200, help="timed requests per case")
    p.add_argument("--warmup", type=int, default=3, help="untimed requests per case first")
    p.add_argument("--k", type=int, default=20, help="results per request")
    p.add_argument("--threads", type=int, default=4, help="waitress worker threads")
    p.add_argument("--concurrency", type=int, default=4, help="clients at once in the load phase (1: skip it)")
    p.add_argument("--load-requests", type=int, help="requests in the load phase, all clients together (default --requests)")
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, help=f"write the JSON here (default {RESULTS_DIR}/api_latency-<timestamp>.json)")
    args = p.parse_args()
    # Warnings of every library (waitress queue depth, the app's 500s...) are shown and counted; info only of this bench.
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="[bench] %(name)s: %(message)s")
    log.setLevel(logging.INFO)
    logs = LogCounter()
    logging.getLogger().addHandler(logs)

    import faiss
    import torch

    started_at = datetime.now(timezone.utc)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    sizes = [int(s.replace("_", "")) for s in args.sizes.split(",") if s.strip()]
    configs, encoders = [], {}
    for model in models:
        started = time.perf_counter()
        encoder = load_encoder(EncoderSpec(model, args.pretrained, args.device, args.precision))
        encoder.warm_up()
        encoders[model] = {"model_id": encoder.model_id, "dim": encoder.dim, "device": encoder.device,
                           "precision": getattr(encoder, "precision", args.precision),
                           "text_truncation": getattr(encoder, "text_truncation", None),
                           "load_s": round(time.perf_counter() - started, 2)}
        log.info("loaded %s", encoders[model])
        for n in sizes:
            try:
                configs.append(measure_config(model, args.pretrained, n, encoder, args, logs))
            except Exception as e:  # the other configurations are still worth reporting
                log.exception("%s x %d failed", model, n)
                configs.append({"model": model, "size": n, "error": repr(e)})
        del encoder

    rows = table(configs)
    report = {
        "timestamp": started_at.isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(),
                    "torch_threads": torch.get_num_threads(), "faiss_omp_threads": faiss.omp_get_max_threads()},
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "open_clip": pkg_version("open_clip_torch"), "faiss": pkg_version("faiss-cpu") or faiss.__version__,
                     "numpy": np.__version__, "flask": pkg_version("flask"), "waitress": pkg_version("waitress"),
                     "sqlalchemy": pkg_version("sqlalchemy")},
        "settings": {"requests": args.requests, "warmup": args.warmup, "k": args.k, "threads": args.threads,
                     "concurrency": args.concurrency, "queries": len(QUERIES), "folder_filter": FOLDER_FILTER},
        "encoders": encoders,
        "table": rows,
        "configs": configs,
        "peak_rss_mb": peak_rss_mb(),
        "argv": sys.argv[1:],
    }
    out = save_report("api_latency", report, started_at, args.out)
    log.info("written to %s\n%s", out, format_table(rows))


if __name__ == "__main__":
    main()
