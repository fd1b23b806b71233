"""The registry and each split source, on tiny fake datasets in CoOp's (and torchvision's) layout."""
import json
import random
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import safelib.data as D
from safelib.data.__main__ import registry_table
from safelib.data.benchmarks import imagenet_names

WNIDS = ("n01440764", "n01443537", "n01484850")  # tench, goldfish, great white shark


def write_image(path: Path, value: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (6, 6), (value % 256, 0, 0)).save(path)


def make_coop(root: Path, folder: str, image_dir: str, split_file: str, classes=("Abyssinian", "great_pyrenees"),
              per_split=(3, 2, 2), seed=0) -> dict:
    """Images + a split_zhou json whose entries are listed in a shuffled order."""
    rng = random.Random(seed)
    data = {}
    for part, n in zip(("train", "val", "test"), per_split):
        rows = []
        for label, name in enumerate(classes):
            for j in range(n):
                rel = f"{name}/{part}_{j}.jpg"
                write_image(root / folder / image_dir / rel, 10 * label + j)
                rows.append([rel, label, name])
        rng.shuffle(rows)
        data[part] = rows
    (root / folder / split_file).write_text(json.dumps(data))
    return data


def test_registry_lists_the_paper_datasets_in_order():
    names = D.list_datasets()
    assert names[:11] == ["imagenet", "caltech101", "oxford_pets", "stanford_cars", "oxford_flowers", "food101",
                          "fgvc_aircraft", "sun397", "dtd", "eurosat", "ucf101"]
    assert D.list_datasets("domain-shift") == ["imagenet_v2", "imagenet_sketch", "imagenet_a", "imagenet_r"]
    assert {"textile", "elpv", "skimage"} <= set(D.list_datasets("offline"))
    assert "miniworld_shape_largest" in D.list_datasets("generated")  # registered on import
    with pytest.raises(ValueError, match="kind must be one of"):
        D.list_datasets("nope")


def test_unknown_name_lists_valid_ones():
    with pytest.raises(KeyError, match="registered datasets are: imagenet, caltech101"):
        D.get_dataset("oxford_petz")


def test_coop_split_reads_sorted_cleaned_and_labelled(tmp_path):
    data = make_coop(tmp_path, "oxford_pets", "images", "split_zhou_OxfordPets.json")
    ds = D.get_dataset("oxford_pets", root=tmp_path)
    assert ds.classnames == ("Abyssinian", "great pyrenees")  # CoOp's '_' read as spaces
    assert ds.templates == ("a photo of a {}, a type of pet.",)
    assert (len(ds.train), len(ds.val), len(ds.test)) == (6, 4, 4)
    assert list(ds.train.ids) == sorted(ds.train.ids)
    expected = {rel: label for rel, label, _ in data["test"]}
    assert dict(zip(ds.test.ids, ds.test.labels)) == expected
    assert ds.train.name == "oxford_pets/train" and ds.root == tmp_path / "oxford_pets"
    assert np.asarray(ds.test.load_image(0)).shape == (6, 6, 3)


def test_stanford_cars_paths_are_relative_to_the_dataset_folder(tmp_path):
    folder = tmp_path / "stanford_cars"
    rows = {"train": [["cars_train/00001.jpg", 0, "AM General Hummer SUV 2000"]],
            "val": [["cars_train/00002.jpg", 0, "AM General Hummer SUV 2000"]],
            "test": [["cars_test/00001.jpg", 0, "AM General Hummer SUV 2000"]]}
    for part in rows.values():
        write_image(folder / part[0][0])
    (folder / "split_zhou_StanfordCars.json").write_text(json.dumps(rows))
    ds = D.get_dataset("stanford_cars", root=tmp_path)
    assert ds.test.ids == ("cars_test/00001.jpg",) and ds.test.load_image(0).size == (6, 6)


def test_fgvc_aircraft_reads_the_official_variant_files(tmp_path):
    folder = tmp_path / "fgvc_aircraft"
    variants = ["707-320", "A300B4", "Cessna 172"]  # file order is the label order; names may have spaces
    (folder / "images").mkdir(parents=True)
    (folder / "variants.txt").write_text("\n".join(variants) + "\n")
    lines = {"train": ["0034309 Cessna 172", "0001008 707-320", "0062000 A300B4"],
             "val": ["1000001 A300B4"], "test": ["2000002 Cessna 172", "2000001 707-320"]}
    for part, rows in lines.items():
        (folder / f"images_variant_{part}.txt").write_text("\n".join(rows) + "\n")
        for row in rows:
            write_image(folder / "images" / f"{row.split()[0]}.jpg")
    ds = D.get_dataset("fgvc_aircraft", root=tmp_path)
    assert ds.classnames == tuple(variants)
    assert ds.train.ids == ("0001008.jpg", "0034309.jpg", "0062000.jpg") and ds.train.labels == (0, 2, 1)
    assert ds.test.labels == (0, 2) and len(ds.val) == 1
    (folder / "images_variant_val.txt").write_text("1000001 Boeing 999\n")
    with pytest.raises(D.SplitFormatError, match="'Boeing 999' is not in variants.txt"):
        D.get_dataset("fgvc_aircraft", root=tmp_path)


