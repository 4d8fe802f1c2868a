"""The scale-in guard's promise for every interleaving of jobs, clock and platform answers (samseg/ops/scale_in.py).

Played: jobs starting and ending (up to the GPU pool's two at once), time passing, the guard's thread taking a
step, and the platform answering each request in one of three ways — accepted; refused (not applied); or
applied with the answer lost (a timeout after the API server acted). The pod may start protected (a previous
container in it was killed mid-job). Checked:

- what the guard believes the pod holds is never wrong (it may say "unknown", never a wrong state);
- it never repeats a request for a state it knows the pod holds (Kubernetes: no renewal), nor a failed one
  before the retry delay (a failing API server is not hammered);
- once the platform answers again and time passes, the pod holds exactly "protected while busy": an idle
  worker never leaves its pod protected, whatever failed before.

The platform is an in-memory stand-in (the Kubernetes API cannot run here) and the clock is the test's, so the
guard's own decision code (`next_request`, `send`) runs step by step; tests/system/test_scale_in.py runs the
same guard's thread against HTTP stand-ins and a real worker.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import httpx
import pytest
import structlog
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from samseg.ops.scale_in import ProtectionError, ScaleInGuard

OUTCOMES = ("accepted", "refused", "applied-answer-lost")


class FakePod:
    """The pod's scale-in annotations as the API server holds them: protected (True) or not (False)."""

    name = "kubernetes"
    renew_seconds: float | None = None

    def __init__(self, protected: bool) -> None:
        self.protected = protected
        self.outcome = "accepted"

    def apply(self, busy: bool) -> None:
        if self.outcome == "refused":
            raise ProtectionError("PATCH pod answered 503")
        self.protected = busy
        if self.outcome == "applied-answer-lost":
            raise httpx.ReadTimeout("timed out")


class GuardMachine(RuleBasedStateMachine):
    @initialize(protected_by_previous_container=st.booleans())
    def start(self, protected_by_previous_container: bool) -> None:
        self.now = 0.0
        self.pod = FakePod(protected_by_previous_container)
        self.guard = ScaleInGuard(self.pod, idle_grace=1.0, retry=5.0, clock=lambda: self.now)
        self.failed: tuple[bool, float] | None = None  # the last failed request (state, when) in guard_steps

    @precondition(lambda self: self.guard.busy < 2)
    @rule()
    def job_starts(self) -> None:
        self.guard.job_started()

    @precondition(lambda self: self.guard.busy > 0)
    @rule()
    def job_ends(self) -> None:
        self.guard.job_finished()

    @rule(outcome=st.sampled_from(OUTCOMES))
    def platform_answers(self, outcome: str) -> None:
        self.pod.outcome = outcome

    @rule(seconds=st.floats(0, 12))
    def time_passes(self, seconds: float) -> None:
        self.now += seconds

    @rule()
    def guard_steps(self) -> None:
        wanted, _ = self.guard.next_request(self.now)
        if wanted is not None:
            assert wanted is not self.guard.applied, "re-sent a state the pod is known to hold"
            if self.failed is not None and self.failed[0] is wanted:
                assert self.now >= self.failed[1] + 5.0, "re-sent a failing request before the retry delay"
            self.failed = None if self.guard.send(wanted) else (wanted, self.now)

    @rule()
    def platform_recovers_and_guard_settles(self) -> None:
        self.pod.outcome = "accepted"
        for _ in range(10):
            wanted, wait = self.guard.next_request(self.now)
            if wanted is not None:
                self.guard.send(wanted)
            elif wait >= 3600:
                break
            else:
                self.now += wait
        else:
            raise AssertionError("the guard never settled")
        assert self.pod.protected == (self.guard.busy > 0)
        assert self.guard.applied is self.pod.protected

    def teardown(self) -> None:
        """Every example ends settled, however it ended."""
        self.platform_recovers_and_guard_settles()

    @invariant()
    def belief_is_never_wrong(self) -> None:
        if self.guard.applied is not None:
            assert self.guard.applied is self.pod.protected


@pytest.fixture(autouse=True)
def quiet_logs() -> Iterator[None]:
    previous = structlog.get_config()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.ERROR))
    yield
    structlog.configure(**previous)


def test_every_interleaving_leaves_an_idle_pod_unprotected() -> None:
    run_state_machine_as_test(GuardMachine, settings=settings(max_examples=300, stateful_step_count=40, deadline=None))
