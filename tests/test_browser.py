"""The web UI in a real browser: headless Chromium (via Selenium) against a real `clipsearch serve` subprocess.

One server and one browser serve the whole module. Without Chromium, chromedriver or selenium the module is skipped
(tests/install-browser.sh installs them), except in CI (CI=true), where these tests must run and fail instead.
Screenshots, the server log and chromedriver's log go to test-artifacts/browser/ ($CLIPSEARCH_TEST_ARTIFACTS overrides).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest

from tests.browser_server import (
    MARKUP_NAME,
    REPO,
    build_library,
    find_chromedriver,
    find_chromium,
    start_chromium,
    start_server,
)
from tests.fakes import make_image

try:
    from selenium.common.exceptions import NoAlertPresentException, TimeoutException
    from selenium.webdriver import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import Select, WebDriverWait
except ImportError as e:  # the dev extras install selenium
    SELENIUM_MISSING = f"selenium is not installed ({e}): pip install -e '.[dev]'"
else:
    SELENIUM_MISSING = None

IN_CI = os.environ.get("CI", "").lower() == "true"
ARTIFACTS = Path(os.environ.get("CLIPSEARCH_TEST_ARTIFACTS") or REPO / "test-artifacts") / "browser"
CHROMIUM = find_chromium()
CHROMEDRIVER = find_chromedriver()
MISSING = SELENIUM_MISSING or (
    "Chromium is not installed: run tests/install-browser.sh (Debian: apt-get install chromium chromium-driver)"
    if not CHROMIUM else
    "chromedriver is not installed: run tests/install-browser.sh (Debian: apt-get install chromium-driver)"
    if not CHROMEDRIVER else None
)
if MISSING and not IN_CI:
    pytest.skip(f"browser tests skipped: {MISSING}", allow_module_level=True)

WAIT_S = 15
PAGE_SIZE = 40  # clipsearch.webui.forms.PAGE_SIZE: results per page in the browser
SCORE_RE = re.compile(r"^-?\d+\.\d{3}$")
# Chromium asks every site for /favicon.ico and logs the 404 as a console error: the UI has no favicon (known gap).
IGNORED_CONSOLE: tuple[str, ...] = ()


# --- Fixtures: one library, one server, one browser for the module.

@pytest.fixture(scope="module")
def library(tmp_path_factory):
    return build_library(tmp_path_factory.mktemp("browser-library"))


@pytest.fixture(scope="module")
def server(library, tmp_path_factory):
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    running = start_server(library, tmp_path_factory.mktemp("server-home"), ARTIFACTS / "server.log")
    yield running
    running.stop()


@pytest.fixture(scope="module")
def driver(tmp_path_factory):
    if MISSING:  # only reached in CI, where a missing browser must fail rather than skip
        pytest.fail(f"CI=true but the browser tests cannot run: {MISSING}", pytrace=False)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    browser = start_chromium(CHROMIUM, CHROMEDRIVER, tmp_path_factory.mktemp("chromium-profile"),
                             ARTIFACTS / "chromedriver.log")
    yield browser
    browser.quit()


@pytest.fixture
def browser(driver, server, request):
    """The shared browser, its console checked after each test and its last page kept as a screenshot."""
    driver.get_log("browser")  # drop what earlier tests left
    yield driver
    try:
        driver.save_screenshot(str(ARTIFACTS / f"{request.node.name}.png"))
    except Exception:  # an open alert (a failed XSS check) blocks screenshots: the test already failed
        return
    problems = console_problems(driver)
    assert not problems, "the browser console reported:\n" + "\n".join(problems)


def console_problems(driver) -> list[str]:
    """Console errors and Content-Security-Policy violations since the last call (the log is drained)."""
    problems = []
    for entry in driver.get_log("browser"):
        message = entry.get("message", "")
        if any(ignored in message for ignored in IGNORED_CONSOLE):
            continue
        if entry.get("level") == "SEVERE" or "Content Security Policy" in message or "Refused to" in message:
            problems.append(f"{entry.get('level')} {entry.get('source')}: {message}")
    return problems


# --- Helpers.

def wait(driver, timeout: float = WAIT_S) -> WebDriverWait:
    return WebDriverWait(driver, timeout)


def search_box(driver):
    return wait(driver).until(EC.element_to_be_clickable((By.CSS_SELECTOR, "form.search input[name=q]")))


def search(driver, server, text: str) -> None:
    """Open the home page, type text into the search box and press Enter; wait for the results page."""
    driver.get(server.url)
    box = search_box(driver)
    box.send_keys(text, Keys.ENTER)
    wait_for_page(driver, lambda path, query: path == "/" and query.get("q") == [text])
    wait(driver).until(EC.presence_of_element_located((By.ID, "summary")))


def query_of(url: str) -> dict[str, list[str]]:
    return parse_qs(urlsplit(url).query)


def wait_for_page(driver, arrived, message: str = "") -> dict[str, list[str]]:
    """Wait until the browser shows a page whose (path, query parameters) pass arrived, fully loaded.

    Navigations started by a click or a key press do not block the driver: wait for the new URL (arrived must not
    accept the previous page's), then for that document to finish loading. Returns the query parameters.
    """
    def loaded(d):
        url = urlsplit(d.current_url)
        return arrived(url.path, parse_qs(url.query)) and d.execute_script("return document.readyState") == "complete"

    wait(driver).until(loaded, message or "the expected page did not load")
    return query_of(driver.current_url)


def cards(driver) -> list:
    return driver.find_elements(By.CSS_SELECTOR, "#results figure.card")


def names(driver) -> list[str]:
    return driver.execute_script(
        "return Array.from(document.querySelectorAll('#results figure.card .name')).map(e => e.textContent)")


def paths(driver) -> list[str]:
    """Indexed paths of the results, from the thumbnail links' titles ('PATH — score S')."""
    return driver.execute_script(
        "return Array.from(document.querySelectorAll('#results figure.card a.thumb'))"
        ".map(a => a.title.split(' — score ')[0])")


def card_ids(driver) -> list[str]:
    return driver.execute_script(
        "return Array.from(document.querySelectorAll('#results figure.card')).map(e => e.dataset.id)")


def wait_images_loaded(driver, images) -> None:
    """Wait until every img element has loaded a picture (naturalWidth > 0: not broken, not pending)."""
    assert images
    script = "return arguments[0].filter(img => !(img.complete && img.naturalWidth > 0)).map(img => img.src)"
    try:
        wait(driver).until(lambda d: not d.execute_script(script, images))
    except TimeoutException:
        pytest.fail(f"images did not load: {driver.execute_script(script, images)}")


def assert_no_alert(driver) -> None:
    try:
        alert = driver.switch_to.alert
    except NoAlertPresentException:
        return
    text = alert.text
    alert.dismiss()
    pytest.fail(f"the page ran injected script: alert({text!r})")


def colour_of(name: str) -> str:
    return re.sub(r"\d+\.\w+$", "", name)


# --- Tests.

def test_text_search_from_the_search_box(browser, server):
    browser.get(server.url)
    box = search_box(browser)
    assert browser.switch_to.active_element == box, "the search box should have the focus (autofocus)"
    ActionChains(browser).send_keys("red", Keys.ENTER).perform()  # typed where the focus is: the box
    wait_for_page(browser, lambda path, query: query.get("q") == ["red"])
    wait(browser).until(EC.presence_of_element_located((By.CSS_SELECTOR, "#results figure.card")))
    assert colour_of(names(browser)[0]) == "red", names(browser)[:5]
    assert search_box(browser).get_attribute("value") == "red"
    assert len(cards(browser)) == PAGE_SIZE

    first = cards(browser)[0]
    score = first.find_element(By.CSS_SELECTOR, ".score")
    ActionChains(browser).move_to_element(first).perform()
    wait(browser).until(lambda d: score.value_of_css_property("opacity") == "1", "hovering shows the score")
    assert SCORE_RE.match(score.text), score.text
    assert float(score.text) > 0.9

    first_row = [card.find_element(By.TAG_NAME, "img") for card in cards(browser)[:5]]
    wait_images_loaded(browser, first_row)
    browser.save_screenshot(str(ARTIFACTS / "results.png"))


def test_image_page_then_more_like_this(browser, server, library):
    search(browser, server, "red")
    first = cards(browser)[0]
    image_id, name = first.get_attribute("data-id"), first.find_element(By.CSS_SELECTOR, ".name").text
    first.find_element(By.CSS_SELECTOR, "a.thumb").click()

    wait_for_page(browser, lambda path, query: path == f"/images/{image_id}")
    assert browser.find_element(By.ID, "image-page").get_attribute("data-id") == image_id
    assert browser.find_element(By.CSS_SELECTOR, ".facts h1").text == name
    wait_images_loaded(browser, [browser.find_element(By.ID, "full-image")])
    assert urlsplit(browser.find_element(By.ID, "original-link").get_attribute("href")).path.startswith("/media/")
    neighbours = browser.find_elements(By.CSS_SELECTOR, "#neighbours figure.card")
    assert neighbours and image_id not in [n.get_attribute("data-id") for n in neighbours]
    assert colour_of(neighbours[0].find_element(By.CSS_SELECTOR, ".name").text) == "red"

    browser.find_element(By.ID, "more-like-this").click()
    wait_for_page(browser, lambda path, query: query.get("q") == [f"like:{image_id}"])
    wait(browser).until(EC.presence_of_element_located((By.CSS_SELECTOR, "#results figure.card")))
    found = names(browser)
    assert colour_of(found[0]) == "red" and found[0] != name, found[:5]
    assert found[: len(library.by_colour["red"]) - 1] and all(
        colour_of(n) == "red" for n in found[: len(library.by_colour["red"]) - 1]), found[:8]
    assert image_id not in card_ids(browser), "an image is never more like itself"
    assert f"#{image_id}" in browser.find_element(By.ID, "understood").text


def test_search_by_uploaded_image(browser, server, tmp_path):
    photo = make_image(tmp_path / "holiday.jpg", "orange", size=(90, 70), noise=5)  # not in the library
    browser.get(server.url)
    upload = wait(browser).until(EC.presence_of_element_located((By.ID, "image-input")))
    upload.send_keys(str(photo))  # the input is visually hidden behind its label; the change submits the form
    query = wait_for_page(browser, lambda path, query: "upload" in query, "the upload did not lead to its results")
    assert re.fullmatch(r"[0-9a-f]{24}", query["upload"][0])
    wait(browser).until(EC.presence_of_element_located((By.CSS_SELECTOR, "#results figure.card")))
    assert "Searching with your image" in browser.find_element(By.ID, "summary").text
    assert colour_of(names(browser)[0]) == "orange", names(browser)[:5]
    wait_images_loaded(browser, [cards(browser)[0].find_element(By.TAG_NAME, "img")])


def test_filters_by_folder_and_file_type(browser, server, library):
    search(browser, server, "red")
    filters = browser.find_element(By.CSS_SELECTOR, "details.filters")
    assert filters.get_attribute("open") is None
    filters.find_element(By.TAG_NAME, "summary").click()
    folder = str(library.photos / "b")
    Select(wait(browser).until(EC.element_to_be_clickable((By.ID, "filter-folder")))).select_by_value(folder)
    wait_for_page(browser, lambda path, query: query.get("folder") == [folder])  # applied on change
    wait(browser).until(EC.presence_of_element_located((By.CSS_SELECTOR, "#results figure.card")))
    in_b = [str(p) for paths_ in library.by_colour.values() for p in paths_ if p.parent == library.photos / "b"]
    assert sorted(paths(browser)) == sorted(in_b)
    assert colour_of(names(browser)[0]) == "red"
    assert browser.find_element(By.CSS_SELECTOR, "details.filters").get_attribute("open") is not None
    assert query_of(browser.current_url)["q"] == ["red"]

    Select(browser.find_element(By.ID, "filter-folder")).select_by_value("")  # all folders again
    wait_for_page(browser, lambda path, query: "folder" not in query)
    filters = wait(browser).until(EC.presence_of_element_located((By.CSS_SELECTOR, "details.filters")))
    if filters.get_attribute("open") is None:  # closed again once no filter is active
        filters.find_element(By.TAG_NAME, "summary").click()
    png = wait(browser).until(EC.element_to_be_clickable((By.CSS_SELECTOR, "#filters-form input[name=type][value=PNG]")))
    png.click()
    wait_for_page(browser, lambda path, query: query.get("type") == ["PNG"])
    wait(browser).until(EC.presence_of_element_located((By.CSS_SELECTOR, "#results figure.card")))
    found = names(browser)
    expected = [p.name for paths_ in library.by_colour.values() for p in paths_ if p.suffix == ".png"]
    assert sorted(found) == sorted(expected)

    Select(browser.find_element(By.ID, "filter-folder")).select_by_value(folder)  # b/ holds no PNG
    wait_for_page(browser, lambda path, query: query.get("folder") == [folder])
    no_results = wait(browser).until(EC.presence_of_element_located((By.ID, "no-results")))
    assert "clearing some filters" in no_results.text
    assert not cards(browser)


def test_order_by_date_keeps_only_relevant_results(browser, server, library):
    search(browser, server, "red")
    browser.find_element(By.CSS_SELECTOR, "details.filters summary").click()
    Select(wait(browser).until(EC.element_to_be_clickable((By.ID, "filter-sort")))).select_by_value("newest")
    wait_for_page(browser, lambda path, query: query.get("sort") == ["newest"])
    summary = wait(browser).until(EC.presence_of_element_located((By.ID, "summary")))
    assert "newest first" in summary.text
    found = names(browser)  # the reds stand out for "red" (and the oranges close to them); the rest are dropped
    assert {p.name for p in library.by_colour["red"]} <= set(found) and len(found) < library.count / 2, found
    assert search_box(browser).get_attribute("value") == "red"


def test_combined_query_is_explained(browser, server):
    search(browser, server, "red -blue")
    understood = wait(browser).until(EC.visibility_of_element_located((By.ID, "understood")))
    assert "red" in understood.text and "blue" in understood.text, understood.text
    assert colour_of(names(browser)[0]) == "red"
    search(browser, server, "red")
    assert not browser.find_elements(By.ID, "understood"), "a simple query needs no explanation"


def test_markup_in_a_query_is_shown_as_text(browser, server):
    attack = "<script>alert(1)</script>"
    search(browser, server, attack)
    assert_no_alert(browser)
    assert search_box(browser).get_attribute("value") == attack
    assert browser.title.startswith(attack)
    scripts = browser.execute_script("return Array.from(document.scripts).map(s => s.src || s.textContent)")
    assert all(src.startswith(server.url + "static/") for src in scripts), scripts
    # The query text also comes back in the upload and filter forms' hidden fields, and in error messages.
    hidden = browser.find_elements(By.CSS_SELECTOR, "#filters-form input[name=q], #upload-form input[name=q]")
    assert hidden and all(h.get_attribute("value") == attack for h in hidden)

    bad = server.url + "?q=red&sort=%3Cimg%20src%3Dx%20onerror%3Dalert(2)%3E"  # echoed in the error message
    browser.get(bad)
    error = wait(browser).until(EC.presence_of_element_located((By.ID, "query-error")))
    assert "<img src=x onerror=alert(2)>" in error.text
    assert not error.find_elements(By.TAG_NAME, "img")
    assert_no_alert(browser)
    # The page's own 400 status is the one console error expected here.
    assert [p for p in console_problems(browser) if not p.startswith(f"SEVERE network: {bad} ")] == []


def test_file_name_with_markup_is_shown_as_text(browser, server, library):
    search(browser, server, "purple")
    card = next((c for c in cards(browser) if c.find_element(By.CSS_SELECTOR, ".name").text == MARKUP_NAME), None)
    assert card is not None, names(browser)[:10]
    label = card.find_element(By.CSS_SELECTOR, ".name")
    assert browser.execute_script("return arguments[0].childElementCount", label) == 0
    assert card.find_element(By.TAG_NAME, "img").get_attribute("alt") == MARKUP_NAME

    card.find_element(By.CSS_SELECTOR, "a.thumb").click()
    wait_for_page(browser, lambda path, query: path.startswith("/images/"))
    heading = browser.find_element(By.CSS_SELECTOR, "#image-page .facts h1")
    assert heading.text == MARKUP_NAME
    assert browser.execute_script("return arguments[0].childElementCount", heading) == 0
    assert browser.find_element(By.CSS_SELECTOR, ".facts .path").text == str(library.markup_file)
    assert browser.title.startswith(MARKUP_NAME)
    wait_images_loaded(browser, [browser.find_element(By.ID, "full-image")])


def test_infinite_scroll_loads_the_next_pages_in_place(browser, server, library):
    search(browser, server, "green -purple")  # purple last: the file named with markup is on the last page
    url = browser.current_url
    assert len(cards(browser)) == PAGE_SIZE
    browser.find_element(By.ID, "more")
    assert library.count > PAGE_SIZE

    browser.execute_script("window.scrollTo(0, document.body.scrollHeight)")
    wait(browser).until(lambda d: len(cards(d)) > PAGE_SIZE, "scrolling to the end loads more results")
    # Keep scrolling until every photo is shown and the "More results" link is gone.
    wait(browser).until(lambda d: d.execute_script(
        "window.scrollTo(0, document.body.scrollHeight); return !document.getElementById('more')"))
    assert browser.current_url == url, "more results load in place, without navigating"
    ids = card_ids(browser)
    assert len(ids) == library.count and len(set(ids)) == len(ids)
    assert colour_of(names(browser)[0]) == "green"
    assert len(browser.find_elements(By.ID, "weak-divider")) <= 1

    # Cards added by script are complete: name, score, links, a thumbnail that loads when scrolled into view.
    added = browser.execute_script(
        "return Array.from(document.querySelectorAll('#results figure.card')).slice(arguments[0]).map(c => ({"
        "name: c.querySelector('.name').textContent, nameElements: c.querySelector('.name').childElementCount,"
        "score: c.querySelector('.score').textContent, page: c.querySelector('a.thumb').pathname,"
        "like: c.querySelector('a.like').href, alt: c.querySelector('img').alt, id: c.dataset.id}))", PAGE_SIZE)
    assert len(added) == library.count - PAGE_SIZE
    for card in added:
        assert card["name"] and card["alt"] == card["name"] and card["nameElements"] == 0, card
        assert SCORE_RE.match(card["score"]), card
        assert card["page"] == f"/images/{card['id']}", card
        assert urlsplit(card["like"]).path == "/" and query_of(card["like"])["q"] == [f"like:{card['id']}"], card
    assert MARKUP_NAME in [card["name"] for card in added]  # a file name with markup, added by script, is text too
    last = cards(browser)[-1]
    browser.execute_script("arguments[0].scrollIntoView()", last)
    wait_images_loaded(browser, [last.find_element(By.TAG_NAME, "img")])

    last_id = last.get_attribute("data-id")
    last.find_element(By.CSS_SELECTOR, "a.like").click()  # "More like this" of a card added by script
    wait_for_page(browser, lambda path, query: query.get("q") == [f"like:{last_id}"])
    wait(browser).until(EC.presence_of_element_located((By.CSS_SELECTOR, "#results figure.card")))
    assert last_id not in card_ids(browser)


def test_status_page(browser, server, library):
    browser.get(server.url)
    browser.find_element(By.LINK_TEXT, "Status").click()
    wait_for_page(browser, lambda path, query: path == "/status")
    status = browser.find_element(By.ID, "status")
    assert f"{library.count} indexed, 1 failed" in status.text
    failures = browser.find_element(By.ID, "failures")
    assert str(library.broken_file) in failures.text


def test_content_security_policy_is_enforced_and_reported(browser, server):
    """Inline script is refused, and the refusal reaches the console check: the checks above are not vacuous."""
    search(browser, server, "red")
    browser.execute_script(
        "document.getElementById('summary').insertAdjacentHTML('beforeend',"
        " '<img id=injected src=\"data:,\" onerror=\"window.injectedRan = true\">')")
    wait(browser).until(lambda d: any("Content Security Policy" in p for p in console_problems(d)))
    assert browser.execute_script("return document.getElementById('injected').complete && window.injectedRan === undefined")


def test_pages_log_no_console_errors(browser, server):
    """Every page type, the browser console checked after each (the fixture also checks after every test)."""
    for path in ("", "?q=red", "?q=red+-blue&sort=newest&relevance=2", "images/1", "similar/2", "status", "labels"):
        browser.get(server.url + path)
        wait(browser).until(lambda d: d.execute_script("return document.readyState") == "complete")
        problems = console_problems(browser)
        assert not problems, f"/{path}:\n" + "\n".join(problems)


def first_visible_undo(cards):
    return next((c for c in cards if c.find_element(By.CSS_SELECTOR, "button.undo").is_displayed()), None)


def label_card_ids(driver) -> list[str]:
    return driver.execute_script(
        "return Array.from(document.querySelectorAll('#label-photos figure.card')).map(e => e.dataset.id)")


def test_create_a_label_then_confirm_and_reject_photos(browser, server, library):
    """Create a label in the UI, see its page fill, review two photos and see the precision estimate follow."""
    browser.get(server.url + "labels")
    browser.find_element(By.LINK_TEXT, "Labels")  # the header links here
    wait(browser).until(EC.element_to_be_clickable((By.ID, "new-label-set"))).send_keys("colours")
    browser.find_element(By.ID, "new-label-name").send_keys("green")
    browser.find_element(By.ID, "create-label").click()
    wait_for_page(browser, lambda path, query: path == "/labels/colours/green")
    photos = browser.find_elements(By.CSS_SELECTOR, "#label-photos figure.card")
    found = [p.find_element(By.CSS_SELECTOR, ".name").text for p in photos]
    assert len(found) == len(library.by_colour["green"]) and all(colour_of(n) == "green" for n in found), found
    wait_images_loaded(browser, [p.find_element(By.TAG_NAME, "img") for p in photos])
    precision = browser.find_element(By.ID, "label-precision")
    assert precision.text.startswith("no reviews yet")
    assert not first_visible_undo(photos), "undo shows only on reviewed photos"

    first, second = photos[0], photos[1]
    first.find_element(By.CSS_SELECTOR, "button.confirm").click()
    wait(browser).until(lambda d: precision.text.startswith("about 100% right: 1 of 1 reviewed photo"), precision.text)
    assert "reviewed-confirm" in first.get_attribute("class")
    assert first.find_element(By.CSS_SELECTOR, "button.confirm").get_attribute("aria-pressed") == "true"
    rejected_id = second.get_attribute("data-id")
    second.find_element(By.CSS_SELECTOR, "button.reject").click()
    wait(browser).until(lambda d: precision.text.startswith("about 50% right: 1 of 2 reviewed photos"), precision.text)
    assert "reviewed-reject" in second.get_attribute("class")
    assert second.find_element(By.CSS_SELECTOR, "button.undo").is_displayed()
    assert browser.find_element(By.ID, "rejected-count").text == "1"
    assert browser.find_element(By.ID, "label-count").text == f"{len(found) - 1} photos"
    assert browser.current_url.endswith("/labels/colours/green"), "reviews update the page in place"

    browser.refresh()
    wait(browser).until(EC.presence_of_element_located((By.ID, "label-photos")))
    assert rejected_id not in label_card_ids(browser)
    assert browser.find_element(By.ID, "label-precision").text.startswith("about 50% right")
    browser.find_element(By.PARTIAL_LINK_TEXT, "Rejected").click()
    wait_for_page(browser, lambda path, query: query.get("reviewed") == ["reject"])
    assert label_card_ids(browser) == [rejected_id]

    browser.get(server.url + "labels")
    row = wait(browser).until(EC.presence_of_element_located((By.CSS_SELECTOR, ".label-row[data-label=green]")))
    assert "about 50% right (2 reviewed)" in row.text
    wait_images_loaded(browser, row.find_elements(By.CSS_SELECTOR, ".strip img"))


def test_label_names_with_markup_are_shown_as_text(browser, server):
    name = "<img src=x onerror=alert(1)>"
    browser.get(server.url + "labels")
    wait(browser).until(EC.element_to_be_clickable((By.ID, "new-label-set"))).send_keys("markup")
    browser.find_element(By.ID, "new-label-name").send_keys(name)
    browser.find_element(By.ID, "new-label-prompts").send_keys("a red photo")
    browser.find_element(By.ID, "create-label").click()
    wait(browser).until(lambda d: d.find_elements(By.CSS_SELECTOR, ".label-page h1"))
    assert_no_alert(browser)
    assert browser.find_element(By.CSS_SELECTOR, ".label-page h1").text == name
    browser.find_element(By.CSS_SELECTOR, "#label-photos button.reject").click()
    wait(browser).until(lambda d: d.find_element(By.ID, "rejected-count").text == "1")
    assert_no_alert(browser)
