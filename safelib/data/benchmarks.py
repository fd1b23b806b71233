"""The 11 few-shot benchmarks and the 4 ImageNet domain-shift sets, registered with the field's split sources.

Folder names, image folders and split files are CoOp's (``DATASETS.md`` of KaiyangZhou/CoOp), so a
data root prepared for CoOp, Tip-Adapter or their successors works here unchanged. Where torchvision
downloads a dataset, ``download=True`` fetches it into torchvision's folder and :func:`adopt_torchvision`
links that folder into CoOp's layout; CoOp's split files are fetched from its Google Drive links.
"""
from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .imageset import ImageSet
from .registry import data_root, dataset_spec, register
from .splits import Splits, class_folders, read_class_folders, read_coop_split, read_fgvc_aircraft

COOP_DATASETS_MD = "https://github.com/KaiyangZhou/CoOp/blob/main/DATASETS.md"


def gdrive(file_id: str) -> str:
    return f"https://drive.google.com/file/d/{file_id}/view"


@dataclass(frozen=True)
class CoopSource:
    """A dataset read from CoOp's split json: where its images and split file sit in its folder."""

    image_dir: str  # relative to the dataset folder; "" = the folder itself (StanfordCars)
    split_file: str
    split_gdrive: str  # Google Drive file id of the split file (CoOp's DATASETS.md)

    def __call__(self, dataset_dir: Path) -> Splits:
        return read_coop_split(dataset_dir / self.split_file, dataset_dir / self.image_dir,
                               name=dataset_dir.name)


# name -> (folder, title, source, images how-to, torchvision class or None, torchvision layout links)
# torchvision layout links: (path in CoOp's folder, path under the data root where torchvision puts it)
_COOP: dict[str, tuple] = {
    "caltech101": (
        "caltech-101", "Caltech101",
        CoopSource("101_ObjectCategories", "split_zhou_Caltech101.json", "1hyarUivQE36mY6jSomru6Fjd-JzwcCzN"),
        "images: 101_ObjectCategories.tar.gz from https://data.caltech.edu/records/mzrjq-6wc02, extracted to "
        "caltech-101/101_ObjectCategories/",
        "Caltech101", (("101_ObjectCategories", "caltech101/101_ObjectCategories"),)),
    "oxford_pets": (
        "oxford_pets", "OxfordPets",
        CoopSource("images", "split_zhou_OxfordPets.json", "1501r8Ber4nNKvmlFVQZ8SeUHTcdTTEqs"),
        "images: https://www.robots.ox.ac.uk/~vgg/data/pets/data/images.tar.gz -> oxford_pets/images/ "
        "(annotations.tar.gz -> oxford_pets/annotations/ is optional)",
        "OxfordIIITPet", (("images", "oxford-iiit-pet/images"), ("annotations", "oxford-iiit-pet/annotations"))),
    "stanford_cars": (
        "stanford_cars", "StanfordCars",
        CoopSource("", "split_zhou_StanfordCars.json", "1ObCFbaAgVu0I-k_Au-gIUcefirdAuizT"),
        "images: the Stanford site is gone and torchvision cannot download it (pytorch/vision#7545); the "
        "usual mirror is https://www.kaggle.com/datasets/jessicali9530/stanford-cars-dataset, whose cars_train/ "
        "and cars_test/ are nested one level deeper: move them so that stanford_cars/cars_train/00001.jpg "
        "and stanford_cars/cars_test/00001.jpg exist",
        None, ()),
    "oxford_flowers": (
        "oxford_flowers", "Flowers102",
        CoopSource("jpg", "split_zhou_OxfordFlowers.json", "1Pp0sRXzZFZq15zVOzKjKBu4A9i01nozT"),
        "images: https://www.robots.ox.ac.uk/~vgg/data/flowers/102/102flowers.tgz -> oxford_flowers/jpg/",
        "Flowers102", (("jpg", "flowers-102/jpg"), ("imagelabels.mat", "flowers-102/imagelabels.mat"))),
    "food101": (
        "food-101", "Food101",
        CoopSource("images", "split_zhou_Food101.json", "1QK0tGi096I0Ba6kggatX1ee6dJFIcEJl"),
        "images: food-101.tar.gz from https://data.vision.ee.ethz.ch/cvl/datasets_extra/food-101/ extracted "
        "under the data root (gives food-101/images/)",
        "Food101", ()),  # torchvision's folder is CoOp's
    "sun397": (
        "sun397", "SUN397",
        CoopSource("SUN397", "split_zhou_SUN397.json", "1y2RD81BYuiyvebdN-JymPfyWYcd8_MUq"),
        "images: http://vision.princeton.edu/projects/2010/SUN/SUN397.tar.gz extracted to sun397/SUN397/",
        "SUN397", (("SUN397", "SUN397"),)),
    "dtd": (
        "dtd", "DTD",
        CoopSource("images", "split_zhou_DescribableTextures.json", "1u3_QfB467jqHgNXC00UIzbLZRQCg2S7x"),
        "images: https://www.robots.ox.ac.uk/~vgg/data/dtd/download/dtd-r1.0.1.tar.gz extracted under the data "
        "root (gives dtd/images/)",
        "DTD", (("images", "dtd/dtd/images"), ("labels", "dtd/dtd/labels"), ("imdb", "dtd/dtd/imdb"))),
    "eurosat": (
        "eurosat", "EuroSAT",
        CoopSource("2750", "split_zhou_EuroSAT.json", "1Ip7yaCWFi0eaOFUGga0lUdVi_DDQth1o"),
        "images: download=True (torchvision, from the TorchGeo mirror), or the RGB EuroSAT.zip from "
        "https://github.com/phelber/eurosat extracted to eurosat/2750/",
        "EuroSAT", ()),  # torchvision's folder is CoOp's
    "ucf101": (
        "ucf101", "UCF101",
        CoopSource("UCF-101-midframes", "split_zhou_UCF101.json", "1I0S0q91hJfsV9Gf4xDIjgDq4AqBNJb1y"),
        "images: CoOp's middle frames UCF-101-midframes.zip from "
        + gdrive("10Jqome3vtUA2keJkNanAiFpgbyC9Hc2O") + " extracted to ucf101/UCF-101-midframes/ "
        "(torchvision's UCF101 is videos, not these frames)",
        None, ()),
}

