"""Tests for formats: which files Tripo gets, and the reason a person reads when one is refused."""

from __future__ import annotations

import io
import struct
import warnings
import zipfile
import zlib
from pathlib import Path

import pytest
from PIL import Image

from tripo_watchd.errors import FileChanged, RejectedFile
from tripo_watchd.formats import SUPPORTED, Accepted, FileKind, inspect, kind_for_name
from tripo_watchd.settings import LimitsSettings

LIMITS = LimitsSettings()


# --- builders -------------------------------------------------------------------------------


def image_bytes(
    fmt: str, size: tuple[int, int] = (64, 48), mode: str = "RGB", **kw: object
) -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size).save(buf, fmt, **kw)
    return buf.getvalue()


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png_claiming(width: int, height: int) -> bytes:
    """A well-formed PNG whose header claims any size; its pixel data is a few bytes."""
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + png_chunk(b"IDAT", zlib.compress(b"\x00"))
        + png_chunk(b"IEND", b"")
    )


def jpeg_claiming(width: int, height: int) -> bytes:
    """A real small JPEG with its SOF header patched to claim another size."""
    data = bytearray(image_bytes("JPEG", (32, 32)))
    sof = data.index(b"\xff\xc0")
    struct.pack_into(">HH", data, sof + 5, height, width)
    return bytes(data)


def glb(length_delta: int = 0, version: int = 2) -> bytes:
    body = b'{"asset":{"version":"2.0"}}'
    body += b" " * (-len(body) % 4)
    total = 12 + 8 + len(body)
    header = b"glTF" + struct.pack("<II", version, total + length_delta)
    return header + struct.pack("<I", len(body)) + b"JSON" + body


def binary_stl(triangles: int = 2, header: bytes = b"solid made-by-a-binary-exporter") -> bytes:
    return header.ljust(80, b"\x00") + struct.pack("<I", triangles) + b"\x01" * 50 * triangles


OBJ = b"# cube\nmtllib cube.mtl\no Cube\nv 0 0 0\nv 1 0 0\nv 0 1 0\nf 1 2 3\n"
ASCII_STL = (
    b"  solid tri\n facet normal 0 0 1\n  outer loop\n   vertex 0 0 0\n   vertex 1 0 0\n"
    b"   vertex 0 1 0\n  endloop\n endfacet\nendsolid tri\n"
)
BINARY_FBX = b"Kaydara FBX Binary  \x00\x1a\x00" + struct.pack("<I", 7400) + b"\x00" * 160
ASCII_FBX = b"; FBX 7.4.0 project file\n; ----\n\nFBXHeaderExtension:  {\n}\n"
ASCII_FBX_NO_COMMENT = b"\nFBXHeaderExtension:  {\n  FBXHeaderVersion: 1003\n}\n"


def check(name: str, data: bytes, limits: LimitsSettings = LIMITS) -> Accepted:
    return inspect(name, io.BytesIO(data), len(data), limits)


def reason(name: str, data: bytes, limits: LimitsSettings = LIMITS) -> str:
    with pytest.raises(RejectedFile) as caught:
        check(name, data, limits)
    return caught.value.message


class CountingFile(io.FileIO):
    """A file that counts the bytes read from it."""

    read_bytes = 0

    def read(self, size: int | None = -1, /) -> bytes:
        chunk = super().read(size)
        self.read_bytes += len(chunk)
        return chunk


# --- names ----------------------------------------------------------------------------------


def test_kind_for_name_maps_extensions_case_insensitively() -> None:
    """Users' .JPG, .jpeg and .Png files are recognised regardless of case, .jpg as jpeg/jpg."""
    assert kind_for_name("a/b/photo.JPG") == FileKind("jpeg", "jpg", "image")
    assert kind_for_name("photo.jpeg") == FileKind("jpeg", "jpg", "image")
    assert kind_for_name("x.Png") == FileKind("png", "png", "image")
    assert kind_for_name("x.webp") == FileKind("webp", "webp", "image")
    for fmt in ("glb", "obj", "fbx", "stl"):
        assert kind_for_name(f"m.{fmt.upper()}") == FileKind(fmt, fmt, "model")


