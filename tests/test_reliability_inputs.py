"""Inputs that used to give wrong output or a confusing error (issue 16; the review's case in each test).

Every test here failed before its fix: stale features for edited image folders, calibration writing
into a read-only cache, unnamed corrupt weight files, a SafeClassifier accepted on another trunk,
dataset options checked only at run time, paths leaving their folders, a CLI that misread JSON.
"""
import copy
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file

from safelib.atomic import host_tag
import safelib as sl
import safelib.data as D
import safelib.features.cache as cache_module
from safelib.clip.miniclip import CHECKPOINT, MiniClipConfig, build_miniclip, load_weights_file
from safelib.data.imagenet_archive import ArchiveIndex, extract_images, index_train_archive
from safelib.features.cache import CacheError, CacheWriter
from safelib.features.extract import cache_image_features
from safelib.methods.classifier import SafeClassifier
from safelib.methods.safe import trainable_attnpool
from safelib.perf import calibration
from safelib.runs.__main__ import main as runs_main


# ----------------------------------------------------------------- 3.13: folder datasets' cache keys
def _folder_set(root, colours=((200, 0, 0), (0, 200, 0), (0, 0, 200), (90, 90, 90))):
    root.mkdir(parents=True, exist_ok=True)
    for k, colour in enumerate(colours):
        Image.new("RGB", (40, 40), colour).save(root / f"img{k}.png")
    ids = tuple(f"img{k}.png" for k in range(len(colours)))
    return D.ImageSet(ids, tuple(k % 2 for k in range(len(ids))), ("a", "b"), D.FolderReader(root), "toy/test")


def _pooled(clip, images, cache):
    return cache_image_features(clip, images, cache, split="test", kind="pooled", progress=False)


def test_replaced_image_gets_a_new_cache_entry_and_a_copied_folder_the_same(tiny_clip, tmp_path):
    """Case 3.13: the key held ids only, so a replaced image was served its old features."""
    images = _folder_set(tmp_path / "data")
    before = _pooled(tiny_clip, images, tmp_path / "cache")
    Image.new("RGB", (40, 40), (255, 255, 0)).save(tmp_path / "data" / "img1.png")   # replace one image
    after = _pooled(tiny_clip, images, tmp_path / "cache")
    assert after.path != before.path
    assert not torch.equal(after.to_tensor(0)[1], before.to_tensor(0)[1])
    torch.testing.assert_close(after.to_tensor(0)[0], before.to_tensor(0)[0])
    # copied elsewhere (new paths and mtimes, same bytes): the same entry, no rebuild
    shutil.copytree(tmp_path / "data", tmp_path / "copy")
    copied = D.ImageSet(images.ids, images.labels, images.classnames, D.FolderReader(tmp_path / "copy"), images.name)
    assert _pooled(tiny_clip, copied, tmp_path / "cache").path == after.path


def test_deleted_image_is_a_clear_error_not_old_features(tiny_clip, tmp_path):
    images = _folder_set(tmp_path / "data")
    _pooled(tiny_clip, images, tmp_path / "cache")
    (tmp_path / "data" / "img2.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"'img2.png'.*is gone.*img2.png does not exist"):
        _pooled(tiny_clip, images, tmp_path / "cache")


def test_image_files_digest_is_content_memoised_and_none_for_generated_sets(tmp_path, monkeypatch):
    import safelib.data.fingerprint as fingerprint

    images = _folder_set(tmp_path / "data")
    memo = tmp_path / "memo"
    first = D.image_files_digest(images, memo)
    assert len(list(memo.glob("*.json"))) == 1
    hashed = []
    monkeypatch.setattr(fingerprint, "_file_hash", lambda path: hashed.append(path) or "x")
    assert D.image_files_digest(images, memo) == first and hashed == []            # the memo spares rehashing
    os.utime(tmp_path / "data" / "img0.png", ns=(1, 1))                             # touched: hashed again
    D.image_files_digest(images, memo)
    assert [p.name for p in hashed] == ["img0.png"]
    monkeypatch.undo()
    # repeats (a few-shot set drawn with replacement) and order do not change what the files hold
    assert D.image_files_digest(images.subset([3, 2, 1, 0, 0]), None) == D.image_files_digest(images, None)
    # the mini-world's sets keep their cache keys: their name already says what they hold
    task = D.get_dataset("miniworld_shape_largest", per_class=[1, 1, 1])
    assert D.image_files_digest(task.test, memo) is None


def test_a_read_only_memo_folder_still_gives_the_digest(tmp_path, monkeypatch):
    import safelib.data.fingerprint as fingerprint

    images = _folder_set(tmp_path / "data")

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(tmp_path / "memo"))

    monkeypatch.setattr(fingerprint, "atomic_write_json", refuse)
    assert D.image_files_digest(images, tmp_path / "memo") == D.image_files_digest(images, None)


