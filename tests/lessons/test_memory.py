"""Lesson 01 (memory): the generator, the fresh-process measurement, and the lesson's claims.

The claims are asserted on real runs: each loader in a fresh interpreter, a
real HTTP download over loopback, Celery tasks in real prefork pool children.
Bounds are ratios with generous margins (pilot figures in comments).
"""

from __future__ import annotations

import io
import xml.etree.ElementTree as ET
import zlib

import pytest

from labkit import LocalCluster, data
from labkit.fresh import MIB, peak_rss, run_fresh
from labkit.lessons import memory

pytestmark = pytest.mark.cluster  # every test here starts real processes

# ----------------------------------------------------------------------------- the generator


def _doc(size: int, seed: int = 0, **kw) -> tuple[bytes, int]:
    buf = io.BytesIO()
    sales = data.write_vehicle_sales(buf, size, seed, **kw)
    return buf.getvalue(), sales


def test_parse_size():
    assert data.parse_size("44MB") == 44_000_000
    assert data.parse_size("500kB") == 500_000
    assert data.parse_size("1.5GiB") == int(1.5 * 2**30)
    assert data.parse_size("12") == 12_000_000
    assert data.parse_size(1234) == 1234
    with pytest.raises(ValueError):
        data.parse_size("12 parsecs")


@pytest.mark.parametrize("size", [200, 4_000, 123_457, 1_000_000])
def test_exact_size_and_well_formed(size):
    doc, sales = _doc(size)
    assert len(doc) == size
    root = ET.fromstring(doc)
    assert root.tag == "VehicleSales"
    assert len(root) == sales
    for sale in root:
        assert sale.tag == "VehicleSale"
        assert [f.tag for f in sale] == list(data.FIELDS)
        float(sale.findtext("CashPrice"))


def test_deterministic_by_seed():
    a, _ = _doc(300_000, seed=7)
    b, _ = _doc(300_000, seed=7)
    c, _ = _doc(300_000, seed=8)
    assert a == b
    assert a != c
    small, n_small = _doc(100_000, seed=7)
    body = small[: small.rindex(b"</VehicleSale>") + len(b"</VehicleSale>")]
    assert a.startswith(body), "a smaller file is a prefix of a bigger one with the same seed"


def test_committed_sample_is_the_generators_output():
    sample = data.sample_path().read_bytes()
    assert 1_000 < len(sample) < 20_000
    assert _doc(len(sample), seed=0)[0] == sample


def test_dealer_records():
    doc, sales = _doc(200_000, dealer_every=10)
    root = ET.fromstring(doc)
    assert len(root.findall("VehicleSale")) == sales
    assert len(root.findall("Dealer")) == sales // 10


def test_cache_hit_and_cli(tmp_path, monkeypatch):
    monkeypatch.setenv("LABKIT_DATA_DIR", str(tmp_path / "cache"))
    first = data.vehicle_sales("50kB", seed=3)
    assert first.parent == tmp_path / "cache" and first.stat().st_size == 50_000
    stamp = first.stat().st_mtime_ns, first.stat().st_ino
    again = data.vehicle_sales(50_000, seed=3)
    assert again == first and (again.stat().st_mtime_ns, again.stat().st_ino) == stamp, "regenerated"
    assert data.vehicle_sales("50kB", seed=4) != first
    first.write_bytes(b"truncated")  # a damaged cache entry is replaced
    assert data.vehicle_sales("50kB", seed=3).stat().st_size == 50_000
    out = tmp_path / "copy.xml"
    assert data.main(["vehicle-sales", "--size", "50kB", "--seed", "3", "--out", str(out), "--quiet"]) == 0
    assert out.read_bytes() == first.read_bytes()
    assert not list((tmp_path / "cache").glob(".*tmp")), "temporary files left behind"


# ----------------------------------------------------------------------------- measuring in a fresh process


def _allocate(mib: int) -> int:
    block = bytearray(mib * 1024 * 1024)
    block[::4096] = b"\x01" * len(block[::4096])  # touch every page
    return len(block)


def _allocate_by_source(mib: int) -> int:
    block = bytearray(mib * 1024 * 1024)
    block[::4096] = b"\x01" * len(block[::4096])
    return len(block)


_allocate_by_source.__module__ = "__main__"  # as if defined in a notebook: sent as source


def test_fresh_process_peak_is_the_calls_own():
    hog = bytearray(300 * 2**20)  # the caller's memory must not show up in the child's figure
    hog[::4096] = b"\x01" * len(hog[::4096])
    run = run_fresh(_allocate, (80,), interval=0.01)
    assert run.result == 80 * 2**20
    assert run.peak_source == "VmHWM"
    assert 78 <= run.net / MIB <= 100, run
    assert run.peak / MIB < 200, "the fresh process inherited the caller's memory"
    assert max(v for _, v in run.timeline) - run.baseline > 40 * MIB, "the sampler saw no growth"
    m = peak_rss(_allocate_by_source, (40,), label="source")
    assert m.meta["result"] == 40 * 2**20 and 38 <= m.value <= 60
    del hog


