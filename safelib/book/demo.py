"""A two-minute, offline tour: load a CLIP, pool, classify, and say what happened.

    python -m safelib.book.demo [--images 60] [--seed 0] [--weights PATH]

It uses the shipped mini-CLIP and freshly drawn mini-world shapes, so it needs no download.
"""
from __future__ import annotations

import argparse
import time

import torch

from ..clip.attnpool import attention_pool, attention_weights
from ..clip.models import load_clip
from ..clip.text import class_logits, zero_shot_classifier
from ..data.miniworld import SHAPE_TEMPLATES, SHAPES, single_object_set


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=60, help="single-object scenes to classify")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--weights", default="shipped", help="a mini-CLIP checkpoint (default: the shipped one)")
    args = parser.parse_args(argv)

    start = time.perf_counter()
    clip = load_clip("miniclip", pretrained=args.weights)
    print(f"1. loaded the mini-CLIP ({args.weights}): {clip.image_size} px images, a {clip.grid}x{clip.grid} dense grid "
          f"of {clip.dense_channels} channels, {clip.num_heads} attention heads, {clip.embed_dim}-d features")

    scenes, labels = single_object_set(args.images, args.seed, clip.image_size)
    labels = torch.tensor(labels)
    images = torch.stack([clip.preprocess(scene.image) for scene in scenes])
    first = scenes[0].objects[0]
    print(f"2. drew {len(scenes)} scenes of one shape each (the first: a {first.size} {first.colour} {first.shape}, "
          f"captioned {scenes[0].caption!r})")

    dense = clip.trunk(images)                                   # N x C x H x W
    features = attention_pool(clip.attnpool, dense)              # N x D
    attention = attention_weights(clip.attnpool, dense)          # N x heads x (1 + H*W)
    print(f"3. frozen trunk -> dense maps {tuple(dense.shape)}; attention pooling -> features {tuple(features.shape)}")
    print(f"   the pooling puts {attention[:, :, 0].mean():.2f} of its attention on the mean token "
          f"and at most {attention[:, :, 1:].amax(-1).mean():.2f} on any one grid cell (head average)")

    weights = zero_shot_classifier(clip, SHAPES, SHAPE_TEMPLATES)  # D x K
    logits = class_logits(features, weights, clip.logit_scale)      # N x K
    accuracy = (logits.argmax(-1) == labels).float().mean().item()
    print(f"4. zero-shot over {len(SHAPES)} shapes with {len(SHAPE_TEMPLATES)} prompt templates: "
          f"accuracy {accuracy:.1%} (chance {1 / len(SHAPES):.1%})")
    print(f"done in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
