"""The embedded default dataset: 10 classes of procedurally drawn shapes and textures.

    python -m data.demo_dataset --out datasets/shapes10

writes `<out>/train/<class>/*.png` and `<out>/val/<class>/*.png` (ImageFolder layout),
deterministic from --seed. Each image has a random background colour, random foreground colour,
random position/size/phase and pixel noise, so the classes must be learned from shape and
texture, not from colour. Chance is 10%.
"""
import argparse
import math
import os
import random

from PIL import Image, ImageDraw

CLASSES = ['circle', 'square', 'triangle', 'cross', 'ring',
           'h_stripes', 'v_stripes', 'diag_stripes', 'checker', 'dots']


def _colour(rng: random.Random, avoid=None):
    while True:
        c = tuple(rng.randint(0, 255) for _ in range(3))
        if avoid is None or sum(abs(a - b) for a, b in zip(c, avoid)) > 200:
            return c


def draw(cls: str, size: int, rng: random.Random) -> Image.Image:
    bg = _colour(rng)
    fg = _colour(rng, avoid=bg)
    img = Image.new('RGB', (size, size), bg)
    d = ImageDraw.Draw(img)
    r = rng.uniform(0.22, 0.4) * size
    cx, cy = rng.uniform(r, size - r), rng.uniform(r, size - r)
    period = rng.randint(4, 8)
    phase = rng.randint(0, period - 1)
    width = max(1, int(r / 3))
    if cls == 'circle':
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fg)
    elif cls == 'square':
        d.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fg)
    elif cls == 'triangle':
        a = rng.uniform(0, 2 * math.pi)
        d.polygon([(cx + r * math.cos(a + k * 2 * math.pi / 3), cy + r * math.sin(a + k * 2 * math.pi / 3))
                   for k in range(3)], fill=fg)
    elif cls == 'cross':
        d.rectangle([cx - r, cy - width, cx + r, cy + width], fill=fg)
        d.rectangle([cx - width, cy - r, cx + width, cy + r], fill=fg)
    elif cls == 'ring':
        d.ellipse([cx - r, cy - r, cx + r, cy + r], outline=fg, width=width)
    elif cls == 'h_stripes':
        for y in range(phase, size, period):
            d.line([(0, y), (size, y)], fill=fg, width=max(1, period // 2))
    elif cls == 'v_stripes':
        for x in range(phase, size, period):
            d.line([(x, 0), (x, size)], fill=fg, width=max(1, period // 2))
    elif cls == 'diag_stripes':
        for k in range(-size, 2 * size, period):
            d.line([(k, 0), (k + size, size)], fill=fg, width=max(1, period // 2))
    elif cls == 'checker':
        for y in range(0, size, period):
            for x in range(0, size, period):
                if ((x + y) // period + phase) % 2 == 0:
                    d.rectangle([x, y, x + period - 1, y + period - 1], fill=fg)
    elif cls == 'dots':
        for y in range(phase, size, period + 2):
            for x in range(phase, size, period + 2):
                d.ellipse([x - 1, y - 1, x + 1, y + 1], fill=fg)
    else:
        raise ValueError(cls)
    # pixel noise
    px = img.load()
    for _ in range(size * size // 8):
        x, y = rng.randrange(size), rng.randrange(size)
        px[x, y] = tuple(min(255, max(0, v + rng.randint(-60, 60))) for v in px[x, y])
    return img


def generate(out: str, train_per_class: int = 200, val_per_class: int = 50, size: int = 32, seed: int = 0) -> str:
    """Write the dataset under `out` (skipped if it is already complete); returns `out`."""
    marker = os.path.join(out, '.complete')
    if os.path.exists(marker):
        return out
    for split, n, split_seed in (('train', train_per_class, seed), ('val', val_per_class, seed + 1)):
        for ci, cls in enumerate(CLASSES):
            folder = os.path.join(out, split, cls)
            os.makedirs(folder, exist_ok=True)
            rng = random.Random(f'{split_seed}-{ci}')
            for i in range(n):
                draw(cls, size, rng).save(os.path.join(folder, f'{cls}_{i:05d}.png'))
    with open(marker, 'w') as f:
        f.write(f'{train_per_class} {val_per_class} {size} {seed}\n')
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--out', default='datasets/shapes10')
    p.add_argument('--train-per-class', type=int, default=200)
    p.add_argument('--val-per-class', type=int, default=50)
    p.add_argument('--size', type=int, default=32)
    p.add_argument('--seed', type=int, default=0)
    a = p.parse_args()
    generate(a.out, a.train_per_class, a.val_per_class, a.size, a.seed)
    print(f'demo dataset in {a.out}: {len(CLASSES)} classes, '
          f'{a.train_per_class * len(CLASSES)} train / {a.val_per_class * len(CLASSES)} val images')


if __name__ == '__main__':
    main()
