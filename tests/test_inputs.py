"""Input images without a model: decoding and its refusals (`inputs.images`), the request's rules
for them (`inputs.spec` through `GenerateRequest.create`), and the pixel work (`inputs.prepare`),
checked against diffusers' own preprocessing where it has one."""

from __future__ import annotations

import io
import os
import struct
import warnings
import zlib

import numpy as np
import pytest
import torch
from diffusers.image_processor import VaeImageProcessor
from PIL import Image

from zturbo.errors import FieldError
from zturbo.inputs.images import MAX_INPUT_BYTES, decode_image, from_pil, read_image
from zturbo.inputs.prepare import CANNY_HIGH, dilate, paste_back, prepare
from zturbo.inputs.spec import check_inputs
from zturbo.request import LIMITS, GenerateRequest, ModelLimits

MODEL = ModelLimits(spatial_unit=16, max_pixels=1024 * 1024)
CONTROLNET = ModelLimits(spatial_unit=16, max_pixels=1024 * 1024, control_in_dim=33)
RNG = np.random.default_rng(23)


def encode(image: Image.Image, fmt: str = "PNG", **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def noise(width: int, height: int, mode: str = "RGB") -> Image.Image:
    channels = {"RGB": 3, "RGBA": 4}.get(mode)
    shape = (height, width) if channels is None else (height, width, channels)
    return Image.fromarray(RNG.integers(0, 256, shape, dtype=np.uint8))


def png(width: int = 64, height: int = 64, mode: str = "RGB") -> bytes:
    return encode(noise(width, height, mode))


def request(**fields: object) -> GenerateRequest:
    limits = fields.pop("limits", MODEL)
    return GenerateRequest.create("a fox", limits=limits, seed=1, steps=fields.pop("steps", 8), **fields)


def with_header_size(data: bytes, width: int, height: int) -> bytes:
    """A PNG whose IHDR claims another size (its CRC recomputed), the pixel data left as it is."""
    ihdr = data[12:16] + struct.pack(">II", width, height) + data[24:29]
    return data[:12] + ihdr + struct.pack(">I", zlib.crc32(ihdr)) + data[33:]


def refusal(call, *args, **kwargs) -> FieldError:
    with pytest.raises(FieldError) as info:
        call(*args, **kwargs)
    return info.value


# ---------------------------------------------------------------------------------------------
# Decoding: orientation and modes


def test_exif_orientation_is_applied():
    """Orientation 6 (the camera was turned clockwise): the left half of the stored pixels is the top."""
    stored = Image.new("RGB", (64, 32), (0, 0, 255))
    stored.paste((255, 0, 0), (0, 0, 32, 32))
    exif = Image.Exif()
    exif[0x0112] = 6
    decoded = decode_image(encode(stored, "JPEG", exif=exif.tobytes(), quality=95), "image", "photo.jpg").image
    assert decoded.size == (32, 64)
    pixels = np.asarray(decoded).astype(int)
    assert pixels[:32, :, 0].mean() > 200 and pixels[:32, :, 2].mean() < 50  # red on top
    assert pixels[32:, :, 2].mean() > 200 and pixels[32:, :, 0].mean() < 50


def test_alpha_is_kept_only_when_something_is_transparent():
    opaque = noise(8, 8, "RGBA")
    opaque.putalpha(255)
    assert decode_image(encode(opaque), "image", "a.png").image.mode == "RGB"
    cutout = opaque.copy()
    cutout.putpixel((3, 3), (1, 2, 3, 254))
    decoded = decode_image(encode(cutout), "image", "a.png").image
    assert decoded.mode == "RGBA" and decoded.getpixel((3, 3)) == (1, 2, 3, 254)
    assert from_pil(Image.new("LA", (4, 4), (90, 255)), "mask").image.mode == "L"
    assert from_pil(Image.new("LA", (4, 4), (90, 0)), "mask").image.getpixel((0, 0)) == (90, 90, 90, 0)


def test_palette_images_become_rgb_or_rgba():
    palette = Image.new("P", (4, 4), 1)
    palette.putpalette([0, 0, 0, 200, 10, 20] + [0] * 762)
    palette.putpixel((0, 0), 0)
    plain = decode_image(encode(palette), "image", "p.png").image
    assert plain.mode == "RGB" and plain.getpixel((1, 1)) == (200, 10, 20)
    see_through = decode_image(encode(palette, transparency=0), "image", "p.png").image
    assert see_through.mode == "RGBA"
    assert see_through.getpixel((0, 0))[3] == 0 and see_through.getpixel((1, 1)) == (200, 10, 20, 255)


def test_sixteen_bit_and_float_images_scale_to_eight_bits():
    """value / 257 for 16 bits (Pillow's own conversion clips 30000 to 255), value x 255 for float."""
    deep = np.array([[0, 257 * 100, 30000, 32896, 65535]], dtype=np.uint16)
    decoded = decode_image(encode(Image.fromarray(deep)), "mask", "depth16.png").image
    assert decoded.mode == "L" and np.asarray(decoded).tolist() == [[0, 100, 117, 128, 255]]
    big_endian = from_pil(Image.frombytes("I;16B", (5, 1), deep.astype(">u2").tobytes()), "mask").image
    assert np.asarray(big_endian).tolist() == [[0, 100, 117, 128, 255]]
    wide = np.array([[-5, 0, 65535, 70000]], dtype=np.int32)
    assert np.asarray(from_pil(Image.fromarray(wide), "mask").image).tolist() == [[0, 0, 255, 255]]
    floats = np.array([[0.0, 0.25, 1.0, 2.0]], dtype=np.float32)
    tiff = decode_image(encode(Image.fromarray(floats), "TIFF"), "control_image", "f.tif").image
    assert np.asarray(tiff).tolist() == [[0, 64, 255, 255]]


def test_other_modes_become_rgb_or_l():
    cmyk = decode_image(encode(Image.new("CMYK", (8, 8), (0, 255, 255, 0)), "JPEG"), "image", "c.jpg").image
    assert cmyk.mode == "RGB" and np.allclose(cmyk.getpixel((4, 4)), (255, 0, 0), atol=3)
    bilevel = from_pil(Image.new("1", (4, 4), 1), "mask").image
    assert bilevel.mode == "L" and bilevel.getpixel((0, 0)) == 255
    lab = from_pil(Image.new("LAB", (4, 4), (128, 128, 128)), "image").image  # L* 50, a = b = 0: mid grey
    assert lab.mode == "RGB" and np.allclose(lab.getpixel((0, 0)), (119, 119, 119), atol=2)
    assert from_pil(Image.new("YCbCr", (4, 4), (128, 128, 128)), "image").image.mode == "RGB"


def test_a_pil_image_is_hashed_by_its_pixels_alone():
    image = noise(16, 16)
    first = from_pil(image, "image")
    image.info["icc_profile"] = b"not part of the pixels"
    assert from_pil(image, "image").sha256 == first.sha256 and first.data == b""
    assert first.image.tobytes() == image.tobytes()
    other = image.copy()
    other.putpixel((3, 5), (0, 0, 0))
    assert from_pil(other, "image").sha256 != first.sha256
    # The same bytes in another shape or mode are other pixels.
    assert from_pil(image.convert("L"), "mask").sha256 != from_pil(image.convert("L").resize((8, 32)), "mask").sha256


# ---------------------------------------------------------------------------------------------
# Decoding: refusals


def test_a_decompression_bomb_is_refused_from_its_header():
    """A 1x1 PNG claiming more pixels than allowed: refused by size, never decoded, with no
    warning and with Pillow's process-wide limit and the warning filters left as they were."""
    tiny = encode(Image.new("RGB", (1, 1)))
    limit, filters = Image.MAX_IMAGE_PIXELS, list(warnings.filters)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        huge = refusal(decode_image, with_header_size(tiny, 30000, 30000), "image", "bomb.png")
        above_pillow = refusal(decode_image, with_header_size(tiny, 10000, 10000), "image", "bomb.png")
        ours = refusal(decode_image, with_header_size(tiny, 9000, 9000), "image", "bomb.png")
    assert caught == []
    assert (Image.MAX_IMAGE_PIXELS, warnings.filters) == (limit, filters)
    assert str(huge) == f"image bomb.png is 900000000 pixels; allowed at most {LIMITS.input_pixels}"
    assert str(above_pillow) == f"image bomb.png is 100000000 pixels; allowed at most {LIMITS.input_pixels}"
    assert str(ours) == f"image bomb.png is 9000x9000 = 81000000 pixels; allowed at most {LIMITS.input_pixels}"
    assert huge.field == "image"


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "mask m.png is empty (0 bytes)"),
        (RNG.integers(0, 256, 4096, dtype=np.uint8).tobytes(), "mask m.png is not an image Pillow can read"),
        (png()[:300], "mask m.png is damaged or truncated: image file is truncated"),
        (encode(noise(64, 64), "JPEG")[:400], "mask m.png is damaged or truncated"),
        (png()[:20], "mask m.png is damaged or truncated: Truncated File Read"),
    ],
    ids=["empty", "random-bytes", "truncated-png", "truncated-jpeg", "cut-header"],
)
def test_damaged_files_are_refused_by_name(data, message):
    error = refusal(decode_image, data, "mask", "m.png")
    assert str(error).startswith(message) and error.field == "mask"
    assert "\n" not in str(error)


