"""Reproduction from an image (`generate --from` a PNG, WebP or JPEG), `zturbo show`, and contact sheets."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from clirun import pixels, run
from zturbo.imageio import DEFAULT_QUALITY, WEBP_METHOD, parse_a1111, read_metadata

SMALL = ["--width", "64", "--height", "48", "--steps", "2", "--device", "cpu", "-q"]


# Runtime fields differ only by what ran; everything that shaped the image must match exactly.
def shaping(meta):
    return {k: v for k, v in meta.items() if k not in ("zturbo_version",)}


@pytest.mark.parametrize(
    "options",
    [
        [],
        ["--variation-seed", "9", "--variation-strength", "0.4", "--variety", "0.6", "--variety-until", "0.5",
         "--guidance", "2", "--negative-prompt", "blurry, dark"],
    ],
    ids=["plain", "variation-variety-cfg"],
)  # fmt: skip
def test_from_reproduces_identical_pixels(capsys, tiny_dir, tmp_path, options):
    first = tmp_path / "a.png"
    code, _, err = run(capsys, "generate", "a red fox", "--model", tiny_dir, "--seed", 5, *SMALL, *options, "-o", first)
    assert code == 0, err
    again = tmp_path / "b.png"
    code, out, err = run(capsys, "generate", "--from", first, "--model", tiny_dir, *SMALL[-3:], "-o", again)
    assert code == 0, err
    assert np.array_equal(pixels(again), pixels(first))
    assert shaping(read_metadata(again)) == shaping(read_metadata(first))
    assert out.startswith(f"{again}\tseed=5")


def test_from_a_webp_or_jpeg_reproduces_the_image_it_holds(capsys, tiny_dir, tmp_path):
    """The metadata travels in WebP's and JPEG's EXIF and XMP; the file's suffix sets the format."""
    first = tmp_path / "a.webp"
    options = ["--variation-seed", "9", "--variation-strength", "0.4", "--negative-prompt", "blurry, 暗い"]
    code, _, err = run(capsys, "generate", "一只狐狸", "--model", tiny_dir, "--seed", 5, *SMALL, *options, "-o", first)
    assert code == 0, err
    with Image.open(first) as im:
        assert im.format == "WEBP"
    png, jpeg = tmp_path / "b.png", tmp_path / "c.jpg"
    code, _, err = run(capsys, "generate", "--from", first, "--model", tiny_dir, *SMALL[-3:], "-o", png)
    assert code == 0, err
    assert shaping(read_metadata(png)) == shaping(read_metadata(first))
    code, _, err = run(capsys, "generate", "--from", png, "--format", "webp", "--model", tiny_dir, "-q", "-o", jpeg)
    assert code == 2 and f"output {jpeg} is a jpeg file name but the output format is webp" in err
    code, _, err = run(capsys, "generate", "--from", png, "--compression", "80", "--model", tiny_dir, "-q", "-o", jpeg)
    assert code == 0, err
    assert shaping(read_metadata(jpeg)) == shaping(read_metadata(first))
    # The lossy files hold exactly the lossless image's pixels as their encoders (deterministic) write them.
    assert np.array_equal(pixels(first), reencoded(png, "WEBP", quality=DEFAULT_QUALITY["webp"], method=WEBP_METHOD))
    assert np.array_equal(pixels(jpeg), reencoded(png, "JPEG", quality=80))


def reencoded(path, fmt, **options):
    buffer = io.BytesIO()
    with Image.open(path) as im:
        im.save(buffer, format=fmt, **options)
    return pixels(buffer)


def test_from_with_overrides_changes_only_those(capsys, tiny_dir, tmp_path):
    first = tmp_path / "a.png"
    run(capsys, "generate", "a red fox", "--model", tiny_dir, "--seed", 5, "--variety", "0.5", *SMALL, "-o", first)
    code, out, err = run(
        capsys, "generate", "--from", first, "--model", tiny_dir, "--seeds", "6-7", "-q", "-o", tmp_path / "more"
    )
    assert code == 0, err
    metas = [read_metadata(line.split("\t")[0]) for line in out.splitlines()]
    assert [m["seed"] for m in metas] == [6, 7]
    assert {(m["prompt"], m["variety"], m["width"], m["height"], m["steps"]) for m in metas} == {
        ("a red fox", 0.5, 64, 48, 2)
    }
    code, _, err = run(
        capsys, "generate", "a blue bird", "--from", first, "--model", tiny_dir, "-q", "-o", tmp_path / "c.png"
    )
    assert code == 0, err
    assert read_metadata(tmp_path / "c.png")["prompt"] == "a blue bird"


