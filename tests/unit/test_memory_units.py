"""Lesson 01 without processes: the data generator, the loaders on a small file, the claims' arithmetic."""

from __future__ import annotations

import io
import xml.etree.ElementTree as ET
import zlib

import pytest

from labkit import data
from labkit.lessons import memory
from labkit.measure import Comparison, Measurement

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


def test_progress_is_tqdm_and_off_by_default(capsys):
    _doc(300_000, progress=False)
    assert capsys.readouterr().err == ""
    _doc(300_000, progress=True)
    assert "VehicleSales" in capsys.readouterr().err  # tqdm's text bar (no notebook here)


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


# ----------------------------------------------------------------------------- the loaders, in this process


@pytest.fixture(scope="module")
def small_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("xml") / "sales.xml"
    with open(path, "wb") as fh:
        sales = data.write_vehicle_sales(fh, 400_000, seed=5)
    return path, sales


@pytest.mark.parametrize("variant", list(memory.LOADERS))
def test_every_loader_counts_every_record(small_file, variant):
    path, sales = small_file
    expected = memory.load_parse(path)
    got = memory.LOADERS[variant](path)
    assert got == expected and got["records"] == sales


def test_the_talks_loop_is_the_slides_loop():
    """The slide's level tracking: fields are level 2, records level 1; changes are marked 1.-3."""
    import inspect

    src = inspect.getsource(memory.load_talk)
    for line in ("events = ('start', 'end')", "level = -1", "if event == 'start':", "level += 1",
                 "if level == 2 and event == 'end' and elem.text:", "item_data[name] = elem.text",
                 "if level == 1 and event == 'end':", "item_data = {}", "level -= 1", "elem.clear()"):
        assert line in src, line
    assert src.count("# 1.") >= 1 and src.count("# 2.") >= 2 and src.count("# 3.") >= 1


def test_the_talks_loop_keeps_one_empty_shell_per_record(small_file, monkeypatch):
    """What makes it grow: when the root ends, every (cleared) record is still its child."""
    path, sales = small_file
    real, seen = ET.iterparse, []

    def spy(*args, **kwargs):
        root = None
        for event, elem in real(*args, **kwargs):
            root = elem if root is None else root
            if event == "end" and elem is root:
                seen.append((len(root), sum(len(child) for child in root)))
            yield event, elem

    monkeypatch.setattr(ET, "iterparse", spy)
    assert memory.load_talk(path)["records"] == sales
    assert seen == [(sales, 0)], "one empty <VehicleSale> per record, nothing inside them"


# ----------------------------------------------------------------------------- sizes and claims


def _run(variant: str, size_mb: float, mib: float, records: int = 100, total: float = 1.0) -> Measurement:
    return Measurement(memory.LABELS[variant], "peak RSS above baseline", "MiB", [mib],
                       meta={"variant": variant, "size_mb": size_mb, "result": {"records": records, "total": total}})


def test_check_sizes_says_what_a_sweep_needs():
    assert memory.check_sizes([20, 5, 10]) == (5, 20)
    for bad in ([5], [10, 12], [2, 4], []):
        with pytest.raises(ValueError, match="SIZES_MB"):
            memory.check_sizes(bad)


def test_growth_floors_tiny_peaks():
    assert memory.growth([_run("lxml", 5, 0.2), _run("lxml", 20, 0.7)]) == 1.0
    assert memory.growth([_run("parse", 5, 47), _run("parse", 20, 187)]) == pytest.approx(187 / 47)


@pytest.mark.parametrize("sizes", [(5, 20), (10, 20), (5, 40), (5, 10), (20, 80)])
def test_size_claims_scale_with_the_sizes(sizes):
    """Linear growth passes the growth claims and fails the flat one; a flat peak the other way round."""
    lo, hi = sizes
    linear = [_run("parse", lo, 9.4 * lo), _run("parse", hi, 9.4 * hi)]
    shells = [_run("talk", lo, 0.27 * lo), _run("talk", hi, 0.27 * hi)]
    flat = [_run("lxml", lo, 0.7), _run("lxml", hi, 0.7)]
    memory.full_parse_grows_with_the_file(linear)
    memory.the_talks_loop_still_grows(shells)
    memory.streaming_stays_flat(flat)
    with pytest.raises(AssertionError):
        memory.full_parse_grows_with_the_file(flat)
    with pytest.raises(AssertionError):
        memory.the_talks_loop_still_grows(flat)
    with pytest.raises(AssertionError):
        memory.streaming_stays_flat(linear)


def test_size_claims_refuse_a_sweep_too_narrow_to_mean_anything():
    with pytest.raises(ValueError, match="largest >= 2x"):
        memory.full_parse_grows_with_the_file([_run("parse", 10, 94), _run("parse", 12, 113)])


