"""PNG writing: metadata round trip, A1111 chunk, atomic no-clobber writes, naming."""

from __future__ import annotations

import json
import os
import re
import stat
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from zturbo.errors import InvalidRequestError, OutputExistsError
from zturbo.imageio import check_output, read_metadata, save_images


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
        "model", "model_revision", "model_source", "model_fingerprint", "dtypes", "zturbo_version",
    ):  # fmt: skip
        assert key in meta
    assert meta["model_source"] == "local"  # the engine fixture loads the tiny checkpoint's directory
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


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_png_mode_follows_the_umask_like_any_written_file(result, tmp_path, umask):
    old = os.umask(umask)
    try:
        one = type(result)(result.images[:1], result.request)
        (target,) = one.save(str(tmp_path / "x.png"))
        (numbered,) = save_images(result.images[:1], tmp_path / "dir")
        plain = tmp_path / "plain"
        plain.write_bytes(b"")
    finally:
        os.umask(old)
    expected = 0o666 & ~umask
    assert stat.S_IMODE(plain.stat().st_mode) == expected  # what an ordinary write gives
    assert stat.S_IMODE(target.stat().st_mode) == expected
    assert stat.S_IMODE(numbered.stat().st_mode) == expected


def test_an_unwritable_output_is_refused_before_any_work(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(
        InvalidRequestError, match=re.escape(f"output {blocker / 'x.png'}: {blocker} is a file, not a directory")
    ):
        check_output(blocker / "x.png", 1, overwrite=False)
    with pytest.raises(InvalidRequestError, match="is a file, not a directory"):
        check_output(blocker / "sub" / "dir", 2, overwrite=False)
    if Path("/proc/self").is_dir():  # a place no process can create files in, root included
        with pytest.raises(
            InvalidRequestError, match=re.escape("output /proc/x.png cannot be written: /proc refuses new files")
        ):
            check_output("/proc/x.png", 1, overwrite=False)


def test_the_write_check_leaves_nothing_behind_and_creates_no_directory(tmp_path):
    check_output(tmp_path / "new" / "deeper" / "x.png", 1, overwrite=False)
    check_output(tmp_path / "outdir", 3, overwrite=False)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", ["x.gif", "x.GIF", "x.bmp", "x.tif", "x.tiff", "x.jp2", "x.heic"])
def test_a_file_name_in_a_format_zturbo_cannot_write_is_refused_not_made_a_directory(tmp_path, name):
    suffix = name.rpartition(".")[2].lower()
    message = f"output {tmp_path / name}: {suffix} is not an output format; use .png, .webp or .jpg (or a directory)"
    with pytest.raises(InvalidRequestError, match=re.escape(message)):
        check_output(tmp_path / name, 1, overwrite=False)
    with pytest.raises(InvalidRequestError, match="is not an output format"):
        save_images([], tmp_path / name)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", ["out.v2", "run.2024-01-01", "fox.final", "outputs"])
def test_dotted_directory_names_that_are_no_image_format_stay_directories(tmp_path, name):
    check_output(tmp_path / name, 3, overwrite=False)


def test_an_existing_directory_named_like_an_image_is_used_as_it_is(tmp_path):
    (tmp_path / "frames.tif").mkdir()
    check_output(tmp_path / "frames.tif", 3, overwrite=False)


def test_a_read_only_directory_is_refused(tmp_path, monkeypatch):
    # A read-only mount cannot be made here (and root ignores permission bits), so the kernel's
    # answer is simulated at the one call that creates files.
    import errno

    from zturbo import imageio

    real_open = os.open

    def read_only(path, flags, mode=0o777):
        if flags & os.O_CREAT and Path(path).parent == tmp_path:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_open(path, flags, mode)

    monkeypatch.setattr(imageio.os, "open", read_only)
    with pytest.raises(InvalidRequestError, match="refuses new files \\(Read-only file system\\)"):
        check_output(tmp_path / "x.png", 1, overwrite=False)


LORA_META = {
    "prompt": "a fox, in snow",
    "negative_prompt": "",
    "seed": 3,
    "steps": 8,
    "guidance_scale": 0.0,
    "width": 64,
    "height": 64,
    "model": "m",
    "model_fingerprint": "f" * 64,
    "zturbo_version": "0",
    "loras": [
        {"name": "styles/ink.safetensors", "weight": 0.7, "sha256": "0123456789" + "a" * 54},
        {"name": "/abs/soft.safetensors", "weight": 1.0, "sha256": "abcdef0123" + "b" * 54},
        {"name": "odd", "weight": 0.123456789, "sha256": "c" * 64},
    ],
}


def test_a1111_text_carries_lora_tags_and_hashes_and_reads_back():
    from zturbo.imageio import a1111_parameters, parse_a1111

    text = a1111_parameters(LORA_META)
    first, settings = text.split("\n")
    assert first == "a fox, in snow <lora:ink:0.7> <lora:soft:1> <lora:odd:0.123456789>"
    assert 'Lora hashes: "ink: 0123456789, soft: abcdef0123, odd: cccccccccc", Version: zturbo 0' in settings
    params, ignored = parse_a1111(text)
    assert ignored == []
    assert params["prompt"] == "a fox, in snow"  # the tags are not part of the prompt
    assert params["loras"] == [
        {"name": "ink", "weight": 0.7, "sha256": "0123456789"},
        {"name": "soft", "weight": 1.0, "sha256": "abcdef0123"},
        {"name": "odd", "weight": 0.123456789, "sha256": "cccccccccc"},
    ]


def test_a1111_text_without_loras_has_no_lora_fields():
    from zturbo.imageio import a1111_parameters, parse_a1111

    text = a1111_parameters({**LORA_META, "loras": []})
    assert "<lora:" not in text and "Lora hashes" not in text
    assert "loras" not in parse_a1111(text)[0]


@pytest.mark.parametrize(
    ("tag", "weight"),
    [("<lora:x>", 1.0), ("<lora:x:0.5>", 0.5), ("<lora:x:0.5:0.8>", 0.8), ("<lora:x:te=0.2:unet=-0.3>", -0.3),
     ("<LyCORIS:x:2>", None), ("<lyco:x:0.25>", 0.25)],
)  # fmt: skip
def test_a1111_lora_tags_as_a1111_reads_them(tag, weight):
    """The transformer takes A1111's UNet weight, which follows the text encoder's unless given. Every
    extra-network tag leaves the prompt, as A1111 takes it out; one of a network A1111 does not know
    (`LyCORIS`: its alias is `lyco`) is named as ignored."""
    from zturbo.imageio import parse_a1111

    params, ignored = parse_a1111(f"a cat, {tag} in snow\nSteps: 4, Seed: 1")
    assert params["prompt"] == "a cat, in snow"
    if weight is None:
        assert "loras" not in params and ignored == [
            f"{tag} (not an extra network A1111 or zturbo has (A1111 skips it))"
        ]
    else:
        assert params["loras"] == [{"name": "x", "weight": weight, "sha256": None}]


def test_what_a_read_back_tag_cannot_apply_is_named_not_dropped():
    """An A1111 image's tag arguments zturbo cannot apply (A1111's `dyn`, an extension's key, a text-encoder
    weight, a hypernetwork) would change its pixels: `--from` warns with each (the A1111 routes refuse them)."""
    from zturbo.imageio import parse_a1111

    text = "a cat <lora:x:1:1:8> <lora:y:0.5:lbw=OUTD> <lora:z:0.3:0.6> <hypernet:anime:1>\nSteps: 4, Seed: 1"
    params, ignored = parse_a1111(text)
    assert params["prompt"] == "a cat"
    assert [(x["name"], x["weight"]) for x in params["loras"]] == [("x", 1.0), ("y", 0.5), ("z", 0.6)]
    assert ignored == [
        "<lora:x:1:1:8> (dyn (A1111's reduced LoRA rank) is not available in zturbo)",
        "<lora:y:0.5:lbw=OUTD> (lbw= is not an argument of A1111's LoRA tags)",
        "<lora:z:0.3:0.6> (text-encoder weight 0.3: a text-encoder weight has no effect (zturbo's LoRAs change "
        "the transformer only))",
        "<hypernet:anime:1> (hypernetworks are not available in zturbo)",
    ]


@pytest.mark.parametrize(
    ("tag", "message"),
    [("<lora:x:heavy>", "LoRA tag <lora:x:heavy>: the weight 'heavy' is not a number; write <lora:NAME>"),
     ("<lora::0.5>", "LoRA tag <lora::0.5> has no LoRA name; write <lora:NAME>")],
)  # fmt: skip
def test_a_bad_a1111_lora_tag_is_named(tag, message):
    from zturbo.imageio import parse_a1111

    with pytest.raises(InvalidRequestError, match=re.escape(message)):
        parse_a1111(f"a cat {tag}\nSteps: 4, Seed: 1")


def test_a1111_lora_names_with_tag_characters_or_one_name_in_two_folders_read_back_with_their_hashes():
    """A name holding `:` or `>` would end A1111's tag early (another name, or the tag's tail left in the
    prompt); two files of one name in two folders must each keep their own hash."""
    from zturbo.imageio import a1111_parameters, parse_a1111

    loras = [
        {"name": "s:v2.safetensors", "weight": 0.5, "sha256": "1" * 64},
        {"name": "a>b.safetensors", "weight": 0.25, "sha256": "2" * 64},
        {"name": "x/st.safetensors", "weight": 0.7, "sha256": "3" * 64},
        {"name": "y/st.safetensors", "weight": 0.3, "sha256": "4" * 64},
    ]
    params, ignored = parse_a1111(a1111_parameters({**LORA_META, "loras": loras}))
    assert ignored == [] and params["prompt"] == LORA_META["prompt"]
    assert params["loras"] == [
        {"name": "sv2", "weight": 0.5, "sha256": "1" * 10},
        {"name": "ab", "weight": 0.25, "sha256": "2" * 10},
        {"name": "st", "weight": 0.7, "sha256": "3" * 10},
        {"name": "st", "weight": 0.3, "sha256": "4" * 10},
    ]


def _input_image(color: tuple[int, int, int], mode: str = "RGB"):
    import hashlib
    import io

    from zturbo.inputs.images import InputImage

    image = Image.new(mode, (64, 64), color if mode == "RGB" else color[0])
    data = io.BytesIO()
    image.save(data, format="PNG")
    return InputImage(data.getvalue(), hashlib.sha256(data.getvalue()).hexdigest(), image, f"{color}.png")


def _meta_of(**inputs):
    from zturbo.imageio import build_metadata
    from zturbo.request import GenerateRequest, ModelLimits
    from zturbo.result import ModelInfo

    limits = ModelLimits(spatial_unit=16, max_pixels=2048 * 2048, control_in_dim=33)
    req = GenerateRequest.create("a fox", limits=limits, seed=3, **inputs)
    meta = build_metadata(req, "a fox", "", 3, ModelInfo("m", None, "f" * 64), {}, None)
    return req, {**meta, "loras": []}


def test_metadata_records_the_inputs_by_hash_and_nothing_for_text_to_image():
    _, plain = _meta_of()
    assert plain["inputs"] == {} and plain["controlnet"] is None
    photo, mask = _input_image((10, 20, 30)), _input_image((255, 0, 0), "L")
    req, meta = _meta_of(image=photo, mask=mask, strength=0.8, paste_back=True, mask_blur=4)
    assert meta["inputs"] == req.inputs.to_dict()
    assert meta["inputs"]["images"] == {"image": photo.sha256, "mask": mask.sha256}
    assert json.loads(json.dumps(meta)) == meta  # plain JSON: no bytes, no images


def test_a1111_text_writes_the_input_settings_a1111_knows_and_reads_them_back():
    from zturbo.imageio import a1111_parameters, parse_a1111

    photo = _input_image((10, 20, 30))
    _, meta = _meta_of(image=photo, mask=_input_image((255, 0, 0), "L"), paste_back=True, mask_blur=4, strength=0.8)
    text = a1111_parameters(meta)
    assert "Denoising strength: 0.8, Mask blur: 4" in text
    params, ignored = parse_a1111(text)
    assert ignored == []
    assert (params["strength"], params["mask_blur"], params["paste_back"]) == (0.8, 4, True)
    _, img2img = _meta_of(image=photo)
    assert "Mask blur" not in a1111_parameters(img2img)  # no paste-back, nothing A1111 would call a mask blur


def test_a1111_text_writes_the_controlnet_as_a_webui_unit_and_reads_it_back():
    from zturbo.imageio import a1111_parameters, parse_a1111

    control = _input_image((0, 0, 255))
    _, meta = _meta_of(control_image=control, control_type="canny", control_scale=0.6, control_start=0.125)
    name = "alibaba-pai/Z-Image-Turbo-Fun-Controlnet-Union-2.1:Union-2.1-8steps.safetensors"
    meta["controlnet"] = {"name": name, "sha256": "0123456789abcdef" + "0" * 48, "control_in_dim": 33}
    text = a1111_parameters(meta)
    unit = "Module: canny, Model: Union-2.1-8steps [0123456789], Weight: 0.6, Guidance Start: 0.125, Guidance End: 1"
    assert f'ControlNet 0: "{unit}"' in text
    params, ignored = parse_a1111(text)
    assert ignored == []
    assert {k: v for k, v in params.items() if k.startswith("control")} == {
        "control_type": "canny", "control_scale": 0.6, "control_start": 0.125, "control_end": 1.0,
    }  # fmt: skip
    foreign = 'a cat\nSteps: 4, ControlNet 0: "Module: depth_midas, Model: control_sd15_depth [fef5e48e], Weight: 1"'
    params, ignored = parse_a1111(foreign)
    assert "control_type" not in params and params["control_scale"] == 1.0
    assert ignored == ["ControlNet 0 module (depth_midas)"]


def test_an_a1111_settings_line_is_read_in_linear_time():
    """A crafted line (an infotext, an image's text) holds no label for the pair pattern to retry at every
    position: a 1 MB line of letters once took hours."""
    import contextlib
    import time

    from zturbo.imageio import split_a1111

    started = time.perf_counter()
    for line in ("Steps: 8, " + "a" * 1_000_000, "Steps: 8," + " " * 1_000_000, "Steps: 8, " + 'a: "x, ' * 100_000):
        with contextlib.suppress(ValueError):  # an unclosed quoted value is no JSON: refused, in time
            split_a1111(f"a cat\n{line}")
    assert time.perf_counter() - started < 5
    assert split_a1111("a cat\n\tSteps: 4,\tSeed: 1")[2] == {"Steps": "4", "Seed": "1"}  # tabs, as before
