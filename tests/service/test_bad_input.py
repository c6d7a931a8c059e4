"""Bad requests over real HTTP: each gets its 4xx with a JSON error body, and the service keeps serving."""
from __future__ import annotations

import io
import time

import httpx
import pytest
from PIL import Image

from tests.service.conftest import metric


@pytest.fixture(scope="module")
def strict_url(model_repository, launch):
    with launch(model_repository, max_body_bytes=300_000, max_pixels=1_000_000, max_files_per_request=3) as url:
        yield url


def png_bytes(size, color=(10, 200, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, "PNG")
    return buffer.getvalue()


def assert_error(response: httpx.Response, status: int, code: str) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code and error["message"]


def post(url, content, content_type="image/jpeg", params=None):
    return httpx.post(f"{url}/classify", content=content, headers={"content-type": content_type}, params=params)


def test_each_bad_request_gets_its_status_and_the_service_keeps_serving(strict_url, real_photos):
    jpeg = real_photos[0].read_bytes()
    rejected = 'convnext_rejected_total{reason="%s"}'
    pixels_before = metric(strict_url, rejected % "too_many_pixels")
    parameters_before = metric(strict_url, rejected % "invalid_parameter")
    assert_error(post(strict_url, b"this is plain text, not a picture"), 400, "not_an_image")
    assert_error(post(strict_url, jpeg[: len(jpeg) // 3]), 400, "corrupt_image")
    assert_error(post(strict_url, b""), 400, "empty_body")
    assert_error(post(strict_url, b'{"a": 1}', "application/json"), 415, "unsupported_media_type")
    assert_error(post(strict_url, b"\xff" * 400_000), 413, "body_too_large")
    assert_error(post(strict_url, png_bytes((2000, 1000)), "image/png"), 413, "too_many_pixels")
    files = [("files", (f"{i}.png", png_bytes((32, 32)), "image/png")) for i in range(4)]
    assert_error(httpx.post(f"{strict_url}/classify", files=files), 413, "too_many_files")
    for out_of_range in (0, 11):  # both ends of the range in one wording
        answer = post(strict_url, jpeg, params={"top_k": out_of_range})
        assert_error(answer, 422, "invalid_parameter")
        assert answer.json()["error"]["message"] == "top_k must be between 1 and 10"
    assert_error(post(strict_url, jpeg, params={"top_k": "many"}), 422, "invalid_parameter")
    assert_error(httpx.get(f"{strict_url}/nothing-here"), 404, "not_found")
    assert post(strict_url, jpeg).status_code == 200
    # The module's server is shared with the other tests here: what this test added, whatever ran before it.
    assert metric(strict_url, rejected % "too_many_pixels") - pixels_before == 1
    assert metric(strict_url, rejected % "invalid_parameter") - parameters_before == 3  # under the code answered


def test_a_multipart_body_that_does_not_parse_is_a_counted_400(strict_url):
    """Starlette's own refusal of the form (not an ApiError) is counted under the code answered, as every other."""
    rejected = 'convnext_rejected_total{reason="invalid_body"}'
    before = metric(strict_url, rejected)
    assert_error(post(strict_url, b"--x\r\nno headers, no end", "multipart/form-data; boundary=x"), 400,
                 "invalid_body")
    assert metric(strict_url, rejected) - before == 1


def padded_to(data: bytes, size: int) -> bytes:
    """`data` followed by zero bytes up to exactly `size` bytes (a JPEG decoder stops at its end-of-image marker)."""
    assert len(data) < size
    return data + bytes(size - len(data))


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_a_body_of_exactly_max_body_bytes_is_served_one_byte_more_is_413(strict_url, real_photos, chunked):
    """The limit (300 000 here) is the largest body accepted, whether declared up front or only counted as it
    streams in (chunked transfer has no Content-Length to refuse it by)."""
    jpeg = real_photos[0].read_bytes()
    for size, status in ((300_000, 200), (300_001, 413)):
        body = padded_to(jpeg, size)
        content = iter([body[:size // 2], body[size // 2:]]) if chunked else body
        response = httpx.post(f"{strict_url}/classify", content=content, headers={"content-type": "image/jpeg"},
                              timeout=30)
        sent = response.request.headers
        assert (sent.get("transfer-encoding"), sent.get("content-length")) == \
            (("chunked", None) if chunked else (None, str(size)))
        if status == 413:
            assert_error(response, 413, "body_too_large")
        else:
            assert response.status_code == 200, f"{size} bytes: {response.text}"


def test_too_many_files_is_413_however_many_there_are(strict_url):
    for count in (4, 5, 12):
        files = [("files", (f"{i}.png", png_bytes((8, 8)), "image/png")) for i in range(count)]
        assert_error(httpx.post(f"{strict_url}/classify", files=files), 413, "too_many_files")


def test_one_bad_file_in_a_multipart_request_fails_alone(strict_url, real_photos):
    good = ("files", ("good.png", png_bytes((40, 40)), "image/png"))
    bad = ("files", ("bad.png", b"garbage", "image/png"))
    response = httpx.post(f"{strict_url}/classify", files=[good, bad])
    assert_error(response, 400, "not_an_image")
    assert "bad.png" in response.json()["error"]["message"]
    assert httpx.post(f"{strict_url}/classify", files=[good]).status_code == 200


def test_after_a_bad_file_answers_the_request_its_other_files_are_not_decoded(model_repository, launch, real_photos):
    """A multipart request whose first file is bad gets its 400 at once; its other files, still waiting for a decode
    slot, are dropped instead of decoded after the answer, outside admission (work nobody waits for)."""
    picture = Image.open(real_photos[0]).convert("RGB").resize((1600, 1200))
    buffer = io.BytesIO()
    picture.save(buffer, "JPEG", quality=90)
    files = [("files", ("bad.png", b"garbage", "image/png"))]
    files += [("files", (f"{i}.jpg", buffer.getvalue(), "image/jpeg")) for i in range(24)]
    with launch(model_repository, preprocess_workers=1) as url:
        decoded_before = metric(url, "convnext_preprocess_seconds_count")
        assert_error(httpx.post(f"{url}/classify", files=files, timeout=60), 400, "not_an_image")
        time.sleep(1.0)  # the old code went on decoding all 24 meanwhile (~10 ms each here)
        # At most those already in the decode pool when the answer went out (one worker, two decode slots).
        assert metric(url, "convnext_preprocess_seconds_count") - decoded_before <= 2
