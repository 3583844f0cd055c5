"""The `clipsearch` command line: the only place that prints or exits. Heavy libraries load inside commands."""

from __future__ import annotations

import atexit
import gc
import json
import sys
import time
from typing import Any, Callable

import click

from clipsearch import __version__
from clipsearch.cli_common import ENCODER_SETTINGS, INDEX_SETTINGS, LIBRARY_SETTINGS, WATCH_SETTINGS, LazyGroup, reports_errors, settings_options
from clipsearch.config import Settings, describe_settings

@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
             lazy_commands={"train": ("clipsearch.training.command:train_command",
                                      "Train or fine-tune CLIP encoders on your images and captions.")})
@click.version_option(__version__, prog_name="clipsearch")
def main() -> None:
    """Semantic photo search with CLIP: index your photos, then find them by describing them."""
    # Once torch is imported, the interpreter's last garbage collections walk its millions of objects for about
    # a second after the work is done; the process is ending, so skip them. Registered first, this runs after
    # every other exit handler; objects still close as their references drop.
    atexit.register(gc.freeze)


@main.command(short_help="Index photo folders (only what changed).")
@click.argument("folders", nargs=-1, required=True, type=click.Path(file_okay=False))
@click.option("--reembed", is_flag=True, help="Re-embed every image with the chosen model, replacing the library's vectors.")
@click.option("--distributed", is_flag=True, help="Run under torchrun: the files are shared out between the ranks "
              "(torchrun --nproc-per-node N -m clipsearch index --distributed DIR).")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@reports_errors
@settings_options(*INDEX_SETTINGS)
def index(folders: tuple[str, ...], reembed: bool, distributed: bool, as_json: bool, settings: Settings) -> None:
    """Index the photos under FOLDERS (recursively; unchanged files are skipped)."""
    from clipsearch.cli_progress import ProgressDisplay

    if distributed:
        from clipsearch.indexer.distributed import index_distributed, torchrun_environment

        is_main = torchrun_environment()[0] == 0
        display = ProgressDisplay(enabled=is_main and sys.stderr.isatty() and not as_json)
        with display:
            report = index_distributed(settings, folders, reembed=reembed, progress=display)
        if not is_main:
            return
    else:
        from clipsearch.indexer.run import index_folders

        display = ProgressDisplay(enabled=sys.stderr.isatty() and not as_json)
        with display:
            report = index_folders(settings, folders, reembed=reembed, progress=display)
    if as_json:
        click.echo(json.dumps(report.as_dict(), indent=2))
    else:
        _print_index_summary(report, settings)
    if report.interrupted:
        click.echo("stopped early: run the same command again to finish (nothing is lost)", err=True)
        sys.exit(130)


def _print_index_summary(report, settings: Settings) -> None:
    for root in report.missing_roots:
        click.secho(f"skipped {root}: not a folder (not mounted?); nothing under it was removed", fg="yellow", err=True)
    for path, reason in report.walk_errors[:20]:
        click.secho(f"cannot read {path}: {reason}", fg="yellow", err=True)
    for path, reason in report.failed[:50]:
        click.secho(f"failed {path}: {reason}", fg="yellow", err=True)
    if len(report.failed) > 50:
        click.echo(f"... and {len(report.failed) - 50} more failures: clipsearch status lists them all", err=True)
    click.echo(
        f"added {report.added}, updated {report.updated}, moved {report.moved}, removed {report.removed}, "
        f"unchanged {report.unchanged}, failed {len(report.failed)}"
        + (f" — {report.embedded} images embedded in {report.seconds:.1f} s ({report.images_per_second:.1f}/s)" if report.embedded else "")
    )
    click.echo(f"library {settings.data_dir}: {report.vectors} images searchable")


