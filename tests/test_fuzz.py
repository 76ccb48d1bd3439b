"""Property-based tests of every POST endpoint: whatever the bytes, never a 5xx, and every answer in its
documented shape (errors: the one error shape, with a code of embeddings/errors.py; successes: the schema).

Hypothesis builds multipart bodies by hand (random keys, filenames, boundaries, delimiters, truncation),
mutates real photographs and synthetic images, and sends them with random headers and options through
Django's test client. The runs are derandomised (the same examples every run: CI never flakes);
``CLIPSITE_FUZZ_EXPLORE=1`` explores afresh with ten times the examples.
"""

from __future__ import annotations

import json
import os
from urllib.parse import urlencode

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from PIL import Image

from embeddings.schema import error_table
from tests.conftest import PHOTOS, gradient_image, image_bytes
from tests.openapi import api_schema, assert_conforms
from wearable.services import category_cache

pytestmark = pytest.mark.django_db

EXPLORE = os.environ.get("CLIPSITE_FUZZ_EXPLORE") == "1"


def fuzz(examples: int):
    return settings(
        max_examples=examples * (10 if EXPLORE else 1),
        derandomize=not EXPLORE,
        database=None,  # nothing written into the checkout; a failure prints its reproduction
        deadline=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
    )


KNOWN_CODES = frozenset(error_table())
# (The doubled leading slash is tested through the real server: the test client reads "//x" as a host.)
MULTIPART_PATHS = ("/syte_test/embeddings", "/syte_test/clip", "/syte_test/wearable")
FEEDBACK = "/syte_test/feedback"


def _seed_images() -> list[bytes]:
    """Real photographs (two of them, the smallest) and small synthetic images of every accepted format."""
    photos = sorted(PHOTOS.glob("*.jpg"), key=lambda p: p.stat().st_size)[:2]
    synthetic = gradient_image(48, 32, seed=1)
    made = [image_bytes(synthetic, fmt) for fmt in ("PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP")]
    made.append(image_bytes(gradient_image(40, 40, mode="RGBA"), "PNG"))
    made.append(image_bytes(Image.new("I;16", (8, 8), 40000), "PNG"))
    made.append(image_bytes(gradient_image(1, 1), "PNG"))
    return [p.read_bytes() for p in photos] + made


SEEDS = _seed_images()


@st.composite
def image_data(draw) -> bytes:
    """A real image, or one mutated: bytes flipped, cut short, spliced with another, or junk appended."""
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(0, 3))):
        how = draw(st.sampled_from(("flip", "truncate", "splice", "junk", "header")))
        if not data:
            break
        if how == "flip":
            for _ in range(draw(st.integers(1, 8))):
                data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
        elif how == "truncate":
            data = data[: draw(st.integers(0, len(data)))]
        elif how == "splice":
            other = draw(st.sampled_from(SEEDS))
            at = draw(st.integers(0, len(data)))
            data = data[:at] + other[draw(st.integers(0, len(other))) :]
        elif how == "junk":
            data += draw(st.binary(max_size=64))
        else:  # the first bytes decide what Pillow thinks the file is
            data[: draw(st.integers(0, 24))] = draw(st.binary(max_size=24))
    return bytes(data)


# Keys and filenames as clients send them, and as they should not: quotes, CR/LF, non-ASCII, long.
sane_names = st.sampled_from(["image", "image-1", "image_2", "text-1", "text_2", "a", "b", "photo.jpg"])
names = st.one_of(
    sane_names,
    st.sampled_from(["", " ", "csrfmiddlewaretoken"]),
    st.text(max_size=12),
    st.text(alphabet='"\\;=\r\n %\x00é猫', max_size=6),
    st.text(alphabet="k", min_size=199, max_size=202),
)
texts = st.one_of(st.text(max_size=40), st.binary(max_size=40), st.just("a photo of a cat"))

# The ways a body can be broken; none at all half of the time.
FLAWS = (
    "lf_newlines",
    "wrong_dashes",
    "preamble",
    "no_closing_delimiter",
    "epilogue",
    "truncated",
    "wrong_content_type",
    "wild_names",
    "part_without_name",
    "odd_part_content_type",
    "odd_boundary",
)
flaw_sets = st.one_of(st.just(frozenset()), st.frozensets(st.sampled_from(FLAWS), min_size=1, max_size=3))


@st.composite
def a_part(draw, flaws: frozenset) -> dict:
    is_file = draw(st.booleans())
    key_names = names if "wild_names" in flaws else sane_names
    return {
        "key": draw(key_names),
        "filename": draw(key_names) if is_file else None,
        "value": draw(image_data()) if is_file and draw(st.integers(0, 4)) else draw(texts),
        "content_type": draw(st.sampled_from(["x/y;;", "text/plain; charset=latin-1", "image/png; a=\x01"]))
        if "odd_part_content_type" in flaws
        else draw(st.sampled_from([None, "image/jpeg", "text/plain; charset=utf-8"])),
        "no_name": "part_without_name" in flaws and draw(st.booleans()),
    }


