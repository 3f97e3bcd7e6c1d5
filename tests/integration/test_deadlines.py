"""Every wait on a remote call names the config key of the deadline it missed (real Ray, sleeping tasks)."""

from __future__ import annotations

import time

import pytest

from cai_ray.config import ClusterConfig
from cai_ray.launcher import RemoteCallError, get, get_all, wait_restarted

pytestmark = pytest.mark.slow

CLUSTER = ClusterConfig(startup_timeout_s=1, step_timeout_s=2, control_timeout_s=1)


def _sleepy() -> object:
    import ray

    @ray.remote(num_cpus=0)
    def sleep(seconds: float) -> float:
        time.sleep(seconds)
        return seconds

    return sleep


def test_timeouts_name_their_config_key(ray_local: None) -> None:
    import ray

    sleep = _sleepy()
    with pytest.raises(RemoteCallError, match=r"^rollout worker 0: generate: no answer within 2s "
                                              r"\(cluster\.step_timeout_s\)$"):
        get(sleep.remote(30), timeout=CLUSTER.step, what="rollout worker 0: generate")
    done = sleep.remote(0)
    ray.get(done, timeout=120)
    with pytest.raises(RemoteCallError, match=r"a: no answer within 1s \(cluster\.control_timeout_s\)") as err:
        get_all([sleep.remote(30), done], timeout=CLUSTER.control, names=["a", "b"])
    assert err.value.failed == ["a"]

    @ray.remote(num_cpus=0, max_restarts=1)
    class Slow:
        def __init__(self) -> None:
            time.sleep(30)

    with pytest.raises(RemoteCallError, match=r"learner rank 0: not restarted within 1s "
                                              r"\(cluster\.startup_timeout_s\)"):
        wait_restarted(Slow.remote(), timeout=CLUSTER.startup, what="learner rank 0")


def test_a_remote_error_keeps_its_own_message(ray_local: None) -> None:
    import ray

    @ray.remote(num_cpus=0)
    def bad() -> None:
        raise ValueError("data/x.jsonl line 3: no 'prompt' field")

    with pytest.raises(RemoteCallError, match=r"^learner rank 0: setup: failed: ValueError: data/x\.jsonl line 3: "
                                              r"no 'prompt' field"):
        get_all([bad.remote()], timeout=ClusterConfig(step_timeout_s=120).step, names=["learner rank 0: setup"])
