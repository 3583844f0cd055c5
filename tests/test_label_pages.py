"""Label pages and their JSON twins: create/edit/delete labels, review photos, label filters; answers match the OpenAPI doc."""

from __future__ import annotations

from urllib.parse import quote

import pytest

from tests.test_openapi import check_response, document, registry  # noqa: F401  (document, registry: fixtures)

pytestmark = pytest.mark.both_catalogs  # also on PostgreSQL (see tests/conftest.py)


def stems(photos):
    return sorted(p["name"].split(".")[0] for p in photos)


@pytest.fixture
def colours(photo_library, client):
    """A library with the set 'colours' (red, blue) created through the web form."""
    for label in ("red", "blue"):
        response = client.post("/labels", data={"set": "colours", "label": label})
        assert response.status_code == 303 and response.headers["Location"] == f"/labels/colours/{label}"
    return client


def test_overview_of_an_empty_library(client, document, registry):
    page = client.get("/labels")
    assert page.status_code == 200 and b'id="no-labels"' in page.data and b"Add scenes" in page.data
    body = check_response(document, registry, client.get("/api/labels"), "/api/labels", "GET")
    assert body["sets"] == [] and not body["indexed"] and {p["name"] for p in body["presets"]} >= {"scenes", "pets"}


def test_created_labels_fill_their_pages(colours, document, registry):
    page = colours.get("/labels/colours/red")
    assert page.status_code == 200 and page.data.count(b'class="card') == 3 and b"no reviews yet" in page.data
    body = check_response(document, registry, colours.get("/api/labels/colours/red"), "/api/labels/{set_name}/{name}", "GET")
    assert stems(body["photos"]) == ["red1", "red2", "red3"] and body["label"]["photos"] == 3
    strengths = [p["strength"] for p in body["photos"]]
    assert strengths == sorted(strengths, reverse=True)  # most confident first
    overview = check_response(document, registry, colours.get("/api/labels"), "/api/labels", "GET")
    (labels,) = [s["labels"] for s in overview["sets"] if s["name"] == "colours"]
    assert {l["name"]: len(l["top"]) for l in labels} == {"red": 3, "blue": 2}
    html = colours.get("/labels").data
    assert b"red" in html and html.count(b'<img src="/thumbs/') == 5


def test_paging_a_label(colours, document, registry):
    first = check_response(document, registry, colours.get("/api/labels/colours/red?k=2"), "/api/labels/{set_name}/{name}", "GET")
    assert len(first["photos"]) == 2 and first["next_offset"] == 2
    rest = colours.get(f"/api/labels/colours/red?k=2&offset={first['next_offset']}").get_json()
    assert len(rest["photos"]) == 1 and rest["next_offset"] is None
    assert b'id="label-more"' in colours.get("/labels/colours/red?k=2").data


def test_bad_labels_are_refused_with_a_reason(photo_library, client, document, registry):
    page = client.post("/labels", data={"set": "a/b", "label": "red"})
    assert page.status_code == 400 and b'id="label-error"' in page.data and b"holds &#39;/&#39;" in page.data
    answer = client.post("/api/labels", json={"set": "s", "label": "  "})
    assert check_response(document, registry, answer, "/api/labels", "POST")["error"]["code"] == 400
    answer = client.post("/api/labels", json={"set": "s", "label": "x", "threshold": 2})
    assert answer.status_code == 400 and "between 0 and 1" in answer.get_json()["error"]["message"]
    assert client.post("/api/labels", data="{not json", content_type="application/json").status_code == 400
    assert client.get("/labels/nope/red").status_code == 400
    missing = client.get("/api/labels/nope/red")
    assert check_response(document, registry, missing, "/api/labels/{set_name}/{name}", "GET")["error"]["hint"]


