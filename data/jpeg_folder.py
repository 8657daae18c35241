"""ImageNet-like JPEG folders on disk, for the input-pipeline tests and benchmarks.

`photo` draws a photo-like picture (smooth colour fields, edges, shapes and sensor-like noise) whose
baseline JPEG at quality 90 is about the size of an average ImageNet file (~110 KB at 500x375).
`generate` writes an ImageFolder tree `<root>/{train,val}/<class>/*.JPEG`; with messy=True each
class also holds the odd files ImageNet has: a grayscale JPEG, a CMYK JPEG, a progressive JPEG and
a PNG named .JPEG.

    python -m data.jpeg_folder --out datasets/jpeg --classes 10 --train-per-class 300
    python -m data.jpeg_folder --out datasets/shapes224 --demo-shapes --size 224   # learnable classes
"""
import argparse
import os
import random

import numpy as np
from PIL import Image, ImageDraw, ImageFilter


def photo(rng: np.random.Generator, width: int = 500, height: int = 375) -> Image.Image:
    """A photo-like RGB picture: low-frequency colour field + a few shapes + fine noise."""
    small = rng.uniform(0, 255, size=(max(2, height // 60), max(2, width // 60), 3)).astype(np.uint8)
    img = Image.fromarray(small).resize((width, height), Image.BICUBIC)
    d = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(3, 9))):
        x0, y0 = int(rng.integers(0, width)), int(rng.integers(0, height))
        x1, y1 = x0 + int(rng.integers(20, width // 2)), y0 + int(rng.integers(20, height // 2))
        fill = tuple(int(c) for c in rng.integers(0, 256, 3))
        (d.ellipse if rng.random() < 0.5 else d.rectangle)([x0, y0, x1, y1], fill=fill)
    img = img.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.5, 2.0))))
    arr = np.asarray(img).astype(np.int16)
    arr = arr + rng.normal(0, 22, size=arr.shape).astype(np.int16)          # texture / sensor noise
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def save_messy(img: Image.Image, folder: str, stem: str) -> list:
    """The odd files an ImageNet folder holds, all named .JPEG: grayscale, CMYK, progressive, PNG."""
    paths = []
    for kind in ('gray', 'cmyk', 'progressive', 'png'):
        path = os.path.join(folder, f'{stem}_{kind}.JPEG')
        if kind == 'gray':
            img.convert('L').save(path, 'JPEG', quality=90)
        elif kind == 'cmyk':
            img.convert('CMYK').save(path, 'JPEG', quality=90)
        elif kind == 'progressive':
            img.save(path, 'JPEG', quality=90, progressive=True)
        else:
            img.save(path, 'PNG')
        paths.append(path)
    return paths


def generate(root: str, classes: int = 10, train_per_class: int = 20, val_per_class: int = 5,
             width: int = 500, height: int = 375, messy: bool = True, seed: int = 0,
             demo_shapes: bool = False) -> str:
    """Write <root>/{train,val}/<class>/*.JPEG; returns root. demo_shapes: the demo's learnable
    shape classes (data/demo_dataset.py) drawn at width x width instead of random photos."""
    from .demo_dataset import CLASSES, draw
    rng = np.random.default_rng(seed)
    prng = random.Random(seed)
    names = list(CLASSES)[:classes] if demo_shapes else [f'n{i:08d}' for i in range(classes)]
    for split, count in (('train', train_per_class), ('val', val_per_class)):
        for cls in names:
            folder = os.path.join(root, split, cls)
            os.makedirs(folder, exist_ok=True)
            for i in range(count):
                img = draw(cls, width, prng) if demo_shapes else photo(rng, width, height)
                img.save(os.path.join(folder, f'{cls}_{i:05d}.JPEG'), 'JPEG', quality=90)
            if messy:
                save_messy(photo(rng, width, height), folder, f'{cls}_odd')
    return root


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--out', required=True)
    p.add_argument('--classes', type=int, default=10)
    p.add_argument('--train-per-class', type=int, default=300)
    p.add_argument('--val-per-class', type=int, default=50)
    p.add_argument('--size', type=int, nargs='+', default=[500, 375], help='width [height]')
    p.add_argument('--no-messy', action='store_true')
    p.add_argument('--demo-shapes', action='store_true')
    p.add_argument('--seed', type=int, default=0)
    a = p.parse_args()
    w, h = a.size[0], a.size[-1]
    generate(a.out, a.classes, a.train_per_class, a.val_per_class, w, h, not a.no_messy, a.seed, a.demo_shapes)


if __name__ == '__main__':
    main()
