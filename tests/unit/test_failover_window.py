"""The Sentinel failover window is derived from Sentinel's own timings (no process started)."""

from types import SimpleNamespace

import pytest

from labkit.lessons import single_points
from labkit.services.redis import RedisService
from labkit.services.sentinel import sentinel_group


def _group(tmp_path):
    primary = RedisService(name="redis", run_dir=tmp_path, cluster_id="unit", port=0)
    return sentinel_group(primary, tmp_path, "unit")


def test_the_bound_covers_detection_and_one_retried_election(tmp_path):
    group = _group(tmp_path)
    s = group.sentinels[0]
    assert group.failover_bound_s() >= s.down_after_ms / 1000 + 2 * s.failover_timeout_ms / 1000


def test_a_window_shorter_than_the_bound_is_refused_before_anything_runs(tmp_path):
    group = _group(tmp_path)
    with pytest.raises(ValueError, match="failover bound"):
        single_points.failover(SimpleNamespace(sentinel=group), window_s=group.failover_bound_s() - 0.5)
