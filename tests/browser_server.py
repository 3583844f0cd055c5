"""Helpers for the browser tests: a small indexed library, a real `clipsearch serve` subprocess, headless Chromium."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
CHROMEDRIVER_NAMES = ("chromedriver",)
# The colours each get several images (numbered, different noise, both formats, two folders): "More like this"
# then has same-colour neighbours, and the library is larger than one page of results (40) for infinite scroll.
LIBRARY_COLOURS = ("red", "green", "blue", "yellow", "cyan", "magenta", "white", "black", "orange", "purple", "grey")
PER_COLOUR = 6
MARKUP_NAME = "<b>bold<i>.png"  # a file name that is markup ("/" is not allowed in a name, so no closing tags)
MARKUP_COLOUR = "purple"
_SERVING_RE = re.compile(r"serving on (http://\S+)")
# The subprocess is the real CLI with the deterministic fake encoder registered first.
_CLI_CODE = (
    "import sys; sys.path.insert(0, {repo!r}); from tests.fakes import register_fake_encoder; "
    "register_fake_encoder(); from clipsearch.cli import run; run(sys.argv[1:])"
)


@dataclass
class Library:
    """An indexed test library: its data dir, photo folders, and the files by colour."""

    data_dir: Path
    photos: Path
    config_file: Path
    by_colour: dict[str, list[Path]] = field(default_factory=dict)
    markup_file: Path | None = None
    broken_file: Path | None = None

    @property
    def count(self) -> int:
        return sum(len(paths) for paths in self.by_colour.values())


def build_library(root: Path) -> Library:
    """Generate solid-colour photos under root/photos/{a,b} and index them with the fake encoder."""
    from clipsearch.config import load_settings
    from clipsearch.indexer.run import index_folders
    from tests.fakes import ColorWordEncoder, make_image, register_fake_encoder

    register_fake_encoder()
    photos = root / "photos"
    config_file = root / "clipsearch.toml"  # empty: no stray ./clipsearch.toml or user config changes the settings
    config_file.write_text("")
    library = Library(data_dir=root / "library", photos=photos, config_file=config_file)
    for c, colour in enumerate(LIBRARY_COLOURS):
        paths = []
        for n in range(1, PER_COLOUR + 1):
            folder = photos / ("a" if n % 2 else "b")  # odd numbers in a/ as PNG, even ones in b/ as JPEG
            suffix = "png" if n % 2 else "jpg"
            paths.append(make_image(folder / f"{colour}{n}.{suffix}", colour, noise=c * 100 + n))
        library.by_colour[colour] = paths
    library.markup_file = make_image(photos / "a" / MARKUP_NAME, MARKUP_COLOUR, noise=999)
    library.by_colour[MARKUP_COLOUR].append(library.markup_file)
    library.broken_file = photos / "b" / "broken.jpg"  # not an image: the status page lists it as a failure
    library.broken_file.write_text("not a photo")
    settings = load_settings(
        {"data_dir": library.data_dir, "model": "test-colors", "pretrained": "v1", "workers": 2, "batch_size": 16},
        config_file=config_file, env={},
    )
    index_folders(settings, [photos], encoder=ColorWordEncoder())
    return library


def server_env(library: Library, home: Path) -> dict[str, str]:
    """The server subprocess's environment: this one minus CLIPSEARCH_* and the user's dirs, plus the library's settings."""
    env = {name: value for name, value in os.environ.items() if not name.startswith("CLIPSEARCH_")}
    env.update(
        XDG_CONFIG_HOME=str(home / "config"),
        XDG_DATA_HOME=str(home / "data"),
        XDG_CACHE_HOME=str(home / "cache"),
        HF_HUB_OFFLINE="1",
        CLIPSEARCH_CONFIG=str(library.config_file),
        CLIPSEARCH_DATA_DIR=str(library.data_dir),
        CLIPSEARCH_MODEL="test-colors",
        CLIPSEARCH_PRETRAINED="v1",
        PYTHONUNBUFFERED="1",
    )
    return env


@dataclass
class Server:
    process: subprocess.Popen
    url: str
    log: Path

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM (the CLI exits cleanly on it), then SIGKILL if it does not stop in time."""
        if self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=timeout)


def start_server(library: Library, home: Path, log: Path, timeout: float = 60.0) -> Server:
    """Run `clipsearch serve --port 0` on the library (in folder home); return once it says where it serves."""
    command = [sys.executable, "-c", _CLI_CODE.format(repo=str(REPO)), "serve", "--port", "0", "--threads", "8"]
    home.mkdir(parents=True, exist_ok=True)
    with open(log, "wb") as out:
        process = subprocess.Popen(command, env=server_env(library, home), cwd=str(home), stdout=out,
                                   stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    server = Server(process, "", log)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        match = _SERVING_RE.search(server.log_text())
        if match:
            server.url = match.group(1)
            return server
        if process.poll() is not None:
            raise RuntimeError(f"clipsearch serve exited with {process.returncode}:\n{server.log_text()}")
        time.sleep(0.05)
    server.stop()
    raise RuntimeError(f"clipsearch serve did not start within {timeout:.0f} s:\n{server.log_text()}")


def find_executable(names: tuple[str, ...], *fallbacks: str) -> str | None:
    """The first of names on PATH, else the first existing fallback path."""
    for name in names:
        found = shutil.which(name)
        if found:
            return found
    return next((path for path in fallbacks if os.access(path, os.X_OK)), None)


def find_chromium() -> str | None:
    return find_executable(CHROMIUM_NAMES, "/usr/bin/chromium", "/usr/lib/chromium/chromium")


def find_chromedriver() -> str | None:
    return find_executable(CHROMEDRIVER_NAMES, "/usr/bin/chromedriver", "/usr/lib/chromium/chromedriver")


def start_chromium(chromium: str, chromedriver: str, profile: Path, log: Path):
    """Headless Chromium driven by the given chromedriver; it never reaches the network on its own (no downloads)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for argument in (
        "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
        "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run",
        "--disable-default-apps", "--disable-extensions", "--no-default-browser-check", "--metrics-recording-only",
        "--password-store=basic", "--window-size=1200,800", f"--user-data-dir={profile}",
    ):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    # An explicit driver path: selenium-manager is never asked to find or download one.
    service = Service(executable_path=chromedriver, log_output=str(log))
    driver = webdriver.Chrome(service=service, options=options)
    driver.set_page_load_timeout(30)
    driver.set_script_timeout(15)
    return driver
