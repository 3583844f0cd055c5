"""The JSON twins of the label pages: list, read, create/edit/remove labels, apply a set, review photos."""

from __future__ import annotations

from flask import Blueprint, jsonify, request

from clipsearch.errors import QueryError
from clipsearch.webui import label_views
from clipsearch.webui.services import services

blueprint = Blueprint("label_api", __name__, url_prefix="/api/labels")


def _body() -> dict:
    """The request's JSON object, or its form fields."""
    data = request.get_json(silent=True) if request.is_json else None
    if data is None:
        if request.is_json:
            raise QueryError("the request body is not valid JSON", 'send an object, e.g. {"set": "scenes", "label": "beach"}')
        return request.form.to_dict()
    if not isinstance(data, dict):
        raise QueryError("the request body must be a JSON object", 'e.g. {"set": "scenes", "label": "beach"}')
    return data


@blueprint.get("")
def overview():
    """Every label set and label, with photo counts, precision estimates and top photos."""
    return jsonify(label_views.overview(services()))


@blueprint.post("")
def create():
    """Create or edit a label ({set, label, prompts?, threshold?, templates?}) or install a preset ({preset})."""
    data = _body()
    svc = services()
    if data.get("preset"):
        return jsonify(added=label_views.install_preset(svc, str(data["preset"])))
    result = label_views.save_label(svc, data)
    return jsonify(result), 201 if result["created"] else 200


@blueprint.get("/<set_name>/<path:name>")
def label(set_name: str, name: str):
    """One label: definition, review summary, and a page of its photos (reviewed=confirm|reject for reviewed ones)."""
    return jsonify(label_views.label_page(services(), set_name, name, request.args))


@blueprint.patch("/<set_name>/<path:name>")
def edit(set_name: str, name: str):
    """Rename a label ({name}), replace its prompts ({prompts}), set or clear its threshold ({threshold})."""
    return jsonify(label_views.edit_label(services(), set_name, name, _body()))


@blueprint.delete("/<set_name>/<path:name>")
def delete_label(set_name: str, name: str):
    """Remove a label, its members and reviews."""
    label_views.remove(services(), set_name, name)
    return jsonify(removed=f"{set_name}/{name}")


@blueprint.delete("/<set_name>")
def delete_set(set_name: str):
    """Remove a whole label set."""
    label_views.remove(services(), set_name)
    return jsonify(removed=set_name)


@blueprint.post("/<set_name>/apply")
def apply(set_name: str):
    """Relabel the whole library with one set."""
    return jsonify(label_views.apply(services(), set_name))


@blueprint.post("/<set_name>/<path:name>/reviews")
def review(set_name: str, name: str):
    """Confirm or reject a photo for a label ({image_id, verdict: confirm|reject|clear}); answers the new estimate."""
    data = _body()
    return jsonify(label_views.review(services(), set_name, name, data.get("image_id"), data.get("verdict")))
