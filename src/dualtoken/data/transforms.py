"""The release's image transforms, on PIL images, with an explicit random generator.

Train: RandomResizedCrop(size, scale (0.9, 1.0), ratio (3/4, 4/3), bicubic); eval: shortest-side bicubic resize
and centre crop. Both end as float tensors (3, H, W) in [-1, 1] (mean = std = 0.5). The crop parameters follow
torchvision's algorithm, drawn from a ``random.Random`` the caller seeds per sample, so a resumed run sees the
same crops as an uninterrupted one whatever process or worker decodes the image. Decoding and the centre crop
are :mod:`dualtoken.io`'s.
"""

from __future__ import annotations

import math
import random

import torch
from PIL import Image

from ..io import resize_center_crop, to_tensor


def random_resized_crop_box(
    width: int,
    height: int,
    rng: random.Random,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    attempts: int = 10,
) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop box (left, top, crop_width, crop_height) for a ``width`` x ``height`` image."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(attempts):
        target_area = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        crop_w = round(math.sqrt(target_area * aspect))
        crop_h = round(math.sqrt(target_area / aspect))
        if 0 < crop_w <= width and 0 < crop_h <= height:
            return rng.randint(0, width - crop_w), rng.randint(0, height - crop_h), crop_w, crop_h
    in_ratio = width / height
    if in_ratio < ratio[0]:
        crop_w, crop_h = width, round(width / ratio[0])
    elif in_ratio > ratio[1]:
        crop_w, crop_h = round(height * ratio[1]), height
    else:
        crop_w, crop_h = width, height
    return (width - crop_w) // 2, (height - crop_h) // 2, crop_w, crop_h


def train_transform(
    image: Image.Image,
    size: tuple[int, int],
    rng: random.Random,
    scale: tuple[float, float] = (0.9, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> torch.Tensor:
    """The release's training transform: random resized crop (bicubic) -> (3, H, W) in [-1, 1]."""
    left, top, crop_w, crop_h = random_resized_crop_box(image.width, image.height, rng, scale, ratio)
    height, width = size
    crop = image.resize((width, height), Image.BICUBIC, box=(left, top, left + crop_w, top + crop_h))
    return to_tensor(crop)


def eval_transform(image: Image.Image, size: tuple[int, int]) -> torch.Tensor:
    """The release's evaluation transform: shortest-side bicubic resize + centre crop -> (3, H, W) in [-1, 1]."""
    return to_tensor(resize_center_crop(image, size))
