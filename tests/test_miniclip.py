"""The mini-CLIP: config, deterministic resumable pretraining, fp16 export, the shipped checkpoint."""
from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch

from safelib.clip.miniclip import CHECKPOINT, build_miniclip, read_metadata
from safelib.clip.miniclip import MiniClipConfig, clip_from_config
from safelib.experiments.miniclip_pretrain import PretrainConfig, learning_rate, pretrain, zero_shot_check

TINY = MiniClipConfig(embed_dim=32, image_size=64, vision_width=8, text_width=32, text_heads=1, text_layers=1)


def tiny_cfg(**kw) -> PretrainConfig:
    return PretrainConfig(model=TINY, **{"steps": 3, "batch_size": 4, "warmup_steps": 1, **kw})


def test_config_builds_a_modified_resnet_with_attnpool():
    model = clip_from_config(TINY.to_open_clip())
    assert type(model.visual).__name__ == "ModifiedResNet"
    assert model.visual.attnpool.positional_embedding.shape == (TINY.grid ** 2 + 1, 8 * 32)
    assert json.loads(json.dumps(TINY.to_open_clip())) == TINY.to_open_clip()
    with pytest.raises(ValueError, match="multiple of 32"):
        MiniClipConfig(image_size=100)


def test_learning_rate_warms_up_then_decays_to_min():
    cfg = PretrainConfig(steps=100, warmup_steps=10)
    lrs = [learning_rate(cfg, s) for s in range(100)]
    assert lrs[0] < lrs[9] == pytest.approx(cfg.lr)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert lrs[-1] == pytest.approx(cfg.min_lr, rel=0.05)


def _states_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_pretraining_is_deterministic_and_resumes_exactly(tmp_path):
    threads = torch.get_num_threads()
    try:
        _check_deterministic_and_resumes(tmp_path)
    finally:
        torch.set_num_threads(threads)


def _check_deterministic_and_resumes(tmp_path):
    cfg = tiny_cfg()
    kw = dict(log_path=None, eval_every=0, progress=False, threads=1)  # one thread: a fixed reduction order
    log1 = pretrain(cfg, tmp_path / "a", tmp_path / "a.safetensors", **kw)
    log2 = pretrain(cfg, tmp_path / "b", tmp_path / "b.safetensors", **kw)
    assert log1["losses"] == log2["losses"] and len(log1["losses"]) == 3
    # stopped after one step, then rerun: the same weights as uninterrupted
    cut = pretrain(cfg, tmp_path / "c", None, stop_at_step=1, **kw)
    assert cut["step"] == 1 and cut["stopped_early"]
    log3 = pretrain(cfg, tmp_path / "c", tmp_path / "c.safetensors", **kw)
    assert log3["losses"] == log1["losses"]
    a = build_miniclip(tmp_path / "a.safetensors").state_dict()
    assert _states_equal(a, build_miniclip(tmp_path / "b.safetensors").state_dict())
    assert _states_equal(a, build_miniclip(tmp_path / "c.safetensors").state_dict())
    # a different config refuses to resume someone else's state
    with pytest.raises(ValueError, match="different config"):
        pretrain(tiny_cfg(seed=1), tmp_path / "c", None, **kw)


def test_export_roundtrip_is_fp16_with_config_metadata(tmp_path):
    from safelib.experiments.miniclip_pretrain import export_checkpoint

    cfg = tiny_cfg()
    torch.manual_seed(0)
    model = clip_from_config(TINY.to_open_clip()).eval()
    export_checkpoint(model, cfg, {"steps_done": 0}, tmp_path / "m.safetensors")
    digest = (tmp_path / "m.safetensors.sha256").read_text().split()
    assert digest == [hashlib.sha256((tmp_path / "m.safetensors").read_bytes()).hexdigest(), "m.safetensors"]
    meta = read_metadata(tmp_path / "m.safetensors")
    assert meta["open_clip_config"] == TINY.to_open_clip() and meta["summary"] == {"steps_done": 0}
    loaded = build_miniclip(tmp_path / "m.safetensors")
    assert not any(p.requires_grad for p in loaded.parameters())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref, got = model.encode_image(x), loaded.encode_image(x)
    assert torch.allclose(ref, got, rtol=2e-2, atol=2e-2)  # fp16 weights, float32 compute
    with pytest.raises(FileNotFoundError, match="pretrain"):
        build_miniclip(tmp_path / "missing.safetensors")


# ----------------------------------------------------------------------------- the shipped checkpoint

shipped = pytest.mark.skipif(not CHECKPOINT.is_file(), reason="the mini-CLIP checkpoint is not trained yet")


@shipped
def test_shipped_checkpoint_is_small_and_fp16():
    assert CHECKPOINT.stat().st_size <= 25 * 2**20
    from safetensors import safe_open

    with safe_open(str(CHECKPOINT), framework="pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16"}


@shipped
def test_shipped_checkpoint_zero_shot_on_fresh_single_objects():
    """Issue 5's acceptance: >= 80 % for 6-way shape and 6-way colour prompts, after the fp16 cast."""
    model = build_miniclip()
    cfg = MiniClipConfig(**{**read_metadata(CHECKPOINT)["miniclip_config"],
                            "vision_layers": tuple(read_metadata(CHECKPOINT)["miniclip_config"]["vision_layers"])})
    acc = zero_shot_check(model, cfg, n_per_class=30, seed=2024)  # not the seeds used while training
    print("zero-shot on fresh single objects:", acc)
    assert acc["shape"] >= 0.80 and acc["colour"] >= 0.80


