"""`zturbo batch`: file formats, bad rows, resume after a kill, grouping, the prompt cache, grids."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clirun import run
from zturbo import batch
from zturbo.imageio import read_metadata
from zturbo.request import ModelLimits

SMALL = ["--width", "64", "--height", "64", "--steps", "2", "--device", "cpu", "-q"]
LIMITS = ModelLimits(spatial_unit=16, max_pixels=2048 * 2048)


def manifest_lines(directory: Path) -> list[dict]:
    path = directory / batch.MANIFEST
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def done_rows(directory: Path) -> list[int]:
    return [r["row"] for r in manifest_lines(directory) if r["event"] == "done"]


def test_rows_from_text_jsonl_and_csv(tmp_path):
    text = tmp_path / "p.txt"
    text.write_text("a cat\n\n# a comment\n  a dog  \n")
    assert [(r.number, r.params) for r in batch.read_rows(text)] == [(1, {"prompt": "a cat"}), (4, {"prompt": "a dog"})]
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text('{"prompt": "a cat", "steps": 3, "Guidance": 1.5}\n{"prompt": "x", "seed": "12"}\n[1]\n{oops\n')
    rows = batch.read_rows(jsonl)
    assert rows[0].params == {"prompt": "a cat", "steps": 3, "guidance_scale": 1.5} and rows[0].error is None
    assert rows[1].params == {"prompt": "x", "seed": 12}
    assert rows[2].error == "expected a JSON object, got list"
    assert rows[3].error.startswith("not valid JSON")
    csv = tmp_path / "p.csv"
    csv.write_text('prompt,seed,negative-prompt,width\n"a cat, sleeping",4,,64\na dog,,blurry,64\n')
    rows = batch.read_rows(csv)
    assert [(r.number, r.params) for r in rows] == [
        (2, {"prompt": "a cat, sleeping", "seed": 4, "width": 64}),
        (3, {"prompt": "a dog", "negative_prompt": "blurry", "width": 64}),
    ]


@pytest.mark.parametrize(
    ("content", "message"),
    [("", "has no rows"), ("# only a comment\n", "has no rows")],
)
def test_an_empty_batch_file_is_refused(capsys, tiny_dir, tmp_path, content, message):
    path = tmp_path / "p.txt"
    path.write_text(content)
    code, _, err = run(capsys, "batch", path, "--model", tiny_dir, "-o", tmp_path / "out")
    assert code == 2 and f"batch file {path} {message}" in err


def test_a_csv_without_a_prompt_column_is_refused(capsys, tiny_dir, tmp_path):
    path = tmp_path / "p.csv"
    path.write_text("text,seed\na cat,1\n")
    code, _, err = run(capsys, "batch", path, "--model", tiny_dir, "-o", tmp_path / "out")
    assert code == 2 and "needs a header row with a 'prompt' column" in err


def test_bad_rows_are_reported_and_the_others_run(capsys, tiny_dir, tmp_path):
    rows = tmp_path / "rows.jsonl"
    rows.write_text(
        "\n".join(
            [
                '{"prompt": "a cat", "seed": 1}',
                '{"prompt": "a dog", "width": 1000}',
                '{"prompt": "a cow", "sampler": "dpm"}',
                '{"prompt": "a pig", "steps": "abc"}',
                '{"prompt": "a hen", "seeds": "2,x"}',
                '{"prompt": "an owl", "seeds": "5-6"}',
            ]
        )
    )
    out_dir = tmp_path / "out"
    code, out, err = run(capsys, "batch", rows, "--model", tiny_dir, *SMALL, "-o", out_dir)
    assert code == 1
    assert sorted(Path(line.split("\t")[0]).name for line in out.splitlines()) == [
        "00001-1.png", "00006-01-5.png", "00006-02-6.png",
    ]  # fmt: skip
    assert "zturbo: batch: 6 rows: 2 done now (3 images), 0 already done, 4 failed" in err
    assert "  row 2: width 1000 is not a multiple of 16 (the model's spatial unit); nearest valid: 992 or 1008" in err
    assert "  row 3: unknown column 'sampler'; allowed: prompt, negative_prompt, seeds, seed" in err
    assert "  row 4: steps 'abc' is not a whole number" in err
    assert "  row 5: seed list '2,x': 'x' is not a seed or a range" in err
    assert sorted(done_rows(out_dir)) == [1, 6]


def test_every_row_bad_loads_no_model(capsys, tiny_dir, tmp_path, monkeypatch):
    import zturbo.engine

    def no_load(*a, **k):
        raise AssertionError("the model must not load when no row can run")

    monkeypatch.setattr(zturbo.engine.Engine, "load", no_load)
    rows = tmp_path / "rows.csv"
    rows.write_text("prompt,steps\na cat,0\n")
    code, _, err = run(capsys, "batch", rows, "--model", tiny_dir, "-o", tmp_path / "out")
    assert code == 1 and "row 2: steps 0 is out of range; allowed 1..100" in err


_SLOW_CHILD = """
import sys, time
import zturbo.engine as engine
generate = engine.Engine.generate
def slow(self, *args, **kwargs):
    time.sleep(0.4)  # leave time to kill the run between rows
    return generate(self, *args, **kwargs)
