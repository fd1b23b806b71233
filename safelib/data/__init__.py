"""Few-shot data: the dataset registry, the field's splits, the seeded sampler and view loaders.

Every dataset goes through :func:`register` (the 11 benchmarks, the 4 ImageNet variants, the
offline sets, generated ones) and comes back from :func:`get_dataset` as train/val/test
:class:`ImageSet` s. ``python -m safelib.data`` prints the registry and what is missing.
"""
from .benchmarks import adopt_torchvision, imagenet_names, register_benchmarks
from .fingerprint import dataset_files_digest, image_files_digest, joined_digest
from .imageset import FolderReader, ImageSet, check_confined
from .loading import ImageViews, ViewBatch, ViewSpec, collate_views, view_loader, view_seed
from .miniworld_tasks import TargetTask, has_targets, register_miniworld
from .offline import fixed_split, register_offline
from .registry import (
    DatasetMissingError,
    DatasetSpec,
    SplitDataset,
    check_dataset_options,
    data_root,
    dataset_spec,
    get_dataset,
    list_datasets,
    register,
    unregister,
)
from .sampling import FewShotWarning, few_shot_filename, load_few_shot, sample_few_shot, save_few_shot
from .splits import SplitFormatError, clean_classname, read_coop_split, read_fgvc_aircraft
from .templates import IMAGENET_TEMPLATES, TEMPLATES
from .transforms import CLIP_MEAN, CLIP_STD, eval_transform, preprocess_images, train_transform

register_benchmarks()
register_offline()
register_miniworld()  # the generated mini-world tasks: always present

__all__ = [
    "CLIP_MEAN", "CLIP_STD", "IMAGENET_TEMPLATES", "TEMPLATES", "TargetTask", "DatasetMissingError", "DatasetSpec", "FewShotWarning", "FolderReader", "ImageSet",
    "ImageViews", "SplitDataset", "SplitFormatError", "ViewBatch", "ViewSpec", "adopt_torchvision",
    "check_confined", "check_dataset_options", "clean_classname", "collate_views", "data_root", "dataset_files_digest", "dataset_spec", "eval_transform", "few_shot_filename",
    "fixed_split", "get_dataset", "has_targets", "image_files_digest", "imagenet_names", "joined_digest", "list_datasets", "load_few_shot", "preprocess_images", "read_coop_split",
    "read_fgvc_aircraft", "register", "sample_few_shot", "save_few_shot", "train_transform", "unregister",
    "view_loader", "view_seed",
]