# torchvision layouts for the non-CoOp-split datasets
_FGVC_LINKS = tuple((f, f"fgvc-aircraft-2013b/data/{f}") for f in (
    "images", "variants.txt", "images_variant_train.txt", "images_variant_val.txt", "images_variant_test.txt"))
TORCHVISION_LINKS: dict[str, tuple[tuple[str, str], ...]] = {
    **{name: row[5] for name, row in _COOP.items() if row[4]},  # () = torchvision's folder is CoOp's
    "fgvc_aircraft": _FGVC_LINKS,
    "imagenet": (("images/train", "imagenet/train"), ("images/val", "imagenet/val")),
}
TORCHVISION_CLASSES: dict[str, str] = {n: row[4] for n, row in _COOP.items() if row[4]}
TORCHVISION_CLASSES["fgvc_aircraft"] = "FGVCAircraft"


# ---------------------------------------------------------------- ImageNet and its variants
def imagenet_names(dataset_dir: Path | None = None) -> dict[str, str]:
    """wnid -> the field's cleaned class name, in class-index order.

    CoOp reads ``classnames.txt`` (``<wnid> <name>`` per line, names from CLIP's ImageNet notebook);
    when a dataset folder has one it wins. Otherwise the same list is assembled offline from two
    installed dependencies: timm's sorted list of the 1000 ImageNet-1k wnids (class-index order) and
    open_clip's copy of CLIP's cleaned ImageNet class names (also class-index order).
    """
    if dataset_dir is not None and (Path(dataset_dir) / "classnames.txt").is_file():
        names = {}
        for line in (Path(dataset_dir) / "classnames.txt").read_text().splitlines():
            if line.strip():
                wnid, _, name = line.strip().partition(" ")
                names[wnid] = name.strip()
        return names
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES
    from timm.data import ImageNetInfo

    wnids = ImageNetInfo().label_names()
    if len(wnids) != 1000 or len(IMAGENET_CLASSNAMES) != 1000:
        raise RuntimeError("timm's ImageNet synsets or open_clip's ImageNet class names are not 1000 long; "
                           "put CoOp's classnames.txt (" + gdrive("1-61f_ol79pViBFDG_IDlUQSwoLcn2XXF") +
                           ") in the dataset folder instead")
    return dict(zip(wnids, IMAGENET_CLASSNAMES))


def _wnid_folders(image_dir: Path, names: dict[str, str], name: str) -> ImageSet:
    folders = class_folders(image_dir)
    unknown = [f for f in folders if f not in names]
    if unknown:
        raise ValueError(f"{name}: folders {unknown[:5]} under {image_dir} are not ImageNet wnids (like n01440764)")
    return read_class_folders(image_dir, folders, [names[f] for f in folders], name)


