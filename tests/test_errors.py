"""Bad input gets a clear TypeError or ValueError."""

import pytest
import torch
from tensordict import TensorDict
from torch import Tensor, nn

from torchjd_func import (
    call,
    combine,
    flatten_gramian,
    gramian,
    jacobian,
    mtl_jacobian,
    params_of,
    per_sample_jacobian,
    reshape_weights,
    value_and_jacobian,
)

MODEL = nn.Linear(3, 2)
X = torch.randn(4, 3)


def _losses(params: TensorDict, x: Tensor) -> Tensor:
    return call(MODEL, params, x).pow(2).mean(0)


def test_non_tensor_output() -> None:
    with pytest.raises(TypeError, match="must return a Tensor of losses"):
        jacobian(lambda p, x: [_losses(p, x)], params_of(MODEL), X)  # type: ignore[arg-type,return-value]


def test_integer_output() -> None:
    with pytest.raises(TypeError, match="floating-point losses"):
        jacobian(lambda p, x: _losses(p, x).long(), params_of(MODEL), X)


def test_loss_that_does_not_depend_on_params() -> None:
    with pytest.raises(ValueError, match="do not depend on the parameters"):
        jacobian(lambda p, x: x.pow(2).sum(0), params_of(MODEL), X)
    with pytest.raises(ValueError, match="do not depend on the parameters"):
        jacobian(lambda p, x: _losses(p, x).detach(), params_of(MODEL), X)


def test_empty_losses() -> None:
    with pytest.raises(ValueError, match="empty tensor"):
        jacobian(lambda p, x: _losses(p, x)[:0], params_of(MODEL), X)


def test_has_aux_needs_a_pair() -> None:
    with pytest.raises(TypeError, match="pair"):
        value_and_jacobian(_losses, params_of(MODEL), X, has_aux=True)


def test_bad_params() -> None:
    with pytest.raises(TypeError, match="must be a TensorDict"):
        jacobian(_losses, dict(MODEL.named_parameters()), X)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="empty"):
        jacobian(_losses, TensorDict(), X)
    with pytest.raises(TypeError, match="floating-point"):
        jacobian(_losses, TensorDict({"weight": torch.ones(2, 3, dtype=torch.long)}), X)


def test_params_on_several_devices() -> None:
    params = TensorDict({"weight": torch.ones(2, 3), "bias": torch.ones(2, device="meta")})
    with pytest.raises(ValueError, match="several devices"):
        jacobian(_losses, params, X)


def test_params_that_the_module_does_not_have() -> None:
    with pytest.raises(ValueError, match="no parameter or buffer named"):
        call(MODEL, TensorDict({"weights": torch.ones(2, 3)}), X)


def test_module_tensors_and_inputs_on_another_device() -> None:
    """``meta`` stands in for a second device (the suite also runs without a GPU)."""
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)).eval()
    params = params_of(model)  # on the CPU
    model.to("meta")  # e.g. the model moved after params_of: its running statistics follow it
    with pytest.raises(
        ValueError, match=r"buffer '1\.running_mean' is on meta.*module\.to\('cpu'\)"
    ):
        call(model, params, X)
    frozen = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    frozen[0].requires_grad_(False)
    params = params_of(frozen)
    frozen[0].to("meta")
    with pytest.raises(ValueError, match=r"parameter '0\.weight' is on meta"):
        call(frozen, params, X)
    with pytest.raises(ValueError, match="Input 0 of Linear is on meta"):
        call(MODEL, params_of(MODEL), X.to("meta"))
    with pytest.raises(ValueError, match="Keyword input 'input' of Linear is on meta"):
        call(MODEL, params_of(MODEL), input=X.to("meta"))
    assert call(MODEL, params_of(MODEL), input=X).shape == (4, 2)
    # Zero-dim tensors may live on another device, as in torch itself, and so may integer inputs
    # (pack_padded_sequence wants its lengths on the CPU).
    assert call(MODEL, params_of(MODEL), X * torch.tensor(2.0)).shape == (4, 2)
    lengths_elsewhere = torch.tensor([3, 2], device="meta")
    assert call(WithLengths(), params_of(WithLengths()), X, lengths_elsewhere).shape == (4, 2)


