"""Loading an encoder in a background thread, so indexing walks, plans and decodes while the model loads.

Importing torch and open_clip and building ViT-B-32 takes seconds, most of it on one core: an indexer that waits
for it first leaves the other cores idle, and loads a model it may not need at all (nothing changed since the
last run). BackgroundEncoder starts the load at once, answers what is known without it (the model id, the image
size the model will want), and hands over the encoder when the work first needs it.
"""

from __future__ import annotations

import json
import logging
import threading
from importlib.util import find_spec
from pathlib import Path
from typing import Callable

from clipsearch.encoders import LOCAL_DIR_PREFIX, Encoder, EncoderSpec, is_random_weights, load_encoder, model_id_for
from clipsearch.encoders import split_reference
from clipsearch.errors import LibraryError

log = logging.getLogger(__name__)

__all__ = ["BackgroundEncoder", "image_size_hint"]


class BackgroundEncoder:
    """An encoder being loaded in a daemon thread: model_id and image_size_hint now, the encoder when ready."""

    def __init__(self, spec: EncoderSpec | None, loader: Callable[[], Encoder] | None = None,
                 *, model_id: str | None = None):
        self.spec = spec
        self.model_id = model_id or model_id_for(spec.model, spec.pretrained)
        self.image_size_hint = image_size_hint(spec) if spec is not None else None
        self._encoder: Encoder | None = None
        self._error: BaseException | None = None
        self._done = threading.Event()
        load = loader or (lambda: load_encoder(spec))
        threading.Thread(target=self._load, args=(load,), name="clipsearch-model-load", daemon=True).start()

    @classmethod
    def loaded(cls, encoder: Encoder) -> "BackgroundEncoder":
        """An already loaded encoder in the same interface (no thread)."""
        self = cls.__new__(cls)
        self.model_id, self.image_size_hint = encoder.model_id, encoder.image_size
        self._encoder, self._error, self._done = encoder, None, threading.Event()
        self._done.set()
        return self

    def _load(self, load: Callable[[], Encoder]) -> None:
        try:
            encoder = load()
            if encoder.model_id != self.model_id:
                raise LibraryError(
                    f"the encoder loaded for {self.model_id} calls itself {encoder.model_id}",
                    "a registered encoder factory must give model_id_for(model, pretrained): this is a bug in it",
                )
            encoder.prepare_images()  # in this thread, while the first photos decode
            self._encoder = encoder
        except BaseException as e:  # handed to whoever asks for the encoder, in their thread
            self._error = e
        finally:
            self._done.set()

    def ready(self) -> Encoder | None:
        """The encoder if loaded, else None (never waits); raises the loading error if it failed."""
        if not self._done.is_set():
            return None
        if self._error is not None:
            raise self._error
        return self._encoder

    def result(self, stop: threading.Event | None = None) -> Encoder:
        """The encoder, waiting for it; KeyboardInterrupt when `stop` is set meanwhile; raises the loading error."""
        while not self._done.wait(0.1):
            if stop is not None and stop.is_set():
                raise KeyboardInterrupt
        return self.ready()


def image_size_hint(spec: EncoderSpec) -> int | None:
    """The image side an open_clip model's preprocessing wants, read from its JSON config without importing
    open_clip (which takes seconds); None when it cannot be known without loading (hf-hub, registered encoders)."""
    model, pretrained = split_reference(spec.model.strip(), (spec.pretrained or "").strip())
    try:
        if model.startswith(LOCAL_DIR_PREFIX):
            return _size_in_folder(Path(model[len(LOCAL_DIR_PREFIX):]).expanduser())
        if not is_random_weights(pretrained) and Path(pretrained).expanduser().is_dir():
            return _size_in_folder(Path(pretrained).expanduser())
        name = model.replace("/", "-")
        for folder in _config_folders():
            path = folder / f"{name}.json"
            if path.is_file():
                return _side(json.loads(path.read_text(encoding="utf-8")).get("vision_cfg", {}).get("image_size"))
    except (OSError, ValueError, AttributeError) as e:
        log.debug("no image size hint for %s: %s", spec.model, e)
    return None


def _size_in_folder(folder: Path) -> int | None:
    config = json.loads((folder / "open_clip_config.json").read_text(encoding="utf-8"))
    size = config.get("preprocess_cfg", {}).get("size") or config.get("model_cfg", {}).get("vision_cfg", {}).get("image_size")
    return _side(size)


def _side(size) -> int | None:
    if isinstance(size, (list, tuple)) and size:
        return int(max(size))
    return int(size) if isinstance(size, (int, float)) and size > 0 else None


def _config_folders() -> list[Path]:
    # clipsearch's own configs, then open_clip's: found without running open_clip's __init__ (find_spec of a
    # top-level package only locates it).
    import clipsearch.model_configs

    folders = [Path(clipsearch.model_configs.__file__).resolve().parent]
    spec = find_spec("open_clip")
    if spec is not None and spec.submodule_search_locations:
        folders += [Path(location) / "model_configs" for location in spec.submodule_search_locations]
    return folders
