"""Lesson 12's claims on a real cluster, each with a negative control on the "before".

Two "host" workers with 12 threads each run the callers; ``limited`` (3
threads) serves the dedicated queue. Counts come from the probe server
(in-flight requests) and from Redis (failed acquires), never from logs. One
run of every experiment per module (``runs``); the tests only judge it.
"""

from __future__ import annotations

import threading
import urllib.request

import pytest

from labkit import LocalCluster
from labkit.lessons import semaphore
from labkit.lessons._probe import ProbeServer
from labkit.measure import Comparison

pytestmark = pytest.mark.cluster  # every test here starts real processes

N, LEASES = 12, 3


@pytest.fixture(scope="module")
def runs():
    with LocalCluster(**semaphore.cluster_config(leases=LEASES), reuse=False) as c:
        yield {
            "limit": semaphore.compare(c, n=N, leases=LEASES, hold=0.4),
            "first_nb": semaphore.first_try(c, "nonblocking", n=N, leases=LEASES),
            "first_to": semaphore.first_try(c, "timeout", n=N, leases=LEASES, wait=0.5, trials=2),
            "forms": semaphore.retry_forms(c, n=N, leases=LEASES, hold=0.4, wait=1.0),
        }


def test_probe_server_counts_in_flight_and_stops():
    with ProbeServer() as probe:
        url = probe.url
        threads = [threading.Thread(target=urllib.request.urlopen, args=(f"{url}/call?hold=0.3",))
                   for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert probe.peak == 4
        assert len(probe.snapshot()) == 4
    with pytest.raises(OSError):
        urllib.request.urlopen(f"{url}/call", timeout=2)


def test_semaphore_caps_the_client_at_the_limit(runs):
    semaphore.semaphore_caps_the_client(runs["limit"])


def test_semaphore_claim_fails_without_the_fix_cap(runs):
    before = runs["limit"].before
    with pytest.raises(AssertionError, match="never sees more than"):
        semaphore.semaphore_caps_the_client(Comparison(before, before))


def test_threads_of_one_worker_share_one_session(runs):
    sessions = runs["limit"].after.meta["sessions"]
    assert sessions, "the blocking run recorded its lease holders"
    for worker, entry in sessions.items():
        assert len(entry["sessions"]) == 1, (worker, entry)
    assert max(e["threads"] for e in sessions.values()) > 1, sessions


def test_nonblocking_acquire_leaves_free_leases_unused(runs):
    semaphore.nonblocking_leaves_free_leases(runs["first_nb"], runs["first_to"])


def test_semaphore_claim_fails_without_the_fix_first_try(runs):
    with pytest.raises(AssertionError, match="grants every free lease"):
        semaphore.nonblocking_leaves_free_leases(runs["first_nb"], runs["first_nb"])


def test_every_limited_form_holds_the_limit(runs):
    semaphore.limited_forms_hold_the_limit(runs["forms"])
    assert runs["forms"]["queue"].meta["failed"] == 0


def test_semaphore_claim_fails_without_the_fix_limited_forms(runs):
    with pytest.raises(AssertionError, match="never more than"):
        semaphore.limited_forms_hold_the_limit({"unprotected": runs["limit"].before})


def test_timeout_wastes_fewer_attempts_than_nonblocking_retry(runs):
    semaphore.timeout_wastes_fewer_attempts(runs["forms"]["nonblocking"], runs["forms"]["timeout"])


def test_semaphore_claim_fails_without_the_fix_wasted_attempts(runs):
    talk = runs["forms"]["nonblocking"]
    with pytest.raises(AssertionError, match="fails fewer acquires"):
        semaphore.timeout_wastes_fewer_attempts(talk, talk)


def test_table_renders_every_run(runs):
    forms = list(runs["forms"].values())
    text = str(semaphore.table(forms))
    assert all(m.label in text for m in forms)
    assert "<table>" in semaphore.table(forms)._repr_html_()
