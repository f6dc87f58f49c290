"""Image files of every PIL mode decode to the right 8-bit RGB, through the package's one decoder
(``simclr.data.images.open_rgb``) and every path built on it: the datasets, the fast loader's decoding,
and ``simclr embed`` in a real process. References are computed by hand from the arrays the files were
written from, never by the decoder under test."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import run_cli
from simclr import checkpoint as ckpt_lib
from simclr.data import get_dataset
from simclr.data.fast import decode_batch
from simclr.data.images import open_rgb
from tests.checkpoint.test_hostile_files import tiny_encoder_payload

H, W = 24, 32


def gradient16() -> np.ndarray:
    """A 16-bit grey ramp over the whole range, with a second ramp down the rows (every high byte)."""
    x = np.linspace(0, 65535, W)[None, :] * np.linspace(0.1, 1, H)[:, None]
    return np.rint(x).astype(np.uint16)


def grey3(a: np.ndarray) -> np.ndarray:
    return np.repeat(a[..., None], 3, axis=2)


def few_colours(rng) -> np.ndarray:
    """An RGB picture of 12 colours (a palette holds it without loss)."""
    colours = rng.integers(0, 256, (12, 3), dtype=np.uint8)
    return colours[rng.integers(0, 12, (H, W))]


def write_files(folder) -> dict:
    """name -> (file, expected uint8 RGB array computed by hand)."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    a16 = gradient16()
    for name, fmt in (("grey16.png", "PNG"), ("grey16.tif", "TIFF"), ("grey16.pgm", "PPM")):
        Image.fromarray(a16).save(folder / name, format=fmt)
        out[name] = grey3(a16 >> 8)  # the high byte
    rgb = few_colours(rng)
    pal = Image.fromarray(rgb).quantize(colors=16, method=Image.Quantize.MEDIANCUT)
    lut = np.asarray(pal.getpalette(), dtype=np.uint8).reshape(-1, 3)
    assert np.array_equal(lut[np.asarray(pal)], rgb)  # the palette holds the picture exactly
    pal.save(folder / "palette.png")
    out["palette.png"] = rgb
    pal.info["transparency"] = bytes([0, 255, 128] + [255] * 13)
    pal.save(folder / "palette_transparent.png", transparency=pal.info["transparency"])
    out["palette_transparent.png"] = rgb  # alpha dropped: every pixel keeps its palette colour
    grey, alpha = rng.integers(0, 256, (H, W), dtype=np.uint8), rng.integers(0, 256, (H, W), dtype=np.uint8)
    Image.fromarray(np.stack([grey, alpha], 2), "LA").save(folder / "la.png")
    out["la.png"] = grey3(grey)
    rgba = rng.integers(0, 256, (H, W, 4), dtype=np.uint8)
    Image.fromarray(rgba, "RGBA").save(folder / "rgba.png")
    out["rgba.png"] = rgba[..., :3]
    cmyk = rng.integers(0, 256, (H, W, 4), dtype=np.uint8)
    Image.fromarray(cmyk, "CMYK").save(folder / "cmyk.tif")
    c, k = cmyk[..., :3].astype(np.float64), cmyk[..., 3:].astype(np.float64)
    out["cmyk.tif"] = np.rint((255 - c) * (255 - k) / 255).astype(np.uint8)
    bits = rng.integers(0, 2, (H, W)).astype(bool)
    Image.fromarray(bits).save(folder / "bilevel.png")
    out["bilevel.png"] = grey3(bits.astype(np.uint8) * 255)
    f = rng.random((H, W)).astype(np.float32)
    Image.fromarray(f, "F").save(folder / "float.tif")
    out["float.tif"] = grey3(np.rint(f.astype(np.float64) * 255).astype(np.uint8))
    return out


def test_every_mode_decodes_to_its_8_bit_rgb(tmp_path):
    files = write_files(tmp_path)
    # the fault itself: PIL's own conversion clips the 16-bit file to (nearly) all white
    with Image.open(tmp_path / "grey16.png") as im:
        assert im.mode in ("I;16", "I") and (np.asarray(im.convert("RGB")) == 255).mean() > 0.95
    for name, want in files.items():
        got = np.asarray(open_rgb(tmp_path / name))
        assert got.dtype == np.uint8 and got.shape == (H, W, 3), name
        assert np.abs(got.astype(int) - want.astype(int)).max() <= 1, name
    assert len(np.unique(np.asarray(open_rgb(tmp_path / "grey16.png"))[..., 0])) > 200  # the whole range


def test_the_fast_loaders_decoding_and_the_datasets_use_the_same_decoder(tmp_path):
    files = write_files(tmp_path / "train" / "a")
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
    for name, mode in (("cmyk.jpg", "CMYK"), ("grey.jpg", "L"), ("rgb.jpg", "RGB")):  # JPEGs: decode_jpeg
        Image.fromarray(rgb).convert(mode).save(tmp_path / "train" / "a" / name, quality=95)
        files[name] = None
    ds = get_dataset("folder", "pretrain", str(tmp_path), image_size=32)
    paths = [str(p) for p in ds.files]
    items = [torch.from_numpy(np.fromfile(p, dtype=np.uint8)) for p in paths]
    decoded = decode_batch(items, torch.device("cpu"))
    for i, (path, t) in enumerate(zip(paths, decoded)):
        ref = np.asarray(open_rgb(path))
        assert t.dtype == torch.uint8, path
        assert np.abs(t.permute(1, 2, 0).numpy().astype(int) - ref.astype(int)).max() <= 1, path
        assert np.array_equal(np.asarray(ds.load(i)), ref), path
        name = path.rsplit("/", 1)[1]
        if files[name] is not None:
            assert np.abs(ref.astype(int) - files[name].astype(int)).max() <= 1, name