@pytest.mark.parametrize("fmt", ["GIF", "PNG", "WEBP"])
def test_animated_images_are_refused(fmt):
    frames = [Image.new("RGB", (8, 8), colour) for colour in ("red", "blue")]
    data = encode(frames[0], fmt, save_all=True, append_images=frames[1:])
    assert str(refusal(decode_image, data, "image", "a")) == "image a is animated (2 frames); give a still image"
    assert "animated" in str(refusal(from_pil, Image.open(io.BytesIO(data)), "image"))


def test_too_many_bytes_are_refused_before_reading(tmp_path):
    data = png(8, 8)
    error = refusal(decode_image, data, "image", "up", max_bytes=len(data) - 1)
    assert str(error) == f"image up is {len(data)} bytes; allowed at most {len(data) - 1}"
    large = tmp_path / "large.png"
    with large.open("wb") as f:
        f.truncate(MAX_INPUT_BYTES + 1)  # sparse: nothing is written or read
    expected = f"image {large} is {MAX_INPUT_BYTES + 1} bytes; allowed at most {MAX_INPUT_BYTES}"
    assert str(refusal(read_image, large, "image")) == expected
    assert LIMITS.input_bytes == MAX_INPUT_BYTES


def test_read_image_names_the_path(tmp_path):
    assert str(refusal(read_image, tmp_path / "nope.png", "image")) == f"image {tmp_path / 'nope.png'}: no such file"
    assert str(refusal(read_image, tmp_path, "mask")) == f"mask {tmp_path} is a directory, not an image file"
    good = tmp_path / "ok.png"
    good.write_bytes(png(16, 16))
    read = read_image(str(good), "image")
    assert read.name == str(good) and read.size == (16, 16) and read.data == good.read_bytes()
    if os.geteuid() != 0:  # root reads any file
        good.chmod(0)
        assert str(refusal(read_image, good, "image")).startswith(f"image {good} cannot be read: Permission denied")