def test_kind_for_name_returns_none_for_unsupported_names() -> None:
    """Files Tripo does not take are recognised as such before the disk is touched."""
    for name in ("a.zip", "a.gif", "README", "archive.png.zip", ".png", "a.gltf"):
        assert kind_for_name(name) is None


def test_supported_lists_every_extension() -> None:
    """Messages name every accepted extension, and each one maps to a kind."""
    assert SUPPORTED == (".png", ".jpg", ".jpeg", ".webp", ".glb", ".obj", ".fbx", ".stl")
    assert all(kind_for_name("f" + ext) for ext in SUPPORTED)


# --- accepted -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["a.png", "a.PNG"])
def test_png_is_accepted_with_its_size(name: str) -> None:
    """A PNG is accepted with its pixel size."""
    data = image_bytes("PNG", (64, 48))
    assert check(name, data) == Accepted(FileKind("png", "png", "image"), len(data), 64, 48)


@pytest.mark.parametrize("name", ["a.jpg", "a.jpeg", "a.JPG"])
def test_jpeg_is_accepted_as_jpeg_with_task_type_jpg(name: str) -> None:
    """A .jpg/.jpeg file goes to the STS token as jpeg and to tasks as jpg."""
    data = image_bytes("JPEG", (300, 200))
    got = check(name, data)
    assert (got.kind.format, got.kind.task_type, got.kind.kind) == ("jpeg", "jpg", "image")
    assert (got.width, got.height, got.size) == (300, 200, len(data))


def test_jpeg_with_zero_padding_after_the_end_marker_is_accepted() -> None:
    """JPEGs padded with zeros by cameras or scanners are not mistaken for truncated ones."""
    data = image_bytes("JPEG", (40, 40)) + b"\x00" * 700
    assert check("a.jpg", data).width == 40


@pytest.mark.parametrize(
    ("mode", "kw"),
    [
        ("RGB", {}),
        ("RGB", {"lossless": True}),
        ("RGBA", {}),
        ("RGB", {"exif": b"Exif\x00\x00MM\x00*\x00\x00\x00\x08\x00\x00"}),
    ],
    ids=["lossy-VP8", "lossless-VP8L", "alpha-VP8X", "exif-VP8X"],
)
def test_webp_is_accepted_with_its_size(mode: str, kw: dict[str, object]) -> None:
    """Lossy, lossless and extended WebP files are accepted with their pixel size."""
    data = image_bytes("WEBP", (321, 123), mode, **kw)
    got = check("a.webp", data)
    assert (got.kind.format, got.width, got.height) == ("webp", 321, 123)


def test_image_sizes_at_the_limits_are_accepted() -> None:
    """Images of exactly 20 px and 6000 px per side are within Tripo's range."""
    assert check("a.png", png_claiming(20, 6000)).height == 6000


@pytest.mark.parametrize(
    ("name", "data"),
    [
        ("m.glb", glb()),
        ("m.obj", OBJ),
        ("m.obj", b"\xef\xbb\xbf# bom\r\nv\t0 0 0\r\n"),
        ("m.fbx", BINARY_FBX),
        ("m.fbx", ASCII_FBX),
        ("m.fbx", ASCII_FBX_NO_COMMENT),
        ("m.stl", binary_stl()),
        ("m.stl", binary_stl(0, b"")),
        ("m.stl", ASCII_STL),
        ("m.STL", ASCII_STL.upper()),
    ],
    ids=[
        "glb",
        "obj",
        "obj-crlf-tab",
        "fbx-binary",
        "fbx-ascii",
        "fbx-ascii-no-comment",
        "stl-binary-starting-with-solid",
        "stl-binary-empty",
        "stl-ascii",
        "stl-ascii-upper",
    ],
)
def test_models_are_accepted(name: str, data: bytes) -> None:
    """Every model format Tripo takes is accepted, binary and ASCII variants alike."""
    got = check(name, data)
    assert got.kind.kind == "model"
    assert got.kind.format == name.rsplit(".", 1)[1].lower()
    assert (got.size, got.width, got.height) == (len(data), None, None)


