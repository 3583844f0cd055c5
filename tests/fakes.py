"""A deterministic fake encoder: colour words in text and the mean colour of images share one space."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from clipsearch.encoders import Encoder, EncoderSpec, register_encoder

PALETTE = {
    "red": (230, 20, 20),
    "green": (20, 200, 40),
    "blue": (20, 40, 230),
    "yellow": (240, 230, 20),
    "cyan": (20, 220, 230),
    "magenta": (220, 20, 220),
    "white": (250, 250, 250),
    "black": (5, 5, 5),
    "orange": (250, 140, 10),
    "purple": (120, 30, 160),
    "grey": (128, 128, 128),
}
COLOR_NAMES = tuple(PALETTE)
FAKE_MODEL = "test-colors"


class ColorWordEncoder(Encoder):
    """Images map to soft similarities with a colour palette; texts to the colour words they contain."""

    def __init__(self, spec: EncoderSpec | None = None):
        self.model_id = f"{FAKE_MODEL}/{(spec.pretrained if spec else 'v1').lower()}"
        self.dim = len(PALETTE)
        self.image_size = 32
        self.device = "cpu"
        self.image_batches: list[int] = []  # sizes of encode_images calls: tests count re-embeddings
        self.texts_encoded = 0

    def preprocess(self, image: Image.Image) -> np.ndarray:
        small = image.convert("RGB").resize((self.image_size, self.image_size))
        return np.asarray(small, dtype=np.float32).reshape(-1, 3).mean(axis=0)

    def encode_images(self, batch: Sequence[np.ndarray]) -> np.ndarray:
        self.image_batches.append(len(batch))
        if not len(batch):
            return np.zeros((0, self.dim), np.float32)
        means = np.stack(batch)
        centres = np.array(list(PALETTE.values()), dtype=np.float32)
        distance = np.linalg.norm(means[:, None, :] - centres[None, :, :], axis=2)
        vectors = np.exp(-((distance / 60.0) ** 2))
        return _normalise(vectors)

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        self.texts_encoded += len(texts)
        vectors = np.full((len(texts), self.dim), 0.01, dtype=np.float32)
        for row, text in enumerate(texts):
            for word in text.lower().replace(",", " ").split():
                word = word.strip(".!?;:\"'")
                if word in PALETTE:
                    vectors[row, COLOR_NAMES.index(word)] += 1.0
        return _normalise(vectors)

    @property
    def images_embedded(self) -> int:
        """Total images passed to encode_images."""
        return sum(self.image_batches)


def _normalise(vectors: np.ndarray) -> np.ndarray:
    vectors = np.asarray(vectors, dtype=np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def register_fake_encoder() -> None:
    """Route the model name 'test-colors' to ColorWordEncoder."""
    register_encoder(FAKE_MODEL, ColorWordEncoder)


def make_image(path: Path, color: str | tuple[int, int, int], size=(64, 48), fmt: str | None = None, noise: int = 0) -> Path:
    """Write a solid-colour image (with optional noise so files differ) and return its path."""
    rgb = PALETTE[color] if isinstance(color, str) else color
    path.parent.mkdir(parents=True, exist_ok=True)
    array = np.empty((size[1], size[0], 3), dtype=np.uint8)
    array[:] = rgb
    if noise:
        rng = np.random.default_rng(noise)
        array = np.clip(array.astype(int) + rng.integers(-8, 9, array.shape), 0, 255).astype(np.uint8)
    Image.fromarray(array).save(path, format=fmt)
    return path
