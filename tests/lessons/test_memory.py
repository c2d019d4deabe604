"""Lesson 01 (memory): the fresh-process measurement and every claim, each with its negative control.

The claims are asserted on real runs — each loader in a fresh interpreter, a
real HTTP download over loopback, memory_profiler in this process, Celery
tasks in real prefork pool children — and each negative control runs the
same claim on the run with the fix switched off and expects it to fail.
Every experiment runs once per module (module-scoped fixtures).
"""

from __future__ import annotations

import sys

import pytest

from labkit import testing
from labkit.fresh import MIB, peak_rss, run_fresh
from labkit.lessons import memory

pytestmark = pytest.mark.cluster  # every test here starts real processes

SMALL_MB, SIZE_MB = 5, memory.DEFAULT_MB  # the notebook's smallest and default files: a 4x sweep
DOWNLOAD_MB = 60
linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="VmHWM and /proc are Linux's")

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


@linux_only
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


@pytest.fixture(scope="module")
def inherited():
    maxrss, hwm = memory.inherited_peak(ballast_mib=300)
    return {"maxrss": maxrss, "hwm": hwm}


@linux_only
def test_ru_maxrss_carries_the_parents_peak(inherited):
    memory.ru_maxrss_carries_the_parents_peak(inherited["maxrss"])


@linux_only
def test_memory_claim_fails_without_the_fix_vmhwm(inherited):
    """VmHWM — what labkit.fresh reads — is the child's own: it does not move with the parent."""
    with pytest.raises(AssertionError, match="rose with its parent"):
        memory.ru_maxrss_carries_the_parents_peak(inherited["hwm"])


# ----------------------------------------------------------------------------- the loaders


@pytest.fixture(scope="module")
def runs() -> dict:
    at_default = memory.loaders(SIZE_MB)
    sweep = memory.sweep((SMALL_MB, SIZE_MB), ("parse", "talk", "clear", "lxml"), reuse=at_default)
    return {"at": {m.meta["variant"]: m for m in at_default}, "list": at_default, "sweep": sweep}


def test_every_loader_does_the_same_work(runs):
    memory.same_work(runs["list"])
    assert runs["at"]["parse"].meta["records"] > 50_000


def test_memory_claim_fails_without_the_fix_same_work(runs):
    """Runs on different files do not count the same records."""
    with pytest.raises(AssertionError, match="same records"):
        memory.same_work([runs["sweep"]["parse"][0], runs["sweep"]["parse"][-1]])


def test_full_parse_needs_8x_more_than_streaming(runs):
    # pilot at 20 MB: parse 187 MiB above baseline; streaming 0.2-0.7 MiB
    for v in memory.STREAMING:
        memory.streaming_needs_far_less(runs["at"]["parse"], runs["at"][v])
    # even counting the fresh interpreter's whole baseline on both sides
    for v in memory.STREAMING:
        gross_parse, gross_stream = runs["at"]["parse"].meta["peak_mib"][-1], runs["at"][v].meta["peak_mib"][-1]
        assert gross_parse >= 3 * gross_stream, (gross_parse, gross_stream)


def test_memory_claim_fails_without_the_fix_no_clear(runs):
    """iterparse without clearing is the 'streaming' loader with the fix switched off."""
    with pytest.raises(AssertionError, match="8x"):
        memory.streaming_needs_far_less(runs["at"]["parse"], runs["at"]["iterparse"])


def test_iterparse_without_clear_saves_nothing(runs):
    memory.iterparse_alone_saves_nothing(runs["at"]["parse"], runs["at"]["iterparse"])


def test_memory_claim_fails_without_the_fix_cleared(runs):
    """With root.clear() (the pitfall switched off) iterparse saves nearly everything."""
    with pytest.raises(AssertionError, match="within 1.3x"):
        memory.iterparse_alone_saves_nothing(runs["at"]["parse"], runs["at"]["clear"])


def test_streaming_stays_flat_while_parse_and_talk_grow(runs):
    sweep = runs["sweep"]
    memory.full_parse_grows_with_the_file(sweep["parse"])  # pilot 4.0x for a 4x file
    memory.the_talks_loop_still_grows(sweep["talk"])  # pilot 1.35 -> 5.4 MiB
    for v in memory.STREAMING:
        memory.streaming_stays_flat(sweep[v])  # pilot 1.0
    assert sweep["talk"][-1].value * 10 <= sweep["parse"][-1].value


def test_memory_claim_fails_without_the_fix_size_sweep(runs):
    """Each size claim on the series where its effect is switched off."""
    sweep = runs["sweep"]
    with pytest.raises(AssertionError, match="grows"):
        memory.full_parse_grows_with_the_file(sweep["lxml"])
    with pytest.raises(AssertionError, match="grows"):
        memory.the_talks_loop_still_grows(sweep["clear"])
    for v in ("parse", "talk"):
        with pytest.raises(AssertionError, match="within 1.3x"):
            memory.streaming_stays_flat(sweep[v])