@shipped
def test_load_clip_miniclip_through_the_public_api():
    import safelib as sl
    from safelib.data import miniworld as mw

    clip = sl.load_clip("miniclip")
    assert clip.grid == 4 and clip.image_size == 128
    W = sl.zero_shot_classifier(clip, mw.SHAPES, mw.SHAPE_TEMPLATES)  # D x K
    rng = np.random.default_rng(5)
    images, labels = [], []
    for k, shape in enumerate(mw.SHAPES):
        for _ in range(8):
            obj = mw.sample_object(rng, 128, mw.get_style("plain"), shape=shape)
            images.append(clip.preprocess(mw.make_scene(rng, objects=(obj,)).image))
            labels.append(k)
    feats = torch.nn.functional.normalize(clip.encode_image(torch.stack(images)), dim=-1)
    acc = ((feats @ W).argmax(1) == torch.tensor(labels)).float().mean().item()
    assert acc >= 0.7  # 48 images: a looser bound than the 360-image acceptance test above


@shipped
@pytest.mark.slow
def test_safe_comparison_regression(tmp_path):
    """A small, deterministic version of the issue-5 table: SAFE should beat zero-shot and look at the target.

    Its runs are ordinary run records (``safelib.runs``); the summary points at them.
    """
    from safelib.experiments.miniclip_eval import EvalConfig, evaluate, markdown_table
    from safelib.runs import read_record

    config = EvalConfig(task="miniworld_colour_largest", shots=8, seeds=(1,), pool_per_class=(8, 4, 20),
                        rows=("zero-shot", "SAFE (all)"), train_views=2,
                        safe={"epochs": 30, "lr": 1e-3, "batch_size": 16})
    cache = str(tmp_path / "cache")
    summary = evaluate(config, cache_dir=cache, out_dir=str(tmp_path / "runs"), progress=False)
    print(markdown_table(summary))
    zero_shot, safe = summary["per_seed"]["zero-shot"][0], summary["per_seed"]["SAFE (all)"][0]
    record = read_record(tmp_path / "runs" / safe["record"])
    assert record["test_acc"] == safe["test_acc"] and record["config"]["method_config"]["trainable"] == "all"
    assert safe["test_acc"] >= zero_shot["test_acc"] + 5.0
    assert safe["target_mass"] > summary["original_target_mass"] == zero_shot["target_mass"]
    again = evaluate(EvalConfig(**{**config.__dict__, "rows": ("SAFE (all)",)}), cache_dir=cache,
                     out_dir=str(tmp_path / "again"), progress=False)
    assert again["per_seed"]["SAFE (all)"][0]["test_acc"] == safe["test_acc"]  # deterministic under the seed
    assert again["per_seed"]["SAFE (all)"][0]["target_mass"] == safe["target_mass"]


def test_init_from_starts_a_phase_from_given_weights(tmp_path):
    from safelib.experiments.miniclip_pretrain import export_checkpoint

    torch.manual_seed(3)
    start = clip_from_config(TINY.to_open_clip()).eval()
    export_checkpoint(start, tiny_cfg(), {}, tmp_path / "phase1.safetensors", dtype=torch.float32)
    cfg = tiny_cfg(steps=1, lr=1e-12, min_lr=1e-12, init_from=str(tmp_path / "phase1.safetensors"))
    pretrain(cfg, tmp_path / "w", tmp_path / "out.safetensors", log_path=None, eval_every=0, progress=False)
    # a vanishing learning rate: the exported weights are the starting ones (up to the fp16 cast)
    got = build_miniclip(tmp_path / "out.safetensors").state_dict()
    ref = start.state_dict()
    key = "visual.attnpool.q_proj.weight"
    assert torch.allclose(got[key], ref[key], atol=1e-3)
    other = MiniClipConfig(embed_dim=16, image_size=64, vision_width=8, text_width=32, text_heads=1, text_layers=1)
    bad = PretrainConfig(model=other, steps=1, batch_size=4, warmup_steps=1, init_from=str(tmp_path / "out.safetensors"))
    with pytest.raises((ValueError, RuntimeError)):
        pretrain(bad, tmp_path / "w2", None, log_path=None, eval_every=0, progress=False)


@pytest.mark.parametrize("task", ["shape", "colour"])
def test_shipped_acceptance_summary_points_at_its_run_records(task):
    """The shipped acceptance numbers are ordinary run records; the summary copies nothing else."""
    from safelib.runs import RunConfig, read_record

    assets = CHECKPOINT.parent
    summary = json.loads((assets / f"miniclip_safe_{task}_largest.json").read_text())
    assert summary["format"] == "safelib.miniclip_eval/2" and set(summary["per_seed"]) == {
        "zero-shot", "linear probe", "SAFE (all)", "SAFE (attention)", "SAFE (values)"}
    for row, runs in summary["per_seed"].items():
        assert [r["seed"] for r in runs] == [1, 2, 3]
        for entry in runs:
            record = read_record(assets / "miniclip_eval" / entry["record"])
            config = RunConfig.from_dict(record["config"])
            assert config.dataset == f"miniworld_{task}_largest" and config.shots == 16
            assert record["test_acc"] == entry["test_acc"] and config.seed == entry["seed"]
            assert 0.0 <= entry["target_mass"] <= 1.0


@pytest.mark.parametrize("task", ["shape", "colour"])
def test_shipped_acceptance_shows_safe_clearly(task):
    """Issue 11's bars on the shipped records: SAFE at least 20 points above zero-shot at 16 shots,
    and at least 1.5x the original pooling's attention on the target."""
    summary = json.loads((CHECKPOINT.parent / f"miniclip_safe_{task}_largest.json").read_text())["summary"]
    safe, zero_shot = summary["SAFE (all)"], summary["zero-shot"]
    assert safe["test_acc_mean"] - zero_shot["test_acc_mean"] >= 20.0
    assert safe["target_mass_mean"] >= 1.5 * zero_shot["target_mass_mean"]
