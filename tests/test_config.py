"""Settings: declared once, resolved defaults < clipsearch.toml < CLIPSEARCH_* env < flags, all documented."""

from __future__ import annotations

from pathlib import Path

import pytest

from clipsearch.config import SETTING_NAMES, Settings, cli_flag, describe_settings, env_var, load_settings
from clipsearch.errors import ConfigError

README = Path(__file__).resolve().parents[1] / "README.md"


def test_defaults(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    settings = load_settings(env={})
    assert settings.model == "ViT-B-32"
    assert settings.pretrained == "laion2b_s34b_b79k"
    assert settings.device == "auto"
    assert settings.data_dir.name == "clipsearch"
    assert settings.explicit == frozenset()


def test_precedence_file_env_flag(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "clipsearch.toml").write_text('model = "from-file"\nbatch_size = 7\ndevice = "cpu"\ndata_dir = "lib"\n')
    settings = load_settings(env={})
    assert (settings.model, settings.batch_size, settings.device) == ("from-file", 7, "cpu")
    assert settings.data_dir == tmp_path / "lib"  # relative paths are relative to the file
    settings = load_settings(env={"CLIPSEARCH_MODEL": "from-env", "CLIPSEARCH_BATCH_SIZE": "9"})
    assert (settings.model, settings.batch_size, settings.device) == ("from-env", 9, "cpu")
    settings = load_settings({"model": "from-flag", "batch_size": None}, env={"CLIPSEARCH_MODEL": "from-env"})
    assert settings.model == "from-flag" and settings.batch_size == 7
    assert {"model", "device", "data_dir", "batch_size"} <= settings.explicit


def test_explicit_config_file_and_env_config(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    other = tmp_path / "other.toml"
    other.write_text("[clipsearch]\ntop_k = 5\ninclude_hidden = true\n")
    assert load_settings(config_file=other, env={}).top_k == 5
    assert load_settings(env={"CLIPSEARCH_CONFIG": str(other)}).include_hidden is True
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(config_file=tmp_path / "missing.toml", env={})


@pytest.mark.parametrize(
    "env, message",
    [
        ({"CLIPSEARCH_BATCH_SIZE": "many"}, "batch_size"),
        ({"CLIPSEARCH_BATCH_SIZE": "0"}, "positive"),
        ({"CLIPSEARCH_DEVICE": "tpu"}, "auto, cpu, cuda, mps"),
        ({"CLIPSEARCH_INCLUDE_HIDDEN": "perhaps"}, "true or false"),
    ],
)
def test_bad_values_are_clear(env, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=message) as caught:
        load_settings(env=env)
    assert "CLIPSEARCH_" in str(caught.value)


def test_unknown_and_malformed_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "clipsearch.toml").write_text("batchsize = 3\n")
    with pytest.raises(ConfigError, match="batch_size"):
        load_settings(env={})
    (tmp_path / "clipsearch.toml").write_text("model = \n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_settings(env={})


def test_settings_are_frozen():
    settings = Settings()
    with pytest.raises(Exception):
        settings.model = "x"  # type: ignore[misc]


def test_every_setting_is_documented_in_the_readme():
    text = README.read_text(encoding="utf-8")
    table_rows = [line for line in text.splitlines() if line.startswith("|")]
    for row in describe_settings():
        name = row["name"]
        matching = [line for line in table_rows if line.startswith(f"| `{name}` |")]
        assert matching, f"setting {name} is missing from the README settings table"
        assert env_var(name) in matching[0] and cli_flag(name) in matching[0], f"README row for {name} lacks its env var or flag"
    assert len(SETTING_NAMES) == len(describe_settings())


def test_ci_runs_the_readme_test_command():
    root = README.parent
    script = (root / ".ci" / "run").read_text()
    assert "<!-- test-command -->" in script and "README.md" in script
    text = README.read_text()
    block = text.split("<!-- test-command -->", 1)[1].split("```bash\n", 1)[1].split("```", 1)[0].strip()
    assert block.count("\n") == 0 and "pip install -e '.[dev]'" in block and "pytest" in block


def test_decode_workers_leave_the_cores_to_a_cpu_model(monkeypatch, tmp_path):
    from dataclasses import replace

    from clipsearch import config

    monkeypatch.setattr(config.os, "cpu_count", lambda: 64)
    settings = load_settings({"data_dir": tmp_path}, env={})
    assert settings.decode_workers(model_on_gpu=False) == settings.resolved_workers == 8
    assert settings.decode_workers(model_on_gpu=True) == 32
    monkeypatch.setattr(config.os, "cpu_count", lambda: 2)
    assert settings.decode_workers(model_on_gpu=True) == 2
    assert replace(settings, workers=3).decode_workers(model_on_gpu=True) == 3  # an explicit count is kept
