"""The evaluation protocol: how images become tensors and how reconstructions are compared, pinned in one place.

Everything a reader needs to reproduce a number is written into the report from :func:`describe_protocol`.
Reconstructions are compared as lossless tensors: clamped to [-1, 1] and mapped to [0, 1], never JPEG-encoded
and never truncated to uint8 (docs/METHOD.md, "Where this implementation departs", item 8).
"""

from __future__ import annotations

import torch


def to_unit_range(images: torch.Tensor) -> torch.Tensor:
    """Images on the model's [-1, 1] scale (reconstructions may overshoot) -> float [0, 1], clamped."""
    return ((images.float().clamp(-1.0, 1.0) + 1.0) / 2.0).clamp(0.0, 1.0)


def to_uint8_levels(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] images rounded to the 256 levels of an 8-bit file, returned on the [-1, 1] scale again.

    This is what a reconstruction saved as PNG and read back holds (round to nearest, never truncate).
    """
    levels = torch.round(to_unit_range(images) * 255.0)
    return levels / 127.5 - 1.0


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] images -> uint8 (B, 3, H, W), rounded to nearest (the input the standard Inception network takes)."""
    return torch.round(to_unit_range(images) * 255.0).to(torch.uint8)


def describe_protocol(
    image_size: tuple[int, int], feature_resize: int, groups: set[str], feature_nets: list[str],
    classifier_kind: str | None,
) -> dict:
    """The preprocessing and comparison rules of what this evaluation ran, as written into report.json.

    ``groups``: the metric groups that ran; ``feature_nets``: the feature networks that ran; ``classifier_kind``:
    ``"zeroshot"``, ``"head"`` or None (no classification). Nothing that did not run is described.
    """
    height, width = image_size
    protocol: dict = {
        "preprocessing": {
            "resize": f"shortest side to {min(height, width)} px (aspect kept), bicubic, antialiased (Pillow)",
            "crop": f"centre crop {height}x{width}",
            "input_range": "[-1, 1] (x / 127.5 - 1)",
            "resolution": [height, width],
        },
    }
    if groups & {"reconstruction", "perceptual", "distribution", "stability", "codebook"}:
        protocol["reconstruction"] = {
            "comparison": "lossless float tensors: reconstruction clamped to [-1, 1], both mapped to [0, 1]",
            "jpeg_round_trip": False,
            "psnr": "torchmetrics peak_signal_noise_ratio, data_range 1, per image over C,H,W, averaged over images",
        }
        if "reconstruction" in groups:
            protocol["reconstruction"]["ssim"] = (
                "torchmetrics structural_similarity_index_measure, data_range 1, gaussian 11x11 sigma 1.5, "
                "per image, averaged over images"
            )
    features = {
        "efficientnet_lite0": f"EfficientNet-Lite0 (ImageNet weights), inputs in [-1, 1] resized bicubically to "
        f"{feature_resize}x{feature_resize}; pooled 1280-d head features for FD/KID, the last map of each of "
        "5 resolutions for the perceptual distance",
        "inception": "torch-fidelity Inception-v3 (user weights), uint8 input rounded from the reconstruction, "
        "resized to 299 inside the network",
    }
    if feature_nets:
        protocol["features"] = {name: features[name] for name in feature_nets}
    if groups & {"stability", "codebook"}:
        protocol["stability"] = "encode(x) vs encode(round_to_8bit(clamp(decode(encode(x)))))"
    if "semantic" in groups:
        classifiers = {
            "zeroshot": "zero-shot classifier = mean of L2-normalised text embeddings over the 80 OpenAI templates, "
            "renormalised; scores = cosine similarities",
            "head": "the backbone's own ImageNet-1k classifier head; scores = its logits",
            None: "no classification (the reason is in skipped_metrics)",
        }
        protocol["semantic"] = {
            "features": "pooled output of the quantized semantic path (first k depths), compared by cosine with the "
            "unquantized tower and the teacher",
            "classifier": classifiers[classifier_kind],
        }
    return protocol
