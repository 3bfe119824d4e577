"""The broker crashes (SIGKILL) and comes back *empty*: no job is lost, none runs twice.

The shared fault stack's Redis runs without persistence (tests/faults/conftest.py `fault_stack`),
the worst case for a broker: a restart forgets every queued message and every unacknowledged
delivery. The database still lists the unfinished jobs, and a worker's reconciler
(worker/reconcile.py) re-sends those that no live process holds; the job lease
(worker/lease.py) makes any duplicate harmless. Three moments are covered: a job waiting in the
queue, a job running on a worker, and a job created while Redis is down.
"""

from __future__ import annotations

import pytest
import redis as redis_client

from tests.faults.faultkit import assert_nothing_lost_nothing_twice, count
from tests.faults.stack import Stack

pytestmark = pytest.mark.slow

QUEUE = "qlora"  # service.queue.QUEUE: kombu's Redis transport keeps a queue as a list of that name


def _queued(stack: Stack) -> int:
    assert stack.redis is not None
    return int(redis_client.Redis.from_url(stack.redis.url).llen(QUEUE))


def _crash_and_restart_redis(stack: Stack) -> None:
    assert stack.redis is not None
    stack.redis.kill()
    stack.redis.start()
    count("restarts_survived")


def test_queued_job_survives_a_broker_that_forgets_it(fault_stack: Stack) -> None:
    stack = fault_stack
    job_id = stack.create_job(max_steps=4)
    assert _queued(stack) == 1  # no worker yet: the message waits in Redis
    _crash_and_restart_redis(stack)
    assert _queued(stack) == 0  # ... and the restart lost it
    stack.start_worker("after-redis")
    assert_nothing_lost_nothing_twice(stack, job_id, 4, interruptions=0)
    stack.stop_workers()


def test_running_job_survives_a_broker_crash_and_the_worker_reconnects(fault_stack: Stack) -> None:
    stack = fault_stack
    stack.start_worker("through-redis")
    job_id = stack.create_job(max_steps=150, checkpoint_steps=50)
    stack.wait_step(job_id, 3)
    _crash_and_restart_redis(stack)
    assert stack.job_row(job_id).status == "running"  # the crash came mid-training
    assert_nothing_lost_nothing_twice(stack, job_id, 150, interruptions=0)
    # The same worker process, reconnected to the new broker, takes the next job.
    next_id = stack.create_job(max_steps=4)
    assert_nothing_lost_nothing_twice(stack, next_id, 4, interruptions=0)
    stack.stop_workers()


def test_job_created_while_the_broker_is_down_runs_when_it_is_back(fault_stack: Stack) -> None:
    """The API records the job and answers (its enqueue fails); the reconciler sends it later."""
    stack = fault_stack
    assert stack.redis is not None
    stack.start_worker("redis-down")
    stack.redis.kill()
    try:
        job_id = stack.create_job(max_steps=4)
        assert stack.job_row(job_id).status == "validating_files"
    finally:
        stack.redis.start()
    count("restarts_survived")
    assert_nothing_lost_nothing_twice(stack, job_id, 4, interruptions=0)
    stack.stop_workers()
