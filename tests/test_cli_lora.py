"""LoRAs at the command line: --lora and --lora-dir, checks before loading, `zturbo lora list|inspect`,
`--from` with LoRAs (zturbo's chunk and A1111 text), and a batch file's `loras` column."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from clirun import pixels, run
from loras import write_flux_lora, write_lora
from zturbo.cli import _given_options, build_parser, main
from zturbo.imageio import read_metadata
from zturbo.request import GenerateRequest, LoraRef, ModelLimits

SMALL = ["--width", "64", "--height", "48", "--steps", "2", "--seed", "5", "--device", "cpu", "-q"]
PROMPT = "a red fox"


def engine_pixels(engine, loras):
    image = engine.generate(PROMPT, seed=5, width=64, height=48, steps=2, loras=loras).images[0]
    return np.asarray(image.image.convert("RGB"))


@pytest.fixture(scope="module")
def lora_dir(engine, tmp_path_factory):
    """style (kohya, alpha 2 of rank 4) and detail (diffusers/PEFT) for the tiny transformer."""
    directory = tmp_path_factory.mktemp("loras")
    write_lora(directory / "style.safetensors", "kohya", engine.components.transformer, seed=1)
    write_lora(directory / "detail.safetensors", "peft", engine.components.transformer, seed=2)
    return directory


@pytest.fixture
def no_model_load(monkeypatch):
    from zturbo.engine import Engine

    def fail(*args, **kwargs):
        raise AssertionError("the model must not load")

    monkeypatch.setattr(Engine, "load", fail)


@pytest.fixture(scope="module")
def base_image(engine):
    return engine_pixels(engine, [])


# ---------------------------------------------------------------------------------------------
# --lora and --lora-dir


def test_lora_by_name_and_by_path_gives_the_engines_pixels(capsys, engine, tiny_dir, lora_dir, tmp_path, base_image):
    by_name, by_path = tmp_path / "name.png", tmp_path / "path.png"
    code, _, err = run(capsys, "generate", PROMPT, "--model", tiny_dir, *SMALL, "--lora-dir", lora_dir,
                       "--lora", "style:0.8", "--lora", "detail.safetensors:-0.5", "-o", by_name)  # fmt: skip
    assert code == 0, err
    outside = shutil.copy(lora_dir / "style.safetensors", tmp_path / "elsewhere.safetensors")
    code, _, err = run(capsys, "generate", PROMPT, "--model", tiny_dir, *SMALL, "--lora", outside, "-o", by_path)
    assert code == 0, err

    expected = engine_pixels(engine, [LoraRef(str(lora_dir / "style.safetensors"), 0.8),
                                      LoraRef(str(lora_dir / "detail.safetensors"), -0.5)])  # fmt: skip
    assert np.array_equal(pixels(by_name), expected)
    assert np.array_equal(pixels(by_path), engine_pixels(engine, [str(outside)]))
    assert not np.array_equal(pixels(by_path), base_image)
    assert not np.array_equal(pixels(by_name), pixels(by_path))
    recorded = read_metadata(by_name)["loras"]
    assert [(r["name"], r["weight"]) for r in recorded] == [("style.safetensors", 0.8), ("detail.safetensors", -0.5)]


def test_lora_options_read_names_and_weights():
    args = build_parser().parse_args(["generate", "x", "--lora", "a:0.5", "--lora", "b, c.safetensors:-1.25"])
    request = GenerateRequest.create("x", limits=ModelLimits(16, 2**22), **_given_options(args))
    assert request.loras == (LoraRef("a", 0.5), LoraRef("b", 1.0), LoraRef("c.safetensors", -1.25))
    assert build_parser().parse_args(["batch", "rows.txt", "--lora", "a", "--lora", "b:2"]).lora == ["a", "b:2"]


@pytest.mark.parametrize(
    ("lora", "message"),
    [
        ("stlye", "no LoRA named 'stlye' in the LoRA directory and no file at that path; available: "
                  "detail.safetensors, style.safetensors"),
        ("style:11", "LoRA weight 11.0 is out of range; allowed -10..10"),
        ("model.ckpt", "only .safetensors files are loaded"),
    ],
)  # fmt: skip
def test_a_bad_lora_fails_before_the_model_loads(capsys, tiny_dir, lora_dir, tmp_path, no_model_load, lora, message):
    code, out, err = run(capsys, "generate", PROMPT, "--model", tiny_dir, "--lora-dir", lora_dir, "--lora", lora,
                         "-o", tmp_path / "x.png")  # fmt: skip
    assert (code, out) == (2, "")
    assert err.startswith("zturbo: error: ") and message in err
    assert not list(tmp_path.glob("*.png"))


def test_the_lora_dir_comes_from_the_environment(capsys, tiny_dir, lora_dir, monkeypatch, no_model_load):
    monkeypatch.setenv("ZTURBO_LORA_DIR", str(lora_dir))
    code, _, err = run(capsys, "generate", PROMPT, "--model", tiny_dir, "--lora", "nope")
    assert code == 2 and f"(the LoRA directory: {lora_dir}; --lora-dir names another)" in err


# ---------------------------------------------------------------------------------------------
# zturbo lora list | inspect


def _real_size_module(names):
    """Linears of Z-Image-Turbo's real shapes under their real names, on the meta device: LoRA files
    written for it are small (rank 4, a few layers) yet map onto the published model."""
    from zturbo.adapters.formats import published_targets

    targets, root = published_targets(), torch.nn.Module()
    for name in names:
        *parents, leaf = name.split(".")
        parent = root
        for part in parents:
            if not hasattr(parent, part):
                parent.add_module(part, torch.nn.Module())
            parent = getattr(parent, part)
        out, inp = targets[name]
        parent.add_module(leaf, torch.nn.Linear(inp, out, bias=False, device="meta"))
    return root


@pytest.fixture(scope="module")
def real_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("real-loras")
    module = _real_size_module(["layers.0.attention.to_q", "layers.0.attention.to_k", "layers.1.feed_forward.w1"])
    write_lora(directory / "ink.safetensors", "kohya", module, rank=4, alpha=2.0)
    write_lora(directory / "sub" / "soft.safetensors", "peft", module, rank=8, alpha=4.0, modules="attention")
    write_flux_lora(directory / "flux.safetensors")
    (directory / "broken.safetensors").write_bytes(b"not a safetensors file")
    return directory


def test_lora_list_shows_each_file_and_why_one_is_refused(capsys, real_dir, no_model_load):
    code, out, err = run(capsys, "lora", "list", "--lora-dir", real_dir)
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0] == f"4 LoRA file(s) in {real_dir}"
    assert lines[1].split() == ["name", "size", "hash", "format", "rank", "alpha", "modules", "base", "model"]
    rows = {line.split()[0]: line for line in lines[2:]}
    assert list(rows) == ["broken.safetensors", "flux.safetensors", "ink.safetensors", "sub/soft.safetensors"]
    ink = rows["ink.safetensors"].split("  ")
    ink = [cell.strip() for cell in ink if cell.strip()]
    assert ink[3:] == ["kohya", "4", "2", "attention 2, feed_forward 1", "-"]
    soft = [cell.strip() for cell in rows["sub/soft.safetensors"].split("  ") if cell.strip()]
    assert soft[3:7] == ["diffusers", "8", "4", "attention 2"]
    assert "refused: flux.safetensors looks like a LoRA for FLUX.1" in rows["flux.safetensors"]
    assert "refused: LoRA file broken.safetensors is not a readable .safetensors file" in rows["broken.safetensors"]

    code, out, _ = run(capsys, "lora", "list", "--lora-dir", real_dir, "--json")
    records = {r["name"]: r for r in json.loads(out)}
    ink = records["ink.safetensors"]
    assert (ink["format"], ink["ranks"], ink["alphas"], ink["modules"]) == (
        "kohya", [4], [2.0], {"attention": 2, "feed_forward": 1}
    )  # fmt: skip
    assert ink["short_hash"] == ink["sha256"][:10] and len(ink["sha256"]) == 64
    assert "error" in records["flux.safetensors"] and "format" not in records["flux.safetensors"]


def test_lora_list_of_an_empty_directory_says_where_to_put_files(capsys, tmp_path):
    code, out, _ = run(capsys, "lora", "list", "--lora-dir", tmp_path / "none")
    assert (
        code == 0
        and out == f"no LoRA files in {tmp_path / 'none'} (put .safetensors files there, or pass --lora-dir)\n"
    )


def test_lora_inspect_shows_hash_keys_and_metadata(capsys, real_dir):
    import hashlib

    digest = hashlib.sha256((real_dir / "ink.safetensors").read_bytes()).hexdigest()
    code, out, err = run(capsys, "lora", "inspect", "ink", "--lora-dir", real_dir)
    assert code == 0, err
    fields = dict(line.split(None, 1) if "  " not in line else [p.strip() for p in line.split("  ", 1)]
                  for line in out.splitlines())  # fmt: skip
    assert fields["sha256"] == digest and fields["keys"] == "9"  # 3 modules x (down, up, alpha)
    assert (fields["format"], fields["rank"], fields["alpha"]) == ("kohya", "4", "2")
    assert fields["ss_network_dim"] == "4"
    code, out, _ = run(capsys, "lora", "inspect", real_dir / "sub" / "soft.safetensors", "--json")
    record = json.loads(out)
    assert (record["format"], record["ranks"], record["alphas"], record["keys"]) == ("diffusers", [8], [4.0], 4)
    assert record["tool"] == "diffusers / PEFT" and "metadata" in record


def test_lora_inspect_of_a_refused_file_prints_why_and_fails(capsys, real_dir):
    code, out, err = run(capsys, "lora", "inspect", "flux.safetensors", "--lora-dir", real_dir)
    assert code == 2
    assert "ss_base_model_version  flux1" in out
    assert err.startswith("zturbo: error: flux.safetensors looks like a LoRA for FLUX.1")
    code, out, err = run(capsys, "lora", "inspect", "flux", "--lora-dir", real_dir, "--json")
    assert code == 2 and "FLUX.1" in json.loads(out)["error"]
    code, out, err = run(capsys, "lora", "inspect", "missing", "--lora-dir", real_dir)
    assert code == 2 and out == "" and "no LoRA named 'missing'" in err


def test_lora_commands_load_no_model_and_no_pipeline(real_dir):
    """In a fresh process: neither command imports diffusers' pipelines or loads a model."""
    script = (
        "import sys\nfrom zturbo.cli import main\n"
        f"assert main(['lora', 'list', '--lora-dir', {str(real_dir)!r}]) == 0\n"
        f"assert main(['lora', 'inspect', 'ink', '--lora-dir', {str(real_dir)!r}]) == 0\n"
        "heavy = ('diffusers.pipelines', 'zturbo.engine', 'zturbo.loader')\n"
        "loaded = [m for m in sys.modules if m.startswith(heavy)]\n"
        "assert not loaded, loaded\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""


# ---------------------------------------------------------------------------------------------
# --from with LoRAs


@pytest.fixture(scope="module")
def lora_png(tiny_dir, lora_dir, tmp_path_factory):
    """An image made with two LoRAs, and a copy holding only its A1111 text."""
    directory = tmp_path_factory.mktemp("from")
    first = directory / "first.png"
    argv = ["generate", PROMPT, "--model", tiny_dir, *SMALL, "--lora-dir", lora_dir, "--lora", "style:0.75",
            "--lora", "detail:0.5", "-o", first]  # fmt: skip
    assert main([str(a) for a in argv]) == 0
    a1111 = directory / "a1111.png"
    with Image.open(first) as im:
        info = PngInfo()
        info.add_text("parameters", im.text["parameters"])
        im.save(a1111, pnginfo=info)
    return first, a1111


@pytest.mark.parametrize("chunk", ["zturbo", "a1111"])
def test_from_a_lora_image_finds_its_loras_by_hash(capsys, tiny_dir, lora_dir, lora_png, tmp_path, chunk):
    """Renamed files are found by their hash; the pixels are the original's."""
    renamed = tmp_path / "renamed"
    renamed.mkdir()
    shutil.copy(lora_dir / "style.safetensors", renamed / "style-v2.safetensors")
    shutil.copy(lora_dir / "detail.safetensors", renamed / "detail-v2.safetensors")
    source = lora_png[0] if chunk == "zturbo" else lora_png[1]
    again = tmp_path / "again.png"
    code, _, err = run(capsys, "generate", "--from", source, "--model", tiny_dir, "--device", "cpu", "-q",
                       "--lora-dir", renamed, "-o", again)  # fmt: skip
    assert code == 0, err
    assert np.array_equal(pixels(again), pixels(lora_png[0]))
    meta = read_metadata(again)
    assert meta["prompt"] == PROMPT
    assert [(x["name"], x["weight"]) for x in meta["loras"]] == [("style-v2.safetensors", 0.75),
                                                                 ("detail-v2.safetensors", 0.5)]  # fmt: skip


def test_from_finds_a_lora_by_name_and_warns_when_its_hash_differs(capsys, tiny_dir, lora_png, engine, tmp_path):
    """An A1111 text from elsewhere: tags matched by name when no hash matches."""
    directory = tmp_path / "loras"
    write_lora(directory / "style.safetensors", "kohya", engine.components.transformer, seed=7)  # retrained
    with Image.open(lora_png[1]) as im:
        text = im.text["parameters"].replace(" <lora:detail:0.5>", "").replace(", detail: ", ", other: ")
    info = PngInfo()
    info.add_text("parameters", text)
    source = tmp_path / "foreign.png"
    Image.new("RGB", (8, 8)).save(source, pnginfo=info)
    code, _, err = run(capsys, "generate", "--from", source, "--model", tiny_dir, "--device", "cpu",
                       "--lora-dir", directory, "-o", tmp_path / "out.png")  # fmt: skip
    assert code == 0, err
    assert "LoRA style: " in err and "not the recorded" in err and "the pixels will differ" in err
    assert [(x["name"], x["weight"]) for x in read_metadata(tmp_path / "out.png")["loras"]] == [
        ("style.safetensors", 0.75)
    ]


def test_from_fails_naming_each_lora_that_is_not_there(capsys, tiny_dir, lora_png, tmp_path, no_model_load):
    recorded = read_metadata(lora_png[0])["loras"]
    for source in lora_png:
        code, out, err = run(capsys, "generate", "--from", source, "--model", tiny_dir, "--lora-dir", tmp_path,
                             "-o", tmp_path / "x.png")  # fmt: skip
        assert (code, out) == (2, "")
        short = source == lora_png[1]
        for lora in recorded:
            digest = lora["sha256"][:10] if short else lora["sha256"]
            name = lora["name"].removesuffix(".safetensors") if short else lora["name"]
            assert f"{name} (sha256 {digest})" in err
        assert f"{source} was made with LoRAs that are not in {tmp_path}" in err


def test_from_finds_an_a1111_images_lora_by_name_with_no_false_warning(tmp_path, caplog, monkeypatch):
    """A1111's `Lora hashes` are 12 hex digits of its own hash (of the tensor data), no sha256 prefix:
    `--from` uses the named file, says at info level that the hash went unchecked, and hashes nothing.
    A zturbo hash that no file has is the warning: the pixels will differ."""
    import logging

    from zturbo.adapters import library as lora_library
    from zturbo.adapters.library import LoraLibrary
    from zturbo.adapters.recorded import LoraFinder
    from zturbo.cli import _find_recorded

    (tmp_path / "style.safetensors").write_bytes(b"style")
    hashed = []
    real = lora_library.sha256_file
    monkeypatch.setattr(lora_library, "sha256_file", lambda path: hashed.append(path.name) or real(path))
    finder = LoraFinder(LoraLibrary(tmp_path))
    with caplog.at_level(logging.INFO, logger="zturbo"):
        assert _find_recorded(finder, "style", "1a2b3c4d5e6f") == "style"
    assert hashed == [] and "will differ" not in caplog.text and "used unchecked" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="zturbo"):
        assert _find_recorded(finder, "style", "0" * 10) == "style"
    [record] = caplog.records
    assert record.levelno == logging.WARNING and "not the recorded 0000000000" in record.getMessage()
    assert "the pixels will differ" in record.getMessage()


