"""Parameter groups: coverage, the four strategies, custom groups, per-group Gramians."""

from collections import Counter

import pytest
import torch
from tensordict import TensorDict
from torch import Tensor, nn

from tests.architectures import ARCHITECTURES, M_OUT, Architecture, WithDirectParam, build
from tests.settings import DEVICE
from torchjd_func import (
    GroupingStrategy,
    call,
    gramian,
    group_gramians,
    group_params,
    jacobian,
    params_of,
    split_by_group,
)
from torchjd_func._grouping import ROOT

STRATEGIES: list[GroupingStrategy] = ["together", "per_network", "per_layer", "per_tensor"]


class EncoderDecoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(5, 4), nn.ReLU())
        self.decoder = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, M_OUT))

    def forward(self, x: Tensor) -> Tensor:
        return self.decoder(self.encoder(x))


def _all_keys(params: TensorDict) -> list[tuple[str, ...]]:
    return [k if isinstance(k, tuple) else (k,) for k in params.keys(True, True)]


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("arch", ARCHITECTURES, ids=str)
def test_every_parameter_in_exactly_one_group(
    arch: Architecture, strategy: GroupingStrategy
) -> None:
    params = params_of(build(arch, torch.float32, DEVICE))
    groups = group_params(params, strategy)
    counts = Counter(key for members in groups.values() for key in members)
    assert sorted(counts) == sorted(_all_keys(params))
    assert set(counts.values()) == {1}


def test_strategies_on_an_encoder_decoder() -> None:
    params = params_of(EncoderDecoder())
    assert list(group_params(params, "together")) == ["all"]
    assert list(group_params(params, "per_network")) == ["encoder", "decoder"]
    assert list(group_params(params, "per_layer")) == ["encoder.0", "decoder.0", "decoder.2"]
    assert group_params(params, "per_layer")["decoder.2"] == (
        ("decoder", "2", "weight"),
        ("decoder", "2", "bias"),
    )
    assert len(group_params(params, "per_tensor")) == 6


def test_per_layer_keeps_direct_parameters_of_a_parent_module() -> None:
    groups = group_params(params_of(WithDirectParam()), "per_layer")
    assert groups[ROOT] == (("scale",),)
    assert list(groups) == [ROOT, "body.0", "body.2"]


def test_custom_mapping_and_callable() -> None:
    params = params_of(EncoderDecoder())
    by_mapping = group_params(
        params,
        {"enc": ["encoder"], "dec": [("decoder", "0"), "decoder.2.weight", "decoder.2.bias"]},
    )
    by_callable = group_params(params, lambda key: "enc" if key[0] == "encoder" else "dec")
    assert by_mapping == by_callable


def test_bad_groupings_are_errors() -> None:
    params = params_of(EncoderDecoder())
    with pytest.raises(ValueError, match="in no group"):
        group_params(params, {"enc": ["encoder"]})
    with pytest.raises(ValueError, match="in two groups"):
        group_params(params, {"a": ["encoder", "decoder"], "b": ["decoder.0"]})
    with pytest.raises(ValueError, match="no parameter nor module"):
        group_params(params, {"a": ["encoder", "decoder", "nope"]})
    with pytest.raises(ValueError, match="Unknown grouping strategy"):
        group_params(params, "per_block")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="group name"):
        group_params(params, lambda key: None)  # type: ignore[arg-type,return-value]
    with pytest.raises(TypeError, match="strategy"):
        group_params(params, 3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="empty"):
        group_params(TensorDict(), "together")


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("loss_shape", [(M_OUT,), (4, M_OUT)])
def test_group_gramians_sum_to_the_whole_gramian(
    strategy: GroupingStrategy, loss_shape: tuple[int, ...]
) -> None:
    model = EncoderDecoder().to(DEVICE, torch.float64)
    x = torch.randn(4, 5, device=DEVICE, dtype=torch.float64)

    def fn(params: TensorDict, x: Tensor) -> Tensor:
        out = call(model, params, x)
        return out.mean(0) if len(loss_shape) == 1 else out

    jac = jacobian(fn, params_of(model), x)
    per_group = group_gramians(jac, strategy)

    total = sum(per_group[name] for name in group_params(jac, strategy))
    torch.testing.assert_close(total, gramian(jac))
    for name, members in group_params(jac, strategy).items():
        torch.testing.assert_close(per_group[name], gramian(jac.select(*members)))


def test_split_by_group_keeps_batch_size_and_keys() -> None:
    model = EncoderDecoder()
    jac = jacobian(lambda p, x: call(model, p, x).mean(0), params_of(model), torch.randn(4, 5))
    split = split_by_group(jac, "per_network")
    assert split.batch_size == (M_OUT,)
    assert split["decoder"]["decoder", "2", "weight"].shape == (M_OUT, M_OUT, 4)
    assert torch.equal(split["encoder"]["encoder", "0", "bias"], jac["encoder", "0", "bias"])
