"""Reading, splicing and re-running hidden states by module name (talkingmodels.taps)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from talkingmodels import UserError, taps
from talkingmodels.tasks.movielens import RecMLP


@pytest.fixture
def rec():
    """A RecMLP with three hidden layers: mlp = L0 R1 D2 L3 R4 D5 L6 R7 D8, then the head."""
    torch.manual_seed(0)
    model = RecMLP(n_users=7, n_items=9, embedding=3, hidden=[8, 6, 5], dropout=0.3, mean=3.0)
    return model.eval()  # dropout off: the plain forward is deterministic


@pytest.fixture
def rec_inputs():
    return torch.tensor([0, 3, 6, 2]), torch.tensor([1, 8, 0, 4])


class Residual(nn.Module):
    """Not sequential: ``c(b(relu(a(x))) + a(x))``; ``b``'s input alone does not determine ``c``'s."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(3, 4)
        self.b = nn.Linear(4, 4)
        self.c = nn.Linear(4, 2)

    def forward(self, x):
        h = self.a(x)
        return self.c(self.b(torch.relu(h)) + h)


@pytest.fixture
def residual():
    torch.manual_seed(1)
    return Residual()


# ------------------------------------------------------------------------------ capture
def test_capture_reads_named_outputs(rec, rec_inputs):
    users, items = rec_inputs
    with taps.capture(rec, ["mlp.1", "mlp.4", "head"]) as states:
        output = rec(users, items)
    # recompute the same states by hand from the model's own modules
    x = torch.cat([rec.users(users), rec.items(items)], dim=-1)
    h1 = torch.relu(rec.mlp[0](x))
    h4 = torch.relu(rec.mlp[3](h1))
    assert set(states) == {"mlp.1", "mlp.4", "head"}
    assert torch.allclose(states["mlp.1"], h1)
    assert torch.allclose(states["mlp.4"], h4)
    assert states["head"].shape == (4, 1)
    assert torch.allclose(states["head"].squeeze(-1) + 3.0, output)


def test_capture_keeps_the_graph_and_removes_its_hooks(rec, rec_inputs):
    with taps.capture(rec, ["mlp.4"]) as states:
        rec(*rec_inputs)
    states["mlp.4"].sum().backward()
    assert rec.mlp[0].weight.grad is not None and rec.mlp[0].weight.grad.abs().sum() > 0
    assert all(not m._forward_hooks for m in rec.modules())


