"""Flat-bucket packing for weight sync: layouts, dtypes, bucket sizes."""

from __future__ import annotations

import torch

from cai_ray.sync import TensorMeta, _metas_from_json, _metas_to_json, pack_bucket, rebucket, unpack_bucket


def test_pack_unpack_round_trip_mixed_dtypes() -> None:
    tensors = [
        ("a", torch.arange(6, dtype=torch.float32).reshape(2, 3)),
        ("b", torch.tensor([1.5, -2.0], dtype=torch.bfloat16)),
        ("c", torch.tensor([[7]], dtype=torch.int64)),
    ]
    buffer, metas = pack_bucket(tensors)
    assert buffer.dtype == torch.uint8 and buffer.numel() == 24 + 8 + 4 + 12 + 8  # 16-byte aligned
    assert metas[1] == TensorMeta("b", "bfloat16", (2,), 32, 4)
    assert metas[2].offset == 48
    for (name, original), (name2, restored) in zip(tensors, unpack_bucket(buffer, metas), strict=True):
        assert name == name2 and restored.dtype == original.dtype
        torch.testing.assert_close(restored, original, rtol=0, atol=0)
    assert _metas_from_json(_metas_to_json(metas)) == metas


def test_pack_handles_non_contiguous() -> None:
    t = torch.arange(12, dtype=torch.float32).reshape(3, 4).t()
    buffer, metas = pack_bucket([("t", t)])
    torch.testing.assert_close(unpack_bucket(buffer, metas)[0][1], t)


def test_rebucket_respects_size_and_order() -> None:
    tensors = [(f"w{i}", torch.zeros(n)) for i, n in enumerate([10, 10, 30, 5, 100, 1])]  # float32: 4 bytes each
    buckets = list(rebucket(tensors, bucket_bytes=80))
    assert [[n for n, _ in b] for b in buckets] == [["w0", "w1"], ["w2"], ["w3"], ["w4"], ["w5"]]
    assert [n for b in buckets for n, _ in b] == [n for n, _ in tensors]
    assert list(rebucket([], 10)) == []
