"""The book on Colab: the setup cell and "Open in Colab" badge every notebook carries, and Google Drive.

Colab has no ``_config.yml`` and, when a chapter opens there, no ``safelib`` either. So each
notebook carries, right after its ``parameters`` cell, a setup cell (the text of
:func:`setup_cell_source`) that on Colab, and only there, pip-installs ``safelib`` from the book's
repository with Colab's torch, torchvision and numpy pinned to the versions already installed (an
upgrade would force a runtime restart half-way through a chapter), then calls :func:`offer_drive`
so that caches and run records can live on Google Drive and survive a reconnect. Elsewhere the
cell does nothing. A Markdown cell with the "Open in Colab" badge (:func:`badge_source`) follows it.

Both cells are written from the repository URL and branch in ``_config.yml``, the one place that
names them. ``python -m safelib.book.colab`` checks every notebook (exit status 1 and a list of the
notebooks that are off); ``--fix`` inserts or rewrites the two cells, e.g. after a fork changed the
URL or a new chapter was added.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Mapping, MutableMapping
from pathlib import Path, PurePosixPath
from typing import Any

import yaml

__all__ = ["SETUP_TAG", "BADGE_TAG", "repository", "setup_cell_source", "badge_source", "colab_url",
           "offer_drive", "check_notebook", "fix_notebook"]

SETUP_TAG = "colab-setup"   # the setup cell's tag (with hide-input: the book shows it folded)
BADGE_TAG = "colab-badge"   # the badge cell's tag
KEEP = ("torch", "torchvision", "numpy")  # Colab's own builds: never upgraded by the install
DRIVE_MOUNT = "/content/drive"
DRIVE_FOLDER = "MyDrive/safe-book"  # where caches and run records go on the reader's Drive
COLAB = "https://colab.research.google.com"
BADGE_IMAGE = COLAB + "/assets/colab-badge.svg"


def repository(config: str | Path = "_config.yml") -> tuple[str, str]:
    """(url, branch) of the public repository, read from the book's ``_config.yml``."""
    data = yaml.safe_load(Path(config).read_text()) or {}
    repo = data.get("repository") or {}
    url, branch = repo.get("url"), repo.get("branch", "main")
    if not url or not str(url).startswith("https://github.com/"):
        raise ValueError(f"{config}: repository.url must be a https://github.com/<owner>/<name> URL "
                         f"(Colab opens notebooks from GitHub), got {url!r}")
    return str(url).rstrip("/"), str(branch)


def setup_cell_source(url: str, branch: str = "main") -> str:
    """The setup cell's code: install on Colab only, keeping Colab's torch/torchvision/numpy."""
    return f'''# Colab only (elsewhere this cell does nothing): install safelib from the book's repository,
# keeping Colab's own torch, torchvision and numpy, and offer Google Drive for caches and records.
import sys

if "google.colab" in sys.modules:
    import importlib.metadata as metadata
    import subprocess

    with open("/tmp/colab-keep.txt", "w") as keep:  # pip constraints: the versions Colab installed
        keep.write("".join(f"{{p}}=={{metadata.version(p)}}\\n" for p in ({", ".join(f'"{k}"' for k in KEEP)})))
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "-c", "/tmp/colab-keep.txt",
                    "safelib @ git+{url}@{branch}"], check=True)
    from safelib.book.colab import offer_drive

    globals().update(offer_drive(globals()))'''


def colab_url(url: str, branch: str, notebook: str | Path) -> str:
    """The Colab address of ``notebooks/<name>.ipynb`` on the repository's branch."""
    owner_name = url.removeprefix("https://github.com/").strip("/")
    return f"{COLAB}/github/{owner_name}/blob/{branch}/notebooks/{PurePosixPath(Path(notebook).name)}"


def badge_source(url: str, branch: str, notebook: str | Path) -> str:
    """The Markdown of the "Open in Colab" badge for one notebook."""
    return f"[![Open in Colab]({BADGE_IMAGE})]({colab_url(url, branch, notebook)})"


def offer_drive(namespace: Mapping[str, Any], *, mount: Callable[[str], None] | None = None,
                say: Callable[[str], None] = print) -> dict[str, str]:
    """Mount Google Drive and move the notebook's relative ``cache_dir``/``out_dir`` onto it.

    Returns the new values (update the notebook's globals with them); an empty dict when the
    notebook has neither, when ``use_drive`` is False in it, or when the reader declines the mount
    (the local folders are kept, and a reconnect loses them). Absolute paths are the reader's
    choice and are kept. ``mount`` defaults to ``google.colab.drive.mount``.
    """
    dirs = {name: namespace[name] for name in ("cache_dir", "out_dir") if isinstance(namespace.get(name), str)}
    if not dirs or namespace.get("use_drive", True) is False:
        return {}
    if mount is None:
        from google.colab import drive  # only on Colab

        mount = drive.mount
    try:
        mount(DRIVE_MOUNT)
    except Exception as error:  # declined or failed: keep working locally
        say(f"Google Drive not mounted ({error}); caches and run records stay on this runtime's disk")
        return {}
    moved = {}
    for name, value in dirs.items():
        path = PurePosixPath(value)
        if not path.is_absolute():
            parts = [p for p in path.parts if p not in ("..", ".")]
            moved[name] = str(PurePosixPath(DRIVE_MOUNT, DRIVE_FOLDER, *parts))
    if moved:
        say("on Google Drive: " + ", ".join(f"{k} = {v}" for k, v in moved.items()))
    return moved