def test_capture_first_item_of_tuple_outputs():
    class Pair(nn.Module):
        def forward(self, x):
            return x * 2, "extra"

    class Outer(nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = Pair()

        def forward(self, x):
            return self.layer(x)[0] + 1

    model = Outer()
    with taps.capture(model, ["layer"]) as states:
        output = model(torch.tensor([1.0, 2.0]))
    assert torch.equal(states["layer"], torch.tensor([2.0, 4.0]))
    assert torch.equal(output, torch.tensor([3.0, 5.0]))


def test_unknown_layer_lists_nearest_names(rec):
    with pytest.raises(UserError) as info:
        with taps.capture(rec, ["mlp.1", "mpl.4"]):
            pass
    message = str(info.value)
    assert "'mpl.4'" in message
    assert "mlp.4" in message  # the nearest valid name is suggested
    assert "\n" not in message
    assert all(not m._forward_hooks for m in rec.modules())  # the hook set before is removed


@pytest.mark.parametrize("name", ["", "encoder.layer.3"])
def test_unknown_layer_names_valid_ones(rec, name):
    with pytest.raises(UserError, match="nearest valid names: .*(mlp|users|items|head)"):
        taps.get_module(rec, name)


# ------------------------------------------------------------------------------ splice
def test_splice_replaces_the_output(rec, rec_inputs):
    users, items = rec_inputs
    zeros = torch.zeros(4, 5)
    with taps.splice(rec, "mlp.7", zeros):
        output = rec(users, items)
    # relu -> dropout(eval) -> head: the head sees zeros and outputs its bias + mean
    assert torch.allclose(output, rec.head.bias.expand(4) + 3.0)
    assert not rec.mlp[7]._forward_hooks
    assert not torch.allclose(rec(users, items), output)  # the splice ended with the block


def test_splice_shape_mismatch_is_a_user_error(rec, rec_inputs):
    with pytest.raises(UserError, match=r"mlp\.7.*\(4, 5\).*\(4, 6\)"):
        with taps.splice(rec, "mlp.7", torch.zeros(4, 6)):
            rec(*rec_inputs)
    assert not rec.mlp[7]._forward_hooks


# ------------------------------------------------------------------------------ run_between
def own_states(model, inputs, names):
    with torch.no_grad(), taps.capture(model, names) as states:
        output = model(*inputs)
    return states, output


def test_run_between_sequential_fast_path_equals_forward(rec, rec_inputs):
    states, _ = own_states(rec, rec_inputs, ["mlp.1", "mlp.7"])
    assert taps._sequential_path(rec, "mlp.1", "mlp.7") is not None
    # the fast path needs no model inputs
    result = taps.run_between(rec, "mlp.1", "mlp.7", states["mlp.1"])
    assert torch.allclose(result, states["mlp.7"], atol=1e-6)


def test_run_between_generic_path_equals_forward(rec, rec_inputs):
    states, output = own_states(rec, rec_inputs, ["mlp.1", "mlp.7"])
    result = taps.run_between(rec, "mlp.1", "mlp.7", states["mlp.1"], *rec_inputs, fast=False)
    assert torch.allclose(result, states["mlp.7"], atol=1e-6)
    to_output = taps.run_between(rec, "mlp.1", None, states["mlp.1"], *rec_inputs)
    assert torch.allclose(to_output, output, atol=1e-6)
    assert all(not m._forward_hooks for m in rec.modules())


def test_run_between_fast_and_generic_paths_agree_on_any_state(rec, rec_inputs):
    state = torch.randn(4, 8, generator=torch.Generator().manual_seed(5))
    fast = taps.run_between(rec, "mlp.1", "mlp.7", state)
    generic = taps.run_between(rec, "mlp.1", "mlp.7", state, *rec_inputs, fast=False)
    assert torch.allclose(fast, generic, atol=1e-6)
    states, _ = own_states(rec, rec_inputs, ["mlp.7"])
    assert not torch.allclose(fast, states["mlp.7"])  # the state was used, not the inputs


def test_run_between_residual_model_uses_the_generic_path(residual):
    x = torch.randn(5, 3, generator=torch.Generator().manual_seed(2))
    assert taps._sequential_path(residual, "a", "c") is None
    states, output = own_states(residual, (x,), ["a", "c"])
    for fast in (True, False):  # fast=True must fall back to the generic path here
        result = taps.run_between(residual, "a", "c", states["a"], x, fast=fast)
        assert torch.allclose(result, states["c"], atol=1e-6)
        assert torch.allclose(taps.run_between(residual, "a", None, states["a"], x, fast=fast),
                              output, atol=1e-6)
    # a foreign state feeds both branches of the residual: c(b(relu(s)) + s)
    s = torch.randn(5, 4, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = residual.c(residual.b(torch.relu(s)) + s)
    assert torch.allclose(taps.run_between(residual, "a", "c", s, x), expected, atol=1e-6)


def test_run_between_stops_after_high(residual):
    x = torch.randn(2, 3)
    called = []
    residual.c.register_forward_hook(lambda *_: called.append("c"))
    s = torch.randn(2, 4)
    result = taps.run_between(residual, "a", "b", s, x)
    assert torch.allclose(result, residual.b(torch.relu(s)))
    assert called == []  # nothing after "b" ran


@pytest.mark.parametrize("fast", [True, False])
def test_gradients_flow_into_the_spliced_state(rec, rec_inputs, fast):
    state = torch.rand(4, 8, requires_grad=True)
    taps.run_between(rec, "mlp.1", "mlp.7", state, *rec_inputs, fast=fast).sum().backward()
    assert state.grad is not None and state.grad.abs().sum() > 0


def test_gradients_flow_into_the_spliced_state_residual(residual):
    state = torch.rand(3, 4, requires_grad=True)
    taps.run_between(residual, "a", "c", state, torch.randn(3, 3)).sum().backward()
    assert state.grad is not None and state.grad.abs().sum() > 0


def test_run_between_fast_path_rejects_unknown_layers(rec):
    with pytest.raises(UserError, match="mlp.99"):
        taps.run_between(rec, "mlp.1", "mlp.99", torch.zeros(4, 8))


# ------------------------------------------------------------------------------ check_order
def test_check_order(rec, rec_inputs, residual):
    taps.check_order(rec, "mlp.1", "mlp.7", *rec_inputs)  # fine
    with pytest.raises(UserError, match=r"'mlp\.7' must run before layer 'mlp\.1'"):
        taps.check_order(rec, "mlp.7", "mlp.1", *rec_inputs)
    with pytest.raises(UserError, match="must run before"):
        taps.check_order(rec, "mlp.4", "mlp.4", *rec_inputs)
    with pytest.raises(UserError, match="'c' must run before layer 'a'"):
        taps.check_order(residual, "c", "a", torch.randn(2, 3))
    assert all(not m._forward_hooks for m in rec.modules())


def test_check_order_layer_not_called(residual):
    residual.unused = nn.Linear(2, 2)  # registered, never called by forward
    with pytest.raises(UserError, match="'unused' is not called"):
        taps.check_order(residual, "a", "unused", torch.randn(1, 3))
    with pytest.raises(UserError, match="unknown layer 'nope'"):
        taps.check_order(residual, "a", "nope", torch.randn(1, 3))
