"""The TensorRT runner's pure parts on CPU: calls within the batch profile, engine dtypes, the refusal message."""
from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

from runtime.tensorrt_runtime import (
    Chunk,
    input_shape_error,
    numpy_dtype,
    plan_chunks,
    run_in_chunks,
    stream_handle,
)


@pytest.mark.parametrize(
    "rows, low, high, chunks",
    [(0, 1, 8, []),
     (3, 4, 8, [Chunk(0, 3, 4)]),  # under the profile's min: padded up to it
     (8, 1, 8, [Chunk(0, 8, 8)]),
     (10, 1, 8, [Chunk(0, 8, 8), Chunk(8, 10, 2)]),  # 4 random + 6 photos over a max batch of 8
     (10, 4, 8, [Chunk(0, 8, 8), Chunk(8, 10, 4)]),
     (17, 2, 8, [Chunk(0, 8, 8), Chunk(8, 16, 8), Chunk(16, 17, 2)])],
)
def test_chunks_stay_within_the_profile(rows, low, high, chunks):
    assert plan_chunks(rows, low, high) == chunks
    assert all(low <= c.size <= high for c in chunks)


@pytest.mark.parametrize("rows, low, high", [(4, 0, 8), (4, 9, 8), (-1, 1, 8)])
def test_invalid_chunk_requests_are_refused(rows, low, high):
    with pytest.raises(ValueError):
        plan_chunks(rows, low, high)


def _profile_engine(low: int, high: int, calls: list[int]):
    """Stand-in for an engine with profile [low, high]: refuses other batch sizes, as set_input_shape does."""

    def run(batch: np.ndarray) -> np.ndarray:
        if not low <= len(batch) <= high:
            raise RuntimeError(f"batch {len(batch)} outside [{low}, {high}]")
        calls.append(len(batch))
        flat = batch.reshape(len(batch), -1)
        return np.stack([flat.sum(1), flat.max(1)], axis=1)  # two 'logits' per row, tied to that row

    return run


@pytest.mark.parametrize("rows, low, high, sizes", [(10, 1, 8, [8, 2]), (3, 4, 8, [4]), (9, 2, 4, [4, 4, 2])])
def test_run_in_chunks_matches_one_big_call_and_drops_the_padding(rows, low, high, sizes):
    batch = np.random.default_rng(0).standard_normal((rows, 3, 4, 4)).astype(np.float32)
    calls: list[int] = []
    out = run_in_chunks(_profile_engine(low, high, calls), batch, low, high, output_width=2)
    np.testing.assert_allclose(out, _profile_engine(1, rows, [])(batch), rtol=1e-6)
    assert calls == sizes and out.shape == (rows, 2)


def test_run_in_chunks_of_an_empty_batch_runs_nothing():
    calls: list[int] = []
    out = run_in_chunks(_profile_engine(1, 8, calls), np.zeros((0, 3, 4, 4), np.float32), 1, 8, output_width=5)
    assert out.shape == (0, 5) and out.dtype == np.float32 and calls == []


def test_engine_dtypes_map_to_numpy_including_bfloat16():
    assert numpy_dtype("FLOAT") == np.float32 and numpy_dtype("HALF") == np.float16
    assert numpy_dtype("BF16") == np.dtype(ml_dtypes.bfloat16)
    with pytest.raises(RuntimeError, match="INT8 are not supported"):
        numpy_dtype("INT8")


def test_bfloat16_buffers_take_float32_rows_and_give_float32_logits():
    buffer = np.zeros((4, 3), numpy_dtype("BF16"))
    buffer[:2] = np.array([[1.5, -2.0, 0.25], [3.0, 0.5, -1.0]], np.float32)  # the runner's host_input[:n] = batch
    assert buffer[:2].astype(np.float32).tolist() == [[1.5, -2.0, 0.25], [3.0, 0.5, -1.0]]


def test_a_refused_input_shape_names_the_shape_and_the_profile():
    message = input_shape_error("input", (12, 3, 224, 224), ((1, 3, 224, 224), (8, 3, 224, 224), (8, 3, 224, 224)))
    assert "(12, 3, 224, 224)" in message and "(1, 3, 224, 224) to (8, 3, 224, 224)" in message
    assert "--max-batch" in message



def test_a_stream_is_handed_to_tensorrt_as_its_address():
    """cuda-bindings 13 deprecates int() on its objects: the stream's address comes from get_cuda_native_handle
    (no GPU needed to make a stream object from an address)."""
    from cuda.bindings import runtime  # installed with torch in the dev install (locks/dev.txt)

    assert stream_handle(runtime.cudaStream_t(0x1234)) == 0x1234
    assert stream_handle(runtime.cudaStream_t(0)) == 0