def test_fresh_process_reports_the_childs_error():
    with pytest.raises(RuntimeError, match="ZeroDivisionError"):
        run_fresh(divmod, (1, 0), interval=None)


# ----------------------------------------------------------------------------- the lesson's claims

SMALL_MB, DEFAULT_MB = 5, memory.DEFAULT_MB  # quadrupling: 5 -> 20 MB


@pytest.fixture(scope="module")
def runs() -> dict:
    at_default = memory.loaders(DEFAULT_MB)
    by_variant = {m.meta["variant"]: m for m in at_default}
    sweep = memory.sweep((SMALL_MB, DEFAULT_MB), ("parse", "talk", "clear", "lxml"), reuse=at_default)
    return {"at": by_variant, "sweep": sweep}


def test_every_loader_does_the_same_work(runs):
    results = {v: m.meta["result"] for v, m in runs["at"].items()}
    assert len({(r["records"], r["total"]) for r in results.values()}) == 1, results
    assert results["parse"]["records"] > 50_000


def test_full_parse_needs_8x_more_than_streaming(runs):
    # pilot at 20 MB: parse 187 MiB above baseline; streaming 0.2-0.5 MiB
    for v in memory.STREAMING:
        memory.compare(runs["at"]["parse"], runs["at"][v]).check(factor=8)
    # even counting the fresh interpreter's whole baseline on both sides
    for v in memory.STREAMING:
        gross_parse, gross_stream = runs["at"]["parse"].meta["peak_mib"][-1], runs["at"][v].meta["peak_mib"][-1]
        assert gross_parse >= 3 * gross_stream, (gross_parse, gross_stream)


def test_iterparse_without_clear_saves_nothing(runs):
    parse, no_clear = runs["at"]["parse"].value, runs["at"]["iterparse"].value
    assert no_clear >= parse / 1.3, (parse, no_clear)


def test_streaming_stays_flat_while_parse_grows(runs):
    sweep = runs["sweep"]
    assert memory.growth(sweep["parse"]) >= 2.5, [m.value for m in sweep["parse"]]  # pilot 4.0
    for v in memory.STREAMING:
        assert memory.growth(sweep[v]) <= 1.3, [m.value for m in sweep[v]]  # pilot 1.0


def test_the_talks_loop_still_grows_but_far_less(runs):
    talk, parse = runs["sweep"]["talk"], runs["sweep"]["parse"]
    assert memory.growth(talk) >= 2.0, [m.value for m in talk]  # pilot 1.3 -> 5.0 MiB
    assert talk[-1].value * 10 <= parse[-1].value


def test_streaming_is_not_slower(runs):
    parse = runs["at"]["parse"].meta["records_per_s"]
    for v in memory.STREAMING:
        assert runs["at"][v].meta["records_per_s"] >= 0.6 * parse, (v, runs["at"][v].meta["records_per_s"], parse)


def test_streamed_download_needs_5x_less():
    cmp = memory.downloads(150)  # pilot: 287 MiB vs < 1 MiB above baseline
    assert cmp.before.meta["result"] == cmp.after.meta["result"]
    assert cmp.before.meta["result"]["bytes"] == 150_000_000
    cmp.check(factor=5, before_at_least=150 * 10**6 / MIB)


def test_byte_server_is_deterministic_and_closes():
    import requests

    with memory.ByteServer(seed=1) as server:
        url = server.url
        a = requests.get(f"{url}/bytes/3000000", timeout=10).content
        b = requests.get(f"{url}/bytes/3000000", timeout=10).content
        assert len(a) == 3_000_000 and a == b and zlib.crc32(a) != 0
        assert requests.get(f"{url}/nothing", timeout=10).status_code == 404
    with pytest.raises(requests.ConnectionError):
        requests.get(f"{url}/bytes/10", timeout=2)


def test_in_the_cluster():
    with LocalCluster(**memory.cluster_options(), reuse=False) as cluster:
        parse, lxml = memory.in_cluster(cluster, 10)
        assert parse.meta["pid"] != lxml.meta["pid"]
        assert parse.meta["records"] == lxml.meta["records"]
        # pilot: 94 vs 4 MiB above the pool child's start
        assert parse.meta["net_mib"] >= 5 * max(lxml.meta["net_mib"], 1.0), (parse.meta, lxml.meta)
        demo = memory.runaway(cluster, 10)
        assert demo["parse_state"] == "SUCCESS"
        assert demo["parse_peak_mib"] > demo["limit_mib"], demo  # pilot 150 vs 120 MiB
        assert demo["steps"][0]["maxrss_mib"] < demo["limit_mib"], demo
        assert demo["same_child"] and demo["replaced_after"], demo
