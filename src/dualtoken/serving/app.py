"""The ASGI app: the HTTP API over a TokenizerService (and an optional MLLM), its error mapping, and the page.

Route signatures are read by FastAPI at run time, so this module keeps real (not postponed) annotations: the
limits of the chat and generate fields come from the ServeConfig.

Status codes: 400 for input the model cannot use (unreadable image, wrong code shapes, out-of-range codes), 413 for
bodies or images over the limits, 422 for requests missing a field or of the wrong type, 503 when a queue is full;
with an API key, 401 for a request to the API without it (auth.py), before anything else is looked at.
"""

from contextlib import asynccontextmanager
from dataclasses import asdict
from importlib import resources
from typing import Annotated, Any

from fastapi import Body, FastAPI, File, Form, UploadFile
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from .. import __version__
from ..errors import CodesError, DualTokenError
from ..io import SAMPLE_PHOTOS, png_bytes
from .apidocs import render_api_docs
from .auth import ApiKeyAuth, check_api_key, declare_bearer
from .batcher import QueueFullError
from .codes import code_usage, codes_from_json
from .config import ServeConfig
from .limits import BodySizeLimit, ImageTooLargeError
from .mllm import MllmService, MultimodalModel
from .schemas import (
    ChatResponse,
    DecodeRequest,
    EncodeResponse,
    ErrorResponse,
    HealthResponse,
    ModelsResponse,
    ReconstructResponse,
)
from .service import BRANCHES, Reconstruction, TokenizerService
from .visuals import png_data_url, sample_png

STATIC_FILES = {
    "index.html": "text/html",
    "app.js": "text/javascript",
    "style.css": "text/css",
    "favicon.svg": "image/svg+xml",
}
PNG_RESPONSE = {"content": {"image/png": {}}, "description": "a PNG image"}


def _errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    descriptions = {
        401: "no API key, or not the server's: send 'Authorization: Bearer <key>'",
        400: "bad input: unreadable image, wrong code shape or out-of-range codes",
        413: "request body or image over the server's limits",
        503: "the queue is full; retry later",
    }
    return {code: {"model": ErrorResponse, "description": descriptions[code]} for code in codes}


def create_app(
    tokenizer,
    mllm: MultimodalModel | None = None,
    config: ServeConfig | None = None,
    api_key: str | None = None,
) -> FastAPI:
    """A FastAPI app serving ``tokenizer`` (a DualTokenizer) and, when given, ``mllm`` (see MultimodalModel).

    With ``api_key``, every API route answers 401 unless the request carries ``Authorization: Bearer <api_key>``;
    the page and the API reference stay open. An empty key, or one that cannot travel in a header, is a
    ConfigError.
    """
    config = config or ServeConfig()
    if api_key is not None:
        check_api_key(api_key, "api_key")
    service = TokenizerService(tokenizer, config)
    chat = MllmService(mllm, config, service.model_lock) if mllm is not None else None
    batchers = service.batchers + (chat.batchers if chat else [])

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        yield
        for batcher in batchers:
            batcher.close()

    app = FastAPI(
        title="dualtoken",
        version=__version__,
        description="DualToken tokenization service: pixel and semantic residual codes of images, and back.",
        lifespan=lifespan,
        # Swagger UI and ReDoc load their scripts from a CDN, so they would render blank offline: /docs is rendered
        # here from the OpenAPI document instead (apidocs.py)
        docs_url=None,
        redoc_url=None,
        responses=_errors(401) if api_key is not None else None,
    )
    app.add_middleware(BodySizeLimit, max_bytes=config.max_body_bytes)
    if api_key is not None:
        # added last, so outermost: a request without the key is refused before its body is read or measured
        app.add_middleware(ApiKeyAuth, key=api_key)
        _require_bearer_in_openapi(app)
    app.state.service = service
    app.state.batchers = {batcher.name: batcher for batcher in batchers}
    _add_error_handlers(app)
    _add_tokenizer_routes(app, service, config, has_mllm=chat is not None)
    if chat is not None:
        _add_mllm_routes(app, service, chat, config)
    _add_page_routes(app)
    return app


