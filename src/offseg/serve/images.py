"""Reading uploaded pictures without trusting them: the pixel count is checked from the header
before anything is decoded (no decompression bombs), and every failure names what is wrong."""

from __future__ import annotations

import io
import warnings

from PIL import Image, UnidentifiedImageError

__all__ = ["BadInput", "DECODED_FORMATS", "open_image"]

# Formats PIL decodes by itself (no external programs, unlike EPS), the ones cameras and browsers make.
DECODED_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF", "PPM")


class BadInput(ValueError):
    """A request the service refuses: HTTP `status` and a message naming the problem."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def open_image(data: bytes, max_pixels: int) -> Image.Image:
    """The RGB picture in `data`, or BadInput: 400 empty, 415 not an image, 413 over
    `max_pixels` (read from the header, before decoding), 400 truncated or corrupt."""
    if not data:
        raise BadInput(400, "empty body: send the image as the request body or as a multipart file field")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit applies below
            image = Image.open(io.BytesIO(data), formats=DECODED_FORMATS)
    except Image.DecompressionBombError as err:
        raise BadInput(413, f"image too large: {err}") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        raise BadInput(
            415, f"not an image: {len(data)} bytes that none of {', '.join(DECODED_FORMATS)} can read"
        ) from None
    width, height = image.size
    if width * height > max_pixels:
        raise BadInput(
            413,
            f"image too large: {width}x{height} = {width * height} pixels, over the limit of {max_pixels} "
            "(--max-pixels)",
        )
    if width < 1 or height < 1:
        raise BadInput(400, f"image has no pixels ({width}x{height})")
    try:
        return image.convert("RGB")  # convert() forces the full decode, so truncation shows here
    except (OSError, SyntaxError, ValueError) as err:  # PIL reports corrupt data as any of these
        raise BadInput(400, f"truncated or corrupt {image.format} image ({err})") from None
