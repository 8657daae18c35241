"""Input pipelines on real JPEG files: upstream's recipe on a current Pillow, and the batched
pipeline (--data-pipeline gpu) against it: each op against Pillow, the parameter samplers against
timm's, whole images against the PIL recipe at the same parameters, messy files, main.py.

Tolerances (pixel values 0..255): colour ops are exact. Resampling differs from Pillow's: resize
uses torch's antialiased bicubic (mean |diff| < 0.5, max <= 8); the affine ops (rotate, shear,
translate) compute Pillow's own math: at most one level off, on under 0.1% of pixels.
"""
import argparse
import copy
import glob
import itertools
import os
import random
import re
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image, ImageEnhance, ImageOps

from conftest import DEVICE, ROOT
from config import ConfigError
from data.build import DataError, build_transform, posterize
from data.gpu_pipeline import OPS, PROGRAM, DeviceTransform, RawImages, TrainRecipe, aa_fill
from data.jpeg_folder import generate, photo
from test_train import DEMO_CFG, FAST, epoch_losses, result, run_main

TINY = os.path.join(ROOT, 'configs/swin/swin_tiny_patch4_window7_224.yaml')


@pytest.fixture(scope='module')
def jpeg_data(tmp_path_factory):
    """3 classes x (14 photo-like JPEGs + grey, CMYK, progressive, PNG-named-.JPEG) train, 3 + 4 val."""
    return generate(str(tmp_path_factory.mktemp('jpeg')), classes=3, train_per_class=14, val_per_class=3)


def _config(*opts, cfg=TINY, pipeline='gpu', data_path=''):
    from config import get_config
    return get_config(argparse.Namespace(cfg=cfg, opts=list(opts) or None, data_path=data_path,
                                         data_pipeline=pipeline))


def _tensor(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(img.convert('RGB')).copy()).permute(2, 0, 1).float()


def _ks_two_sample(a: np.ndarray, b: np.ndarray) -> tuple:
    """Two-sample Kolmogorov-Smirnov: (D, asymptotic p-value)."""
    both = np.sort(np.concatenate([a, b]))
    d = np.abs(np.searchsorted(np.sort(a), both, side='right') / len(a)
               - np.searchsorted(np.sort(b), both, side='right') / len(b)).max()
    lam = d * np.sqrt(len(a) * len(b) / (len(a) + len(b)))
    k = np.arange(1, 101)
    return d, float(np.clip(2 * np.sum((-1.) ** (k - 1) * np.exp(-2 * k ** 2 * lam ** 2)), 0, 1))


# ----------------------------------------------------------------------------- upstream's recipe
def test_zero_bit_posterize_is_black_on_every_pillow():
    img = photo(np.random.default_rng(0), 64, 48)
    assert np.asarray(posterize(img, 0)).max() == 0
    assert np.asarray(posterize(img.convert('L'), 0)).max() == 0
    assert np.array_equal(np.asarray(posterize(img, 3)), np.asarray(ImageOps.posterize(img, 3)))
    assert posterize(img, 8) is img


def test_every_shipped_config_recipe_runs_on_real_jpegs(jpeg_data):
    """Each shipped config's train and val transforms over every file of a messy JPEG folder, with
    their real augmentation; then the default recipe with magnitude raised to 10 so the 0-bit
    posterize that crashed Pillow 13 happens (seeded, counted)."""
    files = sorted(glob.glob(os.path.join(jpeg_data, 'train', '*', '*')))
    assert any(f.endswith('_cmyk.JPEG') for f in files) and any(f.endswith('_png.JPEG') for f in files)
    configs = sorted(glob.glob(os.path.join(ROOT, 'configs', '**', '*.yaml'), recursive=True))
    assert len(configs) >= 15
    for cfg_file in configs:
        cfg = _config(cfg=cfg_file, pipeline='pil')
        train, val = build_transform(True, cfg), build_transform(False, cfg)
        for f in files[:12]:
            img = Image.open(f).convert('RGB')
            assert train(img).shape == (3, cfg.DATA.IMG_SIZE, cfg.DATA.IMG_SIZE), cfg_file
            assert val(img).shape == (3, cfg.DATA.IMG_SIZE, cfg.DATA.IMG_SIZE), cfg_file

    cfg = _config('AUG.AUTO_AUGMENT', 'rand-m10-mstd0.5-inc1', pipeline='pil')
    train = build_transform(True, cfg)
    zero_bit_calls = []
    for op in train.transforms[2].ops:
        if op.aug_fn is posterize:
            op.aug_fn = lambda img, bits, **kw: (zero_bit_calls.append(bits) if bits <= 0 else None,
                                                 posterize(img, bits, **kw))[1]
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    images = [Image.open(f).convert('RGB') for f in files[:20]]
    for i in range(400):
        train(images[i % len(images)])
    assert zero_bit_calls, 'no 0-bit posterize drawn: raise the count'


# ----------------------------------------------------------------------------- ops against Pillow
@pytest.fixture(scope='module')
def photo_224():
    return photo(np.random.default_rng(1), 224, 200)