def make_imagenet(root: Path, wnids=WNIDS, n_train=6, n_val=2) -> None:
    for k, wnid in enumerate(wnids):
        for j in range(n_train):
            write_image(root / "imagenet/images/train" / wnid / f"{wnid}_{j}.JPEG", j)
        for j in range(n_val):
            write_image(root / "imagenet/images/val" / wnid / f"ILSVRC2012_val_{k}{j}.JPEG", j)


def test_imagenet_has_no_val_split_and_uses_clip_names(tmp_path):
    make_imagenet(tmp_path)
    ds = D.get_dataset("imagenet", root=tmp_path)
    assert ds.val is None and ds.classnames == ("tench", "goldfish", "great white shark")
    assert len(ds.train) == 18 and len(ds.test) == 6 and ds.test.name == "imagenet/test"
    assert ds.templates == D.dataset_spec("imagenet").prompt_templates() and len(ds.templates) == 7
    with pytest.raises(ValueError, match="no 'val' split"):
        ds.split("val")


def test_imagenet_classnames_txt_wins_when_present(tmp_path):
    make_imagenet(tmp_path)
    (tmp_path / "imagenet/classnames.txt").write_text("n01440764 my tench\nn01443537 gold fish\n"
                                                      "n01484850 big shark\n")
    assert D.get_dataset("imagenet", root=tmp_path).classnames == ("my tench", "gold fish", "big shark")


def test_offline_imagenet_names_are_the_1000_clip_names_in_wnid_order():
    names = imagenet_names()
    assert len(names) == 1000 and list(names) == sorted(names)
    assert names["n01440764"] == "tench" and names["n15075141"] == "toilet paper"


def test_imagenet_flat_val_is_reported(tmp_path):
    make_imagenet(tmp_path)
    val = tmp_path / "imagenet/images/val"
    for wnid in WNIDS:
        for f in (val / wnid).iterdir():
            f.rename(val / f.name)
        (val / wnid).rmdir()
    with pytest.raises(D.DatasetMissingError, match="val is flat"):
        D.get_dataset("imagenet", root=tmp_path)


def test_imagenet_variants_by_index_and_200_class_subsets(tmp_path):
    for label in (0, 2, 1):
        write_image(tmp_path / f"imagenetv2/imagenetv2-matched-frequency-format-val/{label}/a.jpeg")
    v2 = D.get_dataset("imagenet_v2", root=tmp_path)
    assert v2.train is None and v2.val is None
    assert v2.classnames == ("tench", "goldfish", "great white shark") and v2.test.labels == (0, 1, 2)
    for wnid in ("n01443537", "n01484850"):  # a subset, as ImageNet-A/-R are
        write_image(tmp_path / f"imagenet-adversarial/imagenet-a/{wnid}/x.jpg")
    (tmp_path / "imagenet-adversarial/imagenet-a/README.txt").write_text("not a class")
    a = D.get_dataset("imagenet_a", root=tmp_path)
    assert a.classnames == ("goldfish", "great white shark") and a.test.labels == (0, 1)
    write_image(tmp_path / "imagenet-rendition/imagenet-r/not_a_wnid/x.jpg")
    with pytest.raises(ValueError, match="not ImageNet wnids"):
        D.get_dataset("imagenet_r", root=tmp_path)


def test_missing_dataset_says_which_files_go_where(tmp_path):
    with pytest.raises(D.DatasetMissingError) as err:
        D.get_dataset("ucf101", root=tmp_path)
    text = str(err.value)
    assert str(tmp_path / "ucf101/UCF-101-midframes") in text
    assert str(tmp_path / "ucf101/split_zhou_UCF101.json") in text
    assert "drive.google.com" in text and "KaiyangZhou/CoOp" in text
    make_coop(tmp_path, "dtd", "images", "split_zhou_DescribableTextures.json")
    (tmp_path / "dtd/split_zhou_DescribableTextures.json").unlink()
    with pytest.raises(D.DatasetMissingError, match="split_zhou_DescribableTextures.json") as err:
        D.get_dataset("dtd", root=tmp_path)
    assert str(tmp_path / "dtd/images") not in str(err.value).split("Missing:")[1].split("How")[0]


