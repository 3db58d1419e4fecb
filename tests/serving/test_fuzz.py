"""Schema-driven fuzz: schemathesis generates requests from the served OpenAPI document; no answer is a 5xx,
and every answer conforms to the document (status codes, content types, bodies). Bounded in examples and time."""

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
# "schema-valid data must be accepted" cannot hold here: the schema cannot say that uploaded bytes must be a
# decodable image, nor that every grid position carries the same number of codes; those requests get a 400
EXCLUDED_CHECKS = [positive_data_acceptance]


@pytest.fixture
def api_schema(tiny_tokenizer):
    config = ServeConfig(max_body_bytes=200_000, max_image_pixels=1_000_000, max_prompt_chars=64)
    app = create_app(tiny_tokenizer, mllm=FakeMLLM(tiny_tokenizer.image_size), config=config)
    return schemathesis.openapi.from_asgi("/openapi.json", app)


def test_every_operation_is_fuzzed(api_schema):
    served = {(op.method.upper(), op.path) for op in (r.ok() for r in api_schema.get_all_operations())}
    assert served == set(OPERATIONS)


@pytest.mark.parametrize("method, path", OPERATIONS)
def test_no_server_errors_and_responses_match_the_schema(api_schema, method, path):
    operation = api_schema[path][method]

    @given(case=operation.as_strategy())
    @settings(
        max_examples=EXAMPLES_PER_OPERATION,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        database=None,
    )
    def fuzz(case):
        response = case.call()
        assert response.status_code < 500, f"{method} {path}: {response.status_code} {response.text[:300]}"
        case.validate_response(response, excluded_checks=EXCLUDED_CHECKS)

    fuzz()
