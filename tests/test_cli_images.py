"""The CLI with input images: img2img, inpaint, outpaint, `--from` with its input images checked by
sha256, refusals before any model loads, and batch rows with image columns (tiny model, 64x64)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from clirun import pixels, run
from zturbo import batch
from zturbo.cli import main
from zturbo.imageio import read_metadata

SMALL = ["--steps", "2", "--device", "cpu", "-q"]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def pictures(tmp_path_factory) -> dict[str, Path]:
    """A 64x64 photo-like image, a second one, a mask (white square in the middle) and a broken file."""
    root = tmp_path_factory.mktemp("pictures")
    rng = np.random.default_rng(0)
    files = {"photo": root / "photo.png", "other": root / "other.png", "mask": root / "mask.png"}
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(files["photo"])
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(files["other"])
    mask = np.zeros((64, 64), np.uint8)
    mask[16:48, 16:48] = 255
    Image.fromarray(mask).save(files["mask"])
    files["broken"] = root / "broken.png"
    files["broken"].write_bytes(files["photo"].read_bytes()[:100])  # a PNG cut short
    return files


@pytest.fixture
def no_model(monkeypatch):
    """Fail the test if anything resolves or loads a model: refusals must come first."""

    def refuse(*args, **kwargs):
        raise AssertionError("a model was resolved before the bad input was refused")

    # Engine first: importing zturbo.engine binds loader names, which must stay the real ones.
    monkeypatch.setattr("zturbo.engine.Engine.load", refuse)
    monkeypatch.setattr("zturbo.loader.resolve_model", refuse)


def generate(capsys, tiny_dir, target, *options):
    code, out, err = run(
        capsys, "generate", "a red fox", "--model", tiny_dir, "--seed", 3, *SMALL, *options, "-o", target
    )
    assert code == 0, err
    return out


@pytest.fixture
def no_load(monkeypatch):
    """Fail the test if the model's weights load (its configs may be read: the request is checked against them)."""
    monkeypatch.delenv("ZTURBO_CONTROLNET", raising=False)
    monkeypatch.setattr("zturbo.engine.Engine.load", lambda *a, **k: pytest.fail("the model loaded"))


# ------------------------------------------------------------------------------------------------
# Refused before anything loads


@pytest.mark.parametrize("option", ["--image", "--mask", "--control-image"])
@pytest.mark.parametrize("which", ["missing", "broken", "directory"])
def test_a_missing_or_broken_image_file_is_refused_by_name_first(capsys, pictures, no_model, tmp_path, option, which):
    path = {"missing": tmp_path / "nope.png", "broken": pictures["broken"], "directory": tmp_path}[which]
    extra = [] if option == "--image" else ["--image", pictures["photo"]]
    code, out, err = run(capsys, "generate", "a fox", option, path, *extra, "-o", tmp_path / "x.png")
    assert code == 2 and out == ""
    assert err.startswith("zturbo: error: ") and str(path) in err and err.count("\n") == 1


def test_a_control_image_without_a_controlnet_is_refused_before_loading(capsys, tiny_dir, pictures, no_load, tmp_path):
    code, _, err = run(capsys, "generate", "a fox", "--model", tiny_dir, "--control-image", pictures["photo"],
                       "-o", tmp_path / "x.png")  # fmt: skip
    assert code == 2
    assert err == "zturbo: error: control_image needs a ControlNet; load one with --controlnet\n"


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--mask", "MASK"], "mask"),  # a mask without an image
        (["--image", "PHOTO", "--mask-blur", "4", "--mask", "MASK"], "mask_blur 4 needs paste_back"),
        (["--image", "PHOTO", "--resize", "squash"], "resize 'squash' is not one of crop, fit, stretch"),
        (["--image", "PHOTO", "--outpaint", "8,x,0,0"], "outpaint '8,x,0,0' is not LEFT,RIGHT,TOP,BOTTOM pixels"),
        (["--image", "PHOTO", "--width", "128"], "but the request is 128x64; give resize"),
    ],
)
def test_settings_that_make_no_sense_are_refused_first(capsys, tiny_dir, pictures, no_load, tmp_path, options, message):
    files = {"PHOTO": pictures["photo"], "MASK": pictures["mask"]}
    argv = [files.get(o, o) for o in options]
    code, _, err = run(capsys, "generate", "a fox", "--model", tiny_dir, *argv, "-o", tmp_path / "x.png")
    assert code == 2 and message in err and err.count("\n") == 1, err