# ------------------------------------------------------------------ the notebooks' two cells
def _cell_text(cell: Mapping[str, Any]) -> str:
    source = cell.get("source", "")
    return "".join(source) if isinstance(source, list) else source


def _tags(cell: Mapping[str, Any]) -> list[str]:
    return list(cell.get("metadata", {}).get("tags", []))


def parameters_index(cells: list) -> int | None:
    """Where the ``parameters`` cell is: cell 0, or cell 1 below a Markdown title cell; None otherwise.

    A chapter opens with its title (a Markdown cell) so that a reader sees the title first; papermill
    finds the tagged cell wherever it is.
    """
    for i in (0, 1):
        if i < len(cells) and "parameters" in _tags(cells[i]):
            return i if i == 0 or cells[0]["cell_type"] == "markdown" else None
    return None


def check_notebook(path: str | Path, url: str, branch: str = "main") -> list[str]:
    """What is wrong with a notebook's setup and badge cells, in words; empty when both are right.

    Right means: the ``parameters`` cell is cell 0 (or cell 1, below a Markdown title cell); the
    next cell is a code cell tagged ``colab-setup`` whose source is exactly :func:`setup_cell_source`;
    the one after is the Markdown badge of this notebook.
    """
    path = Path(path)
    cells = json.loads(path.read_text())["cells"]
    problems = []
    p = parameters_index(cells)
    if p is None:
        problems.append(f"{path.name}: neither cell 0 nor cell 1 below a Markdown title is the 'parameters' cell")
        p = 0
    setup, badge = p + 1, p + 2
    if len(cells) <= setup or SETUP_TAG not in _tags(cells[setup]) or cells[setup]["cell_type"] != "code":
        problems.append(f"{path.name}: cell {setup} is not the Colab setup cell (a code cell tagged {SETUP_TAG!r})")
    elif _cell_text(cells[setup]) != setup_cell_source(url, branch):
        problems.append(f"{path.name}: the Colab setup cell differs from setup_cell_source({url!r}, {branch!r})")
    if len(cells) <= badge or BADGE_TAG not in _tags(cells[badge]) or cells[badge]["cell_type"] != "markdown":
        problems.append(f"{path.name}: cell {badge} is not the Open-in-Colab badge (a Markdown cell tagged "
                        f"{BADGE_TAG!r})")
    elif _cell_text(cells[badge]) != badge_source(url, branch, path):
        problems.append(f"{path.name}: the Colab badge differs from badge_source({url!r}, {branch!r}, ...)")
    return problems


def _lines(text: str) -> list[str]:
    return text.splitlines(keepends=True)


def fix_notebook(path: str | Path, url: str, branch: str = "main") -> bool:
    """Insert (or rewrite) the setup and badge cells after the parameters cell; True if the file changed.

    The parameters cell is cell 0, or cell 1 below the chapter's Markdown title cell.

    Reads, edits and writes the notebook at once (other people edit notebooks too); cells other
    than these two are left exactly as they are.
    """
    path = Path(path)
    nb = json.loads(path.read_text())
    cells: list[MutableMapping[str, Any]] = nb["cells"]
    before = json.dumps(cells, sort_keys=True)
    cells[:] = [c for c in cells if not {SETUP_TAG, BADGE_TAG} & set(_tags(c))]
    p = parameters_index(cells)
    if p is None:
        raise ValueError(f"{path}: cell 0 (or cell 1, below a Markdown title cell) must be the code cell tagged "
                         "'parameters' before the Colab cells go after it")
    setup = {"cell_type": "code", "execution_count": None, "metadata": {"tags": [SETUP_TAG, "hide-input"]},
             "outputs": [], "source": _lines(setup_cell_source(url, branch))}
    badge = {"cell_type": "markdown", "metadata": {"tags": [BADGE_TAG]}, "source": _lines(badge_source(url, branch, path))}
    if nb.get("nbformat", 4) == 4 and nb.get("nbformat_minor", 0) >= 5:
        for cell, suffix in ((setup, "setup"), (badge, "badge")):
            cell["id"] = f"colab-{suffix}"
    cells[p + 1:p + 1] = [setup, badge]
    if json.dumps(cells, sort_keys=True) == before:
        return False
    path.write_text(json.dumps(nb, sort_keys=True, indent=1, ensure_ascii=False) + "\n")
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m safelib.book.colab", description=__doc__.split("\n\n")[0])
    parser.add_argument("notebooks", nargs="*", type=Path, help="default: notebooks/*.ipynb")
    parser.add_argument("--config", type=Path, default=Path("_config.yml"), help="the book's config (repository.url)")
    parser.add_argument("--fix", action="store_true", help="insert or rewrite the cells instead of only checking")
    args = parser.parse_args(argv)
    url, branch = repository(args.config)
    notebooks = args.notebooks or sorted(Path("notebooks").glob("*.ipynb"))
    problems = []
    for path in notebooks:
        if args.fix and fix_notebook(path, url, branch):
            print(f"updated {path}")
        problems += check_notebook(path, url, branch)
    for problem in problems:
        print(problem, file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
