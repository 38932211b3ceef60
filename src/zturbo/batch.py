"""Batch runs: rows of prompts and options from a file, resumable through a manifest in the output directory.

A row is one `GenerateRequest` (one image, or several with `batch` or `seeds`). Rows are validated
before the model loads; a bad row is reported and the others run. Each finished row appends one
`done` line to `manifest.jsonl` (fsynced) after its images are written, so an interrupted run loses at
most the rows in flight, and a rerun skips rows whose images are there and match. Random seeds are
resolved on the first run and recorded (`planned` lines), so a resumed row keeps its seed.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import FieldError, InvalidRequestError, ZTurboError
from .inputs.images import InputImage
from .inputs.spec import ALPHA_MASK
from .request import IMAGE_FIELDS, GenerateRequest, ModelLimits, convert_fields, field_for

if TYPE_CHECKING:
    from .engine import Engine
    from .pipeline import StepCallback
    from .result import GeneratedImage

log = logging.getLogger("zturbo")

MANIFEST = "manifest.jsonl"
DEFAULT_MAX_BATCH = 4


@dataclass
class BatchRow:
    """One row of a batch file; `number` is its line (text, JSONL) or record (CSV) number, from 1."""

    number: int
    params: dict[str, Any]
    error: str | None = None
    key: str = ""
    request: GenerateRequest | None = None
    status: str = "pending"  # pending | skipped | done | failed
    files: list[str] = field(default_factory=list)
    seeds: list[int] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------
# Reading rows


def read_rows(path: Path) -> list[BatchRow]:
    """Rows of a text (one prompt a line; blank and `#` lines skipped), .jsonl or .csv file."""
    text = _read_text(path)
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        rows = list(_jsonl_rows(text))
    elif suffix == ".csv":
        rows = list(_csv_rows(text, path))
    else:
        rows = [BatchRow(n, {"prompt": line.strip()}) for n, line in _lines(text)]
    if not rows:
        raise InvalidRequestError(f"batch file {path} has no rows")
    _read_row_images(rows, path.parent)
    return rows


def read_image_fields(
    values: dict[str, Any], base: Path | None = None, cache: dict[Path, InputImage] | None = None
) -> dict[str, Any]:
    """`values` with each image field's path read (`inputs.images.read_image`: a missing or broken
    file is refused naming the path); the mask's `alpha` stays a word. Relative paths start at
    `base` when given; `cache` reads a file named several times once."""
    from .inputs.images import read_image

    out = dict(values)
    for name in IMAGE_FIELDS:
        value = out.get(name)
        if value is None or isinstance(value, InputImage) or (name == "mask" and value == ALPHA_MASK):
            continue
        if not isinstance(value, str):
            raise FieldError(name, f"{name} must be the path of an image file; got {value!r}")
        path = Path(value).expanduser()
        path = path if base is None else base / path
        if cache is None or path not in cache:
            image = read_image(path, name)
            if cache is None:
                out[name] = image
                continue
            cache[path] = image
        out[name] = cache[path]
    return out


def _read_row_images(rows: Sequence[BatchRow], base: Path) -> None:
    """Each row's image columns, paths relative to the batch file, read now: a missing or broken
    file fails its row, named, before any model loads."""
    cache: dict[Path, InputImage] = {}
    for row in rows:
        if row.error is None:
            try:
                row.params = read_image_fields(row.params, base, cache)
            except InvalidRequestError as e:
                row.error = str(e)


def _read_text(path: Path) -> str:
    """The file as UTF-8 (a byte-order mark allowed). A byte that is not UTF-8 refuses the whole
    file, naming its line: such a byte nearly always means the file was saved in another encoding
    (Latin-1, GBK), so the lines that happen to decode would run with text the user did not mean
    and the batch would be re-run after the file is fixed anyway. Refusing before any work costs
    nothing; a CSV record may also span lines, so "skip that line" has no clean meaning there."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise InvalidRequestError(f"cannot read batch file {path}: {e.strerror or e}") from None
    data = data.removeprefix(b"\xef\xbb\xbf")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line, column = _position(data[: e.start].decode("utf-8"))
        raise InvalidRequestError(
            f"batch file {path} is not UTF-8 text: line {line}, column {column} has the byte 0x{data[e.start]:02x}; "
            "save it as UTF-8"
        ) from None


def _position(before: str) -> tuple[int, int]:
    """(line, column), from 1, of the character that follows `before`."""
    lines = _physical_lines(before)
    if not lines or lines[-1].endswith(("\n", "\r")):
        return len(lines) + 1, 1
    return len(lines), len(lines[-1]) + 1


