"""The tabular encoder: shapes, gradients, the unknown code, crosses, errors, and expert models
(MMoE, CGC, PLE) reading dict inputs through its ``embed``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor

from polytask.balancing import GramianWeightingAggregator
from polytask.errors import ConfigError
from polytask.models import ENCODERS, MultiTaskModel, build_model
from polytask.models.tabular import TabularEncoder, auto_embedding_dim, cross_index
from polytask.tasks import TaskSpec
from polytask.train.checkpoint import load_checkpoint, save_checkpoint

SPEC: dict[str, Any] = {
    "numeric": {"shape": [3]},
    "categorical": {
        "shape": [3],
        "cardinalities": [5, 4, 30],
        "columns": ["city", "device", "user_id"],
    },
}
TASKS = [TaskSpec("click", "binary"), TaskSpec("price", "regression")]


def inputs(batch: int = 6, seed: int = 0) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(seed)
    codes = torch.stack(
        [torch.randint(0, card, (batch,), generator=g) for card in (5, 4, 30)], dim=1
    )
    return {"numeric": torch.randn(batch, 3, generator=g), "categorical": codes}


def test_registered_and_shapes() -> None:
    assert "tabular" in ENCODERS.names()
    enc = TabularEncoder(SPEC, hidden=[16, 8])
    dims = [auto_embedding_dim(c) for c in (5, 4, 30)]
    assert [e.embedding_dim for e in enc.input_layer.embeddings] == dims == [4, 3, 11]
    assert enc.in_features == 3 + sum(dims)
    assert enc(inputs()).shape == (6, 8) and enc.out_features == 8
    assert enc.embed(inputs()).shape == (6, enc.in_features)


def test_embedding_widths_fixed_and_per_column() -> None:
    enc = TabularEncoder(SPEC, hidden=[4], embedding_dim=2, embedding_dims={"user_id": 7})
    assert [e.embedding_dim for e in enc.input_layer.embeddings] == [2, 2, 7]
    with pytest.raises(ConfigError, match="embedding_dims names unknown column"):
        TabularEncoder(SPEC, embedding_dims={"nope": 3})
    with pytest.raises(ConfigError, match="'auto' or an integer"):
        TabularEncoder(SPEC, embedding_dim="big")


def test_numeric_only_shape_and_no_mlp() -> None:
    enc = TabularEncoder((5,), hidden=[4])
    assert enc(torch.randn(2, 5)).shape == (2, 4)
    bare = TabularEncoder(SPEC, hidden=[])  # no MLP: the output is the input layer
    x = inputs()
    torch.testing.assert_close(bare(x), bare.embed(x))
    assert bare.out_features == bare.in_features


def test_gradients_reach_every_table_used_and_the_mlp() -> None:
    enc = TabularEncoder(SPEC, hidden=[8], crosses=[["city", "device"]], activation="gelu")
    x = inputs(batch=32)
    enc(x).square().sum().backward()
    for name, p in enc.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    # rows of codes not in the batch get no gradient
    unused = sorted(set(range(30)) - set(x["categorical"][:, 2].tolist()))
    assert unused and enc.input_layer.embeddings[2].weight.grad[unused].abs().sum() == 0


def test_unknown_code_zero_is_its_own_row_and_out_of_range_codes_are_unknown() -> None:
    enc = TabularEncoder(SPEC, hidden=[4]).eval()
    x = inputs(batch=3)
    x["categorical"][:, 0] = torch.tensor([0, 99, -5])  # unknown, too large, negative
    layer = enc.embed(x)
    city = layer[:, 3 : 3 + enc.input_layer.embeddings[0].embedding_dim]
    row0 = enc.input_layer.embeddings[0].weight[0]
    for i in range(3):
        torch.testing.assert_close(city[i], row0)
    assert not torch.equal(enc.input_layer.embeddings[0].weight[1], row0)


def test_cross_index_exact_and_hashed() -> None:
    codes = torch.tensor([[0, 0], [1, 2], [4, 3]])
    # 5 x 4 = 20 combinations fit in 100 buckets: the mixed-radix number a * 4 + b
    assert cross_index(codes, [5, 4], buckets=100).tolist() == [0, 6, 19]
    pairs = torch.randint(0, 30, (500, 2), generator=torch.Generator().manual_seed(0))
    hashed = cross_index(pairs, [30, 30], buckets=50)  # 900 combinations > 50: hashed
    assert int(hashed.min()) >= 0 and int(hashed.max()) < 50
    assert len(hashed.unique()) > 40  # spread over the buckets
    assert torch.equal(hashed, cross_index(pairs.clone(), [30, 30], buckets=50))  # a function


def test_cross_embeddings_are_sized_and_distinguish_combinations() -> None:
    enc = TabularEncoder(
        SPEC,
        hidden=[4],
        crosses=[["city", "device"], ["city", "user_id"]],
        cross_buckets=40,
        cross_dim=3,
    )
    assert [e.num_embeddings for e in enc.input_layer.cross_embeddings] == [
        20,
        40,
    ]  # exact, then hashed
    assert enc.in_features == 3 + 4 + 3 + 11 + 3 + 3
    # two rows that differ only in the combination of city and device differ in the cross part
    x = {"numeric": torch.zeros(2, 3), "categorical": torch.tensor([[1, 2, 5], [2, 1, 5]])}
    layer = enc.embed(x)
    assert not torch.equal(layer[0, -6:-3], layer[1, -6:-3])


def test_cross_naming_an_unknown_column_lists_the_columns() -> None:
    with pytest.raises(ConfigError) as info:
        TabularEncoder(SPEC, crosses=[["city", "colour"]])
    message = str(info.value)
    assert "'colour'" in message and "city, device, user_id" in message
    with pytest.raises(ConfigError, match="at least two columns"):
        TabularEncoder(SPEC, crosses=[["city"]])


def test_bad_input_specs() -> None:
    with pytest.raises(ConfigError, match="reads the input blocks"):
        TabularEncoder({"numeric": {"shape": [2]}, "text": {"shape": [4]}})
    with pytest.raises(ConfigError, match="cardinalities"):
        TabularEncoder({"categorical": {"shape": [2], "cardinalities": [3]}})
    with pytest.raises(ConfigError, match="no 'categorical' block"):
        TabularEncoder(SPEC)({"numeric": torch.zeros(1, 3)})


def test_stages_compose_to_the_encoder() -> None:
    enc = TabularEncoder(SPEC, hidden=[8, 6, 4], batch_norm=True).eval()
    stages = enc.stages()
    assert len(stages) == 3
    x = inputs()
    torch.testing.assert_close(torch.nn.Sequential(*stages)(x), enc(x))
    stage_params = {id(p) for stage in stages for p in stage.parameters()}
    assert stage_params == {id(p) for p in enc.parameters()}  # the encoder's own modules
    bare = TabularEncoder(SPEC, hidden=[])
    assert bare.stages() == [bare.input_layer]


def test_checkpoint_round_trip(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = build_model(TASKS, SPEC, encoder="tabular", encoder_params={"hidden": [8]})
    save_checkpoint(tmp_path / "m.safetensors", {"model": model.state_dict()})
    torch.manual_seed(1)
    fresh = build_model(TASKS, SPEC, encoder="tabular", encoder_params={"hidden": [8]})
    fresh.load_state_dict(load_checkpoint(tmp_path / "m.safetensors")["model"])
    x = inputs()
    torch.testing.assert_close(fresh(x).outputs["click"], model(x).outputs["click"])


# --------------------------------------------------------------------------- expert models


class MeanWeighting(GramianWeightingAggregator):
    """Every task weighted 1/K: the shared update is the gradient of the mean loss."""

    def weights_from_gramian(
        self, gramian: Tensor, losses: Tensor, rows: Tensor | None = None
    ) -> Tensor:
        k = gramian.shape[0]
        return torch.full((k,), 1.0 / k, dtype=gramian.dtype, device=gramian.device)


EXPERT_CASES = [
    ("mmoe", {"num_experts": 3}),
    ("mmoe", {"num_experts": 3, "gate": "dselect_k", "k": 2}),
    ("cgc", {"experts_per_task": 1, "shared_experts": 2}),
    ("ple", {"num_levels": 2, "shared_experts": 2}),
]


def expert_model(name: str, params: dict[str, Any]) -> MultiTaskModel:
    torch.manual_seed(0)
    return build_model(
        TASKS,
        SPEC,
        encoder="tabular",
        encoder_params={"hidden": [6], "crosses": [["city", "device"]], "activation": "gelu"},
        architecture=name,
        architecture_params=params,
    )


def labels(batch: int = 6) -> dict[str, Tensor]:
    return {"click": torch.tensor([0.0, 1.0] * (batch // 2)), "price": torch.randn(batch)}


@pytest.mark.parametrize(("name", "params"), EXPERT_CASES)
def test_expert_models_gate_on_the_embedded_input(name: str, params: dict[str, Any]) -> None:
    model = expert_model(name, params)
    out = model(inputs())
    assert out.outputs["click"].shape == (6,) and out.outputs["price"].shape == (6,)
    for weights in out.extras["gates"].values():  # type: ignore[index]
        torch.testing.assert_close(weights.sum(-1), torch.ones(6))
    losses = {t.name: t.compute_loss(out.outputs[t.name], labels()[t.name])[0] for t in TASKS}
    sum(losses.values()).backward()  # type: ignore[union-attr]
    for pname, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, pname


@pytest.mark.parametrize("level", ["parameters", "features"])
@pytest.mark.parametrize(("name", "params"), EXPERT_CASES)
def test_features_stay_a_cut_with_dict_inputs(
    name: str, params: dict[str, Any], level: str
) -> None:
    """The gates read the embedding with the gradient stopped: a gradient method weighting the
    tasks equally gives the gradient of the mean loss to the shared parameters at both levels."""
    model = expert_model(name, params)
    out = model(inputs())
    y = labels()
    losses = {t.name: t.compute_loss(out.outputs[t.name], y[t.name])[0] for t in TASKS}
    vector = torch.stack(list(losses.values()))
    expected = torch.autograd.grad(vector.mean(), model.shared_parameters(), retain_graph=True)
    aggregator = MeanWeighting(TASKS, level=level)  # type: ignore[arg-type]
    aggregator.attach(model)
    aggregator.backward(losses, shared_params=model.shared_parameters(), features=out.features)
    for p, g in zip(model.shared_parameters(), expected, strict=True):
        torch.testing.assert_close(p.grad, g, atol=1e-5, rtol=1e-4)


def test_expert_model_with_dict_input_needs_an_embedding_encoder() -> None:
    class DictMLP(torch.nn.Module):
        out_features = 4
        in_features = 3

        def __init__(self) -> None:
            super().__init__()
            self.linear = torch.nn.Linear(3, 4)

        def forward(self, x: dict[str, Tensor]) -> Tensor:
            return self.linear(x["numeric"])

    from polytask.models.experts import MMoE
    from polytask.models.heads import linear_head

    model = MMoE(tasks=TASKS, make_encoder=DictMLP, make_head=lambda t, w: linear_head(w, t))
    with pytest.raises(ConfigError, match="needs an embed"):
        model(inputs())