def _require_bearer_in_openapi(app: FastAPI) -> None:
    """The app's OpenAPI document (/openapi.json, /docs) declares the bearer scheme (the 401s come from ``responses``)."""
    plain = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            declare_bearer(plain())  # plain() caches its document in app.openapi_schema: amended there, once
        return app.openapi_schema

    app.openapi = openapi


def _add_error_handlers(app: FastAPI) -> None:
    def reply(status: int, exc: Exception, headers: dict[str, str] | None = None) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=status, headers=headers)

    @app.exception_handler(ImageTooLargeError)
    async def too_large(_request, exc: ImageTooLargeError) -> JSONResponse:
        return reply(413, exc)

    @app.exception_handler(DualTokenError)
    async def bad_input(_request, exc: DualTokenError) -> JSONResponse:
        return reply(400, exc)

    @app.exception_handler(QueueFullError)
    async def busy(_request, exc: QueueFullError) -> JSONResponse:
        return reply(503, exc, headers={"Retry-After": "1"})


def _add_tokenizer_routes(
    app: FastAPI, service: TokenizerService, config: ServeConfig, has_mllm: bool
) -> None:
    info = service.describe()
    grid = tuple(info["grid"])
    upload = Annotated[UploadFile, File(description="an image file (PNG, JPEG, WebP, ...)")]

    @app.get("/healthz", response_model=HealthResponse)
    async def healthz() -> dict[str, Any]:
        batchers = app.state.batchers.items()
        return {
            "status": "ok",
            "model": service.name,
            "pending": {name: batcher.pending for name, batcher in batchers},
            "running": {name: batcher.running for name, batcher in batchers},
            # dict() copies atomically: a worker thread may add a size meanwhile
            "batch_sizes": {
                name: {str(k): v for k, v in sorted(dict(b.batch_sizes).items())} for name, b in batchers
            },
        }

    @app.get("/v1/models", response_model=ModelsResponse)
    async def models() -> dict[str, Any]:
        batching = {
            "max_batch": config.max_batch,
            "max_wait_ms": config.max_wait_ms,
            "max_queue": config.max_queue,
        }
        limits = {
            "max_body_bytes": config.max_body_bytes,
            "max_image_pixels": config.max_image_pixels,
            "allowed_formats": list(config.allowed_formats),
            "max_prompt_chars": config.max_prompt_chars,
            "max_cfg_scale": config.max_cfg_scale,
        }
        return {"models": [info], "mllm": has_mllm, "batching": batching, "limits": limits}

    @app.post("/v1/encode", response_model=EncodeResponse, responses=_errors(400, 413, 503))
    async def encode(image: upload) -> dict[str, Any]:
        """Both code tensors of one image, with their shapes."""
        tensor = await run_in_threadpool(service.preprocess, await image.read())
        codes = await service.encoder.run(tensor)
        return {
            "model": service.name,
            **{
                b: {
                    "shape": list(codes[b].shape),
                    "codebook_size": info["codebook_size"][b],
                    "codes": codes[b].tolist(),
                }
                for b in BRANCHES
            },
        }

    @app.post("/v1/decode", response_class=Response, responses={200: PNG_RESPONSE, **_errors(400, 413, 503)})
    async def decode(request: DecodeRequest) -> Response:
        """Pixel codes (h, w, q) -> a PNG of their reconstruction from the first k depths."""
        codes = await run_in_threadpool(
            codes_from_json,
            request.pixel,
            grid,
            service.depth("pixel"),
            info["codebook_size"]["pixel"],
            "pixel",
        )
        depth = codes.shape[-1]
        k = depth if request.k is None else request.k
        if k > depth:
            raise CodesError(f"k = {k} but the codes have only {depth} depths; expected 1 <= k <= {depth}")
        pixels = await service.decoder.run((codes, k))
        return Response(await run_in_threadpool(png_bytes, pixels), media_type="image/png")

    @app.post("/v1/reconstruct", response_model=ReconstructResponse, responses=_errors(400, 413, 503))
    async def reconstruct(image: upload) -> dict[str, Any]:
        """The reconstruction and its PSNR / SSIM at every depth prefix k, token maps, and the codes used."""
        tensor = await run_in_threadpool(service.preprocess, await image.read())
        result = await service.reconstructor.run(tensor)
        return await run_in_threadpool(_reconstruction_view, result, info, config)


