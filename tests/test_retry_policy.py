"""The retry policy (exchange.after_failure) as a pure function of what happened: each rule of
exchange.py's docstring, one case each, no socket. The same rules through real backends are in
tests/test_proxy_upstream.py and the fault suite (tests/test_faults.py)."""

from __future__ import annotations

from typing import Any

import pytest

from balancer.exchange import ELSEWHERE, GIVE_UP, SAME, after_failure

FRESH = dict(idempotent=True, replayable=True, reused=False, got_bytes=False,
             stale_retried=False, timed_out_before=False, attempts=1, retries=2)


def decide(kind: str, **what: Any) -> int:
    return after_failure(kind, **{**FRESH, **what})


@pytest.mark.parametrize("kind, what, expected", [
    # Nothing was delivered: any method goes to another backend, while retries last.
    ("connect", dict(idempotent=False), ELSEWHERE),
    ("connect", dict(attempts=3), GIVE_UP),
    ("connect", dict(replayable=False), GIVE_UP),  # the body so far was not kept
    ("unsent", dict(idempotent=False), ELSEWHERE),
    # A pooled connection dead before the request reached it: the same backend, fresh.
    ("unsent", dict(reused=True, idempotent=False), SAME),
    ("unsent", dict(reused=True, stale_retried=True), ELSEWHERE),  # once only
    # Sent already: only what may be sent twice moves.
    ("reset", {}, ELSEWHERE),
    ("reset", dict(idempotent=False), GIVE_UP),
    ("protocol", dict(replayable=False), GIVE_UP),
    ("reset", dict(attempts=3), GIVE_UP),
    ("reset", dict(reused=True), SAME),  # a kept-alive connection the backend had closed
    ("reset", dict(reused=True, got_bytes=True), ELSEWHERE),  # it answered something: its fault
    ("reset", dict(reused=True, stale_retried=True), ELSEWHERE),
    # No answer in time: once to another backend, then 504.
    ("timeout", {}, ELSEWHERE),
    ("timeout", dict(timed_out_before=True), GIVE_UP),
    ("timeout", dict(idempotent=False), GIVE_UP),
    ("timeout", dict(reused=True), ELSEWHERE),  # never the same backend again
])
def test_what_happened_decides_the_next_step(kind: str, what: dict[str, Any],
                                             expected: int) -> None:
    assert decide(kind, **what) == expected
