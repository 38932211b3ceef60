"""The parallel PNG writer: exact pixels in every mode, size and band split, a valid zlib stream and
chunk CRCs, each filter, Pillow's metadata chunks, and where `encode_image` uses it or Pillow."""

from __future__ import annotations

import io
import json
import multiprocessing
import struct
import threading
import zlib

import numpy as np
import pytest
from PIL import Image, ImageCms

from zturbo.imageio import (
    PNG_LEVEL,
    PNG_STRATEGY,
    a1111_parameters,
    encode_image,
    metadata_text,
    png_info,
    read_metadata,
    save_image,
)
from zturbo.pngwrite import Filter, PngWriter, adler32_combine, filter_rows
from zturbo.result import GeneratedImage

META = {
    "prompt": "一只狐狸 🦊, a: b\nsecond line",
    "negative_prompt": "blurry",
    "seed": 42,
    "steps": 8,
    "guidance_scale": 0.0,
    "width": 64,
    "height": 48,
    "model": "tiny-random",
    "model_fingerprint": "ab" * 32,
    "zturbo_version": "test",
}
BPP = {"L": 1, "LA": 2, "RGB": 3, "RGBA": 4}


def picture(width: int, height: int, mode: str = "RGB", seed: int = 0) -> Image.Image:
    """Gradients with noise on top: runs for deflate to find and values that wrap when filtered."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = (x * 7 + y * 3)[..., None] + np.arange(BPP[mode]) * 50
    pixels = (base + rng.integers(0, 40, base.shape)) % 256
    array = pixels.astype(np.uint8)
    image = Image.fromarray(array[..., 0] if mode == "L" else array)
    assert image.mode == mode
    return image


def written(image: Image.Image, writer: PngWriter, chunks: list[tuple[bytes, bytes]] | None = None) -> bytes:
    out = io.BytesIO()
    writer.write(out, image, chunks or [])
    return out.getvalue()


def chunks_of(data: bytes) -> list[tuple[bytes, bytes]]:
    """(type, data) of every chunk, each CRC checked."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    out, pos = [], 8
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length : pos + 12 + length])
        assert crc == zlib.crc32(kind + body), kind
        out.append((kind, body))
        pos += 12 + length
    assert out[-1] == (b"IEND", b"")
    return out


def decoded(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        im.verify()
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im)


def writer(threads: int = 4, min_band_bytes: int = 64, filter: Filter = Filter.PAETH) -> PngWriter:
    """A writer that splits even small images, so the tests run the multi-band path on any machine."""
    return PngWriter(
        level=PNG_LEVEL, strategy=PNG_STRATEGY, filter=filter, threads=threads, min_band_bytes=min_band_bytes
    )


@pytest.fixture(scope="module")
def split() -> PngWriter:
    with writer() as w:
        yield w


@pytest.mark.parametrize("size", [(1, 1), (3, 7), (7, 3), (1000, 17), (17, 1000), (5, 13), (1024, 1024)])
def test_pixels_decode_exactly_at_every_size(size, split):
    image = picture(*size)
    data = written(image, split)
    assert np.array_equal(decoded(data), np.asarray(image))
    bands = split.bands(size[1], size[0] * 3)
    assert len([c for c in chunks_of(data) if c[0] == b"IDAT"]) == len(bands)


def test_bands_split_rows_unevenly_and_small_images_take_one():
    assert writer(threads=4, min_band_bytes=1).bands(13, 15) == [(0, 3), (3, 6), (6, 9), (9, 13)]
    assert writer(threads=4, min_band_bytes=1).bands(2, 15) == [(0, 1), (1, 2)]  # never an empty band
    one = PngWriter(level=PNG_LEVEL, strategy=PNG_STRATEGY, threads=8)
    assert one.bands(48, 64 * 3) == [(0, 48)]  # 9 KiB: one band, no pool
    assert len(one.bands(1024, 1024 * 3)) == 8
    image = picture(64, 48)
    data = written(image, one)
    assert [c[0] for c in chunks_of(data)].count(b"IDAT") == 1 and one._pool is None
    assert np.array_equal(decoded(data), np.asarray(image))


