"""Poll intervals on the path ServerApp ↔ SuperLink ↔ SuperNode ↔ ClientApp, and how Stamen sets them.

Flower 1.39 moves every message by polling. The intervals on a round's path, and who owns them:

====================================  ===========  =================================================
interval                              Flower 1.39  Stamen deployment (``stamen deploy local``)
====================================  ===========  =================================================
ServerApp grid waits for replies      3 s fixed    :class:`Backoff` 0.01 → 0.25 s (server/app.py)
a message's objects not uploaded yet  1 s → 10 s   0.01 → 0.5 s, ×2 (:func:`install_fast_object_pulls`:
(receiver retries ``PullObject``)     ×2           SuperNode from SuperLink, ServerApp from SuperLink,
                                                   ClientApp runner from SuperNode); the
                                                   ServerApp gives up at the round's deadline
                                                   (:func:`object_pull_deadline`), Flower after 2 h
SuperNode asks the SuperLink for work 3 s fixed    :class:`Backoff` 0.05 → 3 s, ×1.5, reset by a
                                                   message (:func:`install_supernode_pacing`)
SuperNode waits for its ClientApp     0.5 s        woken by the ClientApp runner as soon as the
                                                   reply is stored (0.05 s fallback check)
ClientApp runner acquires the task    1 s          woken by the SuperNode when a message arrives
(SuperExec ``AcquireTask`` poll)      (env var)    (``deploy/clientapp.py``; :class:`Backoff`
                                                   0.01 → 1 s when it runs apart from its SuperNode)
SuperLink's SuperExec starts the      1 s          0.2 s (``FLWR_SUPEREXEC_TASK_POLL_INTERVAL``;
ServerApp                             (env var)    once per run)
====================================  ===========  =================================================

Only the SuperNode → SuperLink poll crosses the network and costs the SuperLink something per
node: a ``PullMessages`` RPC, signed by the node's key and verified by the SuperLink. A
:class:`Backoff` polls quickly right after the node has seen a message (the next round's comes
within a round's time) and slows down geometrically to Flower's own 3 s once nothing arrives,
so an idle federation costs the SuperLink exactly what Flower's fixed interval costs, and an
active one ``polls_within(gap)`` RPCs per node per gap between its reply and its next message
(DEPLOY.md §7 has the measured price per RPC and the numbers at 1,000 nodes).

Flower hard-codes the SuperNode's intervals (``time.sleep(3)`` and ``time.sleep(0.5)`` in
``flwr.supernode.start_client_internal``); :func:`install_supernode_pacing` replaces that
module's ``time`` with a :class:`SuperNodeClock` that maps exactly those two calls to the
intervals above and passes everything else through. It is checked against the pinned Flower
version (:data:`PATCHED_FLOWER`) and refuses to patch any other.
"""

from __future__ import annotations

import math
import threading
import time
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, Callable

#: the Flower release whose SuperNode loop :func:`install_supernode_pacing` knows
PATCHED_FLOWER = "1.39.0"
#: Flower 1.39's idle wait between two ``PullMessages`` when no message came (start_client_internal.py)
FLOWER_IDLE_SLEEP_S = 3
#: Flower 1.39's wait between two checks for the ClientApp's reply (and for a reply's objects)
FLOWER_REPLY_SLEEP_S = 0.5

#: defaults of the knobs (seconds), shared by ``stamen deploy local`` and ``stamen deploy supernode``
SUPERNODE_POLL_MIN_S = 0.05
SUPERNODE_POLL_MAX_S = 3.0
SUPERNODE_POLL_FACTOR = 1.5
REPLY_CHECK_S = 0.05
SERVER_POLL_MIN_S = 0.01
SERVER_POLL_MAX_S = 0.25
SERVER_POLL_FACTOR = 1.5
#: a message's objects that are not uploaded yet: first retry after this (Flower: 1 s), doubling up to the cap
#: (Flower: 10 s). A receiver polling quickly sees a message before its sender has pushed all its objects.
OBJECT_PULL_INITIAL_S = 0.01
OBJECT_PULL_CAP_S = 0.5
#: the SuperLink's SuperExec polls for a ServerApp to start (Flower's env variable; default 1 s)
SUPEREXEC_POLL_ENV = "FLWR_SUPEREXEC_TASK_POLL_INTERVAL"
SUPEREXEC_POLL_S = 0.2


