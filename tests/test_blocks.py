"""Predictions over blocks of rows are the predictions over all rows."""

import numpy as np
from sklearn.ensemble import HistGradientBoostingRegressor

from insertrec.blocks import in_blocks


def test_block_predictions_equal_whole_predictions_bit_for_bit():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(1_001, 5))
    model = HistGradientBoostingRegressor(max_iter=20).fit(x, x[:, 0] ** 2 + rng.normal(size=len(x)))
    whole = model.predict(x)
    for rows in (1, 100, 1_000, 5_000):       # ragged last block, one block, more rows than x has
        np.testing.assert_array_equal(in_blocks(model.predict, x, rows=rows), whole)
