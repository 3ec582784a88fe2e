"""`strategy=fsdp` without processes: its config, what it refuses, and how it reads a DDP-format optimizer state.
The 2-process run (sharded training, preemption, resume, DDP equivalence) is in tests/test_ddp_resume.py."""

import pytest
import torch
from hydra.utils import instantiate
from torch import nn

from ldm.training.fsdp import UNetFSDPStrategy, _state_by_name
from ldm.training.run import train

from .helpers import compose_train


def test_config_builds_the_strategy():
    cfg = compose_train(
        "experiment=tiny", "strategy=fsdp", "strategy.param_dtype=bf16", "strategy.hybrid=true"
    )
    strategy = instantiate(cfg.strategy)
    assert isinstance(strategy, UNetFSDPStrategy)
    assert strategy.param_dtype is torch.bfloat16 and strategy.reduce_dtype is None and strategy.hybrid
    assert compose_train("experiment=tiny").get("strategy") is None  # default: trainer.strategy (DDP)
    with pytest.raises(ValueError, match="param_dtype"):
        UNetFSDPStrategy(param_dtype="fp8")


def test_stage_1_refuses_fsdp(tmp_path):
    cfg = compose_train("experiment=vae_tiny", "strategy=fsdp", run_dir=str(tmp_path))
    with pytest.raises(ValueError, match="stage 1 trains with DDP"):
        train(cfg)


def test_optimizer_state_is_matched_to_names_by_group_position():
    """A DDP checkpoint numbers parameters in param-group order (`Optimizer.state_dict()`), which is not the
    module's order when decayed and non-decayed parameters are grouped apart."""
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 2))
    decay = [model[0].weight, model[2].weight]
    no_decay = [model[0].bias, model[1].weight, model[1].bias, model[2].bias]
    optimizer = torch.optim.AdamW([{"params": decay}, {"params": no_decay, "weight_decay": 0.0}])
    model(torch.randn(5, 3)).square().sum().backward()
    optimizer.step()

    named = _state_by_name(optimizer.state_dict(), optimizer, model, "x.ckpt")
    params = dict(model.named_parameters())
    assert sorted(named["state"]) == sorted(params)
    for name, state in named["state"].items():
        assert torch.equal(state["exp_avg"], optimizer.state[params[name]]["exp_avg"]), name
    assert named["param_groups"][0]["params"] == ["0.weight", "2.weight"]
    assert named["param_groups"][1]["weight_decay"] == 0.0

    other = torch.optim.AdamW(model.parameters())  # one group of six, not two of two and four
    with pytest.raises(ValueError, match="groups of sizes"):
        _state_by_name(optimizer.state_dict(), other, model, "x.ckpt")