@dataclass
class Backoff:
    """Geometric polling: ``min_s`` right after activity, ×``factor`` per empty poll, at most ``max_s``."""

    min_s: float
    max_s: float
    factor: float = 1.5
    _k: int = field(default=0, repr=False)

    def __post_init__(self) -> None:
        if not (0 < self.min_s <= self.max_s) or self.factor < 1.0 or not math.isfinite(self.max_s):
            raise ValueError(f"poll intervals need 0 < min ({self.min_s}) <= max ({self.max_s}) and factor >= 1")

    def reset(self) -> None:
        self._k = 0

    def next(self) -> float:
        """The interval to wait before the next poll (and count this empty poll)."""
        s = min(self.max_s, self.min_s * self.factor ** self._k)
        if s < self.max_s:
            self._k += 1
        return s

    def polls_within(self, seconds: float) -> int:
        """Polls made during ``seconds`` of silence after activity (the per-node cost of a gap)."""
        n, t, k = 0, 0.0, 0
        while True:
            t += min(self.max_s, self.min_s * self.factor ** k)
            if t > seconds:
                return n + 1  # the poll at time 0 (right after the activity) counts too
            n, k = n + 1, k + 1


class SuperNodeClock:
    """Stands in for the ``time`` module inside ``flwr.supernode.start_client_internal``.

    ``sleep(3)`` (no message came) waits the next :class:`Backoff` interval; ``sleep(0.5)``
    (no reply from the ClientApp yet) waits until ``reply_ready`` is set, checking at least
    every ``reply_check_s``; any other call is the real ``time``'s.
    """

    def __init__(self, poll: Backoff, reply_check_s: float = REPLY_CHECK_S):
        self.poll = poll
        self.reply_check_s = float(reply_check_s)
        self.reply_ready = threading.Event()
        self.message_arrived = threading.Event()
        self.idle_polls = 0

    def sleep(self, seconds: float) -> None:
        if seconds == FLOWER_IDLE_SLEEP_S:
            self.idle_polls += 1
            time.sleep(self.poll.next())
        elif seconds == FLOWER_REPLY_SLEEP_S:
            if self.reply_ready.wait(self.reply_check_s):
                self.reply_ready.clear()
        else:
            time.sleep(seconds)

    def activity(self) -> None:
        """A message arrived: poll quickly again, and wake whoever runs the ClientApps."""
        self.poll.reset()
        self.message_arrived.set()

    def __getattr__(self, name: str) -> Any:  # time.time, time.monotonic, … unchanged
        return getattr(time, name)


def object_pull_options() -> dict[str, Any]:
    """Keyword arguments of Flower's ``pull_objects`` for quick retries (give up after Flower's max time)."""
    return {"initial_backoff": OBJECT_PULL_INITIAL_S, "backoff_cap": OBJECT_PULL_CAP_S,
            "max_tries_per_object": None}


#: monotonic time after which an object pull in this context gives up (None: Flower's 2 h)
_PULL_DEADLINE: ContextVar[float | None] = ContextVar("stamen_object_pull_deadline", default=None)


@contextmanager
def object_pull_deadline(deadline: float | None):
    """Object pulls made inside this block (by a wrapped ``pull_objects``) give up at ``deadline``
    (``time.monotonic()``), with Flower's ``ObjectPullError``, instead of after Flower's 7,200 s.

    A reply is listed by the SuperLink as soon as its sender registers it, before its arrays
    are uploaded; a sender that dies in between leaves a reply whose objects never come, and
    Flower's grid would wait on it for two hours, holding every other reply behind it."""
    token = _PULL_DEADLINE.set(deadline)
    try:
        yield
    finally:
        _PULL_DEADLINE.reset(token)


