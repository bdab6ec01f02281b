"""The plumbing every op family shares, written once: an op family declares its forward and
backward as plain annotated functions, and :func:`define_lora_op` (or :func:`define_op`)
builds the rest from them.

An op takes ``(x, weight, bias, lora_A, lora_B, *rest)`` (the differentiable tensors first)
and returns ``(y, S, ...)``. It runs by one of two routes, with the same forward and backward:

- eager: a plain ``torch.autograd.Function`` (about 10 µs of host time), or the forward alone
  when nothing needs a gradient (or when the forward's own torch ops record the same backward:
  the torch backend without dropout, see ``lora_linear``);
- ``torch.compile`` / ``torch.export``: the ``torch.library`` custom-op pair (forward,
  backward), opaque to the tracer (zero graph breaks), with fake kernels (about 20-35 µs
  a call eagerly, which is why eager calls do not use them).

Both routes compute bit-identical results (tests/ops/test_eager_path.py). What the backward reads
is named by the backward's own parameters: each is a forward input or a forward output of that
name (``shrink`` is S); tensors are kept with ``save_for_backward``, other values on ``ctx``.
The ops' schemas are inferred from the annotations of the functions they run.

Each family keeps its own hot entry point (``lora_linear.lora_linear`` and
``lora_linear_layer_call``, ``multi_lora.apply_multi_lora``), which picks the route with the
fewest host steps; :meth:`LoRAOp.run` is the plain route choice for the others.
"""
from __future__ import annotations

import inspect
import operator
import typing
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

from .._compat import direct_apply, functorch_transforms_active, unwrap_if_dead
from ..dispatch import strategies

#: The differentiable inputs every op starts with: x, weight, bias, lora_A, lora_B.
N_DIFFERENTIABLE = 5
#: The names of a LoRA op's outputs: y, then the saved shrink S = drop(x) Aᵀ.
LORA_OUTPUTS = ("y", "shrink")

LoRAGrads = Callable[[bool, bool], tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]]

_is_compiling = torch.compiler.is_compiling


def records_autograd(x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_A: Tensor, lora_B: Tensor) -> bool:
    """Whether a call must record a backward: grad mode on and a differentiable input requires grad."""
    return torch.is_grad_enabled() and (x.requires_grad or lora_A.requires_grad or lora_B.requires_grad
                                        or weight.requires_grad or (bias is not None and bias.requires_grad))


def needs_autograd(inputs: Sequence) -> bool:
    """:func:`records_autograd` of an op's inputs (the differentiable tensors first)."""
    x, weight, bias, lora_A, lora_B = inputs[:N_DIFFERENTIABLE]  # unrolled: a generator costs ~1 µs
    return records_autograd(x, weight, bias, lora_A, lora_B)


_direct_apply: dict = {}


def apply_function(function: type[torch.autograd.Function], inputs: tuple) -> Tensor:
    """``function.apply(*inputs)`` for an op's Function (eight inputs, five differentiable first),
    less its Python wrapper.

    ``Function.apply`` (Python) checks for functorch transforms, unwraps tensors left from a
    finished transform (``unwrap_if_dead``) and calls the C++ ``_FunctionBase.apply``; its
    generic argument handling costs about 5 µs a call. Here: the same steps for our
    argument layout, the wrapper itself under a transform (``lora_fused._compat`` holds the
    private calls and their public fallbacks)."""
    if functorch_transforms_active():
        return function.apply(*inputs)
    apply = _direct_apply.get(function)
    if apply is None:
        apply = _direct_apply[function] = direct_apply(function)
    # Only the differentiable inputs: a dead wrapper elsewhere is unwrapped by the ops that read it.
    # Unrolled for the ops' eight inputs: a comprehension or slices cost 2-4 µs more.
    x, weight, bias, lora_A, lora_B, rest0, rest1, rest2 = inputs
    return apply(unwrap_if_dead(x), unwrap_if_dead(weight), bias if bias is None else unwrap_if_dead(bias),
                 unwrap_if_dead(lora_A), unwrap_if_dead(lora_B), rest0, rest1, rest2)


