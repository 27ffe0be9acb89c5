"""What Tripo accepts: extension → STS format, content sniffing, limits; or a reason to refuse."""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import PurePath
from typing import BinaryIO

from PIL import ImageFile, JpegImagePlugin, PngImagePlugin

from .errors import FileChanged, RejectedFile
from .settings import LimitsSettings

SNIFF_BYTES = 64 * 1024  # how much of a text model is read to recognise it


@dataclass(frozen=True)
class FileKind:
    """What a file's extension promises: the STS format, the task file type and image or model."""

    format: str  # STS format: webp | jpeg | png | glb | obj | fbx | stl
    task_type: str  # Tripo task file type: "jpg" for jpeg, else == format
    kind: str  # "image" | "model"


@dataclass(frozen=True)
class Accepted:
    """A file that passed every check; width and height are set for images only."""

    kind: FileKind
    size: int
    width: int | None = None
    height: int | None = None


_PNG = FileKind("png", "png", "image")
_JPEG = FileKind("jpeg", "jpg", "image")
_KINDS: dict[str, FileKind] = {
    ".png": _PNG,
    ".jpg": _JPEG,
    ".jpeg": _JPEG,
    ".webp": FileKind("webp", "webp", "image"),
    ".glb": FileKind("glb", "glb", "model"),
    ".obj": FileKind("obj", "obj", "model"),
    ".fbx": FileKind("fbx", "fbx", "model"),
    ".stl": FileKind("stl", "stl", "model"),
}

SUPPORTED: tuple[str, ...] = tuple(_KINDS)

_NAMES = {
    "png": "PNG image",
    "jpeg": "JPEG image",
    "webp": "WebP image",
    "glb": "GLB model",
    "obj": "OBJ model",
    "fbx": "FBX model",
    "stl": "STL model",
}

_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_PNG_IEND = b"\x00\x00\x00\x00IEND\xaeB`\x82"
_JPEG_MAGIC = b"\xff\xd8\xff"
_JPEG_EOI = b"\xff\xd9"
_FBX_MAGIC = b"Kaydara FBX Binary  \x00"
_OBJ_KEYWORDS = frozenset(
    b"v vt vn vp f l p o g s mtllib usemtl cstype deg curv curv2 surf".split()
)
# Control bytes that do not occur in text files (tab, LF, FF, CR and ESC do).
_NON_TEXT = bytes(b for b in range(32) if b not in b"\t\n\x0c\r\x1b") + b"\x7f"

_MAGIC: tuple[tuple[bytes, str], ...] = (
    (_PNG_MAGIC, "a PNG image"),
    (_JPEG_MAGIC, "a JPEG image"),
    (b"GIF87a", "a GIF image"),
    (b"GIF89a", "a GIF image"),
    (b"II*\x00", "a TIFF image"),
    (b"MM\x00*", "a TIFF image"),
    (b"8BPS", "a Photoshop document"),
    (b"PK\x03\x04", "a ZIP archive"),
    (b"PK\x05\x06", "a ZIP archive"),
    (b"\x1f\x8b\x08", "a gzip archive"),
    (b"7z\xbc\xaf\x27\x1c", "a 7-Zip archive"),
    (b"Rar!\x1a\x07", "a RAR archive"),
    (b"%PDF-", "a PDF document"),
    (b"\x7fELF", "an ELF executable"),
    (b"\xcf\xfa\xed\xfe", "a Mach-O executable"),
    (b"glTF", "a GLB model"),
    (_FBX_MAGIC, "a binary FBX model"),
    (b"ID3", "an MP3 audio file"),
)
_RIFF_TYPES = {b"WEBP": "a WebP image", b"WAVE": "a WAV audio file", b"AVI ": "an AVI video"}
_FTYP_BRANDS = {
    b"heic": "a HEIC image",
    b"heix": "a HEIC image",
    b"mif1": "a HEIF image",
    b"avif": "an AVIF image",
    b"qt  ": "a QuickTime video",
}


