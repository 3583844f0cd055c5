"""What every `clipsearch` command shares: settings options, logging set-up, and errors turned into messages."""

from __future__ import annotations

import functools
import logging
import sys
from typing import Callable

import click

from clipsearch.config import cli_flag, load_settings, setting_fields
from clipsearch.errors import ClipsearchError

LIBRARY_SETTINGS = ("data_dir", "db")
ENCODER_SETTINGS = LIBRARY_SETTINGS + ("model", "pretrained", "device", "precision", "runtime", "model_cache_dir", "vector_index",
                                      "log_level")
INDEX_SETTINGS = ENCODER_SETTINGS + ("batch_size", "workers", "gpu_jpeg_decode", "max_image_pixels", "include_hidden", "follow_symlinks")
WATCH_SETTINGS = ("watch_polling", "watch_poll_seconds", "watch_settle_seconds", "watch_rescan_minutes")


def settings_options(*names: str) -> Callable:
    """Add a --flag for each named setting (from the settings registry) plus --config; pass `settings` in."""
    registry = {f.name: f for f in setting_fields()}

    def decorate(command: Callable) -> Callable:
        @functools.wraps(command)
        def wrapper(*args, config: str | None, **kwargs):
            overrides = {name: kwargs.pop(name) for name in names}
            settings = load_settings(overrides, config_file=config)
            configure_logging(settings.log_level)
            return command(*args, settings=settings, **kwargs)

        for name in reversed(names):
            f = registry[name]
            kind = str(f.type)
            if kind == "bool":
                flag = cli_flag(name)
                option = click.option(f"{flag}/--no-{flag[2:]}", name, default=None, help=f.metadata["help"])
            else:
                choices = f.metadata.get("choices")
                option = click.option(
                    cli_flag(name), name, default=None, metavar=name.upper() if not choices else None,
                    type=click.Choice(choices, case_sensitive=False) if choices else None,
                    help=f.metadata["help"],
                )
            wrapper = option(wrapper)
        return click.option("--config", type=click.Path(dir_okay=False), default=None,
                            help="Settings file (default: ./clipsearch.toml, else the user config dir's).")(wrapper)

    return decorate


class _ThirdPartyNoise(logging.Filter):
    """Drop open_clip's root-logger chatter below ERROR: clipsearch reports what matters in its own words."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR or "open_clip" not in record.pathname


def configure_logging(level: str) -> None:
    """Log to stderr at the chosen level, without third-party noise (e.g. Pillow's corrupt-EXIF warnings)."""
    import warnings

    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s" if level != "debug" else "%(levelname)s %(name)s: %(message)s"))
    handler.addFilter(_ThirdPartyNoise())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # Broken EXIF is tolerated by design (orientation falls back to none); Pillow's warning would only alarm.
    warnings.filterwarnings("ignore", message="(?i)corrupt exif", category=UserWarning)


def reports_errors(command: Callable) -> Callable:
    """Turn clipsearch errors into a message and an exit code, never a traceback."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except ClipsearchError as e:
            click.secho(f"error: {e.message}", fg="red", err=True)
            if e.hint:
                click.echo(f"  hint: {e.hint}", err=True)
            sys.exit(e.exit_code)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)

    return wrapper


class LazyGroup(click.Group):
    """A command group some of whose commands live in modules imported only when that command runs (click's recipe).

    `lazy_commands` maps a command name to ("module.path:attribute", short help), so `clipsearch --help` lists it
    without importing the module: the training package stays out of the core's imports.
    """

    def __init__(self, *args, lazy_commands: dict[str, tuple[str, str]] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.lazy_commands = dict(lazy_commands or {})

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(set(super().list_commands(ctx)) | set(self.lazy_commands))

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name in self.lazy_commands and name not in self.commands:
            import importlib

            target, _ = self.lazy_commands[name]
            module_name, attribute = target.split(":")
            self.add_command(getattr(importlib.import_module(module_name), attribute), name)
        return super().get_command(ctx, name)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = []
        for name in self.list_commands(ctx):
            if name in self.lazy_commands and name not in self.commands:
                rows.append((name, self.lazy_commands[name][1]))
            else:
                command = self.get_command(ctx, name)
                if command is not None and not command.hidden:
                    rows.append((name, command.get_short_help_str(formatter.width - 6 - max(len(n) for n in self.list_commands(ctx)))))
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)
