"""One SAFE epoch through the trunk vs one SAFE epoch on cached dense maps, side by side.

Same random-weight model, same N augmented image views, same batch size, same loss and optimiser:

    through the trunk   images -> frozen trunk -> open_clip's AttentionPool2d (trainable) -> CE, step
    ... + fast pooling  images -> frozen trunk -> safelib.attention_pool (trainable copy) -> CE, step
    cached (RAM)        fp16 dense maps in RAM  -> safelib.attention_pool -> CE, step   (train_safe)
    cached (memmap)     fp16 dense maps memory-mapped from the on-disk cache (train_safe)

Image decoding and augmentation are left out (they would only widen the gap). Prints seconds per
epoch and the ratios; ratios, not timed asserts, because shared machines are noisy.

    python tests/benchmarks/bench_safe_epoch.py [--n 64] [--batch 32] [--model RN50]
"""
import argparse
import dataclasses
import tempfile
import time

import torch
import torch.nn.functional as F

import safelib as sl
from safelib.features.cache import CacheWriter
from safelib.methods.blend import class_logits
from safelib.methods.safe import SafeConfig, adamw, train_safe, trainable_attnpool


def epoch_through_trunk(clip, images, labels, text, batch, fast: bool) -> float:
    """Seconds for one epoch that runs the frozen trunk on every batch (no cache)."""
    pool = trainable_attnpool(clip.attnpool)
    optimizer = adamw([p for p in pool.parameters() if p.requires_grad], lr=1e-4, weight_decay=0.0)
    start = time.perf_counter()
    for s in range(0, len(images), batch):
        dense = clip.trunk(images[s:s + batch])                                 # B x C x H x W, no grad
        features = sl.attention_pool(pool, dense) if fast else pool(dense)     # B x D
        loss = F.cross_entropy(class_logits(features, text, clip.logit_scale), labels[s:s + batch])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=64, help="image views in the epoch")
    parser.add_argument("--batch", type=int, default=SafeConfig().batch_size)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--model", default="RN50")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    clip = sl.random_clip(args.model, seed=0).to(args.device)
    g = torch.Generator().manual_seed(0)
    images = torch.randn(args.n, 3, clip.image_size, clip.image_size, generator=g).to(args.device)
    labels = (torch.arange(args.n) % args.classes).to(args.device)
    text = F.normalize(torch.randn(clip.embed_dim, args.classes, generator=g), dim=0).to(args.device)
    print(f"{args.model} (random weights) on {args.device}, {torch.get_num_threads()} threads: "
          f"{args.n} views, batch {args.batch}, {args.classes} classes")

    start = time.perf_counter()
    dense = sl.dense_features(clip, images, batch_size=args.batch).half()        # the one trunk pass
    cache_seconds = time.perf_counter() - start
    config = dataclasses.replace(SafeConfig(), epochs=1, batch_size=args.batch)
    train_safe(clip.attnpool, dense[None], labels, text, clip.logit_scale, config)  # warm-up
    with tempfile.TemporaryDirectory() as root:
        writer = CacheWriter(root, {"bench": args.n}, rows=args.n, item_shape=tuple(dense.shape[1:]), views=1)
        writer.write(dense[None])
        entry = writer.finish()
        cached_ram = train_safe(clip.attnpool, dense[None], labels, text, clip.logit_scale, config).seconds
        cached_memmap = train_safe(clip.attnpool, entry.view_arrays, labels, text, clip.logit_scale, config).seconds
    trunk_fast = epoch_through_trunk(clip, images, labels, text, args.batch, fast=True)
    trunk_open_clip = epoch_through_trunk(clip, images, labels, text, args.batch, fast=False)

    rows = [("through the trunk, open_clip pooling", trunk_open_clip),
            ("through the trunk, fast pooling", trunk_fast),
            ("cached maps in RAM, fast pooling", cached_ram),
            ("cached maps memory-mapped, fast pooling", cached_memmap)]
    print(f"{'one SAFE epoch':42s} {'seconds':>9s} {'speed-up':>9s}")
    for name, seconds in rows:
        print(f"{name:42s} {seconds:9.3f} {trunk_open_clip / seconds:8.1f}x")
    print(f"(building the cache once: {cache_seconds:.3f} s, a trunk pass over every view; "
          f"cached epochs repay it after {cache_seconds / max(trunk_open_clip - cached_ram, 1e-9):.2f} epochs)")


if __name__ == "__main__":
    main()
