"""Settings: one frozen dataclass, resolved from defaults < clipsearch.toml < CLIPSEARCH_* env < CLI flags."""

from __future__ import annotations

import difflib
import math
import os
import tomllib
from dataclasses import MISSING, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Mapping

from clipsearch.encoders import RUNTIMES
from clipsearch.errors import ConfigError

ENV_PREFIX = "CLIPSEARCH_"
CONFIG_FILE_NAME = "clipsearch.toml"
CONFIG_ENV = "CLIPSEARCH_CONFIG"


def default_data_dir() -> Path:
    """The default library folder under the user's XDG data dir (platform equivalent elsewhere)."""
    import platformdirs

    return Path(platformdirs.user_data_dir("clipsearch", appauthor=False))


def default_config_file() -> Path:
    """The per-user config file location."""
    import platformdirs

    return Path(platformdirs.user_config_dir("clipsearch", appauthor=False)) / CONFIG_FILE_NAME


def _setting(default: Any, help: str, choices: tuple[str, ...] | None = None, default_factory=None, secret: bool = False,
             zero_ok: bool = False, url: bool = False):
    metadata = {"help": help, "choices": choices, "secret": secret, "zero_ok": zero_ok, "url": url}
    if default_factory is not None:
        return field(default_factory=default_factory, metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass(frozen=True)
class Settings:
    """Every user-facing setting, with its default and help text (the single registry)."""

    data_dir: Path = _setting(
        None,
        "Library folder holding the catalog, vector index, thumbnails and caches.",
        default_factory=default_data_dir,
    )
    db: str | None = _setting(
        None,
        "Catalog database as a URL, for a library shared by several servers: postgresql://USER:PASSWORD@HOST/DBNAME "
        "(the vector index and thumbnails stay in data_dir). Default: the SQLite file catalog.sqlite3 in data_dir.",
        url=True,
    )
    model: str = _setting(
        "ViT-B-32",
        "open_clip model name (see `open_clip.list_models()`), or an `hf-hub:`/`local-dir:` reference.",
    )
    pretrained: str = _setting(
        "laion2b_s34b_b79k",
        "open_clip pretrained tag, a local weights file (.bin/.pt/.safetensors), or `none` for random weights.",
    )
    device: str = _setting(
        "auto", "Where the model runs; auto picks CUDA, then Apple MPS, then CPU.", ("auto", "cpu", "cuda", "mps")
    )
    precision: str = _setting(
        "auto",
        "Inference precision; auto is fp16 autocast on CUDA, bf16 on CPUs with native bf16 (AVX512-BF16/AMX), else fp32.",
        ("auto", "fp32", "fp16", "bf16"),
    )
    runtime: str = _setting(
        "auto",
        "What runs the encoders on a CPU (indexing, searches, the server, labels): auto is OpenVINO where it is "
        "installed on an x86-64 CPU (starts in a fraction of a second, a text query about 1.7x faster; the model is "
        "exported to it once), else torch.",
        RUNTIMES,
    )
    model_cache_dir: Path | None = _setting(
        None, "Where downloaded model weights are cached (default: the Hugging Face cache)."
    )
    batch_size: int = _setting(32, "Images per model batch when indexing.")
    workers: int = _setting(
        0, "Image decoding threads when indexing; 0 picks one per CPU core (at most 8, or 32 when a GPU runs the model).",
        zero_ok=True,
    )
    gpu_jpeg_decode: bool = _setting(
        False,
        "When the model runs on CUDA, decode JPEGs on the GPU (torchvision's nvJPEG) instead of in decoding threads. "
        "Off by default until measured to help: bench/index_throughput.py --gpu-jpeg-decode times both ways.",
    )
    max_image_pixels: int = _setting(
        100_000_000, "Images with more pixels than this are refused as decompression bombs."
    )
    include_hidden: bool = _setting(False, "Index files and folders whose names start with a dot.")
    follow_symlinks: bool = _setting(True, "Follow symbolic links to folders and files while walking (loops are detected).")
    top_k: int = _setting(20, "Number of results a search returns by default.")
    vector_index: str = _setting(
        "auto",
        "Search index: auto is exact search up to 40,000 photos, then an approximate IVF-SQ8 index (measured "
        "~2 ms a query at 1M photos, recall@10 ~0.98, a quarter of the memory); exact always scans every vector "
        "(~170 ms at 1M); ivf is approximate from 1,000 photos; disk is IVF-SQ8 from 1,000 photos with its lists in "
        "memory-mapped shard files beside the index, for libraries larger than RAM (see Large libraries).",
        ("auto", "exact", "ivf", "disk"),
    )
    host: str = _setting("127.0.0.1", "Address `clipsearch serve` listens on; any other than loopback needs access_token (or insecure).")
    port: int = _setting(8000, "Port `clipsearch serve` listens on (0 picks a free one).", zero_ok=True)
    access_token: str | None = _setting(
        None,
        "Password for the web UI and API (log-in page, or `Authorization: Bearer TOKEN`); required when serving "
        "beyond this machine.",
        secret=True,
    )
    insecure: bool = _setting(
        False, "Serve on a non-loopback address without an access token: anyone who can reach it sees your photos."
    )
    max_upload_mb: int = _setting(25, "Largest image upload the web UI and API accept for search by image, in MB.")
    log_level: str = _setting("warning", "Logging verbosity.", ("debug", "info", "warning", "error"))
    watch_polling: bool = _setting(
        False,
        "Watch folders by looking at them every watch_poll_seconds instead of through the system's change notifications "
        "(for network shares, whose changes from other machines raise none; folders on NFS/SMB/SSHFS are polled anyway).",
    )
    watch_poll_seconds: float = _setting(2.0, "Seconds between two looks at a polled folder (each look lists every file in it).")
    watch_settle_seconds: float = _setting(
        1.0,
        "A changed file is indexed once it has had no writes and kept its size and time this long, so a copy or download "
        "in progress is indexed once, complete.",
    )
    watch_rescan_minutes: int = _setting(
        60, "Minutes between full rescans while watching, which catch what change notifications missed; 0: only at start.",
        zero_ok=True,
    )

    # Names of the settings that were set explicitly (config file, env or flag), not defaulted.
    explicit: frozenset[str] = field(default=frozenset(), compare=False, repr=False, metadata={"internal": True})

    @property
    def catalog_path(self) -> Path:
        """The SQLite catalog file of this library (used unless `db` names another database)."""
        return self.data_dir / "catalog.sqlite3"

    @property
    def catalog_location(self) -> Path | str:
        """Where the catalog lives: the `db` URL when set, else the SQLite file in data_dir."""
        return self.db if self.db else self.catalog_path

    @property
    def vector_store_path(self) -> Path:
        """The derived FAISS index file of this library."""
        return self.data_dir / "vectors.faiss"

    @property
    def resolved_workers(self) -> int:
        """Decoding thread count with 0 resolved to the machine's core count (at most 8)."""
        return self.decode_workers(model_on_gpu=False)

    def decode_workers(self, model_on_gpu: bool) -> int:
        """Decoding threads: `workers`, else one per core, at most 8 beside a CPU model and 32 beside a GPU one."""
        # A model on the CPU needs the cores itself; a GPU embeds far faster than any core decodes, so there
        # every core decodes (Pillow releases the GIL while decoding and resizing).
        cap = 32 if model_on_gpu else 8
        return self.workers if self.workers > 0 else max(1, min(cap, os.cpu_count() or 1))


def setting_fields():
    """The declared settings (excluding internal bookkeeping fields)."""
    return [f for f in fields(Settings) if not f.metadata.get("internal")]


SETTING_NAMES = tuple(f.name for f in setting_fields())


def env_var(name: str) -> str:
    """The environment variable that sets a setting."""
    return ENV_PREFIX + name.upper()


def cli_flag(name: str) -> str:
    """The command-line flag that sets a setting."""
    return "--" + name.replace("_", "-")


def _field(name: str):
    for f in setting_fields():
        if f.name == name:
            return f
    close = difflib.get_close_matches(name, SETTING_NAMES, n=1)
    hint = f"did you mean '{close[0]}'?" if close else f"known settings: {', '.join(SETTING_NAMES)}"
    raise ConfigError(f"unknown setting '{name}'", hint)


def _type_name(f) -> str:
    return str(f.type).replace(" ", "")


def convert_value(name: str, value: Any, source: str, base_dir: Path | None = None) -> Any:
    """Convert a raw value (string from env, TOML value, flag) to the setting's type, or raise ConfigError."""
    f = _field(name)
    kind = _type_name(f)
    try:
        if value is None or (isinstance(value, str) and value == "" and "None" in kind):
            if "None" in kind:
                return None
            raise ValueError("a value is required")
        if kind.startswith("Path"):
            path = Path(os.path.expandvars(str(value))).expanduser()
            if base_dir is not None and not path.is_absolute():
                path = base_dir / path
            return path
        if kind == "bool":
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off"):
                return False
            raise ValueError("expected true or false")
        if kind == "int":
            if isinstance(value, bool):
                raise ValueError("expected a whole number")
            number = int(str(value).replace("_", ""))
            if number < 0 or (number == 0 and not f.metadata.get("zero_ok")):
                raise ValueError("expected a positive number")
            return number
        if kind == "float":
            if isinstance(value, bool):
                raise ValueError("expected a number")
            number = float(str(value).replace("_", ""))
            if not math.isfinite(number) or number <= 0:
                raise ValueError("expected a positive number")
            return number
        text = str(value).strip()
        choices = f.metadata.get("choices")
        if choices:
            text = text.lower()
            if text not in choices:
                raise ValueError(f"expected one of {', '.join(choices)}")
        if not text:
            raise ValueError("a value is required")
        return text
    except ValueError as e:
        raise ConfigError(
            f"bad value {value!r} for setting '{name}' (from {source}): {e}",
            f"fix it in {source}; `clipsearch config` shows every setting with its help",
        ) from e


def find_config_file(explicit: str | os.PathLike | None, env: Mapping[str, str]) -> Path | None:
    """The config file to read: --config, else $CLIPSEARCH_CONFIG, else ./clipsearch.toml, else the user's one."""
    chosen = explicit or env.get(CONFIG_ENV)
    if chosen:
        path = Path(chosen).expanduser()
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist", "check the --config flag or $CLIPSEARCH_CONFIG")
        return path
    for candidate in (Path.cwd() / CONFIG_FILE_NAME, default_config_file()):
        if candidate.is_file():
            return candidate
    return None


def read_config_file(path: Path) -> dict[str, Any]:
    """Read and validate a clipsearch.toml into converted setting values."""
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read config file {path}: {e}", "check the file's permissions") from e
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {path} is not valid TOML: {e}", "fix the syntax at the line shown") from e
    table = raw.get("clipsearch", raw) if isinstance(raw.get("clipsearch"), dict) else raw
    values = {}
    for key, value in table.items():
        name = key.replace("-", "_")
        values[name] = convert_value(name, value, f"config file {path}", base_dir=path.parent)
    return values


def load_settings(
    overrides: Mapping[str, Any] | None = None,
    config_file: str | os.PathLike | None = None,
    env: Mapping[str, str] | None = None,
) -> Settings:
    """Resolve settings: defaults < config file < CLIPSEARCH_* env < overrides (CLI flags; None = not given)."""
    env = os.environ if env is None else env
    values: dict[str, Any] = {}
    path = find_config_file(config_file, env)
    if path is not None:
        values.update(read_config_file(path))
    for name in SETTING_NAMES:
        raw = env.get(env_var(name))
        if raw is not None and raw != "":
            values[name] = convert_value(name, raw, f"environment variable {env_var(name)}")
    for name, value in (overrides or {}).items():
        if value is not None:
            values[name] = convert_value(name, value, f"flag {cli_flag(name)}")
    return Settings(**values, explicit=frozenset(values))


def with_overrides(settings: Settings, **values: Any) -> Settings:
    """A copy of settings with some values replaced (marked explicit)."""
    converted = {k: convert_value(k, v, "code") for k, v in values.items()}
    return replace(settings, **converted, explicit=settings.explicit | frozenset(converted))


def describe_settings(settings: Settings | None = None) -> list[dict[str, Any]]:
    """Every setting's name, flag, env var, default, help and (given settings) current value."""
    rows = []
    for f in setting_fields():
        default = f.default_factory() if f.default is MISSING and f.default_factory is not MISSING else f.default
        row = {
            "name": f.name,
            "flag": cli_flag(f.name),
            "env": env_var(f.name),
            "default": default,
            "help": f.metadata["help"],
            "choices": f.metadata.get("choices"),
        }
        if settings is not None:
            value = getattr(settings, f.name)
            if f.metadata.get("secret") and value:
                value = "(set, hidden)"
            elif f.metadata.get("url") and value:
                value = hide_password(value)
            row["value"] = value
            row["explicit"] = f.name in settings.explicit
        rows.append(row)
    return rows


def hide_password(url: str) -> str:
    """A database URL with its password replaced by ***, for display."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rpartition("@")
    user = netloc[0].partition(":")[0]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc[2]}"))
