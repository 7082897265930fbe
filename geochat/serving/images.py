"""Images that arrive from outside: data URLs, server-side paths and uploads, checked against limits.

The engine trusts its caller; a server must not. Before any pixel is decoded this module checks
that a data URL is well-formed base64 of at most `max_upload_bytes`, that a path lies inside one of
`allowed_image_dirs` (after resolving symlinks and `..`, so `examples/../../etc/passwd` is refused),
that the file is one of the raster formats a server reads (`check_image_format`: a GDAL VRT, for one,
could point at any file or URL the server can reach), and that the raster's header declares at most
`max_image_pixels`. Each refusal is its own
`GeoChatError` subclass, so the API can answer with the right status code (400/403/413).
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Sequence
from pathlib import Path

from geochat.errors import GeoChatError, ImageryError
from geochat.imagery import LoadedImage, load_image, read_info
from geochat.serving.limits import ServingSettings

_DATA_URL = re.compile(r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(?:;[\w.+-]+=[\w.+-]+)*)(?P<b64>;base64)?,", re.I)


class BadImageReferenceError(GeoChatError):
    """The image reference is not a data URL or a path (or is a malformed one)."""


class ImageAccessError(GeoChatError):
    """The path points outside the directories the server may read."""


class UnsupportedImageFormatError(ImageryError):
    """The file is not one of the formats a server reads from users (`check_image_format`)."""


class ImageTooLargeError(ImageryError):
    """The file is bigger than `max_upload_bytes` or the raster has more than `max_image_pixels`."""


def decode_data_url(url: str, settings: ServingSettings) -> bytes:
    """The bytes of a base64 `data:` URL, refused when malformed or larger than `max_upload_bytes`."""
    m = _DATA_URL.match(url)
    if m is None or not m.group("b64"):
        raise BadImageReferenceError(
            "image data URL must look like data:image/png;base64,<base64 data> (base64 encoding is required)"
        )
    payload = re.sub(r"\s+", "", url[m.end():])  # `base64` wraps lines at 76 characters unless told -w0
    if len(payload) * 3 // 4 > settings.max_upload_bytes:
        raise ImageTooLargeError(
            f"image is about {len(payload) * 3 // 4:,} bytes, more than max_upload_bytes="
            f"{settings.max_upload_bytes:,}"
        )
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise BadImageReferenceError(f"image data URL holds invalid base64 ({exc})") from exc
    if not data:
        raise BadImageReferenceError("image data URL is empty")
    return data


def resolve_image_path(reference: str, settings: ServingSettings) -> Path:
    """A readable file inside `allowed_image_dirs`.

    Relative paths are tried against each allowed directory, then the working directory; the
    resolved real path must lie inside an allowed directory either way.
    """
    text = reference.removeprefix("file://")
    allowed_dirs = ", ".join(str(d) for d in settings.allowed_image_dirs) or "(none)"
    try:
        path = Path(text).expanduser()
        candidates = [path] if path.is_absolute() else [*(d / path for d in settings.allowed_image_dirs), path]
        for candidate in candidates:
            real = candidate.resolve()
            if not any(real.is_relative_to(d) for d in settings.allowed_image_dirs):
                continue
            if real.is_file():
                return real
        inside = any(c.resolve().is_relative_to(d) for c in candidates for d in settings.allowed_image_dirs)
    except (OSError, ValueError, RuntimeError) as exc:  # a NUL byte, a name too long, ~nosuchuser
        raise BadImageReferenceError(f"image path {reference[:80]!r} cannot be a file name here ({exc})") from exc
    if inside:
        raise BadImageReferenceError(f"image file not found: {reference}")
    raise ImageAccessError(
        f"image path {reference!r} is outside the directories this server may read ({allowed_dirs}); "
        "send the image as a data URL instead"
    )


def image_source(reference: str, settings: ServingSettings) -> bytes | Path:
    """Bytes for a data URL, a checked path for anything else; remote URLs are not fetched."""
    reference = reference.strip()
    if reference.lower().startswith("data:"):
        return decode_data_url(reference, settings)
    if re.match(r"^[a-z][a-z0-9+.-]*://", reference, re.I) and not reference.lower().startswith("file://"):
        raise BadImageReferenceError(
            "the server does not fetch remote URLs; send the image as a data URL "
            "(data:image/png;base64,...) or a path under an allowed directory"
        )
    if not reference:
        raise BadImageReferenceError("image reference is empty")
    return resolve_image_path(reference, settings)


# The formats a server reads for its users, by their first bytes. Anything else is refused before GDAL sees
# it: GDAL picks a driver by content, and a VRT (XML) or similar can point at any file or URL the server
# itself can reach, whatever the upload's name or MIME type says.
_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+",  # TIFF / BigTIFF (GeoTIFF, COG)
          b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff",  # PNG, JPEG
          b"\x00\x00\x00\x0cjP  \r\n\x87\n", b"\xffO\xffQ")  # JPEG 2000 (JP2 box, bare codestream)


def check_image_format(head: bytes, name: str) -> None:
    """Refuse a file whose first bytes are not GeoTIFF/COG, PNG, JPEG, JPEG 2000 or WebP."""
    if head.startswith(_MAGIC) or (head[:4] == b"RIFF" and head[8:12] == b"WEBP"):
        return
    raise UnsupportedImageFormatError(
        f"{name} is not a readable raster for this server: send a GeoTIFF/COG, PNG, JPEG, JPEG 2000 or WebP "
        "file (other formats, such as GDAL VRT, are refused)"
    )


def open_image(
    source: bytes | Path,
    settings: ServingSettings,
    bands: Sequence[int] | str | None = None,
    sensor: str | None = None,
) -> LoadedImage:
    """Check size limits, then read the RGB view (long side <= `max_preview_size`) and facts."""
    size = len(source) if isinstance(source, bytes) else source.stat().st_size
    if size > settings.max_upload_bytes:
        raise ImageTooLargeError(
            f"image file is {size:,} bytes, more than max_upload_bytes={settings.max_upload_bytes:,}"
        )
    if isinstance(source, bytes):
        check_image_format(source[:16], "the uploaded image")
    else:
        with source.open("rb") as f:
            check_image_format(f.read(16), source.name)
    info = read_info(source)
    if info.width * info.height > settings.max_image_pixels:
        raise ImageTooLargeError(
            f"the raster is {info.width}×{info.height} = {info.width * info.height:,} pixels, more than "
            f"this server's max_image_pixels={settings.max_image_pixels:,}; cut a window out first "
            "(e.g. gdal_translate -srcwin) or ask the operator to raise the limit"
        )
    return load_image(source, bands=bands or None, sensor=sensor or None, max_size=settings.max_preview_size,
                      max_pixels=settings.max_image_pixels)


def parse_bands(text: str | None) -> list[int] | str | None:
    """Band numbers typed as "4,3,2" (or "4 3 2"); names like "B4,B3,B2" pass through as text."""
    if text is None or not text.strip():
        return None
    parts = [p for p in re.split(r"[,\s]+", text.strip()) if p]
    if all(p.isdigit() for p in parts):
        return [int(p) for p in parts]
    return ",".join(parts)
