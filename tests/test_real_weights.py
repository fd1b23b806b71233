"""The real-weights appendix: cited numbers as published, and its code path run offline.

Offline, the chapter runs end to end on RN50 random weights read from a local file and a fake DTD
folder in CoOp's layout (a few 6 x 6 images): the same calls a Colab reader's run makes with
OpenAI's weights and the real DTD. With the hub out of reach it says so and runs nothing.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch

import safelib as sl
from safelib.book import realcheck
from test_data_registry import make_coop

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK = ROOT / "notebooks" / "A1_real_weights.ipynb"
TEXTURES = ("banded", "braided", "bubbly")


def test_cited_numbers_are_the_tip_adapter_logs():
    # exp.log of github.com/gaopengcuhk/Tip-Adapter at commit 30d2598 (zero-shot, Tip-Adapter-F 16 shots)
    assert realcheck.cited("dtd") == {"zero_shot": 42.20, "tip_adapter_f_16": 66.55}
    assert realcheck.cited("oxford_flowers")["zero_shot"] == 66.02
    assert realcheck.cited("eurosat") == {"zero_shot": 37.52, "tip_adapter_f_16": 84.54}
    assert realcheck.cited("imagenet") == {"zero_shot": 60.32, "tip_adapter_f_16": 65.51}
    assert set(realcheck.TIP_ADAPTER_LOG_RN50) == set(sl.list_datasets("benchmark"))
    with pytest.raises(KeyError, match="no cited RN50 numbers for 'textile'"):
        realcheck.cited("textile")


def test_summary_sets_ours_beside_cited():
    table = realcheck.summary("dtd", {"zero_shot": {"test_acc": 41.9}, "safe": {"test_acc": 60.0}}, shots=16)
    assert table.loc["zero-shot CLIP"].tolist() == ["42.20", "41.90"]
    assert table.loc["SAFE, 16 shots", "ours (%)"] == "60.00"
    empty = realcheck.summary("dtd", {})
    assert empty.loc["zero-shot CLIP", "ours (%)"] == "not run"
    assert "nan" not in empty.to_html().lower() and "none" not in empty.to_html().lower()


@pytest.fixture(scope="module")
def kernel_env(tmp_path_factory):
    from ipykernel.kernelspec import install

    prefix = tmp_path_factory.mktemp("jupyter")
    install(kernel_name="python3", prefix=str(prefix))
    return {"JUPYTER_PATH": os.pathsep.join([str(prefix / "share/jupyter"), os.environ.get("JUPYTER_PATH", "")]),
            "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]), "HF_HUB_OFFLINE": "1"}


def execute(tmp_path: Path, env: dict, monkeypatch, **parameters) -> tuple[str, int]:
    papermill = pytest.importorskip("papermill")
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    parameters |= {"cache_dir": str(tmp_path / "cache"), "out_dir": str(tmp_path / "runs"), "device": "cpu"}
    out = tmp_path / "out.ipynb"
    papermill.execute_notebook(str(NOTEBOOK), str(out), parameters=parameters, kernel_name="python3",
                               progress_bar=False, cwd=str(NOTEBOOK.parent))
    text, figures = [], 0
    for cell in json.loads(out.read_text())["cells"]:
        for output in cell.get("outputs", []):
            assert output["output_type"] != "error" and output.get("name") != "stderr", output
            text.append("".join(output.get("text", "")) + "".join(output.get("data", {}).get("text/plain", "")))
            figures += "image/png" in output.get("data", {})
    return "\n".join(text), figures


@pytest.mark.slow
def test_chapter_runs_zero_shot_and_safe_on_local_rn50_weights_and_a_fake_dtd(tmp_path, kernel_env, monkeypatch):
    weights = tmp_path / "rn50-random.pt"
    torch.save({k: v.half() for k, v in sl.random_clip("RN50").model.state_dict().items()}, weights)
    make_coop(tmp_path / "data", "dtd", "images", "split_zhou_DescribableTextures.json", classes=TEXTURES,
              per_split=(2, 2, 2))  # 2 shots and 2 validation images per class: no short class
    text, figures = execute(tmp_path, kernel_env, monkeypatch, pretrained=str(weights),
                            data_root=str(tmp_path / "data"), download=False, shots=2, train_views=1,
                            safe_config={"epochs": 1})
    assert "OUT OF REACH" not in text and "dtd: 3 classes" in text
    records = {p.parent.name: json.loads(p.read_text()) for p in (tmp_path / "runs").rglob("*.run.json")}
    assert set(records) == {"zero_shot", "safe"}
    assert all(r["config"]["shots"] == 2 and r["config"]["backbone"] == "RN50" for r in records.values())
    assert f"{records['zero_shot']['test_acc']:.2f}%" in text
    assert "42.2" in text and "SAFE, 2 shots" in text and figures == 1


@pytest.mark.slow
def test_chapter_says_plainly_when_the_weights_are_out_of_reach(tmp_path, kernel_env, monkeypatch):
    text, figures = execute(tmp_path, kernel_env, monkeypatch)  # the defaults: RN50 "openai", hub offline
    assert "The weights are OUT OF REACH here" in text and "nothing was run" in text
    assert "sl.run(sl.RunConfig(dataset='dtd', method='safe', shots=16" in text
    assert not (tmp_path / "runs").exists() and figures == 1


def test_quiet_logs_holds_back_open_clips_download_error(capsys):
    import logging

    with realcheck.quiet_logs():
        logging.error("Failed to download weights for tag 'openai'")
    logging.getLogger("safelib.test").warning("after")  # the level is restored
    assert "Failed to download" not in capsys.readouterr().err