def kind_for_name(name: str) -> FileKind | None:
    """The kind the name's extension promises (case-insensitive), or None if Tripo takes none."""
    return _KINDS.get(PurePath(name).suffix.lower())


def precheck(name: str, size: int, limits: LimitsSettings) -> FileKind:
    """The checks that need no byte of the file: empty, extension, size cap.

    Raises RejectedFile with the reason; callers run it before opening or reading anything.
    """
    if size <= 0:
        raise RejectedFile("the file is empty")
    suffix = PurePath(name).suffix.lower()
    kind = _KINDS.get(suffix)
    if kind is None:
        raise RejectedFile(_unsupported(suffix))
    cap = limits.image_max_bytes if kind.kind == "image" else limits.model_max_bytes
    if size > cap:
        shown, allowed = _sizes(size, cap)
        raise RejectedFile(f"the file is {shown}; {kind.kind}s may be at most {allowed}")
    return kind


def inspect(name: str, data: BinaryIO, size: int, limits: LimitsSettings) -> Accepted:
    """Check a file against what Tripo accepts, reading only headers and tails.

    Raises RejectedFile with one sentence for a person, or FileChanged if the stream turns out
    shorter than `size` (the file shrank while it was checked).
    """
    kind = precheck(name, size, limits)
    suffix = PurePath(name).suffix.lower()
    reader = _Reader(data, size)
    if kind.kind == "model":
        _MODEL_CHECKS[kind.format](reader, suffix)
        return Accepted(kind, size)
    width, height = _IMAGE_CHECKS[kind.format](reader, suffix)
    low, high = limits.image_min_px, limits.image_max_px
    if not (low <= width <= high and low <= height <= high):
        raise RejectedFile(
            f"the image is {width} x {height} px; Tripo takes {low} to {high} px per side"
        )
    return Accepted(kind, size, width, height)


class _Reader:
    """Positioned reads of a stream whose length the caller stated."""

    def __init__(self, data: BinaryIO, size: int) -> None:
        self.data = data
        self.size = size

    def at(self, offset: int, count: int) -> bytes:
        """Up to `count` bytes at `offset`, fewer only where the stated size ends."""
        want = max(0, min(count, self.size - offset))
        self.data.seek(offset)
        chunks: list[bytes] = []
        got = 0
        while got < want:
            chunk = self.data.read(want - got)
            if not chunk:
                raise FileChanged("the file got shorter while it was being checked")
            chunks.append(chunk)
            got += len(chunk)
        return b"".join(chunks)

    def tail(self, count: int) -> bytes:
        return self.at(max(0, self.size - count), count)


# --- images ---------------------------------------------------------------------------------


def _check_png(reader: _Reader, suffix: str) -> tuple[int, int]:
    head = reader.at(0, 4096)
    if not head.startswith(_PNG_MAGIC):
        raise _mismatch(suffix, "png", head, reader.size)
    if reader.tail(len(_PNG_IEND)) != _PNG_IEND:
        raise _corrupt("png")
    return _pillow_size(reader, PngImagePlugin.PngImageFile, "png")


def _check_jpeg(reader: _Reader, suffix: str) -> tuple[int, int]:
    head = reader.at(0, 4096)
    if not head.startswith(_JPEG_MAGIC):
        raise _mismatch(suffix, "jpeg", head, reader.size)
    # Some writers pad to a block size with zeros after the end-of-image marker.
    if not reader.tail(8192).rstrip(b"\x00").endswith(_JPEG_EOI):
        raise _corrupt("jpeg")
    return _pillow_size(reader, JpegImagePlugin.JpegImageFile, "jpeg")


def _check_webp(reader: _Reader, suffix: str) -> tuple[int, int]:
    head = reader.at(0, 4096)
    if not (head[:4] == b"RIFF" and head[8:12] == b"WEBP"):
        raise _mismatch(suffix, "webp", head, reader.size)
    (riff_size,) = struct.unpack_from("<I", head, 4)
    if reader.size not in (riff_size + 8, riff_size + 9):
        raise _corrupt("webp")
    dims = _webp_size(head)
    if dims is None:
        raise _corrupt("webp")
    return dims