# ---------------------------------------------------------------------------------------------
# The request's rules


def test_an_image_sets_the_request_size():
    req = request(image=png(64, 48))
    assert (req.width, req.height, req.inputs.mode, req.inputs.strength) == (64, 48, "img2img", 0.6)
    grown = request(image=png(32, 32), outpaint="16,0,0,32")
    assert (grown.width, grown.height, grown.inputs.mode, grown.inputs.strength) == (48, 64, "outpaint", 1.0)


def test_an_image_of_another_size_needs_resize():
    error = refusal(request, image=png(64, 48), width=64, height=64)
    assert error.field == "image"
    assert "image the image is 64x48 but the request is 64x64; give resize (crop|fit|stretch)" in str(error)
    for mode in ("crop", "fit", "stretch"):
        req = request(image=png(64, 48), width=32, height=64, resize=mode)
        prepared = prepare(req.inputs, req.width, req.height)
        assert prepared.image is not None and prepared.image.shape == (1, 3, 64, 32)


@pytest.mark.parametrize(
    ("size", "message"),
    [
        ({"width": -64, "height": 64}, "width -64 is below the minimum of 16"),
        ({"width": 64, "height": 8, "resize": "crop"}, "height 8 is below the minimum of 16"),
        ({"width": 72, "height": 64, "resize": "crop"}, "width 72 is not a multiple of 16"),
        ({"width": "64", "height": 64}, "width must be a whole number of pixels, got '64'"),
    ],
)
def test_a_bad_size_with_an_input_image_is_refused_as_the_size(size, message):
    """The size is checked before the inputs are fitted to it: not as an outpaint nobody asked for."""
    error = refusal(request, image=png(64, 64), **size)
    assert error.field in ("width", "height") and str(error).startswith(message)


