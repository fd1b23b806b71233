"""The Colab setup cell and badge: in every notebook, equal to _config.yml's repository, inert off Colab.

The cell is executed here as it stands in the notebooks, with ``google.colab`` faked in
``sys.modules`` and ``subprocess.run`` replaced by a recorder, so no test ever runs pip.
"""
from __future__ import annotations

import importlib.metadata
import json
import re
import subprocess
import sys
import types
from pathlib import Path

import pytest

from safelib.book import colab

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
URL, BRANCH = colab.repository(ROOT / "_config.yml")


def cell_source(path: Path, after_parameters: int) -> str:
    """The source of the cell ``after_parameters`` cells below the parameters cell (1: setup, 2: badge)."""
    cells = json.loads(path.read_text())["cells"]
    return "".join(cells[colab.parameters_index(cells) + after_parameters]["source"])


def test_config_names_one_public_repository():
    assert URL.startswith("https://github.com/") and URL.count("/") == 4
    assert BRANCH == "main"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_every_notebook_has_the_setup_cell_and_badge(path):
    assert colab.check_notebook(path, URL, BRANCH) == []
    # the install URL written in the cell is the configured one (Colab has no _config.yml)
    installed = re.findall(r"git\+(\S+?)@(\w+)\"", cell_source(path, 1))
    assert installed == [(URL, BRANCH)]
    assert f"{URL.removeprefix('https://github.com/')}/blob/{BRANCH}/notebooks/{path.name})" in cell_source(path, 2)


def test_the_check_catches_a_forked_url_and_a_missing_cell(tmp_path):
    path = tmp_path / NOTEBOOKS[0].name
    path.write_text(NOTEBOOKS[0].read_text())
    assert colab.check_notebook(path, "https://github.com/someone/fork", BRANCH) != []
    nb = json.loads(path.read_text())
    setup = colab.parameters_index(nb["cells"]) + 1
    del nb["cells"][setup]
    path.write_text(json.dumps(nb))
    assert any(f"cell {setup} is not the Colab setup cell" in p for p in colab.check_notebook(path, URL, BRANCH))


def test_fix_inserts_after_parameters_keeps_other_cells_and_is_idempotent(tmp_path):
    cells = [{"cell_type": "code", "execution_count": None, "metadata": {"tags": ["parameters"]}, "outputs": [],
              "source": ["x = 1"]},
             {"cell_type": "markdown", "metadata": {}, "source": ["# A new chapter"]}]
    path = tmp_path / "05_results.ipynb"
    path.write_text(json.dumps({"cells": cells, "metadata": {}, "nbformat": 4, "nbformat_minor": 5}))
    assert colab.fix_notebook(path, URL, BRANCH) is True
    assert colab.check_notebook(path, URL, BRANCH) == []
    after = json.loads(path.read_text())["cells"]
    assert [c["source"] for c in (after[0], after[3])] == [["x = 1"], ["# A new chapter"]]
    assert "hide-input" in after[1]["metadata"]["tags"] and after[1]["outputs"] == []
    assert colab.fix_notebook(path, URL, BRANCH) is False
    assert colab.fix_notebook(path, "https://github.com/someone/fork", BRANCH) is True  # a fork rewrites them
    assert "someone/fork" in "".join(json.loads(path.read_text())["cells"][1]["source"])
    assert colab.main(["--config", str(ROOT / "_config.yml"), str(path)]) == 1  # off from the config now


def test_a_title_cell_may_come_first_and_the_colab_cells_follow_the_parameters(tmp_path):
    cells = [{"cell_type": "markdown", "metadata": {}, "source": ["# A chapter\n"]},
             {"cell_type": "code", "execution_count": None, "metadata": {"tags": ["parameters"]}, "outputs": [],
              "source": ["x = 1"]},
             {"cell_type": "markdown", "metadata": {}, "source": ["Text."]}]
    path = tmp_path / "06_new.ipynb"
    path.write_text(json.dumps({"cells": cells, "metadata": {}, "nbformat": 4, "nbformat_minor": 5}))
    assert colab.fix_notebook(path, URL, BRANCH) is True
    assert colab.check_notebook(path, URL, BRANCH) == []
    after = json.loads(path.read_text())["cells"]
    assert [c["source"] for c in (after[0], after[1], after[4])] == [["# A chapter\n"], ["x = 1"], ["Text."]]
    assert "colab-setup" in after[2]["metadata"]["tags"] and "colab-badge" in after[3]["metadata"]["tags"]
    assert colab.fix_notebook(path, URL, BRANCH) is False
    # a code cell above the parameters is not a title: refused
    cells[0] = {"cell_type": "code", "execution_count": None, "metadata": {}, "outputs": [], "source": ["y = 2"]}
    path.write_text(json.dumps({"cells": cells, "metadata": {}, "nbformat": 4, "nbformat_minor": 5}))
    with pytest.raises(ValueError, match="parameters"):
        colab.fix_notebook(path, URL, BRANCH)


