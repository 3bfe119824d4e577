"""Optimizer choice (with the CPU fallback announced) and learning-rate schedules."""

from __future__ import annotations

import pytest
import torch

from qlora_core.optim import build_optimizer, build_scheduler, lr_lambda


def test_paged_optimizer_on_cpu_says_it_is_not_paged():
    messages: list[tuple[str, str]] = []
    param = torch.nn.Parameter(torch.randn(64, 64))
    opt = build_optimizer([param], "paged_adamw_32bit", 1e-3, 0.0, torch.device("cpu"), lambda l, m: messages.append((l, m)))
    assert type(opt).__name__ == "AdamW32bit"
    assert messages and messages[0][0] == "warn" and "not paged" in messages[0][1]
    before = param.detach().clone()
    param.grad = torch.ones_like(param)
    opt.step()
    assert (param.detach() < before).all(), "one AdamW step moves every weight against the gradient"


@pytest.mark.parametrize("name,cls", [("adamw_8bit", "AdamW8bit"), ("adamw_torch", "AdamW")])
def test_named_optimizers(name, cls):
    opt = build_optimizer([torch.nn.Parameter(torch.randn(8))], name, 1e-3, 0.0, torch.device("cpu"))
    assert type(opt).__name__ == cls


def test_unknown_optimizer_is_named():
    with pytest.raises(ValueError, match="sgd"):
        build_optimizer([torch.nn.Parameter(torch.randn(2))], "sgd", 1e-3, 0.0, torch.device("cpu"))


def test_schedules():
    # 10 steps, 2 of warmup
    const = [lr_lambda("constant_with_warmup", 2, 10)(s) for s in range(10)]
    assert const[:3] == pytest.approx([1 / 3, 2 / 3, 1.0]) and const[-1] == 1.0
    # "constant" ignores the warmup, as transformers (and so the QLoRA repository) does
    assert [lr_lambda("constant", 2, 10)(s) for s in range(10)] == [1.0] * 10
    lin = [lr_lambda("linear", 2, 10)(s) for s in range(11)]
    assert lin[2] == 1.0 and lin[6] == pytest.approx(0.5) and lin[10] == 0.0
    cos = [lr_lambda("cosine", 2, 10)(s) for s in range(11)]
    assert cos[2] == 1.0 and cos[6] == pytest.approx(0.5) and cos[10] == pytest.approx(0.0)
    assert all(a >= b for a, b in zip(cos[2:], cos[3:]))


def test_scheduler_drives_the_optimizer_and_round_trips():
    param = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.AdamW([param], lr=1.0)
    sched, warmup = build_scheduler(opt, "linear", total_steps=20, warmup_ratio=0.1)
    assert warmup == 2
    for _ in range(5):
        opt.step()
        sched.step()
    saved = sched.state_dict()
    sched2, _ = build_scheduler(torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=1.0), "linear", 20, 0.1)
    sched2.load_state_dict(saved)
    assert sched2.get_last_lr() == sched.get_last_lr()
    assert sched.get_last_lr()[0] == pytest.approx(1 - 3 / 18)  # step 5: 3 of 18 decay steps done
