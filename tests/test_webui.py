"""The web UI and JSON API through Flask's test client: every page and route, bad input, security."""

from __future__ import annotations

import io
import os

import pytest
from PIL import Image

from clipsearch.library import Library
from tests.fakes import make_image

pytestmark = pytest.mark.both_catalogs  # also on PostgreSQL (see tests/conftest.py)

SECURITY_HEADERS = ("Content-Security-Policy", "X-Content-Type-Options", "X-Frame-Options", "Referrer-Policy")


def image_id(settings, path) -> int:
    library = Library(settings)
    try:
        return library.catalog.image_by_path(str(path)).id
    finally:
        library.close()


def png_bytes(colour=(230, 20, 20), size=(40, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, "PNG")
    return buffer.getvalue()


# --- pages -----------------------------------------------------------------------------------------
def test_empty_library_page_explains_how_to_index(client):
    page = client.get("/")
    assert page.status_code == 200 and b'id="empty-library"' in page.data and b"clipsearch index" in page.data
    answer = client.get("/api/search?q=red")
    assert answer.status_code == 409 and "index" in answer.json["error"]["hint"]
    assert client.get("/api/status").json["exists"] is False
    assert client.get("/status").status_code == 200


def test_search_page_shows_results_with_query_in_url(client, photo_library):
    page = client.get("/?q=red")
    html = page.get_data(as_text=True)
    assert page.status_code == 200
    assert 'value="red"' in html and "autofocus" in html
    first_card = html.index('class="card')
    assert "red" in html[first_card : first_card + 600]
    assert 'loading="lazy"' in html and "/thumbs/" in html
    assert 'id="more"' not in html  # 12 photos fit on one page
    assert " ms" in html and "12 photos" in html


def test_intro_page_without_query(client, photo_library):
    html = client.get("/").get_data(as_text=True)
    assert "beach -people" in html and 'id="results"' not in html


def test_empty_result_says_so(client, photo_library):
    html = client.get("/?q=red&type=webp").get_data(as_text=True)
    assert 'id="no-results"' in html and "clearing some filters" in html


def test_combined_query_shows_how_it_was_understood(client, photo_library):
    html = client.get("/?q=2:red+-blue").get_data(as_text=True)
    assert 'id="understood"' in html and "2 × &#34;red&#34;" in html or "2 × &quot;red&quot;" in html


def test_paging_links_and_api_twin(client, photo_library):
    html = client.get("/?q=red&k=5").get_data(as_text=True)
    assert 'id="more"' in html and "offset=5" in html and "/api/search?" in html
    page2 = client.get("/api/search?q=red&k=5&offset=5").json
    assert page2["offset"] == 5 and len(page2["results"]) == 5 and page2["next_offset"] == 10


def test_date_sort_page(client, photo_library):
    html = client.get("/?q=red&sort=newest").get_data(as_text=True)
    assert "3 relevant photos, newest first" in html
    assert html.index("red3.jpg") < html.index("red2.jpg") < html.index("red1.png")


def test_filter_options_are_offered(client, photo_library):
    html = client.get("/?q=red").get_data(as_text=True)
    root = str(photo_library["home/red1.png"].parent.parent)
    assert f'value="{root}/trip"' in html and 'value="PNG"' in html and 'type="date"' in html


def test_image_page_and_api_twin(client, settings, photo_library):
    path = photo_library["home/red1.png"]
    ident = image_id(settings, path)
    html = client.get(f"/images/{ident}").get_data(as_text=True)
    assert str(path) in html and "64 × 48" in html and 'id="neighbours"' in html and f"q=like:{ident}" in html
    details = client.get(f"/api/images/{ident}").json
    assert details["path"] == str(path) and details["width"] == 64 and details["date_source"] == "file"
    assert {os.path.basename(n["path"]) for n in details["neighbours"][:2]} == {"red2.jpg", "red3.jpg"}
    assert all(n["id"] != ident for n in details["neighbours"])
    assert client.get("/images/99999").status_code == 404
    assert client.get("/api/images/99999").status_code == 404


def test_image_page_shows_camera_basics(client, settings, tmp_path, fake_encoder):
    from clipsearch.indexer.run import index_folders

    exif = Image.Exif()
    exif[0x010F], exif[0x0110] = "Canon", "Canon EOS 5D"
    path = tmp_path / "cam" / "shot.jpg"
    path.parent.mkdir()
    Image.new("RGB", (64, 48), (200, 30, 30)).save(path, exif=exif)
    index_folders(settings, [path.parent], encoder=fake_encoder)
    html = client.get(f"/images/{image_id(settings, path)}").get_data(as_text=True)
    assert "Canon EOS 5D" in html


def test_similar_redirects_to_like_query(client, settings, photo_library):
    ident = image_id(settings, photo_library["home/red1.png"])
    response = client.get(f"/similar/{ident}")
    assert response.status_code == 302 and f"q=like:{ident}" in response.headers["Location"]
    answer = client.get(f"/api/similar/{ident}?k=2").json
    assert {os.path.basename(r["path"]) for r in answer["results"]} == {"red2.jpg", "red3.jpg"}
    assert client.get("/api/similar/99999").status_code == 404


def test_status_page_lists_failures(client, settings, tmp_path, fake_encoder, photo_library):
    from clipsearch.indexer.run import index_folders

    broken = tmp_path / "photos" / "home" / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff not really")
    index_folders(settings, [tmp_path / "photos"], encoder=fake_encoder)
    html = client.get("/status").get_data(as_text=True)
    assert 'id="failures"' in html and "broken.jpg" in html and "test-colors" in html
    status = client.get("/api/status").json
    assert status["counts"]["failed"] == 1 and status["failures"][0]["path"].endswith("broken.jpg")
    assert status["vectors"] == 12 and status["filters"]["formats"]


def test_media_routes_serve_only_catalog_ids(client, settings, photo_library):
    ident = image_id(settings, photo_library["home/red1.png"])
    thumb = client.get(f"/thumbs/{ident}")
    assert thumb.status_code == 200 and thumb.mimetype == "image/jpeg" and "private" in thumb.headers["Cache-Control"]
    assert Image.open(io.BytesIO(thumb.data)).size[0] <= 400
    again = client.get(f"/thumbs/{ident}", headers={"If-None-Match": thumb.headers["ETag"]})
    assert again.status_code == 304
    original = client.get(f"/media/{ident}/original")
    assert original.status_code == 200 and original.data == photo_library["home/red1.png"].read_bytes()
    assert original.mimetype == "image/png"
    download = client.get(f"/media/{ident}/original?download=1")
    assert "attachment" in download.headers["Content-Disposition"]
    assert client.get(f"/media/{ident}").status_code == 200
    for path in ("/thumbs/../../etc/passwd", "/media/..%2F..%2Fetc%2Fpasswd", "/media/-1", "/thumbs/abc",
                 "/media/1/../../../etc/passwd", "/thumbs/99999", "/static/../app.py", "/media/%00"):
        response = client.get(path)
        assert response.status_code == 404, path
        assert b"root:" not in response.data


def test_vanished_file_is_a_clear_404(client, settings, photo_library):
    path = photo_library["trip/grey1.png"]
    ident = image_id(settings, path)
    path.unlink()
    response = client.get(f"/thumbs/{ident}")
    assert response.status_code == 404 and "no longer exists" in response.json["error"]["message"]
    html = client.get(f"/images/{ident}").get_data(as_text=True)
    assert "no longer exists" in html


def test_markup_in_file_names_and_queries_is_escaped(client, settings, tmp_path, fake_encoder):
    from clipsearch.indexer.run import index_folders

    make_image(tmp_path / "odd" / "<script>alert(1)<script>.png", "red")
    index_folders(settings, [tmp_path / "odd"], encoder=fake_encoder)
    html = client.get("/?q=red").get_data(as_text=True)
    assert "<script>alert(1)" not in html and "&lt;script&gt;alert(1)" in html
    html = client.get("/?q=%3Cimg+src%3Dx+onerror%3Dalert(1)%3E").get_data(as_text=True)
    assert "<img src=x onerror" not in html and "&lt;img src=x onerror=alert(1)&gt;" in html


# --- search by image ---------------------------------------------------------------------------------
def test_upload_search_api_and_paging(client, settings, photo_library):
    response = client.post("/api/search", data={"image": (io.BytesIO(png_bytes((20, 40, 230))), "q.png"), "k": "2"},
                           content_type="multipart/form-data")
    assert response.status_code == 200, response.json
    answer = response.json
    assert {os.path.basename(r["path"]) for r in answer["results"]} == {"blue1.png", "blue2.jpg"}
    upload = answer["upload_id"]
    page2 = client.get(f"/api/search?upload={upload}&k=2&offset=2").json
    assert page2["offset"] == 2 and len(page2["results"]) == 2
    assert client.get("/api/search?upload=" + "0" * 24).status_code == 400  # never uploaded
    assert client.get("/api/search?upload=../../etc").status_code == 400


def test_upload_page_redirects_to_shareable_results(client, photo_library, settings):
    before = sorted(p.name for p in settings.data_dir.iterdir())
    response = client.post("/", data={"image": (io.BytesIO(png_bytes((240, 230, 20))), "y.png"), "q": ""},
                           content_type="multipart/form-data")
    assert response.status_code == 303 and "upload=" in response.headers["Location"]
    html = client.get(response.headers["Location"]).get_data(as_text=True)
    assert html.index("yellow1.png") < html.index("red1.png") if "red1.png" in html else "yellow1.png" in html
    # The uploaded image is embedded, not stored: no new files in the library folder, no new catalog rows.
    after = sorted(p.name for p in settings.data_dir.iterdir())
    assert set(after) - set(before) <= {"renditions", "catalog.sqlite3-wal", "catalog.sqlite3-shm"}
    assert client.get("/api/status").json["counts"]["images"] == 12


def test_upload_with_text_combines(client, photo_library):
    answer = client.post("/api/search", data={"image": (io.BytesIO(png_bytes((20, 40, 230))), "q.png"), "q": "3:red", "k": "3"},
                         content_type="multipart/form-data").json
    assert os.path.basename(answer["results"][0]["path"]).startswith("red")
    assert answer["image_queries"] == 1


@pytest.mark.parametrize("payload, status, words", [
    (b"this is text, not an image", 400, "not an image"),
    (b"", 400, "empty"),
    (b"\x89PNG\r\n\x1a\n" + b"\x00" * 100, 400, "cannot use"),
])
def test_bad_uploads(client, photo_library, payload, status, words):
    response = client.post("/api/search", data={"image": (io.BytesIO(payload), "x.png")}, content_type="multipart/form-data")
    assert response.status_code == status and words in response.json["error"]["message"]


def test_upload_size_and_pixel_caps(settings, fake_encoder, photo_library):
    from clipsearch.config import with_overrides
    from clipsearch.webui.app import create_app

    settings = with_overrides(settings, max_upload_mb=1, max_image_pixels=1_000_000)
    client = create_app(settings, fake_encoder, {"TESTING": True}).test_client()
    big = os.urandom(2 * 1024 * 1024)
    response = client.post("/api/search", data={"image": (io.BytesIO(big), "big.jpg")}, content_type="multipart/form-data")
    assert response.status_code == 413 and "1 MB" in response.json["error"]["message"]
    page = client.post("/", data={"image": (io.BytesIO(big), "big.jpg")}, content_type="multipart/form-data")
    assert page.status_code == 413 and b"1 MB" in page.data
    # A small file that decodes to too many pixels (a decompression bomb) is refused before decoding.
    bomb = png_bytes(size=(2000, 1000))
    response = client.post("/api/search", data={"image": (io.BytesIO(bomb), "bomb.png")}, content_type="multipart/form-data")
    assert response.status_code == 400 and "too large" in response.json["error"]["message"]
    assert with_overrides  # imported for symmetry with other tests


# --- bad parameters ----------------------------------------------------------------------------------
@pytest.mark.parametrize("query", [
    "k=-1", "k=0", "k=1000000000", "k=abc", "k=1e3", "offset=-5", "offset=99999999", "sort=random", "relevance=nan",
    "relevance=-1", "relevance=inf", "from=yesterday", "from=2024-13-45", "to=2024-01-01&from=2024-02-01",
    "folder=relative/dir", "folder=%00", "type=jp%3Ceg", "upload=xyz", "q=like:abc", "q=beach%20-", "q=-people", "q=%2B",
    "q=" + "x" * 10_000, "q=0:red",
])
def test_bad_parameters_are_400_json(client, photo_library, query):
    base = "" if query.startswith("q=") else "q=red&"
    response = client.get(f"/api/search?{base}{query}")
    assert response.status_code == 400, (query, response.data[:300])
    error = response.json["error"]
    assert error["code"] == 400 and error["message"] and "Traceback" not in response.get_data(as_text=True)
    page = client.get(f"/?{base}{query}")
    assert page.status_code == 400 and b'id="query-error"' in page.data


def test_unicode_queries(client, photo_library):
    for text in ("красный", "赤い花", "🌅 sunset", "café crème", "red\u200b", "\u202eder"):
        response = client.get("/api/search", query_string={"q": text})
        assert response.status_code == 200, text
        page = client.get("/", query_string={"q": text})
        assert page.status_code == 200 and text.encode() in page.data


def test_nothing_to_search_for(client, photo_library):
    assert client.get("/api/search").status_code == 400
    assert client.get("/api/search?q=%20%20").status_code == 400


def test_unknown_route_and_method(client):
    assert client.get("/api/nope").status_code == 404 and client.get("/api/nope").json["error"]["code"] == 404
    assert client.delete("/api/search").status_code == 405


def test_unexpected_errors_are_500_without_traceback(client, app, photo_library, monkeypatch):
    def explode(request):
        raise RuntimeError("secret internals")

    monkeypatch.setattr(app.extensions["clipsearch"].searcher, "run", explode)
    response = client.get("/api/search?q=red")
    assert response.status_code == 500 and response.json["error"]["message"] == "internal error"
    assert b"secret internals" not in response.data and b"Traceback" not in response.data
    page = client.get("/?q=red")
    assert page.status_code == 500 and b"secret internals" not in page.data


# --- freshness ---------------------------------------------------------------------------------------
def test_server_sees_photos_indexed_by_another_process(client, settings, tmp_path, photo_library):
    from clipsearch.indexer.run import index_folders
    from tests.fakes import ColorWordEncoder

    assert "orange" not in client.get("/api/search?q=orange&k=1").json["results"][0]["path"]
    make_image(tmp_path / "photos" / "new" / "orange1.png", "orange")
    index_folders(settings, [tmp_path / "photos"], encoder=ColorWordEncoder())  # its own Library and catalog
    answer = client.get("/api/search?q=orange&k=1").json
    assert answer["results"][0]["path"].endswith("orange1.png") and answer["total"] == 13
    html = client.get("/?q=red").get_data(as_text=True)
    assert "/new" in html  # the folder filter offers the new folder too


# --- security ----------------------------------------------------------------------------------------
def test_security_headers_everywhere(client, photo_library, settings):
    ident = image_id(settings, photo_library["home/red1.png"])
    for path in ("/", "/?q=red", "/status", f"/images/{ident}", "/api/search?q=red", "/api/status", f"/thumbs/{ident}",
                 "/api/search?k=-1", "/nope"):
        response = client.get(path)
        for header in SECURITY_HEADERS:
            assert header in response.headers, (path, header)
        assert "frame-ancestors 'none'" in response.headers["Content-Security-Policy"]
        assert response.headers["X-Content-Type-Options"] == "nosniff"


def test_pages_have_no_inline_scripts_or_styles(client, photo_library):
    html = client.get("/?q=red").get_data(as_text=True)
    assert "<script>" not in html and " style=" not in html and "onclick" not in html


@pytest.fixture
def token_client(settings, fake_encoder, photo_library):
    from clipsearch.config import with_overrides
    from clipsearch.webui.app import create_app

    app = create_app(with_overrides(settings, access_token="s3cret-token"), fake_encoder, {"TESTING": True})
    return app.test_client()


def test_access_token_guards_pages_and_api(token_client):
    page = token_client.get("/?q=red")
    assert page.status_code == 302 and "/login" in page.headers["Location"]
    answer = token_client.get("/api/search?q=red")
    assert answer.status_code == 401 and answer.headers["WWW-Authenticate"].startswith("Bearer")
    assert token_client.get("/thumbs/1").status_code in (302, 401)
    assert token_client.get("/api/search?q=red", headers={"Authorization": "Bearer wrong"}).status_code == 401
    ok = token_client.get("/api/search?q=red", headers={"Authorization": "Bearer s3cret-token"})
    assert ok.status_code == 200 and ok.json["results"]
    assert token_client.get("/static/app.css").status_code == 200  # the log-in page needs its stylesheet


def test_login_flow(token_client):
    assert token_client.get("/login").status_code == 200
    wrong = token_client.post("/login", data={"token": "nope", "next": "/?q=red"})
    assert wrong.status_code == 401 and b"not the access token" in wrong.data
    right = token_client.post("/login", data={"token": "s3cret-token", "next": "/?q=red"})
    assert right.status_code == 303 and right.headers["Location"].endswith("/?q=red")
    assert token_client.get("/?q=red").status_code == 200
    assert token_client.get("/api/status").status_code == 200  # the session cookie works for the API too
    assert token_client.post("/logout").status_code == 303
    assert token_client.get("/?q=red").status_code == 302


@pytest.mark.parametrize("target", ["//evil.example/x", "https://evil.example/", "/\\evil.example", "javascript:alert(1)"])
def test_login_never_redirects_off_site(token_client, target):
    response = token_client.post("/login", data={"token": "s3cret-token", "next": target})
    assert response.status_code == 303 and response.headers["Location"] in ("/", "http://localhost/")


def test_session_cookie_flags(token_client):
    response = token_client.post("/login", data={"token": "s3cret-token"})
    cookie = response.headers["Set-Cookie"]
    assert "HttpOnly" in cookie and "SameSite=Lax" in cookie


@pytest.mark.parametrize("host, token, insecure, allowed", [
    ("127.0.0.1", None, False, True), ("localhost", None, False, True), ("::1", None, False, True),
    ("0.0.0.0", None, False, False), ("192.168.1.10", None, False, False), ("nas.local", None, False, False),
    ("0.0.0.0", "tok", False, True), ("0.0.0.0", None, True, True),
])
def test_binding_beyond_loopback_needs_a_token(settings, host, token, insecure, allowed):
    from clipsearch.config import with_overrides
    from clipsearch.errors import ConfigError
    from clipsearch.webui.security import check_exposure

    chosen = with_overrides(settings, host=host, insecure=insecure, **({"access_token": token} if token else {}))
    if allowed:
        check_exposure(chosen)
    else:
        with pytest.raises(ConfigError, match="access token"):
            check_exposure(chosen)


def test_session_key_is_private_and_stable(settings, fake_encoder):
    from clipsearch.webui.security import SECRET_FILE_NAME, load_secret_key

    first = load_secret_key(settings.data_dir)
    assert load_secret_key(settings.data_dir) == first and len(first) >= 32
    assert (settings.data_dir / SECRET_FILE_NAME).stat().st_mode & 0o077 == 0


def test_deleted_photo_is_never_shown_even_before_reindexing(client, photo_library):
    before = client.get("/api/search?q=red&k=3").json
    assert len(before["results"]) == 3
    photo_library["home/red2.jpg"].unlink()
    after = client.get("/api/search?q=red&k=3").json
    names = [os.path.basename(r["path"]) for r in after["results"]]
    assert "red2.jpg" not in names and len(names) == 2
    assert after["next_offset"] == 3  # the page still covered three ranks: paging goes on past the gap


def test_big_photos_are_viewed_as_a_rendition(client, settings, tmp_path, fake_encoder):
    from clipsearch.indexer.run import index_folders

    path = make_image(tmp_path / "big" / "wide.jpg", "blue", size=(3000, 1000))
    index_folders(settings, [path.parent], encoder=fake_encoder)
    ident = image_id(settings, path)
    view = client.get(f"/media/{ident}")
    assert view.status_code == 200 and view.mimetype == "image/jpeg"
    assert Image.open(io.BytesIO(view.data)).size == (2048, 683)
    assert client.get(f"/media/{ident}/original").data == path.read_bytes()
