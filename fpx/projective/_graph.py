"""From a plain JAX function to a divide-and-concur constraint graph.

`build_graph(model, params, x)` traces `model(params, x)` (one sample) with
`jax.make_jaxpr`, inlines the call wrappers, and sorts every value into

- *known* values: functions of the data and constants only. They are evaluated, never
  optimised; an operation with one known operand becomes linear in the other (the first
  layer `x @ W1` is a linear map of `W1`, not a set of bilinear products).
- *base variables*: the parameter leaves (shared by all samples) and the outputs of
  constraint nodes (one per sample).
- *aliases*: pure re-indexings of one base variable (reshape, broadcast, transpose,
  slice, ...). They are not nodes: a consumer holds a copy of the alias, which the
  consensus maps back onto the base variable (with multiplicity) by the transpose of the
  re-indexing.

Each constraint node holds a local copy of each unknown input and of its output; the set G
is the product of the nodes' graphs, each projected exactly; the set K is consensus (all
copies of a base variable agree, with the model output also in the loss set).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from functools import partial
from typing import Any

import jax
import jax.extend.core as jcore
import jax.numpy as jnp
import numpy as np

from ..feasibility import project_bilinear_graph, project_relu_graph
from ._scalar import (
    _quantizer_call,
    _quantizer_graph,
    _scalar_graph,
    _step_graph,
    hard_tanh,
    leaky_relu,
    scalar_function,
    step_function,
)
from ._sets import _max2_graph, _reduce_max_graph

# Wrappers whose body is inlined (parameter holding the body, in order of preference).
_INLINE = {
    "jit": ("jaxpr",),
    "pjit": ("jaxpr",),
    "closed_call": ("call_jaxpr",),
    "core_call": ("call_jaxpr",),
    "custom_jvp_call": ("call_jaxpr",),
    "custom_vjp_call": ("call_jaxpr", "fun_jaxpr"),
    "custom_vjp_call_jaxpr": ("fun_jaxpr", "call_jaxpr"),
    "remat": ("jaxpr",),
    "checkpoint": ("jaxpr",),
}
# Pure re-indexings of one operand: outputs are copies of input entries.
_ALIAS = {
    "broadcast_in_dim",
    "reshape",
    "transpose",
    "squeeze",
    "expand_dims",
    "slice",
    "rev",
    "copy",
    "copy_p",
    "convert_element_type",
    "reduce_precision",
}
# Linear in the unknown operands, with every unknown entry feeding at most one output
# entry, so that L L^T is diagonal.
_LINEAR_DIAGONAL = {"add", "add_any", "sub", "neg", "reduce_sum", "concatenate", "pad", "select_n"}
_LINEAR_IN_ONE = {"mul", "div", "dot_general"}  # linear when one operand is known (div: the divisor)
_MAX = {"max", "min"}
_ELEMENTWISE = {"add", "add_any", "sub", "mul", "div", "max", "min", "select_n"}
_DENSE_LIMIT = 4096  # largest output of a linear node projected through a dense I + L L^T
# Elementwise monotone maps (kind "scalar", projected by `_scalar._scalar_graph`).
_SCALAR = {"tanh": "tanh", "logistic": "logistic", "exp": "exp", "expm1": "expm1", "log": "log", "log1p": "log1p"}
# Piecewise-constant maps (kind "step", projected by `_scalar._step_graph`).
_STEP = {"sign", "floor", "ceil", "round"}
# Inlined calls recognised by name (and checked by value) as one elementwise map.
_WRAPPED = ("softplus", "logaddexp", "leaky_relu", "hard_tanh", "heaviside", "_quantizer_call")
_POOL = {"reduce_window_max", "reduce_window_sum", "reduce_window"}

SUPPORTED = tuple(
    sorted(
        set(_INLINE)
        | _ALIAS
        | _LINEAR_DIAGONAL
        | _LINEAR_IN_ONE
        | _MAX
        | set(_SCALAR)
        | _STEP
        | {"stop_gradient", "reduce_window_max", "reduce_window_sum", "reduce_window (max or add)"}
        | {f"jax.nn.{w}" for w in ("softplus", "leaky_relu", "hard_tanh")}
        | {"jnp.heaviside", "fpx.projective.quantize"}
        | {"reduce_max", "conv_general_dilated (one known operand)"}
    )
)


class UnsupportedPrimitiveError(ValueError):
    """A model uses a primitive that has no exact projection in `fpx.projective`.

    The message names the primitive and lists the supported operations. It is raised
    when the model is traced (by `Trainer.init`, `update` or `problem`), before any
    solve:

    ```python
    import jax, jax.numpy as jnp, pytest, fpx
    model = lambda p, x: jax.nn.softmax(x @ p["w"])      # a quotient of parameter-dependent values
    trainer = fpx.projective.Trainer(model)
    with pytest.raises(fpx.projective.UnsupportedPrimitiveError, match="Supported primitives"):
        trainer.init({"w": jnp.ones((3, 2))}, jnp.ones((4, 3)), jnp.zeros(4, jnp.int32))
    ```
    """


@dataclasses.dataclass(frozen=True)
class Known:
    index: int


@dataclasses.dataclass(frozen=True)
class Alias:
    var: int
    maps: tuple[Callable, ...] = ()

    def then(self, fn: Callable) -> Alias:
        return Alias(self.var, self.maps + (fn,))

    def __call__(self, value):
        for fn in self.maps:
            value = fn(value)
        return value


@dataclasses.dataclass(frozen=True)
class BaseVar:
    shape: tuple[int, ...]
    dtype: Any
    param: int | None  # leaf index for parameters (shared by all samples), else None


@dataclasses.dataclass(frozen=True)
class Node:
    kind: str  # "linear", "bilinear", "max", "reduce_max"
    fn: Callable  # the operation on the full operand list (forward pass)
    inputs: tuple  # Known | Alias per operand
    out: int
    name: str  # the primitive, for messages
    info: tuple = ()

    @property
    def shared(self) -> bool:
        """One node for the whole minibatch (no batch axis on its parameter copy)."""
        return self.kind in ("shared_dot", "shared_linear")

    @property
    def elementwise(self) -> bool:
        """Projected entry by entry, so batched arrays can be passed without vmap."""
        return self.kind in ("bilinear", "max")

    @property
    def unknown(self) -> tuple[int, ...]:
        return tuple(i for i, r in enumerate(self.inputs) if isinstance(r, Alias))


@dataclasses.dataclass(frozen=True)
class KnownEqn:
    fn: Callable
    inputs: tuple  # Known refs
    outs: tuple[int, ...]


@dataclasses.dataclass
class Graph:
    """The constraint graph of one sample; see the module docstring."""

    base: list[BaseVar]
    nodes: list[Node]
    output: int
    num_data: int  # known slots 0..num_data-1 are the data leaves
    constants: dict[int, Any]
    known_eqns: list[KnownEqn]
    num_known: int

    def known_values(self, data_leaves) -> list:
        values: list = [None] * self.num_known
        values[: self.num_data] = list(data_leaves)
        for i, c in self.constants.items():
            values[i] = c
        for eqn in self.known_eqns:
            outs = eqn.fn(*[values[r.index] for r in eqn.inputs])
            for i, o in zip(eqn.outs, outs):
                values[i] = o
        return values

    def forward(self, param_leaves, known) -> list:
        """Values of every base variable for one sample."""
        values: list = [None] * len(self.base)
        for i, b in enumerate(self.base):
            if b.param is not None:
                values[i] = param_leaves[b.param]
        for node in self.nodes:
            values[node.out] = node.fn(*_operands(node, known, values))
        return values

    def describe(self) -> str:
        params = sum(1 for b in self.base if b.param is not None)
        counts: dict[str, int] = {}
        entries: dict[str, int] = {}
        for node in self.nodes:
            key = f"{node.kind}({node.name})"
            counts[key] = counts.get(key, 0) + 1
            entries[key] = entries.get(key, 0) + math.prod(self.base[node.out].shape)
        lines = [f"{params} parameter leaves, {len(self.base) - params} per-sample variables, {len(self.nodes)} nodes:"]
        lines += [f"  {k}: {counts[k]} node(s), {entries[k]} output entries per sample" for k in sorted(counts)]
        return "\n".join(lines)


def _operands(node: Node, known, values) -> list:
    return [known[r.index] if isinstance(r, Known) else r(values[r.var]) for r in node.inputs]


def _unknown_avals(node: Node, base: list[BaseVar]):
    out = []
    for r in node.inputs:
        if isinstance(r, Alias):
            out.append(jax.eval_shape(r, jax.ShapeDtypeStruct(base[r.var].shape, base[r.var].dtype)))
    return out


def _bind(prim, params):
    def fn(*args):
        return prim.bind(*args, **params)

    return fn


def _inline_body(eqn):
    for key in _INLINE[eqn.primitive.name]:
        body = eqn.params.get(key)
        if body is not None:
            break
    else:
        raise UnsupportedPrimitiveError(f"cannot inline {eqn.primitive.name!r}: no body found in {list(eqn.params)}.")
    if isinstance(body, jcore.ClosedJaxpr):
        return body.jaxpr, body.consts
    return body, ()


def _dot_general_expand(dims, lhs_shape, rhs_shape):
    """Re-indexings that lay out the operands of a dot_general on its product tensor."""
    (lc, rc), (lb, rb) = dims
    lf = [d for d in range(len(lhs_shape)) if d not in lc and d not in lb]
    rf = [d for d in range(len(rhs_shape)) if d not in rc and d not in rb]
    nb, nlf, nrf = len(lb), len(lf), len(rf)
    shape = (
        tuple(lhs_shape[d] for d in lb)
        + tuple(lhs_shape[d] for d in lf)
        + tuple(rhs_shape[d] for d in rf)
        + tuple(lhs_shape[d] for d in lc)
    )

    def expand_lhs(a):
        a = jnp.transpose(a, tuple(lb) + tuple(lf) + tuple(lc))
        a = jnp.expand_dims(a, tuple(range(nb + nlf, nb + nlf + nrf)))
        return jnp.broadcast_to(a, shape)

    def expand_rhs(b):
        b = jnp.transpose(b, tuple(rb) + tuple(rf) + tuple(rc))
        b = jnp.expand_dims(b, tuple(range(nb, nb + nlf)))
        return jnp.broadcast_to(b, shape)

    contract_axes = tuple(range(len(shape) - len(lc), len(shape)))
    return shape, expand_lhs, expand_rhs, contract_axes


def build_graph(model: Callable, params, x) -> Graph:
    """Trace `model(params, x)` for one sample and build its constraint graph."""
    param_leaves, _ = jax.tree_util.tree_flatten(params)
    data_leaves, _ = jax.tree_util.tree_flatten(x)
    closed = jax.make_jaxpr(model)(params, x)
    jaxpr = closed.jaxpr
    if len(jaxpr.outvars) != 1:
        raise ValueError(f"fpx.projective: the model must return one array (the logits); it returns {len(jaxpr.outvars)}.")

    base: list[BaseVar] = []
    nodes: list[Node] = []
    known_eqns: list[KnownEqn] = []
    constants: dict[int, Any] = {}
    num_known = len(data_leaves)

    def new_known(value=None):
        nonlocal num_known
        num_known += 1
        if value is not None:
            constants[num_known - 1] = value
        return Known(num_known - 1)

    def new_base(shape, dtype, param=None):
        base.append(BaseVar(tuple(shape), jnp.dtype(dtype), param))
        return len(base) - 1

    env: dict = {}
    invars = jaxpr.invars
    for i, (v, leaf) in enumerate(zip(invars[: len(param_leaves)], param_leaves)):
        env[v] = Alias(new_base(np.shape(leaf), jnp.result_type(leaf), param=i))
    for i, v in enumerate(invars[len(param_leaves) :]):
        env[v] = Known(i)
    for v, c in zip(jaxpr.constvars, closed.consts):
        env[v] = new_known(c)

    def read(env, v):
        if isinstance(v, jcore.Literal):
            return new_known(v.val)
        return env[v]

    def add_node(kind, fn, inputs, shape, dtype, name, info=()):
        out = new_base(shape, dtype)
        nodes.append(Node(kind, fn, tuple(inputs), out, name, info))
        return Alias(out)

    def walk(jaxpr, env):
        straight, skipped = _straight_through(jaxpr)
        for position, eqn in enumerate(jaxpr.eqns):
            name = eqn.primitive.name
            if position in skipped:  # the `q(x) - x` and stop_gradient of a straight-through estimator
                continue
            if position in straight:  # x + stop_gradient(q(x) - x): its value is q(x)
                env[eqn.outvars[0]] = read(env, straight[position])
                continue
            if name in _INLINE and eqn.params.get("name") in _WRAPPED:
                refs = [read(env, v) for v in eqn.invars]
                found = _recognise(eqn, refs, constants)
                if found is not None:
                    kind, info, ref, fn = found
                    aval = eqn.outvars[0].aval
                    env[eqn.outvars[0]] = add_node(kind, fn, [ref], aval.shape, aval.dtype, eqn.params["name"], info)
                    continue
            if name in _INLINE:
                body, consts = _inline_body(eqn)
                inner = {}
                for v, c in zip(body.constvars, consts):
                    inner[v] = new_known(c)
                operands = [read(env, v) for v in eqn.invars]
                # custom_vjp/custom_jvp bodies may take leading consts beyond their invars.
                for v, r in zip(body.invars, operands[len(operands) - len(body.invars) :]):
                    inner[v] = r
                walk(body, inner)
                for v, w in zip(eqn.outvars, body.outvars):
                    env[v] = read(inner, w)
                continue
            refs = [read(env, v) for v in eqn.invars]
            out_aval = eqn.outvars[0].aval
            if all(isinstance(r, Known) for r in refs):
                outs = [new_known() for _ in eqn.outvars]
                prim, params = eqn.primitive, eqn.params
                multiple = eqn.primitive.multiple_results

                def fn(*args, prim=prim, params=params, multiple=multiple):
                    out = prim.bind(*args, **params)
                    return out if multiple else [out]

                known_eqns.append(KnownEqn(fn, tuple(refs), tuple(o.index for o in outs)))
                for v, o in zip(eqn.outvars, outs):
                    env[v] = o
                continue
            if len(eqn.outvars) != 1 or not jnp.issubdtype(out_aval.dtype, jnp.floating):
                why = "its output is not a single floating-point array"
                if out_aval.dtype == jnp.bool_:
                    why += (
                        "; comparisons of parameter-dependent values (as inside jnp.where on them) are not "
                        "supported, only the recognised maps listed below"
                    )
                raise _unsupported(name, why, eqn)
            fn = _bind(eqn.primitive, eqn.params)
            shape, dtype = out_aval.shape, out_aval.dtype
            if name in _ELEMENTWISE:
                # A rank-0 operand of an elementwise op is broadcast implicitly; make that
                # an explicit re-indexing so that each copy entry feeds one output entry.
                refs = [
                    r.then(partial(jnp.broadcast_to, shape=shape))
                    if isinstance(r, Alias) and v.aval.shape != shape
                    else r
                    for r, v in zip(refs, eqn.invars)
                ]
            unknown = [r for r in refs if isinstance(r, Alias)]
            if name == "stop_gradient":  # the identity on values (its zero derivative plays no part here)
                env[eqn.outvars[0]] = refs[0]
            elif name in _SCALAR and len(refs) == 1:
                env[eqn.outvars[0]] = add_node(
                    "scalar", scalar_function(_SCALAR[name]), refs, shape, dtype, name, (_SCALAR[name], 0.0)
                )
            elif name in _STEP and len(refs) == 1:
                function = name
                if name == "round":
                    function = "round" if int(eqn.params.get("rounding_method", 0)) == 1 else "round_away"
                env[eqn.outvars[0]] = add_node("step", step_function(function), refs, shape, dtype, name, (function, 0.5))
            elif name in _POOL:
                env[eqn.outvars[0]] = _pool(eqn, refs, add_node, constants)
            elif name == "div" and isinstance(refs[1], Alias):
                raise _unsupported(
                    name,
                    "its divisor depends on the parameters: a quotient of two parameter-dependent values, as in "
                    "jax.nn.softmax (exp(z) / sum(exp(z))) or a normalisation layer, has no exact projection. "
                    "Return the logits and use Trainer(loss='cross_entropy') instead of a softmax",
                    eqn,
                )
            elif name in _ALIAS:
                env[eqn.outvars[0]] = refs[0].then(fn)
            elif name in _LINEAR_DIAGONAL:
                env[eqn.outvars[0]] = add_node("linear", fn, refs, shape, dtype, name, ("diagonal",))
            elif name == "dot_general" and _is_shared_dot(eqn, refs, base):
                lhs_known = isinstance(refs[0], Known)
                x_ndim = eqn.invars[0 if lhs_known else 1].aval.ndim
                env[eqn.outvars[0]] = add_node(
                    "shared_dot", fn, refs, shape, dtype, name, (lhs_known, eqn.params["dimension_numbers"], x_ndim)
                )
            elif name in _LINEAR_IN_ONE and len(unknown) == 1 and (name != "div" or isinstance(refs[1], Known)):
                diagonal = name in ("mul", "div")
                if name == "dot_general":
                    diagonal = _dot_is_diagonal(eqn, refs)
                env[eqn.outvars[0]] = add_node(
                    "linear", fn, refs, shape, dtype, name, ("diagonal" if diagonal else "dense",)
                )
            elif name == "conv_general_dilated" and len(unknown) == 1 and base[unknown[0].var].param is not None:
                # conv(x, K) with data x and a parameter kernel K: one node for the minibatch
                env[eqn.outvars[0]] = add_node("shared_linear", fn, refs, shape, dtype, name)
            elif name == "conv_general_dilated" and len(unknown) == 1:
                env[eqn.outvars[0]] = add_node("linear", fn, refs, shape, dtype, name, ("dense",))
            elif name == "mul" and len(unknown) == 2:
                env[eqn.outvars[0]] = add_node("bilinear", fn, refs, shape, dtype, name)
            elif name == "dot_general" and len(unknown) == 2:
                dims = eqn.params["dimension_numbers"]
                lhs, rhs = (v.aval.shape for v in eqn.invars)
                pshape, expand_lhs, expand_rhs, axes = _dot_general_expand(dims, lhs, rhs)
                product = add_node(
                    "bilinear", jnp.multiply, [refs[0].then(expand_lhs), refs[1].then(expand_rhs)], pshape, dtype, name
                )
                summed = partial(jnp.sum, axis=axes)
                env[eqn.outvars[0]] = add_node("linear", summed, [product], shape, dtype, "dot_general sum", ("diagonal",))
            elif name in _MAX:
                env[eqn.outvars[0]] = add_node("max", fn, refs, shape, dtype, name, (name,))
            elif name == "reduce_max":
                env[eqn.outvars[0]] = add_node("reduce_max", fn, refs, shape, dtype, name, (tuple(eqn.params["axes"]),))
            else:
                why = None
                if len(unknown) >= 2:
                    why = f"{len(unknown)} of its operands depend on the parameters and it is not a product (mul, dot_general)"
                elif name in _SCALAR or name in _STEP:
                    why = "it has an unexpected number of operands"
                raise _unsupported(name, why, eqn)
        return env

    walk(jaxpr, env)
    output = read(env, jaxpr.outvars[0])
    if isinstance(output, Known):
        raise ValueError("fpx.projective: the model output does not depend on the parameters; nothing to train.")
    if output.maps:  # the loss acts on a base variable: give the re-indexed output its own
        out_aval = jaxpr.outvars[0].aval
        output = add_node("linear", output, [Alias(output.var)], out_aval.shape, out_aval.dtype, "output", ("dense",))
    if base[output.var].param is not None:
        raise ValueError("fpx.projective: the model output is a parameter itself; nothing to train.")
    return Graph(base, nodes, output.var, len(data_leaves), constants, known_eqns, num_known)


def _is_shared_dot(eqn, refs, base) -> bool:
    """A data-times-parameter product (`x @ W`) with no batch dimensions.

    Its copies of W need not be per sample: the node's graph over the whole minibatch,
    `{(W, Y) : Y = X W}`, has an exact projection through `(I + X^T X)^{-1}`, so one copy
    of W serves every sample (and the samples are coupled inside one projection).
    """
    kinds = [isinstance(r, Known) for r in refs]
    if kinds.count(True) != 1:
        return False
    param = refs[kinds.index(False)]
    (_, _), (lb, rb) = eqn.params["dimension_numbers"]
    return base[param.var].param is not None and not lb and not rb


def _dot_is_diagonal(eqn, refs) -> bool:
    """`L L^T` is diagonal iff the known operand has no free (non-contracted, non-batch) extent."""
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    known_side = 0 if isinstance(refs[0], Known) else 1
    contract, batch = (lc, lb) if known_side == 0 else (rc, rb)
    shape = eqn.invars[known_side].aval.shape
    free = [shape[d] for d in range(len(shape)) if d not in contract and d not in batch]
    return math.prod(free) == 1


def _straight_through(jaxpr):
    """Straight-through estimators `x + stop_gradient(q - x)` in one jaxpr.

    Returns `({index of the add: q}, {indices of the sub and stop_gradient})`. Their value is
    `q` (up to the rounding of `x + (q - x)`), so the add is read as `q` and the other two
    equations, used nowhere else, are skipped: a binary-weight layer `x @ ste(sign(W))`
    becomes one "step" node on W.
    """
    uses: dict = {}
    producer: dict = {}
    for i, eqn in enumerate(jaxpr.eqns):
        for v in eqn.invars:
            if not isinstance(v, jcore.Literal):
                uses[v] = uses.get(v, 0) + 1
        for v in eqn.outvars:
            producer[v] = i
    for v in jaxpr.outvars:
        if not isinstance(v, jcore.Literal):
            uses[v] = uses.get(v, 0) + 1
    straight, skipped = {}, set()
    for i, eqn in enumerate(jaxpr.eqns):
        if eqn.primitive.name not in ("add", "add_any") or any(isinstance(v, jcore.Literal) for v in eqn.invars):
            continue
        for x, d in (eqn.invars, eqn.invars[::-1]):
            j = producer.get(d)
            if j is None or jaxpr.eqns[j].primitive.name != "stop_gradient" or uses.get(d) != 1:
                continue
            diff = jaxpr.eqns[j].invars[0]
            k = producer.get(diff)
            if k is None or jaxpr.eqns[k].primitive.name != "sub" or uses.get(diff) != 1:
                continue
            q, x2 = jaxpr.eqns[k].invars
            if x2 is not x or isinstance(q, jcore.Literal):
                continue
            if not (q.aval.shape == x.aval.shape == eqn.outvars[0].aval.shape):
                continue
            straight[i] = q
            skipped |= {j, k}
            break
    return straight, skipped


_PROBE = np.array([-7.0, -3.0, -1.5, -1.0, -0.5, -0.1, 0.0, 0.1, 0.5, 1.0, 1.5, 3.0, 7.0])


def _recognise(eqn, refs, constants):
    """`(kind, info, ref, fn)` when an inlined call is one of `_WRAPPED` on one unknown operand.

    Recognised by the call's name and confirmed by value: the body, evaluated at probe
    points (with its other operands, which must be constants), must equal the map the
    node projects onto. Anything else returns None and is inlined as usual.
    """
    name = eqn.params.get("name")
    unknown = [i for i, r in enumerate(refs) if isinstance(r, Alias)]
    if len(unknown) != 1 or len(eqn.outvars) != 1:
        return None
    (i,) = unknown
    aval, out = eqn.invars[i].aval, eqn.outvars[0].aval
    if aval.shape != out.shape or aval.dtype != out.dtype or not jnp.issubdtype(aval.dtype, jnp.floating):
        return None
    if any(not isinstance(r, Alias) and r.index not in constants for r in refs):
        return None
    try:
        body, consts = _inline_body(eqn)
        if len(body.invars) != len(refs):
            return None
        with jax.ensure_compile_time_eval():
            others = [None if isinstance(r, Alias) else np.asarray(constants[r.index]) for r in refs]
            call = jcore.jaxpr_as_fun(jcore.ClosedJaxpr(body, list(consts)))

            def evaluate(u):
                args = [u if j == i else others[j] for j in range(len(refs))]
                return np.asarray(call(*args)[0])

            size = max(math.prod(aval.shape), 1)
            probes = [
                np.resize(np.roll(_PROBE, -k), size).reshape(aval.shape).astype(aval.dtype)
                for k in range(0, len(_PROBE), size)
            ]
            other = [o for j, o in enumerate(others) if j != i]
            if name in ("softplus", "logaddexp"):
                if name == "logaddexp" and not (len(other) == 1 and np.all(other[0] == 0)):
                    return None
                kind, info, fn = "scalar", ("softplus", 0.0), scalar_function("softplus")
            elif name == "leaky_relu":
                slope = float(-evaluate(np.full(aval.shape, -1, aval.dtype)).reshape(-1)[0])
                kind, info, fn = "scalar", ("leaky_relu", slope), partial(leaky_relu, negative_slope=slope)
            elif name == "hard_tanh":
                kind, info, fn = "scalar", ("hard_tanh", 0.0), hard_tanh
            elif name == "heaviside":
                if len(other) != 1 or np.ndim(other[0]) != 0:
                    return None
                at_zero = float(other[0])
                kind, info, fn = "step", ("heaviside", at_zero), step_function("heaviside", at_zero)
            elif name == "_quantizer_call":  # fpx.projective.quantize(x, levels, thresholds)
                if len(other) != 2 or i != 0:
                    return None
                levels, thresholds = (tuple(float(v) for v in np.ravel(o)) for o in other)
                kind, info = "quantizer", (levels, thresholds)
                fn = partial(_quantizer_call, levels=jnp.asarray(levels, aval.dtype), thresholds=jnp.asarray(thresholds, aval.dtype))
            else:
                return None
            tol = 1e-5 if jnp.finfo(aval.dtype).bits <= 32 else 1e-12
            for probe in probes:
                if not np.allclose(evaluate(probe), np.asarray(fn(jnp.asarray(probe))), rtol=tol, atol=tol):
                    return None
    except Exception:  # noqa: BLE001 - not recognisable (e.g. traced constants): inline instead
        return None
    return kind, info, refs[i], fn


def _window_indices(eqn, shape):
    """Flat input indices `(*out_shape, window)` of every window of a reduce_window, and their validity."""
    p = eqn.params
    window, strides, padding = p["window_dimensions"], p["window_strides"], p["padding"]
    base_dilation = p.get("base_dilation") or (1,) * len(shape)
    window_dilation = p.get("window_dilation") or (1,) * len(shape)
    nd = len(shape)
    per_dim = []
    for d in range(nd):
        n, w, st, (lo, hi), bd, wd = shape[d], window[d], strides[d], padding[d], base_dilation[d], window_dilation[d]
        size = (n - 1) * bd + 1 + lo + hi
        count = max((size - ((w - 1) * wd + 1)) // st + 1, 0)
        pos = np.arange(count)[:, None] * st + np.arange(w)[None, :] * wd - lo
        valid = (pos >= 0) & (pos <= (n - 1) * bd) & (pos % bd == 0)
        per_dim.append((np.where(valid, pos // bd, 0), valid))
    out_shape = tuple(idx.shape[0] for idx, _ in per_dim)
    flat = np.zeros(out_shape + tuple(window), dtype=np.int64)
    valid = np.ones(out_shape + tuple(window), dtype=bool)
    stride = 1
    for d in reversed(range(nd)):
        idx, ok = per_dim[d]
        layout = [1] * (2 * nd)
        layout[d], layout[nd + d] = idx.shape
        flat = flat + stride * idx.reshape(layout)
        valid = valid & ok.reshape(layout)
        stride *= shape[d]
    w = math.prod(window)
    return out_shape, flat.reshape(out_shape + (w,)), valid.reshape(out_shape + (w,))


def _gather(value, index):
    return value.reshape(-1)[index]


def _pool(eqn, refs, add_node, constants):
    """Max/sum pooling: the windows as one re-indexing (an alias), then a reduction node.

    Every window gets its own copy of its entries, so overlapping windows are exact too:
    the consensus maps the copies back onto the input with multiplicity (the transpose of
    the gather is a scatter-add). Max pooling is a `reduce_max` node over the window axis
    (a padded entry, -inf, is replaced by a copy of a real entry of the same window, which
    leaves the maximum unchanged); sum pooling a diagonal linear node summing the real
    entries. The generic `reduce_window` is accepted with a `max` (any constant initial
    value, applied as a `max` node after) or `add` (initial value 0) body.
    """
    name = eqn.primitive.name
    operand, out = eqn.invars[0].aval, eqn.outvars[0].aval
    ref = refs[0]
    if name == "reduce_window":
        body = eqn.params["jaxpr"]
        body = body.jaxpr if isinstance(body, jcore.ClosedJaxpr) else body
        ops = [e.primitive.name for e in body.eqns]
        init = refs[1] if len(refs) == 2 else None
        if len(refs) != 2 or not isinstance(init, Known) or ops not in (["max"], ["add"]) or init.index not in constants:
            raise _unsupported(
                name,
                "only jax.lax.reduce_window with jax.lax.max, or jax.lax.add with initial value 0, on one operand "
                "and a constant initial value is supported (that is, max and average pooling)",
                eqn,
            )
        op = ops[0]
    else:
        op, init = ("max" if name == "reduce_window_max" else "add"), None
    if not isinstance(ref, Alias):
        raise _unsupported(name, "its operand is not a parameter-dependent array", eqn)
    out_shape, index, valid = _window_indices(eqn, operand.shape)
    if out_shape != tuple(out.shape):
        raise _unsupported(name, f"could not lay out its windows (got {out_shape}, expected {out.shape})", eqn)
    dtype = out.dtype
    if op == "max":
        if not np.all(np.any(valid, -1)):
            raise _unsupported(name, "a window lies entirely in the padding", eqn)
        first = np.take_along_axis(index, np.argmax(valid, -1)[..., None], -1)
        index = np.where(valid, index, first)
        patches = ref.then(partial(_gather, index=index))
        axis = len(out_shape)
        result = add_node("reduce_max", partial(jnp.max, axis=axis), [patches], out_shape, dtype, name, ((axis,),))
        if init is not None:
            value = float(np.asarray(constants[init.index]))
            if value > -np.inf:
                result = add_node("max", jnp.maximum, [result, init], out_shape, dtype, name, ("max",))
        return result
    if init is not None and float(np.asarray(constants[init.index])) != 0:
        raise _unsupported(name, "a sum pooling (reduce_window with add) needs the initial value 0", eqn)
    patches = ref.then(partial(_gather, index=index))
    if np.all(valid):
        fn = partial(jnp.sum, axis=-1)
    else:
        mask = valid

        def fn(p, mask=mask):
            return jnp.sum(jnp.where(mask, p, jnp.zeros((), p.dtype)), axis=-1)

    return add_node("linear", fn, [patches], out_shape, dtype, name, ("diagonal",))


def _unsupported(name, why=None, eqn=None):
    reason = f" ({why})" if why else ""
    where = ""
    if eqn is not None:
        text = " ".join(str(eqn).split())
        where = f" in the equation `{text[:200]}{'...' if len(text) > 200 else ''}`"
    return UnsupportedPrimitiveError(
        f"fpx.projective cannot build an exact projection for the primitive {name!r}{where}{reason}. "
        f"Supported primitives: {', '.join(SUPPORTED)}. Rewrite that part of the model with "
        "these (e.g. jax.nn.relu or jnp.maximum(x, 0) for activations, x @ W + b for layers)."
    )


# ----------------------------------------------------------------------------- nodes


def _shared_dot_layout(node: Node, w_ndim: int):
    """Permutations putting the data as (rows, K), W as (K, N) and the output as (rows, N)."""
    lhs_known, ((lc, rc), _), x_ndim = node.info
    xc, wc = (lc, rc) if lhs_known else (rc, lc)
    xf = [d for d in range(x_ndim) if d not in xc]
    wf = [d for d in range(w_ndim) if d not in wc]
    # dot_general's output is (lhs free, rhs free); bring the data's free axes first.
    n_out = len(xf) + len(wf)
    out_perm = tuple(range(n_out)) if lhs_known else tuple(range(len(wf), n_out)) + tuple(range(len(wf)))
    return tuple(xf) + tuple(xc), tuple(wc) + tuple(wf), out_perm


def _batch_perm(perm):
    return (0,) + tuple(int(d) + 1 for d in perm)


def prepare_shared(node: Node, base: list[BaseVar], known) -> dict:
    """Batch-level data of a shared node: `x @ W`'s rows X and `(I + X^T X)^{-1}`, or for
    another linear map `Y = A W` of the minibatch's data (a convolution with a parameter
    kernel) the data and `(I + A^T A)^{-1}`, assembled column by column (W is small)."""
    if node.kind == "shared_linear":
        (w_aval,) = _unknown_avals(node, base)
        n = math.prod(w_aval.shape)
        if n > _DENSE_LIMIT:
            raise UnsupportedPrimitiveError(
                f"fpx.projective: the {node.name!r} node's parameter operand has {n} entries; its exact projection "
                f"needs a dense {n}x{n} solve (limit {_DENSE_LIMIT})."
            )
        data = [known[r.index] for r in node.inputs if isinstance(r, Known)]
        apply, transpose = _shared_linear_maps(node, data, w_aval)
        basis = jnp.eye(n, dtype=w_aval.dtype).reshape((n,) + w_aval.shape)
        gram = jax.vmap(lambda e: transpose(apply(e)).reshape(-1))(basis)
        return {"data": data, "inverse": _inverse_identity_plus(gram)}
    x = known[node.inputs[0 if node.info[0] else 1].index]  # (batch, ...) data operand
    (w_aval,) = _unknown_avals(node, base)
    x_perm, w_perm, _ = _shared_dot_layout(node, len(w_aval.shape))
    k = math.prod(w_aval.shape[d] for d in w_perm[: len(node.info[1][0][0])])
    rows = jnp.transpose(x, _batch_perm(x_perm)).reshape(-1, k).astype(w_aval.dtype)
    return {"rows": rows, "inverse": _inverse_identity_plus(rows.T @ rows)}


def _inverse_identity_plus(gram):
    """`(I + gram)^{-1}` for a PSD gram matrix, once per update (eigenvalues of I + gram are >= 1).

    An eigendecomposition is used because XLA's CPU triangular solves (behind Cholesky
    and LU solves) are ~100x slower than `eigh` at these sizes; inside the loop the
    projection is then one matrix product.
    """
    gram = (gram + gram.T) / 2
    eigenvalues, vectors = jnp.linalg.eigh(gram)
    return (vectors / (1 + jnp.maximum(eigenvalues, 0))[None, :]) @ vectors.T


def _shared_linear_maps(node: Node, data, w_aval):
    """`W -> A W` (every sample's output, batch axis first) and its transpose, for fixed data."""

    def apply(w):
        def one(*sample):
            it = iter(sample)
            return node.fn(*[next(it) if isinstance(r, Known) else w for r in node.inputs])

        return jax.vmap(one)(*data)

    linear_transpose = jax.linear_transpose(apply, w_aval)
    return apply, lambda y: linear_transpose(y)[0]


def project_shared(node: Node, aux: dict, w, y):
    """Exact projection of (W, Y) onto `{Y = A W}` for the whole minibatch (y has a batch axis)."""
    if node.kind == "shared_linear":
        apply, transpose = _shared_linear_maps(node, aux["data"], jax.ShapeDtypeStruct(w.shape, w.dtype))
        w_new = (aux["inverse"] @ (w + transpose(y)).reshape(-1)).reshape(w.shape)
        return (w_new,), apply(w_new)
    rows, inverse = aux["rows"], aux["inverse"]
    _, w_perm, out_perm = _shared_dot_layout(node, w.ndim)
    w_t = jnp.transpose(w, w_perm)
    w_mat = w_t.reshape(rows.shape[1], -1)
    y_t = jnp.transpose(y, _batch_perm(out_perm))
    w_new = inverse @ (w_mat + rows.T @ y_t.reshape(-1, w_mat.shape[1]))
    y_new = jnp.transpose((rows @ w_new).reshape(y_t.shape), _batch_perm(np.argsort(out_perm)))
    w_new = jnp.transpose(w_new.reshape(w_t.shape), tuple(np.argsort(w_perm)))
    return (w_new,), y_new


def prepare(node: Node, base: list[BaseVar], known) -> dict:
    """Per-sample quantities that stay fixed during one solve (offsets, diagonal of L L^T)."""
    if node.kind != "linear":
        return {
            i: jnp.broadcast_to(known[r.index], base[node.out].shape).astype(base[node.out].dtype)
            for i, r in enumerate(node.inputs)
            if isinstance(r, Known)
        }
    zeros = [jnp.zeros(a.shape, a.dtype) for a in _unknown_avals(node, base)]
    offset, linear, transpose = _linear_map(node, known, zeros)
    if node.info[0] == "diagonal":
        scale = linear(*transpose(jnp.ones_like(offset)))
        return {"offset": offset, "scale": scale}
    n = offset.size
    if n > _DENSE_LIMIT:
        raise UnsupportedPrimitiveError(
            f"fpx.projective: the {node.name!r} node has {n} outputs with a coupled linear map; "
            f"its exact projection needs a dense {n}x{n} solve (limit {_DENSE_LIMIT})."
        )
    basis = jnp.eye(n, dtype=offset.dtype).reshape((n,) + offset.shape)
    gram = jax.vmap(lambda e: linear(*transpose(e)).reshape(-1))(basis)
    return {"offset": offset, "inverse": _inverse_identity_plus(gram)}


def _linear_map(node: Node, known, zeros):
    def full(*unknowns):
        it = iter(unknowns)
        return node.fn(*[known[r.index] if isinstance(r, Known) else next(it) for r in node.inputs])

    offset, linear = jax.linearize(full, *zeros)
    transpose = jax.linear_transpose(linear, *zeros)
    return offset, linear, transpose


def project(node: Node, base: list[BaseVar], known, aux: dict, ins: tuple, out):
    """Exact projection of (input copies, output copy) onto the node's graph."""
    if node.kind == "linear":
        zeros = [jnp.zeros_like(c) for c in ins]
        _, linear, transpose = _linear_map(node, known, zeros)
        r = out - linear(*ins) - aux["offset"]
        if "scale" in aux:
            lam = r / (1 + aux["scale"])
        else:
            lam = (aux["inverse"] @ r.reshape(-1)).reshape(r.shape)
        step = transpose(lam)
        return tuple(c + s for c, s in zip(ins, step)), out - lam
    if node.kind == "bilinear":
        a, b, y = project_bilinear_graph(ins[0], ins[1], out)
        return (a, b), y
    if node.kind == "max":
        sign = 1 if node.info[0] == "max" else -1
        if len(ins) == 2:
            u, v, y = _max2_graph(sign * ins[0], sign * ins[1], sign * out)
            return (sign * u, sign * v), sign * y
        (k,) = aux.keys()
        c = sign * aux[k]
        u, y = project_relu_graph(sign * ins[0] - c, sign * out - c)
        return (sign * (u + c),), sign * (y + c)
    if node.kind == "reduce_max":
        (axes,) = node.info
        u = ins[0]
        keep = [d for d in range(u.ndim) if d not in axes]
        perm = tuple(keep) + tuple(axes)
        moved = jnp.transpose(u, perm)
        flat = moved.reshape(moved.shape[: len(keep)] + (-1,))
        u_new, y_new = _reduce_max_graph(flat, out)
        u_new = jnp.transpose(u_new.reshape(moved.shape), tuple(np.argsort(perm)))
        return (u_new,), y_new
    if node.kind == "scalar":  # y = phi(u), phi monotone: fpx.projective.project_scalar_graph
        function, slope = node.info
        u_new, y_new = _scalar_graph(ins[0], out, function, slope)
        return (u_new,), y_new
    if node.kind == "step":  # y = q(u), q piecewise constant: fpx.projective.project_step_graph
        function, at_zero = node.info
        u_new, y_new = _step_graph(ins[0], out, function, at_zero)
        return (u_new,), y_new
    if node.kind == "quantizer":  # y = quantize(u, levels, thresholds): fpx.projective.project_quantizer_graph
        levels, thresholds = (jnp.asarray(v, out.dtype) for v in node.info)
        u_new, y_new = _quantizer_graph(ins[0], out, levels, thresholds)
        return (u_new,), y_new
    raise AssertionError(node.kind)
