"""Launching for real: a multi-node topology on one machine, and `ray job submit` to a local head node."""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
REPO = Path(__file__).parents[2]
RAY = str(Path(sys.executable).parent / "ray")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


MULTI_NODE = textwrap.dedent("""
    import json, sys
    import ray
    from ray.cluster_utils import Cluster
    from cai_ray.config import load_config
    from cai_ray.pipelines.rl_cai import rl_cai
    from cai_ray.pipelines.roles import start_roles
    from cai_ray.pipelines.run import run_dir_for

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "object_store_memory": 256 << 20})
    for _ in range(3):
        cluster.add_node(num_cpus=2, object_store_memory=256 << 20)
    cluster.wait_for_nodes()
    cfg = load_config(sys.argv[1], [f"cluster.address={cluster.address}", "cluster.placement_strategy=STRICT_SPREAD",
                                    "learner.num_ranks=2", "learner.zero_stage=3", "schedule.num_iterations=1",
                                    f"logging.output_dir={sys.argv[2]}", "logging.wandb_mode=disabled"])
    ray.init(address=cluster.address)
    node = lambda a: ray.get(a.__ray_call__.remote(lambda self: ray.get_runtime_context().get_node_id()))
    roles = start_roles(cfg)
    try:
        placement = {"learner": [node(a) for a in roles.learner.actors], "rollout": [node(a) for a in roles.rollout],
                     "feedback": [node(a) for a in roles.feedback.workers]}
    finally:
        roles.shutdown()
    history = rl_cai(cfg, run_dir_for(cfg))
    print("RESULT " + json.dumps({"placement": placement, "nodes": len(ray.nodes()),
                                  "weight_version": history[-1]["weight_version"]}))
    ray.shutdown()
    cluster.shutdown()
""")


def test_loop_on_a_multi_node_topology(tmp_path: Path) -> None:
    import json

    script = tmp_path / "multi_node.py"
    script.write_text(MULTI_NODE)
    proc = subprocess.run([sys.executable, str(script), str(REPO / "configs" / "quickstart-cpu.yaml"),
                           str(tmp_path / "runs")], capture_output=True, text=True, timeout=600, cwd=REPO)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(lines[-1].removeprefix("RESULT "))
    learner = result["placement"]["learner"]
    assert len(set(learner)) == 2  # the two ZeRO-3 ranks run on different raylets (nodes)
    assert result["nodes"] == 4 and result["weight_version"] == 1.0


@pytest.mark.timeout(600)
def test_ray_job_submit_to_a_local_head(tmp_path: Path) -> None:
    gcs, dash, agent = _free_port(), _free_port(), _free_port()
    # As the shipped cluster files do: token authentication on, token from the environment (a secret).
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env |= {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    head = subprocess.Popen(
        [RAY, "start", "--head", "--block", f"--port={gcs}", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
         # The job agent's default port (52365) is taken when another Ray runs on this host (the test session's).
         f"--dashboard-agent-listen-port={agent}",
         "--include-dashboard=true", "--num-cpus=8", f"--object-store-memory={512 << 20}",
         f"--temp-dir={tempfile.mkdtemp(prefix='cr-', dir='/tmp')}",  # short: Ray's unix sockets live here
         "--disable-usage-stats"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        address = f"http://127.0.0.1:{dash}"
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(f"{address}/api/version", timeout=5)
                break
            except urllib.error.HTTPError:
                break  # it answers (401 when the Jobs API wants a token): up
            except OSError:
                assert head.poll() is None and time.monotonic() < deadline, "ray head did not come up"
                time.sleep(1)
        entrypoint = (f"{sys.executable} -m cai_ray rl --config configs/quickstart-cpu.yaml "
                      "--set schedule.num_iterations=1 --set logging.wandb_mode=disabled "
                      f"--set logging.output_dir={tmp_path}/runs/{{name}}")
        for _ in range(30):  # the head's job agent comes up a little after the dashboard
            job = subprocess.run([RAY, "job", "submit", "--address", address, "--working-dir", str(REPO), "--",
                                  *entrypoint.split()], env=env, capture_output=True, text=True, timeout=540)
            out = job.stdout + job.stderr
            if "No available agent" not in out:
                break
            time.sleep(2)
        assert job.returncode == 0, out[-4000:]
        assert "RL-CAI: 1 iterations" in out  # the driver's logs stream back to the submitter
        assert "succeeded" in out.lower()
        assert (tmp_path / "runs" / "quickstart-cpu" / "metrics.jsonl").is_file()
        # Without the token the Jobs API refuses the same request.
        anonymous = {k: v for k, v in env.items() if not k.startswith("RAY_AUTH")}
        denied = subprocess.run([RAY, "job", "list", "--address", address], env=anonymous, capture_output=True,
                                text=True, timeout=120)
        assert denied.returncode != 0 and "auth" in (denied.stdout + denied.stderr).lower()
    finally:
        head.send_signal(signal.SIGTERM)  # `ray start --block` stops the processes it started
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pass
        with contextlib.suppress(ProcessLookupError):
            os.killpg(head.pid, signal.SIGKILL)