def test_the_options_read_as_documented():
    from zturbo.cli import build_parser

    args = build_parser().parse_args(["generate", "x", "--paste-back", "--mask", "alpha", "--outpaint", "0,16,0,0"])
    assert args.paste_back is True and args.mask == "alpha" and args.outpaint == "0,16,0,0"
    assert build_parser().parse_args(["generate", "x"]).paste_back is None  # not given: the table's default
    help_text = build_parser()._subparsers._group_actions[0].choices["generate"].format_help()
    for shown in ("--resize {crop,fit,stretch}", "--mask PATH|alpha", "--outpaint L,R,T,B", "--controlnet REPO_OR_FILE",
                  "--control-type {canny,depth,pose,hed,mlsd,scribble,gray,tile}"):  # fmt: skip
        assert shown in help_text


# ------------------------------------------------------------------------------------------------
# The modes end to end


def test_img2img_is_the_engines_image_and_records_the_input(capsys, tiny_dir, engine, pictures, tmp_path):
    target = tmp_path / "a.png"
    generate(capsys, tiny_dir, target, "--image", pictures["photo"], "--strength", "0.5")
    meta = read_metadata(target)
    assert meta["inputs"]["mode"] == "img2img" and meta["inputs"]["strength"] == 0.5
    assert meta["inputs"]["images"] == {"image": sha256(pictures["photo"])}
    assert (meta["width"], meta["height"]) == (64, 64)  # the image's size
    with Image.open(target) as im:
        assert "Denoising strength: 0.5" in im.text["parameters"]
    with Image.open(pictures["photo"]) as photo:
        same = engine.generate("a red fox", seed=3, steps=2, image=photo.copy(), strength=0.5)
    assert np.array_equal(pixels(target), np.asarray(same.images[0].image))


def test_inpaint_with_paste_back_keeps_every_pixel_outside_the_mask(capsys, tiny_dir, pictures, tmp_path):
    target = tmp_path / "a.png"
    generate(capsys, tiny_dir, target, "--image", pictures["photo"], "--mask", pictures["mask"], "--paste-back")
    out, original = pixels(target), pixels(pictures["photo"])
    outside = pixels(pictures["mask"]) == 0
    assert np.array_equal(out[outside], original[outside])
    assert not np.array_equal(out[~outside], original[~outside])  # the masked square was repainted
    inputs = read_metadata(target)["inputs"]
    assert (inputs["mode"], inputs["paste_back"], inputs["strength"]) == ("inpaint", True, 1.0)
    assert inputs["images"] == {"image": sha256(pictures["photo"]), "mask": sha256(pictures["mask"])}


def test_outpaint_extends_the_canvas_and_keeps_the_original_with_paste_back(capsys, tiny_dir, pictures, tmp_path):
    target = tmp_path / "a.png"
    generate(capsys, tiny_dir, target, "--image", pictures["photo"], "--outpaint", "16,0,0,16", "--paste-back")
    out = pixels(target)
    assert out.shape == (80, 80, 3)
    assert np.array_equal(out[:64, 16:], pixels(pictures["photo"]))  # placed at (left, top) = (16, 0)
    assert read_metadata(target)["inputs"]["outpaint"] == [16, 0, 0, 16]
    again = tmp_path / "b.png"  # --from brings the margins back
    code, _, err = run(capsys, "generate", "--from", target, "--model", tiny_dir, "--device", "cpu", "-q",
                       "--image", pictures["photo"], "-o", again)  # fmt: skip
    assert code == 0, err
    assert np.array_equal(pixels(again), out)


# ------------------------------------------------------------------------------------------------
# --from: the settings come back, the images are given again and checked


@pytest.fixture(scope="module")
def inpainted(tiny_dir, pictures, tmp_path_factory) -> Path:
    target = tmp_path_factory.mktemp("from") / "inpainted.png"
    argv = ["generate", "a red fox", "--model", tiny_dir, "--seed", 3, *SMALL, "--image", pictures["photo"],
            "--mask", pictures["mask"], "--strength", "0.75", "--mask-padding", "2", "--paste-back",
            "--mask-blur", "3", "-o", target]  # fmt: skip
    assert main([str(a) for a in argv]) == 0
    return target


def test_from_with_the_same_images_reproduces_the_pixels(capsys, tiny_dir, pictures, inpainted, tmp_path):
    again = tmp_path / "again.png"
    code, _, err = run(capsys, "generate", "--from", inpainted, "--model", tiny_dir, "--device", "cpu", "-q",
                       "--image", pictures["photo"], "--mask", pictures["mask"], "-o", again)  # fmt: skip
    assert code == 0, err
    assert np.array_equal(pixels(again), pixels(inpainted))
    assert read_metadata(again)["inputs"] == read_metadata(inpainted)["inputs"]