engine.Engine.generate = slow
from zturbo.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_resume_after_kill_does_no_row_twice(capsys, tiny_dir, tmp_path):
    rows = tmp_path / "rows.txt"
    rows.write_text("".join(f"prompt number {i}\n" for i in range(6)))
    out_dir = tmp_path / "out"
    # No --seed: the random seeds drawn by the first run must survive into the second.
    argv = ["batch", str(rows), "--model", str(tiny_dir), *SMALL, "--max-batch", "1", "-o", str(out_dir)]
    child = subprocess.Popen(
        [sys.executable, "-c", _SLOW_CHILD, *argv], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        deadline = time.monotonic() + 90
        while not done_rows(out_dir):
            assert child.poll() is None, child.stderr.read().decode()
            assert time.monotonic() < deadline, "the batch never finished a row"
            time.sleep(0.02)
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.wait()
    first = done_rows(out_dir)
    assert 1 <= len(first) < 6, "the kill came after the whole batch was done; nothing to resume"
    planned = {r["row"]: r["params"]["seed"] for r in manifest_lines(out_dir) if r["event"] == "planned"}
    before = {p.name: p.stat().st_mtime_ns for p in out_dir.glob("*.png")}

    code, out, err = run(capsys, "batch", rows, "--model", tiny_dir, *SMALL, "--max-batch", "1", "-o", out_dir)
    assert code == 0, err
    assert f"{len(first)} already done" in err
    done = done_rows(out_dir)
    assert sorted(done) == [1, 2, 3, 4, 5, 6] and len(done) == 6  # each row done exactly once
    assert len(out.splitlines()) == 6 - len(first)  # only the rest were made
    for record in manifest_lines(out_dir):
        if record["event"] == "done":
            (name,) = record["files"]
            meta = read_metadata(out_dir / name)
            assert meta["seed"] == planned[record["row"]]  # the seed drawn before the kill
            assert meta["prompt"] == f"prompt number {record['row'] - 1}"
            if record["row"] in first:
                assert (out_dir / name).stat().st_mtime_ns == before[name]  # not rewritten


def test_a_changed_row_runs_again_and_a_missing_png_is_remade(capsys, tiny_dir, tmp_path):
    rows = tmp_path / "rows.txt"
    rows.write_text("a cat\na dog\n")
    out_dir = tmp_path / "out"
    assert run(capsys, "batch", rows, "--model", tiny_dir, *SMALL, "-o", out_dir)[0] == 0
    first_files = sorted(p.name for p in out_dir.glob("*.png"))
    dog = next(out_dir.glob("00002-*.png"))
    dog_pixels = np.asarray(Image.open(dog))
    dog.unlink()
    rows.write_text("a cat\na dog\na cow\n")
    code, _, err = run(capsys, "batch", rows, "--model", tiny_dir, *SMALL, "-o", out_dir)
    assert code == 0, err
    assert "2 done now (2 images), 1 already done" in err
    assert sorted(p.name for p in out_dir.glob("0000[12]-*.png")) == first_files  # same random seed again
    assert np.array_equal(np.asarray(Image.open(dog)), dog_pixels)
    code, _, err = run(capsys, "batch", rows, "--model", tiny_dir, *SMALL, "--steps", "1", "-o", out_dir)
    assert "3 done now" in err  # new settings are new rows


def test_grouping_runs_rows_together_without_changing_pixels(engine, tmp_path):
    texts = ["a cat", "a much longer prompt about a dog", "a cat", "a cow", "a hen"]
    calls: list[int] = []
    handle = engine.components.transformer.register_forward_pre_hook(lambda m, args: calls.append(len(args[0])))
    images = {}
    try:
        for max_batch in (3, 1):
            rows = [batch.BatchRow(i + 1, {"prompt": t}) for i, t in enumerate(texts)]
            rows.append(batch.BatchRow(6, {"prompt": "a fox", "width": 32}))  # another size: a group of its own
            directory = tmp_path / f"max{max_batch}"
            manifest = batch.Manifest(directory)
            batch.plan(rows, {"seed": 7, "steps": 1, "width": 64, "height": 64}, LIMITS, manifest)
            calls.clear()
            batch.run(engine, rows, directory, manifest, max_batch=max_batch)
            images[max_batch] = calls[:], {r.number: np.asarray(Image.open(directory / r.files[0])) for r in rows}
    finally:
        handle.remove()
    assert images[3][0] == [3, 2, 1] and images[1][0] == [1] * 6
    for number, grouped in images[3][1].items():
        assert np.abs(grouped.astype(int) - images[1][1][number].astype(int)).max() <= 1


def test_repeated_prompts_reuse_the_text_embedding(fresh, tmp_path):
    calls: list[int] = []
    fresh.components.text_encoder.register_forward_pre_hook(lambda *_: calls.append(1))
    rows = [batch.BatchRow(i + 1, {"prompt": t}) for i, t in enumerate(["a cat", "a dog", "a cat", "a cat"])]
    manifest = batch.Manifest(tmp_path)
    batch.plan(rows, {"seed": 1, "steps": 1, "width": 32, "height": 32}, LIMITS, manifest)
    batch.run(fresh, rows, tmp_path, manifest, max_batch=1)
    assert len(calls) == 2 and (fresh.prompt_cache.hits, fresh.prompt_cache.misses) == (2, 2)


def test_a_failing_group_falls_back_to_single_rows(engine, tmp_path, monkeypatch):
    rows = [batch.BatchRow(i + 1, {"prompt": t}) for i, t in enumerate(["a cat", "a poisoned dog", "a cow"])]
    manifest = batch.Manifest(tmp_path)
    batch.plan(rows, {"seed": 1, "steps": 1, "width": 32, "height": 32}, LIMITS, manifest)
    generate = type(engine).generate

    def poisoned(self, req, **kwargs):
        if any("poisoned" in s.prompt for s in req.images):
            raise RuntimeError("boom")
        return generate(self, req, **kwargs)

    monkeypatch.setattr(type(engine), "generate", poisoned)
    batch.run(engine, rows, tmp_path, manifest, max_batch=4)
    assert [r.status for r in rows] == ["done", "failed", "done"]
    assert rows[1].error == "RuntimeError: boom"
    assert batch.summary(rows) == [
        "batch: 3 rows: 2 done now (2 images), 0 already done, 1 failed",
        "  row 2: RuntimeError: boom",
    ]


def test_batch_grid_covers_done_and_skipped_rows(capsys, tiny_dir, tmp_path):
    rows = tmp_path / "rows.csv"
    rows.write_text("prompt,seeds\na cat,1-2\na dog,\n")
    out_dir = tmp_path / "out"
    run(capsys, "batch", rows, "--model", tiny_dir, *SMALL, "--seed", "3", "-o", out_dir)
    code, out, err = run(capsys, "batch", rows, "--model", tiny_dir, *SMALL, "--seed", "3", "--grid", "-o", out_dir)
    assert code == 0, err
    assert out.strip() == f"{out_dir / 'grid.png'}\tgrid"
    with Image.open(out_dir / "grid.png") as im:
        assert json.loads(im.text["zturbo-grid"])["images"] == ["00002-01-1.png", "00002-02-2.png", "00003-3.png"]


def test_csv_records_are_numbered_by_the_line_they_start_on(tmp_path):
    path = tmp_path / "p.csv"
    path.write_text('prompt,seed\n"a cat\non two lines",1\n\n"a ""quoted"" dog",2\n"a"b,3\na cow,4\n')
    rows = batch.read_rows(path)
    assert [(r.number, r.params, r.error) for r in rows] == [
        (2, {"prompt": "a cat\non two lines", "seed": 1}, None),
        (5, {"prompt": 'a "quoted" dog', "seed": 2}, None),
        (6, {}, "is not valid CSV (',' expected after '\"')"),  # a malformed record fails alone
        (7, {"prompt": "a cow", "seed": 4}, None),
    ]


def test_a_short_csv_row_fails_naming_its_line_and_missing_columns(capsys, tiny_dir, tmp_path):
    path = tmp_path / "p.csv"
    path.write_text("prompt,seed,negative_prompt,width\na cat,1,blurry,64\na dog,2\n")
    rows = batch.read_rows(path)
    assert rows[1].number == 3
    assert rows[1].error == "has 2 of the header's 4 columns; missing: negative_prompt, width"
    out_dir = tmp_path / "out"
    code, out, err = run(capsys, "batch", path, "--model", tiny_dir, *SMALL, "-o", out_dir)
    assert code == 1
    assert "  row 3: has 2 of the header's 4 columns; missing: negative_prompt, width" in err
    assert [Path(line.split("\t")[0]).name for line in out.splitlines()] == ["00002-1.png"]  # the good row ran


@pytest.mark.parametrize(
    ("content", "line"),
    [
        ('prompt,seed\na cat,1\n"a dog,2\na cow,3\n', 3),
        ('prompt,seed\n"a cat\non two lines",1\na dog,"2\na cow,3\n', 4),  # the quote, not the record's start
        ('prompt,seed\n"a ""quoted"" dog, unclosed\n', 2),
    ],
)
def test_an_unterminated_quote_refuses_the_file_naming_its_line(capsys, tiny_dir, tmp_path, monkeypatch, content, line):
    import zturbo.engine

    monkeypatch.setattr(zturbo.engine.Engine, "load", lambda *a, **k: pytest.fail("the model must not load"))
    path = tmp_path / "p.csv"
    path.write_text(content)
    code, out, err = run(capsys, "batch", path, "--model", tiny_dir, "-o", tmp_path / "out")
    assert code == 2 and out == ""
    assert err == f"zturbo: error: CSV batch file {path}: the quote opened on line {line} is never closed\n"


@pytest.mark.parametrize(
    ("name", "data", "where"),
    [
        ("p.txt", "a cat\na dog\n# café\n".encode("latin-1"), "line 3, column 6 has the byte 0xe9"),
        ("p.csv", b"prompt\r\nun chat\r\n\xff\r\n", "line 3, column 1 has the byte 0xff"),
        ("p.jsonl", '\ufeff{"prompt": "一只猫"}\n{"prompt": "x\udcff"}\n'.encode("utf-8", "surrogateescape"),
         "line 2, column 14 has the byte 0xff"),
    ],
)  # fmt: skip
def test_a_non_utf8_file_is_refused_by_line_number(capsys, tiny_dir, tmp_path, name, data, where):
    path = tmp_path / name
    path.write_bytes(data)
    code, _, err = run(capsys, "batch", path, "--model", tiny_dir, "-o", tmp_path / "out")
    assert code == 2
    assert err == f"zturbo: error: batch file {path} is not UTF-8 text: {where}; save it as UTF-8\n"


def test_prompts_keep_unicode_separators_and_line_numbers_count_newlines_only(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("a cat\u2028sleeping\r\na dog\x0c\n\ra cow\n", newline="")
    rows = batch.read_rows(path)
    assert [(r.number, r.params["prompt"]) for r in rows] == [(1, "a cat\u2028sleeping"), (2, "a dog"), (4, "a cow")]


def test_an_unwritable_batch_output_is_refused_before_any_work(capsys, tiny_dir, tmp_path):
    rows = tmp_path / "rows.txt"
    rows.write_text("a cat\n")
    blocker = tmp_path / "blocker"
    blocker.write_text("")
    code, _, err = run(capsys, "batch", rows, "--model", tiny_dir, "-o", blocker / "out")
    assert code == 2
    assert err == f"zturbo: error: output {blocker / 'out'}: {blocker} is a file, not a directory\n"
    if Path("/proc/self").is_dir():
        code, _, err = run(capsys, "batch", rows, "--model", tiny_dir, "-o", "/proc/out")
        assert code == 2 and "output /proc/out cannot be written: /proc refuses new files" in err


def test_image_columns_are_read_relative_to_the_file_and_bad_ones_fail_their_row(tmp_path):
    (tmp_path / "in").mkdir()
    Image.new("RGB", (64, 64), (1, 2, 3)).save(tmp_path / "in" / "a.png")
    (tmp_path / "in" / "bad.png").write_bytes(b"not an image")
    csv = tmp_path / "rows.csv"
    csv.write_text(
        "prompt,image,mask\na fox,in/a.png,alpha\na cat,in/a.png,\na dog,in/missing.png,\nan owl,in/bad.png,\n"
    )
    rows = batch.read_rows(csv)
    first, second = rows[0].params["image"], rows[1].params["image"]
    assert first is second and first.size == (64, 64)  # one file named twice is read once
    assert first.sha256 == hashlib.sha256((tmp_path / "in" / "a.png").read_bytes()).hexdigest()
    assert rows[0].params["mask"] == "alpha"  # the word, not a file
    assert str(tmp_path / "in" / "missing.png") in rows[2].error
    assert str(tmp_path / "in" / "bad.png") in rows[3].error
    jsonl = tmp_path / "rows.jsonl"
    jsonl.write_text('{"prompt": "x", "image": 7}\n')
    assert batch.read_rows(jsonl)[0].error == "image must be the path of an image file; got 7"
    recorded = batch.recorded_params(rows[1].params)
    assert recorded["image"] == {"path": str(tmp_path / "in" / "a.png"), "sha256": first.sha256}


def test_a_rows_key_follows_its_images_content_not_their_path(tmp_path):
    """A resume from another directory reaches the same files by other paths: the rows are the same."""
    from zturbo.inputs.images import read_image

    Image.new("RGB", (64, 64), (1, 2, 3)).save(tmp_path / "a.png")
    Image.new("RGB", (64, 64), (3, 2, 1)).save(tmp_path / "b.png")
    here, there = (
        read_image(tmp_path / "a.png", "image"),
        read_image(tmp_path / "." / ".." / tmp_path.name / "a.png", "image"),
    )
    assert here.name != there.name
    assert batch.row_key({"prompt": "x", "image": here}) == batch.row_key({"prompt": "x", "image": there})
    other = read_image(tmp_path / "b.png", "image")
    assert batch.row_key({"prompt": "x", "image": here}) != batch.row_key({"prompt": "x", "image": other})