@main.command(short_help="Keep the index in step with photo folders as they change.")
@click.argument("folders", nargs=-1, type=click.Path(file_okay=False))
@reports_errors
@settings_options(*INDEX_SETTINGS, *WATCH_SETTINGS)
def watch(folders: tuple[str, ...], settings: Settings) -> None:
    """Watch FOLDERS (default: the library's folders) and index photos as they are added, changed, moved or deleted.

    Starts with a rescan that catches up with what changed while nothing watched, and rescans every
    --watch-rescan-minutes. Moved and renamed photos and folders keep their vectors. Network shares are polled.
    Ctrl+C stops cleanly; a `clipsearch index` of the same library can run between two batches.
    """
    import signal

    from clipsearch.indexer.watch import Watcher

    watcher = Watcher(settings, folders or None, on_batch=_print_watch_batch)
    signal.signal(signal.SIGTERM, lambda signum, frame: watcher.request_stop())
    interrupted = False
    try:
        watcher.start()
        click.echo(f"watching {', '.join(watcher.roots)} for {settings.data_dir}  (Ctrl+C to stop)", err=True)
        watcher.wait()
    except KeyboardInterrupt:
        interrupted = True
    finally:
        watcher.stop()
    click.echo("stopped watching", err=True)
    if interrupted:
        sys.exit(130)


def _print_watch_batch(batch) -> None:
    report = batch.report
    if batch.kind == "changes" and not batch.changed:
        return
    for root in report.missing_roots:
        click.secho(f"skipped {root}: not a folder (not mounted?); nothing under it was removed", fg="yellow", err=True)
    for path, reason in report.failed:
        click.secho(f"failed {path}: {reason}", fg="yellow", err=True)
    what = "caught up" if batch.kind == "rescan" else "changes"
    click.echo(
        f"{time.strftime('%H:%M:%S')} {what}: added {report.added}, updated {report.updated}, moved {report.moved}, "
        f"removed {report.removed}, failed {len(report.failed)}" + (" (interrupted)" if report.interrupted else "")
    )


@main.command(short_help="Find photos by text, by image, or like one.")
@click.argument("query", required=False)
@click.option("--image", "image_path", type=click.Path(dir_okay=False), help="Search with an image file instead of text.")
@click.option("--like", "like", metavar="PATH|ID", help="Find images like one already in the library (path or id).")
@click.option("-k", "--top-k", "top_k", type=int, default=None, help="Number of results (default: the top_k setting).")
@click.option("--json", "as_json", is_flag=True, help="Print results as JSON (path, score, id, date, size, format).")
@click.option("--local", is_flag=True, help="Load the model here even when a `clipsearch serve` of this library is running.")
@reports_errors
@settings_options(*ENCODER_SETTINGS, "access_token")
def search(query: str | None, image_path: str | None, like: str | None, top_k: int | None, as_json: bool, local: bool,
           settings: Settings) -> None:
    """Find photos matching QUERY, an --image, or --like an indexed photo.

    QUERY is plain language, optionally combined: `beach -people` leaves people out, `2:sunset + boat` weighs
    sunset twice, `like:42 + snow` mixes an indexed photo (by id) with text; quote text to take it literally.
    A running `clipsearch serve` of the same library answers text queries without loading the model here.
    """
    from clipsearch.errors import QueryError

    given = [q for q in (query, image_path, like) if q is not None]
    if len(given) != 1:
        raise QueryError("give exactly one of QUERY, --image or --like",
                         'e.g. clipsearch search "a dog on the beach" or clipsearch search --image photo.jpg')
    k = top_k if top_k is not None else settings.top_k
    hits = None
    if not local and image_path is None:
        hits = _search_via_server(settings, query, like, k)
    if hits is None:
        hits = [hit.as_dict() for hit in _search_locally(settings, query, image_path, like, k)]
    if as_json:
        click.echo(json.dumps(hits, indent=2))
        return
    if not hits:
        click.echo("no results", err=True)
    for hit in hits:
        click.echo(f"{hit['score']:.4f}  {hit['path']}")


def _search_locally(settings: Settings, query: str | None, image_path: str | None, like: str | None, k: int):
    from clipsearch.library import Library
    from clipsearch.search.searcher import Searcher

    settings = one_query_settings(settings)
    library = Library(settings)
    # The runtime setting: on a CPU, OpenVINO embeds the query without importing torch (about 3 s less per search).
    searcher = Searcher(library, runtime=settings.runtime)
    try:
        if image_path is not None:
            return searcher.search_image(image_path, k)
        if like is not None:
            return searcher.search_like(int(like) if like.isdigit() else like, k)
        return searcher.search_text(query, k)
    finally:
        library.close()