def test_from_brings_back_a_mask_taken_from_the_images_alpha(capsys, tiny_dir, pictures, tmp_path):
    rgba = Image.open(pictures["photo"]).convert("RGBA")
    rgba.putalpha(Image.fromarray(np.where(pixels(pictures["mask"])[..., 0] > 0, 0, 255).astype(np.uint8)))
    holed, first, again = tmp_path / "holed.png", tmp_path / "a.png", tmp_path / "b.png"
    rgba.save(holed)
    generate(capsys, tiny_dir, first, "--image", holed, "--mask", "alpha")
    assert read_metadata(first)["inputs"]["mask_from_alpha"] is True
    code, _, err = run(capsys, "generate", "--from", first, "--model", tiny_dir, "--device", "cpu", "-q",
                       "--image", holed, "-o", again)  # fmt: skip
    assert code == 0, err
    assert np.array_equal(pixels(again), pixels(first))
    assert read_metadata(again)["inputs"] == read_metadata(first)["inputs"]


def test_from_the_a1111_text_alone_and_the_images_reproduces(capsys, tiny_dir, pictures, inpainted, tmp_path):
    """A1111 records strength and mask blur (with paste-back); mask padding is zturbo's own, given again."""
    stripped = tmp_path / "a1111.png"
    with Image.open(inpainted) as im:
        info = PngImagePlugin.PngInfo()
        info.add_text("parameters", im.text["parameters"])
        im.save(stripped, pnginfo=info)
    again = tmp_path / "again.png"
    code, _, err = run(capsys, "generate", "--from", stripped, "--model", tiny_dir, "--device", "cpu", "-q", "--image",
                       pictures["photo"], "--mask", pictures["mask"], "--mask-padding", "2", "-o", again)  # fmt: skip
    assert code == 0, err
    assert np.array_equal(pixels(again), pixels(inpainted))


@pytest.mark.parametrize("given", [[], ["--image", "PHOTO"], ["--mask", "MASK"]])
def test_from_without_an_input_image_is_refused_naming_it(capsys, pictures, inpainted, no_model, tmp_path, given):
    files = {"PHOTO": pictures["photo"], "MASK": pictures["mask"]}
    argv = [files.get(o, o) for o in given]
    code, _, err = run(capsys, "generate", "--from", inpainted, *argv, "-o", tmp_path / "x.png")
    assert code == 2
    missing = ("image", "--image", "an image") if "--image" not in given else ("mask", "--mask", "a mask")
    digest = sha256(pictures["photo" if missing[0] == "image" else "mask"])
    assert err == (f"zturbo: error: {inpainted} was made by inpaint from {missing[2]} with sha256 {digest}; "
                   f"give it with {missing[1]}\n")  # fmt: skip


def test_from_with_another_image_is_refused_naming_both_hashes(capsys, pictures, inpainted, no_model, tmp_path):
    code, _, err = run(capsys, "generate", "--from", inpainted, "--image", pictures["other"], "--mask",
                       pictures["mask"], "-o", tmp_path / "x.png")  # fmt: skip
    assert code == 2
    assert (f"was made by inpaint from an image with sha256 {sha256(pictures['photo'])}, but --image "
            f"{pictures['other']} has sha256 {sha256(pictures['other'])}; give the same file") in err  # fmt: skip


def test_show_says_which_images_to_give_again(capsys, inpainted):
    code, out, _ = run(capsys, "show", inpainted)
    assert code == 0
    assert f"to make it again: zturbo generate --from {inpainted} --image FILE --mask FILE" in out


def test_a_hires_fix_strength_in_foreign_a1111_text_is_ignored_without_an_image(capsys, tiny_dir, tmp_path):
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", "a cat\nSteps: 2, Seed: 7, Size: 64x64, Denoising strength: 0.7, Hires upscale: 2")
    source = tmp_path / "sd.png"
    Image.new("RGB", (8, 8)).save(source, pnginfo=info)
    code, _, err = run(capsys, "generate", "--from", source, "--model", tiny_dir, "--device", "cpu", "-o",
                       tmp_path / "z.png")  # fmt: skip
    assert code == 0, err
    assert "ignoring its input settings without their images: strength (needs --image)" in err
    assert read_metadata(tmp_path / "z.png")["inputs"] == {}


