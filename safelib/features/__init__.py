"""Dense maps: the frozen trunk's output, its on-disk cache, and the one type that carries them.

    extract.py  trunk -> N x C x H x W maps (``dense_features``), pooled features, the cache writer loop
    cache.py    the on-disk format (fp16 memmaps, manifest, completion marker; see its docstring)
    maps.py     ``DenseMaps``: V x N x C x H x W maps in device memory, pinned host memory or streamed
                from the cache (``DenseMaps.of`` takes a tensor, a cache entry or per-view arrays)
"""
from .cache import CacheEntry, CacheError, open_entry
from .extract import cache_features, cache_image_features, dense_features, feature_cache_fields, pooled_features
from .maps import PLACEMENTS, DenseMaps, DeviceMaps, PinnedMaps, StreamedMaps, place_maps

__all__ = [
    "PLACEMENTS", "CacheEntry", "CacheError", "DenseMaps", "DeviceMaps", "PinnedMaps", "StreamedMaps",
    "cache_features", "cache_image_features", "dense_features", "feature_cache_fields", "open_entry", "place_maps",
    "pooled_features",
]
