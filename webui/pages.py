"""HTML pages: search, image, status and log-in (each has a JSON twin under /api)."""

from __future__ import annotations

from flask import Blueprint, current_app, redirect, render_template, request, session, url_for

from clipsearch.errors import EmptyLibraryError, QueryError
from clipsearch.status import library_status
from clipsearch.webui import security
from clipsearch.webui.forms import PAGE_SIZE, SearchForm
from clipsearch.webui.services import services
from clipsearch.webui.views import image_details, run_search

blueprint = Blueprint("pages", __name__)


@blueprint.route("/", methods=["GET", "POST"])
def search():
    """The search page; a POSTed image is embedded, remembered, and the page redirects to its shareable URL."""
    svc = services()
    options = svc.filter_options()
    try:
        form, result = run_search(svc, PAGE_SIZE)
    except EmptyLibraryError:
        return render_template("search.html", form=None, result=None, options=options, empty_library=True, error=None)
    except QueryError as e:
        return render_template("search.html", form=_echo_form(), result=None, options=options, empty_library=False,
                               error=e), 400
    if request.method == "POST":
        # Post/redirect/get: the results page of an upload can be reloaded, paged and bookmarked while it is remembered.
        return redirect(url_for("pages.search", **form.query_args()), code=303)
    empty = not svc.library.exists or svc.library.catalog.library_model() is None  # nothing indexed yet
    return render_template("search.html", form=form, result=result, options=options, empty_library=empty, error=None)


def _echo_form() -> SearchForm:
    """The query text of a failed search, so the user can correct it."""
    from clipsearch.search.relevance import DEFAULT_STRICTNESS
    from clipsearch.search.request import SearchFilters

    return SearchForm((request.values.get("q") or "")[:2000], None, SearchFilters(), "relevance", DEFAULT_STRICTNESS, None)


@blueprint.get("/similar/<id:image_id>")
def similar(image_id: int):
    """More like this: the search page for `like:ID` (refine it with text, e.g. `like:ID + snow`)."""
    return redirect(url_for("pages.search", q=f"like:{image_id}"))


@blueprint.get("/images/<id:image_id>")
def image(image_id: int):
    """One image: the picture, its facts and camera basics, its nearest neighbours."""
    details = image_details(services(), image_id)
    return render_template("image.html", image=details)


@blueprint.get("/status")
def status():
    """The library: model, folders, counts, index size, failed files with reasons."""
    svc = services()
    info = library_status(svc.settings, max_failures=500, store=svc.searcher.current_store())
    info["renditions_bytes"] = svc.renditions.size_bytes()
    encoder = svc.searcher.loaded_encoder
    return render_template("status.html", info=info, encoder=encoder)


@blueprint.route("/login", methods=["GET", "POST"])
def login():
    """Ask for the access token (only when one is configured)."""
    token = current_app.config.get("ACCESS_TOKEN")
    target = security.safe_next(request.values.get("next"))
    if not token:
        return redirect(target)
    error = None
    if request.method == "POST":
        if security.token_matches(request.form.get("token", ""), token):
            session.clear()
            session[security.SESSION_KEY] = security.token_fingerprint(token)
            session.permanent = True
            return redirect(target, code=303)
        error = "That is not the access token."
    return render_template("login.html", next=target, error=error), (401 if error else 200)


@blueprint.post("/logout")
def logout():
    """Forget this browser's log-in."""
    session.clear()
    return redirect(url_for("pages.login"), code=303)
