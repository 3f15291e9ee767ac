"""Image modes to RGB, LLaVA's padding, the processor path, and replacement of an image that fails in training.
Real files written with PIL, a real CLIPImageProcessor."""
import numpy as np
import pytest
import torch
from PIL import Image
from transformers import CLIPImageProcessor

from lvlm_region.data.batches import ImageTextDataset, collate
from lvlm_region.model.families.llava import FixedImages
from lvlm_region.data.images import ImageLoader, expand_to_square, to_rgb


def reread(im, path, **kw):
    im.save(path, **kw)
    return Image.open(path)


def test_modes_convert_to_what_the_pixels_show(tmp_path):
    assert to_rgb(reread(Image.new("L", (8, 8), 100), tmp_path / "l.png")).getpixel((0, 0)) == (100, 100, 100)
    rgba = Image.new("RGBA", (8, 8), (10, 20, 30, 255))
    rgba.putpixel((1, 0), (10, 20, 30, 0))  # fully transparent: white, not the stored (10, 20, 30)
    rgba.putpixel((2, 0), (0, 0, 0, 128))  # half black over white
    got = to_rgb(reread(rgba, tmp_path / "a.png"))
    assert [got.getpixel((x, 0)) for x in range(3)] == [(10, 20, 30), (255, 255, 255), (127, 127, 127)]
    la = Image.new("LA", (8, 8), (0, 0))
    assert to_rgb(reread(la, tmp_path / "la.png")).getpixel((0, 0)) == (255, 255, 255)
    pal = Image.new("P", (8, 8), 1)
    pal.putpalette([0, 0, 0, 200, 10, 10] + [0] * 762)
    pal.putpixel((0, 0), 0)
    got = to_rgb(reread(pal, tmp_path / "p.png", transparency=0))
    assert (got.getpixel((0, 0)), got.getpixel((1, 0))) == ((255, 255, 255), (200, 10, 10))
    cmyk = Image.new("CMYK", (8, 8), (255, 0, 0, 0))
    assert to_rgb(reread(cmyk, tmp_path / "c.jpg", quality=100)).getpixel((0, 0)) == pytest.approx((0, 255, 255), abs=2)
    a16 = np.full((8, 8), 65535, dtype=np.uint16)
    a16[0, 0] = 257 * 100
    im16 = reread(Image.fromarray(a16), tmp_path / "g16.png")
    assert im16.mode.startswith("I")
    got = to_rgb(im16)
    assert (got.getpixel((0, 0)), got.getpixel((1, 0))) == ((100, 100, 100), (255, 255, 255))  # not clipped to 255


def test_expand_to_square_centres_on_the_fill():
    got = np.asarray(expand_to_square(Image.new("RGB", (4, 2), (250, 0, 0)), (1, 2, 3)))
    assert got.shape == (4, 4, 3)
    assert (got[[0, 3]] == (1, 2, 3)).all() and (got[[1, 2]] == (250, 0, 0)).all()


def processor():
    return CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16})


def test_pad_keeps_the_whole_image_square_crops_it(tmp_path):
    im = Image.new("RGB", (64, 32), (255, 0, 0))
    im.paste((0, 0, 255), (0, 0, 8, 32))  # a blue band at the left edge
    im.save(tmp_path / "wide.png")
    pad = ImageLoader(processor(), "pad")(str(tmp_path / "wide.png"))["pixel_values"][0]
    square = ImageLoader(processor(), "square")(str(tmp_path / "wide.png"))["pixel_values"][0]
    assert pad.shape == square.shape == (3, 16, 16)
    # pad: the top and bottom quarters are the processor's mean colour, which normalises to about 0
    assert pad[:, :2].abs().max() < 0.02 and pad[:, 5:11, 8:].mean(dim=(1, 2))[0] > 1.5
    assert pad[2, 8, 0] > 1.5  # the blue band survives at the left
    # square: a centre crop of the red middle, no padding and no blue
    assert square[0].min() > 1.5 and square[2].max() < -1.0


def test_an_image_that_fails_to_decode_is_replaced_by_the_next_sample_and_counted(tmp_path):
    Image.new("RGB", (16, 16), "red").save(tmp_path / "ok.png")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    rows = [{"id": "a", "images": ["ok.png"], "input_ids": [1, 9, 9, 2], "labels": [-100, -100, -100, 2]},
            {"id": "b", "images": ["broken.png"], "input_ids": [3, 9, 9, 4], "labels": [-100, -100, -100, 4]},
            {"id": "c", "images": [], "input_ids": [5, 6, 7], "labels": [-100, 6, 7]}]
    layout = FixedImages(image_token_id=9, n_image_tokens=2, image_size=16)
    ds = ImageTextDataset(rows, str(tmp_path), ImageLoader(processor(), "pad"), layout)
    item = ds[1]
    assert item["replaced"] == 1 and item["input_ids"].tolist() == [5, 6, 7] and "pixel_values" not in item
    batch = collate([ds[0], ds[1]], pad_token_id=0)
    assert batch["replaced"] == 1 and batch["real_images"] == 1 and batch["pixel_values"].shape == (1, 3, 16, 16)
    assert torch.equal(batch["input_ids"], torch.tensor([[1, 9, 9, 2], [5, 6, 7, 0]]))