def test_an_image_whose_size_is_no_multiple_of_the_unit_needs_a_size():
    error = refusal(request, image=png(60, 64))
    assert error.field == "image" and "is 60x64 (60x64), not a multiple of 16" in str(error)
    assert request(image=png(60, 64), width=64, height=64, resize="crop").width == 64


def test_the_mask_must_have_the_image_size():
    error = refusal(request, image=png(64, 64), mask=png(32, 64, "L"), resize="crop")
    assert str(error) == "mask the mask is 32x64 but image the image is 64x64"


@pytest.mark.parametrize(
    ("fields", "field", "message"),
    [
        ({"mask": png()}, "mask", "needs an input image (image) to repaint"),
        ({"strength": 0.5}, "strength", "strength 0.5 needs an input image (image)"),
        ({"image": png(), "mask": png(), "outpaint": "16,0,0,0"}, "outpaint", "give mask or outpaint, not both"),
        ({"image": png(), "paste_back": True}, "paste_back", "paste_back True needs a mask or outpaint"),
        ({"image": png(), "mask": png(), "mask_blur": 4}, "mask_blur", "mask_blur 4 needs paste_back"),
        ({"image": Image.new("RGBA", (64, 64), "red"), "mask": "alpha"}, "mask", "has no transparent pixels"),
        ({"control_scale": 0.5}, "control_scale", "needs a control image (control_image)"),
        ({"control_type": "canny"}, "control_type", "needs a control image (control_image)"),
        ({"control_end": 0.5}, "control_end", "needs a control image (control_image)"),
        ({"control_image": png()}, "control_image", "control_image needs a ControlNet; load one with --controlnet"),
        ({"image": png(), "strength": 1e-17}, "strength", "with 8 steps runs no denoising step"),
        ({"image": png(), "resize": "pad"}, "resize", "resize 'pad' is not one of crop, fit, stretch"),
    ],
)
def test_combinations_that_make_no_sense_are_refused(fields, field, message):
    error = refusal(request, **fields)
    assert error.field == field and message in str(error)


@pytest.mark.parametrize(
    ("limits", "fields", "field", "message"),
    [
        (ModelLimits(16, 1024 * 1024, control_in_dim=16), {"image": png(), "mask": png()}, "control_image",
         "this ControlNet (control_in_dim 16) has no inpaint input"),
        (CONTROLNET, {"control_start": 0.5, "control_end": 0.5}, "control_end",
         "control_end 0.5 must be above control_start 0.5"),
        (CONTROLNET, {"control_type": "depthmap"}, "control_type", "control_type 'depthmap' is not one of canny"),
        (CONTROLNET, {"image": png(), "mask": png(), "strength": 0.5}, "strength",
         "ControlNet inpaint starts from noise"),
        (CONTROLNET, {"steps": 2, "control_start": 0.5, "control_end": 0.6}, "control_start",
         "covers none of the 2 steps that run"),
        # img2img at 0.25 runs 2 of 8 steps: 0.6..1 of those two is none of them
        (CONTROLNET, {"image": png(), "strength": 0.25, "control_start": 0.6}, "control_start",
         "covers none of the 2 steps that run"),
    ],
)  # fmt: skip
def test_controlnet_combinations_that_make_no_sense_are_refused(limits, fields, field, message):
    error = refusal(request, limits=limits, control_image=png(), **fields)
    assert error.field == field and message in str(error)