# --- rejected: cheap checks -----------------------------------------------------------------


def test_empty_file_is_rejected() -> None:
    """An empty file is refused with a plain reason."""
    assert reason("a.png", b"") == "the file is empty"


def test_unknown_extension_is_rejected_naming_what_is_accepted() -> None:
    """A refused extension is named along with every extension Tripo takes."""
    assert reason("a.zip", b"PK\x03\x04") == (
        "'.zip' files are not accepted"
        " (Tripo takes .png, .jpg, .jpeg, .webp, .glb, .obj, .fbx, .stl)"
    )
    assert reason("Makefile", b"all:").startswith("files without an extension are not accepted")


def test_image_over_the_byte_cap_is_rejected_before_reading() -> None:
    """An image over the configured size cap is refused, and the reason gives both sizes."""
    data = image_bytes("JPEG", (64, 64))
    small = LimitsSettings(image_max_bytes=100)
    msg = reason("a.jpg", data, small)
    assert msg == f"the file is {len(data)} bytes; images may be at most 100 bytes"
    with pytest.raises(RejectedFile) as caught:
        # The stream is empty: the cap is checked from the stated size, before any read.
        inspect("a.png", io.BytesIO(b""), int(31.5 * 1024 * 1024), LIMITS)
    assert caught.value.message == "the file is 31.5 MB; images may be at most 20.0 MB"


def test_size_just_over_the_cap_is_shown_exactly() -> None:
    """When rounding would show equal sizes, the reason shows exact byte counts instead."""
    with pytest.raises(RejectedFile) as caught:
        inspect("a.jpg", io.BytesIO(b""), 20 * 1024 * 1024 + 1, LIMITS)
    assert caught.value.message == (
        "the file is 20,971,521 bytes; images may be at most 20,971,520 bytes"
    )


def test_model_over_the_byte_cap_is_rejected() -> None:
    """A model over the configured model cap is refused."""
    msg = reason("m.stl", binary_stl(3), LimitsSettings(model_max_bytes=100))
    assert msg == "the file is 234 bytes; models may be at most 100 bytes"


# --- rejected: images -----------------------------------------------------------------------


def test_png_named_jpg_is_rejected_naming_png() -> None:
    """A PNG saved as .jpg is refused and the reason says it is really a PNG."""
    msg = reason("photo.jpg", image_bytes("PNG"))
    assert msg == "the file is named .jpg but its content is a PNG image"


