"""Shared fixtures: the real datasets beside the checkout (skipped when absent) and test libraries."""

from __future__ import annotations

from pathlib import Path

import pytest

SHARED_DATASETS = Path(__file__).resolve().parents[1].parent / "shared" / "datasets"
CATALOG_BACKENDS = ("sqlite", "postgresql")
pytest_plugins = ["tests.postgres_fixtures"]


def pytest_configure(config):
    """Point the user cache at a temporary folder for the whole session: module-scoped fixtures load models before
    the per-test isolated_cache applies, and no test may write into the real ~/.cache."""
    import os
    import tempfile

    config._clipsearch_cache = tempfile.TemporaryDirectory(prefix="clipsearch-test-cache-")
    os.environ["XDG_CACHE_HOME"] = config._clipsearch_cache.name


def pytest_unconfigure(config):
    cache = getattr(config, "_clipsearch_cache", None)
    if cache is not None:
        cache.cleanup()


def pytest_generate_tests(metafunc):
    """Tests marked both_catalogs run once per catalog database (PostgreSQL from tests/install-postgres.sh)."""
    if metafunc.definition.get_closest_marker("both_catalogs") and "db_backend" in metafunc.fixturenames:
        metafunc.parametrize("db_backend", CATALOG_BACKENDS, indirect=True)


@pytest.fixture
def db_backend(request) -> str:
    """The catalog database of a test library: sqlite, unless parametrised or $CLIPSEARCH_TEST_CATALOG says otherwise."""
    import os

    backend = getattr(request, "param", None) or os.environ.get("CLIPSEARCH_TEST_CATALOG", "sqlite")
    if backend not in CATALOG_BACKENDS:
        raise pytest.UsageError(f"CLIPSEARCH_TEST_CATALOG={backend!r}: expected one of {', '.join(CATALOG_BACKENDS)}")
    return backend


@pytest.fixture
def catalog_location(db_backend, tmp_path, request):
    """Where a bare test catalog lives: a SQLite file in tmp_path, or a fresh PostgreSQL database."""
    if db_backend == "sqlite":
        return tmp_path / "catalog.sqlite3"
    return request.getfixturevalue("postgres_url")


@pytest.fixture
def catalog(catalog_location):
    """A new, migrated catalog, closed after the test."""
    from clipsearch.catalog import Catalog

    opened = Catalog(catalog_location)
    yield opened
    opened.close()


@pytest.fixture
def db_setting(db_backend, request) -> str | None:
    """The `db` setting of a test library: None (the SQLite file in data_dir) or a fresh PostgreSQL database."""
    return request.getfixturevalue("postgres_url") if db_backend == "postgresql" else None


@pytest.fixture(scope="session")
def shared_datasets() -> Path:
    """../shared/datasets, or skip the test when this checkout has none (a user's fresh clone)."""
    if not SHARED_DATASETS.is_dir():
        pytest.skip(f"{SHARED_DATASETS} is absent: the shared datasets are only beside CI and dev checkouts")
    return SHARED_DATASETS


@pytest.fixture(autouse=True)
def isolated_environment(tmp_path_factory, monkeypatch):
    """Keep the user's config, data dir and CLIPSEARCH_* variables out of every test."""
    import os

    home = tmp_path_factory.mktemp("home")
    for name in list(os.environ):
        if name.startswith("CLIPSEARCH_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(home / "config"))
    monkeypatch.setenv("XDG_DATA_HOME", str(home / "data"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    yield


@pytest.fixture
def fake_encoder():
    """A fresh deterministic colour encoder (registered as model 'test-colors')."""
    from tests.fakes import ColorWordEncoder, register_fake_encoder

    register_fake_encoder()
    return ColorWordEncoder()


@pytest.fixture
def settings(tmp_path, fake_encoder, db_setting):
    """Settings for a library in tmp_path using the fake colour encoder (catalog: see db_setting)."""
    from clipsearch.config import load_settings

    return load_settings(
        {"data_dir": tmp_path / "library", "db": db_setting, "model": "test-colors", "pretrained": "v1", "workers": 2,
         "batch_size": 4},
        env={},
    )


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path_factory, monkeypatch):
    """A per-test user cache dir, so built-model caching is exercised from scratch."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("cache")))


@pytest.fixture
def photo_library(tmp_path, settings, fake_encoder):
    """An indexed library of colour photos in two folders, with file dates a day apart (oldest first in the list)."""
    import os

    from clipsearch.indexer.run import index_folders
    from tests.fakes import make_image

    photos = tmp_path / "photos"
    layout = [
        ("home/red1.png", "red"), ("home/red2.jpg", "red"), ("home/blue1.png", "blue"), ("home/green1.jpg", "green"),
        ("trip/red3.jpg", "red"), ("trip/blue2.jpg", "blue"), ("trip/yellow1.png", "yellow"), ("trip/grey1.png", "grey"),
        ("trip/white1.png", "white"), ("trip/black1.png", "black"), ("trip/purple1.png", "purple"), ("trip/cyan1.jpg", "cyan"),
    ]
    paths = {}
    day = 86_400
    for n, (name, colour) in enumerate(layout):
        path = make_image(photos / name, colour, noise=n + 1)
        stamp = 1_600_000_000 + n * day
        os.utime(path, (stamp, stamp))
        paths[name] = path
    index_folders(settings, [photos], encoder=fake_encoder)
    return paths


@pytest.fixture
def app(settings, fake_encoder):
    """The web app over the test library (index it first with photo_library, or leave it empty)."""
    from clipsearch.webui.app import create_app

    app = create_app(settings, fake_encoder, {"TESTING": True})
    yield app
    app.extensions["clipsearch"].close()


@pytest.fixture
def client(app):
    """A Flask test client of the app."""
    return app.test_client()
