"""Hidden states by module name.

Everything here works on an unmodified ``nn.Module`` through forward hooks, so users
name the layers they want (``"encoder.layer.3"``, ``"mlp.4"``) instead of rewriting
their model. Three operations:

* :func:`capture` reads the outputs of named submodules during a forward pass;
* :func:`splice` replaces a submodule's output with a given tensor;
* :func:`run_between` runs the model's own computation from just after layer ``l``
  up to layer ``h`` on a given state (the teacher's *interpretation* step of TD).
"""

from __future__ import annotations

import contextlib
import difflib
import functools
from collections.abc import Callable, Iterable, Iterator, Sequence

import torch
from torch import nn

from talkingmodels.errors import UserError


def module_names(model: nn.Module) -> list[str]:
    """All dotted submodule names of ``model`` (the root excluded)."""
    return [name for name, _ in model.named_modules() if name]


def get_module(model: nn.Module, name: str) -> nn.Module:
    """The submodule called ``name``; a clear error listing the nearest valid names."""
    if name:
        try:
            return model.get_submodule(name)
        except AttributeError:
            pass
    names = module_names(model)
    near = difflib.get_close_matches(name, names, n=5, cutoff=0.3) or names[:5]
    raise UserError(
        f"unknown layer {name!r} in {type(model).__name__}; nearest valid names: {', '.join(near)}"
    )


def _first_tensor(output):
    """Hugging Face layers return tuples whose first item is the hidden state."""
    return output[0] if isinstance(output, (tuple, list)) else output


def prediction(output) -> torch.Tensor:
    """A model's prediction as a tensor: Hugging Face models return an output object with
    ``logits``; tuples carry it first."""
    logits = getattr(output, "logits", None)
    return logits if isinstance(logits, torch.Tensor) else _first_tensor(output)


def _replace_first(output, tensor):
    if isinstance(output, tuple):
        return (tensor, *output[1:])
    if isinstance(output, list):
        return [tensor, *output[1:]]
    return tensor


@contextlib.contextmanager
def capture(model: nn.Module, names: Sequence[str]) -> Iterator[dict[str, torch.Tensor]]:
    """Collect the outputs of the named submodules into a dict while the block runs.

    The stored tensors keep their autograd graph, so losses on them train the model.
    """
    store: dict[str, torch.Tensor] = {}
    handles = []
    try:
        for name in names:
            module = get_module(model, name)

            def hook(_module, _inputs, output, _name=name):
                store[_name] = _first_tensor(output)

            handles.append(module.register_forward_hook(hook))
        yield store
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def collect(model: nn.Module, layers: Sequence[str], batches: Iterable, run: Callable,
            key: str, width: int | None = None) -> dict[str, torch.Tensor]:
    """``model``'s states at ``layers`` while ``run(batch)`` computes the value stored under
    ``key`` (or, where it returns a dict, the values under its names), for every batch of
    ``batches``, concatenated on the CPU (how a frozen teacher's states are cached). Token
    states (n, tokens, dim) are right-padded to ``width`` tokens
    when it is given (batches of sequences may be cut to their longest sentence)."""
    model.eval()
    parts: dict[str, list[torch.Tensor]] = {}
    for batch in batches:
        with capture(model, layers) as states:
            out = run(batch)  # (a dict: several outputs by name)
        outputs = out if isinstance(out, dict) else {key: out}
        for name, value in {**{layer: states[layer] for layer in layers}, **outputs}.items():
            if width is not None and value.dim() == 3:
                value = nn.functional.pad(value, (0, 0, 0, width - value.shape[1]))
            parts.setdefault(name, []).append(value.cpu())
    return {name: torch.cat(values) for name, values in parts.items()}


@contextlib.contextmanager
def splice(model: nn.Module, name: str, state: torch.Tensor) -> Iterator[None]:
    """Within the block, the submodule ``name`` outputs ``state`` instead of its own output."""
    module = get_module(model, name)

    def hook(_module, _inputs, output):
        own = _first_tensor(output)
        if own.shape != state.shape:
            raise UserError(
                f"shape mismatch at layer {name!r}: the model computes {tuple(own.shape)}, "
                f"the spliced state is {tuple(state.shape)}"
            )
        return _replace_first(output, state)

    handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