def test_streaming_is_not_slower(runs):
    rates = {m.meta["variant"]: m for m in memory.throughput(runs["list"])}
    for v in memory.STREAMING:
        memory.streaming_costs_no_speed(rates["parse"], rates[v])


# ----------------------------------------------------------------------------- memory_profiler in this process


@pytest.fixture(scope="module")
def kernel():
    return {v: memory.in_kernel(v, SMALL_MB) for v in ("parse", "clear", "iterparse")}


def test_memory_profiler_tells_the_same_story(kernel, runs):
    memory.streaming_needs_far_less(kernel["parse"], kernel["clear"])
    assert kernel["parse"].meta["samples"] > 4 and kernel["parse"].timeline
    fresh = runs["sweep"]["parse"][0].value
    assert 0.5 * fresh <= kernel["parse"].value <= 1.5 * fresh, (fresh, kernel["parse"].value)  # same quantity


def test_memory_claim_fails_without_the_fix_in_this_process(kernel):
    with pytest.raises(AssertionError, match="8x"):
        memory.streaming_needs_far_less(kernel["parse"], kernel["iterparse"])


# ----------------------------------------------------------------------------- downloads


@pytest.fixture(scope="module")
def downloads():
    body = int(DOWNLOAD_MB * 10**6)
    return {"streamed": memory.compare_downloads(size_mb=DOWNLOAD_MB),
            "one_chunk": memory.compare_downloads(size_mb=DOWNLOAD_MB, chunk_size=body),
            "speeds": memory.download_speeds()}


def test_streamed_download_needs_5x_less(downloads):
    dl = downloads["streamed"]
    assert dl.before.meta["result"]["bytes"] == DOWNLOAD_MB * 10**6
    memory.a_streamed_download_needs_far_less(dl)  # pilot at 150 MB: 287 MiB vs < 1 MiB


def test_memory_claim_fails_without_the_fix_one_chunk(downloads):
    """iter_content with a chunk as big as the body streams nothing: it holds the body like r.content."""
    with pytest.raises(AssertionError, match="improvement factor"):
        memory.a_streamed_download_needs_far_less(downloads["one_chunk"])


def test_chunked_streaming_costs_no_speed(downloads):
    content, chunked, one_byte = downloads["speeds"]
    memory.streaming_costs_no_speed(content, chunked)
    assert one_byte.meta["chunk_size"] == 1


def test_memory_claim_fails_without_the_fix_one_byte_chunks(downloads):
    """The slide's bare r.iter_content() reads one byte per iteration: streaming, and far slower."""
    content, _, one_byte = downloads["speeds"]
    with pytest.raises(AssertionError, match="0.6x"):
        memory.streaming_costs_no_speed(content, one_byte)


# ----------------------------------------------------------------------------- in the cluster


@pytest.fixture(scope="module")
def cluster():
    with testing.cluster(**memory.CLUSTER) as c:
        yield c


@pytest.fixture(scope="module")
def in_worker(cluster):
    return {"fixed": memory.in_cluster(cluster, size_mb=10),
            "no_clear": memory.in_cluster(cluster, size_mb=10, variants=("parse", "iterparse"))}


def test_in_a_worker_streaming_needs_far_less(in_worker):
    parse, lxml = in_worker["fixed"]
    assert parse.meta["pid"] != lxml.meta["pid"]
    assert parse.meta["records"] == lxml.meta["records"]
    memory.a_worker_child_needs_far_less_streaming(parse, lxml)  # pilot: 94 vs 4 MiB


def test_memory_claim_fails_without_the_fix_in_a_worker(in_worker):
    with pytest.raises(AssertionError, match="5x"):
        memory.a_worker_child_needs_far_less_streaming(*in_worker["no_clear"])


@pytest.fixture(scope="module")
def capped(cluster):
    return {"parse": memory.runaway(cluster, size_mb=10), "lxml": memory.runaway(cluster, size_mb=10, variant="lxml")}


def test_a_memory_limit_does_not_stop_a_task(capped):
    demo = capped["parse"]
    memory.a_memory_limit_does_not_stop_a_task(demo)  # pilot 150 vs 120 MiB
    assert demo.meta["steps"][0]["maxrss_mib"] < demo.meta["limit_mib"], demo.meta


def test_memory_claim_fails_without_the_fix_no_runaway(capped):
    """With a streaming import in the middle (no runaway), the child stays under the limit and is kept."""
    with pytest.raises(AssertionError, match="past the limit"):
        memory.a_memory_limit_does_not_stop_a_task(capped["lxml"])