def _reconstruction_view(result: Reconstruction, info: dict[str, Any], config: ServeConfig) -> dict[str, Any]:
    steps = [
        {"k": k + 1, "image": png_data_url(image), "psnr": psnr, "ssim": ssim}
        for k, (image, psnr, ssim) in enumerate(zip(result.reconstructions, result.psnr, result.ssim))
    ]
    branches = {}
    for branch in BRANCHES:
        size = info["codebook_size"][branch]
        branches[branch] = {
            "codes": result.codes[branch].tolist(),
            "codebook_size": size,
            "token_maps": [png_data_url(picture) for picture in result.embedding_maps[branch]],
            "code_maps": [png_data_url(picture) for picture in result.code_maps[branch]],
            "usage": code_usage(result.codes[branch], size, config.top_codes, config.usage_bins),
        }
    return {
        "model": info["name"],
        "image_size": info["image_size"],
        "grid": info["grid"],
        "original": png_data_url(result.original),
        "steps": steps,
        **branches,
        "meaning": asdict(result.meaning) if result.meaning is not None else None,
    }


def _add_mllm_routes(app: FastAPI, service: TokenizerService, chat: MllmService, config: ServeConfig) -> None:
    @app.post("/v1/chat", response_model=ChatResponse, responses=_errors(400, 413, 503))
    async def chat_about_image(
        image: Annotated[UploadFile, File(description="the image the question is about")],
        question: Annotated[str, Form(min_length=1, max_length=config.max_prompt_chars)],
    ) -> dict[str, str]:
        """Answer a question about an uploaded image."""
        tensor = await run_in_threadpool(service.preprocess, await image.read(), tuple(chat.model.image_size))
        return {"answer": await chat.chatter.run((tensor, question))}

    @app.post(
        "/v1/generate", response_class=Response, responses={200: PNG_RESPONSE, **_errors(400, 413, 503)}
    )
    async def generate(
        prompt: Annotated[str, Body(min_length=1, max_length=config.max_prompt_chars)],
        cfg_scale: Annotated[float, Body(ge=0.0, le=config.max_cfg_scale, allow_inf_nan=False)] = 3.0,
        seed: Annotated[int, Body(ge=0, le=2**63 - 1)] = 0,
    ) -> Response:
        """Generate an image from a text prompt (classifier-free guidance scale, seed) as a PNG."""
        pixels = await chat.generator.run((prompt, cfg_scale, seed))
        return Response(await run_in_threadpool(png_bytes, pixels), media_type="image/png")


def _add_page_routes(app: FastAPI) -> None:
    folder = resources.files("dualtoken.serving") / "static"
    # read once: a request names one of these keys, never a file
    assets = {name: (folder / name).read_bytes() for name in STATIC_FILES}

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page() -> HTMLResponse:
        return HTMLResponse(assets["index.html"])

    @app.get("/docs", response_class=HTMLResponse, include_in_schema=False)
    async def api_docs() -> HTMLResponse:
        return HTMLResponse(render_api_docs(app.openapi()))

    @app.get("/favicon.ico", include_in_schema=False)
    async def favicon() -> Response:
        return Response(assets["favicon.svg"], media_type=STATIC_FILES["favicon.svg"])

    @app.get("/static/samples/{name}", include_in_schema=False)
    async def sample(name: str) -> Response:
        photo = name.removesuffix(".png")
        if name == photo or photo not in SAMPLE_PHOTOS:
            known = ", ".join(f"{p}.png" for p in SAMPLE_PHOTOS)
            return JSONResponse({"detail": f"no sample photo {name!r}; the samples: {known}"}, status_code=404)
        return Response(await run_in_threadpool(sample_png, photo), media_type="image/png")

    @app.get("/static/{name}", include_in_schema=False)
    async def static(name: str) -> Response:
        if name not in assets:
            return JSONResponse({"detail": f"no static file {name!r}"}, status_code=404)
        return Response(assets[name], media_type=STATIC_FILES[name])
