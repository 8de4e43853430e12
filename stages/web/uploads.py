"""Checks on an uploaded image, before and while it is decoded: a byte cap (announced length and streamed body), a
pixel cap read from the header before any pixel is decoded (Pillow's decompression-bomb warning is an error too),
and the image types Pillow recognises from the bytes themselves (never the declared content type)."""
from __future__ import annotations

import io
import warnings
from collections.abc import AsyncIterator

from PIL import Image, UnidentifiedImageError

FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")
MAX_BYTES = 8 * 1024 * 1024
MAX_PIXELS = 25_000_000  # 5000 x 5000; below Pillow's own warning threshold (89.5 M)


class Rejected(Exception):
    """An upload refused: `status` is the HTTP status (413, 415, 400), the message says why."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


async def read_capped(content_length: str | None, body: AsyncIterator[bytes], max_bytes: int) -> bytes:
    """The request body, refused (413) when its announced length or the bytes received exceed `max_bytes`: a body
    sent without a length (chunked) or with a false one is counted as it streams, never read past the cap."""
    if content_length is not None:
        if not content_length.strip().isdigit():
            raise Rejected(400, f"Content-Length {content_length!r} is not a number")
        if int(content_length) > max_bytes:
            raise Rejected(413, f"the upload is {int(content_length)} bytes; the limit is {max_bytes} bytes")
    chunks, size = [], 0
    async for chunk in body:
        size += len(chunk)
        if size > max_bytes:
            raise Rejected(413, f"the upload exceeds the limit of {max_bytes} bytes")
        chunks.append(chunk)
    if not size:
        raise Rejected(400, "the upload is empty: send the image file as the request body")
    return b"".join(chunks)


def decode(data: bytes, max_pixels: int) -> Image.Image:
    """The image in `data`, decoded, as RGB; Rejected when it is not a PNG, JPEG, WEBP, GIF or BMP (415), has more
    than `max_pixels` pixels (413, from its header, before decoding) or is damaged (400)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            img = Image.open(io.BytesIO(data), formats=FORMATS)
        except UnidentifiedImageError:
            raise Rejected(415, f"not an image of a supported type ({', '.join(FORMATS)})") from None
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
            raise Rejected(413, f"the image is too large to decode safely ({err})") from None
        except (OSError, SyntaxError, ValueError) as err:
            raise Rejected(400, f"a damaged image file ({err})") from None
        with img:
            width, height = img.size
            if width * height > max_pixels:
                raise Rejected(413, f"the image is {width} x {height} = {width * height} pixels; the limit is "
                                    f"{max_pixels} pixels")
            try:
                img.load()
                return img.convert("RGB")
            except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
                raise Rejected(413, f"the image is too large to decode safely ({err})") from None
            except (OSError, SyntaxError, ValueError, EOFError) as err:
                raise Rejected(400, f"a damaged {img.format} image ({err})") from None
