"""JPEG decoding on the model's GPU (torchvision's nvJPEG batch decoder), then open_clip's eval transform there.

Used by indexing with `gpu_jpeg_decode` when the model runs on CUDA: the decoding threads then only read,
hash and parse headers, and a batch of JPEGs is decoded and preprocessed where the model runs. Everything
here also runs on the CPU (torchvision's libjpeg decoder), which is how the tests check it against the
Pillow path.
"""

from __future__ import annotations

import logging
import warnings
from typing import Sequence

import torch
import torch.nn.functional as F

from clipsearch.encoders.openvino import eval_geometry, transform_unsupported

log = logging.getLogger(__name__)

# EXIF orientation -> the same mapping as ImageOps.exif_transpose, on [C, H, W] tensors (torch's rot90 turns
# from the first of `dims` towards the second: k=1 is counter-clockwise, Pillow's ROTATE_90).
_ORIENT = {
    2: lambda x: x.flip(-1),
    3: lambda x: x.flip(-2, -1),
    4: lambda x: x.flip(-2),
    5: lambda x: x.transpose(-2, -1),
    6: lambda x: torch.rot90(x, -1, dims=(-2, -1)),
    7: lambda x: x.transpose(-2, -1).flip(-2, -1),
    8: lambda x: torch.rot90(x, 1, dims=(-2, -1)),
}


def gpu_jpeg_decoding_available(device: str) -> bool:
    """Whether torchvision can decode JPEGs on this CUDA device."""
    if not device.startswith("cuda") or not torch.cuda.is_available():
        return False
    try:
        import torchvision.io
    except ImportError:
        return False
    return hasattr(torchvision.io, "decode_jpeg") and hasattr(torch.ops.image, "decode_jpegs_cuda")


def transform_supported(cfg: dict) -> bool:
    """Whether preprocess_on_device reproduces open_clip's eval transform for this preprocess config."""
    return transform_unsupported(cfg) is None  # the transforms openvino.preprocess_image reproduces too


def decode_jpegs(datas: Sequence[bytes], orientations: Sequence[int | None], device: str) -> list[torch.Tensor | None]:
    """Upright uint8 RGB [3, H, W] tensors on `device`, one per JPEG; None where this one could not be decoded."""
    from torchvision.io import decode_jpeg
    from torchvision.io.image import ImageReadMode

    # torchvision 0.29 deprecates its decoders for TorchCodec's, which mirror them; they still work, so users
    # are not told about it on every batch.
    warnings.filterwarnings("ignore", "The image decoding and encoding capabilities of TorchVision are deprecated",
                            DeprecationWarning)
    encoded = [torch.frombuffer(bytearray(data), dtype=torch.uint8) for data in datas]
    try:
        images: list[torch.Tensor | None] = list(decode_jpeg(encoded, mode=ImageReadMode.RGB, device=device))
    except Exception as e:  # noqa: BLE001 - one bad file fails the whole batch call: find it one by one
        log.debug("batched JPEG decoding failed (%s); decoding one by one", e)
        images = []
        for one in encoded:
            try:
                images.append(decode_jpeg(one, mode=ImageReadMode.RGB, device=device))
            except Exception as e:  # noqa: BLE001 - the caller decodes it with Pillow, which explains failures
                log.debug("JPEG not decodable on %s (%s)", device, e)
                images.append(None)
    return [None if image is None else _ORIENT.get(orientation, lambda x: x)(image)
            for image, orientation in zip(images, orientations)]


def preprocess_on_device(image: torch.Tensor, cfg: dict) -> torch.Tensor:
    """Upright uint8 RGB [3, H, W] of a JPEG -> float32 [3, size, size]: what the Pillow path gives, on its device.

    The Pillow path decodes a large JPEG at reduced scale (draft: 1/2, 1/4 or 1/8, chosen as Pillow chooses),
    box-reduces what is still twice the model size, then applies open_clip's eval transform. Here the
    same reductions are box averages over the full decode, so both paths resize and crop the same pixel grid.
    """
    from torchvision.transforms.v2.functional import InterpolationMode, resize

    size = cfg["size"]
    size = int(size[0] if isinstance(size, (list, tuple)) else size)
    x = image
    for factor in (_draft_scale(*x.shape[-2:], size), None):
        factor = factor or min(x.shape[-2:]) // size  # then Image.reduce's whole factor, as _reduce_towards
        if factor >= 2:
            x = F.avg_pool2d(x.unsqueeze(0).float(), factor, ceil_mode=True)[0].round_().to(torch.uint8)
    height, width = x.shape[-2:]
    new_width, new_height, left, top = eval_geometry(width, height, size, cfg.get("resize_mode"))
    if (new_height, new_width) != (height, width):
        # torchvision's uint8 antialiased resize is the one written to match Pillow's (within 1 level).
        mode = InterpolationMode.BILINEAR if cfg.get("interpolation") == "bilinear" else InterpolationMode.BICUBIC
        x = resize(x, [new_height, new_width], interpolation=mode, antialias=True)
    x = x[:, top : top + size, left : left + size].float() / 255.0
    mean = torch.tensor(cfg["mean"], dtype=torch.float32, device=x.device)[:, None, None]
    std = torch.tensor(cfg["std"], dtype=torch.float32, device=x.device)[:, None, None]
    return (x - mean) / std


def _draft_scale(height: int, width: int, size: int) -> int:
    """The reduction Pillow's JpegImageFile.draft picks for a (size, size) request: 8, 4, 2 or 1."""
    scale = min(width // size, height // size)
    return next((s for s in (8, 4, 2) if scale >= s), 1)