def test_check_inputs_refuses_before_reading_the_sizes():
    """A control image without a ControlNet is refused even when its size would be wrong too."""
    image = from_pil(noise(48, 48), "control_image")
    error = refusal(check_inputs, steps=8, width=64, height=64, unit=16, control_in_dim=None, control_image=image)
    assert error.field == "control_image" and "needs a ControlNet" in str(error)


# ---------------------------------------------------------------------------------------------
# The pixel work


def diffusers_image(image: Image.Image, width: int, height: int) -> torch.Tensor:
    return VaeImageProcessor(vae_scale_factor=16).preprocess(image, height=height, width=width)


def diffusers_mask(mask: Image.Image, width: int, height: int) -> torch.Tensor:
    processor = VaeImageProcessor(vae_scale_factor=16, do_normalize=False, do_binarize=True, do_convert_grayscale=True)
    return processor.preprocess(mask, height=height, width=width)


def test_image_and_mask_are_diffusers_numbers_exactly():
    image, mask, control = noise(64, 48), noise(64, 48).convert("RGB"), noise(64, 48)
    req = request(image=image, mask=mask, control_image=control, limits=CONTROLNET)
    prepared = prepare(req.inputs, req.width, req.height)
    assert torch.equal(prepared.image, diffusers_image(image, 64, 48))
    assert torch.equal(prepared.mask, diffusers_mask(mask, 64, 48))
    assert torch.equal(prepared.control, diffusers_image(control, 64, 48))
    assert prepared.paste is None


def test_alpha_masks_repaint_where_transparent_and_init_alpha_is_flattened_on_white():
    alpha = np.zeros((32, 32), dtype=np.uint8)
    alpha[:, 16:] = 255
    alpha[0, 0], alpha[0, 16] = 127, 128  # the threshold: below 128 repaints
    rgba = np.dstack([np.full((32, 32, 3), 40, np.uint8), alpha])
    cutout = Image.fromarray(rgba)
    from_alpha = prepare(request(image=cutout, mask="alpha").inputs, 32, 32)
    repaint = alpha < 128
    assert torch.equal(from_alpha.mask[0, 0], torch.from_numpy(repaint.astype(np.float32)))
    assert torch.equal(from_alpha.image, diffusers_image(Image.new("RGB", (32, 32), (40, 40, 40)), 32, 32))
    mask_file = prepare(request(image=png(32, 32), mask=cutout).inputs, 32, 32)
    assert torch.equal(mask_file.mask, from_alpha.mask)
    flattened = prepare(request(image=cutout).inputs, 32, 32).image
    assert torch.equal(flattened[0, :, 5, 5], torch.ones(3))  # transparent: white
    assert torch.equal(flattened[0, :, 5, 20], torch.full((3,), 2 * 40 / 255 - 1))  # opaque: as it is


def one_pixel_mask(value: int, mode: str = "L") -> Image.Image:
    """A 32x32 mask, all black (or opaque) but one pixel: grey `value`, or alpha `value` for RGBA."""
    if mode == "RGBA":
        mask = Image.new("RGBA", (32, 32), (255, 255, 255, 200))  # partly transparent: alpha is kept
        mask.putpixel((3, 5), (255, 255, 255, value))
        return mask
    mask = Image.new(mode, (32, 32), 0)
    mask.putpixel((3, 5), value if mode == "L" else (value,) * 3)
    return mask


@pytest.mark.parametrize(
    ("mask", "message"),
    [
        (encode(Image.new("L", (32, 32), 0)), "mask the mask has no white pixels to repaint (grey 128 or above"),
        (encode(one_pixel_mask(127, "RGB")), "mask the mask has no white pixels to repaint"),
        (one_pixel_mask(128, "RGBA"), "mask the given image has no transparent pixels to repaint (alpha below 128"),
    ],
    ids=["black", "grey-127", "alpha-128"],
)
def test_a_mask_that_repaints_nothing_is_refused(mask, message):
    """An inpaint whose mask repaints no pixel would run every step and change nothing."""
    error = refusal(request, image=png(32, 32), mask=mask)
    assert error.field == "mask" and str(error).startswith(message)


