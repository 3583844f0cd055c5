"""`clipsearch labels`: zero-shot label sets on the command line (the web UI's /labels pages do the same)."""

from __future__ import annotations

import json

import click

from clipsearch.cli_common import ENCODER_SETTINGS, LIBRARY_SETTINGS, reports_errors, settings_options
from clipsearch.config import Settings

LABEL_SETTINGS = (*LIBRARY_SETTINGS, "log_level")


@click.group("labels", short_help="Zero-shot labels: named label sets applied to the whole library.")
def labels_group() -> None:
    """Label sets (e.g. scenes: beach, mountains, city...) whose labels are given to photos by zero-shot CLIP.

    A photo gets a label when the label wins within its set (probability >= its threshold, 0.5 by default) and
    clearly stands out from how that label scores the rest of the library (strength >= its cutoff), so a photo can
    have no label of a set, and labels of several sets. Labels come from the stored vectors: images are never
    re-embedded. Reviews (`labels review`, or the web UI's label pages) teach a label from confirmed and rejected
    photos.
    """


def _label_catalog(settings: Settings):
    from clipsearch.library import Library

    return Library(settings)


@labels_group.command("add", short_help="Add or edit a label, or install a preset set.")
@click.argument("set_name", metavar="[SET]", required=False)
@click.argument("label", required=False)
@click.option("--prompt", "prompts", multiple=True, help="A prompt for the label (repeatable; {} stands for the label "
              "name); replaces the templates x name ensemble. Given again, replaces the label's prompts.")
@click.option("--threshold", type=float, default=None, help="Probability within the set needed (default 0.5).")
@click.option("--template", "templates", multiple=True, help='Prompt template of the whole set, with {} (repeatable; '
              'default: CLIP\'s "a photo of a {}." ensemble).')
@click.option("--preset", default=None, metavar="NAME", help="Install a shipped set (scenes, objects, documents, pets, or all).")
@reports_errors
@settings_options(*LABEL_SETTINGS)
def labels_add(set_name: str | None, label: str | None, prompts: tuple[str, ...], threshold: float | None,
               templates: tuple[str, ...], preset: str | None, settings: Settings) -> None:
    """Add LABEL to the label set SET (created if new), or edit it; or install a --preset. Then run `labels apply`."""
    from clipsearch.errors import ConfigError
    from clipsearch.search import label_sets as labels

    if preset is None and (not set_name or not label):
        raise ConfigError("give a SET and a LABEL, or --preset NAME",
                          "e.g. clipsearch labels add scenes beach, or clipsearch labels add --preset scenes")
    if preset is not None and (label or prompts or threshold is not None or templates):
        raise ConfigError("--preset installs whole sets: give no LABEL or label options with it",
                          "edit its labels afterwards with clipsearch labels add SET LABEL ...")
    library = _label_catalog(settings)
    try:
        if preset is not None:
            for name, added in labels.install_preset(library.catalog, preset).items():
                click.echo(f"{name}: {added} labels added")
        else:
            new = labels.add_label(library.catalog, set_name, label, prompts or None, threshold, templates or None)
            click.echo(f"{'added' if new else 'updated'} {set_name}/{label.strip()}")
    finally:
        library.close()
    click.echo("run `clipsearch labels apply` to label the library", err=True)


@labels_group.command("list", short_help="List label sets, their labels and photo counts.")
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
@reports_errors
@settings_options(*LABEL_SETTINGS)
def labels_list(as_json: bool, settings: Settings) -> None:
    """List every label set with its labels and how many photos hold each."""
    from clipsearch.search import label_sets as labels

    library = _label_catalog(settings)
    try:
        sets = labels.label_sets(library.catalog)
    finally:
        library.close()
    if as_json:
        click.echo(json.dumps([s.as_dict() for s in sets], indent=2))
        return
    if not sets:
        click.echo("no label sets: add one, e.g. clipsearch labels add --preset scenes", err=True)
    for label_set in sets:
        click.echo(f"{label_set.name}: " + ", ".join(f"{item.name} ({item.count})" for item in label_set.labels))


@labels_group.command("show", short_help="Show a set's labels, or a label's top photos.")
@click.argument("set_name", metavar="SET")
@click.argument("label", required=False)
@click.option("-k", "--top-k", "top_k", type=click.IntRange(min=1), default=20, show_default=True, help="Photos to show.")
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
@reports_errors
@settings_options(*LABEL_SETTINGS)
def labels_show(set_name: str, label: str | None, top_k: int, as_json: bool, settings: Settings) -> None:
    """Show the labels of SET (prompts, thresholds, counts), or the photos holding LABEL, best first."""
    from clipsearch.search import label_sets as labels

    library = _label_catalog(settings)
    try:
        if label is not None:
            photos = labels.label_photos(library.catalog, set_name, label, top_k)
            if as_json:
                click.echo(json.dumps(photos, indent=2))
                return
            if not photos:
                click.echo(f"no photos hold {set_name}/{label} (run clipsearch labels apply {set_name}?)", err=True)
            click.echo("probability  strength  path", err=True)
            for photo in photos:
                mark = " (confirmed)" if photo["confirmed"] else ""
                click.echo(f"{photo['probability']:11.3f}  {photo['strength']:8.2f}  {photo['path']}{mark}")
            return
        (label_set,) = labels.label_sets(library.catalog, set_name)
    finally:
        library.close()
    if as_json:
        click.echo(json.dumps(label_set.as_dict(), indent=2))
        return
    click.echo(f"{label_set.name}  (templates: {'default' if label_set.templates is None else len(label_set.templates)})")
    for item in label_set.labels:
        threshold = f"threshold {item.threshold:g}" if item.threshold is not None else f"threshold {labels.DEFAULT_THRESHOLD:g} (default)"
        prompts = f"; prompts: {' | '.join(item.prompts)}" if item.prompts else ""
        click.echo(f"  {item.name}: {item.count} photos, {threshold}{prompts}")


