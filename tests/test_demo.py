"""README's main command: the offline tour runs and reports a zero-shot accuracy well above chance."""
import re

from safelib.book.demo import main


def test_demo_tours_the_shipped_mini_clip(capsys) -> None:
    main(["--images", "30", "--seed", "3"])
    out = capsys.readouterr().out
    assert "dense maps (30, 512, 4, 4)" in out
    accuracy = float(re.search(r"accuracy ([\d.]+)%", out).group(1))
    assert accuracy > 60.0, out  # chance is 16.7% over six shapes