def test_zip_and_elf_named_png_are_rejected_naming_their_content() -> None:
    """Archives and programs renamed to .png are refused with what they really are."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as archive:
        archive.writestr("a.txt", "hello")
    assert (
        reason("a.png", buf.getvalue()) == "the file is named .png but its content is a ZIP archive"
    )
    elf = b"\x7fELF\x02\x01\x01" + b"\x00" * 100
    assert reason("a.png", elf) == "the file is named .png but its content is an ELF executable"


@pytest.mark.parametrize(
    ("name", "data", "content"),
    [
        ("a.webp", b"GIF89a" + b"\x00" * 40, "a GIF image"),
        ("a.png", b"%PDF-1.7\n" + b"x" * 40, "a PDF document"),
        ("a.jpg", b"\x00\x00\x00\x18ftypheic" + b"\x00" * 40, "a HEIC image"),
        ("a.png", glb(), "a GLB model"),
        ("a.png", OBJ, "an OBJ model"),
        ("a.jpg", b"hello, world\n", "text"),
        ("a.png", b"\x01\x02\x03\x00\x9a" * 20, "not a PNG image"),
        ("a.glb", image_bytes("JPEG"), "a JPEG image"),
        ("a.fbx", b"\x00\x01\x02" * 30, "not a FBX model"),
        ("a.fbx", ASCII_STL, "an ASCII STL model"),
    ],
)
def test_mismatched_content_is_named(name: str, data: bytes, content: str) -> None:
    """When the content is not what the name says, the reason names what it really is."""
    suffix = "." + name.rsplit(".", 1)[1]
    assert reason(name, data) == f"the file is named {suffix} but its content is {content}"


@pytest.mark.parametrize(
    ("name", "fmt", "cut", "label"),
    [
        ("a.png", "PNG", 20, "PNG image"),
        ("a.jpg", "JPEG", 100, "JPEG image"),
        ("a.webp", "WEBP", 10, "WebP image"),
    ],
)
def test_truncated_images_are_rejected(name: str, fmt: str, cut: int, label: str) -> None:
    """Half-written or cut-off images are refused as truncated."""
    data = image_bytes(fmt, (200, 200), "RGB")
    assert reason(name, data[:-cut]) == f"the {label} is truncated or corrupt"


def test_png_with_a_broken_header_is_rejected() -> None:
    """A PNG whose header checksum is wrong is refused as corrupt (Pillow errors become reasons)."""
    data = bytearray(image_bytes("PNG"))
    data[20] ^= 0xFF  # inside IHDR, so its CRC no longer matches
    assert reason("a.png", bytes(data)) == "the PNG image is truncated or corrupt"


def test_jpeg_without_a_frame_header_is_rejected() -> None:
    """A JPEG that has its end marker but no readable header is refused as corrupt."""
    assert reason("a.jpg", b"\xff\xd8\xff\xfe\x00\x04ab\x12\x34\xff\xd9") == (
        "the JPEG image is truncated or corrupt"
    )


def test_oversized_and_undersized_images_are_rejected() -> None:
    """Images outside 20..6000 px per side are refused with their size and the allowed range."""
    wide = image_bytes("PNG", (12000, 800), "1")
    assert len(wide) < 100_000
    assert reason("a.png", wide) == (
        "the image is 12000 x 800 px; Tripo takes 20 to 6000 px per side"
    )
    assert reason("a.jpg", image_bytes("JPEG", (10, 10))) == (
        "the image is 10 x 10 px; Tripo takes 20 to 6000 px per side"
    )
    assert reason("a.webp", image_bytes("WEBP", (6001, 20), "1", lossless=True)).startswith(
        "the image is 6001 x 20 px"
    )


def test_image_pixel_limits_follow_the_settings() -> None:
    """The pixel range comes from the [limits] settings, not from constants."""
    limits = LimitsSettings(image_min_px=100, image_max_px=200)
    assert reason("a.png", image_bytes("PNG", (64, 150)), limits) == (
        "the image is 64 x 150 px; Tripo takes 100 to 200 px per side"
    )


@pytest.mark.parametrize(
    ("name", "data", "shown"),
    [
        ("bomb.png", png_claiming(100_000, 100_000), "100000 x 100000"),
        ("bomb.png", png_claiming(10_000, 10_000), "10000 x 10000"),
        ("bomb.jpg", jpeg_claiming(65_000, 65_000), "65000 x 65000"),
    ],
)
def test_decompression_bomb_headers_are_rejected_by_size(
    name: str, data: bytes, shown: str
) -> None:
    """A header claiming billions of pixels is refused with its size, without a Pillow warning."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert reason(name, data) == f"the image is {shown} px; Tripo takes 20 to 6000 px per side"


# --- rejected: models -----------------------------------------------------------------------


