"""Few-shot ImageNet straight from the distributed archive: index it, sample, extract only the shots.

ImageNet's training set ships as ``ILSVRC2012_img_train.tar`` (138 GB): one tar per class
(``n01440764.tar`` ...), each holding that class's JPEGs. Unpacked it does not fit a Colab disk,
and 16-shot ImageNet needs 16,000 of its 1.28 M images (+ 4,000 for validation). A tar member's
bytes sit contiguously in the file, so reading the headers gives every image's offset and size
without decompressing anything (the tars are not compressed):

    index = index_train_archive("ILSVRC2012_img_train.tar", "imagenet_train_index.json")
    train = archive_imageset(index)                  # the same ids, labels and order as the unpacked
    shots, val = sample_few_shot(train, 16, seed=1)  # CoOp folder images/train, so the same sample
    extract_images(index, [shots, val], "data/imagenet/images/train")

Then ``save_few_shot`` the sample and, later, ``load_few_shot`` it from the extracted folder (the
folder holds only the sampled images, so drawing anew from it would give a different sample).
Indexing reads one 512-byte header per image (seconds to minutes, never the 138 GB).
"""
from __future__ import annotations

import io
import json
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from PIL import Image

from ..atomic import atomic_write_bytes, atomic_write_json
from .benchmarks import imagenet_names
from .imageset import ImageSet, check_confined
from .splits import IMAGE_SUFFIXES

INDEX_VERSION = 1


@dataclass(frozen=True)
class ArchiveIndex:
    """Where each image of a tar-of-tars lies: ``members[id] = (offset, size)``, ids ``<wnid>/<file>``."""

    archive: str
    archive_bytes: int
    members: dict

    @property
    def wnids(self) -> tuple[str, ...]:
        return tuple(sorted({i.split("/", 1)[0] for i in self.members}))

    def to_json(self) -> dict:
        return {"version": INDEX_VERSION, "archive": self.archive, "archive_bytes": self.archive_bytes,
                "members": {k: list(v) for k, v in self.members.items()}}


def _index_tar(archive: Path) -> dict:
    members = {}
    with tarfile.open(archive, mode="r:") as outer:            # "r:" = uncompressed, seekable
        for class_tar in outer:
            wnid, suffix = os.path.splitext(os.path.basename(class_tar.name))
            if not class_tar.isfile() or suffix != ".tar":
                continue
            with tarfile.open(fileobj=outer.extractfile(class_tar), mode="r:") as inner:
                for image in inner:
                    name = os.path.basename(image.name)
                    if image.isfile() and os.path.splitext(name)[1].lower() in IMAGE_SUFFIXES \
                            and not name.startswith("."):
                        # offsets of the inner tar are relative to its own start inside the outer file
                        members[f"{wnid}/{name}"] = (class_tar.offset_data + image.offset_data, image.size)
    if not members:
        raise ValueError(f"{archive} holds no per-class tars of images; expected ImageNet's "
                         "ILSVRC2012_img_train.tar (n01440764.tar, ... each with JPEGs)")
    return members


def index_train_archive(archive: str | os.PathLike, index_path: str | os.PathLike | None = None) -> ArchiveIndex:
    """The offset of every image in ``archive``; saved to / reused from ``index_path`` when given."""
    archive = Path(archive)
    if not archive.is_file():
        raise FileNotFoundError(f"ImageNet train archive {archive} does not exist (ILSVRC2012_img_train.tar "
                                "from image-net.org, kept packed)")
    size = archive.stat().st_size
    if index_path is not None and Path(index_path).is_file():
        saved = json.loads(Path(index_path).read_text())
        if saved.get("version") == INDEX_VERSION and saved.get("archive_bytes") == size:
            # ids become paths in extract_images: a tampered index must not write outside its folder
            members = {check_confined(k, f"ImageNet index {index_path}"): tuple(v)
                       for k, v in saved["members"].items()}
            return ArchiveIndex(str(archive), size, members)
    index = ArchiveIndex(str(archive), size, _index_tar(archive))
    if index_path is not None:
        atomic_write_json(index_path, index.to_json(), indent=None)
    return index


@dataclass(frozen=True)
class ArchiveReader:
    """Open image ``<wnid>/<file>`` by seeking into the archive (picklable, for loader workers)."""

    archive: str
    members: dict

    def read_bytes(self, image_id: str) -> bytes:
        if image_id not in self.members:
            raise KeyError(f"image {image_id!r} is not in {self.archive}")
        offset, size = self.members[image_id]
        with open(self.archive, "rb") as f:
            f.seek(offset)
            data = f.read(size)
        if len(data) != size:
            raise OSError(f"{self.archive} ended early reading {image_id!r} ({len(data)} of {size} bytes); "
                          "the archive changed since it was indexed: index it again")
        return data

    def __call__(self, image_id: str) -> Image.Image:
        image = Image.open(io.BytesIO(self.read_bytes(image_id)))
        image.load()
        return image


def archive_imageset(index: ArchiveIndex, classnames: dict[str, str] | None = None,
                     name: str = "imagenet/train") -> ImageSet:
    """The train split as the unpacked CoOp folder would give it: ids sorted, label = sorted-wnid index.

    ``classnames`` maps wnid -> name; by default CLIP's ImageNet names (``imagenet_names``).
    """
    wnids = index.wnids
    if classnames is None:
        classnames = imagenet_names()
    unknown = [w for w in wnids if w not in classnames]
    if unknown:
        raise ValueError(f"{index.archive}: class tars {unknown[:5]} are not ImageNet wnids (like n01440764); "
                         "pass classnames={wnid: name}")
    label = {w: k for k, w in enumerate(wnids)}
    ids = sorted(index.members)
    return ImageSet(tuple(ids), tuple(label[i.split("/", 1)[0]] for i in ids),
                    tuple(classnames[w] for w in wnids), ArchiveReader(index.archive, index.members), name)


def extract_images(index: ArchiveIndex, sets: Iterable[ImageSet | Iterable[str]],
                   dest: str | os.PathLike) -> list[Path]:
    """Copy the images of ``sets`` (ImageSets or id lists) to ``dest/<wnid>/<file>``; returns their paths.

    Reads in archive order (one forward pass over the disk); files already there with the right size
    are kept, so an interrupted extraction resumes.
    """
    dest = Path(dest)
    wanted = sorted({i for s in sets for i in (s.ids if isinstance(s, ImageSet) else s)})
    missing = [i for i in wanted if i not in index.members]
    if missing:
        raise KeyError(f"{len(missing)} ids are not in {index.archive}, e.g. {missing[:3]}; "
                       "were they sampled from another copy of ImageNet?")
    reader = ArchiveReader(index.archive, index.members)
    paths = []
    for image_id in sorted(wanted, key=lambda i: index.members[i][0]):
        path = dest / check_confined(image_id, f"index of {index.archive}")
        paths.append(path)
        if path.is_file() and path.stat().st_size == index.members[image_id][1]:
            continue
        atomic_write_bytes(path, reader.read_bytes(image_id))
    return paths