def test_alpha_that_repaints_nothing_is_refused_like_an_opaque_image():
    partly = Image.new("RGBA", (32, 32), (40, 40, 40, 200))  # has alpha, but none below 128
    for image in (partly, Image.new("RGBA", (32, 32), "red")):
        error = refusal(request, image=image, mask="alpha")
        assert error.field == "mask" and "has no transparent pixels to repaint" in str(error)


@pytest.mark.parametrize(("value", "mode"), [(128, "L"), (128, "RGB"), (127, "RGBA")])
def test_the_door_and_the_mask_tensor_agree_on_one_repainted_pixel(value, mode):
    """At the threshold the door accepts exactly what `prepare` repaints: one pixel."""
    prepared = prepare(request(image=png(32, 32), mask=one_pixel_mask(value, mode)).inputs, 32, 32)
    assert prepared.mask.sum() == 1 and prepared.mask[0, 0, 5, 3] == 1


def test_fit_pads_the_image_by_edge_replication_and_keeps_the_padding():
    image = np.zeros((32, 64, 3), dtype=np.uint8)
    image[:, :, 1] = np.arange(64, dtype=np.uint8)[None, :] * 4
    mask = Image.new("L", (64, 32), 255)
    req = request(image=image_png(image), mask=mask, width=64, height=64, resize="fit")
    prepared = prepare(req.inputs, 64, 64)
    pixels = prepared.image[0]
    assert torch.equal(pixels[:, :16], pixels[:, 16:17].expand(-1, 16, -1))  # top band: the first row repeated
    assert torch.equal(pixels[:, 48:], pixels[:, 47:48].expand(-1, 16, -1))
    assert prepared.mask[0, 0, :16].sum() == 0 and prepared.mask[0, 0, 48:].sum() == 0
    assert bool(prepared.mask[0, 0, 16:48].all())


def image_png(pixels: np.ndarray) -> bytes:
    return encode(Image.fromarray(pixels))


def test_crop_keeps_the_centre_and_stretch_keeps_everything():
    bands = np.zeros((32, 64, 3), dtype=np.uint8)
    bands[:, :16, 0] = 255  # red | green | blue quarters
    bands[:, 16:48, 1] = 255
    bands[:, 48:, 2] = 255
    crop = prepare(request(image=image_png(bands), width=32, height=32, resize="crop").inputs, 32, 32).image
    assert torch.equal(crop[0, :, 4:28, 4:28], torch.tensor([-1.0, 1.0, -1.0])[:, None, None].expand(3, 24, 24))
    stretch = prepare(request(image=image_png(bands), width=32, height=32, resize="stretch").inputs, 32, 32).image
    assert stretch[0, 0, 16, 2] > 0.9 and stretch[0, 2, 16, 29] > 0.9  # the red and blue ends are still there


