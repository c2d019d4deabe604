"""A worker consumer for a RabbitMQ *cluster* (``worker_consumer``): Celery's, minus one step, plus one wait.

**Minus native delayed delivery.** With quorum queues, Celery 5.5+ adds a
bootstep, ``DelayedDelivery``, that declares 28 ``celery_delayed_*``
exchanges and queues and binds the task queues to them — at worker start and
again at every reconnect, once **for each URL in the broker list**, each
with retries. Measured on the kit's three-node cluster (Celery 5.7): after
one node died, a worker reconnected to a live node within milliseconds and
then spent ~17 s retrying that set-up against the dead node's URL before it
consumed another task. It buys nothing here: native delayed delivery works
only for queues bound to topic or fanout exchanges, and Celery's default
queue uses a direct exchange (the worker says so in its log at start).

**Plus a wait for the remote-control queue.** Since Celery 5.7 / kombu 5.7
(``control_queue_exclusive`` defaults to true: celery#10290, kombu#2531, for RabbitMQ 4.3,
which refuses transient non-exclusive queues) a worker's ``pidbox`` queue is
*exclusive* to the connection that declared it. When the node holding that
connection is SIGKILLed, the worker reconnects to a survivor within
milliseconds, sometimes before the survivors have dropped the dead
connection's exclusive queues; the declare then fails with ``405
RESOURCE_LOCKED`` and Celery treats that as unrecoverable: **the worker
exits**. Measured: 1 node death in 23 on the kit's cluster. This consumer
retries the declare, with backoff, for up to :data:`LOCKED_WAIT_S`, and says
so in the worker's log; after that it gives up as Celery would.

Everything else about quorum queues (per-consumer QoS, the queue type) is
Celery's own behaviour.
"""

from __future__ import annotations

import time
from typing import Any

from amqp.exceptions import ResourceLocked
from celery.utils.log import get_logger
from celery.worker import pidbox
from celery.worker.consumer import Consumer as CeleryConsumer
from celery.worker.consumer import control
from kombu.exceptions import InconsistencyError

logger = get_logger(__name__)

DELAYED_DELIVERY = "celery.worker.consumer.delayed_delivery:DelayedDelivery"
#: Seconds a worker waits for a survivor to release its remote-control queue. A node
#: that was SIGKILLed is noticed at once (its distribution links close); a node cut off
#: by the network is declared down only after ``net_ticktime`` (60 s by default).
LOCKED_WAIT_S = 30.0


def _locked(exc: BaseException) -> bool:
    """Is this the broker refusing a queue still held by another connection (405)?"""
    return isinstance(exc, ResourceLocked) or (isinstance(exc, InconsistencyError)
                                               and getattr(exc.__cause__, "code", 0) == 405)


class WaitingPidbox(pidbox.Pidbox):
    """Celery's worker mailbox, whose start waits while the queue is locked by a dead connection."""

    def start(self, c: Any) -> None:
        deadline = time.monotonic() + LOCKED_WAIT_S
        delay = 0.05
        while True:
            try:
                super().start(c)
                return
            except Exception as exc:
                if not _locked(exc) or time.monotonic() + delay > deadline:
                    raise
                logger.warning("remote-control queue of %s is still held by a connection the broker has "
                               "not dropped yet (RESOURCE_LOCKED); declaring again in %.2f s", self.hostname, delay)
                self._close_channel(c)  # the broker closed that channel; open a fresh one next time
                time.sleep(delay)
                delay = min(1.0, delay * 2)


class Control(control.Control):
    """Celery's remote-control step with :class:`WaitingPidbox` (same step name, so dependencies hold)."""

    name = control.Control.name

    def __init__(self, c: Any, **kwargs: Any) -> None:
        super().__init__(c, **kwargs)
        if not self.is_green:
            self.box = WaitingPidbox(c)
            self.start, self.stop, self.shutdown = self.box.start, self.box.stop, self.box.shutdown


CONTROL = "celery.worker.consumer.control:Control"


class Consumer(CeleryConsumer):
    """Celery's consumer without native delayed delivery, waiting out a locked remote-control queue."""

    class Blueprint(CeleryConsumer.Blueprint):
        default_steps = [f"{__name__}:Control" if s == CONTROL else s
                         for s in CeleryConsumer.Blueprint.default_steps if s != DELAYED_DELIVERY]