def test_reviews_change_membership_and_the_estimate(colours, document, registry):
    path = "/api/labels/{set_name}/{name}/reviews"
    photos = colours.get("/api/labels/colours/red").get_json()["photos"]
    confirm = colours.post("/api/labels/colours/red/reviews", json={"image_id": photos[0]["id"], "verdict": "confirm"})
    answer = check_response(document, registry, confirm, path, "POST")
    assert answer["holds_label"] and answer["quality"]["precision"]["precision"] == 1.0
    reject = colours.post("/api/labels/colours/red/reviews", json={"image_id": photos[2]["id"], "verdict": "reject"})
    answer = check_response(document, registry, reject, path, "POST")
    assert not answer["holds_label"] and answer["quality"]["precision"]["precision"] == 0.5 and answer["photos"] == 2
    page = colours.get("/labels/colours/red").data.decode()
    assert "about 50% right: 1 of 2 reviewed photos" in page and page.count('class="card') == 2
    rejected = check_response(document, registry, colours.get("/api/labels/colours/red?reviewed=reject"),
                              "/api/labels/{set_name}/{name}", "GET")
    assert [p["id"] for p in rejected["photos"]] == [photos[2]["id"]] and rejected["photos"][0]["verdict"] == "reject"
    undo = colours.post("/api/labels/colours/red/reviews", json={"image_id": photos[2]["id"], "verdict": "clear"})
    assert check_response(document, registry, undo, path, "POST")["holds_label"]
    bad = colours.post("/api/labels/colours/red/reviews", json={"image_id": "x", "verdict": "confirm"})
    assert check_response(document, registry, bad, path, "POST")["error"]["code"] == 400
    assert colours.post("/api/labels/colours/red/reviews", json={"image_id": photos[0]["id"], "verdict": "meh"}).status_code == 400


def test_reviews_work_without_javascript(colours):
    photo = colours.get("/api/labels/colours/red").get_json()["photos"][0]
    response = colours.post("/labels/colours/red", data={"action": "review", "image_id": photo["id"], "verdict": "reject",
                                                         "next": "/labels/colours/red?k=10"})
    assert response.status_code == 303 and response.headers["Location"] == "/labels/colours/red?k=10"
    response = colours.post("/labels/colours/red", data={"action": "review", "image_id": photo["id"], "verdict": "confirm",
                                                         "next": "https://evil.example/"})
    assert response.headers["Location"] == "/"  # no open redirect
    assert colours.get("/api/labels/colours/red").get_json()["quality"]["confirmed"] == 1


def test_editing_renaming_and_deleting(colours, document, registry):
    edit = colours.patch("/api/labels/colours/red", json={"name": "warm", "prompts": ["a yellow photo"], "threshold": 0.4})
    body = check_response(document, registry, edit, "/api/labels/{set_name}/{name}", "PATCH")
    assert body["label"] == "warm" and body["applied"]["assigned"]["warm"] == 1
    assert stems(colours.get("/api/labels/colours/warm").get_json()["photos"]) == ["yellow1"]
    form = colours.post("/labels/colours/warm", data={"action": "edit", "name": "warm", "prompts": "", "threshold": ""})
    assert form.status_code == 303
    label = colours.get("/api/labels/colours/warm").get_json()["label"]
    assert label["prompts"] is None and label["threshold"] is None
    clash = colours.post("/labels/colours/warm", data={"action": "edit", "name": "blue"})
    assert clash.status_code == 400 and b"already has a label" in clash.data
    removed = colours.delete("/api/labels/colours/warm")
    assert check_response(document, registry, removed, "/api/labels/{set_name}/{name}", "DELETE") == {"removed": "colours/warm"}
    assert colours.get("/api/labels/colours/warm").status_code == 400
    gone = colours.delete("/api/labels/colours")
    assert check_response(document, registry, gone, "/api/labels/{set_name}", "DELETE") == {"removed": "colours"}
    assert colours.get("/api/labels").get_json()["sets"] == []