def test_glb_with_wrong_length_or_version_is_rejected() -> None:
    """A GLB whose header length disagrees with the file, or of glTF 1, is refused."""
    data = glb()
    assert reason("m.glb", data[:-4]) == (
        f"the GLB model is truncated or corrupt: its header says {len(data):,} bytes"
        f" but the file has {len(data) - 4:,}"
    )
    assert reason("m.glb", glb(length_delta=8)).startswith("the GLB model is truncated")
    assert reason("m.glb", glb(version=1)) == (
        "the GLB model is glTF version 1; Tripo takes version 2"
    )
    assert reason("m.glb", b"glTF\x02\x00") == "the GLB model is truncated or corrupt"


def test_binary_junk_named_obj_is_rejected() -> None:
    """Binary data saved as .obj is refused as binary."""
    junk = bytes((i * 37 + 11) % 256 for i in range(5000))
    assert reason("m.obj", junk) == "the file is named .obj but its content is binary, not OBJ text"
    png = image_bytes("PNG")
    assert reason("m.obj", png) == "the file is named .obj but its content is a PNG image"


def test_text_without_obj_statements_is_rejected() -> None:
    """A text file with no geometry (even one full of # comments) is not taken as OBJ."""
    msg = reason("m.obj", b"# Title\n\nJust some notes, not a model.\n")
    assert msg.startswith("the file is named .obj but its first 64 KiB hold no OBJ statement")


def test_stl_that_is_neither_binary_nor_ascii_is_rejected() -> None:
    """An .stl that fits neither the binary size rule nor ASCII STL is refused."""
    truncated = binary_stl(3)[:-7]
    assert reason("m.stl", truncated) == (
        "the STL model is truncated or corrupt: its header counts 3 triangles (234 bytes)"
        f" but the file has {len(truncated)}"
    )
    assert reason("m.stl", b"solid x\nnothing here\n").endswith("hold no facet")
    assert reason("m.stl", b"just text\n") == "the file is named .stl but its content is text"
    assert reason("m.stl", b"PK\x03\x04" + b"\x00" * 200) == (
        "the file is named .stl but its content is a ZIP archive"
    )


def test_fbx_that_is_neither_binary_nor_ascii_is_rejected() -> None:
    """An .fbx without the binary magic or an ASCII FBX header is refused."""
    assert reason("m.fbx", b"Kaydara FBX Bin") == "the file is named .fbx but its content is text"


# --- reading little -------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["glb", "stl"])
def test_big_sparse_model_is_checked_from_its_header_only(tmp_path: Path, kind: str) -> None:
    """A 100 MB model is checked by reading its header, never the whole file."""
    size = 100 * 1024 * 1024 + 84  # 84 + 50 * n for a binary STL
    path = tmp_path / f"big.{kind}"
    with path.open("wb") as out:
        if kind == "glb":
            out.write(b"glTF" + struct.pack("<IIII", 2, size, 8, 0x4E4F534A) + b"{}      ")
        else:
            out.write(b"\x00" * 80 + struct.pack("<I", (size - 84) // 50))
        out.truncate(size)
    with CountingFile(path) as counting:
        got = inspect(path.name, counting, size, LIMITS)
    assert got.size == size
    assert 0 < counting.read_bytes <= 4096


def test_image_checks_read_header_and_tail_only(tmp_path: Path) -> None:
    """A large PNG is checked from its first and last bytes, not read whole."""
    data = image_bytes("PNG", (64, 64))
    iend = data[-12:]
    path = tmp_path / "big.png"
    size = 15 * 1024 * 1024
    with path.open("wb") as out:
        out.write(data[:-12])
        out.truncate(size - 12)
        out.seek(size - 12)
        out.write(iend)
    with CountingFile(path) as counting:
        got = inspect("big.png", counting, size, LIMITS)
    assert (got.width, got.height) == (64, 64)
    assert 0 < counting.read_bytes < 64 * 1024


def test_stream_shorter_than_the_stated_size_means_the_file_changed() -> None:
    """If the file shrinks while it is checked, it is sent back to wait rather than refused."""
    data = glb()
    with pytest.raises(FileChanged):
        inspect("m.glb", io.BytesIO(data[:10]), len(data), LIMITS)
