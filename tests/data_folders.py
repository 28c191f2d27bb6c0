"""Generated ImageFolder trees for the data tests (no files from ../shared)."""
from __future__ import annotations

import numpy as np
from PIL import Image

RED, BLUE = (230, 20, 20), (20, 20, 230)


def _rgb(size, color):
    return Image.new("RGB", size, color)


def write_mixed_folder(root, broken: bool = True):
    """train/ and val/ with classes red, blue; sizes 40..120 px; every format compress decodes.

    Per class and split: RGB JPEG, RGB PNG, 16-bit grayscale PNG, palette PNG, RGBA PNG,
    CMYK JPEG, grayscale JPEG, BMP, WEBP (9 files). With ``broken``, two undecodable files
    in train/: red/broken.jpg (text) and blue/broken.png (a PNG signature and nothing else).
    """
    sizes = [(40, 40), (120, 90), (64, 48), (50, 100), (80, 80), (96, 60), (44, 120), (70, 70), (100, 56)]
    for split in ("train", "val"):
        for cls, color in (("red", RED), ("blue", BLUE)):
            d = root / split / cls
            d.mkdir(parents=True, exist_ok=True)
            s = iter(sizes)
            _rgb(next(s), color).save(d / "a_rgb.jpg", quality=95)
            _rgb(next(s), color).save(d / "b_rgb.png")
            gray16 = np.full(next(s)[::-1], 0x8000 if cls == "red" else 0x2000, dtype=np.uint16)
            Image.fromarray(gray16).save(d / "c_gray16.png")
            _rgb(next(s), color).convert("P", palette=Image.Palette.ADAPTIVE, colors=4).save(d / "d_palette.png")
            rgba = _rgb(next(s), color).convert("RGBA")
            rgba.putalpha(128)
            rgba.save(d / "e_rgba.png")
            cmyk = (0, 230, 230, 0) if cls == "red" else (230, 230, 0, 0)
            Image.new("CMYK", next(s), cmyk).save(d / "f_cmyk.jpg", quality=95)
            _rgb(next(s), color).convert("L").save(d / "g_gray.jpg", quality=95)
            _rgb(next(s), color).save(d / "h_rgb.bmp")
            _rgb(next(s), color).save(d / "i_rgb.webp", quality=95)
    if broken:
        (root / "train" / "red" / "broken.jpg").write_text("this is text, not a JPEG")
        (root / "train" / "blue" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    return root


def write_uniform_folder(root, size: int, mode: str = "RGB", per_class: int = 6, classes: int = 2, seed: int = 0):
    """A learnable uniform-size folder: class k is a bright blob in a class-specific corner, plus noise."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", per_class), ("val", max(2, per_class // 2))):
        for k in range(classes):
            d = root / split / f"c{k}"
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                arr = rng.integers(0, 60, (size, size, 3), dtype=np.uint8)
                q = size // 2
                y0, x0 = (k // 2) * q, (k % 2) * q
                arr[y0:y0 + q, x0:x0 + q] = 220
                img = Image.fromarray(arr)
                (img.convert("L") if mode == "L" else img).save(d / f"{i:03d}.png")
    return root
