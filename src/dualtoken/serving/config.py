"""ServeConfig: every limit and batching number of the tokenization service, in one JSON-round-tripping dataclass."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ConfigError


@dataclass
class ServeConfig:
    """How ``dualtoken serve`` listens, batches and bounds its work.

    Micro-batching: a worker takes the first waiting request, then keeps collecting requests of the same kind for
    up to ``max_wait_ms`` or until ``max_batch`` are gathered, and runs them as one model call. ``max_batch = 1``
    turns batching off. At most ``max_queue`` requests of one kind wait; the next is answered 503.
    """

    host: str = "127.0.0.1"
    port: int = 8000
    max_batch: int = 8
    max_wait_ms: float = 5.0
    max_queue: int = 64
    # the whole request body (an image upload or a JSON code tensor)
    max_body_bytes: int = 16 * 1024 * 1024
    # decompression-bomb guard: width * height read from the image header, checked before any pixel is decoded
    max_image_pixels: int = 40_000_000
    allowed_formats: tuple[str, ...] = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")
    max_prompt_chars: int = 2000
    max_cfg_scale: float = 50.0
    # how many of the most used codes of each vocabulary /v1/reconstruct lists
    top_codes: int = 16
    # number of bins of the codebook-usage histogram (at most the codebook size)
    usage_bins: int = 256
    # torch intra-op threads of the model worker (None leaves torch's default)
    torch_threads: int | None = None

    def __post_init__(self) -> None:
        positive = (
            "port",
            "max_batch",
            "max_queue",
            "max_body_bytes",
            "max_image_pixels",
            "max_prompt_chars",
        )
        for name in (*positive, "top_codes", "usage_bins"):
            if getattr(self, name) < 1:
                raise ConfigError(f"ServeConfig.{name} must be >= 1, got {getattr(self, name)}")
        if not 1 <= self.port <= 65535:
            raise ConfigError(f"ServeConfig.port must be in 1..65535, got {self.port}")
        if self.max_wait_ms < 0:
            raise ConfigError(f"ServeConfig.max_wait_ms must be >= 0, got {self.max_wait_ms}")
        if self.max_cfg_scale <= 0:
            raise ConfigError(f"ServeConfig.max_cfg_scale must be > 0, got {self.max_cfg_scale}")
        if self.torch_threads is not None and self.torch_threads < 1:
            raise ConfigError(f"ServeConfig.torch_threads must be >= 1 or null, got {self.torch_threads}")
        if not self.allowed_formats:
            raise ConfigError("ServeConfig.allowed_formats must name at least one PIL format, e.g. ['PNG']")
