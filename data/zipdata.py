"""Upstream's zip layout: `<root>/<split>.zip` and `<root>/<split>_map.txt` ("path<TAB>label").

cache_mode: 'no' reads every image from the zip when asked; 'full' keeps every image's bytes in
memory; 'part' keeps only this rank's shard, indices rank::world, and the training sampler then
draws from that shard alone (as upstream). Works for any dataset size (upstream's cache crashed
under 10 samples).
"""
import io
import os
import zipfile

import torch
from PIL import Image

from utils import rank, world_size


class ZipImageDataset(torch.utils.data.Dataset):
    def __init__(self, root: str, split: str, transform=None, cache_mode: str = 'no'):
        self.zip_path = os.path.join(root, f'{split}.zip')
        map_path = os.path.join(root, f'{split}_map.txt')
        for p in (self.zip_path, map_path):
            if not os.path.isfile(p):
                raise FileNotFoundError(f'--zip expects {p!r} (upstream layout: {split}.zip and '
                                        f'{split}_map.txt with "path<TAB>label" lines)')
        self.samples = []
        with open(map_path) as f:
            for line_no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                parts = line.rstrip('\n').split('\t')
                if len(parts) != 2:
                    raise ValueError(f'{map_path}:{line_no}: expected "path<TAB>label", got {line!r}')
                self.samples.append((parts[0], int(parts[1])))
        self.classes = sorted({label for _, label in self.samples})
        if self.classes and (self.classes[0] < 0 or self.classes[-1] != len(self.classes) - 1):
            missing = sorted(set(range(max(self.classes[-1], 0) + 1)) - set(self.classes))[:8]
            raise ValueError(f'{map_path}: labels must be 0..N-1 with every class present; found '
                             f'{len(self.classes)} labels from {self.classes[0]} to {self.classes[-1]}'
                             + (f', missing {missing}' if missing else ''))
        self.transform = transform
        self._zip = None
        self._cache = {}
        if cache_mode != 'no':
            keep = (range(len(self.samples)) if cache_mode == 'full'
                    else range(rank(), len(self.samples), world_size()))
            for i in keep:
                self._cache[i] = self._read(i)
            self._zip = None   # do not hand an open file to forked workers

    def _read(self, index: int) -> bytes:
        if self._zip is None:
            self._zip = zipfile.ZipFile(self.zip_path)
        name = self.samples[index][0].lstrip('/')
        return self._zip.read(name)

    def __len__(self) -> int:
        return len(self.samples)

    def read_bytes(self, index: int) -> bytes:
        """The stored file of sample `index` (from the cache when it holds it)."""
        return self._cache.get(index) or self._read(index)

    def __getitem__(self, index: int):
        data = self.read_bytes(index)
        try:
            img = Image.open(io.BytesIO(data)).convert('RGB')
        except Exception as e:
            raise ValueError(f'cannot decode {self.zip_path}@{self.samples[index][0]}: {e}') from None
        if self.transform is not None:
            img = self.transform(img)
        return img, self.samples[index][1]