@pytest.fixture
def encoder_ckpt(tmp_path):
    path = tmp_path / "ck" / "checkpoint-00000001.pt"
    payload = tiny_encoder_payload()
    payload["image_size"] = 32
    ckpt_lib.save_checkpoint(path, payload)
    return path


def test_embed_features_of_a_16_bit_png_equal_those_of_its_8_bit_twin(tmp_path, data_root, encoder_ckpt):
    """Replay through the real CLI: a 16-bit grey PNG (values g * 257) and the 8-bit PNG g, a palette PNG
    and the RGB PNG of its colours, an all-white PNG (what the 16-bit file used to become)."""
    src = sorted((data_root / "cifar10" / "test" / "cat").iterdir())[0]
    with Image.open(src) as im:
        g = np.asarray(im.convert("L"))
        rgb = np.asarray(im.convert("RGB"))
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    Image.fromarray(g).save(imgs / "g8.png")
    Image.fromarray(g.astype(np.uint16) * 257).save(imgs / "g16.png")
    with Image.open(imgs / "g16.png") as im:
        assert im.mode in ("I;16", "I") and np.asarray(im).max() > 255  # really a 16-bit file
    pal = Image.fromarray(rgb).quantize(colors=64)
    pal.save(imgs / "p.png")
    lut = np.asarray(pal.getpalette(), dtype=np.uint8).reshape(-1, 3)
    Image.fromarray(lut[np.asarray(pal)]).save(imgs / "p_rgb.png")  # its colours, looked up by hand
    Image.fromarray(np.full_like(g, 255)).save(imgs / "white.png")
    r = run_cli("embed", "--encoder_ckpt", encoder_ckpt, "--images", imgs, "--out", tmp_path / "f.npy",
                "--device", "cpu")
    assert r.returncode == 0, r.stderr[-3000:]
    names = (tmp_path / "f.files.txt").read_text().split()
    feats = dict(zip(names, np.load(tmp_path / "f.npy")))
    assert sorted(names) == ["g16.png", "g8.png", "p.png", "p_rgb.png", "white.png"]
    assert np.allclose(feats["g16.png"], feats["g8.png"], rtol=0, atol=1e-6)
    assert np.allclose(feats["p.png"], feats["p_rgb.png"], rtol=0, atol=1e-6)
    assert np.abs(feats["g16.png"] - feats["white.png"]).max() > 1e-3  # not the all-white image


# ------------------------------------------------------------------------------------------------
# (d) a JPEG's EXIF orientation was ignored: a phone's portrait photo was read sideways
# ------------------------------------------------------------------------------------------------
def _reference(raw: np.ndarray, orientation: int) -> np.ndarray:
    """The stored pixels (H, W, 3) as EXIF orientation says they are seen, by numpy's own flips and turns."""
    return {1: raw, 2: raw[:, ::-1], 3: raw[::-1, ::-1], 4: raw[::-1], 5: raw.transpose(1, 0, 2),
            6: np.rot90(raw, -1), 7: raw.transpose(1, 0, 2)[::-1, ::-1], 8: np.rot90(raw, 1)}[orientation]


def _photo(path: Path, orientation: int) -> np.ndarray:
    """A 24x16 JPEG (wider than high: a landscape as stored) tagged with ``orientation``; its stored pixels."""
    from PIL import Image
    rng = np.random.default_rng(orientation)
    blocks = rng.integers(0, 256, (3, 2, 3), dtype=np.uint8)  # 8x8 blocks: the JPEG keeps them nearly exact
    pixels = np.kron(blocks, np.ones((8, 8, 1), dtype=np.uint8))
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(pixels).save(path, quality=95, exif=exif.tobytes())
    with Image.open(path) as im:  # PIL decodes the stored pixels and ignores the tag
        return np.asarray(im.convert("RGB"))


@pytest.mark.parametrize("orientation", range(1, 9))
def test_a_jpeg_is_read_upright_as_its_exif_orientation_says(tmp_path, orientation):
    from simclr.data import get_dataset
    from simclr.data.fast import decode_batch
    from simclr.data.images import jpeg_orientation, open_rgb
    for split in ("train", "test"):
        for c in ("portrait", "landscape"):
            (tmp_path / split / c).mkdir(parents=True)
    raw = _photo(tmp_path / "train" / "portrait" / "phone.jpg", orientation)
    _photo(tmp_path / "train" / "landscape" / "plain.jpg", 1)
    want = _reference(raw, orientation)
    path = tmp_path / "train" / "portrait" / "phone.jpg"
    assert jpeg_orientation(path.read_bytes()) == orientation
    assert np.array_equal(np.asarray(open_rgb(path)), want)  # the one decoder
    data = torch.frombuffer(bytearray(path.read_bytes()), dtype=torch.uint8)
    (fast,) = decode_batch([data], torch.device("cpu"))  # the fast loader's batched JPEG decoder
    assert np.array_equal(fast.permute(1, 2, 0).numpy(), want)
    ds = get_dataset("folder", "train", str(tmp_path), 0)  # a dataset of such files (embed, eval, pretrain)
    assert ds.classes == ["landscape", "portrait"] and ds.targets == [0, 1]  # image 1 is the phone's
    assert np.array_equal(np.asarray(ds.load(1)), want)
