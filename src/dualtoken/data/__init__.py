"""Data: image folders, file lists and WebDataset shards as images; resumable training batches; tokenization.

- ``open_image_source(spec, size, train=False)`` -> iterable of ``(image (3,H,W) in [-1,1], id)``;
- ``TrainLoader`` -> endless shuffled batches with an exact, resumable position (what the trainer uses);
- ``DeviceCropLoader`` -> the same from images held and cropped on the accelerator (``pack_images`` packs them);
- ``encode_dataset(tokenizer, source, out_dir)`` -> sharded token files (``dualtoken.tokenfile``), resumable.
"""

from .device import DeviceCropLoader, pack_images, read_packed
from .images import ImageSource, SkippedImageWarning, decode_crops, decode_record, open_image_source
from .sources import Position, Record, RecordSource, resolve_source
from .stream import TrainLoader
from .tokenize import encode_dataset
from .transforms import eval_transform, train_transform

__all__ = [
    "open_image_source",
    "ImageSource",
    "SkippedImageWarning",
    "decode_record",
    "decode_crops",
    "resolve_source",
    "RecordSource",
    "Record",
    "Position",
    "TrainLoader",
    "DeviceCropLoader",
    "pack_images",
    "read_packed",
    "encode_dataset",
    "train_transform",
    "eval_transform",
]
