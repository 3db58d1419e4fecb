"""Helpers shared by the tests of the core modules."""

import torch

from dualtoken.quantizer import nearest_codes


def per_depth_codes(x, codebook, depth, search=nearest_codes):
    """The residual codes (N, Q) of ``x`` found depth by depth with ``search``: what every faster search must give."""
    residual, codes = x.clone(), []
    for _ in range(depth):
        codes.append(search(residual, codebook))
        residual.sub_(codebook[codes[-1]])
    return torch.stack(codes, 1)
