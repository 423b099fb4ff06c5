"""MMoE, CGC, PLE and their gates (softmax, DSelect-k)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from polytask.errors import ConfigError
from polytask.models.encoders import CNNEncoder, MLPEncoder
from polytask.models.experts import (
    CGC,
    GATES,
    PLE,
    DSelectKGate,
    MMoE,
    SoftmaxGate,
    join_features,
    smooth_step,
)
from polytask.models.heads import linear_head
from polytask.tasks import TaskSpec

TASKS = [TaskSpec("a", "binary"), TaskSpec("b", "regression"), TaskSpec("c", "regression")]


def mlp() -> nn.Module:
    return MLPEncoder((5,), hidden=(6,), activation="gelu")


def head(task: TaskSpec, width: int) -> nn.Module:
    return linear_head(width, task)


def converge(gate: DSelectKGate, experts: list[int], selector_logits: list[float]) -> None:
    """Set the gate so that selector ``i`` picks ``experts[i]`` (logits beyond ±gamma/2) with
    softmax logit ``selector_logits[i]``, for every input."""
    m = gate.num_binary
    bits = [[(e >> (m - 1 - j)) & 1 for j in range(m)] for e in experts]
    with torch.no_grad():
        gate.selector_logits.weight.zero_()
        gate.selector_logits.bias.copy_(torch.tensor(bits, dtype=torch.float).flatten() * 10 - 5)
        gate.selector_weights.weight.zero_()
        gate.selector_weights.bias.copy_(torch.tensor(selector_logits))


# --------------------------------------------------------------------------- gates


def test_gates_are_registered() -> None:
    assert GATES.names() == ["dselect_k", "softmax"]
    assert set(GATES.parameters("dselect_k")) == {"k", "gamma", "entropy_reg"}


def test_smooth_step_matches_the_paper() -> None:
    gamma = 2.0
    t = torch.tensor([-5.0, -1.0, -0.5, 0.0, 0.5, 1.0, 5.0], requires_grad=True)
    s = smooth_step(t, gamma)
    expected = [0.0, 0.0, -2 / 8 * -0.125 + 3 / 4 * -0.5 + 0.5, 0.5, 0.84375, 1.0, 1.0]
    torch.testing.assert_close(s, torch.tensor(expected))
    s.sum().backward()
    assert t.grad is not None
    torch.testing.assert_close(t.grad[[0, 3, 6]], torch.tensor([0.0, 3 / (2 * gamma), 0.0]))
    # continuous and flat at the boundaries
    edge = torch.tensor([gamma / 2 - 1e-4, -gamma / 2 + 1e-4])
    torch.testing.assert_close(
        smooth_step(edge, gamma), torch.tensor([1.0, 0.0]), atol=1e-6, rtol=0
    )


@pytest.mark.parametrize("num_experts", [1, 2, 3, 4, 5, 8])
@pytest.mark.parametrize("k", [1, 2, 3])
def test_dselect_k_selects_at_most_k_experts_when_converged(num_experts: int, k: int) -> None:
    torch.manual_seed(0)
    gate = DSelectKGate(4, num_experts, k=k)
    m = gate.num_binary
    chosen = torch.randint(0, 2**m, (k,)).tolist()  # unused codes included: they are folded
    converge(gate, chosen, torch.randn(k).tolist())
    weights, penalty = gate(torch.randn(7, 4))
    assert penalty is None
    assert ((weights > 0).sum(-1) <= k).all()
    assert ((weights > 0).sum(-1) == len({c % num_experts for c in chosen})).all()
    torch.testing.assert_close(weights.sum(-1), torch.ones(7))


def test_dselect_k_weights_follow_the_binary_codes_and_selector_softmax() -> None:
    gate = DSelectKGate(3, 4, k=2)
    converge(gate, [1, 3], [0.0, math.log(3.0)])
    weights, _ = gate(torch.randn(2, 3))
    torch.testing.assert_close(weights, torch.tensor([[0.0, 0.25, 0.0, 0.75]] * 2))
    # 5 experts use 3 bits: codes 5, 6, 7 are folded onto experts 0, 1, 2
    gate = DSelectKGate(3, 5, k=1)
    converge(gate, [6], [0.0])
    weights, _ = gate(torch.randn(2, 3))
    torch.testing.assert_close(weights, torch.tensor([[0.0, 1.0, 0.0, 0.0, 0.0]] * 2))


def test_dselect_k_starts_with_every_expert_active_and_sums_to_one() -> None:
    torch.manual_seed(0)
    gate = DSelectKGate(10, 6, k=2, gamma=1.0)
    weights, _ = gate(torch.randn(16, 10))
    assert (weights > 0).all()
    torch.testing.assert_close(weights.sum(-1), torch.ones(16))
    assert weights.max() < 0.5  # near uniform at initialisation


def test_dselect_k_entropy_penalty() -> None:
    torch.manual_seed(0)
    gate = DSelectKGate(4, 4, k=2, entropy_reg=0.1)
    x = torch.randn(5, 4)
    _, penalty = gate(x)
    assert penalty is not None and penalty.item() > 0
    # uniform selectors over 4 experts have entropy log 4 each
    torch.testing.assert_close(penalty, torch.tensor(0.1 * 2 * math.log(4)), atol=1e-3, rtol=0)
    penalty.backward()
    assert gate.selector_logits.weight.grad is not None
    converge(gate, [0, 3], [0.0, 0.0])
    _, penalty = gate(x)
    assert penalty is not None and penalty.item() < 1e-5


def test_dselect_k_rejects_bad_parameters_at_once() -> None:
    with pytest.raises(ConfigError, match=r"k must be >= 1, found 0; gamma must be > 0, found 0"):
        DSelectKGate(3, 4, k=0, gamma=0.0)


def test_softmax_gate() -> None:
    weights, penalty = SoftmaxGate(3, 4)(torch.randn(5, 3))
    assert penalty is None and weights.shape == (5, 4)
    torch.testing.assert_close(weights.sum(-1), torch.ones(5))


def test_join_features_views_share_the_joined_tensor() -> None:
    a = torch.randn(2, 3, requires_grad=True)
    b = torch.randn(2, 2, 2, requires_grad=True)
    features, (va, vb) = join_features([a, b])
    torch.testing.assert_close(va, a)
    torch.testing.assert_close(vb, b)
    (va.sum() + 2 * vb.sum()).backward(inputs=[features])
    assert features.grad is not None
    torch.testing.assert_close(features.grad, torch.tensor([[1.0] * 3 + [2.0] * 4] * 2))


# --------------------------------------------------------------------------- MMoE


def test_mmoe_tower_reads_the_gate_weighted_experts() -> None:
    torch.manual_seed(0)
    model = MMoE(tasks=TASKS, make_encoder=mlp, make_head=head, num_experts=3).eval()
    gate = model.gates["a"]
    assert isinstance(gate, SoftmaxGate)
    with torch.no_grad():  # task a's gate puts all its weight on expert 2
        gate.linear.weight.zero_()
        gate.linear.bias.copy_(torch.tensor([-50.0, -50.0, 50.0]))
    x = torch.randn(4, 5)
    out = model(x)
    torch.testing.assert_close(out.outputs["a"], model.heads["a"](model.experts[2](x)))
    torch.testing.assert_close(out.extras["gates"]["a"], torch.tensor([[0.0, 0.0, 1.0]] * 4))
    torch.testing.assert_close(out.features, torch.cat([e(x) for e in model.experts], dim=1))


def test_mmoe_with_dselect_k_gates_reports_the_entropy_penalty() -> None:
    model = MMoE(
        tasks=TASKS, make_encoder=mlp, make_head=head, gate="dselect_k", k=2, entropy_reg=0.01
    )
    assert all(isinstance(g, DSelectKGate) and g.k == 2 for g in model.gates.values())
    out = model(torch.randn(4, 5))
    aux = out.extras["aux_loss"]
    assert aux.dim() == 0 and aux.item() > 0
    aux.backward()
    assert model.gates["b"].selector_logits.weight.grad is not None
    assert (
        "aux_loss"
        not in MMoE(tasks=TASKS, make_encoder=mlp, make_head=head)(torch.randn(2, 5)).extras
    )


def test_mmoe_gates_read_the_flattened_image() -> None:
    model = MMoE(
        tasks=TASKS,
        make_encoder=lambda: CNNEncoder((1, 6, 6), channels=(2,), out_features=4),
        make_head=head,
        num_experts=2,
    )
    assert model.gates["a"].linear.in_features == 36
    assert model(torch.randn(3, 1, 6, 6)).outputs["a"].shape == (3,)


class _Embedding(nn.Module):
    out_features = 4

    def __init__(self) -> None:
        super().__init__()
        self.table = nn.Embedding(10, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.table(x.long()).mean(1)


def test_gate_input_width_must_be_given_when_it_cannot_be_found() -> None:
    with pytest.raises(ConfigError, match=r"mmoe: cannot tell the input width .* input_features"):
        MMoE(tasks=TASKS, make_encoder=_Embedding, make_head=head)
    model = MMoE(tasks=TASKS, make_encoder=_Embedding, make_head=head, input_features=3)
    assert model(torch.randint(0, 10, (2, 3))).outputs["b"].shape == (2,)


def test_mmoe_reports_every_bad_parameter() -> None:
    with pytest.raises(ConfigError) as info:
        MMoE(tasks=TASKS, make_encoder=mlp, make_head=head, num_experts=0, gate="top1", k=0)
    message = str(info.value)
    assert message.startswith("mmoe: unknown gate 'top1'; known: dselect_k, softmax")
    assert "k must be >= 1" in message and "num_experts must be >= 1, found 0" in message


# --------------------------------------------------------------------------- CGC / PLE


def _ids(params: object) -> set[int]:
    return {id(p) for p in params}  # type: ignore[attr-defined]


def test_cgc_shares_only_the_shared_experts() -> None:
    model = CGC(tasks=TASKS, make_encoder=mlp, make_head=head, experts_per_task=2, shared_experts=3)
    (level,) = model.levels
    assert len(level.task_experts["a"]) == 2 and len(level.shared_experts) == 3
    assert level.shared_gate is None
    assert _ids(model.shared_parameters()) == _ids(level.shared_experts.parameters())
    out = model(torch.randn(4, 5))
    assert out.extras["gates"]["a"].shape == (4, 5)
    assert out.features.shape == (4, 3 * 6)


def test_ple_levels_and_gates() -> None:
    model = PLE(tasks=TASKS, make_encoder=mlp, make_head=head, num_levels=3, shared_experts=2)
    first, second, last = model.levels
    assert isinstance(first.shared_experts[0], MLPEncoder)
    for level in (second, last):  # inner experts are width -> width MLPs
        expert = level.shared_experts[0]
        assert isinstance(expert, MLPEncoder) and expert.body[0].in_features == 6
    assert first.shared_gate is not None and second.shared_gate is not None
    assert last.shared_gate is None
    out = model(torch.randn(4, 5))
    assert [set(g) for g in out.extras["level_gates"]] == [{"a", "b", "c"}] * 3
    assert [w.shape for w in out.extras["shared_gates"]] == [(4, 3 * 1 + 2)] * 2
    assert out.extras["gates"]["c"].shape == (4, 3)
    for weights in out.extras["shared_gates"]:
        torch.testing.assert_close(weights.sum(-1), torch.ones(4))


def test_ple_shares_what_every_task_depends_on() -> None:
    model = PLE(tasks=TASKS, make_encoder=mlp, make_head=head, num_levels=3)
    first, second, last = model.levels
    shared = _ids(model.shared_parameters())
    for level in model.levels:
        assert _ids(level.shared_experts.parameters()) <= shared
    # task experts below the last level reach every task through the shared gate
    assert _ids(first.task_experts.parameters()) <= shared
    assert _ids(second.task_experts.parameters()) <= shared
    assert _ids(last.task_experts.parameters()).isdisjoint(shared)
    # a task gate feeds its own task's experts of the next level: shared while those are
    assert _ids(first.task_gates.parameters()) <= shared
    assert _ids(second.task_gates.parameters()).isdisjoint(shared)
    assert _ids(model.heads.parameters()).isdisjoint(shared)


def test_ple_task_losses_reach_inner_task_experts_of_other_tasks() -> None:
    model = PLE(tasks=TASKS, make_encoder=mlp, make_head=head, num_levels=2)
    out = model(torch.randn(4, 5))
    out.outputs["a"].sum().backward()
    grad = model.levels[0].task_experts["b"][0].body[0].weight.grad
    assert grad is not None and grad.abs().sum() > 0
    assert model.levels[1].task_experts["b"][0].body[0].weight.grad is None


def test_ple_rejects_bad_parameters() -> None:
    with pytest.raises(ConfigError, match=r"ple: num_levels must be >= 1, found 0; "):
        PLE(tasks=TASKS, make_encoder=mlp, make_head=head, num_levels=0, shared_experts=0)
    with pytest.raises(ConfigError, match=r"cgc: shared_experts must be >= 1, found 0"):
        CGC(tasks=TASKS, make_encoder=mlp, make_head=head, shared_experts=0)
