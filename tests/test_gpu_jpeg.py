"""JPEG decoding where the model runs (gpu_jpeg_decode): checked on the CPU against the Pillow path.

torchvision decodes on the CPU with the same calls the GPU path makes with device='cuda', so everything but
nvJPEG itself runs here: orientation, the Pillow-matching reductions and transform, the indexer's hand-off
and its fallbacks.
"""

from __future__ import annotations

import io
import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clipsearch.config import load_settings
from clipsearch.encoders import EncoderSpec, encoder_spec_from_settings, load_encoder
from clipsearch.images import open_image, read_jpeg_header
from tests.test_encoders import TINY

torch = pytest.importorskip("torch")
pytest.importorskip("torchvision")
gpu_jpeg = pytest.importorskip("clipsearch.encoders.gpu_jpeg")
openclip = pytest.importorskip("clipsearch.encoders.openclip")

MAX_PIXELS = 100_000_000


def photo(width: int, height: int, seed: int = 0) -> np.ndarray:
    """A photo-like RGB array: smooth gradients, edges and noise (so resizing and JPEG matter)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack([x / width, y / height, (x + y) / (width + height)], axis=-1) * 200
    base[(x // 37 + y // 23) % 2 == 0] += 40
    return np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)


def jpeg_bytes(array: np.ndarray, orientation: int | None = None, mode: str = "RGB", **save) -> bytes:
    image = Image.fromarray(array).convert(mode)
    exif = Image.Exif()
    if orientation:
        exif[0x0112] = orientation
        exif[0x0132] = "2021:06:05 10:11:12"
    out = io.BytesIO()
    image.save(out, "JPEG", quality=92, exif=exif.tobytes(), **save)
    return out.getvalue()


@pytest.fixture(scope="module")
def encoder():
    return load_encoder(EncoderSpec(TINY, "none", device="cpu", precision="fp32"))


def min_row_cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.min(np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))))


def both_paths(encoder, datas: list[bytes]) -> tuple[np.ndarray, np.ndarray]:
    """(embeddings through Pillow, embeddings through decode_jpegs), in the order given."""
    infos = [read_jpeg_header(data, MAX_PIXELS) for data in datas]
    pillow = [encoder.preprocess(open_image(d, max_pixels=MAX_PIXELS, target_size=encoder.image_size)[0])
              for d in datas]
    device = encoder.decode_jpegs(datas, [info.orientation for info in infos])
    assert all(t is not None and t.shape == pillow[0].shape and t.dtype == torch.float32 for t in device)
    return encoder.encode_images(pillow), encoder.encode_images(device)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_orientation_matches_pillow_exactly(orientation):
    array = photo(40, 24, seed=orientation)
    pillow, _ = open_image(jpeg_bytes(array, orientation), max_pixels=MAX_PIXELS)
    decoded = gpu_jpeg.decode_jpegs([jpeg_bytes(array, orientation)], [orientation], "cpu")[0]
    assert decoded.dtype == torch.uint8
    np.testing.assert_array_equal(decoded.permute(1, 2, 0).numpy(), np.asarray(pillow))


def test_header_gives_what_open_image_gives():
    for orientation in (None, 1, 6, 8, 3):
        data = jpeg_bytes(photo(90, 60), orientation)
        assert read_jpeg_header(data, MAX_PIXELS) == open_image(data, max_pixels=MAX_PIXELS)[1]
    info = read_jpeg_header(jpeg_bytes(photo(90, 60), 6), MAX_PIXELS)
    assert (info.width, info.height, info.orientation, info.taken_at.year) == (60, 90, 6, 2021)


def test_header_leaves_what_it_cannot_hand_over_to_pillow():
    png = io.BytesIO()
    Image.fromarray(photo(30, 20)).save(png, "PNG")
    assert read_jpeg_header(png.getvalue(), MAX_PIXELS) is None
    assert read_jpeg_header(jpeg_bytes(photo(30, 20), mode="CMYK"), MAX_PIXELS) is None
    assert read_jpeg_header(jpeg_bytes(photo(300, 200)), 300 * 200 - 1) is None  # over the cap: Pillow explains
    assert read_jpeg_header(b"\xff\xd8\xff not really", MAX_PIXELS) is None
    assert read_jpeg_header(jpeg_bytes(photo(30, 20), mode="L"), MAX_PIXELS).format == "JPEG"


@pytest.mark.parametrize(("width", "height"), [(40, 30), (250, 700), (1000, 620), (2300, 1500), (4000, 3000)])
def test_decoded_on_device_agrees_with_pillow(encoder, width, height):
    """Sizes that take every reduction: none, draft 1/2, 1/4 and 1/8 then a box reduce."""
    datas = [jpeg_bytes(photo(width, height, seed), orientation)
             for seed, orientation in ((1, None), (2, 6), (3, 3))]
    pillow, device = both_paths(encoder, datas)
    assert min_row_cosine(pillow, device) >= 0.999


def test_greyscale_progressive_and_squash(encoder):
    datas = [jpeg_bytes(photo(500, 300), mode="L"), jpeg_bytes(photo(640, 480, 5), 8, progressive=True)]
    pillow, device = both_paths(encoder, datas)
    assert min_row_cosine(pillow, device) >= 0.999
    cfg = {**encoder.model.visual.preprocess_cfg, "size": 32, "resize_mode": "squash"}
    square = gpu_jpeg.preprocess_on_device(gpu_jpeg.decode_jpegs(datas[:1], [None], "cpu")[0], cfg)
    assert square.shape == (3, 32, 32)


def test_camera_roll_jpegs_agree_with_pillow(encoder, shared_datasets):
    folder = shared_datasets / "camera_roll"
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg"))
    datas = [p.read_bytes() for p in files]
    handed = [d for d in datas if read_jpeg_header(d, MAX_PIXELS) is not None]
    assert len(handed) >= len(datas) - 3  # only odd ones (CMYK) stay with Pillow
    for start in range(0, len(handed), 32):
        pillow, device = both_paths(encoder, handed[start : start + 32])
        assert min_row_cosine(pillow, device) >= 0.995


def test_undecodable_jpegs_come_back_as_none():
    good = jpeg_bytes(photo(64, 48))
    images = gpu_jpeg.decode_jpegs([good, b"\xff\xd8\xff\xe0 broken", good], [None, None, 6], "cpu")
    assert images[1] is None and images[0].shape == (3, 48, 64) and images[2].shape == (3, 64, 48)


def test_transform_support_and_availability_on_this_machine(encoder):
    assert gpu_jpeg.transform_supported({"size": 224, "mean": (0.5,) * 3, "std": (0.5,) * 3})
    assert not gpu_jpeg.transform_supported({"size": (224, 256), "mean": (0.5,) * 3, "std": (0.5,) * 3})
    assert not gpu_jpeg.transform_supported({"size": 224, "resize_mode": "longest", "mean": (0.5,) * 3,
                                             "std": (0.5,) * 3})
    assert gpu_jpeg.gpu_jpeg_decoding_available("cpu") is False
    assert encoder.decodes_jpegs() is False  # a CPU model: the decoding threads keep the work


# --- the indexer hand-off -------------------------------------------------------------------------------------


def write_library_photos(folder: Path) -> None:
    folder.mkdir(parents=True)
    for i, orientation in enumerate((None, 6, 3, 8)):
        (folder / f"photo{i}.jpg").write_bytes(jpeg_bytes(photo(900 + 40 * i, 600, seed=i), orientation))
    (folder / "cmyk.jpg").write_bytes(jpeg_bytes(photo(300, 200, 7), mode="CMYK"))
    Image.fromarray(photo(320, 240, 8)).save(folder / "drawing.png")
    (folder / "cut-short.jpg").write_bytes(jpeg_bytes(photo(800, 600, 9))[:2000])


def index_vectors(tmp_path: Path, name: str, photos: Path, **settings) -> tuple[dict, dict]:
    from clipsearch.indexer.run import index_folders
    from clipsearch.library import Library

    settings = load_settings({"data_dir": tmp_path / name, "model": TINY, "pretrained": "none", "device": "cpu",
                              "precision": "fp32", "runtime": "torch", "workers": 2, "batch_size": 3, **settings},
                             env={})
    # Loaded first: photos decoded while the model still loads go through Pillow, as they must (no device yet).
    report = index_folders(settings, [photos], encoder=load_encoder(encoder_spec_from_settings(settings)))
    library = Library(settings)
    try:
        ids, vectors = library.catalog.vectors(library.catalog.library_model()["model_id"])
        known = [row.id for row in library.catalog.known_under([str(photos)]).values()]
        rows = library.catalog.images_by_id(known)
        by_name = {Path(rows[int(i)].path).name: v for i, v in zip(ids, vectors)}
        facts = {Path(r.path).name: (r.width, r.height, r.format, r.taken_at, r.status, r.error)
                 for r in rows.values()}
    finally:
        library.close()
    return by_name, {"facts": facts, "failed": sorted((Path(p).name, why) for p, why in report.failed)}


@pytest.fixture
def jpegs_on_device(monkeypatch):
    """Make the CPU model say it decodes JPEGs itself, as a CUDA model does; count what it is handed."""
    handed: list[int] = []
    real = openclip.OpenClipEncoder.decode_jpegs

    def counting(self, datas, orientations):
        handed.append(len(datas))
        return real(self, datas, orientations)

    monkeypatch.setattr(openclip.OpenClipEncoder, "decodes_jpegs", lambda self: True)
    monkeypatch.setattr(openclip.OpenClipEncoder, "decode_jpegs", counting)
    return handed


def test_indexing_with_jpegs_decoded_on_device_agrees_with_pillow(tmp_path, jpegs_on_device):
    photos = tmp_path / "photos"
    write_library_photos(photos)
    pillow, pillow_report = index_vectors(tmp_path, "pillow", photos)
    assert not jpegs_on_device
    device, device_report = index_vectors(tmp_path, "device", photos, gpu_jpeg_decode=True)
    assert sum(jpegs_on_device) == 5  # four photos and the cut-short JPEG; CMYK and PNG went through Pillow
    assert device.keys() == pillow.keys() == {"photo0.jpg", "photo1.jpg", "photo2.jpg", "photo3.jpg", "cmyk.jpg",
                                              "drawing.png"}
    names = sorted(device)
    assert min_row_cosine(np.stack([device[n] for n in names]), np.stack([pillow[n] for n in names])) >= 0.999
    assert device_report == pillow_report  # same sizes, dates, formats, and the same failure in the same words
    assert [name for name, _ in device_report["failed"]] == ["cut-short.jpg"]


def test_a_failing_device_decoder_hands_the_batch_to_pillow(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(openclip.OpenClipEncoder, "decodes_jpegs", lambda self: True)

    def out_of_memory(self, datas, orientations):
        raise RuntimeError("CUDA out of memory")

    monkeypatch.setattr(openclip.OpenClipEncoder, "decode_jpegs", out_of_memory)
    photos = tmp_path / "photos"
    write_library_photos(photos)
    with caplog.at_level(logging.WARNING):
        vectors, report = index_vectors(tmp_path, "device", photos, gpu_jpeg_decode=True)
    assert len(vectors) == 6 and [name for name, _ in report["failed"]] == ["cut-short.jpg"]
    assert "CUDA out of memory" in caplog.text and "decoding them with Pillow" in caplog.text


def test_the_setting_on_a_cpu_model_warns_and_decodes_with_pillow(tmp_path, caplog):
    photos = tmp_path / "photos"
    write_library_photos(photos)
    with caplog.at_level(logging.WARNING):
        vectors, _ = index_vectors(tmp_path, "cpu", photos, gpu_jpeg_decode=True)
    assert len(vectors) == 6 and "decoding JPEGs on the CPU" in caplog.text


def test_the_setting_is_reported_even_when_every_photo_was_decoded_before_the_model_loaded(tmp_path, caplog):
    from clipsearch.indexer.run import index_folders

    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "one.jpg").write_bytes(jpeg_bytes(photo(120, 90)))
    settings = load_settings({"data_dir": tmp_path / "lib", "model": TINY, "pretrained": "none", "device": "cpu",
                              "precision": "fp32", "runtime": "torch", "gpu_jpeg_decode": True}, env={})
    with caplog.at_level(logging.WARNING):
        assert index_folders(settings, [photos]).embedded == 1  # the model loads in the background meanwhile
    assert "decoding JPEGs on the CPU" in caplog.text