def test_lora_options_override_and_add_to_the_images(capsys, engine, tiny_dir, lora_dir, lora_png, tmp_path):
    out_png = tmp_path / "o.png"
    code, _, err = run(capsys, "generate", "--from", lora_png[0], "--model", tiny_dir, "--device", "cpu", "-q",
                       "--lora-dir", lora_dir, "--lora", "style:0", "--lora", "detail:0.25", "-o", out_png)  # fmt: skip
    assert code == 0, err
    assert [(x["name"], x["weight"]) for x in read_metadata(out_png)["loras"]] == [("detail.safetensors", 0.25)]
    assert np.array_equal(pixels(out_png), engine_pixels(engine, [LoraRef(str(lora_dir / "detail.safetensors"), 0.25)]))


# ---------------------------------------------------------------------------------------------
# Batch files


def test_batch_loras_column_and_default(capsys, engine, tiny_dir, lora_dir, tmp_path, base_image):
    rows = tmp_path / "rows.jsonl"
    rows.write_text(
        "\n".join(
            [
                json.dumps({"prompt": PROMPT, "loras": "style:0.8"}),
                json.dumps({"prompt": PROMPT}),
                json.dumps({"prompt": PROMPT, "loras": ""}),
                json.dumps({"prompt": PROMPT, "loras": ["detail:0.3", "style"]}),
                json.dumps({"prompt": PROMPT, "loras": "nope:0.5"}),
            ]
        )
    )
    out_dir = tmp_path / "out"
    code, out, err = run(capsys, "batch", rows, "--model", tiny_dir, *SMALL, "--lora-dir", lora_dir,
                         "--lora", "detail:0.6", "-o", out_dir)  # fmt: skip
    assert code == 1
    assert "row 5: no LoRA named 'nope' in the LoRA directory" in err
    files = {int(Path(line.split("\t")[0]).name[:5]): Path(line.split("\t")[0]) for line in out.splitlines()}
    assert sorted(files) == [1, 2, 3, 4]
    recorded = {n: [(x["name"], x["weight"]) for x in read_metadata(p)["loras"]] for n, p in files.items()}
    assert recorded == {
        1: [("style.safetensors", 0.8)],
        2: [("detail.safetensors", 0.6)],
        3: [],
        4: [("detail.safetensors", 0.3), ("style.safetensors", 1.0)],
    }
    style = LoraRef(str(lora_dir / "style.safetensors"), 0.8)
    assert np.array_equal(pixels(files[1]), engine_pixels(engine, [style]))
    assert np.array_equal(pixels(files[3]), base_image)


