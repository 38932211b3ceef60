"""A fast PNG writer for 8-bit L, LA, RGB and RGBA images: one filter for every row, row bands
filtered and deflated in parallel threads.

Pillow picks a filter for each row by trying all five and deflates on the calling thread: 100 ms
and more of one core for a 1024² image, on the critical path of a lone request. Here every row gets the same
filter, computed with numpy over whole bands of rows, and each band is deflated by its own
raw-deflate compressor on a thread of a pool (numpy and zlib release the GIL). A band other than
the last ends with a sync flush, which ends its blocks on a byte boundary, so the bands' outputs
placed end to end are one deflate stream (pigz's technique); the zlib header goes before it and
the Adler-32 of all the filtered bytes, combined from the bands' own, after it. Each band is an
IDAT chunk of its own, so its CRC is computed on its thread too.
"""

from __future__ import annotations

import enum
import os
import struct
import threading
import zlib
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import IO, Any

import numpy as np

SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Pillow's mode -> (PNG colour type, bytes per pixel); every sample 8 bits.
COLOR_TYPES = {"L": (0, 1), "LA": (4, 2), "RGB": (2, 3), "RGBA": (6, 4)}
# What Pillow writes from `image.info` on its own (iCCP, tRNS): such images go to Pillow.
PILLOW_INFO_KEYS = ("icc_profile", "transparency")
MAX_THREADS = 8
# A band smaller than this costs more in thread hand-off and a restarted deflate window than it saves.
MIN_BAND_BYTES = 256 * 1024
# Far below a chunk's limit of 2**31 - 1 bytes, however little deflate compresses a band.
MAX_BAND_BYTES = 1 << 30
# Paeth runs in int16 over this many samples at a time, so its temporaries stay in the CPU's cache.
_PAETH_STEP = 1 << 17
_ADLER_BASE = 65521


class Filter(enum.IntEnum):
    """The PNG filter types (the byte before each row)."""

    NONE = 0
    SUB = 1
    UP = 2
    AVERAGE = 3
    PAETH = 4


