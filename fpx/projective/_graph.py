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

SUPPORTED = tuple(
    sorted(
        set(_INLINE)
        | _ALIAS
        | _LINEAR_DIAGONAL
        | _LINEAR_IN_ONE
        | _MAX
        | {"reduce_max", "conv_general_dilated (one known operand)"}
    )
)


class UnsupportedPrimitiveError(ValueError):
    """A model uses a primitive that has no exact projection in `fpx.projective`."""


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
        return self.kind == "shared_dot"

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
        for eqn in jaxpr.eqns:
            name = eqn.primitive.name
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
                raise _unsupported(name, "its output is not a single floating-point array")
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
            if name in _ALIAS:
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
                raise _unsupported(name)
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


def _unsupported(name, why=None):
    reason = f" ({why})" if why else ""
    return UnsupportedPrimitiveError(
        f"fpx.projective cannot build an exact projection for the primitive {name!r}{reason}. "
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
    """Batch-level data of a shared `x @ W` node: the rows X and `(I + X^T X)^{-1}`."""
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


def project_shared(node: Node, aux: dict, w, y):
    """Exact projection of (W, Y) onto `{Y = X W}` for the whole minibatch (y has a batch axis)."""
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
    raise AssertionError(node.kind)
