"""Schema-driven fuzz: schemathesis generates requests from the served OpenAPI document; no answer is a 5xx,
and every answer conforms to the document (status codes, content types, bodies). Bounded in examples and time.
With an API key, requests carry it, and schemathesis's own check sends each operation again without it (401)."""

from __future__ import annotations

import pytest

schemathesis = pytest.importorskip(
    "schemathesis", reason="schemathesis is not installed (pip install schemathesis)"
)
from hypothesis import HealthCheck, given, settings  # noqa: E402
from schemathesis.specs.openapi.checks import positive_data_acceptance  # noqa: E402

from dualtoken.serving import ServeConfig, create_app  # noqa: E402

from .conftest import FakeMLLM  # noqa: E402

OPERATIONS = [
    ("POST", "/v1/encode"),
    ("POST", "/v1/decode"),
    ("POST", "/v1/reconstruct"),
    ("GET", "/v1/models"),
    ("GET", "/healthz"),
    ("POST", "/v1/chat"),
    ("POST", "/v1/generate"),
]
EXAMPLES_PER_OPERATION = 30
EXAMPLES_WITH_KEY = 10
KEY = "fuzz-key-0123456789"
# "schema-valid data must be accepted" cannot hold here: the schema cannot say that uploaded bytes must be a
# decodable image, nor that every grid position carries the same number of codes; those requests get a 400
EXCLUDED_CHECKS = [positive_data_acceptance]


def served_schema(tiny_tokenizer, api_key: str | None = None):
    config = ServeConfig(max_body_bytes=200_000, max_image_pixels=1_000_000, max_prompt_chars=64)
    app = create_app(tiny_tokenizer, mllm=FakeMLLM(tiny_tokenizer.image_size), config=config, api_key=api_key)
    return schemathesis.openapi.from_asgi("/openapi.json", app)


@pytest.fixture
def api_schema(tiny_tokenizer):
    return served_schema(tiny_tokenizer)


def test_every_operation_is_fuzzed(api_schema):
    served = {(op.method.upper(), op.path) for op in (r.ok() for r in api_schema.get_all_operations())}
    assert served == set(OPERATIONS)


def fuzz_operation(api_schema, method: str, path: str, examples: int, api_key: str | None = None) -> None:
    operation = api_schema[path][method]

    @given(case=operation.as_strategy())
    @settings(
        max_examples=examples,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        database=None,
    )
    def fuzz(case):
        if api_key is not None:
            case.headers = {**(case.headers or {}), "Authorization": f"Bearer {api_key}"}
        response = case.call()
        assert response.status_code < 500, f"{method} {path}: {response.status_code} {response.text[:300]}"
        case.validate_response(response, excluded_checks=EXCLUDED_CHECKS)

    fuzz()


@pytest.mark.parametrize("method, path", OPERATIONS)
def test_no_server_errors_and_responses_match_the_schema(api_schema, method, path):
    fuzz_operation(api_schema, method, path, EXAMPLES_PER_OPERATION)


@pytest.mark.parametrize("method, path", OPERATIONS)
def test_with_a_key_the_same_and_the_key_is_enforced(tiny_tokenizer, method, path):
    schema = served_schema(tiny_tokenizer, api_key=KEY)
    fuzz_operation(schema, method, path, EXAMPLES_WITH_KEY, api_key=KEY)