def build_imagenet(dataset_dir: Path) -> Splits:
    """CoOp's ImageNet: train folders, test = the val folders, no validation split (val is None)."""
    names = imagenet_names(dataset_dir)
    train = _wnid_folders(dataset_dir / "images/train", names, "imagenet/train")
    test = _wnid_folders(dataset_dir / "images/val", names, "imagenet/test")
    if train.classnames != test.classnames:
        raise ValueError(f"imagenet: images/train has {train.num_classes} class folders but images/val has "
                         f"{test.num_classes}; both need the same wnid folders")
    return train, None, test


def _imagenet_missing(dataset_dir: Path) -> list[str]:
    out = [str(dataset_dir / p) for p in ("images/train", "images/val") if not (dataset_dir / p).is_dir()]
    val = dataset_dir / "images/val"
    if not out and not class_folders(val):
        out.append(f"{val}/<wnid>/ class folders: val is flat; sort it into wnid folders (torchvision's "
                   "ImageNet(root, split='val') does so from the devkit, then adopt_torchvision)")
    return out


def _build_variant(image_sub: str, by_index: bool) -> Callable[[Path], Splits]:
    def build(dataset_dir: Path) -> Splits:
        names = imagenet_names(dataset_dir)
        image_dir = dataset_dir / image_sub
        if by_index:  # ImageNet-V2 names its folders 0..999 by class index
            by_label = list(names.values())
            folders = sorted(class_folders(image_dir), key=int)
            test = read_class_folders(image_dir, folders, [by_label[int(f)] for f in folders],
                                      f"{dataset_dir.name}/test")
        else:
            test = _wnid_folders(image_dir, names, f"{dataset_dir.name}/test")
        return None, None, test

    return build


_VARIANTS = {
    "imagenet_v2": ("imagenetv2", "ImageNet-V2", "imagenetv2-matched-frequency-format-val", True,
                    "ImageNetV2 matched-frequency (https://github.com/modestyachts/ImageNetV2; "
                    "imagenetv2-matched-frequency.tar.gz) extracted to imagenetv2/"),
    "imagenet_sketch": ("imagenet-sketch", "ImageNet-Sketch", "images", False,
                        "ImageNet-Sketch (https://github.com/HaohanWang/ImageNet-Sketch) extracted so that "
                        "imagenet-sketch/images/<wnid>/ holds the sketches"),
    "imagenet_a": ("imagenet-adversarial", "ImageNet-A", "imagenet-a", False,
                   "ImageNet-A (https://github.com/hendrycks/natural-adv-examples; imagenet-a.tar) extracted to "
                   "imagenet-adversarial/imagenet-a/ (200 wnid folders: the 200-class subset)"),
    "imagenet_r": ("imagenet-rendition", "ImageNet-R", "imagenet-r", False,
                   "ImageNet-R (https://github.com/hendrycks/imagenet-r; imagenet-r.tar) extracted to "
                   "imagenet-rendition/imagenet-r/ (200 wnid folders: the 200-class subset)"),
}

_SPLIT_NOTE = ("split: CoOp's {file} from {url} (linked in " + COOP_DATASETS_MD + ") -> {folder}/{file}")
_CLASSNAMES_NOTE = ("class names: CoOp's classnames.txt (" + gdrive("1-61f_ol79pViBFDG_IDlUQSwoLcn2XXF") +
                    ") in the folder is used when present; otherwise CLIP's cleaned names are assembled "
                    "offline from open_clip and timm")


# ---------------------------------------------------------------- downloads and adopt
def adopt_torchvision(name: str, root: str | Path | None = None) -> list[Path]:
    """Link torchvision's download folders for ``name`` into CoOp's layout; returns the links made.

    torchvision puts Oxford Pets in ``oxford-iiit-pet/``, DTD in ``dtd/dtd/``, FGVCAircraft in
    ``fgvc-aircraft-2013b/data/``...; the registry reads CoOp's ``oxford_pets/``, ``dtd/``,
    ``fgvc_aircraft/``. Links (not copies) cost no disk; existing files are left alone.
    """
    spec = dataset_spec(name)
    if name not in TORCHVISION_LINKS:
        raise ValueError(f"{name!r} has no torchvision download to adopt; ones that do: {sorted(TORCHVISION_LINKS)}")
    root = data_root(root)
    dataset_dir = spec.dataset_dir(root)
    made = []
    sources = [(dataset_dir / mine, root / theirs) for mine, theirs in TORCHVISION_LINKS[name]]
    if sources and not any(src.exists() or dst.exists() for dst, src in sources):
        raise FileNotFoundError(f"no torchvision download of {name!r} under {root}: looked for "
                                + ", ".join(str(s) for _, s in sources))
    for dst, src in sources:
        if dst.exists() or dst.is_symlink() or not src.exists():
            continue
        dst.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.symlink(os.path.relpath(src, dst.parent), dst, target_is_directory=src.is_dir())
        except OSError:  # filesystems without symlinks (some Windows setups): move instead
            os.replace(src, dst)
        made.append(dst)
    return made