def test_data_root_comes_from_the_environment(tmp_path, monkeypatch):
    make_coop(tmp_path, "eurosat", "2750", "split_zhou_EuroSAT.json", classes=("Annual Crop Land", "Forest"))
    monkeypatch.setenv("SAFELIB_DATA", str(tmp_path))
    assert D.get_dataset("eurosat").classnames == ("Annual Crop Land", "Forest")
    assert D.dataset_spec("eurosat").is_present()


@pytest.mark.parametrize("content, match", [
    ("{not json", "not valid JSON"),
    (json.dumps({"train": [], "test": []}), r"no \['val'\] entries"),
    (json.dumps({"train": [["a.jpg", 0]], "val": [], "test": []}), r"\[path, label, classname\]"),
    (json.dumps({"train": [["a.jpg", 0, "cat"]], "val": [["b.jpg", 0, "dog"]], "test": []}),
     "called both 'cat' and 'dog'"),
    (json.dumps({"train": [["a.jpg", 1, "cat"]], "val": [], "test": []}), "without gaps"),
])
def test_bad_split_files_are_explained(tmp_path, content, match):
    folder = tmp_path / "caltech-101"
    (folder / "101_ObjectCategories").mkdir(parents=True)
    (folder / "split_zhou_Caltech101.json").write_text(content)
    with pytest.raises(D.SplitFormatError, match=match):
        D.get_dataset("caltech101", root=tmp_path)


def test_adopt_links_torchvision_folders_into_coop_layout(tmp_path):
    # torchvision's layouts: oxford-iiit-pet/images, dtd/dtd/images, fgvc-aircraft-2013b/data/...
    make_coop(tmp_path, "oxford-iiit-pet", "images", "unused.json")
    make_coop(tmp_path, "dtd/dtd", "images", "unused.json", classes=("banded", "woven"))
    (tmp_path / "oxford-iiit-pet/annotations").mkdir()
    made = D.adopt_torchvision("oxford_pets", tmp_path)
    assert sorted(p.name for p in made) == ["annotations", "images"]
    assert (tmp_path / "oxford_pets/images").is_symlink()
    (tmp_path / "oxford_pets/split_zhou_OxfordPets.json").write_text(
        (tmp_path / "oxford-iiit-pet/unused.json").read_text())
    assert len(D.get_dataset("oxford_pets", root=tmp_path).train) == 6
    assert D.adopt_torchvision("oxford_pets", tmp_path) == []  # idempotent: existing links are kept
    D.adopt_torchvision("dtd", tmp_path)
    (tmp_path / "dtd/split_zhou_DescribableTextures.json").write_text((tmp_path / "dtd/dtd/unused.json").read_text())
    assert D.get_dataset("dtd", root=tmp_path).classnames == ("banded", "woven")

    fgvc = tmp_path / "fgvc-aircraft-2013b/data"
    write_image(fgvc / "images/0000001.jpg")
    (fgvc / "variants.txt").write_text("707-320\n")
    for part in ("train", "val", "test"):
        (fgvc / f"images_variant_{part}.txt").write_text("0000001 707-320\n")
    D.adopt_torchvision("fgvc_aircraft", tmp_path)
    assert D.get_dataset("fgvc_aircraft", root=tmp_path).test.ids == ("0000001.jpg",)


def test_adopt_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no torchvision download of 'sun397'"):
        D.adopt_torchvision("sun397", tmp_path)
    with pytest.raises(ValueError, match="no torchvision download to adopt"):
        D.adopt_torchvision("ucf101", tmp_path)


def in_memory_splits(_dir, n_per_class=3, **_):
    reader = lambda image_id: Image.new("RGB", (4, 4), (int(image_id.split("-")[1]) * 40, 0, 0))  # noqa: E731
    ids = [f"shape-{k}-{j}" for k in range(2) for j in range(n_per_class)]
    images = D.ImageSet(ids, [int(i.split("-")[1]) for i in ids], ("circle", "square"), reader, "gen")
    return images, None, images


def test_register_a_generated_dataset_with_options_and_templates():
    D.register("toygen", in_memory_splits, kind="generated", templates=("a drawing of a {}.",),
               how_to_get="generated in memory")
    try:
        ds = D.get_dataset("toygen", n_per_class=5)
        assert len(ds.test) == 10 and ds.templates == ("a drawing of a {}.",) and ds.root is None
        assert "toygen" in D.list_datasets("generated") and D.dataset_spec("toygen").is_present()
        with pytest.raises(ValueError, match="already registered"):
            D.register("toygen", in_memory_splits)
    finally:
        D.unregister("toygen")
    assert "toygen" not in D.list_datasets()


