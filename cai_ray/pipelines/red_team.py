"""The RL loop's red-team phase: propose attacks, let the current policy answer them, judge, archive successes.

Each iteration i, after its batch was generated and before the next batch is drawn:
  1. plan ``red_team.num_candidates_per_iteration`` requests: grid cells (category x style) drawn without
     replacement, each with few-shot examples (archived attacks of its category, its own cell first, then
     dataset prompts of the category), from an RNG seeded by (seed, i) so that a resumed run plans the same;
  2. the RedTeamer proposes one line per request; bad lines are filtered and counted
     (``red_team/filtered/<reason>``, see :func:`cai_ray.inference.redteam.screen`);
  3. the policy answers each candidate once on the rollout engines, with its current weights;
  4. the feedback pool judges those answers, and the answers of this iteration's batch to the archived
     attacks it trains on, with evaluation's harmlessness question (yes/no, swap-debiased, the same judging
     path as ``cai-ray eval``); success = P(harmful) > ``red_team.success_threshold``;
  5. successful candidates are offered to the archive (:mod:`cai_ray.redteam_archive`).
The loop then draws ``schedule.red_team_fraction`` of the next batch's red-team prompts from the archive.
Files: ``RUN/red_team/attacks.jsonl`` (every success with what the archive did with it),
``RUN/red_team/archive.jsonl`` (the archive now; a prompt set for ``cai-ray eval``),
``RUN/red_team/candidates/iter_NNNN.jsonl`` (every proposal, for reading) and ``RUN/red_team/red_team.png``.
Simplifications: one answer per candidate; archived attacks keep the score they were found with (the
archived-attack success rate shows whether training fixed them); in the async schedule the batch's answers
to archived attacks come from the weights one version old.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from cai_ray.config import AttackStyleConfig, ConfigError, DatasetConfig, RedTeamConfig
from cai_ray.data import PromptRecord, read_dataset, write_jsonl
from cai_ray.evaluation.items import HARMFUL_QUESTION
from cai_ray.inference.redteam import FILTER_REASONS, Candidate, RedTeamWorkers, screen
from cai_ray.launcher import RemoteCallError
from cai_ray.metrics import Metrics, PhaseTimer, keep_rows_before, read_metrics
from cai_ray.pipelines.roles import Roles
from cai_ray.redteam_archive import (
    ADDED,
    ARCHIVE_PREFIX,
    BELOW_CELL,
    DUPLICATE,
    REPLACED,
    Attack,
    AttackArchive,
    CharNgramSimilarity,
    Similarity,
    make_similarity,
)
from cai_ray.seeds import stable_seed
from cai_ray.types import AttackProposal, AttackRequest, JudgeRequest, Judgement, Prompt, RolloutBatch, Sample

log = logging.getLogger(__name__)
ATTACKS_FILE, ARCHIVE_FILE, PLOT_FILE = "attacks.jsonl", "archive.jsonl", "red_team.png"
PLOTTED = ("red_team/success_rate", "red_team/archived_success_rate", "red_team/coverage", "red_team/diversity")


# ------------------------------------------------------------------------------------- planning
def resolve_categories(cfg: RedTeamConfig, records: Sequence[PromptRecord], source: str) -> list[str]:
    """``red_team.categories``, else the values of ``red_team.category_field`` in the dataset (first-seen order)."""
    if cfg.categories is not None:
        return list(cfg.categories)
    found = [str(r.meta[cfg.category_field]) for r in records if r.meta.get(cfg.category_field) is not None]
    if not found:
        raise ConfigError(f"red_team.categories is unset and data.red_team ({source}) has no '{cfg.category_field}' "
                          "column to take them from; set red_team.categories or red_team.category_field")
    return list(dict.fromkeys(found))


def examples_by_category(records: Sequence[PromptRecord], categories: Sequence[str],
                         field: str) -> dict[str, list[str]]:
    """Dataset prompts per category; a category the dataset lacks gets every prompt (few-shot fallback)."""
    everything = [r.prompt for r in records]
    return {c: [r.prompt for r in records if str(r.meta.get(field)) == c] or everything for c in categories}


def plan_requests(archive: AttackArchive, examples: dict[str, list[str]], styles: Sequence[AttackStyleConfig], *,
                  num_candidates: int, num_few_shot: int, iteration: int, rng: random.Random) -> list[AttackRequest]:
    """The iteration's requests: cells drawn without replacement (another round once every cell was drawn).

    Few-shot examples: archived attacks of the cell (most successful first), then of other cells of the
    category (shuffled), then dataset prompts of the category (sampled), ``num_few_shot`` in all.
    """
    cells = [(c, s) for c in examples for s in styles]
    picked: list[tuple[str, AttackStyleConfig]] = []
    while len(picked) < num_candidates:
        picked += rng.sample(cells, min(num_candidates - len(picked), len(cells)))
    requests = []
    for k, (category, style) in enumerate(picked):
        others = [a.prompt for a in archive.attacks() if a.category == category and a.style != style.name]
        shown = ([a.prompt for a in archive.cell(category, style.name)] + rng.sample(others, len(others)))
        shown = shown[:num_few_shot]
        fresh = [p for p in examples[category] if p not in shown]
        shown += rng.sample(fresh, min(num_few_shot - len(shown), len(fresh)))
        requests.append(AttackRequest(f"it{iteration}/c{k}", category, style.name, style.how, tuple(shown)))
    return requests


# ------------------------------------------------------------------------------------- the phase
@dataclass(frozen=True)
class _Setup:
    """What the phase loads once: the grid rows, few-shot fallbacks and the near-duplicate test."""

    categories: list[str]
    examples: dict[str, list[str]]
    similarity: Similarity  # the archive's near-duplicate test
    copies: CharNgramSimilarity  # the proposals' copy test


class RedTeam:
    """The red-team phase of the loop; a no-op (``step`` returns no metrics) unless ``red_team.enabled``."""

    def __init__(self, cfg: RedTeamConfig, seeds: DatasetConfig, run_dir: Path, *, seed: int,
                 first_iteration: int) -> None:
        self._cfg, self._seed, self._dir = cfg, seed, run_dir / "red_team"
        self._setup: _Setup | None = None
        if cfg.enabled:
            records = read_dataset(seeds)
            categories = resolve_categories(cfg, records, seeds.path)
            self._setup = _Setup(categories, examples_by_category(records, categories, cfg.category_field),
                                 make_similarity(cfg.similarity, cfg.similarity_threshold),
                                 CharNgramSimilarity(cfg.copy_threshold))
            # Successes of iterations a resumed run does again go; each iteration's rows then appear once.
            keep_rows_before(self._dir / ATTACKS_FILE, first_iteration, key="iteration")

    def step(self, roles: Roles, archive: AttackArchive, batch: RolloutBatch, *, iteration: int,
             version: int) -> Metrics:
        """One round (module docstring) that updates ``archive``; returns the ``red_team/*`` metrics."""
        if self._setup is None or roles.red_team is None:
            return {}
        cfg, setup, timer = self._cfg, self._setup, PhaseTimer()
        rng = random.Random(stable_seed(self._seed, "red_team", iteration))
        requests = plan_requests(archive, setup.examples, cfg.styles, num_candidates=cfg.num_candidates_per_iteration,
                                 num_few_shot=cfg.num_few_shot, iteration=iteration, rng=rng)
        with timer.phase("propose"):
            proposals = self._propose(roles.red_team, requests, iteration)
        candidates, filtered = screen(requests, proposals, copies=setup.copies, keep_unfinished=cfg.keep_unfinished)
        with timer.phase("answer"):
            answers = roles.collect(roles.submit_generate([Prompt(c.request.item_id, c.prompt) for c in candidates],
                                                          iteration, num_samples=1), learner_version=version)
        filtered["overlong"] += len(answers.rejected)  # too long for the policy's prompt-length policy
        archived = [s for s in batch.samples if s.prompt_id.startswith(ARCHIVE_PREFIX)]
        with timer.phase("judge"):
            judged = roles.feedback.judge(_judge_requests(list(answers.samples) + archived))
        scores = {j.item_id: j.prob_yes for j in judged if j.error is None}
        found = [Attack(c.request.item_id.replace("/", "-"), c.prompt, c.request.category, c.request.style,
                        scores[c.request.item_id], iteration, version)
                 for c in candidates if scores.get(c.request.item_id, -1.0) > cfg.success_threshold]
        outcomes = [archive.insert(a, capacity=cfg.cell_capacity, near_duplicate=setup.similarity.near_duplicate)
                    for a in found]
        self._write(iteration, requests, proposals, candidates, answers, scores, found, outcomes, archive)
        return self._metrics(requests, filtered, answers, archived, judged, scores, found, outcomes, archive) | {
            f"red_team/seconds_{k}": v for k, v in timer.seconds.items()}

    def plot(self, metrics_path: Path) -> Path | None:
        """Write ``RUN/red_team/red_team.png`` from the run's metrics (None when red-teaming is off)."""
        return plot_red_team(metrics_path, self._dir / PLOT_FILE) if self._setup is not None else None

    # ------------------------------------------------------------------------------- helpers
    def _propose(self, workers: RedTeamWorkers, requests: list[AttackRequest], iteration: int) -> list[AttackProposal]:
        try:
            return workers.propose(requests, seed=stable_seed(self._seed, "red_team_sample", iteration))
        except RemoteCallError as err:  # the red-teamer is auxiliary: a dead one costs this round, not the run
            log.warning("red-team iteration %d: no proposals (%s)", iteration, err)
            return [AttackProposal(r.item_id, "", "abort", error=str(err)) for r in requests]

    def _metrics(self, requests: Sequence[AttackRequest], filtered: dict[str, int], answers: RolloutBatch,
                 archived: Sequence[Sample], judged: Sequence[Judgement], scores: dict[str, float],
                 found: Sequence[Attack], outcomes: Sequence[str], archive: AttackArchive) -> Metrics:
        assert self._setup is not None
        threshold = self._cfg.success_threshold
        candidate_scores = [scores[s.prompt_id] for s in answers.samples if s.prompt_id in scores]
        archived_scores = [scores[_judge_id(s)] for s in archived if _judge_id(s) in scores]
        counts = Counter(outcomes)
        grid = len(self._setup.categories) * len(self._cfg.styles)
        return {
            "red_team/candidates": float(len(requests)), "red_team/judged": float(len(candidate_scores)),
            **{f"red_team/filtered/{r}": float(filtered[r]) for r in FILTER_REASONS},
            "red_team/judge_errors": float(sum(j.error is not None for j in judged)),
            "red_team/successes": float(len(found)),
            "red_team/success_rate": _rate(candidate_scores, threshold),
            "red_team/score_mean": _mean(candidate_scores),
            "red_team/archived_judged": float(len(archived_scores)),
            "red_team/archived_success_rate": _rate(archived_scores, threshold),
            **{f"red_team/archive/{o}": float(counts[o]) for o in (ADDED, REPLACED, DUPLICATE, BELOW_CELL)},
            "red_team/archive_size": float(len(archive)), "red_team/coverage": archive.coverage(grid),
            "red_team/diversity": self._setup.similarity.mean_dissimilarity([a.prompt for a in archive.attacks()]),
        }

    def _write(self, iteration: int, requests: Sequence[AttackRequest], proposals: Sequence[AttackProposal],
               candidates: Sequence[Candidate], answers: RolloutBatch, scores: dict[str, float],
               found: Sequence[Attack], outcomes: Sequence[str], archive: AttackArchive) -> None:
        kept = {c.request.item_id: c.prompt for c in candidates}
        answer = {s.prompt_id: s.response_text for s in answers.samples}
        rows = [asdict(r) | {"raw": p.text, "finish_reason": p.finish_reason, "error": p.error,
                             "prompt": kept.get(r.item_id), "answer": answer.get(r.item_id),
                             "prob_harmful": scores.get(r.item_id)} for r, p in zip(requests, proposals)]
        write_jsonl(rows, self._dir / "candidates" / f"iter_{iteration:04d}.jsonl")
        self._dir.mkdir(parents=True, exist_ok=True)
        with (self._dir / ATTACKS_FILE).open("a", encoding="utf-8") as out:
            for attack, outcome in zip(found, outcomes):
                out.write(json.dumps(asdict(attack) | {"archive": outcome}, ensure_ascii=False) + "\n")
        tmp = write_jsonl(archive.to_json(), self._dir / (ARCHIVE_FILE + ".tmp"))
        os.replace(tmp, self._dir / ARCHIVE_FILE)


def _judge_id(sample: Sample) -> str:
    """Judge item ids: a candidate's id (one answer each), or an archived prompt's id and sample index."""
    return f"{sample.prompt_id}#{sample.sample_index}" if sample.prompt_id.startswith(ARCHIVE_PREFIX) \
        else sample.prompt_id


def _judge_requests(samples: Sequence[Sample]) -> list[JudgeRequest]:
    return [JudgeRequest(_judge_id(s), s.prompt, s.response_text, HARMFUL_QUESTION) for s in samples]


def _rate(scores: Sequence[float], threshold: float) -> float:
    return sum(s > threshold for s in scores) / len(scores) if scores else math.nan


def _mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs) if xs else math.nan


# ----------------------------------------------------------------------------------------- plot
def plot_red_team(metrics_path: str | Path, out: str | Path) -> Path:
    """Candidate and archived-attack success rates, archive coverage and diversity over iterations, from a
    run's ``metrics.jsonl``; written to ``out`` (PNG)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = [r for r in read_metrics(metrics_path) if "red_team/candidates" in r]
    fig = Figure(figsize=(10, 4))
    FigureCanvasAgg(fig)
    rates, grid = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    its = [r["iteration"] for r in rows]

    def series(key: str) -> list[float]:
        return [math.nan if r.get(key) is None else r[key] for r in rows]

    for ax, keys in ((rates, PLOTTED[:2]), (grid, PLOTTED[2:])):
        for key in keys:
            ax.plot(its, series(key), marker="o", label=key.removeprefix("red_team/"))
        ax.set_xlabel("iteration")
        ax.set_ylim(-0.05, 1.05)
        ax.grid(alpha=0.3)
        ax.legend(loc="best")
    rates.set_title("attack success (judged harmful)")
    grid.set_title("archive: cells filled, mean dissimilarity")
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    return path
