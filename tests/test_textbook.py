"""The book as a textbook: what its chapters write out by hand agrees with the library, and every
chapter has the parts a reader relies on (a title first, a summary, exercises).

Chapter 02 writes SAFE's training step on the page (the cell tagged ``training-step``); here that
very cell runs against ``sl.train_safe`` on the same maps, labels and seed, and must give the same
per-epoch losses to 1e-6 and the same weights.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import matplotlib
import pytest
import torch
from open_clip.modified_resnet import AttentionPool2d

matplotlib.use("Agg")

import safelib as sl  # noqa: E402
from safelib.book import plots  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
CHAPTERS = [ROOT / "notebooks" / f"{name}.ipynb"
            for name in ("01_attention_pooling", "02_safe", "03_methods", "04_scale")]


def _cells(path: Path) -> list[dict]:
    return json.loads(path.read_text())["cells"]


def _source(cell: dict) -> str:
    return "".join(cell["source"])


def training_step() -> dict:
    """Run chapter 02's ``training-step`` cell and return its namespace (``train_pooling`` in it)."""
    cells = [c for c in _cells(CHAPTERS[1]) if "training-step" in c.get("metadata", {}).get("tags", [])]
    assert len(cells) == 1, "chapter 02 has one cell tagged 'training-step'"
    namespace = {"sl": sl}
    exec(compile(_source(cells[0]), "02_safe.ipynb[training-step]", "exec"), namespace)
    return namespace


@pytest.mark.parametrize("views, batch_size", [(1, 8), (3, 5)])
def test_chapter_02s_training_step_matches_train_safe(views, batch_size):
    torch.manual_seed(0)
    pool = AttentionPool2d(spacial_dim=4, embed_dim=64, num_heads=4, output_dim=32).eval()
    maps = torch.randn(views, 18, 64, 4, 4)                       # V x N x C x H x W
    labels = torch.arange(18) % 3
    text = torch.nn.functional.normalize(torch.randn(32, 3), dim=0)  # D x K unit columns
    config = sl.SafeConfig(epochs=3, lr=1e-3, batch_size=batch_size)
    seed = 7

    library = sl.train_safe(pool, maps, labels, text, 16.0, config, seed=seed)
    by_hand, losses = training_step()["train_pooling"](pool, maps, labels, text, 16.0, config.epochs,
                                                         config.lr, config.batch_size, seed)
    assert len(losses) == len(library.losses) == 3
    assert max(abs(a - b) for a, b in zip(losses, library.losses)) < 1e-6
    assert library.losses[-1] < library.losses[0]  # it did train: the check is not of two no-ops
    for (name, a), b in zip(by_hand.named_parameters(), library.attnpool.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    assert torch.equal(by_hand.k_proj.bias, pool.k_proj.bias)  # the inert key bias stayed as it was


def test_the_training_step_fits_on_a_screen():
    cell = next(c for c in _cells(CHAPTERS[1]) if "training-step" in c.get("metadata", {}).get("tags", []))
    body = [line for line in _source(cell).splitlines() if line.strip() and not line.lstrip().startswith("#")]
    assert len(body) <= 32, len(body)
    assert max(len(line) for line in _source(cell).splitlines()) <= 100


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.stem)
def test_chapter_opens_with_its_title_and_ends_with_summary_and_exercises(path):
    cells = _cells(path)
    assert cells[0]["cell_type"] == "markdown" and _source(cells[0]).startswith("# "), \
        "the chapter's title comes first, above the parameters cell"
    assert "parameters" in cells[1]["metadata"].get("tags", [])
    text = "\n".join(_source(c) for c in cells if c["cell_type"] == "markdown")
    headings = re.findall(r"^## (.+)$", text, flags=re.M)
    assert headings[-2:] == ["Summary", "Exercises"], headings
    exercises = text.split("\n## Exercises\n", 1)[1]
    assert 3 <= len(re.findall(r"^\d+\. \*\*", exercises, flags=re.M)) <= 5
    assert ":class: dropdown" in exercises  # hints or solutions behind a toggle


def test_chapter_04_says_it_is_an_optional_appendix():
    assert "optional" in _source(_cells(CHAPTERS[3])[0]).lower()


def test_architecture_figure_draws_the_grid_both_poolings_and_the_blend():
    fig = plots.architecture_figure(grid=7, heads=32)
    ax = fig.axes[0]
    texts = " ".join(t.get_text() for t in ax.texts)
    for words in ("trunk", "original attention pooling", "fine-tuned copy", "blend", "text encoder",
                  "32 heads", "C × 7 × 7"):
        assert words in texts, words
    cells = [p for p in ax.patches if type(p).__name__ == "Rectangle"]
    assert len(cells) == 49  # the dense grid, one square per cell
    with pytest.raises(ValueError, match="grid"):
        plots.architecture_figure(grid=0)
    matplotlib.pyplot.close("all")


def test_intro_draws_the_architecture_with_code():
    intro = (ROOT / "book" / "intro.md").read_text()
    assert "```{code-cell}" in intro and "architecture_figure(" in intro
    assert "kernelspec" in intro.split("---", 2)[1]  # a MyST notebook: the book executes it
