"""benchmarks/graph_ab.py: its --graph argument."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
from graph_ab import parse_graph


def test_graph_is_label_and_checkpoint_folder():
    assert parse_graph("new=models/sst2") == ("new", Path("models/sst2"))
    assert parse_graph("old=/tmp/x/onnx") == ("old", Path("/tmp/x"))  # the onnx/ folder names its checkpoint


@pytest.mark.parametrize("text", ["models/sst2", "=models/sst2", "new="])
def test_graph_without_label_or_folder_is_refused(text):
    with pytest.raises(argparse.ArgumentTypeError, match="LABEL=FOLDER"):
        parse_graph(text)