def _download_gdrive(file_id: str, folder: Path, filename: str) -> None:
    from torchvision.datasets.utils import download_file_from_google_drive

    if not (folder / filename).is_file():
        folder.mkdir(parents=True, exist_ok=True)
        download_file_from_google_drive(file_id, str(folder), filename)


def _torchvision_download(name: str, split_file: tuple[str, str] | None) -> Callable[[Path], None]:
    def download(dataset_dir: Path) -> None:
        import torchvision.datasets as tvd

        root = dataset_dir.parent
        cls = getattr(tvd, TORCHVISION_CLASSES[name])
        if cls.__name__ == "FGVCAircraft":
            cls(str(root), split="trainval", annotation_level="variant", download=True)
        else:
            cls(str(root), download=True)
        adopt_torchvision(name, root)
        if split_file is not None:
            _download_gdrive(split_file[1], dataset_dir, split_file[0])

    return download


def _split_only_download(split_file: tuple[str, str]) -> Callable[[Path], None]:
    def download(dataset_dir: Path) -> None:
        _download_gdrive(split_file[1], dataset_dir, split_file[0])

    return download


def register_benchmarks() -> None:
    """Register the 11 benchmarks and 4 ImageNet variants (idempotent: re-registering replaces them)."""
    register("imagenet", build_imagenet, overwrite=True, title="ImageNet", kind="benchmark",
             folder="imagenet", required=("images/train", "images/val"), missing=_imagenet_missing,
             how_to_get="images: ILSVRC2012 train and val from https://image-net.org (login required), as "
                        "imagenet/images/train/<wnid>/ and imagenet/images/val/<wnid>/ (torchvision's ImageNet "
                        "folder can be adopted: its train/ and val/ under <root>/imagenet/)\n" + _CLASSNAMES_NOTE +
                        "\nCoOp has no ImageNet validation split: the sampler draws few-shot validation "
                        "images from train images not drawn as shots.")
    for name, (folder, title, source, images_note, tv_class, _links) in _COOP.items():
        if name == "sun397":  # keep the paper's order: FGVCAircraft comes before SUN397
            register("fgvc_aircraft", lambda d: read_fgvc_aircraft(d), overwrite=True, title="FGVCAircraft",
                     kind="benchmark", folder="fgvc_aircraft",
                     required=tuple(f for f, _ in _FGVC_LINKS),
                     how_to_get="https://www.robots.ox.ac.uk/~vgg/data/fgvc-aircraft/archives/"
                                "fgvc-aircraft-2013b.tar.gz: keep its data/ folder and rename it fgvc_aircraft/ "
                                "(official variants.txt + images_variant_{train,val,test}.txt; no split_zhou file)",
                     download=_torchvision_download("fgvc_aircraft", None))
        split = (source.split_file, source.split_gdrive)
        required = (source.image_dir or ".", source.split_file) if source.image_dir else (
            "cars_train", "cars_test", source.split_file)
        how = images_note + "\n" + _SPLIT_NOTE.format(file=source.split_file, url=gdrive(source.split_gdrive),
                                                      folder=folder)
        download = _torchvision_download(name, split) if tv_class else _split_only_download(split)
        register(name, source, overwrite=True, title=title, kind="benchmark", folder=folder,
                 required=required, how_to_get=how, download=download)
    for name, (folder, title, sub, by_index, how) in _VARIANTS.items():
        register(name, _build_variant(sub, by_index), overwrite=True, title=title, kind="domain-shift",
                 folder=folder, required=(sub,), how_to_get=how + "\n" + _CLASSNAMES_NOTE +
                 "\nTest only: few-shot models are trained on ImageNet and evaluated here.")