def _pillow_size(
    reader: _Reader, opener: Callable[[BinaryIO], ImageFile.ImageFile], fmt: str
) -> tuple[int, int]:
    """Width and height from Pillow's header parser for the format the magic bytes named.

    The plugin class is called directly rather than `Image.open`: it parses the header only and
    skips the decompression-bomb check, which exists to guard decoding (never done here) and
    would raise or warn through process-wide state. Any Pillow failure means a broken file.
    """
    reader.data.seek(0)
    try:
        image = opener(reader.data)
        width, height = image.size
    except Exception as exc:
        raise _corrupt(fmt) from exc
    # Not closed: ImageFile.close() would close the caller's stream too.
    return width, height


def _webp_size(head: bytes) -> tuple[int, int] | None:
    """Canvas size from the first chunk of a WebP file (VP8, VP8L or VP8X), or None.

    Parsed here because Pillow's WebP plugin reads and decodes the whole file on open.
    """
    if len(head) < 30:
        return None
    chunk, body = head[12:16], head[20:30]
    if chunk == b"VP8 " and body[3:6] == b"\x9d\x01\x2a":
        width, height = struct.unpack_from("<HH", body, 6)
        return width & 0x3FFF, height & 0x3FFF
    if chunk == b"VP8L" and body[0] == 0x2F:
        (bits,) = struct.unpack_from("<I", body, 1)
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if chunk == b"VP8X":
        width = int.from_bytes(body[4:7], "little") + 1
        height = int.from_bytes(body[7:10], "little") + 1
        return width, height
    return None


# --- models ---------------------------------------------------------------------------------


def _check_glb(reader: _Reader, suffix: str) -> None:
    head = reader.at(0, 20)
    if head[:4] != b"glTF":
        raise _mismatch(suffix, "glb", reader.at(0, 4096), reader.size)
    if len(head) < 20:
        raise _corrupt("glb")
    version, length, chunk_length = struct.unpack_from("<III", head, 4)
    if version != 2:
        raise RejectedFile(f"the GLB model is glTF version {version}; Tripo takes version 2")
    if length != reader.size:
        raise RejectedFile(
            f"the GLB model is truncated or corrupt: its header says {length:,} bytes"
            f" but the file has {reader.size:,}"
        )
    if head[16:20] != b"JSON" or 20 + chunk_length > reader.size:
        raise _corrupt("glb")


def _check_obj(reader: _Reader, suffix: str) -> None:
    head = reader.at(0, SNIFF_BYTES)
    if _describe_binary(head, reader.size) is not None:
        raise _mismatch(suffix, "obj", head, reader.size)
    if b"\x00" in head:
        raise RejectedFile(f"the file is named {suffix} but its content is binary, not OBJ text")
    if not _has_obj_statement(head):
        raise RejectedFile(
            f"the file is named {suffix} but its first 64 KiB hold no OBJ statement"
            " (v, vt, vn, f, o, g, mtllib, usemtl ...)"
        )


def _check_stl(reader: _Reader, suffix: str) -> None:
    if _is_binary_stl(reader.at(0, 84), reader.size):
        return
    head = reader.at(0, SNIFF_BYTES)
    if _is_ascii_stl(head):
        return
    if _describe_binary(head, reader.size) is None:
        if len(head) >= 84 and b"\x00" in head[:4096]:
            triangles = int.from_bytes(head[80:84], "little")
            raise RejectedFile(
                f"the STL model is truncated or corrupt: its header counts {triangles:,}"
                f" triangles ({84 + 50 * triangles:,} bytes) but the file has {reader.size:,}"
            )
        if head.lstrip()[:5].lower() == b"solid":
            raise RejectedFile(
                "the STL model is truncated or corrupt: it starts like ASCII STL"
                " but its first 64 KiB hold no facet"
            )
    raise _mismatch(suffix, "stl", head, reader.size)


def _check_fbx(reader: _Reader, suffix: str) -> None:
    head = reader.at(0, SNIFF_BYTES)
    if head.startswith(_FBX_MAGIC) or _is_ascii_fbx(head):
        return
    raise _mismatch(suffix, "fbx", head, reader.size)


