"""``cai-ray demo``: the embedded default, end to end.

It validates the shipped constitutions, then runs SL-CAI and two iterations of iterated online RL-CAI on
the quickstart config (tiny-random-llama: minutes on a 2-core laptop), prints the per-phase wall time and
the run folder, and points at the SmolLM2 config for the same run on a real chat model.
"""

from __future__ import annotations

from pathlib import Path

from cai_ray.config import load_config
from cai_ray.constitution import load_constitution, shipped_constitutions
from cai_ray.metrics import read_metrics

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "quickstart-cpu.yaml"
PHASES = ("generate", "label", "pm_update", "policy_update", "sync", "idle")


def run_demo(config_path: str | None, overrides: list[str]) -> int:
    """Run the demo; returns a process exit code."""
    from cai_ray.pipelines.run import run_experiment

    for name in shipped_constitutions():
        c = load_constitution(name)
        print(f"constitution {name}: {len(c.principles)} principles, tiers {' > '.join(t.id for t in c.tiers)}")
    cfg = load_config(config_path or DEFAULT_CONFIG, overrides)
    run_dir = run_experiment(cfg, sl=True, rl=True)
    rows = read_metrics(run_dir / "metrics.jsonl")
    print(f"\n{'iter':>4} " + " ".join(f"{p:>13}" for p in PHASES) + f" {'reward':>8} {'PM acc (fresh)':>15}")
    for row in rows:
        phases = " ".join(f"{row.get(f'timing/{p}') or 0.0:>12.2f}s" for p in PHASES)
        print(f"{int(row['iteration']):>4} {phases} {row.get('reward/mean') or 0.0:>8.3f} "
              f"{row.get('pm_fresh/accuracy') or 0.0:>15.3f}")
    print(f"\nSFT data with whole critique -> revision chains (Parquet shards): {run_dir / 'sl' / 'revisions'}")
    print(f"metrics: {run_dir / 'metrics.jsonl'}; labels: {run_dir / 'labels'}")
    print("The same run on a real chat model (SmolLM2-135M-Instruct, about 7 minutes on 2 cores):\n"
          "  cai-ray run --config configs/smollm2-cpu.yaml")
    return 0