def one_query_settings(settings: Settings) -> Settings:
    """Settings for a process that embeds one query: device auto means the CPU where OpenVINO would run there.

    On a GPU machine, device and runtime auto mean torch on the GPU: seconds of imports plus CUDA's start-up for
    milliseconds of work, where OpenVINO on the CPU answers in about a second in all. An explicit device or
    runtime is kept.
    """
    from dataclasses import replace

    from clipsearch.encoders import EncoderSpec
    from clipsearch.encoders.openvino import choose_runtime
    from clipsearch.errors import ConfigError

    if settings.device != "auto" or settings.runtime != "auto":
        return settings
    spec = EncoderSpec(settings.model, settings.pretrained, "auto", settings.precision, settings.model_cache_dir, "auto")
    try:
        if choose_runtime(spec) == "torch" and choose_runtime(replace(spec, device="cpu")) == "openvino":
            return replace(settings, device="cpu")
    except ConfigError:  # a bad setting: the model load reports it in its own words
        pass
    return settings


def _search_via_server(settings: Settings, query: str | None, like: str | None, k: int) -> list[dict] | None:
    """Hits from this library's running server (its model is warm), or None to search locally."""
    from clipsearch import server_link
    from clipsearch.errors import QueryError

    if like is not None and not like.isdigit():
        return None  # a path: resolved locally, where the CLI's working directory means something
    if not query and like is None:
        return None
    server = server_link.running_server(settings.data_dir)
    if server is None:
        return None
    if {"model", "pretrained"} & settings.explicit:
        from clipsearch.library import Library

        library = Library(settings)
        try:
            library.resolve_model()  # the server uses the library's model: another one asked for explicitly is an error
        finally:
            library.close()
    text = query if query is not None else f"like:{like}"
    answer = server_link.ask_server(server, "/api/search", {"q": text, "k": k}, settings.access_token)
    if answer is None:
        return None
    if "error" in answer:
        error = answer["error"]
        raise QueryError(error.get("message", "the server refused the query"), error.get("hint"))
    keep = ("id", "path", "score", "date", "width", "height", "format", "relevant")
    return [{key: hit[key] for key in keep if key in hit} for hit in answer.get("results", [])]


@main.command(short_help="Show the library, its model and failures.")
@click.option("--json", "as_json", is_flag=True, help="Print the status as JSON.")
@click.option("--failures", "max_failures", type=int, default=20, show_default=True, help="Failed files to list (0: all).")
@reports_errors
@settings_options(*LIBRARY_SETTINGS, "log_level")
def status(as_json: bool, max_failures: int, settings: Settings) -> None:
    """Show the library: folder, model, image counts, vectors, failed files, sizes on disk."""
    from clipsearch.status import library_status

    info = library_status(settings, max_failures=max_failures or None)
    if as_json:
        click.echo(json.dumps(info, indent=2, default=str))
        return
    click.echo(f"library:   {info['data_dir']}" + ("" if info["exists"] else "  (empty: run clipsearch index DIR)"))
    click.echo(f"catalog:   {info['catalog']}")
    click.echo(f"model:     {info['model'] or '-'}")
    click.echo(f"folders:   {', '.join(info['roots']) or '-'}")
    counts = info["counts"]
    click.echo(f"images:    {counts['images']} ({counts['ok']} indexed, {counts['failed']} failed)")
    kind = f" ({info['index_kind']} search)" if info.get("index_kind") else ""
    click.echo(f"vectors:   {info['vectors']} in the index{kind}, {counts['embeddings']} in the catalog")
    click.echo(f"on disk:   catalog {_size(info['catalog_bytes'])}, index {_size(info['index_bytes'])}")
    if info["failures"]:
        click.echo("failed files:")
        for item in info["failures"]:
            click.echo(f"  {item['path']}: {item['reason']}")
        if counts["failed"] > len(info["failures"]):
            click.echo(f"  ... {counts['failed'] - len(info['failures'])} more (--failures 0 lists all)")


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


