import re
import warnings
from io import BytesIO

import numpy as np
import pytest
import torch
from PIL import Image

from dualtoken import ImageError
from dualtoken.io import BackgroundSaver, list_images, load_image, resize_center_crop, save_image, to_uint8


def gradient(width=40, height=30):
    x = np.linspace(0, 255, width, dtype=np.float32)[None, :, None]
    y = np.linspace(0, 255, height, dtype=np.float32)[:, None, None]
    return np.concatenate([np.broadcast_to(x, (height, width, 1)), np.broadcast_to(y, (height, width, 1)),
                           np.full((height, width, 1), 128, np.float32)], axis=2).astype(np.uint8)


def test_rgb_round_trip_is_exact(tmp_path):
    array = gradient()
    Image.fromarray(array).save(tmp_path / "a.png")
    image = load_image(tmp_path / "a.png")
    assert image.shape == (3, 30, 40) and image.min() >= -1 and image.max() <= 1
    assert np.array_equal(to_uint8(image), array)


def test_resize_shortest_side_and_centre_crop(tmp_path):
    Image.fromarray(gradient(80, 40)).save(tmp_path / "wide.png")
    assert load_image(tmp_path / "wide.png", (32, 32)).shape == (3, 32, 32)
    cropped = resize_center_crop(Image.new("RGB", (100, 50)), (20, 30))
    assert cropped.size == (30, 20)


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "I;16", "LA", "CMYK"])
def test_any_mode_becomes_rgb(tmp_path, mode):
    rgb = Image.fromarray(gradient())
    if mode == "I;16":
        image = Image.fromarray(np.asarray(rgb.convert("L"), dtype=np.uint16) * 257)
        assert image.mode.startswith("I")
    else:
        image = rgb.convert(mode)
    path = tmp_path / ("x.tiff" if mode == "CMYK" else "x.png")
    image.save(path)
    tensor = load_image(path, (16, 16))
    assert tensor.shape == (3, 16, 16) and torch.isfinite(tensor).all()
    if mode == "I;16":  # 16-bit scaled to the same brightness as 8-bit
        expected = load_image(_save(rgb.convert("L"), tmp_path / "l.png"), (16, 16))
        assert (tensor - expected).abs().max() < 0.02


def _save(image, path):
    image.save(path)
    return path


def test_exif_rotation_is_applied(tmp_path):
    image = Image.fromarray(gradient(40, 30))
    exif = image.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    image.save(tmp_path / "r.jpg", exif=exif)
    assert load_image(tmp_path / "r.jpg").shape == (3, 40, 30)


def test_transparent_pixels_become_white(tmp_path):
    Image.new("RGBA", (4, 4), (0, 0, 0, 0)).save(tmp_path / "t.png")
    assert torch.allclose(load_image(tmp_path / "t.png"), torch.ones(3, 4, 4))