def default_threads() -> int:
    """The CPUs this process may run on, at most MAX_THREADS."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(MAX_THREADS, cpus))


def supports(image: Any) -> bool:
    """Whether this writer's file of `image` (a PIL image) holds all that Pillow's would: 8-bit
    samples in a mode of COLOR_TYPES, and nothing in `image.info` that Pillow writes as a chunk."""
    return image.mode in COLOR_TYPES and not any(key in image.info for key in PILLOW_INFO_KEYS)


class PngWriter:
    """Writes PNG files; owns the thread pool its bands run on, started with the first image
    large enough to split and started anew in a forked child (a pool's threads do not survive
    a fork). One writer may serve several threads at once. `threads` counts the calling thread,
    which deflates a band itself."""

    def __init__(
        self,
        *,
        level: int,
        strategy: int,
        filter: Filter = Filter.PAETH,
        threads: int | None = None,
        min_band_bytes: int = MIN_BAND_BYTES,
    ) -> None:
        if not -1 <= level <= 9:
            raise ValueError(f"zlib level {level!r} is not one of -1..9")
        if strategy not in (zlib.Z_DEFAULT_STRATEGY, zlib.Z_FILTERED, zlib.Z_HUFFMAN_ONLY, zlib.Z_RLE, zlib.Z_FIXED):
            raise ValueError(f"zlib strategy {strategy!r} is not one of zlib's Z_* strategies (0..4)")
        if filter not in Filter.__members__.values():
            raise ValueError(
                f"PNG filter {filter!r} is not one of {', '.join(f'{f.value} ({f.name})' for f in Filter)}"
            )
        if threads is not None and threads < 1:
            raise ValueError(f"threads {threads!r} must be at least 1")
        if min_band_bytes < 1:
            raise ValueError(f"min_band_bytes {min_band_bytes!r} must be at least 1")
        self.level, self.strategy, self.filter = level, strategy, Filter(filter)
        self.threads = threads if threads is not None else default_threads()
        self.min_band_bytes = min_band_bytes
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None
        self._pool_pid = 0

    def write(self, fp: IO[bytes], image: Any, chunks: Iterable[tuple[bytes, bytes]] = ()) -> None:
        """Write `image` (a PIL image of a mode in COLOR_TYPES) as a PNG file into `fp`, with
        `chunks` ((type, data) pairs, such as a PngInfo's text chunks) between IHDR and the pixels."""
        if image.mode not in COLOR_TYPES:
            raise ValueError(f"image mode {image.mode!r} is not one of {', '.join(COLOR_TYPES)}; save it with Pillow")
        color_type, bpp = COLOR_TYPES[image.mode]
        width, height = image.size
        if not width or not height:
            raise ValueError(f"image size {width}x{height} is empty; a PNG has at least one row and one column")
        raw = np.asarray(image).reshape(height, width * bpp)
        header = struct.pack(">IIBBBBB", width, height, 8, color_type, 0, 0, 0)
        fp.write(SIGNATURE + chunk(b"IHDR", header) + b"".join(chunk(kind, data) for kind, data in chunks))
        self._write_idat(fp, raw, bpp)
        fp.write(chunk(b"IEND", b""))

    def close(self) -> None:
        """Stop the pool's threads (a later write starts a new pool)."""
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True)

    def __enter__(self) -> PngWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def bands(self, height: int, row_bytes: int) -> list[tuple[int, int]]:
        """The row ranges [start, stop) an image of `height` rows of `row_bytes` is cut into."""
        total = height * (row_bytes + 1)
        count = min(self.threads, total // self.min_band_bytes)
        count = min(height, max(1, count, -(-total // MAX_BAND_BYTES)))
        return [(height * i // count, height * (i + 1) // count) for i in range(count)]

    def _write_idat(self, fp: IO[bytes], raw: np.ndarray, bpp: int) -> None:
        """The pixels as one zlib stream over one IDAT chunk per band."""
        ranges = self.bands(*raw.shape)
        header = zlib_header(self.level, self.strategy)
        height = raw.shape[0]
        jobs = [(raw, start, stop, bpp, b"" if start else header, stop == height) for start, stop in ranges]
        pool = self._executor() if len(jobs) > 1 else None
        futures: list[Future[_Band]] = [pool.submit(self._band, *job) for job in jobs[1:]] if pool else []
        bands = [self._band(*jobs[0]), *(f.result() for f in futures)]
        adler = 1
        for band in bands:
            adler = adler32_combine(adler, band.adler, band.length)
        last = bands[-1]
        last.data.append(struct.pack(">I", adler))
        last.crc = zlib.crc32(last.data[-1], last.crc)
        for band in bands:
            fp.write(struct.pack(">I", sum(len(part) for part in band.data)) + b"IDAT")
            for part in band.data:
                fp.write(part)
            fp.write(struct.pack(">I", band.crc))

    def _band(self, raw: np.ndarray, start: int, stop: int, bpp: int, prefix: bytes, last: bool) -> _Band:
        """Filter and deflate rows [start, stop); the IDAT data begins with `prefix`."""
        rows = filter_rows(raw, start, stop, bpp, self.filter)
        deflate = zlib.compressobj(self.level, zlib.DEFLATED, -zlib.MAX_WBITS, 8, self.strategy)
        body = deflate.compress(rows) + deflate.flush(zlib.Z_FINISH if last else zlib.Z_SYNC_FLUSH)
        crc = zlib.crc32(body, zlib.crc32(b"IDAT" + prefix))
        return _Band([prefix, body], crc, zlib.adler32(rows), rows.nbytes)

    def _executor(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._pool is None or self._pool_pid != os.getpid():
                workers = max(1, self.threads - 1)
                self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="zturbo-png")
                self._pool_pid = os.getpid()
            return self._pool


class _Band:
    """One band's IDAT data (in parts, to spare a copy), the CRC of its type and data, and the
    Adler-32 and length of its filtered bytes."""

    __slots__ = ("adler", "crc", "data", "length")

    def __init__(self, data: list[bytes], crc: int, adler: int, length: int) -> None:
        self.data, self.crc, self.adler, self.length = data, crc, adler, length


def chunk(kind: bytes, data: bytes) -> bytes:
    """A PNG chunk: length, type, data and the CRC of type and data."""
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(data, zlib.crc32(kind)))


def zlib_header(level: int, strategy: int) -> bytes:
    """The two bytes zlib itself begins a stream with for these settings."""
    return zlib.compressobj(level, zlib.DEFLATED, zlib.MAX_WBITS, 8, strategy).flush()[:2]


def adler32_combine(adler1: int, adler2: int, length2: int) -> int:
    """The Adler-32 of A + B from A's checksum, B's checksum and B's length (zlib's adler32_combine):
    every running sum over B grows by A's sum less its start of 1."""
    s1a, s2a = adler1 & 0xFFFF, adler1 >> 16
    s1b, s2b = adler2 & 0xFFFF, adler2 >> 16
    s1 = (s1a + s1b - 1) % _ADLER_BASE
    s2 = (s2a + s2b + length2 * (s1a - 1)) % _ADLER_BASE
    return (s2 << 16) | s1


def filter_rows(raw: np.ndarray, start: int, stop: int, bpp: int, kind: Filter) -> np.ndarray:
    """Rows [start, stop) of `raw` (height x row bytes, uint8) as PNG scanlines: the filter-type
    byte, then the row filtered with `kind` (the row above `start` is its prior row)."""
    cur = raw[start:stop]
    prior = raw[start - 1 : stop - 1] if start else np.concatenate([np.zeros_like(raw[:1]), raw[: stop - 1]])
    out = np.empty((stop - start, raw.shape[1] + 1), np.uint8)
    out[:, 0] = kind
    _FILTERS[kind](cur, prior, bpp, out[:, 1:])
    return out


def _none(cur: np.ndarray, prior: np.ndarray, bpp: int, out: np.ndarray) -> None:
    out[:] = cur


def _sub(cur: np.ndarray, prior: np.ndarray, bpp: int, out: np.ndarray) -> None:
    out[:, :bpp] = cur[:, :bpp]
    np.subtract(cur[:, bpp:], cur[:, :-bpp], out=out[:, bpp:])


def _up(cur: np.ndarray, prior: np.ndarray, bpp: int, out: np.ndarray) -> None:
    np.subtract(cur, prior, out=out)


def _average(cur: np.ndarray, prior: np.ndarray, bpp: int, out: np.ndarray) -> None:
    np.subtract(cur[:, :bpp], prior[:, :bpp] >> 1, out=out[:, :bpp])
    left, up = cur[:, :-bpp], prior[:, bpp:]
    # floor((left + up) / 2) without leaving uint8: the shared bits plus half the differing ones.
    mean = (left & up) + ((left ^ up) >> 1)
    np.subtract(cur[:, bpp:], mean, out=out[:, bpp:])


def _paeth(cur: np.ndarray, prior: np.ndarray, bpp: int, out: np.ndarray) -> None:
    # The first pixel has neither left nor upper-left neighbour, so Paeth predicts it from above.
    np.subtract(cur[:, :bpp], prior[:, :bpp], out=out[:, :bpp])
    width = cur.shape[1] - bpp
    if width <= 0:
        return
    step = max(1, _PAETH_STEP // width)
    scratch = _PaethScratch(min(step, len(cur)) * width)
    for r in range(0, len(cur), step):
        rows = slice(r, r + step)
        scratch.predict(cur[rows, :-bpp], prior[rows, bpp:], prior[rows, :-bpp], cur[rows, bpp:], out[rows, bpp:])


class _PaethScratch:
    """Buffers for Paeth over a step of rows, allocated once per band."""

    def __init__(self, size: int) -> None:
        self.i16 = np.empty((5, size), np.int16)
        self.masks = np.empty((3, size), bool)
        self.u8 = np.empty((2, size), np.uint8)

    def predict(self, a: np.ndarray, b: np.ndarray, c: np.ndarray, x: np.ndarray, out: np.ndarray) -> None:
        """out = x - paeth(a, b, c) for left a, up b, upper-left c (uint8, mod 256)."""
        shape, n = a.shape, a.size
        a16, c16, pa, pb, pc = (buf[:n].reshape(shape) for buf in self.i16)
        pick_a, pick_b, t = (buf[:n].reshape(shape) for buf in self.masks)
        diff, mask = (buf[:n].reshape(shape) for buf in self.u8)
        np.copyto(a16, a)
        np.copyto(c16, c)
        np.copyto(pa, b)
        pa -= c16  # b - c: p - a, where p = a + b - c
        np.subtract(a16, c16, out=pb)  # a - c: p - b
        np.add(pa, pb, out=pc)  # p - c
        np.abs(pa, out=pa)
        np.abs(pb, out=pb)
        np.abs(pc, out=pc)
        np.less_equal(pa, pb, out=pick_a)
        np.less_equal(pa, pc, out=t)
        pick_a &= t
        np.less_equal(pb, pc, out=pick_b)
        np.greater(pick_b, pick_a, out=pick_b)  # b only where a is not taken
        # The prediction is c, plus (a - c) where a wins, plus (b - c) where b wins; masks of
        # 0xFF select without branches (numpy's `where` is ten times slower on such masks).
        np.subtract(x, c, out=out)
        for won, value in ((pick_a, a), (pick_b, b)):
            np.subtract(value, c, out=diff)
            np.negative(won.view(np.uint8), out=mask)
            diff &= mask
            out -= diff


_FILTERS = {Filter.NONE: _none, Filter.SUB: _sub, Filter.UP: _up, Filter.AVERAGE: _average, Filter.PAETH: _paeth}