@pytest.mark.parametrize("mode", ["L", "LA", "RGB", "RGBA"])
@pytest.mark.parametrize("size", [(1, 1), (3, 7), (31, 9)])
def test_every_mode_decodes_exactly(mode, size, split):
    image = picture(*size, mode=mode, seed=3)
    data = written(image, split)
    with Image.open(io.BytesIO(data)) as im:
        assert im.mode == mode
    assert np.array_equal(decoded(data), np.asarray(image))


@pytest.mark.parametrize("kind", list(Filter))
def test_each_filter_decodes_exactly_and_marks_every_row(kind):
    image = picture(37, 23, seed=int(kind))
    with writer(threads=3, filter=kind) as w:
        data = written(image, w)
    assert np.array_equal(decoded(data), np.asarray(image))
    rows = zlib.decompress(b"".join(body for k, body in chunks_of(data) if k == b"IDAT"))
    assert rows[:: 37 * 3 + 1] == bytes([kind]) * 23


def test_filters_follow_the_png_specification():
    """Against a per-byte reading of the specification (section 9.2) on values that wrap."""
    image = picture(5, 4, seed=9)
    raw = np.asarray(image).reshape(4, 15).astype(int)
    for kind in Filter:
        expected = []
        for y in range(4):
            expected.append(int(kind))
            for i in range(15):
                a = raw[y, i - 3] if i >= 3 else 0
                b = raw[y - 1, i] if y else 0
                c = raw[y - 1, i - 3] if y and i >= 3 else 0
                expected.append((raw[y, i] - _predict(kind, a, b, c)) % 256)
        got = np.concatenate([filter_rows(raw.astype(np.uint8), s, s + 2, 3, kind) for s in (0, 2)])
        assert got.tobytes() == bytes(expected), kind.name


