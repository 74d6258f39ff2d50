import io

import numpy as np
import pytest
import torch
from PIL import Image
from pixel_parity import CLIP_MEAN, CLIP_STD, ODD_SIZES, noise

from minillava.images import ImageError, ImageTransform, load_image


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize("mode", ["L", "LA", "P", "RGBA", "CMYK", "I;16", "1"])
def test_modes_become_rgb(mode):
    img = Image.new(mode, (10, 6))
    assert load_image(img).mode == "RGB"


def test_16bit_scaled_not_clipped():
    img = Image.new("I;16", (8, 8))
    img.putdata([i * 1000 for i in range(64)])
    out = np.asarray(load_image(img))
    assert out.max() == 255 and out.min() == 0


def test_transparent_becomes_white():
    img = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    assert load_image(img).getpixel((0, 0)) == (255, 255, 255)


def test_exif_orientation_is_applied(tmp_path):
    img = Image.new("RGB", (20, 10), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    path = tmp_path / "rot.jpg"
    img.save(path, exif=exif)
    assert load_image(path).size == (10, 20)


def test_bad_files_name_the_file(tmp_path):
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    with pytest.raises(ImageError, match="empty.png"):
        load_image(empty)
    junk = tmp_path / "junk.jpg"
    junk.write_bytes(b"not an image at all")
    with pytest.raises(ImageError, match="junk.jpg: not a readable image"):
        load_image(junk)
    truncated = tmp_path / "cut.png"
    truncated.write_bytes(_png(Image.new("RGB", (64, 64), (1, 2, 3)))[:60])
    with pytest.raises(ImageError, match="cut.png"):
        load_image(truncated)
    with pytest.raises(ImageError, match="missing.png: cannot open"):
        load_image(tmp_path / "missing.png")


def test_pixel_limit_refuses_bombs():
    data = _png(Image.new("RGB", (200, 200)))
    with pytest.raises(ImageError, match="over the limit of 1000"):
        load_image(data, name="bomb.png", max_pixels=1000)
    assert load_image(data, max_pixels=200 * 200).size == (200, 200)


def test_pad_mode_fills_with_mean_colour_and_keeps_whole_image():
    t = ImageTransform(size=8, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), aspect="pad")
    x = t(Image.new("RGB", (8, 4), (255, 255, 255)))  # wide white image -> bands of mean colour
    assert x.shape == (3, 8, 8)
    assert torch.allclose(x[:, 0, :], torch.full((3, 8), 127 / 255 / 0.5 - 1), atol=1e-6)  # mean band
    assert torch.allclose(x[:, 4, :], torch.ones(3, 8), atol=1e-6)  # white middle


def test_center_crop_and_resize_modes():
    img = Image.new("RGB", (30, 10))
    img.paste((255, 0, 0), (0, 0, 10, 10))  # red left third: cropped away by center_crop
    crop = ImageTransform(size=10, mean=(0, 0, 0), std=(1, 1, 1), aspect="center_crop")(img)
    assert crop.shape == (3, 10, 10) and crop[0].max() < 0.1
    resized = ImageTransform(size=10, mean=(0, 0, 0), std=(1, 1, 1), aspect="resize")(img)
    assert resized[0, :, 0].min() > 0.9  # red survives at the left edge


def test_clip_statistics_come_from_the_tower(tmp_path):
    (tmp_path / "preprocessor_config.json").write_text(
        '{"image_mean": [0.48, 0.45, 0.4], "image_std": [0.26, 0.26, 0.27]}'
    )
    t = ImageTransform.from_dir(tmp_path, 224, "pad")
    assert t.mean == (0.48, 0.45, 0.4) and t.std == (0.26, 0.26, 0.27)
    with pytest.raises(ValueError, match="aspect"):
        ImageTransform(aspect="stretch")


def test_a_tower_without_normalisation_statistics_is_an_error_not_imagenet(tmp_path):
    with pytest.raises(ValueError, match="no preprocessor_config.json: the vision tower's image_mean / image_std"):
        ImageTransform.from_dir(tmp_path, 224, "pad")
    (tmp_path / "preprocessor_config.json").write_text('{"crop_size": 224}')
    with pytest.raises(ValueError, match="needs image_mean and image_std"):
        ImageTransform.from_dir(tmp_path, 224, "pad")


# ---- pixel parity with transformers' own image processors -------------------------------------------------------
# Both sides resize with PIL's bicubic on the same uint8 image and crop the same pixels, so the only difference left
# is float32 arithmetic: transformers rescales by x * (1/255) then normalises, we divide by 255. That is a few ulps of
# values in [-2.2, 2.7] (~1e-6); 1e-5 allows that and nothing else: one resized pixel off by a single grey level
# moves a value by 1/255/0.27 = 0.015, and the old rounding of the long side (64 x 48 -> 299 x 224, transformers
# 298 x 224) differed by up to 0.95.
PIXEL_TOL = 1e-5