class _ReachedEnd(Exception):
    """Raised from a hook to skip the work after layer ``h``."""


def _sequential_path(model: nn.Module, low: str, high: str) -> list[nn.Module] | None:
    """The modules strictly after ``low`` up to ``high`` when both are children of one
    ``nn.Sequential`` (or ``nn.ModuleList`` run in order), else None."""
    low_parent, _, low_index = low.rpartition(".")
    high_parent, _, high_index = high.rpartition(".")
    if low_parent != high_parent or not (low_index.isdigit() and high_index.isdigit()):
        return None
    parent = model.get_submodule(low_parent) if low_parent else model
    if not isinstance(parent, nn.Sequential):
        return None
    if int(low_index) >= int(high_index):
        raise UserError(f"layer {low!r} must run before layer {high!r} (l before h)")
    # (a list of the children, not parent[a:b]: slicing builds a new Sequential per call)
    return list(parent)[int(low_index) + 1 : int(high_index) + 1]


def _decoder_stack(model: nn.Module, low: str, high: str | None) -> Callable | None:
    """The fast path between two layers ``PREFIX.layers.i`` and ``PREFIX.layers.j`` of a
    Hugging Face decoder stack (Llama, Qwen2, Mistral and the models built like them: the
    module at ``PREFIX`` holds ``layers``, ``rotary_emb`` and ``config``), or from layer ``i``
    to the logits (``high`` None; the stack's final ``norm`` and the model's ``lm_head``):
    a function of (state, *inputs, **kwargs) that runs only layers i+1..j, with the rotary
    position embeddings and the causal (or sliding-window) mask the model itself would
    build from the batch's ``attention_mask`` and ``position_ids``. None where it does not
    apply (the generic path then runs)."""
    prefix, _, low_index = low.rpartition(".layers.")
    if not low_index.isdigit():
        return None
    try:
        stack = model.get_submodule(prefix) if prefix else model
    except AttributeError:
        return None
    if not all(hasattr(stack, a) for a in ("layers", "rotary_emb", "config")):
        return None
    first = int(low_index) + 1
    if high is None:
        head = getattr(model, "lm_head", None)
        if head is None or not prefix or not hasattr(stack, "norm"):
            return None
        last = len(stack.layers) - 1
    else:
        high_prefix, _, high_index = high.rpartition(".layers.")
        if high_prefix != prefix or not high_index.isdigit():
            return None
        last = int(high_index)
        if last < first:
            raise UserError(f"layer {low!r} must run before layer {high!r} (l before h)")

    def run(state: torch.Tensor, *_inputs, attention_mask=None, position_ids=None, **_kwargs):
        from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

        config = stack.config
        if position_ids is None:
            position_ids = torch.arange(state.shape[1], device=state.device)[None]
        masks = {}

        def mask_of(kind: str):
            if kind not in masks:
                build = (create_sliding_window_causal_mask if kind == "sliding_attention"
                         else create_causal_mask)
                masks[kind] = build(config=config, inputs_embeds=state, attention_mask=attention_mask,
                                    cache=None, position_ids=position_ids)
            return masks[kind]

        types = getattr(config, "layer_types", None)
        sliding = getattr(config, "sliding_window", None) is not None and types is None and \
            getattr(config, "use_sliding_window", True)
        embeddings = stack.rotary_emb(state, position_ids=position_ids)
        for index in range(first, last + 1):
            kind = types[index] if types else ("sliding_attention" if sliding else "full_attention")
            state = _first_tensor(stack.layers[index](state, attention_mask=mask_of(kind),
                                                      position_embeddings=embeddings,
                                                      position_ids=position_ids))
        if high is None:
            state = model.lm_head(stack.norm(state))
        return state

    return run