def test_batch_with_a_missing_default_lora_loads_no_model(capsys, tiny_dir, lora_dir, tmp_path, no_model_load):
    rows = tmp_path / "rows.csv"
    rows.write_text('prompt,loras\na cat,"style:0.5, detail"\na dog,\n')
    code, _, err = run(capsys, "batch", rows, "--model", tiny_dir, "--lora-dir", lora_dir, "--lora", "stlye",
                       "-o", tmp_path / "out")  # fmt: skip
    assert code == 2 and "no LoRA named 'stlye'" in err
    rows.write_text('prompt,loras\na cat,"style:0.5, nope"\n')
    code, _, err = run(capsys, "batch", rows, "--model", tiny_dir, "--lora-dir", lora_dir, "-o", tmp_path / "out")
    assert code == 1 and "row 2: no LoRA named 'nope'" in err


@pytest.mark.parametrize("loras", ["style", [1], [["style", 0.5]]])
def test_from_an_image_whose_lora_list_is_malformed_is_an_error_naming_it(
    capsys, tiny_dir, tmp_path, no_model_load, loras
):
    """A PNG is input from anywhere: a LoRA list that is not {name, weight, sha256} records is refused
    with a message, not a traceback."""
    info = PngInfo()
    info.add_text("zturbo", json.dumps({"prompt": PROMPT, "loras": loras}))
    source = tmp_path / "odd.png"
    Image.new("RGB", (8, 8)).save(source, pnginfo=info)
    code, out, err = run(capsys, "generate", "--from", source, "--model", tiny_dir, "--lora-dir", tmp_path,
                         "-o", tmp_path / "x.png")  # fmt: skip
    assert (code, out) == (2, "")
    assert f"{source}: its LoRAs are not a list of {{name, weight, sha256}}: {loras!r}" in err