def install_fast_object_pulls(module) -> None:
    """Make ``module``'s calls of Flower's ``pull_objects`` retry unavailable objects quickly.

    Flower waits 1 s before asking again for an object its sender has not finished uploading,
    then 2, 4, … 10 s; a receiver that polls quickly finds messages that early, so that wait
    would land on every round. Used for ``flwr.supernode.start_client_internal`` (a SuperNode
    pulling from the SuperLink) and ``flwr.superlink.grid.http_grid`` (the ServerApp pulling
    replies); inside :func:`object_pull_deadline` the pull also gives up at that deadline.
    It changes nothing else about the call.
    """
    original = getattr(module.pull_objects, "__wrapped__", module.pull_objects)

    def pull_objects(*args, **kwargs):
        for key, value in object_pull_options().items():
            kwargs.setdefault(key, value)
        deadline = _PULL_DEADLINE.get()
        if deadline is not None:
            kwargs.setdefault("max_time", max(0.0, deadline - time.monotonic()))
        return original(*args, **kwargs)

    pull_objects.__wrapped__ = original  # type: ignore[attr-defined]
    module.pull_objects = pull_objects


def _unfinished_tasks(state):
    """The SuperNode's tasks not yet finished (Flower's state keeps every task it ever had: asking for
    all of them on each poll would copy a list that grows with every message)."""
    from flwr.common.constant import Status

    return state.get_tasks(statuses=[Status.PENDING, Status.STARTING, Status.RUNNING])


def _task_ids(state) -> set[int] | None:
    return None if state is None else {t.task_id for t in _unfinished_tasks(state)}


def _drop_orphaned_tasks(state, object_store, before: set[int]) -> None:
    """Finish the tasks a message that was *not* stored left behind.

    Flower 1.39 creates a message's task before it pulls the message's objects; when the run
    stops meanwhile, ``RunNotRunningException`` (a BaseException) skips its clean-up, so a
    task remains whose message has no content. Flower's SuperExec starts a ClientApp for it
    that waits up to 2 h for objects that never come — beside the others; a runner that serves
    tasks one after another would wait with it (and its error reply would stand in for the
    next message's reply). A task created during a pull that stored nothing is such an orphan,
    whether or not a runner has already claimed it: it is marked failed (revoking its token),
    its run's unread messages are removed.
    """
    from flwr.common.constant import SubStatus

    for task in _unfinished_tasks(state):
        if task.task_id in before:
            continue
        state.finish_task(task.task_id, sub_status=SubStatus.FAILED,
                          details="the run stopped while its message was being received")
        for msg in state.get_messages(run_ids=[task.run_id], is_reply=False):
            state.delete_messages(message_ids=[msg.metadata.message_id])
            if object_store is not None:
                object_store.delete(msg.metadata.message_id)


def flower_version() -> str:
    from importlib.metadata import version

    return version("flwr")


def install_supernode_pacing(clock: SuperNodeClock) -> None:
    """Make Flower's SuperNode loop (this process) use ``clock``'s intervals.

    Raises RuntimeError on a Flower other than :data:`PATCHED_FLOWER`, or if the loop no longer
    contains the calls this replaces (then run Flower's own ``flower-supernode``).
    """
    import inspect

    from flwr.supernode import start_client_internal as sci

    if flower_version() != PATCHED_FLOWER:
        raise RuntimeError(f"Stamen's SuperNode pacing knows Flower {PATCHED_FLOWER}, found {flower_version()}: "
                           "use flower-supernode (Flower's own 3 s polling)")
    source = inspect.getsource(sci)
    for call in (f"time.sleep({FLOWER_IDLE_SLEEP_S})", f"time.sleep({FLOWER_REPLY_SLEEP_S})"):
        if call not in source:
            raise RuntimeError(f"flwr.supernode.start_client_internal no longer calls {call}; pacing not installed")
    original: Callable[..., Any] = getattr(sci._pull_and_store_message, "__wrapped__", sci._pull_and_store_message)

    def pull_and_store_message(*args, **kwargs):
        state = kwargs.get("state")
        before = _task_ids(state)
        run_id = original(*args, **kwargs)
        if run_id is not None:
            clock.activity()
        elif before is not None:
            _drop_orphaned_tasks(state, kwargs.get("object_store"), before)
        return run_id

    pull_and_store_message.__wrapped__ = original  # type: ignore[attr-defined]
    sci._pull_and_store_message = pull_and_store_message
    sci.time = clock  # type: ignore[assignment]
    install_fast_object_pulls(sci)
