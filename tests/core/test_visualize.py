"""Pictures that explain themselves: the token-map figure has a label for every row and column."""

from __future__ import annotations

import numpy as np
import torch

from dualtoken.visualize import embedding_maps, labelled_grid, token_figure


def _ink(region: np.ndarray) -> int:
    """Number of dark pixels (text) in a region of a white picture."""
    return int((region.min(axis=-1) < 128).sum())


def test_labelled_grid_writes_each_label_beside_its_cells():
    cell = np.full((20, 30, 3), 200, dtype=np.uint8)
    picture = labelled_grid([[cell, cell], [cell, cell]], ["row one", "row two"], ["k = 1", "k = 2"], footer="note")
    blank = labelled_grid([[cell, cell], [cell, cell]], ["", ""], ["", ""])
    assert picture.dtype == np.uint8 and picture.shape[1] > blank.shape[1]  # room for the row labels
    label_width = picture.shape[1] - blank.shape[1] + 6
    assert _ink(picture[:, :label_width]) > 20  # row labels
    assert _ink(picture[:20, label_width:]) > 20  # column labels
    assert _ink(picture[-20:]) > 5  # footer
    assert _ink(blank) == 0


def test_token_figure_has_a_row_per_vocabulary_and_kind_and_a_column_per_depth(tiny_tokenizer):
    images = torch.rand(1, 3, *tiny_tokenizer.image_size) * 2 - 1
    tokens = tiny_tokenizer.encode(images)
    figure = token_figure(tiny_tokenizer, tokens.pixel[0], tokens.semantic[0], cell=4)
    h, w = tiny_tokenizer.grid
    # four rows of (h*4)-pixel maps and four columns of (w*4)-pixel maps, plus labels
    assert figure.shape[0] > 4 * h * 4 and figure.shape[1] > 4 * w * 4
    # the pixel vocabulary's sum over depth 1 (k = 1) is in the figure as it is
    first = np.repeat(np.repeat(embedding_maps(tiny_tokenizer.code_embeddings(tokens.pixel, "pixel")[0])[0], 4, 0), 4, 1)
    assert first.shape == (h * 4, w * 4, 3)
    found = any(
        np.array_equal(figure[y : y + h * 4, x : x + w * 4], first)
        for y in range(figure.shape[0] - h * 4)
        for x in range(figure.shape[1] - w * 4)
    )
    assert found, "the sum-of-depths map of k = 1 is not in the figure"