def state_at(model: nn.Module, layer: str, *inputs, **kwargs) -> torch.Tensor:
    """The output of ``layer`` in a forward pass of ``model`` on ``inputs``, the work after
    it skipped (a 30-layer LLM's state at its 14th layer costs 14 layers, not 30 and its head)."""
    found: dict[str, torch.Tensor] = {}

    def stop(_module, _inputs, output):
        found["state"] = _first_tensor(output)
        raise _ReachedEnd

    handle = get_module(model, layer).register_forward_hook(stop)
    try:
        model(*inputs, **kwargs)
    except _ReachedEnd:
        return found["state"]
    finally:
        handle.remove()
    raise UserError(f"layer {layer!r} is not called in the forward pass of {type(model).__name__}")


def states_until(model: nn.Module, names: Sequence[str], run: Callable[[], object]
                 ) -> dict[str, torch.Tensor]:
    """The outputs of the named submodules in the forward pass ``run()`` makes of ``model``,
    the work after the last of them skipped (its head too: a 30-layer LLM's states at its
    layers 2 and 6 cost 6 layers, not 30 and a 49,152-word projection)."""
    wanted, found = set(names), {}

    def hook(_module, _inputs, output, _name):
        found[_name] = _first_tensor(output)
        if wanted <= found.keys():
            raise _ReachedEnd

    handles = [get_module(model, name).register_forward_hook(functools.partial(hook, _name=name))
               for name in wanted]
    try:
        run()
    except _ReachedEnd:
        return found
    finally:
        for handle in handles:
            handle.remove()
    missing = sorted(wanted - found.keys())
    raise UserError(f"layer {missing[0]!r} is not called in the forward pass of {type(model).__name__}")


def check_order(model: nn.Module, low: str, high: str, *inputs, **kwargs) -> None:
    """Raise a UserError unless ``low`` runs before ``high`` in the forward pass."""
    order: list[str] = []
    handles = [
        get_module(model, name).register_forward_hook(lambda *_a, _n=name: order.append(_n))
        for name in (low, high)
    ]
    try:
        with torch.no_grad():
            model(*inputs, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    for name in (low, high):
        if name not in order:
            raise UserError(f"layer {name!r} is not called in the forward pass of {type(model).__name__}")
    if order.index(low) >= order.index(high):
        raise UserError(f"layer {low!r} must run before layer {high!r} (l before h)")


def run_between(
    model: nn.Module,
    low: str,
    high: str | None,
    state: torch.Tensor,
    *inputs,
    fast: bool = True,
    **kwargs,
) -> torch.Tensor:
    """The model's own computation from just after layer ``low`` up to layer ``high``,
    applied to ``state`` (the output ``low`` would have produced).

    ``high=None`` runs to the model's output. ``inputs``/``kwargs`` are the model's usual
    forward arguments; the generic path needs them because the layers after ``low`` may
    read more than ``low``'s output (residual streams, attention masks). It splices
    ``state`` in at ``low`` and stops the forward pass as soon as ``high`` has run.
    Fast paths run only the modules in between: when both layers are children of one
    ``nn.Sequential`` (``inputs`` are then not needed), or when the model has a method
    ``run_between(low, high, state, *inputs)`` of its own that returns the state (or None
    for a pair it does not handle): a model whose layers need more than the previous
    layer's output (a transformer's attention mask) can provide one. Gradients flow into
    ``state``.
    """
    get_module(model, low)
    if high is not None:
        get_module(model, high)
    if fast and high is None and (decoder := _decoder_stack(model, low, None)) is not None:
        return decoder(state, *inputs, **kwargs)
    if fast and high is not None:
        path = _sequential_path(model, low, high)
        if path is not None:
            for module in path:
                state = module(state)
            return state
        own = getattr(model, "run_between", None)  # (first: the model knows its inputs best)
        if callable(own):
            result = own(low, high, state, *inputs, **kwargs)
            if result is not None:
                return result
        decoder = _decoder_stack(model, low, high)
        if decoder is not None:
            return decoder(state, *inputs, **kwargs)
    result: dict[str, torch.Tensor] = {}
    handle = None
    if high is not None:
        def stop(_module, _inputs, output):
            result["state"] = _first_tensor(output)
            raise _ReachedEnd

        handle = get_module(model, high).register_forward_hook(stop)
    try:
        with splice(model, low, state):
            output = model(*inputs, **kwargs)
        return prediction(output)
    except _ReachedEnd:
        return result["state"]
    finally:
        if handle is not None:
            handle.remove()
