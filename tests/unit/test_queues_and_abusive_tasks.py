"""Lessons 03 and 09 without a cluster: the analysis of task records, routing, the claims' arithmetic.

Records here are written by hand, so each figure has a value worked out in
the test; the cluster tests (``tests/lessons/``) feed the same functions real
records.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from labkit.lessons import _records as rec
from labkit.lessons import abusive_tasks as abusive
from labkit.lessons import queues
from labkit.measure import Comparison, Measurement
from labkit.services.worker import WorkerService, WorkerSpec


def task(tag, worker, sent, start, end, received=None, pid=1):
    return {"tag": tag, "worker": worker, "pid": pid, "sent": sent, "start": start, "end": end,
            "received": received, "received_by": worker if received is not None else None}


# ----------------------------------------------------------------------------- stranded / hoarded capacity
def test_one_busy_queue_strands_nothing():
    # one worker, one process, two tasks back to back: the second waits but nobody is idle
    records = [task("L0", "w", 0, 0, 1), task("s0", "w", 0, 1, 1.1)]
    assert rec.stranded_capacity(records, {"w": 1}) == 0


def test_a_quiet_queues_worker_strands_capacity_while_another_queue_waits():
    # "long" has one process and two tasks; "short" is idle the whole time: the second long task
    # waited 1 s while one process (short's) could have run it
    records = [task("L0", "long", 0, 0, 1), task("L1", "long", 0, 1, 2)]
    assert rec.stranded_capacity(records, {"long": 1, "short": 1}) == pytest.approx(1.0)


def test_stranded_capacity_counts_no_more_processes_than_waiting_tasks():
    # one task waits 1 s while three processes idle elsewhere: 1 slot-second, not 3
    records = [task("L0", "a", 0, 0, 1), task("L1", "a", 0, 1, 2)]
    assert rec.stranded_capacity(records, {"a": 1, "b": 3}) == pytest.approx(1.0)


def test_hoarding_is_idle_capacity_while_another_worker_holds_received_tasks():
    # p1 received L1 at once but could only start it at 1 s; p2 was idle: 1 slot-second hoarded
    records = [task("L0", "p1", 0, 0, 1, received=0), task("L1", "p1", 0, 1, 2, received=0),
               task("s0", "p2", 0, 0, 0.1, received=0)]
    assert rec.hoarded_capacity(records, {"p1": 1, "p2": 1}) == pytest.approx(0.9)
    # a task waiting in Redis (received late, when a process was free) is not hoarding
    fair = [task("L0", "p1", 0, 0, 1, received=0), task("L1", "p2", 0, 0.1, 1.1, received=0.1),
            task("s0", "p2", 0, 0, 0.1, received=0)]
    assert rec.hoarded_capacity(fair, {"p1": 1, "p2": 1}) == pytest.approx(0.0)


def test_summary_reports_short_latencies_and_busy_fractions():
    records = [task("L0", "w", 10, 10, 12), task("s0", "w", 10, 12, 12.5), task("s1", "w", 11, 12.5, 13)]
    s = rec.summary(records, 10, {"w": 1})
    assert s["makespan"] == 3 and s["long_makespan"] == 2
    assert sorted(s["short_wait"]) == [1.5, 2.0] and sorted(s["short_done"]) == [2.0, 2.5]
    assert s["busy_fraction"] == {"w": 1.0}
    assert [r["tag"] for r in s["records"]] == ["L0", "s0", "s1"] and s["records"][0]["start"] == 0


def test_kind_reads_the_tag():
    assert [rec.kind(t) for t in ("L0", "H1", "s3", "b2")] == ["long", "long", "short", "short"]


# ----------------------------------------------------------------------------- routing and worker options
def test_routes_send_each_class_to_its_queue():
    assert queues.route("queues.long") == "long" and queues.route("queues.short") == "short"
    assert queues.route("queues.work") == "celery"


def test_optimization_becomes_dash_o_and_is_checked(tmp_path: Path):
    service = WorkerService(name="w1", run_dir=tmp_path, cluster_id="lkt", redis_url="redis://127.0.0.1:1/0",
                            spec=WorkerSpec(name="w1", optimization="fair"))
    cmd = service.command()
    assert cmd[cmd.index("-O") + 1] == "fair"
    with pytest.raises(ValueError, match="optimization"):
        WorkerSpec(name="w1", optimization="fast")


def test_the_lesson_clusters_ask_for_what_the_lessons_use():
    workers = {w["name"]: w for w in queues.CLUSTER["workers"]}
    assert workers["auto"]["autoscale"] == (1, 4) and workers["fair"]["optimization"] == "fair"
    assert workers["d1"]["disable_prefetch"] and workers["a1"]["prefetch_multiplier"] == 1
    assert queues.work_late.acks_late and not queues.work.acks_late
    memory = {w["name"]: w for w in abusive.CLUSTER["workers"]}
    assert memory["hogs"]["env"][abusive.CAP_ENV] == str(abusive.CAP_MIB)
    assert memory["shared"]["max_memory_per_child"] == abusive.LIMIT_MIB * 1024
    assert abusive.CAP_MIB < abusive.MAX_HOG_MIB <= 1024  # no hog can ask for more than a GiB


def test_a_hog_too_big_is_refused_before_anything_runs():
    with pytest.raises(ValueError, match="at most"):
        abusive.neighbours(None, hog_mib=abusive.MAX_HOG_MIB + 1)
    with pytest.raises(ValueError, match="at most"):
        abusive.hog.run("r", "H", abusive.MAX_HOG_MIB + 1, 0.1, 0.0)


# ----------------------------------------------------------------------------- claims' arithmetic
def run(label, values, **meta):
    return Measurement(label, "short-task latency (submit to done)", "s", values, stat="p95", meta=meta)


def test_prefetch_claim_derives_its_bar_from_the_batch():
    # 6 pairs: 3 rounds of long tasks on one worker vs 2 on both: demand 1 + (1.5 - 1) / 4 = 1.125x
    before = Measurement("b", "makespan", "s", [3.1], stat="max", meta={"pairs": 6})
    queues.prefetch_fix_shortens_makespan(Comparison(before, Measurement("a", "makespan", "s", [2.7], stat="max")))
    with pytest.raises(AssertionError, match="1.12x"):
        queues.prefetch_fix_shortens_makespan(Comparison(before, Measurement("a", "makespan", "s", [2.9])))


def test_fair_claim_tolerates_noise_but_not_a_change():
    base = run("default", [2.0], long_s=1.0, strategy="fair")
    queues.fair_is_the_default(base, run("fair", [2.3], long_s=1.0, strategy="fair"))
    with pytest.raises(AssertionError, match="within noise"):
        queues.fair_is_the_default(base, run("fair", [0.1], long_s=1.0, strategy="fair"))
    with pytest.raises(AssertionError, match="same prefork strategy"):
        queues.fair_is_the_default(base, run("fast", [2.0], long_s=1.0, strategy="fcfs"))


def test_streaming_claim_needs_the_whole_output_before():
    def peak(label, mib):
        return Measurement(label, "peak RSS above baseline", "MiB", [mib], meta={"mb": 40})

    abusive.streaming_output_stays_flat(Comparison(peak("before", 40), peak("after", 0.5)))
    with pytest.raises(AssertionError, match="whole output"):
        abusive.streaming_output_stays_flat(Comparison(peak("before", 5), peak("after", 0.5)))


def test_hanging_claim_reads_survivor_counts():
    def hung(label, n, exc="SoftTimeLimitExceeded"):
        return Measurement(label, "programs", "processes", [n], stat="sum",
                           meta={"exception": exc, "state": "FAILURE", "survivors": ["sleep"] * n})

    abusive.soft_limit_ends_the_program_only_with_the_fix(hung("popen", 2), hung("fixed", 0))
    with pytest.raises(AssertionError, match="soft limit ended the task"):
        abusive.soft_limit_ends_the_program_only_with_the_fix(hung("popen", 2), hung("fixed", 0, exc=""))


def test_a_hand_off_to_the_workers_own_free_process_is_not_waste():
    # w's process frees at 1.0 and takes the task it already holds at 1.05: nobody else could have run it
    records = [task("L0", "w", 0, 0, 1, received=0), task("s0", "w", 0, 1.05, 1.1, received=0)]
    assert rec.stranded_capacity(records, {"w": 1}) == 0
    assert rec.hoarded_capacity(records, {"w": 1}) == 0
    # the same task in Redis (never received) while w idles is stranded capacity
    records[1]["received"] = None
    assert rec.stranded_capacity(records, {"w": 1}) == pytest.approx(0.05)


def test_a_hand_off_with_a_backlog_in_redis_is_not_waste_either():
    # w (1 process) holds s0 while L0 runs; s1 waits in Redis. When L0 ends, the process takes s0
    # 50 ms later: during that gap it is idle, s1 waits, but the process is already spoken for
    records = [task("L0", "w", 0, 0, 1, received=0), task("s0", "w", 0, 1.05, 1.1, received=0),
               task("s1", "w", 0, 1.1, 1.2, received=1.1)]
    assert rec.stranded_capacity(records, {"w": 1}) == 0
