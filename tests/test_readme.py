"""The README's pasted tour output is what the code prints now (examples/readme_tour.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))

import readme_tour  # noqa: E402

pytestmark = pytest.mark.slow


def test_loose_comparison_masks_only_machine_figures() -> None:
    a = "Saved gpt to /tmp/abc/gpt.pt: 682.4 KiB in 0.01 s\nParameters: 172,288"
    b = "Saved gpt to /tmp/xyz/gpt.pt: 700.0 KiB in 1.5 ms\nParameters: 172,288"
    assert readme_tour.loose(a, False) == readme_tour.loose(b, False)
    c = b.replace("172,288", "172,289")
    assert readme_tour.loose(a, False) != readme_tour.loose(c, False)
    assert readme_tour.loose(a, True) == readme_tour.loose(c, True)
    # a volatile cell (a profile's timings): its first line counts, its numbers masked
    p1 = "profile of the cell: 12 ops\nmkldnn_convolution  2  853 us"
    p2 = "profile of the cell: 14 ops\nnative_batch_norm  2  484 us"
    assert readme_tour.loose(p1, True) == readme_tour.loose(p2, True)
    assert readme_tour.loose(p1, True) != readme_tour.loose("summary of the cell", True)


def test_readme_tour_blocks_equal_a_fresh_tour() -> None:
    tour = readme_tour.tour_blocks()
    readme = readme_tour.README.read_text()
    assert len(readme_tour.readme_blocks(readme)) >= 20
    problems = readme_tour.compare(readme, tour)
    assert not problems, ("README tour output is stale; refresh it with "
                          "`.venv/bin/python examples/readme_tour.py --update`:\n"
                          + "\n".join(problems))
