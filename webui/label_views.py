"""What the label pages and their JSON twins are made of, and their writes (under the library's single-writer lock)."""

from __future__ import annotations

import os
import threading
import time
from contextlib import ExitStack, contextmanager
from typing import Any, Iterator, Mapping

from clipsearch.errors import EmptyLibraryError, LibraryBusyError, QueryError
from clipsearch.search import label_feedback, label_sets, labels
from clipsearch.webui.forms import integer
from clipsearch.webui.services import Services
from clipsearch.webui.views import hit_urls, label_urls

STRIP = 6  # thumbnails per label on /labels
LABEL_PAGE_SIZE = 48
WRITE_WAIT_S = 15.0  # a watcher holds the library only while it applies a batch: wait that out, not an indexing run
_web_writes = threading.Lock()  # request threads of one server take turns before asking for the file lock


@contextmanager
def library_write(services: Services) -> Iterator[None]:
    """Hold the library's writer lock for a label change, waiting briefly for a watcher; 503 if an indexer has it."""
    deadline = time.monotonic() + WRITE_WAIT_S
    with _web_writes:
        held = ExitStack()
        while True:
            try:
                held.enter_context(services.library.writer_lock("web UI"))
                break
            except LibraryBusyError:
                if time.monotonic() >= deadline:
                    raise
                time.sleep(0.2)
        with held:
            yield


def _encoder(services: Services):
    return lambda: services.searcher.encoder  # loaded only when a classifier must be computed


def _apply(services: Services, set_name: str) -> dict[str, Any] | None:
    """Relabel a set after an edit; None when the library has nothing indexed yet (labels apply once it has)."""
    try:
        return labels.apply_set(services.library.catalog, set_name, _encoder(services)).as_dict()
    except EmptyLibraryError:
        return None


def overview(services: Services) -> dict[str, Any]:
    """Every set and label with counts, precision estimates and the top photos of each (the /labels page)."""
    catalog = services.library.catalog if services.library.exists else None
    if catalog is None:
        return {"sets": [], "presets": _presets(), "indexed": False}
    sets = label_sets.label_sets(catalog)
    ids = [label.id for label_set in sets for label in label_set.labels]
    tops = label_sets.top_photo_ids(catalog, ids, STRIP)
    estimates = label_feedback.qualities(catalog, ids)
    out = []
    for label_set in sets:
        items = []
        for label in label_set.labels:
            item = label.as_dict()
            item["precision"] = estimates.get(label.id)
            item["urls"] = label_urls(label_set.name, label.name)
            item["top"] = [{"id": i, "urls": hit_urls(i)} for i in tops.get(label.id, [])]
            items.append(item)
        out.append({"name": label_set.name, "templates": label_set.templates, "labels": items})
    return {"sets": out, "presets": _presets(), "indexed": catalog.library_model() is not None}


def _presets() -> list[dict[str, Any]]:
    return [{"name": name, "description": preset.get("description", ""), "labels": len(preset["labels"])}
            for name, preset in label_sets.presets().items()]


def label_page(services: Services, set_name: str, name: str, args: Mapping[str, str]) -> dict[str, Any]:
    """One label: its definition, review summary, and a page of its photos (or of its reviewed photos)."""
    if not services.library.exists:
        raise QueryError(f"no label set {set_name!r}", "index photos and add labels first")
    catalog = services.library.catalog
    (label_set,) = label_sets.label_sets(catalog, set_name)
    label = label_set.label(name)
    reviewed = (args.get("reviewed") or "").strip() or None
    k = integer(args, "k", LABEL_PAGE_SIZE, 1, 500)
    offset = integer(args, "offset", 0, 0, 10_000_000)
    if reviewed is not None:
        rows = label_feedback.reviewed_photos(catalog, set_name, name, reviewed, k + 1, offset)
    else:
        rows = label_sets.label_photos(catalog, set_name, name, k + 1, offset)
    photos = [{**row, "name": os.path.basename(row["path"]), "urls": hit_urls(row["id"])} for row in rows[:k]]
    return {
        "set": set_name,
        "label": {**label.as_dict(), "urls": label_urls(set_name, name)},
        "templates": label_set.templates,
        "other_labels": [other.name for other in label_set.labels if other.name != name],
        "quality": label_feedback.label_quality(catalog, set_name, name),
        "reviewed": reviewed,
        "k": k,
        "offset": offset,
        "next_offset": offset + k if len(rows) > k else None,
        "photos": photos,
    }


