"""The OpenAPI document: valid OpenAPI 3.1, covering every /api route, and matching what the server really answers."""

from __future__ import annotations

import io
import os
import re
from pathlib import Path

import pytest
from jsonschema import Draft202012Validator
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from clipsearch import __version__
from clipsearch.webui.openapi import openapi_document

DOC_URI = "urn:clipsearch:openapi"
DAY = 86_400
LAYOUT = [  # (file under photos/, colour); file dates are one day apart from 2020-09-13 on
    ("home/red1.png", "red"), ("home/red2.jpg", "red"), ("home/blue1.png", "blue"), ("home/green1.jpg", "green"),
    ("trip/red3.jpg", "red"), ("trip/blue2.jpg", "blue"), ("trip/yellow1.png", "yellow"), ("trip/grey1.png", "grey"),
    ("trip/white1.png", "white"), ("trip/black1.png", "black"), ("trip/purple1.png", "purple"), ("trip/cyan1.jpg", "cyan"),
]


def make_exif_photo(path: Path) -> Path:
    """A JPEG with camera EXIF (make, model, date taken, exposure), so image details show camera facts."""
    from PIL import Image

    from tests.fakes import PALETTE

    exif = Image.Exif()
    exif[0x010F], exif[0x0110], exif[0x0131], exif[0x0132] = "Canon", "Canon EOS R5", "darktable", "2021:07:04 10:30:00"
    sub = exif.get_ifd(0x8769)
    sub[0x9003] = "2021:07:04 10:30:00"
    sub[0x829A], sub[0x829D], sub[0x8827], sub[0x920A] = 0.004, 2.8, 200, 35.0
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (64, 48), PALETTE["orange"]).save(path, "JPEG", exif=exif)
    return path


@pytest.fixture(scope="module")
def library(tmp_path_factory):
    """An indexed colour-photo library (plus a camera JPEG and a broken file) and its app; built once per module."""
    from clipsearch.config import load_settings
    from clipsearch.indexer.run import index_folders
    from clipsearch.webui.app import create_app
    from tests.fakes import ColorWordEncoder, make_image, register_fake_encoder

    root = tmp_path_factory.mktemp("openapi")
    with pytest.MonkeyPatch.context() as mp:
        for name in list(os.environ):
            if name.startswith("CLIPSEARCH_"):
                mp.delenv(name)
        for var in ("XDG_CONFIG_HOME", "XDG_DATA_HOME", "XDG_CACHE_HOME"):
            mp.setenv(var, str(root / var.lower()))
        register_fake_encoder()
        encoder = ColorWordEncoder()
        photos = root / "photos"
        for n, (name, colour) in enumerate(LAYOUT):
            path = make_image(photos / name, colour, noise=n + 1)
            os.utime(path, (1_600_000_000 + n * DAY,) * 2)
        make_exif_photo(photos / "trip" / "camera.jpg")
        (photos / "trip" / "broken.jpg").write_bytes(b"not an image at all")
        settings = load_settings({"data_dir": root / "library", "model": "test-colors", "pretrained": "v1",
                                  "workers": 1, "batch_size": 8}, env={})
        index_folders(settings, [photos], encoder=encoder)
        app = create_app(settings, encoder, {"TESTING": True})
        ids = {os.path.relpath(row.path, photos): row.id
               for row in app.extensions["clipsearch"].library.catalog.images_by_id(range(1, 100)).values()}
        yield {"app": app, "settings": settings, "encoder": encoder, "photos": photos, "ids": ids}
        app.extensions["clipsearch"].close()


@pytest.fixture(scope="module")
def api_client(library):
    """A test client of the module's app."""
    return library["app"].test_client()


@pytest.fixture(scope="module")
def document():
    """The OpenAPI document."""
    return openapi_document()


@pytest.fixture(scope="module")
def registry(document):
    """The document as a JSON Schema resource, so response schemas resolve their $refs into it."""
    return Registry().with_resource(DOC_URI, Resource.from_contents(document, default_specification=DRAFT202012))


def pointer(*parts: str) -> str:
    """A JSON pointer fragment into the document."""
    return "#/" + "/".join(part.replace("~", "~0").replace("/", "~1") for part in parts)


def check_response(document, registry, response, path: str, method: str) -> dict:
    """Assert the response's status is documented for the operation and its JSON body matches that status's schema."""
    operation = document["paths"][path][method.lower()]
    status = str(response.status_code)
    assert status in operation["responses"], f"{method} {path}: {status} is not documented: {response.get_data()[:300]!r}"
    assert response.mimetype == "application/json"
    assert "application/json" in operation["responses"][status]["content"]
    ref = DOC_URI + pointer("paths", path, method.lower(), "responses", status, "content", "application/json", "schema")
    validator = Draft202012Validator({"$ref": ref}, registry=registry, format_checker=Draft202012Validator.FORMAT_CHECKER)
    body = response.get_json()
    errors = sorted(validator.iter_errors(body), key=lambda e: list(e.absolute_path))
    assert not errors, "\n".join(f"{list(e.absolute_path)}: {e.message[:300]}" for e in errors[:5])
    return body