def input_grads(needs_input_grad: Sequence[bool], grad_y: Tensor, x: Tensor, lora_grads: LoRAGrads) -> tuple:
    """Gradients for all of an op's inputs: (dX, dW0, db, dA, dB) then None for each other input.

    ``lora_grads(need_dx, need_dlora)`` gives (dX, dA, dB). dW0 = dYᵀ x and db = Σ dY only
    when the base weight or bias itself is trained."""
    need_x, need_w, need_bias, need_a, need_b = needs_input_grad[:N_DIFFERENTIABLE]
    grad_x = grad_w = grad_bias = grad_a = grad_b = None
    if need_x or need_a or need_b:
        dx, da, db = lora_grads(need_x, need_a or need_b)
        grad_x = dx if need_x else None
        grad_a = da if need_a else None
        grad_b = db if need_b else None
    if need_w:
        grad_w = grad_y.t() @ x
    if need_bias:
        grad_bias = grad_y.sum(0)
    others = (None,) * (len(needs_input_grad) - N_DIFFERENTIABLE)
    return (grad_x, grad_w, grad_bias, grad_a, grad_b) + others


def as_op_outputs(grads: Sequence[Optional[Tensor]], like: Tensor) -> tuple[Tensor, ...]:
    """A custom op returns tensors: an unneeded gradient (None) becomes an empty tensor."""
    return tuple(g if g is not None else like.new_empty(0) for g in grads)


def fake_grads(grad_y: Tensor, x: Tensor, lora_A: Tensor, lora_B: Tensor, need_dx: bool,
               need_dlora: bool) -> tuple[Tensor, Tensor, Tensor]:
    """The fake kernel of a LoRA backward op: (dX, dA, dB) shaped like their inputs, or empty."""
    empty = grad_y.new_empty(0)
    return (x.new_empty(x.shape) if need_dx else empty,
            lora_A.new_empty(lora_A.shape) if need_dlora else empty,
            lora_B.new_empty(lora_B.shape) if need_dlora else empty)


def fake_grads_like(grad_y: Tensor, likes: Sequence[Tensor], needs: Sequence[bool]) -> list[Tensor]:
    """The fake kernel of a :func:`define_op` backward: each gradient shaped like its input in
    ``likes``, or empty where ``needs`` says not needed."""
    return [t.new_empty(t.shape) if need else grad_y.new_empty(0) for t, need in zip(likes, needs)]


# --------------------------------------------------------------------------
# Registration
# --------------------------------------------------------------------------
def op_schema(fn: Callable, returns=None, mutates_args: Sequence[str] = ()) -> str:
    """The custom-op schema of ``fn``'s annotated parameters, returning ``returns`` (default:
    ``fn``'s own return annotation)."""
    hints = typing.get_type_hints(fn)  # string annotations evaluated in fn's own module
    params = [p.replace(annotation=hints[p.name]) for p in inspect.signature(fn).parameters.values()]

    if returns is None:
        returns = hints["return"]
        returns = None if returns is type(None) else returns  # get_type_hints turns "-> None" into NoneType

    def prototype():
        pass
    prototype.__signature__ = inspect.Signature(params, return_annotation=returns)
    return torch.library.infer_schema(prototype, mutates_args=mutates_args)


def define_custom_op(name: str, impl: Callable, fake: Callable, *, schema_of: Optional[Callable] = None,
                     returns=None, mutates_args: Sequence[str] = ()):
    """The ``torch.library`` custom op ``name`` ("namespace::op") running ``impl``, with its fake
    kernel; its schema from the annotations of ``schema_of`` (default ``impl``). Returns the op as
    ``torch.ops.namespace.op`` (what compiled graphs call). For an inference op (one op, no
    autograd) this is all of the scaffold it needs (``delta.add_lora``)."""
    schema = op_schema(schema_of or impl, returns, mutates_args)
    torch.library.custom_op(name, impl, mutates_args=mutates_args, schema=schema).register_fake(fake)
    namespace, op_name = name.split("::")
    return getattr(getattr(torch.ops, namespace), op_name)


