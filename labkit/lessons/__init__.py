"""The lessons: one module per lesson, each keeping the same contract.

A lesson module (``labkit/lessons/<topic>.py``) is imported by three kinds
of reader: the workers (for its tasks), its notebook (for its experiments,
plots and claims), and the tests (for the same claims, and their negative
controls). So that anyone can add lesson 16 by copying lesson 12, every
module offers the same shape, checked by ``tests/test_contract.py``:

``NOTEBOOK``
    The notebook's file name in ``notebooks/`` (``"12_semaphore.ipynb"``).
``CLUSTER``
    A dict of :class:`~labkit.cluster.LocalCluster` keyword arguments: the
    notebook starts its cluster with ``LocalCluster(**topic.CLUSTER)``. A
    lesson whose cluster shape is itself a notebook parameter also offers
    ``cluster_config(**params) -> dict`` (with ``CLUSTER = cluster_config()``)
    and the notebook calls ``LocalCluster(**topic.cluster_config(...))``.
``WORKSHOP``
    A second set of notebook parameters — what a workshop host might pick
    (bigger N, more contenders) — that CI also runs the notebook with. Every
    key is a name assigned in the notebook's ``parameters`` cell.
Tasks
    ``@shared_task(name="<topic>.<name>")``: the prefix keeps task names of
    different lessons apart.
Experiments
    Public functions whose first parameter is ``cluster``. They take their
    parameters as keywords with small defaults, run real work on the cluster
    and return a :class:`~labkit.measure.Measurement` (or a list / dict of
    them). ``cluster`` is typed :class:`~labkit.client.ClusterLike` when the
    experiment only sends tasks and reads state — it then also runs on an
    attached cluster — and :class:`~labkit.cluster.LocalCluster` when it
    injects faults or adds workers. A function returning ``None`` prepares
    the cluster (adds a worker, warms pools). The headline pair is
    ``before(cluster, **params)`` and ``after(cluster, **params)``.
Comparisons
    ``compare*(cluster, **params) -> Comparison``: they run both sides on
    the same workload and build the result one way,
    ``Comparison(before, after, better=..., title=...)``.
Claims
    Functions decorated with :func:`~labkit.measure.claim`: they take
    Measurements / Comparisons (and nothing else from the cluster), derive
    every threshold from the parameters recorded in the measurements, and
    raise ``AssertionError`` (via :func:`~labkit.measure.verify` or
    ``Comparison.check``) when the claim does not hold. The notebook's
    verify cell calls them; ``tests/lessons/test_<topic>.py`` calls them on
    a fresh run, and has a negative control for each —
    ``test_<topic>_claim_fails_without_the_fix*`` — that runs the check on
    the "before" (the fix switched off) and expects it to raise. An effect
    built in by construction (an emulated NAS, a chosen offset) is an
    *illustration*: the notebook says so, and no claim checks it.

A lesson never starts processes itself (it asks the cluster:
``add_worker``, ``add_beat``), never imports :mod:`labkit.services`, and
never waits with a hand-written loop (:func:`labkit.poll.poll_until`).
Tables go through :class:`labkit.table.Table`, plots through
:mod:`labkit.plots`.
"""

from __future__ import annotations

import importlib
import pkgutil
from types import ModuleType


def module_names() -> list[str]:
    """Dotted names of every lesson module (``labkit.lessons.<topic>``), private ones excluded."""
    return [f"{__name__}.{m.name}" for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_")]


def catalogue() -> dict[str, ModuleType]:
    """Every lesson module that names its notebook, by notebook file name (imports them)."""
    out: dict[str, ModuleType] = {}
    for name in module_names():
        module = importlib.import_module(name)
        notebook = getattr(module, "NOTEBOOK", None)
        if notebook:
            out[notebook] = module
    return dict(sorted(out.items()))
