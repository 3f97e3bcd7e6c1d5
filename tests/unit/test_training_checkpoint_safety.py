"""Resume loads DeepSpeed state files weights-only: a file that would run code is refused and runs nothing."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import torch

from cai_ray.training.engine import CheckpointError, check_weights_only, weights_only_loads


class RunsCode:
    """Unpickling this runs a shell command (what a crafted state file would do)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return os.system, (f"touch {self.marker}",)


def _deepspeed_like_state() -> dict:
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return {"zero_stage": ZeroStageEnum(2), "loss_scaler": LossScaler(1.0), "param_slice_mappings": [
        {"w": fragment_address(numel=4, start=0)}], "single_partition_of_fp32_groups": [torch.ones(4)]}


def test_a_state_file_that_would_run_code_is_refused_by_name(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    torch.save(_deepspeed_like_state(), tmp_path / "mp_rank_00_model_states.pt")
    evil = tmp_path / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    torch.save({"optimizer_state_dict": RunsCode(marker)}, evil)
    with pytest.raises(CheckpointError, match=rf"^{evil}: refusing to load it: it needs \['posix.system'\]"):
        check_weights_only(tmp_path)
    evil.write_bytes(pickle.dumps(RunsCode(marker)))  # a bare pickle, not a torch.save zip
    with pytest.raises(CheckpointError, match=rf"^{evil}: not a torch.save checkpoint"):
        check_weights_only(tmp_path)
    assert not marker.exists()


def test_deepspeed_types_pass_and_load_weights_only(tmp_path: Path) -> None:
    torch.save(_deepspeed_like_state(), tmp_path / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    check_weights_only(tmp_path)
    with weights_only_loads():
        state = torch.load(tmp_path / "zero_pp_rank_0_mp_rank_00_optim_states.pt", weights_only=False)
    assert int(state["zero_stage"]) == 2 and state["param_slice_mappings"][0]["w"].numel == 4
    with pytest.raises(FileNotFoundError, match="no DeepSpeed state files"):
        check_weights_only(tmp_path / "missing")


def test_weights_only_overrides_an_explicit_unsafe_load_and_is_scoped(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TORCH_FORCE_WEIGHTS_ONLY_LOAD", raising=False)
    marker, evil = tmp_path / "ran", tmp_path / "optim_states.pt"
    torch.save({"optimizer_state_dict": RunsCode(marker)}, evil)
    with weights_only_loads(), pytest.raises(pickle.UnpicklingError, match="posix.system"):
        torch.load(evil, weights_only=False)  # what DeepSpeed's loader calls
    assert not marker.exists()
    assert "TORCH_FORCE_WEIGHTS_ONLY_LOAD" not in os.environ  # nothing leaks past the load
    monkeypatch.setenv("TORCH_FORCE_WEIGHTS_ONLY_LOAD", "0")
    with weights_only_loads():
        pass
    assert os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] == "0"
