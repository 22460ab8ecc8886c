"""Where every benchmark writes its results: benchmarks/results/<name>.{md,json,png}."""

from __future__ import annotations

import json
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def write_results(name: str, lines: list[str], data: object) -> Path:
    """<name>.md (the markdown `lines`, also printed) and <name>.json (`data`) under benchmarks/results/;
    → the path without suffix, for the plot."""
    out = RESULTS / name
    RESULTS.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    out.with_suffix(".json").write_text(json.dumps(data, indent=1) + "\n")
    print("\n".join(lines))
    return out


def pyplot():
    """matplotlib.pyplot drawing to files only (the Agg backend), or None where matplotlib is not installed
    (the tables are written either way)."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
