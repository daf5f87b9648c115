"""Pictures: grids, boxes, PNG/GIF files, image loading and the glimpses' colours."""
import imageio.v3 as iio
import numpy as np
import pytest
from PIL import Image

from npdraw.images import (ImageNotFoundError, draw_box, image_grid, load_image, save_frames,
                           save_gif, save_png, to_uint8, upscale)


def test_to_uint8_clips_and_rounds():
    a = np.array([-0.5, 0.0, 0.5, 1.0, 2.0, np.nan], np.float32)
    assert to_uint8(a).tolist() == [0, 0, 128, 255, 255, 0]
    assert to_uint8(a).dtype == np.uint8
    u = np.array([3, 4], np.uint8)
    assert to_uint8(u).tolist() == [3, 4] and to_uint8(u) is not u


def test_grid_shape_and_placement():
    C, H, W, rows, cols, pad = 1, 4, 3, 2, 3, 2
    imgs = np.zeros((5, C * H * W), np.float32)
    imgs[4] = 1.0                                      # the known image: all white
    g = image_grid(imgs, (C, H, W), rows, cols, pad=pad, pad_value=0.5)
    assert g.shape == (rows * (H + pad) + pad, cols * (W + pad) + pad, 3) and g.dtype == np.uint8
    r, c = divmod(4, cols)
    y, x = pad + r * (H + pad), pad + c * (W + pad)
    assert (g[y:y + H, x:x + W] == 255).all()
    assert (g[pad:pad + H, pad:pad + W] == 0).all()   # image 0 is black
    assert (g[:pad] == 128).all() and (g[:, :pad] == 128).all()
    # The sixth cell is empty and filled with pad_value.
    y, x = pad + 1 * (H + pad), pad + 2 * (W + pad)
    assert (g[y:y + H, x:x + W] == 128).all()
    # Outside the known image (and its pad frame) there is no white.
    mask = np.ones(g.shape[:2], bool)
    mask[pad + (H + pad):pad + (H + pad) + H, pad + (W + pad):pad + (W + pad) + W] = False
    assert not (g[mask] == 255).any()


def test_grid_rgb_channel_order():
    img = np.zeros((3, 2, 2), np.float32)
    img[0] = 1.0                                       # red channel
    g = image_grid(img.reshape(1, -1), (3, 2, 2), 1, 1, pad=0)
    assert (g[..., 0] == 255).all() and (g[..., 1:] == 0).all()


def test_grid_errors():
    with pytest.raises(ValueError, match="do not fit"):
        image_grid(np.zeros((7, 4)), (1, 2, 2), 2, 3)
    with pytest.raises(ValueError, match="C=2"):
        image_grid(np.zeros((1, 8)), (2, 2, 2), 1, 1)
    with pytest.raises(ValueError, match="shape"):
        image_grid(np.zeros((1, 5)), (1, 2, 2), 1, 1)


def test_draw_box_outline_and_input_unchanged():
    canvas = np.full((10, 12, 3), 50, np.uint8)
    before = canvas.copy()
    out = draw_box(canvas, 2.4, 3.6, 8.5, 7.0)         # rounds to x 2..9, y 4..7
    assert np.array_equal(canvas, before)
    red = (out == (255, 0, 0)).all(axis=2)
    expect = np.zeros((10, 12), bool)
    expect[4, 2:10] = expect[7, 2:10] = True
    expect[4:8, 2] = expect[4:8, 9] = True
    assert np.array_equal(red, expect)
    assert (out[~expect] == 50).all()


def test_draw_box_clipped():
    out = draw_box(np.zeros((6, 6, 3), np.uint8), -3, 2, 10, 20, color=(0, 255, 0))
    green = (out == (0, 255, 0)).all(axis=2)
    expect = np.zeros((6, 6), bool)
    expect[2, :] = True                                # the only edges inside the picture
    assert np.array_equal(green, expect)
    assert not draw_box(np.zeros((4, 4, 3), np.uint8), 10, 10, 20, 20).any()


def test_upscale():
    a = np.arange(6, dtype=np.uint8).reshape(2, 3)
    b = upscale(a, 3)
    assert b.shape == (6, 9) and b[4, 7] == a[1, 2] and b.dtype == np.uint8
    assert upscale(np.zeros((2, 2, 3), np.uint8), 2).shape == (4, 4, 3)
    with pytest.raises(ValueError, match="factor"):
        upscale(a, 0)


