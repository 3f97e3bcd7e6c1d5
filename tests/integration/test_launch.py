"""Launching for real: a heterogeneous multi-node topology, an autoscaling cluster, and `ray job submit`.

Every cluster here is private to its test: free ports, its own temp dirs, stopped by process group and by
the ids of the processes whose command line names its temp dir (never `ray stop`, which ends every Ray
on the host).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
REPO = Path(__file__).parents[2]
RAY = str(Path(sys.executable).parent / "ray")
QUICKSTART = REPO / "configs" / "quickstart-cpu.yaml"
# "<role> worker 0: node 192.0.2.2 [9d5c224d] pid 123, cpu/gloo, GPU ids none, cai_ray from /path/cai_ray"
STARTED = re.compile(r"^(?P<name>[\w ]+ \d+): node \S+ \[(?P<node>\w+)\] pid \d+, (?P<device>\w+)/(?P<dist>\w+), (?:\d+ threads, )?"
                     r"GPU ids .*, cai_ray from (?P<source>\S+)$", re.M)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _private_env() -> dict[str, str]:
    """This process's env without Ray's own variables, with token auth on (as the shipped clusters run)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    return env | {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}


def _result(proc: subprocess.CompletedProcess[str]) -> dict:
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-4000:] + proc.stderr[-4000:]
    return json.loads(lines[-1].removeprefix("RESULT "))


@contextlib.contextmanager
def _raylets(temp_dirs: list[str]) -> Iterator[list[subprocess.Popen]]:
    """Collects `ray start --block` processes; on exit stops them, any process of theirs left behind, their dirs."""
    procs: list[subprocess.Popen] = []
    try:
        yield procs
    finally:
        for proc in reversed(procs):
            proc.send_signal(signal.SIGTERM)  # `ray start --block` stops the processes it started
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=60)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        _kill_processes_naming(temp_dirs)
        for temp in temp_dirs:
            shutil.rmtree(temp, ignore_errors=True)


def _kill_processes_naming(markers: list[str]) -> None:
    """SIGKILL, by pid, every process whose command line names one of ``markers`` (this test's temp dirs)."""
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        with contextlib.suppress(OSError):
            text = cmdline.read_bytes().decode(errors="replace")
            if any(m in text for m in markers):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(int(cmdline.parent.name), signal.SIGKILL)


def _start_raylet(procs: list[subprocess.Popen], args: list[str], env: dict[str, str]) -> None:
    procs.append(subprocess.Popen([RAY, "start", "--block", "--disable-usage-stats", *args], env=env,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True))


def _temp_dir() -> str:
    return tempfile.mkdtemp(prefix="cr-", dir="/tmp")  # short: Ray's unix sockets live here