# ------------------------------------------------------------------------------------------------
# Batch rows with images


def test_batch_rows_read_images_relative_to_the_file_and_a_bad_one_fails_alone(capsys, tiny_dir, pictures, tmp_path):
    folder = tmp_path / "job"
    folder.mkdir()
    (folder / "in").mkdir()
    (folder / "in" / "photo.png").write_bytes(pictures["photo"].read_bytes())
    (folder / "in" / "mask.png").write_bytes(pictures["mask"].read_bytes())
    rows = [
        {"prompt": "a fox", "image": "in/photo.png", "strength": 0.5, "seed": 1},
        {"prompt": "a fox", "image": "in/photo.png", "mask": "in/mask.png", "paste_back": True, "seed": 2},
        {"prompt": "a fox", "image": "in/gone.png", "seed": 3},
    ]
    file = folder / "rows.jsonl"
    file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out_dir = tmp_path / "out"
    code, out, err = run(capsys, "batch", file, "--model", tiny_dir, *SMALL, "-o", out_dir)
    assert code == 1  # the third row failed
    assert f"row 3: image {folder / 'in' / 'gone.png'}: no such file" in err
    first, second = (Path(line.split("\t")[0]) for line in out.splitlines())
    assert read_metadata(first)["inputs"]["mode"] == "img2img"
    inpaint = pixels(second)
    outside = pixels(pictures["mask"]) == 0
    assert np.array_equal(inpaint[outside], pixels(pictures["photo"])[outside])
    records = [json.loads(line) for line in (out_dir / batch.MANIFEST).read_text().splitlines()]
    planned = [r for r in records if r["event"] == "planned"]
    assert planned[1]["params"]["mask"] == {"path": str(folder / "in" / "mask.png"), "sha256": sha256(pictures["mask"])}

    # A rerun skips the rows whose images are the same files; a changed file makes its rows new ones.
    code, out, err = run(capsys, "batch", file, "--model", tiny_dir, *SMALL, "-o", out_dir)
    assert out == "" and "0 done now (0 images), 2 already done, 1 failed" in err
    mask = np.zeros((64, 64), np.uint8)
    mask[:32] = 255
    Image.fromarray(mask).save(folder / "in" / "mask.png")
    code, out, err = run(capsys, "batch", file, "--model", tiny_dir, *SMALL, "-o", out_dir)
    assert [Path(line.split("\t")[0]).name for line in out.splitlines()] == ["00002-2.png"]
    assert "1 done now (1 images), 1 already done, 1 failed" in err


# ------------------------------------------------------------------------------------------------
# ControlNet


@pytest.fixture(scope="module")
def controlnets(tmp_path_factory) -> dict[str, Path]:
    from zturbo.tiny import write_tiny_controlnet

    root = tmp_path_factory.mktemp("controlnets")
    return {v: write_tiny_controlnet(root / f"union-{v}.safetensors", version=v) for v in ("1.0", "2.1")}


@pytest.fixture(scope="module")
def control_engine(tiny_dir, controlnets):
    from zturbo.config import RuntimeConfig
    from zturbo.engine import Engine

    config = RuntimeConfig(model=str(tiny_dir), device="cpu", dtype="float32", controlnet=str(controlnets["2.1"]))
    return Engine.load(config)


@pytest.fixture(scope="module")
def controlled(tiny_dir, pictures, controlnets, tmp_path_factory) -> Path:
    target = tmp_path_factory.mktemp("control") / "canny.png"
    argv = ["generate", "a red fox", "--model", tiny_dir, "--seed", 3, *SMALL, "--controlnet", controlnets["2.1"],
            "--control-image", pictures["photo"], "--control-type", "canny", "--control-scale", "0.5",
            "--control-end", "0.5", "-o", target]  # fmt: skip
    assert main([str(a) for a in argv]) == 0
    return target


def test_canny_control_is_the_engines_image_and_records_the_controlnet(
    controlled, control_engine, pictures, controlnets
):
    with Image.open(pictures["photo"]) as photo:
        same = control_engine.generate("a red fox", seed=3, steps=2, control_image=photo.copy(), control_type="canny",
                                       control_scale=0.5, control_end=0.5)  # fmt: skip
    assert np.array_equal(pixels(controlled), np.asarray(same.images[0].image))
    plain = control_engine.generate("a red fox", seed=3, steps=2, width=64, height=64)
    assert not np.array_equal(pixels(controlled), np.asarray(plain.images[0].image))  # the control did something
    meta = read_metadata(controlled)
    assert meta["controlnet"]["sha256"] == sha256(controlnets["2.1"]) and meta["controlnet"]["control_in_dim"] == 33
    assert meta["inputs"]["images"] == {"control_image": sha256(pictures["photo"])}
    with Image.open(controlled) as im:
        unit = (f"Module: canny, Model: union-2.1 [{sha256(controlnets['2.1'])[:10]}], Weight: 0.5, "
                "Guidance Start: 0, Guidance End: 0.5")  # fmt: skip
        assert f'ControlNet 0: "{unit}"' in im.text["parameters"]


