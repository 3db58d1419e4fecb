"""Request and response bodies of the HTTP API (they make the served OpenAPI document)."""

from __future__ import annotations

from pydantic import BaseModel, Field

CodeGrid = list[list[list[int]]]  # (h, w, Q): row-major grid, the residual codes of each position


class CodeTensor(BaseModel):
    shape: list[int] = Field(description="[h, w, Q]")
    codebook_size: int
    codes: CodeGrid


class EncodeResponse(BaseModel):
    model: str
    pixel: CodeTensor
    semantic: CodeTensor


class DecodeRequest(BaseModel):
    pixel: CodeGrid = Field(description="pixel codes (h, w, q), 1 <= q <= the model's pixel depth")
    k: int | None = Field(
        default=None, ge=1, description="decode only the first k depths (default: all given)"
    )


class DepthStep(BaseModel):
    k: int
    image: str = Field(description="the reconstruction from the first k pixel depths, a PNG data URL")
    psnr: float | None = Field(description="dB against the preprocessed input; null where exact")
    ssim: float


class CodeUsage(BaseModel):
    unique: int
    codebook_fraction: float
    per_depth_unique: list[int]
    per_depth_perplexity: list[float] = Field(description="effective number of codes of each depth")
    positions: int = Field(description="token positions per depth: the most distinct codes a depth can use")
    top: list[list[int]] = Field(description="the most used codes as [code, count] pairs")
    histogram: list[int] = Field(description="uses per equal range of the codebook")


class BranchView(BaseModel):
    codes: CodeGrid
    codebook_size: int
    token_maps: list[str] = Field(
        description="PNG data URLs, one (h x w) picture per depth prefix k = 1..Q: the summed code embeddings, "
        "coloured by their three principal components"
    )
    code_maps: list[str] = Field(
        description="PNG data URLs, one (h x w) picture per depth: code ids as colours"
    )
    usage: CodeUsage


class ClassGuess(BaseModel):
    name: str
    probability: float


class Meaning(BaseModel):
    codes: list[list[ClassGuess]] = Field(
        description="per semantic depth prefix k = 1..Q, the top classes read from the first k semantic codes"
    )
    unquantized: list[ClassGuess] = Field(description="the top classes of the same image without quantization")


class ReconstructResponse(BaseModel):
    model: str
    image_size: list[int]
    grid: list[int]
    original: str = Field(description="the preprocessed input, a PNG data URL")
    steps: list[DepthStep]
    pixel: BranchView
    semantic: BranchView
    meaning: Meaning | None = Field(
        description="what the semantic codes say (ImageNet classes); null when the model has no classifier"
    )


class ModelInfo(BaseModel):
    name: str
    base_model: str | None = Field(None, description="the trained model this one was fine-tuned from, if any")
    image_size: list[int]
    grid: list[int]
    pixel_depth: int
    semantic_depth: int
    codebook_size: dict[str, int]
    meaning: dict[str, str] = Field(
        description="the classifier and reference tower of the page's meaning panel, or {'unavailable': reason}"
    )


class BatchingInfo(BaseModel):
    max_batch: int
    max_wait_ms: float
    max_queue: int


class Limits(BaseModel):
    max_body_bytes: int = Field(description="the largest request body (an upload) accepted")
    max_image_pixels: int = Field(description="the largest width x height of an uploaded image")
    allowed_formats: list[str] = Field(description="PIL format names of the images accepted")
    max_prompt_chars: int = Field(description="the longest chat question or generation prompt")
    max_cfg_scale: float = Field(description="the largest classifier-free guidance scale of /v1/generate")


class ModelsResponse(BaseModel):
    models: list[ModelInfo]
    mllm: bool
    batching: BatchingInfo
    limits: Limits


class HealthResponse(BaseModel):
    status: str
    model: str
    pending: dict[str, int] = Field(description="requests waiting, per queue")
    running: dict[str, int] = Field(description="requests in the model call now, per queue")
    batch_sizes: dict[str, dict[str, int]] = Field(
        description="per queue: how many model calls ran with each batch size since the server started"
    )


class ChatResponse(BaseModel):
    answer: str


class ErrorResponse(BaseModel):
    detail: str