def _hf_processor(transform: ImageTransform, backend: str):
    """The transformers image processor that export writes for `transform`, built from that very config."""
    import transformers

    from minillava.interop.hf import _image_processor_dict

    cfg = _image_processor_dict(transform, None)
    name = cfg.pop("image_processor_type") + ("Pil" if backend == "pil" else "")
    cls = getattr(transformers, name, None)
    if cls is None:
        module = "clip" if name.startswith("CLIP") else "llava"
        cls = getattr(__import__(f"transformers.models.{module}", fromlist=[name]), name, None)
    if cls is None:
        pytest.skip(f"this transformers has no {name}")
    return cls(**cfg)


# the torchvision back end: tests/torchvision_backend/test_pixel_parity.py (torchvision needs its own environment)
@pytest.mark.parametrize("backend", ["pil"])
@pytest.mark.parametrize("aspect", ["center_crop", "resize", "pad"])
@pytest.mark.parametrize("width, height", ODD_SIZES)
def test_pixels_equal_transformers_processors_on_odd_sizes(width, height, aspect, backend):
    transform = ImageTransform(224, CLIP_MEAN, CLIP_STD, aspect)
    hf = _hf_processor(transform, backend)
    img = noise(width, height)
    expected = torch.as_tensor(np.asarray(hf(img, return_tensors="pt")["pixel_values"][0]))
    ours = transform(img)
    assert ours.shape == expected.shape == (3, 224, 224)
    diff = (ours - expected).abs().max().item()
    assert diff <= PIXEL_TOL, f"{width}x{height} {aspect} ({backend}): max |diff| {diff}"


@pytest.mark.parametrize(
    "width, height, resized",
    [
        (64, 48, (298, 224)),
        (48, 64, (224, 298)),
        (37, 101, (224, 611)),
        (4000, 3, (298666, 224)),
        (1, 500, (224, 112000)),
    ],
)
def test_shortest_edge_resize_floors_the_long_side_like_transformers(width, height, resized):
    from minillava.images import shortest_edge_size

    assert shortest_edge_size((width, height), 224) == resized


# ---- the torchvision resize back end (its parity with transformers: tests/torchvision_backend/) ------------------


def test_torchvision_resize_backend_is_torchs_uint8_antialiased_bicubic():
    img = noise(64, 48)
    ours = ImageTransform(32, (0.0,) * 3, (1 / 255,) * 3, "resize", resize_backend="torchvision")(img)
    x = torch.from_numpy(np.array(img)).permute(2, 0, 1)[None]
    expected = torch.nn.functional.interpolate(x, size=(32, 32), mode="bicubic", antialias=True, align_corners=False)
    assert torch.equal(ours.round().to(torch.uint8), expected[0])
    pil = ImageTransform(32, (0.0,) * 3, (1 / 255,) * 3, "resize", resize_backend="pil")(img)
    assert (pil - ours).abs().max() >= 1  # the back ends differ by whole grey levels on noise


def test_resize_backend_survives_save_and_load(asset_dir, tmp_path):
    from minillava.config import ModelConfig, VisionConfig
    from minillava.model import MiniLlava
    from minillava.processor import Processor

    cfg = ModelConfig(vision=VisionConfig(source=str(asset_dir("vision", "clip"))),
                      llm_source=str(asset_dir("llm", "llama")), resize_backend="torchvision")  # fmt: skip
    model, processor = MiniLlava.build(cfg)
    model.save_pretrained(tmp_path, processor)
    assert Processor.from_pretrained(tmp_path).image_transform.resize_backend == "torchvision"
    with pytest.raises(ValueError, match="resize_backend must be one of"):
        ImageTransform(32, aspect="resize", resize_backend="cv2")


@pytest.mark.parametrize(("image_processor_type", "backend"),
                         [("CLIPImageProcessorFast", "torchvision"), ("CLIPImageProcessor", "pil"),
                          ("CLIPImageProcessorPil", "pil")])  # fmt: skip
def test_import_reads_the_resize_backend_from_the_processor_class(image_processor_type, backend, tmp_path):
    from minillava.interop.hf import _image_transform

    cfg = {"image_processor_type": image_processor_type, "image_mean": CLIP_MEAN, "image_std": CLIP_STD,
           "size": {"shortest_edge": 32}, "crop_size": {"height": 32, "width": 32}}  # fmt: skip
    assert _image_transform(cfg, 32, tmp_path).resize_backend == backend


@pytest.mark.parametrize(("key", "value"), [("resample", 2), ("rescale_factor", 1 / 256), ("do_normalize", False),
                                            ("do_resize", False), ("do_convert_rgb", False)])  # fmt: skip
def test_import_refuses_an_image_processor_it_would_not_reproduce(key, value, tmp_path):
    from minillava.interop.hf import _image_transform

    cfg = {"image_processor_type": "CLIPImageProcessor", "image_mean": CLIP_MEAN, "image_std": CLIP_STD,
           "size": {"shortest_edge": 32}, "crop_size": {"height": 32, "width": 32}, key: value}  # fmt: skip
    with pytest.raises(ValueError, match=f"{tmp_path}: the image processor sets {key}="):
        _image_transform(cfg, 32, tmp_path)