def _tuple_getter(indices: Sequence[int]) -> Callable[[tuple], tuple]:
    """``values -> tuple(values[i] for i in indices)`` as one C call (``itemgetter``; a slice for
    none or one index, where ``itemgetter(i)`` would not give a tuple)."""
    if len(indices) <= 1:
        return operator.itemgetter(slice(indices[0], indices[0] + 1) if indices else slice(0, 0))
    return operator.itemgetter(*indices)


def _is_tensor_type(hint) -> bool:
    return hint is Tensor or hint == Optional[Tensor]


class SavedForBackward:
    """What a backward reads, and how a forward keeps it: the backward's parameters between
    ``grad_y`` and its ``n_flags`` flags, each a forward input or output of that name.

    ``save(ctx, values)`` (values: the inputs, then the outputs) keeps the tensors with
    ``save_for_backward`` and the other values (and the names in ``on_ctx``) on ``ctx``;
    ``arrange(ctx.saved_values + ctx.saved_tensors)`` gives them back in the backward's order.
    Both are ``itemgetter`` calls, no Python loop per call. ``guard`` ("input", "attribute"): the
    tensor ``input.attribute`` is saved as well, only so that autograd refuses a backward after it
    changed in place (a plan's packed buffer)."""

    def __init__(self, forward: Callable, outputs: Sequence[str], backward: Callable, n_flags: int, *,
                 guard: Optional[tuple[str, str]] = None, on_ctx: Sequence[str] = ()):
        hints = typing.get_type_hints(forward)
        inputs = list(inspect.signature(forward).parameters)
        params = list(inspect.signature(backward).parameters)
        names = params[1:len(params) - n_flags]
        sources = {name: i for i, name in enumerate(inputs + list(outputs))}
        missing = [name for name in names if name not in sources]
        if missing:
            raise TypeError(f"the backward {backward.__name__} reads {missing}, which are neither inputs of "
                            f"{forward.__name__} {inputs} nor its outputs {list(outputs)}")
        tensors = [n for n in names if n not in on_ctx and (n in outputs or _is_tensor_type(hints.get(n)))]
        others = [n for n in names if n not in tensors]
        kept, kept_others = _tuple_getter([sources[n] for n in tensors]), _tuple_getter([sources[n] for n in others])
        # Each backward argument's place in (ctx.saved_values + ctx.saved_tensors); guards trail, unread.
        stored = others + tensors
        self.arrange = _tuple_getter([stored.index(n) for n in names])
        self.names = tuple(names)

        if guard is None:
            def save(ctx, values: tuple) -> None:
                ctx.save_for_backward(*kept(values))
                ctx.saved_values = kept_others(values)
        else:
            guarded, guard_of = sources[guard[0]], operator.attrgetter(guard[1])

            def save(ctx, values: tuple) -> None:
                ctx.save_for_backward(*kept(values), guard_of(values[guarded]))
                ctx.saved_values = kept_others(values)
        self.save = save

    def index(self, name: str) -> int:
        """Where ``name`` sits among the backward's saved arguments."""
        return self.names.index(name)


class LoRAOp:
    """One op family, defined once (:func:`define_lora_op`, :func:`define_op`).

    ``fwd`` / ``bwd``: the custom ops (compiled route; None for an op without them);
    ``function``: the eager ``autograd.Function`` (None for a pair only compiled graphs call);
    ``forward`` / ``grads``: the eager functions they run (``forward(*inputs)`` is the op
    without autograd)."""

    def __init__(self, fwd, bwd, function: type[torch.autograd.Function], forward: Callable,
                 grads: Callable, n_differentiable: int):
        self.fwd, self.bwd, self.function = fwd, bwd, function
        self.forward, self.grads = forward, grads
        self.n_differentiable = n_differentiable

    def run(self, inputs: tuple) -> Tensor:
        """y by the route the context needs: compiling, the custom op; eager, the Function when
        autograd must record (grad mode on and a differentiable input requires grad), else the
        forward alone."""
        if self.fwd is not None and _is_compiling():
            return self.fwd(*inputs)[0]
        if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in inputs[:self.n_differentiable]):
            return self.function.apply(*inputs)
        return self.forward(*inputs)[0]


