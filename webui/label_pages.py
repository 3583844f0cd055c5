"""The label pages: /labels (every set and label, with top photos) and /labels/SET/LABEL (photos by confidence).

Changes are plain POST forms (they work without JavaScript); app.js sends reviews through the JSON API instead, so
the page updates in place.
"""

from __future__ import annotations

from flask import Blueprint, redirect, render_template, request, url_for

from clipsearch.errors import ConfigError, QueryError
from clipsearch.webui import label_views, security
from clipsearch.webui.services import services

blueprint = Blueprint("label_pages", __name__, url_prefix="/labels")


@blueprint.route("", methods=["GET", "POST"])
def overview():
    """Every set and label; POST creates or edits a label, or installs a preset."""
    svc = services()
    error = None
    if request.method == "POST":
        try:
            if request.form.get("preset"):
                label_views.install_preset(svc, request.form["preset"])
                return redirect(url_for("label_pages.overview"), code=303)
            result = label_views.save_label(svc, request.form)
            return redirect(result["urls"]["page"], code=303)
        except (ConfigError, QueryError) as e:
            error = e
    data = label_views.overview(svc)
    return render_template("labels.html", data=data, error=error, form=request.form), 400 if error else 200


@blueprint.post("/<set_name>")
def set_action(set_name: str):
    """Apply a set again, or delete it."""
    svc = services()
    action = request.form.get("action")
    if action == "apply":
        label_views.apply(svc, set_name)
    elif action == "delete":
        label_views.remove(svc, set_name)
    else:
        raise QueryError(f"unknown action {str(action)[:20]!r}", "use apply or delete")
    return redirect(url_for("label_pages.overview"), code=303)


@blueprint.get("/<set_name>/<path:name>")
def label(set_name: str, name: str):
    """A label's photos, most confident first, with confirm/reject on each."""
    data = label_views.label_page(services(), set_name, name, request.args)
    return render_template("label.html", data=data, error=None)


@blueprint.post("/<set_name>/<path:name>")
def label_action(set_name: str, name: str):
    """Review a photo (action=review), edit the label (action=edit) or delete it (action=delete)."""
    svc = services()
    action = request.form.get("action")
    if action == "review":
        label_views.review(svc, set_name, name, request.form.get("image_id"), request.form.get("verdict"))
        return redirect(security.safe_next(request.form.get("next") or url_for("label_pages.label", set_name=set_name,
                                                                                name=name)), code=303)
    if action == "delete":
        label_views.remove(svc, set_name, name)
        return redirect(url_for("label_pages.overview"), code=303)
    if action == "edit":
        try:
            result = label_views.edit_label(svc, set_name, name, request.form)
        except (ConfigError, QueryError) as e:
            data = label_views.label_page(svc, set_name, name, request.args)
            return render_template("label.html", data=data, error=e), 400
        return redirect(result["urls"]["page"], code=303)
    raise QueryError(f"unknown action {str(action)[:20]!r}", "use review, edit or delete")