def test_from_a_controlled_image_needs_both(capsys, controlled, pictures, controlnets, no_model, tmp_path):
    code, _, err = run(capsys, "generate", "--from", controlled, "--control-image", pictures["photo"],
                       "-o", tmp_path / "x.png")  # fmt: skip
    assert code == 2
    assert (f"was made with the ControlNet {controlnets['2.1']} (sha256 {sha256(controlnets['2.1'])}); "
            f"load it with --controlnet {controlnets['2.1']}") in err  # fmt: skip
    code, _, err = run(capsys, "generate", "--from", controlled, "--controlnet", controlnets["2.1"],
                       "-o", tmp_path / "x.png")  # fmt: skip
    assert code == 2
    assert "was made by text-to-image with a ControlNet from a control image with sha256" in err
    assert err.endswith("; give it with --control-image\n")


def test_from_a_controlled_image_with_both_reproduces(capsys, tiny_dir, controlled, pictures, controlnets, tmp_path):
    again = tmp_path / "again.png"
    code, _, err = run(capsys, "generate", "--from", controlled, "--model", tiny_dir, "--device", "cpu", "-q",
                       "--controlnet", controlnets["2.1"], "--control-image", pictures["photo"],
                       "-o", again)  # fmt: skip
    assert code == 0, err
    assert np.array_equal(pixels(again), pixels(controlled))


def test_controlnet_inpaint_needs_the_inpaint_input(capsys, tiny_dir, pictures, controlnets, no_load, tmp_path):
    code, _, err = run(capsys, "generate", "a fox", "--model", tiny_dir, "--controlnet", controlnets["1.0"],
                       "--image", pictures["photo"], "--mask", pictures["mask"], "--control-image", pictures["photo"],
                       "-o", tmp_path / "x.png")  # fmt: skip
    assert code == 2
    assert "this ControlNet (control_in_dim 16) has no inpaint input" in err


def test_info_names_the_controlnet_and_its_input(capsys, controlnets):
    code, out, _ = run(capsys, "info", "--device", "cpu", "--controlnet", controlnets["1.0"])
    assert code == 0
    line = next(line for line in out.splitlines() if line.startswith("controlnet "))
    assert line.split(None, 1)[1] == f"{controlnets['1.0']}  (control_in_dim 16: control only)"


def test_controlnet_inpaint_runs_and_pastes_back(capsys, tiny_dir, pictures, controlnets, tmp_path):
    target = tmp_path / "a.png"
    generate(capsys, tiny_dir, target, "--controlnet", controlnets["2.1"], "--image", pictures["photo"],
             "--mask", pictures["mask"], "--control-image", pictures["other"], "--paste-back")  # fmt: skip
    inputs = read_metadata(target)["inputs"]
    assert (inputs["mode"], inputs["controlled"], inputs["strength"]) == ("inpaint", True, 1.0)
    outside = pixels(pictures["mask"]) == 0
    assert np.array_equal(pixels(target)[outside], pixels(pictures["photo"])[outside])


def test_info_plan_counts_the_controlnet(capsys, tiny_dir, controlnets, monkeypatch):
    """The preview plans with the ControlNet's weights and activations, as the engine's plan does."""
    from zturbo.loader import resolve_model
    from zturbo.memory import plan

    shapes = []
    choose = plan.choose
    monkeypatch.setattr(plan, "choose", lambda shape, *a, **k: shapes.append(shape) or choose(shape, *a, **k))
    code, out, _ = run(capsys, "info", "--device", "cpu", "--model", tiny_dir, "--controlnet", controlnets["2.1"],
                       "--plan", "--vram-budget", "8")  # fmt: skip
    assert code == 0 and shapes and "not counted" not in out
    engine_shape = plan.shape_from_source(resolve_model(str(tiny_dir), weights=False), str(controlnets["2.1"]))
    assert shapes[0] == engine_shape and shapes[0].controlnet_params > 0