@pytest.mark.parametrize('op,arg,pil', [
    ('invert', 0, lambda im, a: ImageOps.invert(im)),
    ('autocontrast', 0, lambda im, a: ImageOps.autocontrast(im)),
    ('equalize', 0, lambda im, a: ImageOps.equalize(im)),
    ('posterize', 0, lambda im, a: posterize(im, a)),
    ('posterize', 3, lambda im, a: ImageOps.posterize(im, a)),
    ('posterize', 7, lambda im, a: ImageOps.posterize(im, a)),
    ('solarize', 97, lambda im, a: ImageOps.solarize(im, a)),
    ('solarize_add', 61, None),
    ('color', 0.3, lambda im, a: ImageEnhance.Color(im).enhance(a)),
    ('color', 1.8, lambda im, a: ImageEnhance.Color(im).enhance(a)),
    ('contrast', 0.2, lambda im, a: ImageEnhance.Contrast(im).enhance(a)),
    ('contrast', 1.9, lambda im, a: ImageEnhance.Contrast(im).enhance(a)),
    ('brightness', 0.4, lambda im, a: ImageEnhance.Brightness(im).enhance(a)),
    ('brightness', 1.7, lambda im, a: ImageEnhance.Brightness(im).enhance(a)),
    ('sharpness', 0.1, lambda im, a: ImageEnhance.Sharpness(im).enhance(a)),
    ('sharpness', 1.9, lambda im, a: ImageEnhance.Sharpness(im).enhance(a)),
])
def test_colour_op_is_pillows_exactly(photo_224, op, arg, pil):
    """Each op by the route the pipeline takes (DeviceTransform.apply: a lookup table for the
    per-pixel ops, a batched op for the rest), two images with different arguments at once."""
    from timm.data import auto_augment as aa
    other = photo_224.transpose(Image.ROTATE_180)
    arg2 = arg if op in ('invert', 'autocontrast', 'equalize') else (arg * 0.5 if isinstance(arg, float) else arg // 2)
    ref = [aa.solarize_add(im, a) if pil is None else pil(im, a) for im, a in ((photo_224, arg), (other, arg2))]
    x = torch.stack([_tensor(photo_224), _tensor(other)]).to(DEVICE)
    out = _transform().apply(op, x, torch.tensor([float(arg), float(arg2)], device=DEVICE)).cpu()
    for got, want in zip(out, ref):
        assert torch.equal(got, _tensor(want)), (op, arg, (got - _tensor(want)).abs().max())


def _transform() -> DeviceTransform:
    transform = DeviceTransform.__new__(DeviceTransform)
    transform.fill = aa_fill()
    return transform


@pytest.mark.parametrize('name,arg', [('rotate', 23.0), ('rotate', -29.5), ('shear_x', 0.21), ('shear_y', -0.27),
                                      ('translate_x_rel', -0.31), ('translate_y_rel', 0.4)])
def test_affine_op_is_close_to_pillow(photo_224, name, arg):
    from timm.data import auto_augment as aa
    fn = {'rotate': aa.rotate, 'shear_x': aa.shear_x, 'shear_y': aa.shear_y,
          'translate_x_rel': aa.translate_x_rel, 'translate_y_rel': aa.translate_y_rel}[name]
    ref = _tensor(fn(photo_224, arg, fillcolor=aa_fill(), resample=Image.BICUBIC))
    level = torch.tensor([arg], dtype=torch.float64, device=DEVICE)     # the pipeline's parameters are float64
    out = _transform().apply(name, _tensor(photo_224)[None].to(DEVICE), level)[0].cpu()
    diff = (out - ref).abs()
    # Pillow's math: equal but where float rounding puts a sum on the other side of an integer
    assert diff.max() <= 1 and (diff > 0).float().mean() < 1e-3, (name, diff.max(), (diff > 0).float().mean())


def test_affine_kernel_matches_reference():
    """The one-launch affine kernel against the float64 reference: several images of an odd size
    (more pixels than one program's block, a partial last block), rotate / shear / translate /
    identity / a transform that sends every pixel outside (all fill), and a far-outside point."""
    from kernels.affine_resample import affine_resample, affine_resample_ref
    from data.tensor_ops import affine_coefficients
    g = torch.Generator().manual_seed(3)
    h, w = 37, 45                                      # 1665 pixels: two blocks of 1024, the second partial
    x = torch.randint(0, 256, (6, 3, h, w), generator=g).float()
    m = torch.tensor([affine_coefficients('rotate', 23.0, w, h), affine_coefficients('shear_x', -0.3, w, h),
                      affine_coefficients('translate_y_rel', 0.37, w, h), [1, 0, 0, 0, 1, 0],
                      [1, 0, 500.0, 0, 1, 0], affine_coefficients('rotate', -171.0, w, h)], dtype=torch.float32)
    fill = (124, 116, 104)
    ref = affine_resample_ref(x, m, fill)
    out = affine_resample(x.to(DEVICE), m.to(DEVICE), fill).cpu()
    diff = (out - ref).abs()
    assert diff.max() <= 1 and (diff > 0).float().mean() < 1e-3, (diff.max(), (diff > 0).float().mean())
    assert torch.equal(out[3], x[3]) and (out[4] == torch.tensor(fill).view(3, 1, 1)).all()


def test_colour_ops_kernels_match_reference():
    """The three layer kernels against the per-op reference, every op code in one batch (geometric ops
    as AFFINE), more pixels than one program's block with a partial last block; flat images
    (autocontrast's hi == lo, equalize's step 0) and a two-value image too. Everything but sharpness
    and the affine ops is exact; sharpness may move a level where the reference's conv2d sums in
    another order, the affine ops where float rounding puts a sum on the other side of an integer."""
    from data import tensor_ops as T
    from kernels.colour_ops import AFFINE, CODES, NONE, SHARPNESS, colour_ops, colour_ops_ref
    g = torch.Generator().manual_seed(4)
    h, w = 33, 41                                     # 1353 pixels: two blocks of 1024, the second partial
    ops = ['invert', 'posterize', 'solarize', 'solarize_add', 'brightness', 'autocontrast', 'equalize',
           'color', 'contrast', 'sharpness', 'autocontrast', 'equalize', 'equalize', None, 'rotate', 'shear_y',
           'translate_x_rel', 'rotate']
    n = len(ops)
    x = torch.randint(0, 256, (n, 3, h, w), generator=g).float()
    x[5] = (x[5] * 0.3 + 40).floor()                  # autocontrast stretches a narrow range
    x[10] = 77.                                       # flat: autocontrast leaves it
    x[11] = 200.                                      # flat: equalize's step is 0
    x[12] = torch.where(x[12] > 128, 250., 3.)        # two values
    args = [0., 3., 100., 60., 1.4, 0., 0., 1.7, 0.3, 1.9, 0., 0., 0., 0., 23., -0.3, 0.37, -171.]
    code = torch.tensor([AFFINE if o in T.AFFINE_OPS else CODES[o] if o else NONE for o in ops])
    factor = torch.tensor(args, dtype=torch.float64)
    tables = torch.zeros(n, 256, dtype=torch.float64)
    matrix = torch.zeros(n, 6, dtype=torch.float64)
    for i, (o, a) in enumerate(zip(ops, args)):
        if o in T.TABLE_OPS:
            tables[i] = torch.from_numpy(T.lookup_table(o, a).astype(np.float64))
        if o in T.AFFINE_OPS:
            matrix[i] = torch.tensor(T.affine_coefficients(o, a, w, h))
    fill = (124, 116, 104)
    ref = colour_ops_ref(x, code, factor, tables, matrix, fill)
    out = colour_ops(x.to(DEVICE), code.to(DEVICE), factor.to(DEVICE), tables.to(DEVICE), matrix.to(DEVICE),
                     fill).cpu()
    near = (code == SHARPNESS) | (code == AFFINE)
    assert torch.equal(out[~near], ref[~near]), [ops[i] for i in range(n) if not torch.equal(out[i], ref[i])]
    diff = (out[near] - ref[near]).abs()
    assert diff.max() <= 1 and (diff > 0).float().mean() < 0.01, (diff.max(), (diff > 0).float().mean())
    assert not torch.equal(ref[9], x[9]) and torch.equal(out[13], x[13])   # sharpness did act; NONE is a copy
    fill_px = torch.tensor(fill, dtype=torch.float32).view(3, 1, 1)
    filled = (out[17] == fill_px).all(0)
    assert filled.float().mean() > 0.03 and torch.equal(filled, (ref[17] == fill_px).all(0))   # the corners


def test_augment_with_colour_kernels_equals_per_op_path(jpeg_data):
    """The train transform with RandAugment's layers through kernels/colour_ops.py (as on CUDA) and
    through the per-op torch path, on the same decoded batch and parameters: equal, but for sharpness
    and the affine ops (at most one level, rarely)."""
    from torchvision import datasets
    from data.gpu_pipeline import collate_raw
    cfg = _config('AUG.REPROB', '0.0', data_path=jpeg_data)
    source = datasets.ImageFolder(os.path.join(jpeg_data, 'train'))
    raw = RawImages(source, TrainRecipe(cfg), device_share=0.0)
    transform = DeviceTransform(raw, torch.device(DEVICE), 64, train=True)
    torch.manual_seed(6)
    random.seed(6)
    np.random.seed(6)
    decoded = transform.decode(*collate_raw([raw[i] for i in range(24)]))
    outs = {}
    for kernels in (False, True):
        transform.colour_kernels = kernels
        outs[kernels] = transform.finish(decoded)[0].cpu()
    diff = ((outs[True] - outs[False]).abs() * 255 * 0.226).round()          # back to ~pixel levels
    assert diff.max() <= 1 and (diff > 0).float().mean() < 0.01, (diff.max(), (diff > 0).float().mean())
    layers = decoded[2][:, PROGRAM::2][:, :raw.recipe.layers].long()
    colour = {OPS.index(n) for n in ('color', 'contrast', 'sharpness', 'equalize', 'autocontrast', 'invert',
                                     'posterize', 'solarize', 'solarize_add', 'brightness')}
    geometric = {OPS.index(n) for n in ('rotate', 'shear_x', 'shear_y', 'translate_x_rel', 'translate_y_rel')}
    assert sum(int(v) in colour for v in layers.flatten()) >= 10          # the batch exercises the kernels
    assert sum(int(v) in geometric for v in layers.flatten()) >= 4


def test_transform_with_normalize_erase_kernel_equals_torch_path(jpeg_data):
    """The train transform's normalisation and erasing through kernels/normalize_erase.py (as on
    CUDA) and through the torch ops, on the same decoded batch and parameters, every image erased (up
    to two rectangles): equal with 'const' erasing; with 'pixel', equal wherever the torch path did
    not erase (the fills are other draws), and the erased share the same. The val transform
    (normalisation only) is equal too."""
    from torchvision import datasets
    from data.gpu_pipeline import collate_raw
    source = datasets.ImageFolder(os.path.join(jpeg_data, 'train'))
    for mode in ('const', 'pixel'):
        cfg = _config('AUG.REPROB', '1.0', 'AUG.RECOUNT', '2', 'AUG.REMODE', mode, 'DATA.IMG_SIZE', '48',
                      data_path=jpeg_data)
        raw = RawImages(source, TrainRecipe(cfg), device_share=0.0)
        transform = DeviceTransform(raw, torch.device(DEVICE), 48, train=True)
        random.seed(8)
        decoded = transform.decode(*collate_raw([raw[i] for i in range(20)]))
        outs = {}
        for kernel in (False, True):
            transform.normalize_kernel = kernel
            outs[kernel] = transform.finish(decoded)[0].cpu()
        if mode == 'const':
            assert torch.equal(outs[True], outs[False])
        else:
            kept = (outs[True] == outs[False])
            assert 0.05 < 1 - kept.float().mean() < 0.8         # some erased, by both, in the same places
            fill = outs[True][~kept]
            assert (fill != 0).all() and abs(fill.mean()) < 0.1 and abs(fill.std() - 1) < 0.1    # N(0, 1) draws
            zeroed = DeviceTransform(raw, torch.device(DEVICE), 48, train=True)
            zeroed.recipe = copy.copy(raw.recipe)
            zeroed.recipe.erase_mode = 'const'
            const = zeroed.finish(decoded)[0].cpu()
            assert torch.equal(kept, (const != 0) | (outs[False] == 0))
    val = DeviceTransform(RawImages(source, None, device_share=0.0), torch.device(DEVICE), 48, train=False)
    items = collate_raw([val.dataset[i] for i in range(6)])
    outs = {}
    for kernel in (False, True):
        val.normalize_kernel = kernel
        outs[kernel] = val(*items)[0].cpu()
    assert torch.equal(outs[True], outs[False])


def _resize_batch(images, meta, size):
    """The pipeline's crop + resize: the Triton kernels on the GPU, the per-image reference on the
    CPU (as the pipeline runs them; the next test ties the kernels to the reference)."""
    from kernels.crop_resize import crop_resize_fwd, crop_resize_ref
    return (crop_resize_fwd if DEVICE == 'cuda' else crop_resize_ref)(images, meta, size)


def test_crop_resize_is_close_to_pillow():
    """Random-resized-crop boxes (down- and up-sampling; one flipped) and resize + centre crop, against
    Pillow."""
    big = photo(np.random.default_rng(2), 120, 90)
    S = 32
    boxes = [(10, 12, 90, 80), (0, 0, 120, 90), (50, 25, 70, 45)]          # left, top, right, bottom
    images = [_tensor(big).to(torch.uint8).to(DEVICE)] * 4
    meta = [[0, 90, 120, t, l, b - t, r - l, S, S, 0, 0, k == 2] for k, (l, t, r, b) in enumerate(boxes)]
    rh, rw = 36, int(36 * 120 / 90)                                           # Resize(36) + CenterCrop(32)
    meta.append([0, 90, 120, 0, 0, 90, 120, rh, rw, int(round((rh - S) / 2)), int(round((rw - S) / 2)), 0])
    out = _resize_batch(images, torch.tensor(meta), S).cpu()
    refs = [_tensor(big.crop(box).resize((S, S), Image.BICUBIC)) for box in boxes]
    refs[2] = refs[2].flip(-1)                                                # the third one flipped
    from torchvision import transforms
    refs.append(_tensor(transforms.CenterCrop(S)(transforms.Resize(36, interpolation=Image.BICUBIC)(big))))
    for got, ref, what in zip(out, refs, boxes + ['resize + centre crop']):
        diff = (got - ref).abs()
        assert diff.mean() < 0.5 and diff.max() <= 8, (what, diff.mean(), diff.max())


def test_crop_resize_kernels_match_reference():
    """The batched kernels against one F.interpolate per image: different image sizes in one batch,
    down- and up-sampling, odd sizes, a window inside a larger virtual image (the val path), some
    written flipped; each
    image stored CHW (nvJPEG's output), HWC (the workers' decode, read in place) or neither (a
    strided view, copied); the HWC images also as one Packed buffer."""
    from kernels.crop_resize import Packed, crop_resize_ref, pack
    g = torch.Generator().manual_seed(0)
    S = 24
    specs = [((37, 53), (3, 5, 30, 40), (S, S, 0, 0)), ((20, 16), (0, 0, 20, 16), (S, S, 0, 0)),
             ((90, 61), (10, 7, 11, 50), (S, S, 0, 0)), ((61, 90), (0, 0, 61, 90), (27, 39, 2, 8))]
    images, meta = [], []
    for layout in ('chw', 'hwc', 'strided'):
        for (H, W), box, window in specs:
            if layout == 'hwc':
                img = torch.randint(0, 256, (H, W, 3), generator=g, dtype=torch.uint8).to(DEVICE).permute(2, 0, 1)
            else:
                img = torch.randint(0, 256, (3, H, 2 * W if layout == 'strided' else W), generator=g,
                                    dtype=torch.uint8).to(DEVICE)[:, :, ::2 if layout == 'strided' else 1]
            images.append(img)
            meta.append([0, H, W, *box, *window, int(len(meta) % 3 == 1)])      # some flipped, in each layout
    assert pack(images)[2].tolist() == [0] * 4 + [1] * 4 + [0] * 4
    meta = torch.tensor(meta)
    out = torch.full((len(images), 3, S, S), float('nan'), device=DEVICE)
    from kernels.crop_resize import crop_resize_fwd
    crop_resize_fwd(images, meta, S, out=out)
    ref = crop_resize_ref(images, meta, S)
    diff = (out - ref).abs()
    # identical but where float rounding puts a value on the other side of a .5 boundary
    assert not out.isnan().any() and diff.max() <= 1 and (diff > 0).float().mean() < 1e-3, diff.max()
    # the HWC images as one Packed buffer (the workers' batches), an odd gap between two of them
    hwc = [img.permute(1, 2, 0).reshape(-1) for img in images[4:8]]
    hwc.insert(2, torch.zeros(7, dtype=torch.uint8, device=DEVICE))
    offsets = [0] + list(np.cumsum([t.numel() for t in hwc]))[:-1]
    packed = Packed(torch.cat(hwc), [int(o) for k, o in enumerate(offsets) if k != 2], [s[0] for s in specs])
    assert all(torch.equal(a, b) for a, b in zip(packed, images[4:8]))
    assert torch.equal(crop_resize_fwd(packed, meta[4:8], S), out[4:8])
    assert torch.equal(crop_resize_fwd(packed, meta[4:8].tolist(), S), out[4:8])   # rows as lists, as _resize passes


# ----------------------------------------------------------------------------- samplers against timm
def test_crop_boxes_and_flips_follow_upstreams_transform():
    """The crop boxes and flips our workers draw against those the transform upstream builds draws on
    the same ImageNet-sized picture (its RandomResizedCrop run for real, its sampler's boxes recorded):
    area fraction, aspect ratio and centre, two-sample Kolmogorov-Smirnov p > 1e-3 for each (on the CPU
    0.61, 0.84, 0.96, 0.59); the flip rate against its RandomHorizontalFlip's p within 4 sigma. Proven
    by drawing with scale 0.12-1 (area p = 9e-4), ratio 3/4-3/2 (5e-45) and a flip rate of 0.45."""
    from data.gpu_pipeline import BOX, FLIP
    upstream = build_transform(True, _config(pipeline='pil'))
    rrc, flip = upstream.transforms[0], upstream.transforms[1]
    img = photo(np.random.default_rng(3), 500, 375)
    theirs, draw = [], rrc.get_params
    rrc.get_params = lambda image, scale, ratio: theirs.append(draw(image, scale, ratio)) or theirs[-1]
    random.seed(4)
    torch.manual_seed(4)
    n = 2000
    for _ in range(n):
        rrc(img)
    recipe = TrainRecipe(_config())
    rows = [recipe.sample(img) for _ in range(n)]
    ours = [tuple(int(v) for v in r[BOX]) for r in rows]

    def stats(boxes):
        b = np.array(boxes, dtype=np.float64)            # top, left, height, width
        return {'area': b[:, 2] * b[:, 3] / (375 * 500), 'log ratio': np.log(b[:, 3] / b[:, 2]),
                'centre x': (b[:, 1] + b[:, 3] / 2) / 500, 'centre y': (b[:, 0] + b[:, 2] / 2) / 375}
    a, b = stats(theirs), stats(ours)
    assert len(theirs) == n
    for name in a:
        d, p = _ks_two_sample(a[name], b[name])
        assert p > 1e-3, (name, d, p)
    flips = np.mean([float(r[FLIP]) for r in rows])
    assert abs(flips - flip.p) < 4 * np.sqrt(flip.p * (1 - flip.p) / n), (flips, flip.p)


def test_randaugment_program_follows_timms_distribution():
    """Our per-image programs vs timm's RandAugment applied for real (its image functions wrapped
    to record what they were called with): op frequencies and mean level per op."""
    from timm.data import auto_augment as aa
    recipe = TrainRecipe(_config())
    n = 3000
    random.seed(1)
    np.random.seed(1)
    ours = {}
    for _ in range(n):
        p = recipe.sample(Image.new('RGB', (300, 200)))
        for k in range(recipe.layers):
            op_id, arg = p[PROGRAM + 2 * k].item(), p[PROGRAM + 2 * k + 1].item()
            ours.setdefault(int(op_id), []).append(arg)

    timms = {}
    ra = aa.rand_augment_transform('rand-m9-mstd0.5-inc1', {'translate_const': 100, 'img_mean': aa_fill()})
    for op in ra.ops:
        op_id = OPS.index({'auto_contrast': 'autocontrast'}.get(op.aug_fn.__name__, op.aug_fn.__name__))
        op.aug_fn = (lambda i: lambda img, *a, **kw: (timms.setdefault(i, []).append(a[0] if a else 0.0), img)[1])(op_id)
    img = Image.new('RGB', (8, 8))
    random.seed(2)
    np.random.seed(2)
    for _ in range(n):
        ra(img)
    skipped_ours = len(ours.pop(-1, []))
    assert abs(skipped_ours / (2 * n) - 0.5) < 0.03                           # each op's prob 0.5
    assert set(ours) == set(timms) and len(ours) == 15
    for op_id in ours:
        a, b = np.array(ours[op_id]), np.array(timms[op_id])
        p = len(b) / (2 * n)
        assert abs(len(a) - len(b)) < 4 * np.sqrt(2 * n * p * (1 - p)) + 5, (OPS[op_id], len(a), len(b))
        scale = max(np.abs(b).std(), 1e-6)
        assert abs(np.abs(a).mean() - np.abs(b).mean()) < 0.15 * scale + 1e-6, (OPS[op_id], a.mean(), b.mean())
        assert abs((a < 0).mean() - (b < 0).mean()) < 0.08, OPS[op_id]        # random negation


def test_erasing_rectangles_follow_timms_distribution():
    from timm.data.random_erasing import RandomErasing
    for count in (1, 3):
        recipe = TrainRecipe(_config('AUG.RECOUNT', str(count)))
        random.seed(3)
        ours = [recipe.erase_rects(224, 224) for _ in range(3000)]
        erase = RandomErasing(0.25, mode='const', max_count=count, device='cpu')
        theirs = []
        random.seed(4)
        for _ in range(3000):
            x = torch.ones(1, 224, 224)
            erase(x)
            theirs.append((x == 0).float().mean().item())
        hit_ours = np.mean([bool(r) for r in ours])
        hit_theirs = np.mean([t > 0 for t in theirs])
        assert abs(hit_ours - 0.25) < 0.03 and abs(hit_theirs - hit_ours) < 0.04
        # area fraction of one rectangle (count 1: no overlaps, so pixels counted = rectangle area)
        if count == 1:
            a = np.array([r[0][2] * r[0][3] / 224 ** 2 for r in ours if r])
            b = np.array([t for t in theirs if t > 0])
            assert abs(a.mean() - b.mean()) < 0.02 and abs(a.std() - b.std()) < 0.02, (a.mean(), b.mean())


def test_normalize_erase_kernel_matches_reference():
    """The one-pass ToTensor + Normalize + RandomErasing kernel against the torch ops: outside the
    rectangles bit-identical; inside, 'const' zero, 'rand' one value per image, channel and rectangle,
    'pixel' a fresh value per element, both standard normal over the batch; a later rectangle wins
    where two overlap; no rectangle (h <= 0) leaves an image normalised only; the same seed gives the
    same fill, another seed another. Odd sizes and a plane of several blocks (tails)."""
    from kernels.normalize_erase import normalize_erase_fwd, normalize_erase_ref
    g = torch.Generator().manual_seed(0)
    B, C, H, W = 6, 3, 37, 45                 # 1665 pixels a plane: two blocks of 1024, the second partial
    x0 = torch.randint(0, 256, (B, C, H, W), generator=g).float()
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    rects = torch.tensor([[[3, 4, 20, 30], [10, 20, 15, 20]],        # two, overlapping
                          [[0, 0, 37, 45], [-1, -1, -1, -1]],        # the whole image
                          [[-1, -1, -1, -1], [-1, -1, -1, -1]],      # none
                          [[30, 40, 7, 5], [-1, -1, -1, -1]],        # at the far corner
                          [[5, 5, 1, 1], [-1, -1, -1, -1]],          # one pixel
                          [[0, 10, 37, 1], [2, 0, 1, 45]]])          # a column, then a row
    ys, xs = torch.arange(H)[:, None], torch.arange(W)[None, :]

    def mask(r):
        top, left, h, w = r.tolist()
        return (ys >= top) & (ys < top + h) & (xs >= left) & (xs < left + w) & (h > 0)
    reference = normalize_erase_ref(x0.clone().to(DEVICE), mean.to(DEVICE), std.to(DEVICE), rects[:, :0], 'const').cpu()
    # upstream's ToTensor + Normalize run on the CPU (true divisions): the reference on any device gives its bits
    upstream = x0.clone().div(255).sub_(mean.view(1, 3, 1, 1)).div_(std.view(1, 3, 1, 1))
    assert torch.equal(reference, upstream)
    for mode in ('const', 'rand', 'pixel'):
        out = normalize_erase_fwd(x0.clone().to(DEVICE), mean, std, rects, mode, seed=1234).cpu()
        again = normalize_erase_fwd(x0.clone().to(DEVICE), mean, std, rects, mode, seed=1234).cpu()
        other = normalize_erase_fwd(x0.clone().to(DEVICE), mean, std, rects, mode, seed=99).cpu()
        assert torch.equal(out, again), mode
        fills = []
        for b in range(B):
            m0, m1 = mask(rects[b, 0]), mask(rects[b, 1])
            outside = ~(m0 | m1)
            assert torch.equal(out[b][:, outside], reference[b][:, outside]), (mode, b)
            for m, k in ((m0 & ~m1, 0), (m1, 1)):     # what each rectangle shows after the overlap
                if not m.any():
                    continue
                v = out[b][:, m]
                if mode == 'const':
                    assert (v == 0).all()
                elif mode == 'rand':        # one value over the rectangle, the overlap included: the later wins
                    assert (v == v[:, :1]).all() and (v[0, 0] != v[1, 0]), (b, k)
                    fills.append(v[:, 0])
                else:
                    assert v.numel() < 4 or v.unique().numel() == v.numel(), (b, k)
                    fills.append(v.flatten())
                if mode != 'const':
                    assert not torch.equal(v, other[b][:, m]), (mode, b, k)
        if mode == 'pixel':
            f = torch.cat(fills)
            assert f.numel() > 3000 and abs(f.mean()) < 0.1 and abs(f.std() - 1) < 0.1, (f.mean(), f.std())
    with pytest.raises(ValueError, match='mode'):
        normalize_erase_fwd(x0.clone().to(DEVICE), mean, std, rects, 'noise', seed=0)


# ----------------------------------------------------------------------------- whole images
def _pil_reference(img: Image.Image, row: torch.Tensor, recipe: TrainRecipe) -> torch.Tensor:
    """Upstream's PIL recipe (crop + bicubic resize, flip, RandAugment ops, ToTensor, Normalize)
    at the parameters of `row`."""
    from timm.data import auto_augment as aa
    from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
    top, left, h, w = (int(v) for v in row[:4])
    S = recipe.size
    out = img.crop((left, top, left + w, top + h)).resize((S, S), Image.BICUBIC)
    if row[4] > 0:
        out = out.transpose(Image.FLIP_LEFT_RIGHT)
    fns = {'autocontrast': aa.auto_contrast, 'posterize': posterize}
    for k in range(recipe.layers):
        op_id, arg = int(row[PROGRAM + 2 * k]), row[PROGRAM + 2 * k + 1].item()
        if op_id < 0:
            continue
        name = OPS[op_id]
        fn = fns.get(name) or getattr(aa, name)
        args = () if name in ('autocontrast', 'equalize', 'invert') else (int(arg) if name == 'posterize' else arg,)
        out = fn(out, *args, fillcolor=aa_fill(), resample=Image.BICUBIC)
    x = _tensor(out) / 255
    return (x - torch.tensor(IMAGENET_DEFAULT_MEAN)[:, None, None]) / torch.tensor(IMAGENET_DEFAULT_STD)[:, None, None]


def test_batched_train_transform_matches_pil_recipe(jpeg_data):
    """Sampled parameters -> our batched transform vs the PIL recipe at the same parameters, over
    enough images that every op runs; erasing off (compared separately above)."""
    cfg = _config('AUG.REPROB', '0.0', data_path=jpeg_data)
    from torchvision import datasets
    source = datasets.ImageFolder(os.path.join(jpeg_data, 'train'))
    raw = RawImages(source, TrainRecipe(cfg), device_share=0.0)
    transform = DeviceTransform(raw, torch.device(DEVICE), 224, train=True)
    random.seed(5)
    np.random.seed(5)
    torch.manual_seed(5)
    seen = set()
    diffs = []
    for start in range(0, 60, 12):
        items = [raw[i % len(raw)] for i in range(start, start + 12)]
        from data.gpu_pipeline import collate_raw
        x, _ = transform(*collate_raw(items))
        for (_, _, row, _, index), got in zip(items, x.cpu()):
            seen.update(int(row[PROGRAM + 2 * k]) for k in range(raw.recipe.layers))
            img = Image.open(source.samples[index][0]).convert('RGB')
            ref = _pil_reference(img, row, raw.recipe)
            diffs.append(((got - ref).abs() * 255 * 0.226).mean().item())      # back to ~pixel units
    assert len(seen - {-1}) >= 12, sorted(seen)
    # mean |diff| per image in pixel levels, measured on the CPU: median 0.21, worst 0.52 (with
    # grid_sample's affine ops, before Pillow's own transform: 0.26 and 0.81)
    assert np.median(diffs) < 0.3 and max(diffs) < 0.7, (np.median(diffs), max(diffs))


def test_train_recipe_matches_upstreams_distribution(jpeg_data):
    """End to end against the transform upstream builds (timm's, through data/build.py), not against
    a re-implementation of it: every train file drawn many times through each recipe with its own
    random draws; per image, the mean, the standard deviation and the horizontal / vertical gradient
    energy (where RandAugment's and the erasing's footprints show) must not tell the two apart
    (two-sample Kolmogorov-Smirnov, p > 1e-3 for each; 918 images a side: 54 files, 17 draws each).
    On the CPU the four p-values were 0.89, 0.20, 0.058 and 0.074; leaving out RandAugment gave 8e-8
    (mean), leaving out the erasing 2e-17 (horizontal gradient). Both sides start from the same
    decoded pixels: on an H200 (2026-11-29), with PIL's decode on upstream's side and nvJPEG's on
    ours, the horizontal gradient energy told them apart (p = 3e-4, means 0.2162 vs 0.2239): nvJPEG's
    decode is slightly sharper than libjpeg's, a difference of the decoder, not of the augmentation."""
    from torchvision import datasets

    from data.gpu_pipeline import collate_raw
    source = datasets.ImageFolder(os.path.join(jpeg_data, 'train'))
    random.seed(7)
    np.random.seed(7)
    torch.manual_seed(7)

    def features(x: torch.Tensor) -> list:
        return [x.mean().item(), x.std().item(), (x[:, :, 1:] - x[:, :, :-1]).abs().mean().item(),
                (x[:, 1:] - x[:, :-1]).abs().mean().item()]

    reps = 17
    upstream = build_transform(True, _config(pipeline='pil'))
    raw = RawImages(source, TrainRecipe(_config()), device_share=float(DEVICE == 'cuda'))

    def decoded(i: int) -> Image.Image:
        """The file as our pipeline decodes it: nvJPEG's pixels for the files it takes on CUDA (a
        decode that differs slightly from libjpeg's: test_messy_files_decode_as_pil_does), else PIL's."""
        if raw[i][1] != 0:
            return Image.open(source.samples[i][0]).convert('RGB')
        from torchvision.io import ImageReadMode, decode_jpeg, read_file
        rgb = decode_jpeg(read_file(source.samples[i][0]), mode=ImageReadMode.RGB, device='cuda')
        return Image.fromarray(rgb.permute(1, 2, 0).cpu().numpy())
    images = [decoded(i) for i in range(len(source.samples))]
    ours = []
    theirs = [features(upstream(img)) for _ in range(reps) for img in images]
    transform = DeviceTransform(raw, torch.device(DEVICE), 224, train=True)
    for _ in range(reps):
        for start in range(0, len(raw), 27):
            x, _ = transform(*collate_raw([raw[i] for i in range(start, min(start + 27, len(raw)))]))
            ours += [features(img) for img in x.float().cpu()]
    theirs, ours = np.array(theirs), np.array(ours)
    assert len(ours) == len(theirs) >= 900
    for k, name in enumerate(('mean', 'std', 'horizontal gradient', 'vertical gradient')):
        d, p = _ks_two_sample(theirs[:, k], ours[:, k])
        assert p > 1e-3, (name, d, p, theirs[:, k].mean(), ours[:, k].mean())


def test_messy_files_decode_as_pil_does(jpeg_data, tmp_path):
    """Grey, CMYK, progressive, PNG named .JPEG: each decodes to PIL's convert('RGB') (exactly on
    the CPU; on CUDA, nvJPEG's baseline decode within 6 levels on average, see below). A
    truncated file is an error that names it."""
    from torchvision import datasets
    source = datasets.ImageFolder(os.path.join(jpeg_data, 'val'))
    raw = RawImages(source, None, device_share=float(DEVICE == 'cuda'))
    transform = DeviceTransform(raw, torch.device(DEVICE), 224, train=False)
    odd = [i for i, (p, _) in enumerate(source.samples) if '_odd_' in p]
    assert len(odd) == 12
    plain = [i for i, (p, _) in enumerate(source.samples) if '_odd_' not in p][:4]
    items = [raw[i] for i in odd + plain]
    from data.gpu_pipeline import collate_raw
    decoded = transform.decode(*collate_raw(items))[0]
    for (payload, kind, _, _, index), img in zip(items, decoded):
        ref = _tensor(Image.open(source.samples[index][0]))
        diff = (img.cpu().float() - ref).abs()
        if kind == 0:
            # nvJPEG's 4:2:0 chroma upsampling is not libjpeg-turbo's: on these noise-heavy images
            # (H200, 2026-11-28) the mean difference was 4.1 levels
            assert DEVICE == 'cuda' and diff.mean() < 6.0, (source.samples[index][0], diff.mean())
        else:
            assert kind == 1 and torch.equal(img.cpu().float(), ref), source.samples[index][0]
    kinds = {source.samples[it[4]][0].rsplit('_', 1)[-1]: it[1] for it in items}
    assert kinds['cmyk.JPEG'] == 1 and kinds['png.JPEG'] == 1 and kinds['progressive.JPEG'] == 1
    assert kinds['gray.JPEG'] == (0 if DEVICE == 'cuda' else 1)

    bad = tmp_path / 'val' / 'a'
    bad.mkdir(parents=True)
    data = open(source.samples[plain[0]][0], 'rb').read()
    (bad / 'cut.JPEG').write_bytes(data[:len(data) // 3])
    raw_bad = RawImages(datasets.ImageFolder(str(tmp_path / 'val')), None, device_share=float(DEVICE == 'cuda'))
    with pytest.raises(DataError, match='cut.JPEG'):
        raw_bad[0]


def test_jpeg_decode_in_workers_gives_pils_pixels(jpeg_data):
    """EXTRA.JPEG_DECODE 'workers': every file of the messy val folder decoded by PIL in the workers,
    none left for nvJPEG, and the device receives PIL's convert('RGB') pixels exactly; 'device' leaves
    the baseline JPEGs to nvJPEG on CUDA. Any other value is refused at start."""
    from data import build_loader
    from data.gpu_pipeline import collate_raw
    with pytest.raises(ConfigError, match='JPEG_DECODE'):
        _config('EXTRA.JPEG_DECODE', 'nvjpeg')
    kinds = {}
    for where in ('device', 'workers'):
        cfg = _config('DATA.BATCH_SIZE', '8', 'DATA.NUM_WORKERS', '0', 'EXTRA.JPEG_DECODE', where, data_path=jpeg_data)
        _, _, _, val, _ = build_loader(cfg)
        raw = val.dataset
        items = [raw[i] for i in range(len(raw))]
        kinds[where] = {it[1] for it in items}
        if where == 'workers':
            decoded = val.transform.decode(*collate_raw(items))[0]
            assert len(decoded) == len(raw.source.samples) == 21
            for (path, _), img in zip(raw.source.samples, decoded):
                assert torch.equal(img.cpu().float(), _tensor(Image.open(path))), path
    assert kinds['workers'] == {1}
    assert kinds['device'] == ({0, 1} if DEVICE == 'cuda' else {1})


def test_device_decode_share_splits_the_files_and_changes_no_pixel(jpeg_data):
    """EXTRA.DEVICE_DECODE_SHARE: that share of the baseline JPEGs goes to the device's decoder, spread
    over the indices, the rest decoded in the workers; a batch mixing the two gives the training images
    the workers' decode alone gives (the same random draws): exactly where the device decodes with
    libjpeg-turbo too (the CPU), within nvJPEG's decode difference on CUDA. Out of [0, 1], or without
    EXTRA.JPEG_DECODE device, is refused."""
    from torchvision import datasets
    from data.gpu_pipeline import _baseline_jpeg, collate_raw
    for bad in ('1.5', '-0.1'):
        with pytest.raises(ConfigError, match='DEVICE_DECODE_SHARE'):
            _config('EXTRA.JPEG_DECODE', 'device', 'EXTRA.DEVICE_DECODE_SHARE', bad)
    with pytest.raises(ConfigError, match='needs EXTRA.JPEG_DECODE device'):
        _config('EXTRA.DEVICE_DECODE_SHARE', '0.5')              # the default decode, 'workers'
    source = datasets.ImageFolder(os.path.join(jpeg_data, 'train'))
    baseline = [i for i, (path, _) in enumerate(source.samples)
                if _baseline_jpeg(Image.open(path), open(path, 'rb').read())]
    assert len(baseline) == 3 * 14 + 3
    recipe = TrainRecipe(_config())
    out, kinds = {}, {}
    for share in (0.0, 0.5, 1.0):
        raw = RawImages(source, recipe, device_share=share)
        random.seed(3)
        np.random.seed(3)
        torch.manual_seed(3)
        items = [raw[i] for i in range(len(raw))]
        kinds[share] = [it[1] for it in items]
        transform = DeviceTransform(raw, torch.device(DEVICE), 64, train=True)
        out[share] = torch.cat([transform(*collate_raw(items[k:k + 16]))[0].cpu()
                                for k in range(0, len(items), 16)])
    to_device = [i for i, k in enumerate(kinds[0.5]) if k == 0]
    half = RawImages(source, recipe, device_share=0.5)
    assert to_device == [i for i in baseline if half.to_device(i)] and 15 <= len(to_device) <= 30
    assert all(abs(sum(map(half.to_device, range(start, start + 128))) - 64) <= 2 for start in (0, 999, 10 ** 6))
    assert [i for i, k in enumerate(kinds[1.0]) if k == 0] == baseline and 0 not in kinds[0.0]
    assert {k for share in kinds for k in kinds[share][:16]} == {0, 2}     # a batch with both kinds
    for share in (0.5, 1.0):
        if DEVICE == 'cpu':
            assert torch.equal(out[share], out[0.0]), share
        else:       # normalised units; nvJPEG's decode is ~4 levels (0.07 here) off on average
            assert (out[share] - out[0.0]).abs().mean() < 0.1, share


def test_host_jpeg_decode_is_pils_on_every_kind_of_file(jpeg_data, monkeypatch):
    """Without nvJPEG the workers decode baseline JPEGs with torchvision's libjpeg-turbo (faster than
    PIL's path around the same library): each training item's payload, cut to its crop box, equals
    PIL's convert('RGB') cut to that box, for every file of the messy train folder, and that decode
    did serve the baseline files. The once-a-process check refuses a decoder that is one level off
    anywhere."""
    import data.gpu_pipeline as gp
    from torchvision import datasets
    assert gp._libjpeg_is_pils(), 'torchvision and Pillow decode JPEGs differently here'
    served = []
    fast = gp._decode_as_pil
    monkeypatch.setattr(gp, '_decode_as_pil', lambda data: served.append(fast(data)) or served[-1])
    source = datasets.ImageFolder(os.path.join(jpeg_data, 'train'))
    raw = RawImages(source, TrainRecipe(_config()), device_share=0.0)
    for index, (path, _) in enumerate(source.samples):
        payload, kind, params, _, _ = raw[index]
        top, left, h, w = (int(v) for v in params[:4])
        expected = np.asarray(Image.open(path).convert('RGB').crop((left, top, left + w, top + h)))
        assert kind == 2 and np.array_equal(payload.numpy(), expected), path
    assert sum(t is not None for t in served) == 3 * 14 + 3        # the photos and the grey files
    # a decoder one level off on one pixel fails the check (and PIL then decodes everything)
    from torchvision import io as tvio
    real = tvio.decode_jpeg

    def off_by_one(*args, **kwargs):
        out = real(*args, **kwargs).clone()
        out[0, -1, -1] ^= 1
        return out
    monkeypatch.setattr(tvio, 'decode_jpeg', off_by_one)
    gp._libjpeg_is_pils.cache_clear()
    try:
        assert not gp._libjpeg_is_pils() and fast(open(source.samples[0][0], 'rb').read()) is None
    finally:
        gp._libjpeg_is_pils.cache_clear()       # monkeypatch restores decode_jpeg; the next check redoes it


def test_decoding_batches_together_changes_nothing(jpeg_data):
    """EXTRA.DECODE_BATCHES / VAL_DECODE_BATCHES (1 / 4 by default): raw batches decoded in one call give
    the images each gives alone (the
    messy val folder: nvJPEG's files and host-decoded ones in one call, a short last batch); on CUDA
    the loaders with 2 and 3 batches a call (a short last group), and with the augment stage on two
    streams in turn, yield the batches they yield with 1."""
    from torchvision import datasets
    from data import build_loader
    from data.gpu_pipeline import collate_raw
    source = datasets.ImageFolder(os.path.join(jpeg_data, 'val'))
    raw = RawImages(source, None, device_share=float(DEVICE == 'cuda'))
    transform = DeviceTransform(raw, torch.device(DEVICE), 64, train=False)
    items = [raw[i] for i in range(len(raw))]
    assert len(items) == 21
    raws = [collate_raw(items[k:k + 5]) for k in range(0, len(items), 5)]
    alone = [transform.decode(*r) for r in raws]
    together = transform.decode_batches(raws)
    assert len(together) == len(alone) == 5
    for a, b in zip(alone, together):
        assert a[1] == b[1] and torch.equal(a[3], b[3]) and torch.equal(a[4], b[4])
        assert len(a[0]) == len(b[0]) and all(torch.equal(x, y) for x, y in zip(a[0], b[0]))
    assert {k for r in raws for k in r[3].tolist()} == ({0, 1} if DEVICE == 'cuda' else {1})
    # the defaults: one batch a call in training, EXTRA.VAL_DECODE_BATCHES (4) in validation
    _, _, train, val, _ = build_loader(_config('DATA.BATCH_SIZE', '5', 'DATA.NUM_WORKERS', '0', data_path=jpeg_data))
    assert (train.decode_batches, val.decode_batches) == (1, 4)
    if DEVICE != 'cuda':
        return
    runs = {}
    for n in (1, 2, 3, 'two augment streams'):
        k = '1' if isinstance(n, str) else str(n)
        cfg = _config('DATA.BATCH_SIZE', '5', 'DATA.NUM_WORKERS', '0', 'EXTRA.DECODE_BATCHES', k,
                      'EXTRA.VAL_DECODE_BATCHES', k, 'EXTRA.JPEG_DECODE', 'device', data_path=jpeg_data)
        _, _, train, val, _ = build_loader(cfg)
        assert train.decode_batches == val.decode_batches == int(k)
        if n == 'two augment streams':
            train.finish_streams = val.finish_streams = 2
        train.sampler.set_epoch(0)
        torch.manual_seed(0)
        random.seed(0)
        np.random.seed(0)
        runs[n] = [(x.cpu(), y.cpu()) for loader in (train, val) for x, y in loader]
    assert len(runs[1]) == 10 + 5
    for n in (2, 3, 'two augment streams'):
        assert len(runs[n]) == len(runs[1])
        for (x1, y1), (x2, y2) in zip(runs[1], runs[n]):
            assert torch.equal(x1, x2) and torch.equal(y1, y2)
    with pytest.raises(ConfigError, match='DECODE_BATCHES'):
        _config('EXTRA.DECODE_BATCHES', '0')
    with pytest.raises(ConfigError, match='VAL_DECODE_BATCHES'):
        _config('EXTRA.VAL_DECODE_BATCHES', '0')


# ----------------------------------------------------------------------------- main.py
def test_main_trains_with_gpu_pipeline_on_jpegs(jpeg_data, tmp_path):
    """main.py --data-pipeline gpu on the messy JPEG folder, the default RandAugment + erasing +
    mixup recipe at 64 px (random-resized-crop path; the default decode, PIL in the workers), then
    --eval with EXTRA.JPEG_DECODE device (nvJPEG on CUDA)."""
    out = run_main(['--cfg', DEMO_CFG, '--data-path', jpeg_data, '--output', str(tmp_path / 'a'),
                    '--data-pipeline', 'gpu', '--opts', 'TRAIN.EPOCHS', '2', 'DATA.IMG_SIZE', '64',
                    'AUG.AUTO_AUGMENT', 'rand-m9-mstd0.5-inc1', 'AUG.REPROB', '0.25', 'AUG.MIXUP', '0.8',
                    'AUG.CUTMIX', '1.0', 'DATA.BATCH_SIZE', '8', 'DATA.NUM_WORKERS', '2', 'PRINT_FREQ', '2'])
    assert set(epoch_losses(out)) == {0, 1} and '21 images)' in out
    ckpt = tmp_path / 'a' / 'swin_micro_shapes10' / 'default' / 'ckpt_best.pth'
    out = run_main(['--cfg', DEMO_CFG, '--data-path', jpeg_data, '--output', str(tmp_path / 'b'), '--eval',
                    '--resume', str(ckpt), '--data-pipeline', 'gpu', '--opts', 'DATA.IMG_SIZE', '64',
                    'DATA.BATCH_SIZE', '8', 'DATA.NUM_WORKERS', '1', 'EXTRA.JPEG_DECODE', 'device'])
    assert 0 <= result(out)['acc1'] <= 100


def test_ddp_and_zip_with_gpu_pipeline(demo_data, tmp_path):
    import sys
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', '2', '--master_port', '29541']
    # gloo on the CPU, also on a one-GPU machine (two processes need two GPUs for NCCL)
    out = run_main(['--cfg', DEMO_CFG, '--data-path', demo_data, '--output', str(tmp_path / 'ddp'),
                    '--data-pipeline', 'gpu', '--opts', 'TRAIN.EPOCHS', '1', 'DATA.BATCH_SIZE', '8',
                    'DATA.NUM_WORKERS', '0'], launcher=cmd, env={'CUDA_VISIBLE_DEVICES': ''})
    assert 'EPOCH 0 training takes' in out and '40 images)' in out
    from test_parity import _zip_split
    for split in ('train', 'val'):
        _zip_split(demo_data, str(tmp_path), split)
    out = run_main(['--cfg', DEMO_CFG, '--data-path', str(tmp_path), '--zip', '--cache-mode', 'part',
                    '--data-pipeline', 'gpu', '--output', str(tmp_path / 'o'), '--opts', 'TRAIN.EPOCHS', '1'] + FAST)
    assert 'EPOCH 0 training takes' in out and '40 images)' in out


def test_workers_hint_names_the_worker_count_to_use():
    """With the decode in the workers, main.py logs how many workers the host's cores allow when
    DATA.NUM_WORKERS leaves most of them idle; nothing for the other pipelines and decodes, or a
    worker count that already uses the cores."""
    from data.build import workers_hint
    hint = workers_hint(_config('DATA.NUM_WORKERS', '8'), cores=128, processes=8, cuda=True)
    assert 'DATA.NUM_WORKERS 12' in hint and 'the 8 DataLoader workers' in hint and '16 CPU cores' in hint
    assert workers_hint(_config('DATA.NUM_WORKERS', '12'), cores=16, processes=1, cuda=True) is None
    assert workers_hint(_config('DATA.NUM_WORKERS', '8'), cores=128, processes=8, cuda=False) is None
    assert workers_hint(_config('EXTRA.JPEG_DECODE', 'device'), cores=128, processes=8, cuda=True) is None
    assert workers_hint(_config(pipeline='pil'), cores=128, processes=8, cuda=True) is None


def test_queued_batches_counts_what_the_loaders_ready_ahead(jpeg_data, monkeypatch):
    """main.py times an epoch from after the batches the loader readied during the first steps: the
    workers' prefetch (workers x prefetch_factor; the gpu pipeline's WORKER_PREFETCH) and, on CUDA, the
    gpu pipeline's two stages."""
    import data.gpu_pipeline as gp
    from data import build_loader
    from data.build import queued_batches
    for pipeline, workers, prefetch in (('pil', '0', 2), ('pil', '3', 2), ('gpu', '3', 2), ('gpu', '3', 5),
                                        ('gpu', '0', 5)):
        monkeypatch.setattr(gp, 'WORKER_PREFETCH', prefetch)
        cfg = _config('DATA.NUM_WORKERS', workers, 'DATA.BATCH_SIZE', '4', pipeline=pipeline, data_path=jpeg_data)
        _, _, train, _, _ = build_loader(cfg)
        stages = 8 if pipeline == 'gpu' and DEVICE == 'cuda' else 0
        assert queued_batches(train) == int(workers) * prefetch + stages, (pipeline, workers, prefetch)
        assert gp._SegmentPool.limit() == prefetch + 2         # a worker's segments follow its prefetch


def test_unsupported_recipe_is_refused_at_start(demo_data, tmp_path):
    out = run_main(['--cfg', DEMO_CFG, '--data-path', demo_data, '--output', str(tmp_path), '--data-pipeline', 'gpu',
                    '--opts', 'AUG.COLOR_JITTER', '0.4'] + FAST, expect_ok=False)
    last = [l for l in out.splitlines() if l.strip()][-1]
    assert last.startswith('error:') and 'colour jitter' in last and '--data-pipeline pil' in last


@pytest.mark.parametrize('drop_last', [True, False])
def test_synthetic_on_device_yields_the_datasets_items_in_sampler_order(drop_last):
    """DATA.DATASET synthetic with --data-pipeline gpu: the same images and labels as the dataset
    gives per index, in the sampler's order, every batch (a partial last one unless dropped)."""
    from data.build import SyntheticDataset
    from data.gpu_pipeline import SyntheticOnDevice
    ds = SyntheticDataset(size=150, img_size=8, num_classes=7, seed=3)          # pool of 64: indices wrap
    sampler = torch.utils.data.RandomSampler(ds, generator=torch.Generator().manual_seed(5))
    loader = SyntheticOnDevice(ds, 32, sampler, torch.device(DEVICE), drop_last)
    order = list(iter(torch.utils.data.RandomSampler(ds, generator=torch.Generator().manual_seed(5))))
    batches = list(loader)
    assert len(batches) == len(loader) == (4 if drop_last else 5)
    seen = 0
    for images, labels in batches:
        idx = order[seen:seen + len(labels)]
        seen += len(labels)
        assert torch.equal(images.cpu(), torch.stack([ds[i][0] for i in idx]))
        assert labels.tolist() == [ds[i][1] for i in idx]
    assert seen == (128 if drop_last else 150)


def test_batch_fetched_whole_equals_items_one_by_one(jpeg_data, tmp_path):
    """RawImages.__getitems__ (what a DataLoader calls for a batch: every item's reading and random
    draws first, then the decodes) gives what __getitem__ gives item by item from the same random
    state, on the messy train folder with half the baseline JPEGs left as bytes: the same payloads
    (compressed bytes, crop boxes of decoded pixels), parameter rows, labels and indices. A DataLoader
    batch is the same; a file it cannot read fails the batch naming the file."""
    from torchvision import datasets

    def seeded(fetch):
        random.seed(5)
        np.random.seed(5)
        torch.manual_seed(5)
        return fetch()
    source = datasets.ImageFolder(os.path.join(jpeg_data, 'train'))
    raw = RawImages(source, TrainRecipe(_config()), device_share=0.5)
    indices = list(range(len(raw)))
    whole = seeded(lambda: raw.__getitems__(indices))
    single = seeded(lambda: [raw[i] for i in indices])
    loader = iter(torch.utils.data.DataLoader(raw, batch_size=len(raw), collate_fn=lambda batch: batch))
    batch = seeded(lambda: next(loader))        # the iterator draws its base seed when made: made before
    assert len(whole) == len(single) == len(batch) == 3 * 18
    assert {it[1] for it in whole} == {0, 2}         # bytes for the device and decoded crop boxes
    for a, b, c in zip(whole, single, batch):
        assert a[1] == b[1] == c[1] and a[3:] == b[3:] == c[3:]
        assert torch.equal(a[0], b[0]) and torch.equal(a[0], c[0])
        assert torch.equal(a[2], b[2]) and torch.equal(a[2], c[2])
    assert len({tuple(it[2][:4].tolist()) for it in whole}) > 40       # each image its own crop box

    bad = tmp_path / 'train' / 'a'
    bad.mkdir(parents=True)
    data = open(source.samples[0][0], 'rb').read()
    (bad / 'b.JPEG').write_bytes(data)
    (bad / 'cut.JPEG').write_bytes(data[:len(data) // 3])
    raw_bad = RawImages(datasets.ImageFolder(str(tmp_path / 'train')), TrainRecipe(_config()))
    with pytest.raises(DataError, match='cut.JPEG'):
        raw_bad.__getitems__([0, 1])


def _segment_inode(blob: torch.Tensor) -> int:
    fd, _ = blob.untyped_storage()._share_fd_cpu_()
    return os.fstat(fd).st_ino


def test_worker_batch_is_one_shared_blob_and_host_copy_frees_its_pages(jpeg_data, monkeypatch):
    """A raw batch from DataLoader workers: its pixels are the one tensor (shared memory), the rest numpy
    and an int (pickled with it: no segment each); host_copy returns the same bytes. With release, a
    segment of the worker's pool (_SegmentPool) goes back to the worker, which writes a later batch into
    it: the batches are those of workers without the pool (the same seeds), a few segments serve every
    batch, and a batch not released is never written over. Without the pool, release frees the worker's
    pages at once (the shared blob then reads zeros: Linux); without release they stay."""
    from torchvision import datasets
    from data.gpu_pipeline import _SegmentPool, _release, collate_raw, host_copy
    source = datasets.ImageFolder(os.path.join(jpeg_data, 'train'))
    raw = RawImages(source, TrainRecipe(_config()), device_share=0.0)

    def batches(release_from: int):
        loader = torch.utils.data.DataLoader(raw, batch_size=4, num_workers=1, collate_fn=collate_raw,
                                             generator=torch.Generator().manual_seed(0))
        out, inodes, held = [], set(), []
        for k, batch in enumerate(loader):
            assert [isinstance(v, torch.Tensor) for v in batch] == [True] + [False] * 7
            assert batch[0].is_shared() and batch[0].numel() > 3 * 4096
            inodes.add(_segment_inode(batch[0]))
            if k < release_from:               # held: not released, read again once every batch is in
                held.append(batch[0])
            out.append(host_copy(batch[0], pin=False, release=k >= release_from))
        return out, inodes, held

    pool_size = _SegmentPool.limit()
    pooled, pooled_inodes, (held,) = batches(release_from=1)
    monkeypatch.setattr(_SegmentPool, 'size', 0)           # the workers fork after this: no pool
    plain, plain_inodes, _ = batches(release_from=1)
    assert len(pooled) == len(plain) == -(-len(raw) // 4) > pool_size + 1
    assert all(torch.equal(a, b) for a, b in zip(pooled, plain))
    assert torch.equal(held, plain[0])                      # 13 batches later, still the first
    assert len(plain_inodes) == len(plain) and len(pooled_inodes) <= pool_size < len(pooled)

    # without the pool: release frees the pages at once; without release they stay
    loader = torch.utils.data.DataLoader(raw, batch_size=8, num_workers=1, collate_fn=collate_raw)
    first, second = itertools.islice(iter(loader), 2)
    expected = first[0].clone()
    kept = host_copy(first[0], pin=False)
    assert torch.equal(kept, expected) and torch.equal(first[0], expected)
    expected = second[0].clone()
    copy = host_copy(second[0], pin=False, release=True)
    assert torch.equal(copy, expected)
    if sys.platform.startswith('linux'):
        inner = second[0][8192:-8192]                      # whole pages, away from the segment's edges
        assert inner.numel() > 0 and not inner.any() and expected[8192:-8192].any()

    # the pool's bookkeeping, in this process: a segment is reused only once released, a released one
    # too small is replaced, past `size` held a blob gets a segment of its own
    monkeypatch.setattr(_SegmentPool, 'size', 2)
    monkeypatch.setattr(_SegmentPool, 'segments', [])
    a, b = _SegmentPool.blob(1000), _SegmentPool.blob(1000)
    a.fill_(7)
    assert a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr()
    own = _SegmentPool.blob(1000)
    assert own.untyped_storage().nbytes() == 1000 and len(_SegmentPool.segments) == 2
    assert not _release(own) and _release(b) and not _release(b)
    c = _SegmentPool.blob(900)
    assert c.untyped_storage().data_ptr() == b.untyped_storage().data_ptr() and bool((a == 7).all())
    assert _release(c)
    d = _SegmentPool.blob(5000)
    assert d.untyped_storage().nbytes() > 5000 and bool((a == 7).all()) and len(_SegmentPool.segments) == 2


def test_hardware_decode_declines_with_a_reason_where_there_are_no_engines(jpeg_data):
    """Without CUDA (or without nvJPEG's library) there are no engines to call: the transform says why and
    torchvision's call (here on the CPU) decodes the JPEGs sent for the device, the pixels it gives
    alone."""
    import torchvision
    from torchvision import datasets
    from data.gpu_pipeline import collate_raw
    from data.nvjpeg import hardware_decoder
    engines, why = hardware_decoder()
    if engines is not None:
        engines.close()
        pytest.skip('this machine has the engines (the GPU test covers them)')
    assert isinstance(why, str) and why
    source = datasets.ImageFolder(os.path.join(jpeg_data, 'val'))
    raw = RawImages(source, None, device_share=1.0)
    items = [raw[i] for i in range(8)]
    assert 0 in {it[1] for it in items}
    transform = DeviceTransform(raw, torch.device('cpu'), 64, train=False)
    images = transform.decode(*collate_raw(items))[0]
    assert transform._engines() is None and transform.engines_note == 'not a CUDA device'
    for (payload, kind, _, _, _), img in zip(items, images):
        if kind == 0:
            assert torch.equal(img, torchvision.io.decode_jpeg(payload, mode=torchvision.io.ImageReadMode.RGB))


@pytest.mark.skipif(DEVICE != 'cuda', reason="nvJPEG's hardware engines")
def test_hardware_decode_gives_torchvisions_pixels(jpeg_data, tmp_path, monkeypatch):
    """JPEGs for the device go to nvJPEG's engines (data/nvjpeg.py) in one call a group, each batch one
    Packed buffer: every kind of file the workers send (4:4:4, 4:2:2, 4:2:0 and grey baseline JPEGs at
    odd sizes; the messy folder's), alone and beside the workers' decoded images, two batches a call,
    gives torchvision's decode_jpeg pixels (the same engines: at most one level off, on under 1% of
    the pixels); a kind the engines do not take goes through torchvision's call into its place; where
    nvJPEG refuses the call, torchvision's call decodes the group."""
    import data.gpu_pipeline as g
    from data.gpu_pipeline import collate_raw
    from data.nvjpeg import hardware_decoder
    from torchvision import datasets
    engines, why = hardware_decoder()
    if engines is None:
        pytest.skip(f'no hardware JPEG engines here: {why}')
    engines.close()
    rng = np.random.default_rng(5)
    folder = tmp_path / 'kinds' / 'a'
    folder.mkdir(parents=True)
    for k, (w, h, sub, grey) in enumerate([(67, 45, 0, False), (333, 501, 1, False), (500, 375, 2, False),
                                            (257, 129, 2, True), (64, 48, 0, False), (97, 211, 2, False)]):
        img = photo(rng, w, h)
        (img.convert('L') if grey else img).save(folder / f'{k}.JPEG', quality=90, subsampling=sub)
    for root, share in ((str(tmp_path / 'kinds'), 1.0), (os.path.join(jpeg_data, 'val'), 1.0),
                        (os.path.join(jpeg_data, 'val'), 0.5)):
        source = datasets.ImageFolder(root)
        raw = RawImages(source, None, device_share=share)
        items = [raw[i] for i in range(len(raw))]
        assert 0 in {it[1] for it in items}
        half = len(items) // 2
        raws = [collate_raw(items[:half]), collate_raw(items[half:])]
        monkeypatch.setattr(g, 'HARDWARE_DECODE', False)
        want = [img.cpu() for batch in DeviceTransform(raw, torch.device('cuda'), 224, train=False).decode_batches(
            raws) for img in batch[0]]
        monkeypatch.setattr(g, 'HARDWARE_DECODE', True)
        transform = DeviceTransform(raw, torch.device('cuda'), 224, train=False)
        runs = {'engines': transform.decode_batches(raws)}
        assert transform.engines_note is None and all(isinstance(b[0], g.Packed) for b in runs['engines'])
        # every kind the engines took handed to torchvision's call instead, decoded into its place
        transform._hardware.supported = lambda *a: False
        runs['declined'] = transform.decode_batches(raws)
        del transform._hardware.supported
        monkeypatch.setattr(transform._hardware, 'decode', lambda *a: (_ for _ in ()).throw(RuntimeError('refused')))
        runs['refused'] = transform.decode_batches(raws)
        assert not isinstance(runs['refused'][0][0], g.Packed)
        for name, batches in runs.items():
            got = [img.cpu() for batch in batches for img in batch[0]]
            assert len(got) == len(want) == len(items)
            for (path, _), a, b in zip(source.samples, got, want):
                assert a.shape == b.shape, (name, path)
                diff = (a.int() - b.int()).abs()
                assert diff.max() <= 1 and (diff > 0).float().mean() < 0.01, (name, path, diff.max())
        # and the whole val transform (resize, centre crop, normalise) gives the same batch
        monkeypatch.setattr(g, 'HARDWARE_DECODE', False)
        ref = DeviceTransform(raw, torch.device('cuda'), 224, train=False)(*raws[0])[0]
        monkeypatch.setattr(g, 'HARDWARE_DECODE', True)
        fast = DeviceTransform(raw, torch.device('cuda'), 224, train=False)(*raws[0])[0]
        assert (fast - ref).abs().max() < 0.05


@pytest.mark.skipif(DEVICE != 'cuda', reason='page-locks memory for CUDA copies')
def test_locked_segments_give_the_copied_batches(jpeg_data, monkeypatch):
    """On CUDA the DeviceLoader can page-lock the workers' pooled segments where they lie (_LockedSegments)
    instead of copying each batch into pinned memory (by default where nvJPEG decodes): the loaders
    yield the batches they yield with the copy (the workers' decode, and half the JPEGs to nvJPEG: both
    kinds of payload), every batch went by a locked segment, and each segment went back to its worker
    (fewer registered than batches). In this process: a registered segment reads as pinned, one reused
    is registered once, a segment goes back after its copy, at most `capacity` stay registered (the
    least recently used let go, never one taken and not yet given back), close() lets all go."""
    import data.gpu_pipeline as g
    from data import build_loader

    def batches(lock: bool, decode: str):
        monkeypatch.setattr(g, 'LOCK_SEGMENTS', lock)
        cfg = _config('DATA.BATCH_SIZE', '2', 'DATA.NUM_WORKERS', '2', 'EXTRA.JPEG_DECODE', decode,
                      'EXTRA.DEVICE_DECODE_SHARE', '0.5' if decode == 'device' else '1.0', data_path=jpeg_data)
        _, _, train, val, _ = build_loader(cfg)
        train.sampler.set_epoch(0)
        out, registered = [], []
        for loader in (train, val):
            torch.manual_seed(0)
            random.seed(0)
            np.random.seed(0)
            out.append([(x.cpu(), y.cpu()) for x, y in loader])
            registered.append((loader.locked.registered, loader.locked.taken) if lock else None)
            assert not lock or (loader.locked.refused is None and not loader.locked.storages)     # closed
        return out, registered

    for decode in ('workers', 'device'):
        locked, registered = batches(True, decode)
        copied, _ = batches(False, decode)
        for split, a, b, (n, taken) in zip(('train', 'val'), locked, copied, registered):
            assert len(a) == len(b) == (27 if split == 'train' else 11), (decode, split)
            assert all(torch.equal(x1, x2) and torch.equal(y1, y2) for (x1, y1), (x2, y2) in zip(a, b)), (
                decode, split)
            assert taken == len(a) and 0 < n < len(a), (decode, split, n, taken)
    # the default locks where nvJPEG decodes, and copies with the workers' decode
    monkeypatch.setattr(g, 'LOCK_SEGMENTS', 'nvjpeg')
    for decode in ('workers', 'device'):
        cfg = _config('DATA.BATCH_SIZE', '2', 'DATA.NUM_WORKERS', '2', 'EXTRA.JPEG_DECODE', decode,
                      data_path=jpeg_data)
        _, _, _, val, _ = build_loader(cfg)
        assert len(list(val)) == 11 and (val.locked is not None) == (decode == 'device'), decode

    monkeypatch.setattr(g._SegmentPool, 'size', 8)
    monkeypatch.setattr(g._SegmentPool, 'segments', [])
    stream = torch.cuda.current_stream()
    locked = g._LockedSegments(capacity=2)
    blobs = [g._SegmentPool.blob(5000 + k) for k in range(3)]
    for b in blobs:
        b.fill_(len(b) % 251)
        assert locked.take(b) and b.is_pinned()
    assert locked.registered == 3 and len(locked.storages) == 3      # taken, not yet copied: none let go
    copies = [b.to('cuda', non_blocking=True) for b in blobs]
    torch.cuda._sleep(200_000_000)             # ~0.1 s: the copies' event still pending through the next take
    locked.copied(blobs, stream)
    fourth = g._SegmentPool.blob(6000)         # the three are not given back yet: a new segment
    assert locked.take(fourth) and locked.registered == 4 and len(locked.storages) == 4
    locked.copied([fourth], stream)            # waits for the group before it, which goes back
    assert all(torch.equal(c.cpu(), b) and not g._pooled(b) for c, b in zip(copies, blobs))
    again = g._SegmentPool.blob(5000)          # the worker reuses the first one given back: registered once
    assert again.untyped_storage().data_ptr() == blobs[0].untyped_storage().data_ptr()
    assert locked.take(again) and locked.registered == 4 and locked.taken == 5
    locked.reap()
    grown = g._SegmentPool.blob(9000)          # too big for the second: a new segment in its place
    assert locked.take(grown) and locked.registered == 5
    # past capacity the least recently used not taken are let go: the second, third and fourth
    assert len(locked.storages) == 2 and again.is_pinned() and grown.is_pinned()
    assert not any(b.is_pinned() for b in (blobs[1], blobs[2], fourth))
    locked.close()
    assert not locked.storages and not again.is_pinned() and not grown.is_pinned()


def test_locked_segments_decline_with_a_note_where_they_cannot_lock(monkeypatch, jpeg_data):
    """Without a CUDA driver (this CPU box) _LockedSegments declines every batch, which then goes by
    host_copy's path, still its worker's, and its note for main.py's log says why (the loader's notes);
    with one (a GPU machine) it locks and has no note."""
    import data.gpu_pipeline as g
    from data import build_loader
    _, _, _, val, _ = build_loader(_config('DATA.BATCH_SIZE', '5', 'DATA.NUM_WORKERS', '0', data_path=jpeg_data))
    assert val.notes() == []
    monkeypatch.setattr(g._SegmentPool, 'size', 2)
    monkeypatch.setattr(g._SegmentPool, 'segments', [])
    blob = g._SegmentPool.blob(1000)
    locked = g._LockedSegments(capacity=4)
    if g._libcuda() is None:
        assert not locked.take(blob) and locked.registered == locked.taken == 0 and g._pooled(blob)
        assert 'libcuda.so.1' in locked.refusal_note() and 'copied into pinned memory' in locked.refusal_note()
        val.locked = locked
        assert val.notes() == [locked.refusal_note()]
    else:
        assert locked.take(blob) and locked.refusal_note() is None
        locked.close()


def test_epoch_line_reports_the_wait_for_input(jpeg_data, tmp_path):
    """The EPOCH line gives the share of the steady steps' time the training loop waited for its next
    batch: with the JPEGs decoded and augmented in the training process itself (no workers, upstream's
    pipeline) a good part of it. Each Train line shows the last wait and the average."""
    out = run_main(['--cfg', DEMO_CFG, '--data-path', jpeg_data, '--output', str(tmp_path / 'o'), '--opts',
                    'TRAIN.EPOCHS', '1', 'DATA.IMG_SIZE', '64', 'AUG.AUTO_AUGMENT', 'rand-m9-mstd0.5-inc1',
                    'DATA.BATCH_SIZE', '2', 'DATA.NUM_WORKERS', '0', 'PRINT_FREQ', '5'])
    m = re.search(r'images/s from step \d+, all ranks; waiting for input (\d+)%\)', out)
    assert m and int(m.group(1)) >= 5, out[-3000:]
    assert re.search(r'data \d+\.\d{4} \(\d+\.\d{4}\)', out)
    # with a DataLoader worker the line also gives its CPU share over the timed steps (Linux)
    out = run_main(['--cfg', DEMO_CFG, '--data-path', jpeg_data, '--output', str(tmp_path / 'w'), '--opts',
                    'TRAIN.EPOCHS', '1', 'DATA.IMG_SIZE', '64', 'AUG.AUTO_AUGMENT', 'rand-m9-mstd0.5-inc1',
                    'DATA.BATCH_SIZE', '2', 'DATA.NUM_WORKERS', '1', 'PRINT_FREQ', '5'])
    if sys.platform.startswith('linux'):
        m = re.search(r'waiting for input \d+%, its workers busy (\d+)%\)', out)
        assert m and 0 < int(m.group(1)) <= 100, out[-3000:]


class _Spin(torch.utils.data.Dataset):
    """Items that take `seconds` each, on a CPU (spin) or asleep."""

    def __init__(self, seconds: float, spin: bool):
        self.seconds, self.spin = seconds, spin

    def __len__(self) -> int:
        return 400

    def __getitem__(self, index: int) -> int:
        if not self.spin:
            time.sleep(self.seconds)
            return index
        t0 = time.process_time()
        while time.process_time() - t0 < self.seconds:
            pass
        return index


@pytest.mark.skipif(not sys.platform.startswith('linux'), reason='reads /proc')
def test_workers_busy_tells_working_workers_from_waiting_ones():
    """worker_cpu_seconds finds this process's DataLoader workers and their CPU time; over the same
    wall time a worker that computes its items is busy, one that sleeps through them is not."""
    from data.build import worker_cpu_seconds, workers_busy
    assert worker_cpu_seconds() == {}
    busy = {}
    for spin in (True, False):
        # one worker: it needs one core of the two a CI machine has, the test process the other
        loader = torch.utils.data.DataLoader(_Spin(0.02, spin), batch_size=4, num_workers=1)
        it = iter(loader)
        next(it)
        before, t0 = worker_cpu_seconds(), time.time()
        assert len(before) == 1
        for _ in range(10):                 # 40 items: ~0.8 s
            next(it)
        after = worker_cpu_seconds()
        busy[spin] = workers_busy(before, after, time.time() - t0)
        del it
    # relative: on a loaded host (the GPU tests spread over 12 processes on 16 cores, one H100 host,
    # 2026-12-07) the computing worker got 32% of a core and the sleeping one 1.2%
    assert busy[True] > 0.1 and busy[True] > 10 * busy[False], busy
    assert workers_busy({}, {1: 2.0}, 1.0) is None and workers_busy({1: 1.0}, {1: 1.5}, 0.5) == 1.0


def test_input_bound_hint_names_the_knob_for_each_pipeline():
    from data.build import input_bound_hint
    assert input_bound_hint(_config(pipeline='pil'), 0.10) is None               # at most 10%: nothing
    assert '--data-pipeline gpu' in input_bound_hint(_config(pipeline='pil'), 0.3)
    assert 'DATA.NUM_WORKERS (8 now)' in input_bound_hint(_config('DATA.NUM_WORKERS', '8'), 0.3)
    assert 'DEVICE_DECODE_SHARE below 1' in input_bound_hint(_config('EXTRA.JPEG_DECODE', 'device'), 0.3)
    assert input_bound_hint(_config('DATA.DATASET', 'synthetic'), 0.9) is None
    # workers that were mostly idle are not the limit: the hint says so instead of asking for more
    hint = input_bound_hint(_config('DATA.NUM_WORKERS', '12'), 0.3, busy=0.6)
    assert 'busy only 60%' in hint and 'more of them will not help' in hint
    assert 'DATA.NUM_WORKERS (12 now)' in input_bound_hint(_config('DATA.NUM_WORKERS', '12'), 0.3, busy=0.95)
    assert 'DEVICE_DECODE_SHARE 0.15' in input_bound_hint(_config('DATA.NUM_WORKERS', '12'), 0.3, busy=0.95)