def test_from_the_a1111_chunk_alone_reproduces_a_zturbo_image(capsys, tiny_dir, tmp_path):
    first = tmp_path / "a.png"
    options = ["--variation-seed", "9", "--variation-strength", "0.4", "--variety", "0.6"]
    run(capsys, "generate", 'a fox, "red"', "--model", tiny_dir, "--seed", 5, *SMALL, *options, "-o", first)
    stripped = tmp_path / "a1111.png"
    with Image.open(first) as im:
        info = PngInfo()
        info.add_text("parameters", im.text["parameters"])
        im.save(stripped, pnginfo=info)
    code, _, err = run(capsys, "generate", "--from", stripped, "--model", tiny_dir, "-q", "-o", tmp_path / "b.png")
    assert code == 0, err
    assert np.array_equal(pixels(tmp_path / "b.png"), pixels(first))


def test_from_a_foreign_a1111_image_warns_about_what_it_ignores(capsys, tiny_dir, tmp_path):
    settings = "Steps: 2, Sampler: DPM++ 2M Karras, CFG scale: 1.5, Seed: 77, Size: 32x48, Hires upscale: 2"
    text = f"a cat\nNegative prompt: ugly\n{settings}"
    info = PngInfo()
    info.add_text("parameters", text)
    source = tmp_path / "sd.png"
    Image.new("RGB", (8, 8)).save(source, pnginfo=info)
    code, _, err = run(
        capsys, "generate", "--from", source, "--model", tiny_dir, "--device", "cpu", "-o", tmp_path / "z.png"
    )
    assert code == 0, err
    assert "ignoring A1111 fields zturbo does not use: Sampler (DPM++ 2M Karras), Hires upscale" in err
    meta = read_metadata(tmp_path / "z.png")
    assert (meta["prompt"], meta["negative_prompt"], meta["seed"], meta["steps"]) == ("a cat", "ugly", 77, 2)
    assert (meta["guidance_scale"], meta["width"], meta["height"]) == (1.5, 32, 48)


def test_parse_a1111_quoted_values_and_multiline_prompts():
    params, ignored = parse_a1111(
        'line one\nline two\nNegative prompt: a, b\nSteps: 4, Seed: 3, Lora hashes: "x: 1, y: 2"'
    )
    assert params["prompt"] == "line one\nline two" and params["negative_prompt"] == "a, b"
    assert (params["steps"], params["seed"]) == (4, 3) and ignored == ["Lora hashes"]


def test_png_without_parameters_is_named(capsys, tiny_dir, tmp_path):
    plain = tmp_path / "plain.png"
    Image.new("RGB", (4, 4)).save(plain)
    for argv in (["show", plain], ["generate", "--from", plain, "--model", tiny_dir]):
        code, out, err = run(capsys, *argv)
        assert code == 2 and out == ""
        why = "has no generation parameters (neither 'zturbo' metadata nor an A1111 'parameters' text)"
        assert err == f"zturbo: error: {plain} {why}\n"
    code, _, err = run(capsys, "show", tmp_path / "missing.png")
    assert code == 2 and f"{tmp_path / 'missing.png'} does not exist" in err


def test_generate_without_prompt_or_from_is_refused(capsys, tiny_dir):
    code, _, err = run(capsys, "generate", "--model", tiny_dir)
    assert code == 2 and "give a PROMPT, or --from IMAGE to take the parameters from an image" in err


def test_show_prints_the_parameters(capsys, tiny_dir, tmp_path):
    target = tmp_path / "a.png"
    run(capsys, "generate", "a red fox", "--model", tiny_dir, "--seed", 5, "--variety", "0.3", *SMALL, "-o", target)
    code, out, _ = run(capsys, "show", target)
    assert code == 0
    lines = out.splitlines()
    assert lines[0] == f"{target}  (zturbo metadata)"
    fields = dict(line.split(None, 1) for line in lines[1:] if len(line.split(None, 1)) == 2)
    assert fields["prompt"] == "a red fox" and fields["seed"] == "5" and fields["variety"] == "0.3"
    assert lines[1].split()[0] == "prompt"  # what shaped the image comes first
    code, out, _ = run(capsys, "show", target, "--json")
    assert json.loads(out) == read_metadata(target)


def test_generate_grid_labels_every_seed(capsys, tiny_dir, tmp_path):
    code, out, err = run(
        capsys, "generate", "a red fox", "--model", tiny_dir, "--seeds", "3,8,21", *SMALL, "--grid", "-o", tmp_path
    )
    assert code == 0, err
    lines = out.splitlines()
    grid = tmp_path / "grid-00001-3.png"
    assert lines[-1] == f"{grid}\tgrid"
    with Image.open(grid) as im:
        listed = json.loads(im.text["zturbo-grid"])["images"]
        assert im.width >= 2 * 64 and im.height >= 2 * 48  # 3 cells: 2 columns, 2 rows
        assert "zturbo" not in im.text and "parameters" not in im.text
    assert listed == ["00001-3.png", "00002-8.png", "00003-21.png"]