# ------------------------------------------------------------------------- heterogeneous topology
HETEROGENEOUS = textwrap.dedent("""
    import json, os, sys
    import ray
    from ray.cluster_utils import Cluster
    from ray.util.placement_group import remove_placement_group
    from cai_ray import launcher
    from cai_ray.backend import decide, mismatches, observe
    from cai_ray.config import Deadline, ResourcesConfig, load_config
    from cai_ray.inference.rollout import start_rollout_workers
    from cai_ray.pipelines.rl_cai import rl_cai
    from cai_ray.pipelines.run import run_dir_for

    class Probe:
        # Decides like a role from its resources, and reports instead of raising on a mismatch.
        def __init__(self, resources):
            self.decision = decide("rollout", resources)

        def report(self):
            got = observe()
            return {"decision": [self.decision.device, self.decision.dist_backend],
                    "ds_accelerator": os.environ.get("DS_ACCELERATOR"), "cuda_visible": got.cuda_visible_devices,
                    "ray_gpu_ids": list(got.ray_gpu_ids), "problems": mismatches(self.decision, got, uses_vllm=True)}

    # The driver's node has no GPU and no CPU for roles; one raylet declares a GPU it does not have.
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "object_store_memory": 256 << 20})
    cluster.add_node(num_cpus=1, num_gpus=1, object_store_memory=256 << 20)
    for _ in range(2):
        cluster.add_node(num_cpus=2, object_store_memory=256 << 20)
    cluster.wait_for_nodes()
    cfg = load_config(sys.argv[1], [f"cluster.address={cluster.address}", "cluster.placement_strategy=STRICT_SPREAD",
                                    "learner.num_ranks=2", "learner.deepspeed.zero_stage=3", "schedule.num_iterations=1",
                                    "cluster.placement_timeout_s=120", f"logging.output_dir={sys.argv[2]}",
                                    "logging.wandb_mode=disabled"])
    ray.init(address=cluster.address)
    gpu = ResourcesConfig(num_cpus=1, num_gpus=1)
    pg = launcher.reserve([launcher.bundle(gpu)], strategy="PACK", timeout=Deadline(120, "test placement"), name="probe")
    probe = launcher.spawn(Probe, gpu, role="rollout", resources=gpu, pg=pg, bundle_index=0)
    launcher.wait_started([probe], names=["probe 0"], decision=decide("rollout", gpu), timeout=Deadline(300, "test start-up"))
    report = ray.get(probe.report.remote(), timeout=120)
    ray.kill(probe)
    remove_placement_group(pg)
    try:  # a real GPU role on that raylet must refuse to run rather than fall back to the CPU
        start_rollout_workers(cfg.models.policy, cfg.rollout.model_copy(update={"resources": gpu}), cfg.data,
                              cfg.cluster, seed=cfg.seed).shutdown()
        refused = None
    except Exception as err:
        refused = str(err)
    history = rl_cai(cfg, run_dir_for(cfg))
    print("RESULT " + json.dumps({"probe": report, "refused": refused, "nodes": len(ray.nodes()),
                                  "job_runtime_env": ray.get_runtime_context().runtime_env,
                                  "weight_version": history[-1]["weight_version"]}))
    ray.shutdown()
    cluster.shutdown()
""")


@pytest.mark.timeout(900)
def test_roles_decide_from_their_own_resources_on_a_heterogeneous_multi_node_topology(tmp_path: Path) -> None:
    script = tmp_path / "heterogeneous.py"
    script.write_text(HETEROGENEOUS)
    # As on a CPU head: the driver's environment says CPU; a GPU role must not inherit that.
    env = os.environ | {"DS_ACCELERATOR": "cpu"}
    proc = subprocess.run([sys.executable, str(script), str(QUICKSTART), str(tmp_path / "runs")], env=env,
                          capture_output=True, text=True, timeout=840, cwd=REPO)
    result = _result(proc)
    probe = result["probe"]
    assert probe["decision"] == ["cuda", "nccl"] and probe["ds_accelerator"] == "cuda"
    assert probe["ray_gpu_ids"] == ["0"] and probe["cuda_visible"] == "0"  # Ray assigned the declared GPU ...
    assert any("sees no CUDA device" in p for p in probe["problems"])  # ... and the check sees it is not real
    assert result["refused"] and "rollout: decided cuda" in result["refused"]
    assert "sees no CUDA device" in result["refused"]
    assert "DS_ACCELERATOR" not in json.dumps(result["job_runtime_env"])  # nothing device-specific job-wide
    started = {m["name"]: m for m in STARTED.finditer(proc.stdout)}
    learner = [started[f"learner rank {i}"] for i in range(2)]
    assert learner[0]["node"] != learner[1]["node"]  # the two ZeRO-3 ranks run on different raylets (nodes)
    assert all((m["device"], m["dist"]) == ("cpu", "gloo") for name, m in started.items() if "probe" not in name)
    assert result["nodes"] == 4 and result["weight_version"] == 1.0


# ------------------------------------------------------------------------------------- autoscaling
AUTOSCALED_RUN = textwrap.dedent("""
    import json, sys, threading, time
    import ray
    from cai_ray.config import load_config
    from cai_ray.pipelines.rl_cai import rl_cai
    from cai_ray.pipelines.run import run_dir_for

    address, config, out = sys.argv[1:4]
    ray.init(address=address)
    alive = lambda: sum(n["Alive"] for n in ray.nodes())
    seen = {"before": alive(), "max": 0}

    def watch():
        while True:
            seen["max"] = max(seen["max"], alive())
            time.sleep(1)

    threading.Thread(target=watch, daemon=True).start()
    cfg = load_config(config, [f"cluster.address={address}", "schedule.num_iterations=1",
                               "schedule.num_prompts_per_iteration=2", f"logging.output_dir={out}",
                               "logging.wandb_mode=disabled", "cluster.placement_timeout_s=300"])
    history = rl_cai(cfg, run_dir_for(cfg))
    print("RESULT " + json.dumps({**seen, "iterations": len(history)}))
""")