def _keeping_strategy(backward: Callable) -> Callable:
    """``backward(ctx, grad_y)`` under the backward strategy forced around the forward
    (``lf.use_strategy``): autograd may run the backward in another thread, where the forward's
    ContextVar value is not visible. The forward records it as ``ctx.backward_strategy``."""
    def run_backward(ctx, grad_y):
        if ctx.backward_strategy == strategies.current_strategy().backward:  # nothing to force (~3 µs saved)
            return backward(ctx, grad_y)
        with strategies.use_strategy(backward=ctx.backward_strategy):
            return backward(ctx, grad_y)
    return run_backward


def _eager_function(class_name: str, forward: Callable, saved: SavedForBackward, backward: Callable,
                    keeps_strategy: bool) -> type[torch.autograd.Function]:
    """The eager route's Function: ``forward`` and ``saved.save``, then ``backward(ctx, grad_y)``."""
    save = saved.save

    def run_forward(ctx, *inputs):
        outputs = forward(*inputs)
        save(ctx, inputs + outputs)
        if keeps_strategy:
            ctx.backward_strategy = strategies.current_strategy().backward
        return outputs[0]
    doc = "The eager route: the same forward and backward as the custom ops, without their dispatch cost."
    return type(class_name, (torch.autograd.Function,), {
        "__doc__": doc, "__module__": forward.__module__, "forward": staticmethod(run_forward),
        "backward": staticmethod(_keeping_strategy(backward) if keeps_strategy else backward)})


def _lora_backward(saved: SavedForBackward, lora_grads: Callable) -> Callable:
    """``backward(ctx, grad_y)``: :func:`input_grads` with ``lora_grads(grad_y, *saved, need_dx,
    need_dlora)`` (the eager function, or the backward custom op); x is the first saved argument."""
    arrange = saved.arrange

    def backward(ctx, grad_y, *_unused_output_grads):
        args = arrange(ctx.saved_values + ctx.saved_tensors)
        return input_grads(ctx.needs_input_grad, grad_y, args[0], lambda need_dx, need_dlora: lora_grads(
            grad_y, *args, need_dx, need_dlora))
    return backward