def test_loader_claims():
    parse, no_clear, lxml = _run("parse", 20, 187), _run("iterparse", 20, 187), _run("lxml", 20, 0.7)
    memory.streaming_needs_far_less(parse, lxml)
    memory.iterparse_alone_saves_nothing(parse, no_clear)
    with pytest.raises(AssertionError, match="8x"):
        memory.streaming_needs_far_less(parse, no_clear)
    with pytest.raises(AssertionError, match="within 1.3x"):
        memory.iterparse_alone_saves_nothing(parse, lxml)
    memory.same_work([parse, lxml])
    with pytest.raises(AssertionError, match="same records"):
        memory.same_work([parse, _run("lxml", 5, 0.7, records=25)])


def test_speed_claim():
    whole = Measurement("before: r.content", "download speed", "MB/s", [400])
    memory.streaming_costs_no_speed(whole, Measurement("after: iter_content(65536)", "download speed", "MB/s", [380]))
    with pytest.raises(AssertionError, match="0.6x"):
        memory.streaming_costs_no_speed(whole, Measurement("naive: iter_content(1)", "download speed", "MB/s", [0.5]))


def test_inherited_peak_claim():
    meta = {"ballast_mib": 300}
    memory.ru_maxrss_carries_the_parents_peak(Measurement("ru_maxrss", "m", "MiB", [110, 410], meta=meta))
    with pytest.raises(AssertionError, match="rose with its parent"):
        memory.ru_maxrss_carries_the_parents_peak(Measurement("VmHWM", "m", "MiB", [15, 15], meta=meta))
    with pytest.raises(AssertionError):  # no ballast, no claim
        memory.ru_maxrss_carries_the_parents_peak(Measurement("ru_maxrss", "m", "MiB", [110, 110],
                                                              meta={"ballast_mib": 0}))


def test_worker_claims():
    def step(variant, pid, peak):
        return {"variant": variant, "pid": pid, "maxrss_mib": peak, "state": "SUCCESS"}

    def demo(steps, limit=120):
        return Measurement("capped", "pool child peak RSS", "MiB", [s["maxrss_mib"] for s in steps], meta={
            "limit_mib": limit, "steps": steps, "same_child": steps[0]["pid"] == steps[1]["pid"],
            "replaced_after": steps[2]["pid"] != steps[1]["pid"], "big_peak_mib": steps[1]["maxrss_mib"],
            "big_state": steps[1]["state"]})

    memory.a_memory_limit_does_not_stop_a_task(demo([step("lxml", 1, 56), step("parse", 1, 150), step("lxml", 2, 56)]))
    with pytest.raises(AssertionError, match="past the limit"):
        memory.a_memory_limit_does_not_stop_a_task(demo([step("lxml", 1, 56), step("lxml", 1, 57), step("lxml", 1, 57)]))
    whole = Measurement("before: parse", "pool child peak RSS", "MiB", [145], meta={"net_mib": 94})
    memory.a_worker_child_needs_far_less_streaming(whole, Measurement("after: lxml", "x", "MiB", [56],
                                                                      meta={"net_mib": 4.3}))
    with pytest.raises(AssertionError, match="5x"):
        memory.a_worker_child_needs_far_less_streaming(whole, Measurement("before: iterparse", "x", "MiB", [145],
                                                                          meta={"net_mib": 93}))


def test_download_claim():
    def run(label, mib, result):
        return Measurement(label, "peak RSS above baseline", "MiB", [mib], meta={"body_bytes": 150_000_000,
                                                                                   "result": result})

    ok = {"bytes": 150_000_000, "crc32": 1}
    memory.a_streamed_download_needs_far_less(Comparison(run("before", 288, ok), run("after", 0.1, ok)))
    with pytest.raises(AssertionError, match="improvement factor"):
        memory.a_streamed_download_needs_far_less(Comparison(run("before", 288, ok), run("after", 150, ok)))


def test_cluster_config_and_tools_table():
    assert memory.cluster_config() == memory.CLUSTER
    assert memory.CLUSTER["settings"]["worker_max_memory_per_child"] == memory.LIMIT_MIB * 1024
    with pytest.raises(ValueError, match="limit_mib"):
        memory.cluster_config(limit_mib=0)
    fresh = _run("parse", 5, 46.6)
    fresh.meta["tool"] = "fresh process"
    kernel = _run("parse", 5, 45.6)
    kernel.meta["tool"] = "%memit in this kernel"
    text = str(memory.tools_table(fresh, kernel))
    assert "fresh process" in text and "%memit" in text and "46.6" in text and "45.6" in text
    with pytest.raises(ValueError, match="CLUSTER_MB"):
        memory._check_cluster_mb(5)


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