def _physical_lines(text: str) -> list[str]:
    """Lines with their endings, split at \\n, \\r\\n or \\r only (`str.splitlines` also splits at
    form feeds and Unicode separators, which a prompt may hold), as the csv module counts them."""
    return io.StringIO(text, newline="").readlines()


def _lines(text: str) -> Iterable[tuple[int, str]]:
    for number, line in enumerate(_physical_lines(text), start=1):
        line = line.rstrip("\r\n")
        if line.strip() and not line.lstrip().startswith("#"):
            yield number, line


def _jsonl_rows(text: str) -> Iterable[BatchRow]:
    for number, line in _lines(text):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            yield BatchRow(number, {}, f"not valid JSON ({e.msg} at column {e.colno})")
            continue
        if not isinstance(record, dict):
            yield BatchRow(number, {}, f"expected a JSON object, got {type(record).__name__}")
            continue
        yield _typed_row(number, record)


def _csv_rows(text: str, path: Path) -> Iterable[BatchRow]:
    """One row per CSV record; a row's number is the line its record starts on (the header's is 1)."""
    records = _csv_records(_physical_lines(text), path)
    first = next(records, None)
    header = first[1] if first is not None and first[2] is None else None
    if not header or "prompt" not in [_column(c) for c in header]:
        raise InvalidRequestError(f"CSV batch file {path} needs a header row with a 'prompt' column")
    for number, values, error in records:
        if error is not None:
            yield BatchRow(number, {}, error)
        elif len(values) > len(header):
            yield BatchRow(number, {}, f"has {len(values) - len(header)} more value(s) than the header has columns")
        elif len(values) < len(header):
            missing = ", ".join(header[len(values) :])
            yield BatchRow(number, {}, f"has {len(values)} of the header's {len(header)} columns; missing: {missing}")
        else:
            yield _typed_row(number, {k: v for k, v in zip(header, values, strict=True) if v.strip() != ""})


def _csv_records(lines: list[str], path: Path) -> Iterator[tuple[int, list[str], str | None]]:
    """(first line, values, error) of each record, blank lines skipped. Strict parsing: a malformed
    record is an error of its own, and a quote left open is refused before it swallows the file."""
    reader = csv.reader(lines, strict=True)
    start = 1
    while True:
        try:
            values = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            opened = _unclosed_quote(lines, start)
            if opened is not None:
                raise InvalidRequestError(
                    f"CSV batch file {path}: the quote opened on line {opened} is never closed"
                ) from None
            values, error = [], f"is not valid CSV ({e})"
        else:
            error = None
        if values or error:
            yield start, values, error
        start = reader.line_num + 1


def _unclosed_quote(lines: list[str], start: int) -> int | None:
    """The line of a quoted field, in the record starting at line `start`, that the file never closes."""
    state, opened = "start", None  # start | plain | quoted | quote (a quote seen inside a quoted field)
    for number, line in enumerate(lines[start - 1 :], start):
        for char in line:
            separator = char in ",\r\n"
            if state == "quoted":
                state = "quote" if char == '"' else "quoted"
            elif state == "quote" and char == '"':
                state = "quoted"  # a doubled quote: a literal one
            elif state in ("start", "quote", "plain"):
                if state == "start" and char == '"':
                    state, opened = "quoted", number
                else:
                    state = "start" if separator else "plain"
    return opened if state == "quoted" else None


def _column(name: str) -> str:
    """A column header's request field name (any alias of the request table; `size` stays `size`)."""
    f = field_for(name)
    return f.name if f is not None else name.strip().lower()


def _typed_row(number: int, record: dict[str, Any]) -> BatchRow:
    """Column names normalised and text numbers converted (by the request table); the first problem
    becomes the row's error."""
    try:
        return BatchRow(number, convert_fields({str(k): v for k, v in record.items()}, what="column"))
    except InvalidRequestError as e:
        return BatchRow(number, {}, str(e))


# ---------------------------------------------------------------------------------------------
# The manifest


class Manifest:
    """`manifest.jsonl` in the output directory: `planned` and `done` lines, each appended and fsynced."""

    def __init__(self, directory: Path) -> None:
        self.path = directory / MANIFEST
        self.planned: dict[tuple[int, str], dict[str, Any]] = {}
        self.done: dict[tuple[int, str], dict[str, Any]] = {}
        if self.path.exists():
            self._load()

    def _load(self) -> None:
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by a crash: its row simply runs again
            slot = {"planned": self.planned, "done": self.done}.get(record.get("event"))
            if slot is not None:
                slot[(record["row"], record["key"])] = record

    def append(self, records: Sequence[dict[str, Any]]) -> None:
        if not records:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        data = "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in records)
        # One write of whole lines in append mode, then fsync: a kill leaves at most a torn last line.
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        for r in records:
            {"planned": self.planned, "done": self.done}[r["event"]][(r["row"], r["key"])] = r