@labels_group.command("remove", short_help="Remove a label set, or one label of it.")
@click.argument("set_name", metavar="SET")
@click.argument("label", required=False)
@reports_errors
@settings_options(*LABEL_SETTINGS)
def labels_remove(set_name: str, label: str | None, settings: Settings) -> None:
    """Remove the set SET with all its labels, or only its LABEL (their members and reviews go too)."""
    from clipsearch.search import label_sets as labels

    library = _label_catalog(settings)
    try:
        labels.remove(library.catalog, set_name, label)
    finally:
        library.close()
    click.echo(f"removed {set_name}" + (f"/{label}" if label else ""))


@labels_group.command("apply", short_help="Label the whole library with one set, or all.")
@click.argument("set_name", metavar="[SET]", required=False)
@click.option("--json", "as_json", is_flag=True, help="Print the reports as JSON.")
@reports_errors
@settings_options(*ENCODER_SETTINGS)
def labels_apply(set_name: str | None, as_json: bool, settings: Settings) -> None:
    """Compute SET's labels (default: every set's) for every photo, replacing the previous ones.

    Text classifiers are cached per model; the model is loaded only when a label, its prompts or templates changed.
    """
    from clipsearch.encoders import EncoderSpec, load_encoder
    from clipsearch.search import labels

    library = _label_catalog(settings)
    try:
        def encoder():
            model, pretrained = library.resolve_model()
            return load_encoder(EncoderSpec(model, pretrained, settings.device, settings.precision, settings.model_cache_dir,
                                            settings.runtime))

        with library.writer_lock("labels"):
            library.resolve_model()  # an explicit --model other than the library's is an error, before any work
            if set_name is not None:
                reports = [labels.apply_set(library.catalog, set_name, encoder)]
            else:
                reports = labels.apply_all(library.catalog, encoder)
    finally:
        library.close()
    if as_json:
        click.echo(json.dumps([r.as_dict() for r in reports], indent=2))
        return
    if not reports:
        click.echo("no label sets with labels: add one, e.g. clipsearch labels add --preset scenes", err=True)
    for r in reports:
        counts = ", ".join(f"{name} {n}" for name, n in r.assigned.items())
        click.echo(f"{r.set_name}: {r.images} photos; {counts}; none of these {r.unlabelled} "
                   f"({r.seconds:.2f} s, {r.encoded_labels} classifiers encoded)")


@labels_group.command("review", short_help="Confirm or reject a photo for a label (it learns from it).")
@click.argument("set_name", metavar="SET")
@click.argument("label")
@click.argument("image_id", type=int)
@click.option("--confirm", "verdict", flag_value="confirm", help="The photo is right for the label.")
@click.option("--reject", "verdict", flag_value="reject", help="The photo is wrong for the label.")
@click.option("--clear", "verdict", flag_value="clear", help="Withdraw the verdict.")
@click.option("--json", "as_json", is_flag=True, help="Print the label's review summary as JSON.")
@reports_errors
@settings_options(*LABEL_SETTINGS)
def labels_review(set_name: str, label: str, image_id: int, verdict: str | None, as_json: bool, settings: Settings) -> None:
    """Give IMAGE_ID (from `labels show SET LABEL --json`) a verdict for SET/LABEL, then relabel the set.

    Confirmed photos always hold the label and refine its classifier; confirmed and rejected ones tune how strong a
    photo must be to get it. The precision estimate is the share of reviewed photos that were right.
    """
    from clipsearch.errors import ConfigError
    from clipsearch.search.label_feedback import label_quality, review

    if verdict is None:
        raise ConfigError("give --confirm, --reject or --clear", f"e.g. clipsearch labels review {set_name} {label} {image_id} --confirm")
    library = _label_catalog(settings)
    try:
        with library.writer_lock("labels"):
            review(library.catalog, set_name, label, image_id, None if verdict == "clear" else verdict)
        quality = label_quality(library.catalog, set_name, label)
    finally:
        library.close()
    if as_json:
        click.echo(json.dumps(quality, indent=2))
        return
    precision = quality["precision"]
    estimate = (f"precision about {precision['precision']:.0%} ({precision['confirmed']} of {precision['reviewed']} "
                f"reviewed photos right; 95% interval {precision['low']:.0%}-{precision['high']:.0%})"
                if precision else "no reviews")
    click.echo(f"{set_name}/{label}: {estimate}; strength cutoff {quality['cutoff']:.2f}")