# ----------------------------------------------------------------- 3.7, 3.11, 2.4: read-only caches, calibration litter
def test_calibration_writes_nothing_into_a_read_only_cache(tmp_path, monkeypatch):
    """Case 3.7: calibration made its temporary folder inside cache_dir (PermissionError when read-only)."""
    writer = CacheWriter(tmp_path / "cache", {"kind": "dense", "ro": 1}, rows=12, item_shape=(64, 2, 2), views=1)
    writer.write(torch.rand(1, 12, 64, 2, 2))
    entry = writer.finish()
    read_only = tmp_path / "cache"
    real_mkdir = os.mkdir

    def mkdir(path, *args, **kwargs):  # the cache folder behaves as mode 555 (tests may run as root)
        if os.path.abspath(path).startswith(str(read_only)):
            raise PermissionError(13, "Permission denied", str(path))
        return real_mkdir(path, *args, **kwargs)

    monkeypatch.setattr(os, "mkdir", mkdir)
    monkeypatch.setattr(calibration, "_MEASURED", {})
    monkeypatch.setattr(calibration.tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    plan = calibration.plan_for_maps(entry, "cpu", batch_size=4, epochs=1, cache_dir=read_only)
    assert plan.as_record()["rates"]["source"].startswith("measured by calibrate()")
    assert list((tmp_path / "tmp").iterdir()) == []


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_calibration_removes_sample_folders_of_dead_processes_only(tmp_path):
    """Case 2.4: a kill -9 during calibration left its 63 MB sample folder forever."""
    host = host_tag()
    dead = tmp_path / f"safelib-calibrate-{host}-{_dead_pid()}-abc123"
    live = tmp_path / f"safelib-calibrate-{host}-{os.getppid()}-def456"    # another shard, still running
    elsewhere = tmp_path / f"safelib-calibrate-otherhost-{_dead_pid()}-ghi789"  # a pid of another machine
    for folder in (dead, live, elsewhere):
        folder.mkdir()
        (folder / "view.npy").write_bytes(b"0" * 100)
    calibration.calibrate("cpu", map_shape=(64, 2, 2), batch_size=4, temp_dir=tmp_path, sample_bytes=2e4, repeats=1)
    assert not dead.exists() and live.exists() and elsewhere.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, elsewhere.name])  # its own is gone too


def _corrupt_entry(root):
    fields = {"kind": "dense", "corrupt": 1}
    writer = CacheWriter(root, fields, rows=4, item_shape=(3,), views=1)
    writer.write(torch.arange(12.0).reshape(1, 4, 3))
    entry = writer.finish()
    data = bytearray((entry.path / "view_000.npy").read_bytes())
    data[-1] ^= 0xFF
    (entry.path / "view_000.npy").write_bytes(bytes(data))
    return fields, entry.path