boundaries = st.one_of(
    st.just("clipsiteboundary"),
    st.text(alphabet="abcXYZ0123456789'+_-.", min_size=1, max_size=70),
)
# Boundaries a parser has to refuse or quote: RFC 2046's other characters, empty, too long, not ASCII.
odd_boundaries = st.one_of(st.text(alphabet="abc()+_,-./:=? ", min_size=1, max_size=70), st.text(max_size=75))


def _bytes(value) -> bytes:
    return value if isinstance(value, bytes) else value.encode("utf-8", "surrogatepass")


@st.composite
def multipart(draw) -> tuple[bytes, str]:
    """A multipart body, well-formed or broken in some of the ways clients (and attackers) break them."""
    flaws = draw(flaw_sets)
    boundary = draw(odd_boundaries if "odd_boundary" in flaws else boundaries)
    newline = b"\n" if "lf_newlines" in flaws else b"\r\n"
    dashes = draw(st.sampled_from([b"-", b"", b"---"])) if "wrong_dashes" in flaws else b"--"
    delimiter = dashes + _bytes(boundary)
    out = bytearray(draw(st.sampled_from([b"preamble\r\n", newline, b"x" * 70_000])) if "preamble" in flaws else b"")
    unique = None if "wild_names" in flaws else (lambda part: part["key"])  # duplicates: a wild body's flaw
    for part in draw(st.lists(a_part(flaws), max_size=5, unique_by=unique)):
        out += delimiter + newline
        disposition = b"form-data"
        if not part["no_name"]:
            disposition += b'; name="' + _bytes(part["key"]) + b'"'
        if part["filename"] is not None:
            disposition += b'; filename="' + _bytes(part["filename"]) + b'"'
        out += b"Content-Disposition: " + disposition + newline
        if part["content_type"]:
            out += b"Content-Type: " + part["content_type"].encode() + newline
        out += newline + _bytes(part["value"]) + newline
    if "no_closing_delimiter" in flaws:
        out += draw(st.sampled_from([delimiter + b"--", b"", delimiter + newline]))
    else:
        out += delimiter + b"--" + newline
    if "epilogue" in flaws:
        out += draw(st.binary(min_size=1, max_size=30))
    body = bytes(out)
    if "truncated" in flaws:
        body = body[: draw(st.integers(0, len(body)))]
    content_type = f"multipart/form-data; boundary={boundary}"
    if "wrong_content_type" in flaws:
        content_type = draw(
            st.sampled_from(
                [
                    f'multipart/form-data; boundary="{boundary}"',
                    "multipart/form-data",
                    "multipart/form-data; boundary=",
                    "multipart/mixed; boundary=" + boundary,
                    "application/json",
                    "application/x-www-form-urlencoded",
                    "text/plain",
                    "",
                ]
            )
        )
    return body, content_type


queries = st.one_of(
    st.just(""),
    st.builds(
        lambda n, e, k: "?" + "&".join(p for p in (n, e, k) if p),
        st.sampled_from(["", "normalize=false", "normalize=TRUE", "normalize=maybe", "normalize="]),
        st.sampled_from(["", "encoding=base64", "encoding=float", "encoding=hex", "encoding=%00"]),
        st.sampled_from(["", "top_k=1", "top_k=3", "top_k=0", "top_k=-1", "top_k=999", "top_k=1e3", "top_k=%20"]),
    ),
    st.text(max_size=30).map(lambda q: "?" + q),
)

headers = st.fixed_dictionaries(
    {},
    optional={
        "request_id": st.one_of(st.just("req-1"), st.text(max_size=140)),
        "X-Request-ID": st.text(alphabet="abc-\t ", max_size=10),
        "Accept": st.sampled_from(["application/json", "*/*", "application/json; indent=4", "image/png"]),
    },
)
# A key now and then: a wrong one is a 401 whatever the settings (access/), and must be one too.
keys = st.one_of(
    st.just({}),
    st.just({}),
    st.just({}),
    st.fixed_dictionaries({"Authorization": st.one_of(st.just("Bearer not-a-key"), st.text(max_size=20))}),
    st.fixed_dictionaries({"X-API-Key": st.text(alphabet="abc0123456789-_", max_size=20)}),
)
request_headers = st.builds(lambda h, k: {**h, **k}, headers, keys).map(
    lambda h: {k: v.replace("\r", "").replace("\n", "") for k, v in h.items()}
)

# A Content-Length other than the body's: shorter (a body cut by its declared length) or not a number.
# Never longer: the test client's payload refuses reads past its end, where a server would wait.
lengths = st.one_of(st.none(), st.none(), st.none(), st.sampled_from(["0", "1", "abc", "-1", " 12", ""]))


@pytest.fixture(autouse=True)
def fresh_category_cache():
    category_cache.clear()
    yield
    category_cache.clear()


@pytest.fixture(scope="module")
def schema() -> dict:
    return api_schema()


def send(client, path: str, body: bytes, content_type: str, header_values: dict, length: str | None):
    if length is not None and length.strip().lstrip("-").isdigit():
        if int(length) > len(body):
            length = None  # never longer than the body (see ``lengths``)
        else:
            body = body[: max(int(length), 0)]
    extra = {} if length is None else {"CONTENT_LENGTH": length}
    return client.generic("POST", path, body, content_type=content_type, headers=header_values, **extra)


