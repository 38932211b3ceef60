"""PNG writing: metadata round trip, A1111 chunk, atomic no-clobber writes, naming."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from zturbo.errors import InvalidRequestError, OutputExistsError
from zturbo.imageio import read_metadata, save_images


@pytest.fixture(scope="module")
def result(engine):
    return engine.generate(
        ["一只猫, a cat", "a dog"], negative_prompt="blurry", guidance_scale=1.0, seed=77, width=32, height=32
    )


def test_metadata_round_trip(result, tmp_path):
    paths = result.save(str(tmp_path))
    assert len(paths) == 2
    for path, img in zip(paths, result.images, strict=True):
        assert read_metadata(path) == img.metadata
        with Image.open(path) as im:
            assert im.size == (32, 32)
            im.load()
            assert np.array_equal(np.asarray(im), np.asarray(img.image))  # lossless


def test_a1111_parameters_chunk(result, tmp_path):
    path = result.save(str(tmp_path / "one"))[0]
    with Image.open(path) as im:
        text = im.text["parameters"]
    lines = text.split("\n")
    assert lines[0] == "一只猫, a cat"
    assert lines[1] == "Negative prompt: blurry"
    fields = dict(part.split(": ", 1) for part in lines[2].split(", "))
    assert fields["Seed"] == "77" and fields["Steps"] == "8" and fields["Size"] == "32x32"
    assert fields["CFG scale"] == "1.0" and fields["Sampler"] == "Euler"


def test_metadata_has_required_fields(result):
    meta = result.images[0].metadata
    for key in (
        "prompt", "negative_prompt", "seed", "steps", "guidance_scale", "width", "height",
        "model", "model_revision", "model_fingerprint", "dtypes", "zturbo_version",
    ):  # fmt: skip
        assert key in meta
    json.dumps(meta)


def test_single_file_target_and_no_overwrite(result, tmp_path):
    one = type(result)(result.images[:1], result.request)
    target = tmp_path / "x.png"
    assert one.save(str(target)) == [target]
    before = target.read_bytes()
    with pytest.raises(OutputExistsError, match="already exists"):
        one.save(str(target))
    assert target.read_bytes() == before
    assert one.save(str(target), overwrite=True) == [target]
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]  # no temporary files left


def test_file_target_with_several_images_is_rejected(result, tmp_path):
    with pytest.raises(InvalidRequestError, match="names one file but 2 images"):
        result.save(str(tmp_path / "x.png"))
    assert not (tmp_path / "x.png").exists()


def test_directory_numbering_continues_and_never_clobbers(result, tmp_path):
    first = save_images(result.images, tmp_path)
    second = save_images(result.images, tmp_path)
    names = [p.name for p in first + second]
    assert names == ["00001-77.png", "00002-78.png", "00003-77.png", "00004-78.png"]


def test_reading_a_foreign_png_is_a_clear_error(tmp_path):
    path = tmp_path / "plain.png"
    Image.new("RGB", (4, 4)).save(path)
    with pytest.raises(InvalidRequestError, match="no 'zturbo' metadata"):
        read_metadata(path)
    (tmp_path / "junk.png").write_bytes(b"not a png")
    with pytest.raises(InvalidRequestError, match="not a readable image"):
        read_metadata(tmp_path / "junk.png")


def test_output_path_that_is_a_file_is_rejected(result, tmp_path):
    blocker = tmp_path / "outputs"
    blocker.write_text("")
    with pytest.raises(InvalidRequestError, match="not a directory"):
        save_images(result.images, Path(blocker))
