"""The one image-set type every split, few-shot sample and generated dataset shares.

Why one type: the feature cache, the sampler and the loaders only need stable ids, labels,
class names and a way to open image ``i``. Whether the pixels come from a folder on disk, an
installed package or a renderer (the mini-CLIP world) is hidden behind ``reader``, a picklable
callable ``id -> PIL.Image`` so that DataLoader worker processes can open images themselves.
"""
from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

Reader = Callable[[str], Image.Image]
_DRIVE = re.compile(r"^[A-Za-z]:")


def check_confined(image_id: str, source: str, error: type[ValueError] = ValueError) -> str:
    """``image_id`` if it names a file inside its folder; else ``error`` naming ``source`` and the entry.

    Ids come from files a user may receive (split files, archive indexes): an absolute path, a
    drive, or a ``..`` component would read or write outside the dataset folder (``Path(root) /
    "/abs"`` even drops ``root``). Plain string checks: an ImageNet index holds 1.28 M ids.
    """
    parts = re.split(r"[\\/]", image_id)
    if not image_id or parts[0] == "" or ".." in parts or _DRIVE.match(image_id):
        raise error(f"{source}: entry {image_id!r} is not a relative path inside the dataset folder "
                    "(absolute paths and '..' components are refused); the file was edited or is not "
                    "from this dataset")
    return image_id


@dataclass(frozen=True)
class FolderReader:
    """Open ``root / id``; a dataclass (not a lambda) so that worker processes can pickle it."""

    root: Path

    def path(self, image_id: str) -> Path:
        """Where image ``image_id`` lives, refusing ids that would leave ``root`` (``check_confined``)."""
        return Path(self.root) / check_confined(image_id, f"image folder {self.root}")

    def __call__(self, image_id: str) -> Image.Image:
        path = self.path(image_id)
        if not path.is_file():
            raise FileNotFoundError(f"image {image_id!r} is not a file under {self.root} (looked for {path})")
        with Image.open(path) as image:
            image.load()  # read now so the file handle closes here, not in a later worker
            return image


@dataclass(frozen=True)
class ImageSet:
    """Labelled images: ``ids[i]`` has label ``labels[i]``, a name in ``classnames``.

    ``ids`` are stable strings (relative paths for files, names for generated images) and are
    what the sampler saves and the feature cache keys on; they may repeat (few-shot sets drawn
    with replacement). ``name`` says where the set comes from, e.g. ``"oxford_pets/train"``.
    """

    ids: tuple[str, ...]
    labels: tuple[int, ...]
    classnames: tuple[str, ...]
    reader: Reader = field(repr=False, compare=False)
    name: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "ids", tuple(str(i) for i in self.ids))
        object.__setattr__(self, "labels", tuple(int(y) for y in self.labels))
        object.__setattr__(self, "classnames", tuple(str(c) for c in self.classnames))
        if len(self.ids) != len(self.labels):
            raise ValueError(f"ImageSet {self.name!r}: {len(self.ids)} ids but {len(self.labels)} labels; "
                             "give one label per id")
        if not self.classnames:
            raise ValueError(f"ImageSet {self.name!r}: classnames is empty; give one name per class")
        bad = [y for y in self.labels if not 0 <= y < len(self.classnames)]
        if bad:
            raise ValueError(f"ImageSet {self.name!r}: labels {sorted(set(bad))[:5]} are outside "
                             f"0..{len(self.classnames) - 1} (there are {len(self.classnames)} classnames)")
        if not callable(self.reader):
            raise TypeError(f"ImageSet {self.name!r}: reader must be a callable id -> PIL.Image, "
                            f"got {type(self.reader).__name__}")

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def num_classes(self) -> int:
        return len(self.classnames)

    def load_image(self, i: int) -> Image.Image:
        """Image ``i`` as RGB (CLIP expects three channels; grayscale sets are converted)."""
        image = self.reader(self.ids[i])
        return image if image.mode == "RGB" else image.convert("RGB")

    def subset(self, indices: Sequence[int], name: str | None = None) -> ImageSet:
        """The images at ``indices``, in that order (repeats allowed), sharing this set's reader."""
        n = len(self)
        indices = [int(i) for i in indices]
        bad = [i for i in indices if not -n <= i < n]
        if bad:
            raise IndexError(f"ImageSet {self.name!r} has {n} images; indices {bad[:5]} are out of range")
        return ImageSet(
            ids=tuple(self.ids[i] for i in indices),
            labels=tuple(self.labels[i] for i in indices),
            classnames=self.classnames,
            reader=self.reader,
            name=self.name if name is None else name,
        )

    def class_counts(self) -> tuple[int, ...]:
        """Images per class, indexed by label (zeros included)."""
        counts = Counter(self.labels)
        return tuple(counts.get(k, 0) for k in range(self.num_classes))

    def indices_by_class(self) -> tuple[tuple[int, ...], ...]:
        """For each label, the indices of its images ordered by id (so order never depends on listing)."""
        groups: list[list[int]] = [[] for _ in self.classnames]
        for i, y in enumerate(self.labels):
            groups[y].append(i)
        return tuple(tuple(sorted(g, key=lambda i: (self.ids[i], i))) for g in groups)
