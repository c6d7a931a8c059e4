"""How a gRPC call whose task was cancelled is counted and answered, in-process (no server: the call's context is a
fake whose deadline the test sets): the shutdown's cut-off only for the calls it cancelled, and its deadline only when
the call ended close to it, for its timeout."""
from __future__ import annotations

import asyncio
from types import SimpleNamespace

import grpc
import pytest

from service.grpc_calls import CallsInFlight
from service.grpc_proto import open_inference_pb2 as pb
from service.grpc_server import _Method
from service.metrics import ServiceMetrics


class FakeContext:
    """The server side of one call: its time remaining (None: no deadline) is set by the test; abort() records the
    answer and its trailing metadata, and raises, as grpc's does."""

    def __init__(self, remaining_s: float | None = None):
        self.remaining_s = remaining_s
        self.answered: list[grpc.StatusCode] = []
        self.trailers: dict[str, str] = {}

    def time_remaining(self) -> float | None:
        return self.remaining_s

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return (("x-request-id", "call-1"),)

    async def abort(self, code: grpc.StatusCode, details: str = "", trailing_metadata=()) -> None:
        self.answered.append(code)
        self.trailers = dict(trailing_metadata)
        raise grpc.aio.AbortError()


async def never_answers(state, request, context):
    await asyncio.Event().wait()


def method_and_state() -> tuple[_Method, SimpleNamespace]:
    state = SimpleNamespace(metrics=ServiceMetrics(), grpc_calls=CallsInFlight(8),
                            settings=SimpleNamespace(api_key=None))
    # ServerLive's request has no fields: the handler runs without a message being read.
    return _Method("ModelInfer", never_answers, pb.ServerLiveRequest, state), state


def rejected(state: SimpleNamespace, reason: str) -> float:
    return state.metrics.registry.get_sample_value("convnext_rejected_total", {"reason": reason}) or 0.0


def test_only_the_calls_the_shutdown_cut_off_are_counted_and_answered_as_cut_off():
    """A call cancelled by grpc after the grace's end (its client left) is client_disconnected, and nothing is sent on
    it. Before: once the shutdown had cut calls off, every cancellation was shutting_down and abort() was tried."""
    async def scenario():
        method, state = method_and_state()
        cut, left = FakeContext(), FakeContext()
        cut_task = asyncio.create_task(method.call(None, cut))
        await asyncio.sleep(0)
        state.grpc_calls.cut_off_all()  # the grace is over
        left_task = asyncio.create_task(method.call(None, left))
        await asyncio.sleep(0)
        left_task.cancel()  # grpc cancels it: its client left
        await asyncio.gather(cut_task, left_task, return_exceptions=True)
        return state, cut, left, left_task

    state, cut, left, left_task = asyncio.run(scenario())
    assert cut.answered == [grpc.StatusCode.UNAVAILABLE]
    # The cut-off's trailers: its code and retry hint, and the call's id beside them.
    assert cut.trailers == {"convnext-error-code": "shutting_down", "grpc-retry-pushback-ms": "1000",
                            "x-request-id": "call-1"}
    assert left.answered == [] and left_task.cancelled()
    assert rejected(state, "shutting_down") == 1 and rejected(state, "client_disconnected") == 1


@pytest.mark.parametrize(("timeout_s", "remaining_s", "reason"), [
    (0.05, 0.04, "client_disconnected"),  # a 50 ms call its client left after 10 ms (before: client_deadline)
    (0.05, 0.003, "client_deadline"),  # within a tenth of its timeout of its deadline: the client's deadline
    (5.0, 0.08, "client_deadline"),  # within DEADLINE_SLACK_S of it
    (5.0, 0.2, "client_disconnected"),
    (None, 0.0, "client_disconnected"),  # no deadline at all
])
def test_a_cancelled_call_is_counted_as_its_deadline_only_when_it_ended_close_to_it_for_its_timeout(
        timeout_s, remaining_s, reason):
    async def scenario():
        method, state = method_and_state()
        context = FakeContext(timeout_s)
        task = asyncio.create_task(method.call(None, context))
        await asyncio.sleep(0)
        context.remaining_s = remaining_s if timeout_s is not None else None
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        return state, context

    state, context = asyncio.run(scenario())
    assert rejected(state, reason) == 1
    assert context.answered == []  # a cancelled call is over: nothing is answered on it
