"""The JSON API: a twin of every page (search, similar, image, status) plus its OpenAPI document."""

from __future__ import annotations

from flask import Blueprint, jsonify, request

from clipsearch.status import library_status
from clipsearch.webui.forms import integer
from clipsearch.webui.services import services
from clipsearch.webui.views import image_details, result_json, run_search, similar_request

blueprint = Blueprint("api", __name__, url_prefix="/api")


@blueprint.route("/search", methods=["GET", "POST"])
def search():
    """Search by text (q, with weights and negatives), by an uploaded image (multipart `image`), or both."""
    svc = services()
    form, result = run_search(svc, svc.settings.top_k)
    if result is None:
        return jsonify(error={"code": 400, "message": "nothing to search for",
                              "hint": "pass q=TEXT, or POST an image file in the field 'image'"}), 400
    return jsonify(result_json(result, form))


@blueprint.get("/similar/<id:image_id>")
def similar(image_id: int):
    """Images most like one in the library."""
    svc = services()
    k = integer(request.args, "k", svc.settings.top_k, 1, 500)
    offset = integer(request.args, "offset", 0, 0, 10_000)
    result = svc.searcher.run(similar_request(svc, image_id, k, offset))
    return jsonify(result_json(result))


@blueprint.get("/images/<id:image_id>")
def image(image_id: int):
    """One image's facts, camera basics and nearest neighbours."""
    return jsonify(image_details(services(), image_id))


@blueprint.get("/status")
def status():
    """The library: model, folders, counts, index size, failed files with reasons."""
    svc = services()
    max_failures = integer(request.args, "failures", 100, 0, 100_000)
    info = library_status(svc.settings, max_failures=max_failures or None, store=svc.searcher.current_store())
    info["data_dir"] = str(info["data_dir"])
    info["renditions_bytes"] = svc.renditions.size_bytes()
    info["filters"] = svc.filter_options()
    return jsonify(info)


@blueprint.get("/openapi.json")
def openapi():
    """The OpenAPI 3.1 description of this API."""
    from clipsearch.webui.openapi import openapi_document

    return jsonify(openapi_document())