def test_png_round_trip(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    save_png(tmp_path / "a.png", rgb)
    assert np.array_equal(iio.imread(tmp_path / "a.png"), rgb)
    with pytest.raises(ValueError, match="uint8"):
        save_png(tmp_path / "b.png", rgb.astype(np.float32))
    with pytest.raises(ValueError, match="does not exist"):
        save_png(tmp_path / "missing" / "c.png", rgb)


def test_gif_round_trip_frame_count(tmp_path):
    rng = np.random.default_rng(0)
    canvas = image_grid(rng.random((4, 64)), (1, 8, 8), 2, 2)
    # Identical consecutive frames (Pillow alone would merge them) and colour frames.
    frames = [canvas, canvas, draw_box(canvas, 1, 1, 6, 6), canvas, np.zeros_like(canvas)]
    path = tmp_path / "anim.gif"
    save_gif(path, frames, duration=0.05)
    back = iio.imread(path, index=...)
    assert back.shape[0] == len(frames)
    for f, b in zip(frames, back):
        assert np.abs(b[..., :3].astype(int) - f).max() <= 1
    im = Image.open(path)
    assert im.n_frames == len(frames) and im.info["loop"] == 0 and im.info["duration"] == 50


def test_gif_grey_frames_and_errors(tmp_path):
    frames = [np.full((6, 5), v, np.uint8) for v in (0, 0, 1, 255)]
    save_gif(tmp_path / "g.gif", frames, duration=[0.1, 0.1, 0.1, 1.0], loop=None)
    back = iio.imread(tmp_path / "g.gif", index=...)
    assert back.shape[0] == 4
    assert [int(b[..., 0].max()) for b in back] == [0, 0, 1, 255]
    with pytest.raises(ValueError, match="frame 1 has shape"):
        save_gif(tmp_path / "x.gif", [np.zeros((2, 2), np.uint8), np.zeros((3, 2), np.uint8)])
    with pytest.raises(ValueError, match="at least one frame"):
        save_gif(tmp_path / "x.gif", [])


def _write_pil(path, array, mode):
    Image.fromarray(array, mode).save(path)


def test_load_image_modes(tmp_path):
    rng = np.random.default_rng(1)
    grey = rng.integers(0, 256, (4, 5), dtype=np.uint8)
    rgb = rng.integers(0, 256, (4, 5, 3), dtype=np.uint8)
    rgba = np.concatenate([rgb, np.full((4, 5, 1), 9, np.uint8)], axis=2)
    Image.fromarray(grey).save(tmp_path / "g.png")
    Image.fromarray(rgb).save(tmp_path / "c.png")
    Image.fromarray(rgba).save(tmp_path / "a.png")
    pal = Image.new("P", (3, 2))
    pal.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    pal.putpixel((1, 1), 1)
    pal.save(tmp_path / "p.png")

    g = load_image(tmp_path / "g.png")
    assert g.shape == (1, 4, 5) and g.dtype == np.float32
    np.testing.assert_allclose(g[0], grey / 255.0, rtol=1e-6)
    c = load_image(tmp_path / "c.png")
    assert c.shape == (3, 4, 5)
    np.testing.assert_allclose(c, rgb.transpose(2, 0, 1) / 255.0, rtol=1e-6)
    a = load_image(str(tmp_path / "a.png"))
    assert a.shape == (3, 4, 5)
    np.testing.assert_allclose(a, c)
    p = load_image(tmp_path / "p.png")
    assert p.shape == (3, 2, 3)
    assert p[:, 0, 0].tolist() == [1.0, 0.0, 0.0] and p[:, 1, 1].tolist() == [0.0, 0.0, 1.0]


def test_load_image_errors(tmp_path):
    with pytest.raises(ValueError, match="nothere.png.*does not exist") as info:
        load_image(tmp_path / "nothere.png")
    assert isinstance(info.value, FileNotFoundError) and isinstance(info.value, ImageNotFoundError)
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"this is not a picture at all" * 10)
    with pytest.raises(ValueError, match="bad.png is not an image"):
        load_image(bad)


@pytest.mark.parametrize("suffix", ["png", "gif"])
def test_a_picture_that_fails_to_write_leaves_the_old_one_whole(tmp_path, monkeypatch, suffix):
    """A full disk in the middle of writing (simulated: half the bytes, then ENOSPC)
    keeps the picture that was there, and leaves no temporary file behind."""
    import errno

    from npdraw import images
    save = save_png if suffix == "png" else (lambda p, a: save_gif(p, [a, 255 - a]))
    path = tmp_path / f"samples.{suffix}"
    old = np.zeros((6, 5), np.uint8)
    save(path, old)
    before = path.read_bytes()

    class HalfWrite:
        def __init__(self, name, mode):
            self.fh = open(name, mode)

        def write(self, data):
            self.fh.write(data[:len(data) // 2])
            raise OSError(errno.ENOSPC, "No space left on device")

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.fh.close()
    monkeypatch.setattr(images, "open", HalfWrite, raising=False)
    with pytest.raises(OSError, match="No space"):
        save(path, np.full((6, 5), 200, np.uint8))
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]


def test_save_frames_writes_every_frame_a_thinned_gif_with_the_last_held_and_the_last_png(
        tmp_path):
    frames = [np.full((4, 5, 3), 40 * t, np.uint8) for t in range(5)]
    (tmp_path / "frame_007.png").write_bytes(b"stale")
    width = save_frames(tmp_path, frames, "anim", duration=0.1, hold=2.0, every=2)
    assert width == 3 and sorted(p.name for p in tmp_path.glob("frame_*.png")) == [
        f"frame_{t:03d}.png" for t in range(5)]
    assert np.array_equal(iio.imread(tmp_path / "anim.png"), frames[-1])
    gif = iio.imread(tmp_path / "anim.gif", index=None)
    assert [int(f[0, 0, 0]) for f in gif] == [40, 120, 160]       # frames 2, 4 and the last
    with Image.open(tmp_path / "anim.gif") as im:
        delays = []
        for i in range(im.n_frames):
            im.seek(i)
            delays.append(im.info["duration"])
    assert delays == [100, 100, 2100]
    with pytest.raises(ValueError, match="every"):
        save_frames(tmp_path, frames, "anim", duration=0.1, every=0)
