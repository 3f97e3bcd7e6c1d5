"""One experiment: SL-CAI and/or RL-CAI in a run folder, on a local Ray or the cluster in RAY_ADDRESS."""

from __future__ import annotations

import json
import time
from pathlib import Path

from cai_ray.config import ExperimentConfig, dump_config
from cai_ray.launcher import init_ray
from cai_ray.models import resolve_model
from cai_ray.run_logs import run_logging

LOGS_DIR = "logs"  # engine and framework logs of a quiet run, inside the run folder
SL_DONE = "sl_policy.json"  # marks a finished SL stage so --resume skips it


def run_dir_for(cfg: ExperimentConfig) -> Path:
    """The run folder (``logging.output_dir`` with ``{name}`` filled in)."""
    return Path(cfg.logging.output_dir.format(name=cfg.name))


def run_experiment(cfg: ExperimentConfig, *, sl: bool, rl: bool, resume: bool = False) -> Path:
    """Run the stages; returns the run folder. RL after SL starts from (and is anchored to) the SL policy.

    Engine and framework logs go to ``<run folder>/logs`` unless ``logging.verbose`` (:mod:`cai_ray.run_logs`).
    """
    run_dir = run_dir_for(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(dump_config(cfg))
    resolve_model(cfg.models.policy.name, revision=cfg.models.policy.revision)  # fail fast on a bad reference
    with run_logging(run_dir / LOGS_DIR, verbose=cfg.logging.verbose):
        init_ray(cfg.cluster)
        _run_stages(cfg, run_dir, sl=sl, rl=rl, resume=resume)
    print(f"run folder: {run_dir}", flush=True)
    return run_dir


def _run_stages(cfg: ExperimentConfig, run_dir: Path, *, sl: bool, rl: bool, resume: bool) -> None:
    from cai_ray.pipelines.checkpoint import has_checkpoint
    from cai_ray.pipelines.rl_cai import rl_cai
    from cai_ray.pipelines.sl_cai import sl_cai

    if sl:
        marker = run_dir / SL_DONE
        if resume and marker.is_file():
            policy = json.loads(marker.read_text())["policy"]
        else:
            start = time.perf_counter()
            policy = sl_cai(cfg, run_dir)
            marker.write_text(json.dumps({"policy": policy, "seconds": time.perf_counter() - start}))
        print(f"SL-CAI policy: {policy}", flush=True)
        cfg = cfg.model_copy(deep=True)
        cfg.models.policy.name = policy
    if rl:
        # After SL in the same command, RL resumes only if it had checkpointed; otherwise it starts now.
        # `rl --resume` without a checkpoint is an error (rl_cai says so), never a silent restart.
        rl_resume = resume and (not sl or has_checkpoint(run_dir))
        history = rl_cai(cfg, run_dir, resume=rl_resume)
        if history:
            last = history[-1]
            shown = (("reward/mean", "reward"), ("pm_fresh/accuracy", "PM accuracy on fresh labels"),
                     ("loss/dpo", "DPO loss"))  # no PM with dpo unless schedule.preference_model=monitor
            print(f"RL-CAI: {len(history)} iterations; last: "
                  + ", ".join(f"{name} {last[key]:.3f}" for key, name in shown if key in last), flush=True)