def test_outpaint_canvas_mask_and_padding():
    image = noise(32, 32)
    req = request(image=image, outpaint="16,0,0,16", mask_padding=4)
    assert (req.width, req.height) == (48, 48)
    prepared = prepare(req.inputs, 48, 48)
    pixels = ((prepared.image[0] + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()
    assert np.array_equal(pixels[:32, 16:], np.asarray(image))  # the image at (left, top)
    assert np.array_equal(pixels[:32, :16], np.repeat(pixels[:32, 16:17], 16, axis=1))  # edge replication
    assert np.array_equal(pixels[32:], np.repeat(pixels[31:32], 16, axis=0))
    mask = prepared.mask[0, 0].numpy().astype(bool)
    expected = np.ones((48, 48), dtype=bool)
    expected[:28, 20:] = False  # the original, less 4 pixels grown into it from the new area
    assert np.array_equal(mask, expected)


def test_mask_padding_grows_by_that_distance():
    mask = np.zeros((64, 64), dtype=bool)
    mask[30:34, 30:34] = True
    grown = dilate(mask, 6)
    rows, cols = np.nonzero(grown)
    assert (rows.min(), rows.max(), cols.min(), cols.max()) == (24, 39, 24, 39)
    assert not grown[24, 24] and grown[25, 27]  # a disc around the corner (5.8 pixels off), not a square
    assert np.array_equal(dilate(mask, 0), mask) and not dilate(np.zeros((8, 8), dtype=bool), 3).any()
    req = request(image=png(64, 64), mask=Image.fromarray(mask.astype(np.uint8) * 255), mask_padding=6)
    assert np.array_equal(prepare(req.inputs, 64, 64).mask[0, 0].numpy().astype(bool), grown)


def test_canny_control_is_binary_edges_in_three_equal_channels():
    square = np.zeros((64, 64, 3), dtype=np.uint8)
    square[16:48, 16:48] = 200
    req = request(control_image=image_png(square), control_type="canny", limits=CONTROLNET)
    control = prepare(req.inputs, 64, 64).control[0]
    assert set(control.unique().tolist()) == {-1.0, 1.0}
    assert torch.equal(control[0], control[1]) and torch.equal(control[1], control[2])
    edges = control[0] > 0
    assert edges[16:48, 15:17].any() and not edges[20:44, 20:44].any() and not edges[:10, :10].any()
    flat = request(control_image=Image.new("RGB", (64, 64), (CANNY_HIGH, 0, 0)), control_type="canny",
                   limits=CONTROLNET)  # fmt: skip
    assert bool((prepare(flat.inputs, 64, 64).control == -1).all())


def test_grayscale_control_becomes_three_channels_and_rgba_control_sits_on_black():
    gray = noise(32, 32, "L")
    control = prepare(request(control_image=gray, limits=CONTROLNET).inputs, 32, 32).control
    assert torch.equal(control, diffusers_image(gray.convert("RGB"), 32, 32))
    clear = prepare(request(control_image=Image.new("RGBA", (32, 32), (255, 255, 255, 0)), limits=CONTROLNET).inputs,
                    32, 32).control  # fmt: skip
    assert bool((clear == -1).all())


def test_paste_back_keeps_every_pixel_outside_the_mask_exactly():
    image = noise(64, 64)
    mask = np.zeros((64, 64), dtype=np.uint8)
    mask[16:48, 8:40] = 255
    req = request(image=image, mask=Image.fromarray(mask), paste_back=True, mask_blur=4, mask_padding=2)
    paste = prepare(req.inputs, 64, 64).paste
    generated = torch.from_numpy(RNG.integers(0, 256, (2, 64, 64, 3), dtype=np.uint8))
    out = paste_back(generated, paste)
    keep = paste.alpha[..., 0] == 0
    repaint = dilate(mask > 0, 2)
    assert torch.equal(keep, torch.from_numpy(~repaint))
    assert torch.equal(paste.original, torch.from_numpy(np.array(image)))
    assert torch.equal(out[:, keep], paste.original[keep].expand(2, -1, -1))
    inside = paste.alpha[..., 0] == 1
    assert bool(inside[32, 24]) and torch.equal(out[:, inside], generated[:, inside])
    feathered = (paste.alpha > 0) & (paste.alpha < 1)
    assert feathered.any() and not feathered[..., 0][32, 24]
    with pytest.raises(ValueError, match="paste_back takes"):
        paste_back(generated.float(), paste)


def test_paste_back_without_blur_is_the_hard_mask_and_outpaint_area_is_generated():
    hard = prepare(request(image=png(32, 32), mask=Image.new("L", (32, 32), 255), paste_back=True).inputs, 32, 32)
    assert bool((hard.paste.alpha == 1).all())
    full = request(image=png(32, 32), mask=Image.new("L", (32, 32), 255), paste_back=True, mask_blur=6)
    assert bool((prepare(full.inputs, 32, 32).paste.alpha == 1).all())  # no seam at the canvas' own edge
    req = request(image=png(32, 32), outpaint="0,16,0,0", paste_back=True, mask_blur=3, mask_padding=3)
    alpha = prepare(req.inputs, 48, 32).paste.alpha[..., 0]
    assert bool((alpha[:, 32:] == 1).all())  # the new area is all generated
    assert bool((alpha[:, :29] == 0).all())  # the original beyond the padding is kept
    assert bool(((alpha[:, 29:32] > 0) & (alpha[:, 29:32] < 1)).all())  # the seam fades