@pytest.mark.parametrize("fields, match", [
    (dict(name="Bad Name"), "lower-case"),
    (dict(kind="nope"), "kind must be one of"),
    (dict(templates=("no placeholder",)), r"one '\{\}'"),
    (dict(build="not callable"), "build must be callable"),
])
def test_register_validates(fields, match):
    args = dict(name="x_ok", build=in_memory_splits)
    args.update(fields)
    with pytest.raises((ValueError, TypeError), match=match):
        D.register(args.pop("name"), args.pop("build"), **args)
    assert "x_ok" not in D.list_datasets()


def test_templates_missing_and_download_unavailable(tmp_path):
    D.register("notemplates", in_memory_splits, kind="custom")
    D.register("needsfiles", in_memory_splits, folder="needsfiles", required=("a.txt",), templates=("{}",))
    try:
        with pytest.raises(KeyError, match="pass templates= to register"):
            D.get_dataset("notemplates")
        with pytest.raises(D.DatasetMissingError, match="no automatic download"):
            D.get_dataset("needsfiles", root=tmp_path, download=True)
    finally:
        D.unregister("notemplates")
        D.unregister("needsfiles")


def test_cli_prints_present_and_missing(tmp_path, capsys):
    make_coop(tmp_path, "oxford_pets", "images", "split_zhou_OxfordPets.json")
    table = registry_table(str(tmp_path), verbose=True)
    rows = {line.split()[0]: line for line in table.splitlines()[3:] if line and not line.startswith(" ")}
    assert "present" in rows["oxford_pets"] and "missing" in rows["caltech101"]
    assert "present" in rows["textile"]
    assert "split_zhou_Caltech101.json" in table and "image-net.org" in table
    from safelib.data.__main__ import main

    main(["--root", str(tmp_path)])
    assert "oxford_pets" in capsys.readouterr().out


def test_download_runs_torchvision_then_adopts_then_fetches_the_split(tmp_path, monkeypatch):
    """No network in tests: torchvision's class and the Google Drive fetch are replaced by fakes
    that write what the real ones would, so the wiring (folders, adopt, split file) is checked."""
    import torchvision.datasets
    import torchvision.datasets.utils

    calls = []

    class FakePets:
        def __init__(self, root, download=False):
            calls.append(("torchvision", root, download))
            make_coop(Path(root), "oxford-iiit-pet", "images", "split.json")

    def fake_gdrive(file_id, folder, filename):
        calls.append(("gdrive", file_id, filename))
        (Path(folder) / filename).write_text((tmp_path / "oxford-iiit-pet/split.json").read_text())

    monkeypatch.setattr(torchvision.datasets, "OxfordIIITPet", FakePets)
    monkeypatch.setattr(torchvision.datasets.utils, "download_file_from_google_drive", fake_gdrive)
    ds = D.get_dataset("oxford_pets", root=tmp_path, download=True)
    assert len(ds.train) == 6 and (tmp_path / "oxford_pets/images").is_symlink()
    assert calls == [("torchvision", str(tmp_path), True),
                     ("gdrive", "1501r8Ber4nNKvmlFVQZ8SeUHTcdTTEqs", "split_zhou_OxfordPets.json")]
    D.get_dataset("oxford_pets", root=tmp_path, download=True)  # present: nothing is fetched again
    assert len(calls) == 2


def test_imagenet_train_and_val_must_have_the_same_classes(tmp_path):
    make_imagenet(tmp_path)
    write_image(tmp_path / "imagenet/images/train/n01491361/extra.JPEG")  # a fourth class only in train
    with pytest.raises(ValueError, match="4 class folders but images/val has 3"):
        D.get_dataset("imagenet", root=tmp_path)


def test_split_dataset_split_names_and_disagreeing_classnames():
    ds = D.get_dataset("textile")
    assert ds.split("test") is ds.test and ds.num_classes == 3
    with pytest.raises(ValueError, match="split must be 'train', 'val' or 'test'"):
        ds.split("dev")

    def disagree(_dir):
        a = D.ImageSet(["x"], [0], ["cat"], lambda i: None)
        return a, None, D.ImageSet(["y"], [0], ["dog"], lambda i: None)

    D.register("disagree", disagree, templates=("{}",))
    try:
        with pytest.raises(ValueError, match="train and test disagree on class names"):
            D.get_dataset("disagree")
    finally:
        D.unregister("disagree")


def test_split_only_download_fetches_the_coop_split(tmp_path, monkeypatch):
    import torchvision.datasets.utils

    fetched = []
    monkeypatch.setattr(torchvision.datasets.utils, "download_file_from_google_drive",
                        lambda file_id, folder, filename: fetched.append((file_id, Path(folder), filename)))
    with pytest.raises(D.DatasetMissingError, match="UCF-101-midframes"):  # frames cannot be fetched
        D.get_dataset("ucf101", root=tmp_path, download=True)
    assert fetched == [("1I0S0q91hJfsV9Gf4xDIjgDq4AqBNJb1y", tmp_path / "ucf101", "split_zhou_UCF101.json")]