def test_fix_refuses_a_notebook_without_parameters_cell(tmp_path):
    path = tmp_path / "x.ipynb"
    path.write_text(json.dumps({"cells": [{"cell_type": "markdown", "metadata": {}, "source": ["# x"]}],
                                "metadata": {}, "nbformat": 4, "nbformat_minor": 4}))
    with pytest.raises(ValueError, match="parameters"):
        colab.fix_notebook(path, URL, BRANCH)


class Recorder:
    def __init__(self):
        self.calls: list[list[str]] = []
        self.constraints: list[str] = []

    def __call__(self, command, check=False, **_):
        self.calls.append(list(command))
        if "-c" in command:
            self.constraints = Path(command[command.index("-c") + 1]).read_text().split()
        return subprocess.CompletedProcess(command, 0)


def run_cell(namespace: dict, monkeypatch) -> Recorder:
    recorder = Recorder()
    monkeypatch.setattr(subprocess, "run", recorder)
    exec(compile(colab.setup_cell_source(URL, BRANCH), "<colab setup cell>", "exec"), namespace)
    return recorder


def test_setup_cell_does_nothing_off_colab(monkeypatch):
    monkeypatch.delitem(sys.modules, "google.colab", raising=False)
    namespace = {"cache_dir": "../cache/book", "out_dir": "../runs/book"}
    recorder = run_cell(namespace, monkeypatch)
    assert recorder.calls == []
    assert {k: v for k, v in namespace.items() if k not in ("__builtins__", "sys")} == \
        {"cache_dir": "../cache/book", "out_dir": "../runs/book"}


def fake_colab(monkeypatch, mount):
    google = types.ModuleType("google")
    package = types.ModuleType("google.colab")
    drive = types.ModuleType("google.colab.drive")
    drive.mount = mount
    package.drive = drive
    google.colab = package
    monkeypatch.setitem(sys.modules, "google", google)
    monkeypatch.setitem(sys.modules, "google.colab", package)
    monkeypatch.setitem(sys.modules, "google.colab.drive", drive)


def test_setup_cell_on_colab_installs_from_the_repository_keeping_torch(monkeypatch):
    mounted = []
    fake_colab(monkeypatch, mounted.append)
    namespace = {"cache_dir": "../cache/book", "out_dir": "/content/my-runs"}
    recorder = run_cell(namespace, monkeypatch)
    assert len(recorder.calls) == 1
    command = recorder.calls[0]
    assert command[:4] == [sys.executable, "-m", "pip", "install"]
    assert command[-1] == f"safelib @ git+{URL}@{BRANCH}"
    assert "--upgrade" not in command and "-U" not in command
    assert sorted(recorder.constraints) == sorted(
        f"{name}=={importlib.metadata.version(name)}" for name in ("torch", "torchvision", "numpy"))
    assert mounted == ["/content/drive"]
    assert namespace["cache_dir"] == "/content/drive/MyDrive/safe-book/cache/book"
    assert namespace["out_dir"] == "/content/my-runs"  # an absolute path is the reader's choice


def test_offer_drive_declined_or_unwanted_keeps_local_folders():
    said = []

    def decline(_):
        raise RuntimeError("mount failed")

    assert colab.offer_drive({"cache_dir": "c", "out_dir": "r"}, mount=decline, say=said.append) == {}
    assert "not mounted" in said[0]
    assert colab.offer_drive({"cache_dir": "c", "use_drive": False}, mount=decline) == {}
    assert colab.offer_drive({"n_maps": 3}, mount=decline) == {}  # a chapter without caches: nothing to offer


def test_readme_links_name_the_configured_repository():
    readme = (ROOT / "README.md").read_text()
    owner, name = URL.removeprefix("https://github.com/").split("/")
    repos = set(re.findall(r"github\.com/([\w.-]+/[\w.-]+?)(?:/blob/|\)|>|\.git|/?\s)", readme))
    assert repos == {f"{owner}/{name}"}, repos
    assert f"https://{owner}.github.io/{name}/" in readme
    assert f"{owner}/{name}/blob/{BRANCH}/notebooks/" in readme