def row_key(params: dict[str, Any]) -> str:
    """A hash of a row's parameters as given (defaults applied, random seeds not yet resolved);
    input images count by their sha256 alone, so a changed file makes the row a new one, and the
    same file reached by another path (a resume from another directory) does not."""
    by_content = {k: v.sha256 if isinstance(v, InputImage) else v for k, v in params.items()}
    blob = json.dumps(by_content, sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def recorded_params(params: dict[str, Any]) -> dict[str, Any]:
    """`params` as the manifest records them: each input image as its file's name and sha256."""
    return {k: {"path": v.name, "sha256": v.sha256} if isinstance(v, InputImage) else v for k, v in params.items()}


# ---------------------------------------------------------------------------------------------
# Planning: defaults, validation, recorded seeds, rows already done


def merge_defaults(row: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    """The row's values over the defaults; a row's own seed list replaces a default seed and batch, and
    its own seed a default seed list (`generate --from` uses it too: the command line over the PNG)."""
    merged = dict(defaults)
    if "seeds" in row:
        merged.pop("seed", None)
        merged.pop("batch", None)
    if "seed" in row:
        merged.pop("seeds", None)
    merged.update(row)
    return merged


def plan(rows: Sequence[BatchRow], defaults: dict[str, Any], limits: ModelLimits, manifest: Manifest) -> None:
    """Validate every row (before any model is loaded), reuse recorded seeds, mark finished rows skipped."""
    new_plans = []
    for row in rows:
        if row.error is not None:
            row.status = "failed"
            continue
        params = merge_defaults(row.params, defaults)
        if not params.get("prompt"):
            row.error, row.status = "has no prompt", "failed"
            continue
        row.key = row_key(params)
        recorded = manifest.planned.get((row.number, row.key))
        try:
            if recorded is not None:
                # The key matched, so only the seeds drawn then differ; the images are the ones read now.
                seeds = {k: v for k, v in recorded["params"].items() if k not in IMAGE_FIELDS}
                row.request = GenerateRequest.create(limits=limits, **{**params, **seeds})
            else:
                row.request = GenerateRequest.create(limits=limits, **params)
                resolved = recorded_params(_resolved(params, row.request))
                new_plans.append({"event": "planned", "row": row.number, "key": row.key, "params": resolved})
        except (InvalidRequestError, TypeError) as e:
            row.error, row.status = _message(e), "failed"
            continue
        if _is_done(manifest.done.get((row.number, row.key)), manifest.path.parent):
            row.status = "skipped"
            done = manifest.done[(row.number, row.key)]
            row.files, row.seeds = done["files"], done["seeds"]
    manifest.append(new_plans)


def check_loras(rows: Sequence[BatchRow], resolve: Callable[[str], object]) -> None:
    """Fail each pending row naming a LoRA that `resolve` (the LoRA library's) cannot find, before
    any model is loaded."""
    for row in rows:
        if row.status != "pending" or row.request is None:
            continue
        try:
            for ref in row.request.loras:
                resolve(ref.name)
        except InvalidRequestError as e:
            row.error, row.status = str(e), "failed"


def _resolved(params: dict[str, Any], req: GenerateRequest) -> dict[str, Any]:
    """`params` with the seeds the request drew at random filled in, so a rerun draws none."""
    resolved = dict(params)
    if req.seed_was_random:
        resolved["seed"] = req.seed
    if req.variation_strength > 0 and params.get("variation_seed") is None:
        resolved["variation_seed"] = req.images[0].variation_seed
    return resolved


def _message(err: Exception) -> str:
    if isinstance(err, TypeError):  # e.g. a JSON row with a list where a number belongs
        return f"invalid parameters: {err}"
    return str(err)


def _is_done(record: dict[str, Any] | None, directory: Path) -> bool:
    """Finished: a `done` line for this row and key, and each of its images present with the recorded seed."""
    from .imageio import read_metadata

    if record is None:
        return False
    try:
        metas = [read_metadata(directory / name) for name in record["files"]]
    except InvalidRequestError:
        return False
    return [m.get("seed") for m in metas] == record["seeds"]


# ---------------------------------------------------------------------------------------------
# Running


def groups(rows: Sequence[BatchRow], max_batch: int) -> list[list[BatchRow]]:
    """Pending rows that share size, steps, guidance and noise settings, in file order, up to
    `max_batch` images per group (a row with more images than that runs alone)."""
    by_shape: dict[tuple[object, ...], list[list[BatchRow]]] = {}
    order: list[list[BatchRow]] = []
    for row in rows:
        if row.status != "pending" or row.request is None:
            continue
        chunks = by_shape.setdefault(row.request.shared(), [])
        if chunks and sum(r.request.num_images for r in chunks[-1]) + row.request.num_images <= max_batch:  # type: ignore[union-attr]
            chunks[-1].append(row)
        else:
            chunks.append([row])
            order.append(chunks[-1])
    return order


def file_names(row: BatchRow, images: Sequence[GeneratedImage]) -> list[str]:
    """`00007-SEED.png` for a one-image row, `00007-02-SEED.png` for the second image of a larger one
    (`.webp` or `.jpg` for a row in those formats)."""
    from .imageio import IMAGE_SUFFIXES

    suffix = IMAGE_SUFFIXES[row.request.output_format if row.request is not None else "png"]
    if len(images) == 1:
        return [f"{row.number:05d}-{images[0].seed}{suffix}"]
    return [f"{row.number:05d}-{k:02d}-{img.seed}{suffix}" for k, img in enumerate(images, start=1)]


def run(
    engine: Engine,
    rows: Sequence[BatchRow],
    directory: Path,
    manifest: Manifest,
    *,
    max_batch: int = DEFAULT_MAX_BATCH,
    on_step: StepCallback | None = None,
    on_row: Callable[[BatchRow], None] | None = None,
) -> None:
    """Generate every pending row, `max_batch` images at most per engine call; a group that fails is
    retried row by row, so one failing row fails alone."""
    for group in groups(rows, max_batch):
        try:
            _run_group(engine, group, directory, manifest, on_step, on_row)
        except Exception as e:  # one row's failure must not stop the batch
            if len(group) == 1:
                _fail(group[0], e, on_row)
                continue
            log.warning("a group of %d rows failed (%s); running them one at a time", len(group), _short(e))
            for row in group:
                if row.status != "pending":
                    continue
                try:
                    _run_group(engine, [row], directory, manifest, on_step, on_row)
                except Exception as e2:
                    _fail(row, e2, on_row)


def _run_group(
    engine: Engine,
    group: list[BatchRow],
    directory: Path,
    manifest: Manifest,
    on_step: StepCallback | None,
    on_row: Callable[[BatchRow], None] | None,
) -> None:
    from .imageio import save_image

    requests = [row.request for row in group]
    assert all(r is not None for r in requests)
    result = engine.generate(GenerateRequest.combine(requests), on_step=on_step)  # type: ignore[arg-type]
    images = iter(result.images)
    for row in group:
        assert row.request is not None
        own = [next(images) for _ in range(row.request.num_images)]
        names = file_names(row, own)
        # The directory belongs to the batch: a file without a `done` line is from a run cut short.
        # Each row in its own format: formats are not part of `shared()`.
        fmt, compression = row.request.output_format, row.request.output_compression
        for name, image in zip(names, own, strict=True):
            save_image(image, directory / name, output_format=fmt, compression=compression, overwrite=True)
        record = {"event": "done", "row": row.number, "key": row.key, "files": names, "seeds": [i.seed for i in own]}
        manifest.append([record])
        row.status, row.files, row.seeds = "done", names, record["seeds"]
        if on_row is not None:
            on_row(row)


def _fail(row: BatchRow, err: Exception, on_row: Callable[[BatchRow], None] | None) -> None:
    row.status, row.error = "failed", _short(err)
    log.warning("row %d failed: %s", row.number, row.error)
    if on_row is not None:
        on_row(row)


def _short(err: Exception) -> str:
    if isinstance(err, ZTurboError):
        return str(err)
    return f"{type(err).__name__}: {err}"


def summary(rows: Sequence[BatchRow]) -> list[str]:
    """Lines for the end of a run: counts, then each failed row with its message."""
    count = {s: sum(r.status == s for r in rows) for s in ("done", "skipped", "failed", "pending")}
    images = sum(len(r.files) for r in rows if r.status == "done")
    lines = [
        f"batch: {len(rows)} rows: {count['done']} done now ({images} images), "
        f"{count['skipped']} already done, {count['failed']} failed"
    ]
    lines += [f"  row {r.number}: {r.error}" for r in rows if r.status == "failed"]
    return lines