def test_corrupt_truncated_and_missing_files(tmp_path):
    (tmp_path / "bad.png").write_bytes(b"not an image")
    with pytest.raises(ImageError, match="not a readable image"):
        load_image(tmp_path / "bad.png")
    Image.fromarray(gradient()).save(tmp_path / "ok.jpg")
    data = (tmp_path / "ok.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError):
        load_image(tmp_path / "cut.jpg")
    with pytest.raises(ImageError, match="not found"):
        load_image(tmp_path / "none.png")
    (tmp_path / "zero.jpg").write_bytes(b"")
    for source, name in ((tmp_path / "zero.jpg", str(tmp_path / "zero.jpg")), (BytesIO(), "upload")):
        with pytest.raises(ImageError, match=re.escape(f"{name}: empty file (0 bytes); expected an image file")):
            load_image(source)
    with pytest.raises(ImageError, match="not a folder"):
        list_images(tmp_path / "none")


def test_to_uint8_rounds_and_clamps(tmp_path):
    values = torch.tensor([-2.0, -1.0, 0.0, 0.999, 1.5]).view(1, 1, 5).expand(3, 1, 5)
    assert to_uint8(values)[0, :, 0].tolist() == [0, 0, 128, 255, 255]
    save_image(values, tmp_path / "v.png")
    assert np.asarray(Image.open(tmp_path / "v.png")).shape == (1, 5, 3)


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_token_files_and_model_weights_follow_the_umask(umask, tiny_tokenizer, tmp_path):
    import os

    from dualtoken.tokenfile import save_tokens

    codes = torch.zeros(1, 8, 8, 4, dtype=torch.long)
    previous = os.umask(umask)
    try:
        token_file = save_tokens(tmp_path / "t.safetensors", codes, codes, ["a"], "dualtoken-tiny", (256, 256))
        model = tiny_tokenizer.save_pretrained(tmp_path / "model")
        save_image(torch.zeros(3, 8, 8), tmp_path / "image.png")
    finally:
        os.umask(previous)
    expected = 0o666 & ~umask
    for path in (token_file, model / "model.safetensors", model / "config.json", tmp_path / "image.png"):
        assert path.stat().st_mode & 0o777 == expected, f"{path.name}: {oct(path.stat().st_mode & 0o777)}"


def test_an_image_enlarged_more_than_twice_is_named_in_a_warning(tmp_path):
    from dualtoken.io import UpscaledImageWarning

    Image.new("RGB", (50, 40)).save(tmp_path / "small.png")
    with pytest.warns(UpscaledImageWarning, match=r"small.png \(50x40\) upscaled 2.5x to 100x100"):
        assert load_image(tmp_path / "small.png", (100, 100)).shape == (3, 100, 100)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_image(tmp_path / "small.png", (80, 80))  # 2x exactly: no warning


def test_background_saver_writes_every_image_and_raises_a_failed_write(tmp_path):
    images = [np.full((8, 8, 3), 10 * i, dtype=np.uint8) for i in range(5)]
    with BackgroundSaver(pending=2) as saver:
        for i, image in enumerate(images):
            saver.save(image, tmp_path / f"{i}.png")
    for i, image in enumerate(images):
        assert np.array_equal(np.asarray(Image.open(tmp_path / f"{i}.png")), image)
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    with pytest.raises(OSError):
        with BackgroundSaver() as saver:
            saver.save(images[0], blocker / "inside.png")  # its folder is a file: the write fails, and says so
    assert not list(tmp_path.glob(".*tmp*"))  # nothing half-written left behind


def test_pngs_are_written_fast_and_lossless_and_other_formats_still_save(tmp_path):
    from dualtoken.io import PNG_COMPRESS_LEVEL, png_bytes, sample_photos

    photo = sample_photos()[0][1][:256, :256]  # uint8 (256, 256, 3)
    save_image(photo, tmp_path / "photo.png")
    assert np.array_equal(np.asarray(Image.open(tmp_path / "photo.png")), photo)
    assert Image.open(BytesIO(png_bytes(photo))).tobytes() == photo.tobytes()
    Image.fromarray(photo).save(tmp_path / "default.png")  # Pillow's default zlib level, 6
    fast, default = (tmp_path / "photo.png").stat().st_size, (tmp_path / "default.png").stat().st_size
    assert PNG_COMPRESS_LEVEL < 6 and fast < 1.15 * default
    save_image(photo, tmp_path / "photo.jpg")
    assert Image.open(tmp_path / "photo.jpg").format == "JPEG"


def test_read_ahead_keeps_order_reads_on_another_thread_and_raises_in_place():
    import threading

    from dualtoken.io import read_ahead

    threads = []

    def produce(fail_at=None):
        for i in range(5):
            threads.append(threading.current_thread().name)
            if i == fail_at:
                raise ImageError(f"item {i} is unreadable")
            yield i

    assert list(read_ahead(produce())) == [0, 1, 2, 3, 4]
    assert all(name.startswith("dualtoken-read") for name in threads)
    got = []
    with pytest.raises(ImageError, match="item 3 is unreadable"):
        for item in read_ahead(produce(fail_at=3)):
            got.append(item)
    assert got == [0, 1, 2]
    threads.clear()
    early = read_ahead(produce())
    assert next(early) == 0
    early.close()  # stops with at most one item read ahead
    assert len(threads) <= 2
