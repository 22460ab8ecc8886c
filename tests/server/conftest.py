"""Server fixtures: tiny MoEBERT conversions of the session's tiny dense checkpoints (the same for every
server test module; each module starts its own server with its own flags)."""

from __future__ import annotations

import pytest

from moebert.convert import ConvertConfig, convert


def _tiny_moe(teacher, out):
    return convert(
        ConvertConfig(teacher=str(teacher), output_dir=str(out), split="random", expert_dim=21, shared_dim=7)
    )


@pytest.fixture(scope="session")
def moe_cls_dir(tiny_cls_dir, tmp_path_factory):
    """The tiny classifier converted: 4 experts of width 21 (7 shared), hash-random routing."""
    return _tiny_moe(tiny_cls_dir, tmp_path_factory.mktemp("server") / "cls-moe")


@pytest.fixture(scope="session")
def moe_qa_dir(tiny_qa_dir, tmp_path_factory):
    """The tiny QA model converted the same way."""
    return _tiny_moe(tiny_qa_dir, tmp_path_factory.mktemp("server_qa") / "qa-moe")