@main.command(short_help="Run the web UI and JSON API.")
@click.option("--debug", is_flag=True, help="Flask's development server with its debugger (loopback only; never for real use).")
@click.option("--threads", type=click.IntRange(1, 64), default=8, show_default=True, help="Requests served at once.")
@click.option("--watch", is_flag=True,
              help="Also watch the library's folders and index changes as they happen (see `clipsearch watch`).")
@reports_errors
@settings_options(*ENCODER_SETTINGS, "host", "port", "access_token", "insecure", "max_upload_mb", "top_k", *WATCH_SETTINGS)
def serve(debug: bool, threads: int, watch: bool, settings: Settings) -> None:
    """Serve the library in the browser: search by text or image, filters, image pages, a JSON API.

    Listens on 127.0.0.1:8000 by default. Any other --host needs --access-token (or --insecure on a trusted
    network). The model stays loaded, and photos indexed meanwhile by another process show up without a restart;
    with --watch the server indexes its folders' changes itself, within seconds.
    """
    import signal

    from clipsearch.webui.server import serve as run_server

    def stop(signum, frame):
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, stop)

    def ready(url: str, info: dict) -> None:
        if info["model"]:
            click.echo(f"clipsearch: {info['images']} photos from {info['data_dir']} ({info['model']})", err=True)
        else:
            click.echo(f"clipsearch: the library {info['data_dir']} is empty: run clipsearch index DIR", err=True)
        if info.get("watching"):
            click.echo(f"watching {', '.join(info['watching'])}", err=True)
        click.echo(f"serving on {url}  (Ctrl+C to stop)", err=True)

    try:
        run_server(settings, threads=threads, debug=debug, ready=ready, watch=watch)
    except KeyboardInterrupt:
        click.echo("stopped", err=True)


@main.command("config", short_help="Show every setting and where it came from.")
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
@reports_errors
@settings_options()
def config_command(as_json: bool, settings: Settings) -> None:
    """Show every setting: its value, where it can be set, and what it does."""
    rows = describe_settings(settings)
    if as_json:
        click.echo(json.dumps({r["name"]: r["value"] for r in rows}, indent=2, default=str))
        return
    for row in rows:
        mark = "*" if row["explicit"] else " "
        click.echo(f"{mark} {row['name']} = {row['value']}")
        click.echo(f"    {row['help']} ({row['flag']}, {row['env']})")
    click.echo("* set by config file, environment or flag")


EVAL_SETTINGS = ("model", "pretrained", "device", "precision", "model_cache_dir", "batch_size", "workers",
                 "max_image_pixels", "log_level")


@main.group("eval", short_help="Measure a model: zero-shot classification or caption retrieval.")
def eval_group() -> None:
    """Evaluate a model on a labelled or captioned image folder (nothing is indexed or written to a library)."""


def _eval_output(result: dict, as_json: bool, json_out: str | None, rows: list[tuple[str, str]]) -> None:
    for item in result["failures"][:20]:
        click.secho(f"skipped {item['path']}: {item['reason']}", fg="yellow", err=True)
    if len(result["failures"]) > 20:
        click.echo(f"... and {len(result['failures']) - 20} more skipped (the JSON lists them all)", err=True)
    text = json.dumps(result, indent=2)
    if json_out:
        from pathlib import Path

        try:
            Path(json_out).write_text(text + "\n", encoding="utf-8")
        except OSError as e:
            from clipsearch.errors import ConfigError

            raise ConfigError(f"cannot write {json_out}: {e.strerror or e}", "give a writable --json-out path") from e
    if as_json:
        click.echo(text)
        return
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        click.echo(f"{name.ljust(width)}  {value}")


def _eval_encoder(settings: Settings):
    from clipsearch.encoders import encoder_spec_from_settings, load_encoder

    return load_encoder(encoder_spec_from_settings(settings))


_EVAL_COMMON = [
    click.option("--images", "images_dir", required=True, type=click.Path(exists=True, file_okay=False),
                 help="Folder the CSV's relative_path values are relative to."),
    click.option("--limit", type=click.IntRange(min=1), default=None, help="Evaluate a subset of N images only."),
    click.option("--json-out", type=click.Path(dir_okay=False), default=None, help="Also write the result as JSON here."),
    click.option("--json", "as_json", is_flag=True, help="Print the result as JSON."),
]