def assert_documented(schema: dict, path: str, response) -> None:
    """Never a 5xx; an error in the one error shape with a known code; a success as the schema says."""
    assert response.status_code < 500, (response.status_code, response.content[:500])
    body = json.loads(response.content)
    # What the examples reached (pytest --hypothesis-show-statistics): a fuzzer stuck on one error is no fuzzer.
    event(f"{response.status_code} {body['error']['code'] if response.status_code >= 400 else 'ok'}")
    if response.status_code >= 400:
        assert set(body) == {"request_id", "error"}, body
        assert set(body["error"]) == {"code", "message", "key"}, body
        assert body["error"]["code"] in KNOWN_CODES, body
        assert isinstance(body["error"]["message"], str) and body["error"]["message"], body
        assert body["error"]["key"] is None or isinstance(body["error"]["key"], str), body
        assert isinstance(body["request_id"], str) and body["request_id"], body  # every API path has one
    assert_conforms(schema, path, "POST", response.status_code, body)


@fuzz(examples=500)
@given(
    path=st.sampled_from(MULTIPART_PATHS),
    body=multipart(),
    query=queries,
    header_values=request_headers,
    length=lengths,
)
def test_multipart_endpoints_answer_any_body_in_their_documented_shape(
    client, clip, schema, path, body, query, header_values, length
):
    data, content_type = body
    response = send(client, path + query, data, content_type, header_values, length)
    assert_documented(schema, path, response)


@fuzz(examples=300)
@given(path=st.sampled_from(MULTIPART_PATHS), data=image_data(), key=names, filename=names, query=queries)
def test_any_image_bytes_are_answered_in_the_documented_shape(client, clip, schema, path, data, key, filename, query):
    parts = [(key or "image", data, filename or "photo.jpg")]
    if path != "/syte_test/wearable":
        parts.append(("text-1", "a photo", None))
    body, content_type = _well_formed(parts)
    response = send(client, path + query, body, content_type, {"request_id": "img"}, None)
    assert_documented(schema, path, response)


def _well_formed(parts: list[tuple]) -> tuple[bytes, str]:
    """A multipart body made as clients make it (quotes and line breaks in names escaped as browsers do)."""
    boundary = "fuzzboundary7MA4YWxkTrZu0gW"
    out = bytearray()
    for key, value, filename in parts:
        escaped = key.replace('"', "%22").replace("\r", "%0D").replace("\n", "%0A")
        out += f'--{boundary}\r\nContent-Disposition: form-data; name="{escaped}"'.encode()
        if filename is not None:
            safe = filename.replace('"', "%22").replace("\r", "%0D").replace("\n", "%0A")
            out += f'; filename="{safe}"'.encode()
        out += b"\r\n\r\n" + _bytes(value) + b"\r\n"
    out += f"--{boundary}--\r\n".encode()
    return bytes(out), f"multipart/form-data; boundary={boundary}"


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=12,
)


@st.composite
def feedback_bodies(draw) -> tuple[bytes, str]:
    """Feedback as JSON (any value, or near-JSON bytes), as a form, or as multipart."""
    kind = draw(st.sampled_from(["json", "object", "object", "object", "raw", "form", "multipart"]))
    if kind == "json":
        return json.dumps(draw(json_values)).encode(), "application/json"
    if kind == "object":
        body = {
            "request_id": draw(st.one_of(st.just("answer-1"), json_values)),
            "categories": draw(st.one_of(st.lists(st.sampled_from(["hat", "HAT", " t-shirt ", "nope"])), json_values)),
        }
        return json.dumps(body).encode(), "application/json"
    if kind == "raw":
        return draw(st.binary(max_size=60)), draw(st.sampled_from(["application/json", "application/json; charset=x"]))
    if kind == "form":
        pairs = draw(
            st.lists(
                st.tuples(
                    st.sampled_from(["request_id", "categories", "x"]),
                    st.one_of(st.sampled_from(["answer-1", "hat", "jeans"]), st.text(max_size=10)),
                )
            )
        )
        return urlencode(pairs).encode(), "application/x-www-form-urlencoded"
    return draw(multipart())


@pytest.fixture
def answer_1(client, clip) -> None:
    """A wearable answer with request_id answer-1, so feedback naming it reaches the end of the service."""
    data, content_type = _well_formed([("image", image_bytes(gradient_image(32, 32)), "a.png")])
    response = client.generic(
        "POST", "/syte_test/wearable", data, content_type=content_type, headers={"request_id": "answer-1"}
    )
    assert response.status_code == 200, response.content


@fuzz(examples=300)
@given(body=feedback_bodies(), header_values=request_headers, length=lengths)
def test_feedback_answers_any_body_in_its_documented_shape(client, answer_1, schema, body, header_values, length):
    data, content_type = body
    response = send(client, FEEDBACK, data, content_type, header_values, length)
    assert_documented(schema, FEEDBACK, response)