def test_apply_and_presets(colours, document, registry):
    report = check_response(document, registry, colours.post("/api/labels/colours/apply"), "/api/labels/{set_name}/apply", "POST")
    assert report["assigned"] == {"red": 3, "blue": 2} and report["images"] == 12 and report["encoded_labels"] == 0
    added = colours.post("/api/labels", json={"preset": "pets"})
    assert check_response(document, registry, added, "/api/labels", "POST")["added"]["pets"] > 0
    assert colours.post("/labels", data={"preset": "documents"}).status_code == 303
    assert {"pets", "documents", "colours"} <= {s["name"] for s in colours.get("/api/labels").get_json()["sets"]}
    assert colours.post("/labels/colours", data={"action": "apply"}).status_code == 303


def test_image_pages_show_labels(colours, document, registry):
    photo = colours.get("/api/labels/colours/blue").get_json()["photos"][0]
    details = check_response(document, registry, colours.get(f"/api/images/{photo['id']}"), "/api/images/{image_id}", "GET")
    assert [(l["set"], l["label"]) for l in details["labels"]] == [("colours", "blue")]
    page = colours.get(f"/images/{photo['id']}").data.decode()
    assert 'id="image-labels"' in page and 'href="/labels/colours/blue"' in page


def test_search_filtered_by_a_label(colours, document, registry):
    answer = check_response(document, registry, colours.get("/api/search?q=blue&label=colours/red"), "/api/search", "GET")
    assert answer["filters"]["labels"] == ["colours/red"]
    assert stems(answer["results"]) == ["red1", "red2", "red3"]
    both = colours.get("/api/search?q=blue&label=colours/red&label=colours/blue").get_json()
    assert both["results"] == []  # no photo holds both
    assert colours.get("/api/search?q=red&label=colours/nope").status_code == 400
    assert colours.get("/api/search?q=red&label=nolabel").status_code == 400
    status = check_response(document, registry, colours.get("/api/status"), "/api/status", "GET")
    assert status["filters"]["labels"][0]["labels"] == [["colours/red", "red", 3], ["colours/blue", "blue", 2]]
    page = colours.get("/?q=blue&label=colours/red").data.decode()
    assert 'id="filter-label"' in page and 'value="colours/red" selected' in page
    assert "label=colours/red" in colours.get("/labels/colours/red").data.decode()  # "search within this label"


def test_label_names_with_slashes_and_spaces(photo_library, client):
    assert client.post("/api/labels", json={"set": "my set", "label": "red/ish thing", "prompts": "a red photo"}).status_code == 201
    url = "/api/labels/" + quote("my set") + "/" + quote("red/ish thing")
    assert stems(client.get(url).get_json()["photos"]) == ["red1", "red2", "red3"]
    assert client.get("/labels/" + quote("my set") + "/" + quote("red/ish thing")).status_code == 200


def test_changes_from_other_sites_are_refused(colours):
    for headers in ({"Sec-Fetch-Site": "cross-site"}, {"Origin": "https://evil.example"}, {"Origin": "null"}):
        response = colours.post("/api/labels", json={"set": "s", "label": "x"}, headers=headers)
        assert response.status_code == 403, headers
        assert colours.delete("/api/labels/colours", headers=headers).status_code == 403
    assert colours.post("/api/labels", json={"set": "s", "label": "x"}, headers={"Sec-Fetch-Site": "same-origin"}).status_code == 201
    assert colours.post("/api/labels", json={"set": "s", "label": "y"},
                        headers={"Origin": "http://localhost"}).status_code == 201  # the test client's host
    assert colours.get("/api/labels", headers={"Sec-Fetch-Site": "cross-site"}).status_code == 200  # reads are not changes


def test_a_busy_library_answers_503(colours, settings, monkeypatch):
    from clipsearch.library import Library
    from clipsearch.webui import label_views

    monkeypatch.setattr(label_views, "WRITE_WAIT_S", 0.3)
    other = Library(settings)
    with other.writer_lock("index"):
        answer = colours.post("/api/labels", json={"set": "colours", "label": "green"})
    other.close()
    assert answer.status_code == 503 and "being written" in answer.get_json()["error"]["message"]
    assert colours.post("/api/labels", json={"set": "colours", "label": "green"}).status_code == 201