def _is_binary_stl(head: bytes, size: int) -> bool:
    if len(head) < 84:
        return False
    return 84 + 50 * int.from_bytes(head[80:84], "little") == size


def _is_ascii_stl(head: bytes) -> bool:
    text = head.lower()
    return text.lstrip().startswith(b"solid") and (b"facet" in text or b"endsolid" in text)


def _is_ascii_fbx(head: bytes) -> bool:
    text = head.removeprefix(b"\xef\xbb\xbf").lstrip()
    return text.startswith(b"; FBX") or b"FBXHeaderExtension" in head


def _has_obj_statement(head: bytes) -> bool:
    """True if a line starts with an OBJ keyword; comments alone do not make a model."""
    for line in head.splitlines():
        words = line.split(None, 1)
        if words and words[0] in _OBJ_KEYWORDS:
            return True
    return False


# --- reasons --------------------------------------------------------------------------------


def _describe_binary(head: bytes, size: int) -> str | None:
    """What a recognisable binary format this is ("a ZIP archive"), or None."""
    for magic, what in _MAGIC:
        if head.startswith(magic):
            return what
    if head[:4] == b"RIFF" and head[8:12] in _RIFF_TYPES:
        return _RIFF_TYPES[head[8:12]]
    if head[4:8] == b"ftyp":
        return _FTYP_BRANDS.get(head[8:12], "an MP4 video")
    # Two-byte magics are too weak alone; their fixed zero fields make them certain.
    if head[:2] == b"MZ" and b"\x00" in head[2:64]:
        return "a Windows executable"
    if head[:2] == b"BM" and head[6:10] == b"\x00\x00\x00\x00":
        return "a BMP image"
    if _is_binary_stl(head[:84], size):
        return "a binary STL model"
    return None


def _describe(head: bytes, size: int) -> str | None:
    """What the content recognisably is, binary or text, or None if nothing we know."""
    found = _describe_binary(head, size)
    if found is not None:
        return found
    sample = head[:4096]
    if sample.translate(None, _NON_TEXT) != sample:
        return None
    if _is_ascii_fbx(head):
        return "an ASCII FBX model"
    if _is_ascii_stl(head):
        return "an ASCII STL model"
    if _has_obj_statement(head):
        return "an OBJ model"
    return "text"


def _mismatch(suffix: str, fmt: str, head: bytes, size: int) -> RejectedFile:
    found = _describe(head, size)
    content = found if found is not None else f"not a {_NAMES[fmt]}"
    return RejectedFile(f"the file is named {suffix} but its content is {content}")


def _corrupt(fmt: str) -> RejectedFile:
    return RejectedFile(f"the {_NAMES[fmt]} is truncated or corrupt")


def _unsupported(suffix: str) -> str:
    takes = f"(Tripo takes {', '.join(SUPPORTED)})"
    if not suffix:
        return f"files without an extension are not accepted {takes}"
    return f"'{suffix}' files are not accepted {takes}"


def _sizes(size: int, cap: int) -> tuple[str, str]:
    """Both byte counts for a person, exact when rounding would make them look equal."""
    shown, allowed = _human(size), _human(cap)
    if shown == allowed:
        return f"{size:,} bytes", f"{cap:,} bytes"
    return shown, allowed


def _human(count: int) -> str:
    if count < 1024:
        return f"{count} bytes"
    if count < 1024 * 1024:
        return f"{count / 1024:.1f} KB"
    return f"{count / (1024 * 1024):.1f} MB"


_IMAGE_CHECKS: dict[str, Callable[[_Reader, str], tuple[int, int]]] = {
    "png": _check_png,
    "jpeg": _check_jpeg,
    "webp": _check_webp,
}
_MODEL_CHECKS: dict[str, Callable[[_Reader, str], None]] = {
    "glb": _check_glb,
    "obj": _check_obj,
    "fbx": _check_fbx,
    "stl": _check_stl,
}