def _predict(kind: Filter, a: int, b: int, c: int) -> int:
    if kind == Filter.PAETH:
        p = a + b - c
        pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
        return a if pa <= pb and pa <= pc else b if pb <= pc else c
    return {Filter.NONE: 0, Filter.SUB: a, Filter.UP: b, Filter.AVERAGE: (a + b) // 2}[kind]


def test_the_idat_data_is_one_zlib_stream_of_the_filtered_rows(split):
    image = picture(300, 200)
    data = written(image, split)
    idat = [body for kind, body in chunks_of(data) if kind == b"IDAT"]
    assert len(idat) == 4
    raw = np.asarray(image).reshape(200, 900)
    # zlib.decompress checks the header and the Adler-32 of the whole stream.
    assert zlib.decompress(b"".join(idat)) == filter_rows(raw, 0, 200, 3, Filter.PAETH).tobytes()
    assert idat[0][:2] == zlib.compress(b"", PNG_LEVEL)[:2]


def test_adler32_combine_equals_adler32_of_the_whole():
    rng = np.random.default_rng(5)
    data = rng.integers(0, 256, 200_000, dtype=np.uint8).tobytes()
    for cut in (0, 1, 65521, 65522, 150_000, len(data)):
        head, tail = data[:cut], data[cut:]
        assert adler32_combine(zlib.adler32(head), zlib.adler32(tail), len(tail)) == zlib.adler32(data)
    assert adler32_combine(1, 1, 0) == 1


def generated(image: Image.Image) -> GeneratedImage:
    return GeneratedImage(image, 42, META["prompt"], META["negative_prompt"], dict(META))


def test_encode_image_writes_pillows_text_chunks_and_the_metadata_reads_back(tmp_path):
    image = generated(picture(64, 48))
    out = io.BytesIO()
    encode_image(image, out, output_format="png", compression=None)
    ours = chunks_of(out.getvalue())
    pillow = io.BytesIO()
    image.image.save(pillow, format="PNG", pnginfo=png_info(META))
    # Every chunk but the pixels is Pillow's, byte for byte and in Pillow's order.
    assert [c for c in ours if c[0] != b"IDAT"] == [c for c in chunks_of(pillow.getvalue()) if c[0] != b"IDAT"]
    assert [c[0] for c in ours if c[0] != b"IDAT"] == [b"IHDR", b"iTXt", b"iTXt", b"IEND"]
    texts = metadata_text(out.getvalue())
    assert texts == {
        "zturbo": json.dumps(META, ensure_ascii=False, sort_keys=True),
        "parameters": a1111_parameters(META),
    }
    path = save_image(image, tmp_path / "a.png", output_format="png", compression=None)
    assert read_metadata(path) == META
    assert np.array_equal(decoded(path.read_bytes()), np.asarray(image.image))


def test_encode_image_uses_the_writer_and_pillow_only_with_options_or_other_images():
    image = generated(picture(64, 48))
    ours, pillow = io.BytesIO(), io.BytesIO()
    encode_image(image, ours, output_format="png", compression=None)
    rows = zlib.decompress(b"".join(body for kind, body in chunks_of(ours.getvalue()) if kind == b"IDAT"))
    assert rows[:: 64 * 3 + 1] == bytes([Filter.PAETH]) * 48  # one filter for all rows: not Pillow's choice
    options = {"compress_level": 6}
    encode_image(image, pillow, output_format="png", compression=None, options=options)
    expected = io.BytesIO()
    image.image.save(expected, format="PNG", pnginfo=png_info(META), compress_level=6, compress_type=PNG_STRATEGY)
    assert pillow.getvalue() == expected.getvalue()


@pytest.mark.parametrize("kind", ["P", "I;16", "icc", "transparency"])
def test_images_the_writer_does_not_cover_go_to_pillow_with_their_metadata(kind):
    image = picture(20, 10)
    if kind == "P":
        image = image.quantize(16)
    elif kind == "I;16":
        image = Image.fromarray(np.arange(200, dtype=np.uint16).reshape(10, 20) * 300)
        assert image.mode == "I;16"
    elif kind == "icc":
        image.info["icc_profile"] = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    else:
        image.info["transparency"] = (1, 2, 3)
    out = io.BytesIO()
    encode_image(generated(image), out, output_format="png", compression=None)
    expected = io.BytesIO()
    image.save(expected, format="PNG", pnginfo=png_info(META), compress_level=PNG_LEVEL, compress_type=PNG_STRATEGY)
    assert out.getvalue() == expected.getvalue()
    assert metadata_text(out.getvalue())["parameters"] == a1111_parameters(META)


def test_one_writer_serves_several_threads_at_once(split):
    images = [picture(200, 150 + k, seed=k) for k in range(6)]
    results: dict[int, bytes] = {}

    def encode(k: int) -> None:
        results[k] = written(images[k], split)

    threads = [threading.Thread(target=encode, args=(k,)) for k in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for k, image in enumerate(images):
        assert np.array_equal(decoded(results[k]), np.asarray(image))


def _encode_in_child(w: PngWriter, queue: multiprocessing.Queue) -> None:
    image = picture(200, 150)
    queue.put(np.array_equal(decoded(written(image, w)), np.asarray(image)))


def test_a_forked_child_starts_its_own_pool():
    """A pool's threads do not survive a fork: the child's first multi-band image must not wait on them."""
    ctx = multiprocessing.get_context("fork")
    with writer() as w:
        written(picture(200, 150), w)  # the parent's pool is running
        queue = ctx.Queue()
        child = ctx.Process(target=_encode_in_child, args=(w, queue))
        child.start()
        child.join(60)
        if child.is_alive():
            child.kill()
            pytest.fail("the forked child hung on its parent's thread pool")
        assert child.exitcode == 0 and queue.get(timeout=5) is True


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"level": 12}, r"zlib level 12 is not one of -1\.\.9"),
        ({"strategy": 9}, r"zlib strategy 9 is not one of"),
        ({"filter": 7}, r"PNG filter 7 is not one of 0 \(NONE\), 1 \(SUB\), 2 \(UP\), 3 \(AVERAGE\), 4 \(PAETH\)"),
        ({"threads": 0}, r"threads 0 must be at least 1"),
        ({"min_band_bytes": 0}, r"min_band_bytes 0 must be at least 1"),
    ],
)
def test_bad_settings_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PngWriter(**{"level": PNG_LEVEL, "strategy": PNG_STRATEGY, **kwargs})


def test_modes_it_cannot_write_are_named():
    with pytest.raises(ValueError, match=r"image mode 'P' is not one of L, LA, RGB, RGBA"):
        written(picture(4, 4).quantize(4), writer())