def define_lora_op(op_names: Optional[tuple[str, str]], forward: Callable, lora_grads: Callable, *,
                   fake_forward: Optional[Callable], function_name: Optional[str],
                   eager_forward: Optional[Callable] = None, eager_lora_grads: Optional[Callable] = None,
                   eager_guard: Optional[tuple[str, str]] = None, on_ctx: Sequence[str] = (),
                   keeps_strategy: bool = False) -> LoRAOp:
    """A LoRA op family: ``(x, weight, bias, lora_A, lora_B, *rest) -> (y, S)``.

    ``forward(*inputs) -> (y, S)`` and ``lora_grads(grad_y, *saved, need_dx, need_dlora) ->
    (dX, dA, dB)`` (None where not needed; x the first of ``saved``) run in both routes; their
    annotations are the schemas of the custom ops named ``op_names`` (forward, backward; the
    backward returns three tensors, an empty one for an unneeded gradient). dW0 = dYᵀ x and
    db = Σ dY come from :func:`input_grads`. ``fake_forward``: the forward's fake kernel (the
    backward's is :func:`fake_grads`). ``function_name``: the eager Function's class name (its
    ``grad_fn``: ``<function_name>Backward``; None: no eager Function, for a pair that only
    compiled graphs call).

    ``eager_forward`` / ``eager_lora_grads``: the eager Function's own pair where the custom ops
    take other argument types (a plan's packed tensor instead of the plan); ``eager_guard``,
    ``on_ctx``: see :class:`SavedForBackward`. ``keeps_strategy``: the backward runs under the
    strategy forced around the forward. ``op_names`` None: the eager Function alone, no custom
    ops (for arguments no schema describes: ``qlora``'s quant state)."""
    eager_forward = eager_forward or forward
    eager_lora_grads = eager_lora_grads or lora_grads
    function = None
    if function_name is not None:
        eager_saved = SavedForBackward(eager_forward, LORA_OUTPUTS, eager_lora_grads, 2, guard=eager_guard,
                                       on_ctx=on_ctx)
        function = _eager_function(function_name, eager_forward, eager_saved,
                                   _lora_backward(eager_saved, eager_lora_grads), keeps_strategy)
    fwd = bwd = None
    if op_names is not None:
        saved = SavedForBackward(forward, LORA_OUTPUTS, lora_grads, 2, on_ctx=on_ctx)
        x_at, a_at, b_at = saved.index("x"), saved.index("lora_A"), saved.index("lora_B")

        def bwd_impl(grad_y, *args):
            return as_op_outputs(lora_grads(grad_y, *args), grad_y)

        def bwd_fake(grad_y, *args):
            return fake_grads(grad_y, args[x_at], args[a_at], args[b_at], args[-2], args[-1])

        fwd = define_custom_op(op_names[0], forward, fake_forward)
        bwd = define_custom_op(op_names[1], bwd_impl, bwd_fake, schema_of=lora_grads,
                               returns=tuple[Tensor, Tensor, Tensor])
        torch.library.register_autograd(op_names[0], _lora_backward(saved, bwd), setup_context=(
            lambda ctx, inputs, output: saved.save(ctx, tuple(inputs) + tuple(output))))
    return LoRAOp(fwd, bwd, function, eager_forward, eager_lora_grads, N_DIFFERENTIABLE)


def define_op(op_names: tuple[str, str], forward: Callable, grads: Callable, *, outputs: Sequence[str],
              n_differentiable: int, fake_forward: Callable, fake_grads: Callable, function_name: str,
              keeps_strategy: bool = False) -> LoRAOp:
    """An op family whose backward gives every differentiable input's gradient itself (DoRA:
    dW0 and the magnitude's are its own): ``forward(*inputs) -> outputs`` (named ``outputs``,
    y first) and ``grads(grad_y, *saved, needs) -> one gradient per differentiable input``
    (None where ``needs``, the ``n_differentiable`` flags, says not needed). The backward custom
    op takes ``needs`` as ``bool[]`` and returns ``Tensor[]`` (an empty tensor where
    not needed); ``fake_grads`` is its fake kernel. The other arguments as in :func:`define_lora_op`."""
    saved = SavedForBackward(forward, outputs, grads, 1)
    arrange = saved.arrange
    others = (None,) * (len(inspect.signature(forward).parameters) - n_differentiable)

    def eager_backward(ctx, grad_y):
        args = arrange(ctx.saved_values + ctx.saved_tensors)
        return grads(grad_y, *args, tuple(ctx.needs_input_grad[:n_differentiable])) + others

    def bwd_impl(grad_y, *args):
        return list(as_op_outputs(grads(grad_y, *args), grad_y))

    def op_backward(ctx, grad_y, *_unused_output_grads):
        needs = [bool(n) for n in ctx.needs_input_grad[:n_differentiable]]
        op_grads = bwd(grad_y, *arrange(ctx.saved_values + ctx.saved_tensors), needs)
        return tuple(g if need else None for g, need in zip(op_grads, needs)) + others

    function = _eager_function(function_name, forward, saved, eager_backward, keeps_strategy)
    fwd = define_custom_op(op_names[0], forward, fake_forward)
    bwd = define_custom_op(op_names[1], bwd_impl, fake_grads, schema_of=grads, returns=list[Tensor])
    torch.library.register_autograd(op_names[0], op_backward, setup_context=(
        lambda ctx, inputs, output: saved.save(ctx, tuple(inputs) + tuple(output))))
    return LoRAOp(fwd, bwd, function, forward, grads, n_differentiable)
