"""Lesson 02 without processes: payloads, placements, the emulated NAS and the claims' arithmetic."""

from __future__ import annotations

import time
import urllib.request

import pytest

from labkit.lessons import locality
from labkit.measure import Comparison, Measurement


def test_payload_is_deterministic_ascii():
    assert locality.payload(3, 1000) == locality.payload(3, 1000)
    assert locality.payload(3, 1000) != locality.payload(4, 1000)
    assert len(locality.payload(1, 12_345)) == 12_345
    locality.payload(1, 100).decode("ascii")  # travels in JSON as a plain string


def test_placements_are_checked_before_anything_is_sent():
    with pytest.raises(ValueError, match="mode, placement"):
        locality.pairs(None, mode="shared", placement="forward")  # type: ignore[arg-type]
    assert locality.PLACEMENTS[("local", "anywhere")].startswith("naive")
    assert all(label.startswith("fix") for key, label in locality.PLACEMENTS.items() if key != ("local", "anywhere"))


def _pairs(failed, crossed, n=120, workers=2, same_node=False):
    return Measurement("p", "failed pairs", "pairs", [1] * failed + [0] * (n - failed), stat="sum",
                       meta={"pairs": n, "b_on_other_worker": crossed, "workers": workers, "same_node": same_node})


@pytest.mark.parametrize("workers", [2, 3, 5])
def test_naive_claim_threshold_follows_the_workers(workers):
    n = 120
    expected = round(n * (workers - 1) / workers)
    locality.a_local_path_breaks_on_other_hosts(_pairs(expected, expected, n, workers))
    low = int(0.5 * expected)  # well under 0.6 x the expected share
    with pytest.raises(AssertionError, match="of the pairs fail"):
        locality.a_local_path_breaks_on_other_hosts(_pairs(low, low, n, workers))
    with pytest.raises(AssertionError, match="every failure is a pair whose B ran"):
        locality.a_local_path_breaks_on_other_hosts(_pairs(expected, expected + 3, n, workers))


def test_fix_claim():
    locality.no_pair_fails(_pairs(0, 60))
    locality.no_pair_fails(_pairs(0, 0, same_node=True))
    with pytest.raises(AssertionError, match="no pair fails"):
        locality.no_pair_fails(_pairs(60, 60))
    with pytest.raises(AssertionError, match="B always ran where A ran"):
        locality.no_pair_fails(_pairs(0, 2, same_node=True))


def test_broker_claim():
    def held(label, per_message):
        return Measurement(label, "broker memory per waiting message", "bytes", [per_message],
                           meta={"payload_bytes": 5_000_000})

    locality.a_reference_spares_the_broker(Comparison(held("by value", 7.3e6), held("by reference", 1259)))
    with pytest.raises(AssertionError, match="improvement factor"):
        locality.a_reference_spares_the_broker(Comparison(held("by value", 7.3e6), held("by value", 7.3e6)))
    with pytest.raises(AssertionError, match="before"):  # a waiting message must hold at least its payload
        locality.a_reference_spares_the_broker(Comparison(held("by value", 1e6), held("by reference", 1e3)))


def _tiers(size, memory, file, redis, nas=5e-3):
    return [Measurement(label, "read time", "s", [v], meta={"bytes": size})
            for label, v in (("memory", memory), ("local file", file), ("Redis (loopback)", redis),
                             ("emulated NAS", nas))]


def test_ladder_claim_checks_only_the_measured_rungs():
    locality.closer_is_faster(_tiers(262_144, 1.6e-5, 4.6e-5, 7.7e-4))
    locality.closer_is_faster(_tiers(262_144, 1.6e-5, 4.6e-5, 7.7e-4, nas=1e-4))  # the NAS is not checked
    with pytest.raises(AssertionError, match="memory !< local file"):
        locality.closer_is_faster(_tiers(262_144, 5e-5, 4.6e-5, 7.7e-4))
    locality.closer_is_faster(_tiers(4 << 20, 3.2e-4, 2.7e-4, 2.5e-2))  # big reads: memory and file may tie
    with pytest.raises(AssertionError, match="local file !< Redis"):
        locality.closer_is_faster(_tiers(4 << 20, 3.2e-4, 3e-2, 2.5e-2))


def test_emulated_nas_charges_its_latency(tmp_path):
    (tmp_path / "x.dat").write_bytes(b"y" * 1000)
    with locality.EmulatedNAS(tmp_path, latency=0.05) as nas:
        t0 = time.perf_counter()
        with urllib.request.urlopen(f"{nas.url}/x.dat", timeout=5) as resp:
            assert resp.read() == b"y" * 1000
        assert time.perf_counter() - t0 >= 0.05
        with pytest.raises(urllib.error.HTTPError):
            urllib.request.urlopen(f"{nas.url}/../etc/passwd", timeout=5)