def _fake_autoscaling_config(gcs_address: str) -> dict:
    """A head with no CPU for roles and one worker type that starts at zero, for Ray's fake node provider."""
    from ray.cluster_utils import AutoscalingCluster

    class PrivateAutoscalingCluster(AutoscalingCluster):
        # The wheel lacks the provider's example.yaml, which the parent reads: supply the base config here.
        def _generate_config(self, head_resources: dict, worker_node_types: dict, **_: object) -> dict:
            return {"cluster_name": "cai-ray-test", "max_workers": 2, "head_node_type": "ray.head.default",
                    "provider": {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                                 "disable_launch_config_check": True, "gcs_address": gcs_address},
                    "available_node_types": worker_node_types | {"ray.head.default": {
                        "resources": head_resources, "node_config": {}, "max_workers": 0}},
                    "auth": {}, "upscaling_speed": 1.0, "idle_timeout_minutes": 5, "docker": {}, "file_mounts": {},
                    "cluster_synced_files": [], "file_mounts_sync_continuously": False, "rsync_exclude": [],
                    "rsync_filter": [], **{k: [] for k in ("initialization_commands", "setup_commands",
                                                           "head_setup_commands", "worker_setup_commands",
                                                           "head_start_ray_commands", "worker_start_ray_commands")}}

    worker = {"resources": {"CPU": 2, "object_store_memory": 256 << 20}, "node_config": {},
              "min_workers": 0, "max_workers": 2}
    return PrivateAutoscalingCluster({"CPU": 0}, {"cpu2": worker})._config


