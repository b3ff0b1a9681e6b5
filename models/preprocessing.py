"""Request body to model input: the one pipeline the TorchServe handler and the in-process references share.

Accepted bodies, chosen by the request's content type:

- ``image/jpeg`` and ``image/png``: decoded with Pillow, converted to RGB, shorter side resized to 256
  (bilinear), centre-cropped to 224 x 224, scaled to [0, 1] and normalised with the ImageNet mean and
  standard deviation (torchvision's ``Resize(256)``, ``CenterCrop(224)``, ``ToTensor()``, ``Normalize``).
- ``application/x-npy``: a ``numpy.save`` file of a float32 array of shape [3, 224, 224], used as the
  model input as it is (already normalised); pickled objects are refused.

Anything else raises `InputError`, whose `status` is the HTTP status the handler answers that one request with.
This file is packaged next to handler.py in each .mar, so it imports nothing from this repository.
"""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image

RESIZE_SHORTER_SIDE = 256
CROP_SIZE = 224
INPUT_SHAPE = (3, CROP_SIZE, CROP_SIZE)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Larger images are refused before decoding: a small compressed body can expand to gigabytes.
MAX_IMAGE_PIXELS = 40_000_000

IMAGE_FORMATS = {"image/jpeg": "JPEG", "image/png": "PNG"}
NPY_CONTENT_TYPE = "application/x-npy"
SUPPORTED_CONTENT_TYPES = (*IMAGE_FORMATS, NPY_CONTENT_TYPE)


class InputError(ValueError):
    """A request body the models cannot take; `status` is 400 (bad body) or 415 (unsupported content type)."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


def media_type(content_type: str | None) -> str:
    """`image/JPEG; charset=x` -> `image/jpeg`; an absent header is an unsupported type, not a guess."""
    if not content_type:
        raise InputError(f"request has no Content-Type; send one of {', '.join(SUPPORTED_CONTENT_TYPES)}", status=415)
    return content_type.split(";", 1)[0].strip().lower()


def decode_image(body: bytes, expected_format: str) -> Image.Image:
    """Pillow image in RGB from JPEG or PNG bytes that really are of `expected_format`."""
    try:
        image = Image.open(io.BytesIO(body))
        if image.format != expected_format:
            raise InputError(f"body is {image.format or 'an unknown format'}, not {expected_format} as its Content-Type says")
        width, height = image.size
        if width * height > MAX_IMAGE_PIXELS:
            raise InputError(f"image is {width}x{height} pixels; at most {MAX_IMAGE_PIXELS} pixels are accepted")
        image.load()
    except InputError:
        raise
    # Pillow reports unreadable and truncated data with any of these, depending on the format plugin.
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as error:
        raise InputError(f"body is not a decodable {expected_format} image ({len(body)} bytes): {error}") from error
    return image.convert("RGB")


def image_to_tensor(image: Image.Image) -> torch.Tensor:
    """Resize shorter side to 256 (bilinear), centre crop 224, [0, 1], ImageNet-normalised: float32 [3, 224, 224]."""
    width, height = image.size
    scale = RESIZE_SHORTER_SIDE / min(width, height)
    # torchvision's Resize(int): the shorter side becomes exactly 256, the longer one is truncated.
    if width <= height:
        size = (RESIZE_SHORTER_SIDE, int(height * scale))
    else:
        size = (int(width * scale), RESIZE_SHORTER_SIDE)
    resized = image.resize(size, Image.Resampling.BILINEAR)
    left = int(round((size[0] - CROP_SIZE) / 2.0))
    top = int(round((size[1] - CROP_SIZE) / 2.0))
    cropped = resized.crop((left, top, left + CROP_SIZE, top + CROP_SIZE))
    pixels = torch.from_numpy(np.asarray(cropped, dtype=np.uint8).copy()).permute(2, 0, 1).float().div(255.0)
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (pixels - mean) / std


def npy_to_tensor(body: bytes) -> torch.Tensor:
    """A float32 [3, 224, 224] array saved with numpy.save, checked and returned as a tensor."""
    try:
        array = np.load(io.BytesIO(body), allow_pickle=False)
    except (ValueError, EOFError, OSError) as error:
        raise InputError(f"body is not a .npy array without pickled objects ({len(body)} bytes): {error}") from error
    if not isinstance(array, np.ndarray):
        raise InputError("body is an .npz archive; send a single array written with numpy.save")
    if array.dtype != np.float32:
        raise InputError(f"array dtype is {array.dtype}; send float32 (little-endian), e.g. array.astype(numpy.float32)")
    if array.shape != INPUT_SHAPE:
        raise InputError(f"array shape is {list(array.shape)}; send {list(INPUT_SHAPE)} (channels, height, width), one image per request")
    if not np.isfinite(array).all():
        raise InputError("array contains NaN or infinite values")
    return torch.from_numpy(array.copy())


def body_to_tensor(body: bytes | bytearray | str | None, content_type: str | None) -> torch.Tensor:
    """Model input [3, 224, 224] for one request body, or InputError naming what is wrong with it."""
    kind = media_type(content_type)
    if kind not in SUPPORTED_CONTENT_TYPES:
        raise InputError(f"Content-Type {kind!r} is not supported; send one of {', '.join(SUPPORTED_CONTENT_TYPES)}", status=415)
    # TorchServe hands over text and JSON bodies already decoded; neither is a supported type.
    if not isinstance(body, bytes | bytearray) or not body:
        raise InputError(f"request body is empty or not binary; send the {kind} bytes as the raw body")
    if kind == NPY_CONTENT_TYPE:
        return npy_to_tensor(bytes(body))
    return image_to_tensor(decode_image(bytes(body), IMAGE_FORMATS[kind]))
