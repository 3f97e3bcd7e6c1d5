"""Unit tests for cai_ray.algorithms.common (hand-computed expected values)."""

import ast
import math
from pathlib import Path

import pytest
import torch
from torch.testing import assert_close

import cai_ray.algorithms as algorithms
from cai_ray.algorithms.common import (
    gather_token_logprobs,
    last_token_index,
    masked_mean,
    masked_sum,
    masked_whiten,
    sequence_logprobs,
)


def test_masked_mean_all_elements():
    # (1 + 2 + 4) / 3 = 7/3; the masked 3.0 is ignored.
    values = torch.tensor([1.0, 2.0, 3.0, 4.0])
    mask = torch.tensor([1, 1, 0, 1])
    assert_close(masked_mean(values, mask), torch.tensor(7.0 / 3.0))


def test_masked_mean_dim_and_empty_row():
    values = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0]])
    mask = torch.tensor([[1, 0, 1], [0, 0, 1], [0, 0, 0]])
    # row0: (1 + 3) / 2 = 2; row1: 6 / 1 = 6; row2: empty -> 0 (not NaN)
    assert_close(masked_mean(values, mask, dim=1), torch.tensor([2.0, 6.0, 0.0]))
    # dim=0: col0 = 1/1, col1 = empty -> 0, col2 = (3 + 6) / 2 = 4.5
    assert_close(masked_mean(values, mask, dim=0), torch.tensor([1.0, 0.0, 4.5]))


def test_masked_mean_bool_mask_and_padding_invariance():
    values = torch.tensor([[1.0, 2.0, 1e6]])
    mask = torch.tensor([[True, True, False]])
    assert_close(masked_mean(values, mask), torch.tensor(1.5))


def test_masked_sum():
    values = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    mask = torch.tensor([[1, 0, 1], [0, 0, 1]])
    assert_close(masked_sum(values, mask, dim=1), torch.tensor([4.0, 6.0]))
    assert_close(masked_sum(values, mask), torch.tensor(10.0))


def test_masked_whiten_hand_values():
    # masked values [1, 2, 3]: mean 2, population var (1 + 0 + 1) / 3 = 2/3,
    # std = 0.8164966 -> [-1.2247449, 0, 1.2247449]; the padded 100 is ignored and set to 0.
    values = torch.tensor([1.0, 2.0, 3.0, 100.0])
    mask = torch.tensor([1, 1, 1, 0])
    assert_close(
        masked_whiten(values, mask),
        torch.tensor([-1.2247449, 0.0, 1.2247449, 0.0]),
    )
    # shift_mean=False adds the mean (2) back: [0.7752551, 2.0, 3.2247449]
    assert_close(
        masked_whiten(values, mask, shift_mean=False),
        torch.tensor([0.7752551, 2.0, 3.2247449, 0.0]),
    )


def test_masked_whiten_padding_does_not_matter():
    a = masked_whiten(torch.tensor([[1.0, 2.0, 0.0], [3.0, 5.0, 8.0]]),
                      torch.tensor([[1, 1, 0], [1, 1, 1]]))
    b = masked_whiten(torch.tensor([[1.0, 2.0, -50.0], [3.0, 5.0, 8.0]]),
                      torch.tensor([[1, 1, 0], [1, 1, 1]]))
    assert_close(a, b)
    # whitened masked elements have mean 0, population variance 1
    m = torch.tensor([[1, 1, 0], [1, 1, 1]])
    assert_close(masked_mean(a, m), torch.tensor(0.0), atol=1e-6, rtol=0)
    assert_close(masked_mean(a**2, m), torch.tensor(1.0), atol=1e-5, rtol=0)


def test_gather_token_logprobs_hand_values():
    # t=0: logits [0, 0, -inf] -> token 1 has log 0.5 = -0.6931472
    logits = torch.tensor([[[0.0, 0.0, -math.inf], [1.0, 2.0, 3.0]]])
    tokens = torch.tensor([[1, 2]])
    # log_softmax([1,2,3])[2] = 3 - logsumexp(1,2,3) = 3 - (3 + log(1 + e^-1 + e^-2))
    #                         = -log(1.5032147) = -0.4076060
    out = gather_token_logprobs(logits, tokens)
    assert out.shape == (1, 2)
    assert out.dtype == torch.float32
    assert_close(out, torch.tensor([[-0.6931472, -0.4076060]]))


def test_gather_token_logprobs_upcasts_bf16():
    logits = torch.tensor([[[1.0, 2.0, 3.0]]], dtype=torch.bfloat16)
    out = gather_token_logprobs(logits, torch.tensor([[0]]))
    # 1 - logsumexp(1,2,3) = 1 - 3.4076060 = -2.4076060
    assert out.dtype == torch.float32
    assert_close(out, torch.tensor([[-2.4076060]]))


def test_sequence_logprobs():
    token_logprobs = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -0.25, -9.0]])
    mask = torch.tensor([[1, 1, 0], [0, 1, 1]])
    # row0: -1 - 2 = -3; row1: -0.25 - 9 = -9.25
    assert_close(sequence_logprobs(token_logprobs, mask), torch.tensor([-3.0, -9.25]))


def test_last_token_index_right_and_left_padding():
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [0, 1, 1, 0], [0, 0, 1, 1]])
    assert torch.equal(last_token_index(mask), torch.tensor([1, 3, 2, 3]))
    assert torch.equal(last_token_index(torch.tensor([[0, 0, 0]])), torch.tensor([0]))


ALLOWED_IMPORTS = {"__future__", "collections", "math", "typing", "torch", "cai_ray"}


@pytest.mark.parametrize(
    "module", ["common", "sft", "preference", "ppo", "critic_free", "dpo", "__init__"]
)
def test_modules_only_import_torch(module):
    path = Path(algorithms.__file__).parent / f"{module}.py"
    tree = ast.parse(path.read_text())
    assert ast.get_docstring(tree), f"{module} needs a module docstring"
    roots = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            roots.add((node.module or "").split(".")[0])
    assert roots <= ALLOWED_IMPORTS, roots - ALLOWED_IMPORTS