def _eval_options(command: Callable) -> Callable:
    for option in reversed(_EVAL_COMMON):
        command = option(command)
    return command


@eval_group.command("zeroshot", short_help="Zero-shot classification accuracy on a labelled folder.")
@_eval_options
@click.option("--labels", "labels_csv", required=True, type=click.Path(exists=True, dir_okay=False),
              help="CSV with relative_path,label columns (others ignored).")
@click.option("--classes", "classes_file", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Class names in order: one a line, or a CSV with a label column (default: the sorted labels).")
@click.option("--templates", "templates_file", type=click.Path(exists=True, dir_okay=False), default=None,
              help='Prompt templates, one a line with {} for the class name (default: CLIP\'s "a photo of a {}." set).')
@reports_errors
@settings_options(*EVAL_SETTINGS)
def eval_zeroshot(images_dir: str, limit: int | None, json_out: str | None, as_json: bool, labels_csv: str,
                  classes_file: str | None, templates_file: str | None, settings: Settings) -> None:
    """Classify every image of a labelled folder by prompt-ensembled class names; report top-1, top-5, mean recall.

    With --limit N, the first images of each class in turn (N in all) are evaluated.
    """
    from clipsearch.search.evaluation import evaluate_zeroshot
    from clipsearch.search.zeroshot import load_templates

    templates = load_templates(templates_file) if templates_file else None
    encoder = _eval_encoder(settings)
    result = evaluate_zeroshot(encoder, images_dir, labels_csv, classes_file=classes_file, templates=templates,
                               limit=limit, batch_size=settings.batch_size, workers=settings.resolved_workers,
                               max_pixels=settings.max_image_pixels)
    m = result["metrics"]
    _eval_output(result, as_json, json_out, [
        ("model", result["model"]),
        ("images", f"{result['n_evaluated']} evaluated, {result['n_failed']} skipped"),
        ("classes", f"{result['n_classes']} ({result['n_templates']} templates each)"),
        ("top-1", f"{m['top1']:.4f}  (chance {result['chance_top1']:.4f})"),
        ("top-5", f"{m['top5']:.4f}"),
        ("mean per-class recall", f"{m['mean_per_class_recall']:.4f}"),
        ("time", f"{result['seconds']:.1f} s ({result['images_per_second'] or 0:.1f} images/s)"),
    ])


@eval_group.command("retrieval", short_help="Text-to-image and image-to-text recall@k on a captioned folder.")
@_eval_options
@click.option("--captions", "captions_csv", required=True, type=click.Path(exists=True, dir_okay=False),
              help="CSV with relative_path,caption columns (several captions per image allowed).")
@reports_errors
@settings_options(*EVAL_SETTINGS)
def eval_retrieval(images_dir: str, limit: int | None, json_out: str | None, as_json: bool, captions_csv: str,
                   settings: Settings) -> None:
    """Retrieve each caption's image and each image's captions; report recall@1/5/10 both ways.

    With --limit N, N images spread evenly over the file are evaluated, with all their captions.
    """
    from clipsearch.search.evaluation import evaluate_retrieval

    encoder = _eval_encoder(settings)
    result = evaluate_retrieval(encoder, images_dir, captions_csv, limit=limit, batch_size=settings.batch_size,
                                workers=settings.resolved_workers, max_pixels=settings.max_image_pixels)
    rows = [("model", result["model"]),
            ("images", f"{result['n_evaluated']} evaluated, {result['n_failed']} skipped, {result['n_captions']} captions")]
    rows += [(name.replace("_", " "), f"{value:.4f}") for name, value in result["metrics"].items()]
    rows.append(("time", f"{result['seconds']:.1f} s ({result['images_per_second'] or 0:.1f} images/s)"))
    _eval_output(result, as_json, json_out, rows)


from clipsearch.cli_db import db_group  # noqa: E402  (its commands import their libraries lazily)
from clipsearch.cli_labels import labels_group  # noqa: E402

main.add_command(labels_group)
main.add_command(db_group)


def run(argv: list[str] | None = None) -> Any:
    """Entry point for `python -m clipsearch`."""
    return main(args=argv, prog_name="clipsearch")
