"""The command line: help without torch, index/search/status/config through click, clear errors, exit codes."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from click.testing import CliRunner

from clipsearch.cli import main
from tests.fakes import make_image


@pytest.fixture
def runner():
    return CliRunner()


@pytest.fixture
def cli_env(tmp_path, fake_encoder):
    """Environment making the CLI use a tmp library and the fake colour encoder."""
    return {
        "CLIPSEARCH_DATA_DIR": str(tmp_path / "library"),
        "CLIPSEARCH_MODEL": "test-colors",
        "CLIPSEARCH_PRETRAINED": "v1",
    }


def test_help_does_not_import_torch():
    code = (
        "import sys\n"
        "from clipsearch.cli import main\n"
        "for args in (['--help'], ['index', '--help'], ['search', '--help'], ['status', '--help']):\n"
        "    try:\n"
        "        main(args)\n"
        "    except SystemExit as e:\n"
        "        assert e.code == 0, e.code\n"
        "heavy = [m for m in ('torch', 'open_clip', 'faiss', 'numpy', 'sqlalchemy') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "Usage" in result.stdout


def test_python_dash_m_works():
    result = subprocess.run([sys.executable, "-m", "clipsearch", "--version"], capture_output=True, text=True)
    assert result.returncode == 0 and "clipsearch" in result.stdout


def test_index_search_status_round_trip(runner, cli_env, tmp_path):
    photos = tmp_path / "photos"
    for colour in ("red", "green", "blue"):
        make_image(photos / f"{colour}.png", colour)
    (photos / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    result = runner.invoke(main, ["index", str(photos)], env=cli_env)
    assert result.exit_code == 0, result.output
    assert "added 3" in result.output and "failed 1" in result.output
    assert "broken.jpg" in result.output

    result = runner.invoke(main, ["search", "red", "--json", "-k", "2"], env=cli_env)
    assert result.exit_code == 0, result.output
    hits = json.loads(result.stdout)
    assert hits[0]["path"] == str(photos / "red.png") and {"id", "path", "score", "date", "width", "height", "format"} <= set(hits[0])
    assert len(hits) == 2

    result = runner.invoke(main, ["search", "blue"], env=cli_env)
    assert result.stdout.splitlines()[0].endswith(str(photos / "blue.png"))

    result = runner.invoke(main, ["search", "--like", str(photos / "red.png"), "--json"], env=cli_env)
    assert str(photos / "red.png") not in [h["path"] for h in json.loads(result.stdout)]
    result = runner.invoke(main, ["search", "--image", str(photos / "green.png"), "--json", "-k", "1"], env=cli_env)
    assert json.loads(result.stdout)[0]["path"] == str(photos / "green.png")

    result = runner.invoke(main, ["status", "--json"], env=cli_env)
    info = json.loads(result.stdout)
    assert info["counts"] == {"images": 4, "ok": 3, "failed": 1, "embeddings": 3}
    assert info["vectors"] == 3 and info["model"] == "test-colors/v1"
    assert info["failures"][0]["path"].endswith("broken.jpg") and info["failures"][0]["reason"]
    assert info["index_bytes"] > 0 and info["roots"] == [str(photos)]
    result = runner.invoke(main, ["status"], env=cli_env)
    assert "3 indexed, 1 failed" in result.output and "broken.jpg" in result.output

    result = runner.invoke(main, ["index", str(photos), "--json"], env=cli_env)
    assert json.loads(result.stdout)["unchanged"] == 4


def test_clear_errors_without_tracebacks(runner, cli_env, tmp_path):
    result = runner.invoke(main, ["search", "red"], env=cli_env)
    assert result.exit_code == 1 and "no images are indexed" in result.output and "clipsearch index" in result.output
    assert "Traceback" not in result.output
    result = runner.invoke(main, ["search", ""], env=cli_env)
    assert result.exit_code == 2 and "empty" in result.output
    result = runner.invoke(main, ["search", "red", "--image", "x.jpg"], env=cli_env)
    assert result.exit_code == 2 and "exactly one" in result.output
    result = runner.invoke(main, ["index", str(tmp_path), "--batch-size", "zero"], env=cli_env)
    assert result.exit_code == 2 and "batch_size" in result.output
    make_image(tmp_path / "p" / "red.png", "red")
    runner.invoke(main, ["index", str(tmp_path / "p")], env=cli_env)
    result = runner.invoke(main, ["search", "--like", str(tmp_path / "nope.png")], env=cli_env)
    assert result.exit_code == 2 and "not in the library" in result.output
    result = runner.invoke(main, ["index", str(tmp_path / "p"), "--pretrained", "v9"], env=cli_env)
    assert result.exit_code == 2 and "--reembed" in result.output


def test_status_of_a_new_library(runner, cli_env):
    result = runner.invoke(main, ["status"], env=cli_env)
    assert result.exit_code == 0 and "empty" in result.output


def test_config_shows_sources(runner, cli_env):
    result = runner.invoke(main, ["config", "--json"], env=cli_env)
    values = json.loads(result.stdout)
    assert values["model"] == "test-colors" and values["device"] == "auto"
    result = runner.invoke(main, ["config"], env=cli_env)
    assert "CLIPSEARCH_BATCH_SIZE" in result.output and "* model = test-colors" in result.output