def test_a_corrupt_entry_in_a_read_only_folder_says_both(tmp_path, monkeypatch):
    """Case 3.11: rmtree(ignore_errors=True) hid the PermissionError; mkdir then said 'File exists'."""
    fields, path = _corrupt_entry(tmp_path)

    def read_only_rmtree(target, ignore_errors=False, **kwargs):  # what rmtree does in a mode-555 folder
        if not ignore_errors:
            raise PermissionError(13, "Permission denied", str(target / "view_000.npy"))

    monkeypatch.setattr(cache_module.shutil, "rmtree", read_only_rmtree)
    with pytest.raises(CacheError, match=r"is corrupt: view_000.npy chunk 0.*checksum.*cache folder is read-only"):
        CacheWriter(tmp_path, fields, rows=4, item_shape=(3,), views=1)


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_corrupt_entry_in_a_really_read_only_folder(tmp_path):
    fields, path = _corrupt_entry(tmp_path)
    path.chmod(0o555)
    try:
        with pytest.raises(CacheError, match="is corrupt.*read-only"):
            CacheWriter(tmp_path, fields, rows=4, item_shape=(3,), views=1)
    finally:
        path.chmod(0o755)


# ----------------------------------------------------------------- 1.32, 1.33, 1.38: damaged weight files
@pytest.mark.parametrize("damage", ["random", "truncated", "empty"])
def test_corrupt_safetensors_name_the_file(tmp_path, damage):
    """Case 1.32: 'header too large' without the file's name."""
    data = CHECKPOINT.read_bytes()
    content = {"random": np.random.default_rng(0).bytes(4096), "truncated": data[:len(data) // 2], "empty": b""}
    path = tmp_path / f"{damage}.safetensors"
    path.write_bytes(content[damage])
    with pytest.raises(ValueError, match=rf"{damage}.safetensors is not a valid safetensors file"):
        sl.load_clip("miniclip", path)


def test_weights_of_another_architecture_are_named(tmp_path, make_tiny_clip):
    """Case 1.33: an AssertionError / size-mismatch RuntimeError from inside the loader."""
    with pytest.raises(ValueError, match=r"miniclip.safetensors holds weights of another architecture than tiny"):
        load_weights_file(make_tiny_clip().model, CHECKPOINT, "tiny")
    # a mini-CLIP file whose metadata describes another model than its tensors
    tensors = load_file(str(CHECKPOINT))
    other = MiniClipConfig(vision_width=8).to_open_clip()
    save_file(tensors, str(tmp_path / "m.safetensors"), metadata={"open_clip_config": json.dumps(other)})
    with pytest.raises(ValueError, match=r"m.safetensors holds weights of another architecture.*other shapes"):
        build_miniclip(tmp_path / "m.safetensors")
    save_file(tensors, str(tmp_path / "bad.safetensors"), metadata={"open_clip_config": "{not json"})
    with pytest.raises(ValueError, match=r"bad.safetensors: its metadata is not JSON"):
        build_miniclip(tmp_path / "bad.safetensors")


@pytest.fixture()
def classifier(tiny_clip):
    tuned = trainable_attnpool(tiny_clip.attnpool)
    with torch.no_grad():
        for p in tuned.parameters():
            p.add_(0.05 * torch.randn_like(p))
    text = F.normalize(torch.randn(tiny_clip.embed_dim, 3), dim=0)
    return SafeClassifier(tiny_clip, tuned, text, ("a", "b", "c"), ("a {}.",), blend=0.5)


def _rewrite(path, tensors=None, **metadata):
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        old = {k: f.get_tensor(k) for k in f.keys()}
        meta = {**(f.metadata() or {}), **metadata}
    save_file(old if tensors is None else tensors(old), str(path), metadata=meta)


def test_tampered_classifier_files_name_the_file(tiny_clip, classifier, tmp_path):
    """Case 1.38: a raw JSONDecodeError / load_state_dict RuntimeError without the path."""
    path = classifier.save(tmp_path / "c.safetensors")
    _rewrite(path, classnames="not json")
    with pytest.raises(ValueError, match=r"c.safetensors is a damaged SafeClassifier file \(JSONDecodeError"):
        SafeClassifier.load(path, tiny_clip)
    path = classifier.save(tmp_path / "d.safetensors")
    _rewrite(path, tensors=lambda t: {k: v for k, v in t.items() if k != "attnpool.c_proj.weight"})
    with pytest.raises(ValueError, match=r"d.safetensors is a damaged SafeClassifier file.*c_proj.weight"):
        SafeClassifier.load(path, tiny_clip)


# ----------------------------------------------------------------- 1.37: SafeClassifier on another trunk
def test_classifier_refuses_a_model_with_another_trunk(tiny_clip, classifier, tmp_path):
    """Case 1.37: only attnpool was fingerprinted, so another trunk was accepted (logits off by 0.70)."""
    path = classifier.save(tmp_path / "c.safetensors")
    model = copy.deepcopy(tiny_clip.model)
    with torch.no_grad():
        model.visual.conv1.weight.neg_()
    other = sl.clip.wrap_clip("tiny", None, model, tiny_clip.tokenizer)
    with pytest.raises(ValueError, match=r"weights.*differ.*image tower digest"):
        SafeClassifier.load(path, other)
    assert SafeClassifier.load(path, tiny_clip).blend == 0.5        # the same weights still load


def test_older_classifier_files_are_refused_clearly(tiny_clip, classifier, tmp_path):
    path = classifier.save(tmp_path / "c.safetensors")
    _rewrite(path, format="safelib.SafeClassifier/2")
    with pytest.raises(ValueError, match=r"older safelib.*only the attention pooling.*again"):
        SafeClassifier.load(path, tiny_clip)


# ----------------------------------------------------------------- 1.24-1.26: dataset options, before any work
@pytest.mark.parametrize("name, options, match", [
    ("miniworld_shape_largest", {"bogus": 1}, r"unknown option 'bogus' \(= 1\).*per_class: a list of 3 ints"),
    ("miniworld_shape_largest", {"per_class": "abc"}, r"option 'per_class'.*must be a list of 3 ints, got str 'abc'"),
    ("miniworld_shape_largest", {"seed": True}, r"option 'seed'.*must be an int, got bool True"),
    ("miniworld_shape_largest", {"attribute": "colour"}, r"'attribute'.*fixed by the dataset's name"),
    ("miniworld_shape_largest", {"per_class": [4, 2, 0]}, r"\[4, 2, 0\].*per_class must be three counts >= 1"),
    ("oxford_pets", {"per_class": [4, 2, 6]}, r"dataset 'oxford_pets' takes no options, got \{'per_class'"),
    ("elpv", {"treshold": 0.5}, r"unknown option 'treshold' \(= 0.5\) for dataset 'elpv'; its options are: threshold"),
])
def test_bad_dataset_options_are_named_before_any_work(name, options, match):
    with pytest.raises(ValueError, match=match):
        D.check_dataset_options(name, options)


def test_get_dataset_checks_its_options_first(monkeypatch):
    import safelib.data.miniworld_tasks as tasks

    monkeypatch.setattr(tasks, "task_splits", lambda task: pytest.fail("built before the options were checked"))
    with pytest.raises(ValueError, match="unknown option 'bogus'"):
        D.get_dataset("miniworld_shape_largest", bogus=1)
    D.check_dataset_options("miniworld_shape_largest", {"per_class": [4, 2, 6], "seed": 7, "test_style": None})


# ----------------------------------------------------------------- S.4, S.5: paths stay in their folders
@pytest.mark.parametrize("entry", ["../../outside.jpg", "/etc/outside.jpg", "a/../../x.jpg", "C:\\x.jpg"])
def test_split_file_entries_outside_the_image_folder_are_refused(tmp_path, entry):
    split = tmp_path / "split.json"
    split.write_text(json.dumps({"train": [["cat/1.jpg", 0, "cat"], [entry, 1, "dog"]], "val": [], "test": []}))
    with pytest.raises(D.SplitFormatError, match=rf"split.json \['train'\]: entry {re.escape(repr(entry))} is not "
                                                 r"a relative path inside"):
        D.read_coop_split(split, tmp_path / "images")
    with pytest.raises(ValueError, match="not a relative path inside"):
        D.FolderReader(tmp_path / "images")(entry)


def test_a_tampered_imagenet_index_cannot_write_outside(tmp_path):
    archive = tmp_path / "train.tar"
    with tarfile.open(archive, "w"):
        pass
    index_path = tmp_path / "index.json"
    index_path.write_text(json.dumps({"version": 1, "archive": str(archive), "archive_bytes": archive.stat().st_size,
                                      "members": {"n01440764/a.JPEG": [0, 1], "../../escaped.JPEG": [0, 1]}}))
    with pytest.raises(ValueError, match=r"index.json: entry '../../escaped.JPEG' is not a relative path"):
        index_train_archive(archive, index_path)
    bad = ArchiveIndex(str(archive), archive.stat().st_size, {"../../escaped.JPEG": (0, 1)})
    with pytest.raises(ValueError, match="'../../escaped.JPEG' is not a relative path"):
        extract_images(bad, [["../../escaped.JPEG"]], tmp_path / "a" / "b" / "dest")
    assert not (tmp_path / "escaped.JPEG").exists() and not (tmp_path / "a").exists()


# ----------------------------------------------------------------- 1.40: --method-config that is not an object
@pytest.mark.parametrize("value, kind", [('"safe"', 'string: "safe"'), ("[1, 2]", r"array: \[1, 2\]")])
def test_cli_method_config_must_be_an_object(value, kind, capsys, tmp_path):
    with pytest.raises(SystemExit) as stop:
        runs_main(["--methods", "safe", "--method-config", value, "--out-dir", str(tmp_path),
                   "--cache-dir", str(tmp_path / "cache")])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "--method-config must be a JSON object mapping method names to option dicts" in err
    assert re.search(f"got a JSON {kind}", err)
    assert not (tmp_path / "cache").exists()


# ----------------------------------------------------------------- 1.6: short classes, in words
def test_few_shot_warnings_say_how_many_images_and_shots():
    images = D.ImageSet(tuple(f"{k}-{i}" for k in range(2) for i in range(3 + 17 * k)),
                        tuple(k for k in range(2) for _ in range(3 + 17 * k)), ("few", "many"),
                        lambda i: Image.new("RGB", (4, 4)), "toy/train")
    with pytest.warns(D.FewShotWarning, match=r"class 'few' has only 3 images but 8 shots per class were asked "
                                              r"for: drawing 8 with replacement"):
        D.sample_few_shot(images, 8, seed=1, val_shots=0)


def test_a_byte_flipped_checkpoint_is_refused_by_its_digest(tmp_path):
    """Review case 1.34: safetensors has no checksum, so flipped bytes in a tensor loaded silently. The
    sha256 written beside an exported checkpoint (the shipped one too) now catches them before any work."""
    copy_ = tmp_path / "miniclip.safetensors"
    shutil.copy(CHECKPOINT, copy_)
    shutil.copy(CHECKPOINT.with_name(CHECKPOINT.name + ".sha256"), tmp_path / "miniclip.safetensors.sha256")
    build_miniclip(copy_)  # an intact copy with its digest loads
    data = bytearray(copy_.read_bytes())
    middle = len(data) // 2
    for i in range(middle, middle + 4096, 7):  # the review's damage: every 7th byte of a 4 KiB window
        data[i] ^= 0xFF
    copy_.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"damaged or was edited: its sha256 is .* recorded"):
        build_miniclip(copy_)
    with pytest.raises(ValueError, match="damaged"):
        sl.load_clip("miniclip", str(copy_))