@pytest.mark.timeout(900)
def test_a_run_scales_an_autoscaling_cluster_up_from_zero_workers(tmp_path: Path) -> None:
    import ray

    # AutoscalingCluster.start() would run `ray stop --force` (every Ray on the host) and bind fixed ports:
    # start its head the same way by hand, on free ports, with its own temp dir.
    temp, port = _temp_dir(), _free_port()
    address = f"{ray.util.get_node_ip_address()}:{port}"
    config = tmp_path / "autoscaler.json"
    config.write_text(json.dumps(_fake_autoscaling_config(address)))
    env = _private_env() | {"RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1"}
    with _raylets([temp]) as procs:
        _start_raylet(procs, ["--head", f"--port={port}", f"--autoscaling-config={config}", "--num-cpus=0",
                              "--include-dashboard=false", f"--ray-client-server-port={_free_port()}",
                              f"--dashboard-agent-listen-port={_free_port()}", f"--object-store-memory={256 << 20}",
                              f"--temp-dir={temp}"], env)
        script = tmp_path / "autoscaled.py"
        script.write_text(AUTOSCALED_RUN)
        proc = subprocess.run([sys.executable, str(script), address, str(QUICKSTART), str(tmp_path / "runs")],
                              env=env, capture_output=True, text=True, timeout=840, cwd=REPO)
    result = _result(proc)
    # The head offers no CPU: every role's pending placement group had to bring up worker nodes (3 CPUs: 2 nodes).
    assert result["before"] == 1 and result["max"] >= 3 and result["iterations"] == 1
    rows = [json.loads(line) for line in (tmp_path / "runs" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 1 and rows[0]["weight_version"] == 1


# ------------------------------------------------------------------------------------ job submission
def _wait_for_jobs_api(address: str, head: subprocess.Popen) -> None:
    deadline = time.monotonic() + 180
    while True:
        try:
            urllib.request.urlopen(f"{address}/api/version", timeout=5)
            return
        except urllib.error.HTTPError:
            return  # it answers (401 when the Jobs API wants a token): up
        except OSError:
            assert head.poll() is None and time.monotonic() < deadline, "ray head did not come up"
            time.sleep(1)


def _submit(address: str, entrypoint: list[str], env: dict[str, str]) -> str:
    for _ in range(30):  # the head's job agent comes up a little after the dashboard
        job = subprocess.run([RAY, "job", "submit", "--address", address, "--working-dir", str(REPO), "--",
                              *entrypoint], env=env, capture_output=True, text=True, timeout=840)
        out = job.stdout + job.stderr
        if "No available agent" not in out:
            assert job.returncode == 0, out[-6000:]
            return out
        time.sleep(2)
    raise AssertionError("the job agent never became available")


@pytest.mark.timeout(900)
def test_ray_job_submit_runs_the_submitted_code_on_every_node(tmp_path: Path) -> None:
    # Two raylets on one host, each with its own temp dir: with the head's shared one, the second raylet
    # re-extracts the job's working_dir and deletes the folder the driver runs from (README: Launching).
    head_tmp, worker_tmp = _temp_dir(), _temp_dir()
    gcs, dash = _free_port(), _free_port()
    env = _private_env()
    address = f"http://127.0.0.1:{dash}"
    with _raylets([head_tmp, worker_tmp]) as procs:
        _start_raylet(procs, ["--head", f"--port={gcs}", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
                              # The default agent/client ports are taken when another Ray runs on this host.
                              f"--dashboard-agent-listen-port={_free_port()}", f"--ray-client-server-port={_free_port()}",
                              "--include-dashboard=true", "--num-cpus=2", f"--object-store-memory={384 << 20}",
                              f"--temp-dir={head_tmp}"], env)
        _wait_for_jobs_api(address, procs[0])
        _start_raylet(procs, [f"--address=127.0.0.1:{gcs}", "--num-cpus=2", f"--object-store-memory={384 << 20}",
                              f"--dashboard-agent-listen-port={_free_port()}", f"--temp-dir={worker_tmp}"], env)
        # SL + RL, small: RL's three one-CPU roles cannot fit on one two-CPU node. SL's helpfulness stage is the
        # same Ray Data path as its revisions (tested in test_sl_pipeline): one batch stage is enough here.
        out = _submit(address, [sys.executable, "-m", "cai_ray", "run", "--config", "configs/quickstart-cpu.yaml",
                                "--set", "sl.num_red_team_prompts=2", "--set", "sl.helpful_mix_ratio=0",
                                "--set", "schedule.num_iterations=1",
                                "--set", "schedule.num_prompts_per_iteration=2", "--set", "logging.wandb_mode=disabled",
                                "--set", f"logging.output_dir={tmp_path}/runs/{{name}}",
                                "--verbose"], env)  # the start-up lines on the console too, not only in RUN/logs
        # Without the token the Jobs API refuses the same cluster.
        anonymous = {k: v for k, v in env.items() if not k.startswith("RAY_AUTH")}
        denied = subprocess.run([RAY, "job", "list", "--address", address], env=anonymous, capture_output=True,
                                text=True, timeout=120)
    assert "succeeded" in out.lower() and "RL-CAI: 1 iterations" in out  # the driver's logs stream back
    assert (tmp_path / "runs" / "quickstart-cpu" / "sl_policy.json").is_file()
    assert (tmp_path / "runs" / "quickstart-cpu" / "metrics.jsonl").is_file()
    started = list(STARTED.finditer(out))
    assert {m["name"] for m in started} >= {"feedback worker 0", "rollout worker 0", "learner rank 0"}
    logged = (tmp_path / "runs" / "quickstart-cpu" / "logs" / "actors.log").read_text()
    assert [m.group(0) for m in STARTED.finditer(logged)] == [m.group(0) for m in started]
    assert len({m["node"] for m in started}) == 2  # role actors ran on both nodes ...
    # ... each from the job's unpacked working dir in its own node's temp dir, not from an installed copy.
    assert all("_ray_pkg_" in m["source"] for m in started)
    homes = {t for m in started for t in (head_tmp, worker_tmp) if m["source"].startswith(t)}
    assert len(homes) == 2 and all(any(m["source"].startswith(t) for t in homes) for m in started)
    assert denied.returncode != 0 and "auth" in (denied.stdout + denied.stderr).lower()
