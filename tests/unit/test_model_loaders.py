"""Every model and tokenizer load in cai_ray/ and benchmarks/ goes through ``cai_ray.models.ModelRef``.

That is what makes ``models.*.revision`` and ``trust_remote_code`` reach every loader (their behaviour is
tested on real loaders in tests/integration/test_models.py). A direct ``Auto*.from_pretrained`` or a
``vllm.LLM(...)`` built by hand elsewhere would silently drop them.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).parents[2]
OWNER = ROOT / "cai_ray" / "models.py"  # ModelRef's loaders, and the built-ins' one-off conversion


def _direct_loads(path: Path, root: Path = ROOT) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        # Any transformers class (AutoModel*, AutoTokenizer, ...); cai-ray's own classes take a ModelRef.
        if (isinstance(func, ast.Attribute) and func.attr == "from_pretrained" and isinstance(func.value, ast.Name)
                and func.value.id not in ("ScalarHeadModel", "cls")):
            found.append(f"{path.relative_to(root)}:{node.lineno}: {func.value.id}.from_pretrained")
        through_engine_args = (len(node.keywords) == 1 and node.keywords[0].arg is None and not node.args
                               and isinstance(node.keywords[0].value, ast.Call)
                               and getattr(node.keywords[0].value.func, "id", None) == "engine_args")
        if isinstance(func, ast.Name) and func.id == "LLM" and not through_engine_args:
            found.append(f"{path.relative_to(root)}:{node.lineno}: LLM(...) not built by engine_args")
    return found


def test_every_loader_goes_through_model_ref() -> None:
    files = sorted((ROOT / "cai_ray").rglob("*.py")) + sorted((ROOT / "benchmarks").rglob("*.py"))
    assert len(files) > 30
    direct = [hit for path in files if path != OWNER for hit in _direct_loads(path)]
    assert not direct, "load through cai_ray.models.ModelRef instead:\n" + "\n".join(direct)


def test_the_scan_sees_a_direct_load(tmp_path: Path) -> None:
    bad = tmp_path / "loader.py"
    bad.write_text("from transformers import AutoTokenizer\nAutoTokenizer.from_pretrained('x')\nLLM(model='x')\n"
                   "LLM(**engine_args(m, e, seed=0))\n")
    assert _direct_loads(bad, tmp_path) == ["loader.py:2: AutoTokenizer.from_pretrained",
                                            "loader.py:3: LLM(...) not built by engine_args"]
