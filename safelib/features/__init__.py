"""Dense maps: the frozen trunk's output, its on-disk cache, and where the maps live while SAFE trains.

    extract.py  trunk -> N x C x H x W maps (``dense_features``), pooled features, the cache writer loop
    cache.py    the on-disk format (fp16 memmaps, manifest, completion marker; see its docstring)
    maps.py     the maps placed in device memory, pinned host memory or streamed from the cache
"""
from .cache import CacheEntry, CacheError, open_entry
from .extract import cache_features, cache_image_features, dense_features, feature_cache_fields, pooled_features
from .maps import PLACEMENTS, DeviceMaps, PinnedMaps, PlacedMaps, StreamedMaps, place_maps

__all__ = [
    "PLACEMENTS", "CacheEntry", "CacheError", "DeviceMaps", "PinnedMaps", "PlacedMaps", "StreamedMaps",
    "cache_features", "cache_image_features", "dense_features", "feature_cache_fields", "open_entry", "place_maps",
    "pooled_features",
]
