"""Decode once, cut K views vs decode once per view: the saving the view loader is built on.

Run: ``PYTHONPATH=. python tests/benchmarks/bench_data_views.py``. Prints both timings measured
side by side in one run and their ratio; no asserts (speed depends on the machine).
"""
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

import safelib.data as D
from safelib.data.loading import ImageViews


def make_jpegs(folder: Path, n: int, size=(500, 375)) -> D.ImageSet:
    rng = np.random.default_rng(0)
    for i in range(n):  # smooth noise compresses like a photo, not like white noise
        small = rng.integers(0, 256, size=(size[1] // 8, size[0] // 8, 3), dtype=np.uint8)
        Image.fromarray(small).resize(size, Image.BICUBIC).save(folder / f"{i}.jpg", quality=90)
    return D.ImageSet([f"{i}.jpg" for i in range(n)], [0] * n, ("x",), D.FolderReader(folder), "bench")


def per_view_decodes(images: D.ImageSet, spec: D.ViewSpec) -> None:
    transform = spec.transform()
    for i in range(len(images)):
        for _ in range(spec.views):
            transform(images.load_image(i))


def once_per_image(images: D.ImageSet, spec: D.ViewSpec) -> None:
    views = ImageViews(images, spec)
    for i in range(len(views)):
        views[i]


def best_of(fn, *args, repeats=3) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - start)
    return min(times)


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as tmp:
        images = make_jpegs(Path(tmp), 16)
        for views in (1, 10):
            spec = D.ViewSpec(size=224, views=views, seed=0)
            naive, ours = best_of(per_view_decodes, images, spec), best_of(once_per_image, images, spec)
            print(f"K={views:2d}: decode per view {naive:.3f}s, decode once {ours:.3f}s, ratio {naive / ours:.2f}x")