# --- the document itself ----------------------------------------------------------------------------


def test_document_is_valid_openapi_3_1(document):
    from openapi_spec_validator import validate

    validate(document)
    assert document["openapi"] == "3.1.0"
    for name, schema in document["components"]["schemas"].items():
        Draft202012Validator.check_schema(schema)
    for item in document["paths"].values():
        for op in item.values():
            for param in op.get("parameters", []):
                Draft202012Validator.check_schema(param["schema"])


def test_document_info_and_security(document):
    info = document["info"]
    assert info["title"] == "clipsearch" and info["version"] == __version__
    for example in ("beach -people", "2:sunset + boat", "like:42 + snow"):
        assert example in info["description"]
    bearer = document["components"]["securitySchemes"]["bearerAuth"]
    assert (bearer["type"], bearer["scheme"]) == ("http", "bearer") and "only needed" in bearer["description"]
    assert {} in document["security"], "anonymous access must stay allowed (servers without a token)"


def test_every_operation_documents_errors_and_parameters(document):
    for path, item in document["paths"].items():
        for method, op in item.items():
            for code in ("401", "500"):
                schema = op["responses"][code]["content"]["application/json"]["schema"]
                assert schema == {"$ref": "#/components/schemas/Error"}, (path, method, code)
            for name in re.findall(r"{(\w+)}", path):
                assert any(p["name"] == name and p["in"] == "path" for p in op["parameters"]), (path, name)
    search = {p["name"]: p["schema"] for p in document["paths"]["/api/search"]["get"]["parameters"]}
    assert set(search) == {"q", "k", "offset", "sort", "relevance", "folder", "from", "to", "type", "label", "upload"}
    assert (search["k"]["minimum"], search["k"]["maximum"]) == (1, 500)
    assert (search["offset"]["minimum"], search["offset"]["maximum"]) == (0, 10_000)
    assert search["relevance"]["default"] == 3 and search["sort"]["enum"] == ["relevance", "newest", "oldest"]
    body = document["paths"]["/api/search"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert set(body["properties"]) == set(search) | {"image"}


def test_documented_paths_are_the_app_routes(library, document):
    routes = {}
    for rule in library["app"].url_map.iter_rules():
        if rule.rule.startswith("/api/"):
            path = re.sub(r"<(?:\w+:)?(\w+)>", r"{\1}", rule.rule)
            routes.setdefault(path, set()).update(m.lower() for m in rule.methods - {"HEAD", "OPTIONS"})
    assert routes == {path: set(item) for path, item in document["paths"].items()}


def test_document_is_served_and_callers_cannot_change_it(api_client, document, registry):
    response = api_client.get("/api/openapi.json")
    assert check_response(document, registry, response, "/api/openapi.json", "GET") == openapi_document()
    mine = openapi_document()
    mine["info"]["title"] = "changed"
    mine["paths"].clear()
    assert openapi_document()["info"]["title"] == "clipsearch" and openapi_document()["paths"]


# --- real answers against the document --------------------------------------------------------------

S, SIM, IMG, ST = "/api/search", "/api/similar/{image_id}", "/api/images/{image_id}", "/api/status"

GET_CASES = [  # (documented path, url; {name} is filled from the library, expected status)
    (S, "/api/search?q=red", 200),
    (S, "/api/search?q=red&sort=newest", 200),
    (S, "/api/search?q=red&sort=oldest&k=2", 200),
    (S, "/api/search?q=blue&sort=NEWEST&relevance=0", 200),
    (S, "/api/search?q=red&relevance=10", 200),
    (S, "/api/search?q=red&relevance=2.5&sort=oldest", 200),
    (S, "/api/search?q=red&folder={photos}/trip", 200),
    (S, "/api/search?q=red&from=2020-09-14&to=2020-09-20&sort=newest", 200),
    (S, "/api/search?q=red&type=png", 200),
    (S, "/api/search?q=red&type=png,jpeg&type=webp&folder={photos}/home&from=2020-01-01", 200),
    (S, "/api/search?q=2:red+%2B+blue+-0.5:green", 200),
    (S, "/api/search?q=red+-blue", 200),
    (S, "/api/search?q=beach+-people", 400),  # the fake encoder reads no colour: the terms cancel out
    (S, "/api/search?q=%22rock+-+paper%22+%2B+red", 200),
    (S, "/api/search?q=like:{red1}+%2B+snow", 200),
    (S, "/api/search?q=image:{red1}+-like:{blue1}&sort=newest", 200),
    (S, "/api/search?q=red&k=5&offset=5", 200),
    (S, "/api/search?q=red&k=500", 200),
    (S, "/api/search?q=red&offset=10000", 200),
    (S, "/api/search", 400),
    (S, "/api/search?q=", 400),
    (S, "/api/search?q=-red", 400),
    (S, "/api/search?q=red&k=-1", 400),
    (S, "/api/search?q=red&k=0", 400),
    (S, f"/api/search?q=red&k={10**9}", 400),
    (S, "/api/search?q=red&k=ten", 400),
    (S, "/api/search?q=red&offset=-1", 400),
    (S, "/api/search?q=red&offset=10001", 400),
    (S, "/api/search?q=red&sort=random", 400),
    (S, "/api/search?q=red&relevance=11", 400),
    (S, "/api/search?q=red&relevance=nan", 400),
    (S, "/api/search?q=red&from=2024-13-01", 400),
    (S, "/api/search?q=red&from=2024-02-01&to=2024-01-01", 400),
    (S, "/api/search?q=red&folder=relative/path", 400),
    (S, "/api/search?q=red&type=notaformatname", 400),
    (S, "/api/search?q=red&upload=zz", 400),
    (S, "/api/search?upload=0123456789abcdef01234567", 400),
    (S, "/api/search?q=like:99999", 400),
    (S, "/api/search?q=like:{broken}", 400),
    (S, "/api/search?q=1,5:red", 400),
    (S, "/api/search?q=" + "red " * 2500, 400),  # 10 kB
    (SIM, "/api/similar/{red1}", 200),
    (SIM, "/api/similar/{red1}?k=3&offset=2", 200),
    (SIM, "/api/similar/{red1}?k=0", 400),
    (SIM, "/api/similar/{red1}?offset=99999", 400),
    (SIM, "/api/similar/{broken}", 400),
    (SIM, "/api/similar/99999", 404),
    (SIM, "/api/similar/abc", 404),
    (IMG, "/api/images/{red1}", 200),
    (IMG, "/api/images/{camera}", 200),
    (IMG, "/api/images/{broken}", 200),
    (IMG, "/api/images/99999", 404),
    (IMG, "/api/images/-1", 404),
    (IMG, "/api/images/abc", 404),
    (ST, "/api/status", 200),
    (ST, "/api/status?failures=0", 200),
    (ST, "/api/status?failures=1", 200),
    (ST, "/api/status?failures=-1", 400),
    (ST, "/api/status?failures=x", 400),
]
GET_CASES += [(SIM, f"/api/similar/{2**64}", 404), (IMG, f"/api/images/{2**64}", 404)]


def fill(url: str, library) -> str:
    """The url with {photos} and {name} (an image's file stem) replaced."""
    names = {Path(rel).stem: image_id for rel, image_id in library["ids"].items()}
    return re.sub(r"{(\w+)}", lambda m: str(library["photos"]) if m[1] == "photos" else str(names[m[1]]), url)


@pytest.mark.parametrize("path, url, status", GET_CASES)
def test_get_answers_match_the_document(api_client, library, document, registry, path, url, status):
    response = api_client.get(fill(url, library))
    body = check_response(document, registry, response, path, "GET")
    assert response.status_code == status, body


def test_answers_carry_what_they_promise(api_client, library, document, registry):
    ids = library["ids"]
    details = check_response(document, registry, api_client.get(f"/api/images/{ids['trip/camera.jpg']}"), IMG, "GET")
    assert details["date_source"] == "exif" and details["camera"]["camera"].startswith("Canon")
    broken = check_response(document, registry, api_client.get(f"/api/images/{ids['trip/broken.jpg']}"), IMG, "GET")
    assert broken["status"] == "failed" and broken["error"] and broken["neighbours"] == []
    status = check_response(document, registry, api_client.get("/api/status"), ST, "GET")
    assert status["counts"]["failed"] == 1 and status["failures"][0]["path"].endswith("broken.jpg")
    by_date = check_response(document, registry, api_client.get("/api/search?q=red&sort=newest"), S, "GET")
    assert by_date["relevant"] == by_date["total"] and all(hit["relevant"] for hit in by_date["results"])
    liked_url = f"/api/search?q=like:{ids['home/red1.png']}+%2B+2:snow"
    liked = check_response(document, registry, api_client.get(liked_url), S, "GET")
    assert [t["kind"] for t in liked["query"]["terms"]] == ["image", "text"] and liked["query"]["terms"][1]["weight"] == 2


def test_paging_with_next_offset(api_client, document, registry):
    seen, offset = [], 0
    while offset is not None:
        page = check_response(document, registry, api_client.get(f"/api/search?q=red&k=4&offset={offset}"), S, "GET")
        seen += [hit["id"] for hit in page["results"]]
        offset = page["next_offset"]
    assert len(seen) == len(set(seen)) == page["total"]


def image_bytes(colour: str = "red", fmt: str = "PNG") -> bytes:
    """A small solid-colour image file's bytes."""
    from PIL import Image

    from tests.fakes import PALETTE

    out = io.BytesIO()
    Image.new("RGB", (40, 30), PALETTE[colour]).save(out, fmt)
    return out.getvalue()


def test_search_by_upload_then_page_with_upload_id(api_client, document, registry):
    form = {"image": (io.BytesIO(image_bytes()), "query.png"), "k": "3"}
    first = check_response(document, registry, api_client.post(S, data=form, content_type="multipart/form-data"), S, "POST")
    assert first["image_queries"] == 1 and first["query"] is None and first["upload_id"]
    again = api_client.get(f"/api/search?upload={first['upload_id']}&k=3&offset=3")
    second = check_response(document, registry, again, S, "GET")
    assert second["upload_id"] == first["upload_id"] and second["offset"] == 3
    both = {"image": (io.BytesIO(image_bytes("blue", "JPEG")), "q.jpg"), "q": "red -green", "sort": "newest"}
    mixed = check_response(document, registry, api_client.post(S, data=both, content_type="multipart/form-data"), S, "POST")
    assert mixed["image_queries"] == 1 and mixed["query"]["terms"]


@pytest.mark.parametrize("data, status", [
    ({"q": "red", "k": "2"}, 200),  # url-encoded form
    ({"q": "red", "type": ["png", "jpeg"]}, 200),
    ({}, 400),
    ({"q": "red", "k": "-1"}, 400),
    ({"image": (io.BytesIO(b"this is not an image"), "notes.txt")}, 400),
    ({"image": (io.BytesIO(b""), "empty.png")}, 400),
    ({"image": (io.BytesIO(b"\x89PNG\r\n\x1a\n" + b"\0" * 100), "truncated.png")}, 400),
])
def test_post_answers_match_the_document(api_client, document, registry, data, status):
    multipart = any(isinstance(value, tuple) for value in data.values())
    response = api_client.post(S, data=data, content_type="multipart/form-data" if multipart else None)
    check_response(document, registry, response, S, "POST")
    assert response.status_code == status


def test_too_large_upload_is_413(library, document, registry):
    from clipsearch.webui.app import create_app

    app = create_app(library["settings"], library["encoder"], {"TESTING": True, "MAX_CONTENT_LENGTH": 1024 * 1024})
    try:
        big = {"image": (io.BytesIO(os.urandom(1024 * 1024 + 10)), "big.jpg")}
        response = app.test_client().post(S, data=big, content_type="multipart/form-data")
        check_response(document, registry, response, S, "POST")
        assert response.status_code == 413
    finally:
        app.extensions["clipsearch"].close()


def test_access_token_answers(library, document, registry):
    from clipsearch.webui.app import create_app

    app = create_app(library["settings"], library["encoder"], {"TESTING": True, "ACCESS_TOKEN": "s3cret-token"})
    try:
        client = app.test_client()
        for path, url in [(ST, "/api/status"), (S, "/api/search?q=red"), ("/api/openapi.json", "/api/openapi.json")]:
            denied = client.get(url)
            check_response(document, registry, denied, path, "GET")
            assert denied.status_code == 401 and denied.headers["WWW-Authenticate"].startswith("Bearer")
            wrong = client.get(url, headers={"Authorization": "Bearer nope"})
            assert wrong.status_code == 401
            allowed = client.get(url, headers={"Authorization": "Bearer s3cret-token"})
            check_response(document, registry, allowed, path, "GET")
            assert allowed.status_code == 200
    finally:
        app.extensions["clipsearch"].close()


def test_empty_library_answers(settings, fake_encoder, document, registry):
    from clipsearch.webui.app import create_app

    app = create_app(settings, fake_encoder, {"TESTING": True})
    try:
        client = app.test_client()
        for path, method, url, data, status in [
            (ST, "GET", "/api/status", None, 200),
            (S, "GET", "/api/search?q=red", None, 409),
            (S, "GET", "/api/search?q=like:1", None, 409),
            (S, "POST", S, {"image": (io.BytesIO(image_bytes()), "q.png")}, 409),
            (SIM, "GET", "/api/similar/1", None, 404),
            (IMG, "GET", "/api/images/1", None, 404),
            (ST, "GET", "/api/status", None, 200),
        ]:
            response = client.open(url, method=method, data=data)
            body = check_response(document, registry, response, path, method)
            assert response.status_code == status, (url, body)
        assert body["exists"] is False, "reading an empty data dir must not create a library"
    finally:
        app.extensions["clipsearch"].close()
