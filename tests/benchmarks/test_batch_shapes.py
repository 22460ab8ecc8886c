"""batch_shapes: "BxT" is B full rows; "BxTp" is a padded batch whose longest row fills T."""

from __future__ import annotations

import numpy as np
import pytest
from batch_shapes import make_batch, parse_shape


@pytest.mark.parametrize(("shape", "want"), [("32x128", (32, 128, False)), ("7x230P", (7, 230, True))])
def test_parse_shape(shape, want):
    assert parse_shape(shape) == want


@pytest.mark.parametrize("padded", [False, True])
def test_make_batch(padded):
    ids, mask, types = make_batch(9, 40, padded, np.random.default_rng(3))
    assert ids.shape == mask.shape == types.shape == (9, 40) and ids.dtype == np.int64
    lengths = mask.sum(1)
    assert lengths.max() == 40 and lengths.min() >= (10 if padded else 40)
    assert (mask[:, :-1] >= mask[:, 1:]).all()  # real tokens first, padding after
    assert ((ids != 0) == (mask == 1)).all() and not types.any()  # padding has the pad id 0
    if padded:
        assert lengths.min() < 40