class WithLengths(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(3, 2)

    def forward(self, x: Tensor, lengths: Tensor) -> Tensor:
        return self.linear(x) + 0 * lengths.shape[0]


@pytest.mark.parametrize("chunk_size", [0, -1, 1.5, True])
def test_bad_chunk_size(chunk_size: object) -> None:
    with pytest.raises(ValueError, match="chunk_size"):
        jacobian(_losses, params_of(MODEL), X, chunk_size=chunk_size)  # type: ignore[arg-type]


def test_per_sample_inputs_with_different_batch_sizes() -> None:
    def sample_loss(p: TensorDict, x: Tensor, y: Tensor) -> Tensor:
        return (call(MODEL, p, x) - y).pow(2).sum()

    with pytest.raises(ValueError, match="disagree on the batch size"):
        per_sample_jacobian(sample_loss, params_of(MODEL), X, torch.randn(5, 2))
    with pytest.raises(ValueError, match="empty"):
        per_sample_jacobian(sample_loss, params_of(MODEL), X[:0], torch.randn(0, 2))
    with pytest.raises(ValueError, match="in_dims"):
        per_sample_jacobian(sample_loss, params_of(MODEL), X, X, in_dims=(0,))
    with pytest.raises(ValueError, match="at least one"):
        per_sample_jacobian(sample_loss, params_of(MODEL), X, X, in_dims=(None, None))
    with pytest.raises(ValueError, match="no dimension"):
        per_sample_jacobian(sample_loss, params_of(MODEL), X, X, in_dims=(0, 2))
    with pytest.raises(TypeError, match="not a Tensor"):
        per_sample_jacobian(sample_loss, params_of(MODEL), X, 3.0)
    with pytest.raises(ValueError, match="at least one batched input"):
        per_sample_jacobian(sample_loss, params_of(MODEL))


def test_mtl_errors() -> None:
    trunk, head = nn.Linear(3, 4), nn.Linear(4, 1)

    def heads_fn(p: TensorDict, f: Tensor) -> Tensor:
        return call(head, p, f).mean()

    def trunk_fn(p: TensorDict, x: Tensor) -> Tensor:
        return call(trunk, p, x)

    with pytest.raises(ValueError, match="does not depend on `shared_params`"):
        mtl_jacobian(lambda p, x: x, heads_fn, params_of(trunk), params_of(head), (X,))
    with pytest.raises(TypeError, match="Tensor or a non-empty tuple"):
        mtl_jacobian(lambda p, x: [], heads_fn, params_of(trunk), params_of(head), (X,))
    with pytest.raises(ValueError, match="scalar Tensor"):
        mtl_jacobian(
            trunk_fn, [lambda p, f: call(head, p, f)], params_of(trunk), params_of(head), (X,)
        )
    with pytest.raises(ValueError, match="empty sequence"):
        mtl_jacobian(trunk_fn, [], params_of(trunk), params_of(head), (X,))
    with pytest.raises(TypeError, match="head_params"):
        mtl_jacobian(trunk_fn, heads_fn, params_of(trunk), None, (X,))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="do not depend on the parameters"):
        mtl_jacobian(
            trunk_fn, lambda p, f: f.detach().sum(), params_of(trunk), params_of(head), (X,)
        )


def test_gramian_and_combine_errors() -> None:
    jac = TensorDict({"w": torch.randn(3, 2)}, batch_size=[3])
    with pytest.raises(TypeError, match="Jacobian TensorDict"):
        gramian(torch.randn(3, 2))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="empty"):
        gramian(TensorDict(batch_size=[3]))
    with pytest.raises(ValueError, match="shape of the losses"):
        combine(jac, torch.ones(2))
    with pytest.raises(TypeError, match="Tensor"):
        combine(jac, [1.0, 1.0, 1.0])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="on meta"):
        combine(jac, torch.ones(3, device="meta"))
    with pytest.raises(ValueError, match="even number of dims"):
        flatten_gramian(torch.ones(3, 3, 3))
    with pytest.raises(ValueError, match="reversed"):
        flatten_gramian(torch.ones(2, 3, 2, 3))
    with pytest.raises(ValueError, match="Expected weights of shape"):
        reshape_weights(torch.ones(5), [2, 3])


def test_params_of_and_call_errors() -> None:
    with pytest.raises(TypeError, match=r"nn\.Module"):
        params_of(lambda x: x)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="no trainable parameter"):
        params_of(nn.ReLU())
    frozen = nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameter"):
        params_of(frozen)
    assert len(list(params_of(frozen, trainable_only=False).keys())) == 2
    with pytest.raises(TypeError, match="TensorDict"):
        call(MODEL, {"weight": torch.ones(2, 3)}, X)  # type: ignore[arg-type]


def test_scalar_parameter_and_scalar_loss() -> None:
    scale = torch.tensor(2.0)
    jac = jacobian(lambda p, x: (p["s"] * x).sum(), TensorDict({"s": scale}), X)
    assert jac["s"].shape == ()
    torch.testing.assert_close(jac["s"], X.sum())
