"""A Celery worker consumer for a RabbitMQ *cluster* with quorum queues (``worker_consumer`` setting).

With quorum queues, Celery 5.5+ adds a bootstep, ``DelayedDelivery``, that
declares 28 ``celery_delayed_*`` exchanges and queues and binds the task
queues to them — at worker start and again at every reconnect, once **for
each URL in the broker list**, each with retries. Measured on the kit's
three-node cluster (Celery 5.7): after one node died, a worker reconnected
to a live node within milliseconds and then spent ~17 s retrying that set-up
against the dead node's URL before it consumed another task.

It buys nothing here: native delayed delivery works only for queues bound
to topic or fanout exchanges, and Celery's default queue uses a direct
exchange (the worker says so in its log at start). So the kit's quorum
cluster runs this consumer, which is Celery's without that one step.
Everything else about quorum queues (per-consumer QoS, the queue type) is
Celery's own behaviour.
"""

from __future__ import annotations

from celery.worker.consumer import Consumer as CeleryConsumer

DELAYED_DELIVERY = "celery.worker.consumer.delayed_delivery:DelayedDelivery"


class Consumer(CeleryConsumer):
    """Celery's consumer without the native delayed-delivery bootstep."""

    class Blueprint(CeleryConsumer.Blueprint):
        default_steps = [s for s in CeleryConsumer.Blueprint.default_steps if s != DELAYED_DELIVERY]