# --- writes ---------------------------------------------------------------------------------------------
def _prompts(value: Any) -> list[str] | None:
    """Prompts from a JSON list or a form's text (one per line)."""
    if value is None:
        return None
    if isinstance(value, str):
        return [line.strip() for line in value.splitlines() if line.strip()]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return value
    raise QueryError("prompts must be a list of strings (or lines of text)", 'e.g. ["a photo of a beach.", "the seaside"]')


def _threshold(value: Any) -> float | None:
    if value is None or value == "":
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        raise QueryError(f"threshold must be a number between 0 and 1, got {str(value)[:20]!r}", "e.g. 0.3") from None


def save_label(services: Services, data: Mapping[str, Any]) -> dict[str, Any]:
    """Create or edit a label (fields set, label, prompts, threshold, templates) and relabel its set."""
    set_name = str(data.get("set") or "").strip()
    name = str(data.get("label") or "").strip()
    templates = _prompts(data.get("templates"))
    with library_write(services):
        created = label_sets.add_label(services.library.catalog, set_name, name, _prompts(data.get("prompts")),
                                       _threshold(data.get("threshold")), templates)
        report = _apply(services, set_name)
    return {"created": created, "set": set_name, "label": name, "applied": report, "urls": label_urls(set_name, name)}


def edit_label(services: Services, set_name: str, name: str, data: Mapping[str, Any]) -> dict[str, Any]:
    """Rename a label, replace its prompts, set or clear its threshold; relabel its set."""
    new_name = str(data.get("name") or name).strip()
    threshold = _threshold(data.get("threshold"))
    with library_write(services):
        label_sets.edit_label(services.library.catalog, set_name, name, new_name=new_name,
                              prompts=_prompts(data.get("prompts")) or [], threshold=threshold,
                              clear_threshold=threshold is None)
        report = _apply(services, set_name)
    return {"set": set_name, "label": new_name, "applied": report, "urls": label_urls(set_name, new_name)}


def remove(services: Services, set_name: str, name: str | None = None) -> None:
    """Remove a set, or one label of it (the set's other labels are relabelled: they compete differently now)."""
    with library_write(services):
        label_sets.remove(services.library.catalog, set_name, name)
        if name is not None and label_sets.label_sets(services.library.catalog, set_name)[0].labels:
            _apply(services, set_name)


def install_preset(services: Services, preset: str) -> dict[str, int]:
    """Install a shipped preset and label the library with it."""
    with library_write(services):
        added = label_sets.install_preset(services.library.catalog, preset)
        for set_name in added:
            _apply(services, set_name)
    return added


def apply(services: Services, set_name: str) -> dict[str, Any] | None:
    """Relabel the library with one set."""
    with library_write(services):
        return labels.apply_set(services.library.catalog, set_name, _encoder(services)).as_dict()


def review(services: Services, set_name: str, name: str, image_id: Any, verdict: str | None) -> dict[str, Any]:
    """Record a verdict ('confirm', 'reject', or None/'clear' to withdraw) and answer the label's new state."""
    try:
        image = int(image_id)
    except (TypeError, ValueError):
        raise QueryError("image_id must be a whole number", "use the id of a photo on the label page") from None
    verdict = None if verdict in (None, "", "clear") else str(verdict)
    with library_write(services):
        photos = label_feedback.review(services.library.catalog, set_name, name, image, verdict, _encoder(services))
    catalog = services.library.catalog
    held = any(row["set"] == set_name and row["label"] == name for row in label_sets.labels_of(catalog, image))
    return {"image_id": image, "verdict": verdict, "holds_label": held,
            "quality": label_feedback.label_quality(catalog, set_name, name), "photos": photos}
