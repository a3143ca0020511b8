"""Generic adapter: find the global pooling head of any ``nn.Module`` by tracing its graph.

Works on torch-level graphs (``torch.fx.symbolic_trace``) and ATen-level graphs
(``torch.export`` programs, TorchScript converted with ``TS2EPConverter``). The graph is run once
on a probe to record shapes; a *global pool* is a node from the pool registry below whose input
is a map ``(B, D, H, W)`` (or ``(B, H, W, D)``, or tokens ``(B, N, D)``) and whose output keeps
only ``B`` and ``D``. The last such node before the output whose downstream part depends on
nothing but its input splits the graph into three graph modules sharing the model's parameters:

``features: x -> X``, ``pool: X -> P`` (the model's own pooling op), ``post: P -> logits``.

The single-location head is ``post`` applied to one location reshaped like ``P`` (the pooled
vector of a map holding one location). Pooling that is not global (VGG/AlexNet flatten a 7x7
map into an MLP) is refused with that reason.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator, Optional

import torch
import torch.fx as tfx
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import HeadNotFoundError
from .base import HeadSplit, register_adapter, sole_affine

__all__ = ["GraphSplit", "trace_graph", "split_graph"]

aten = torch.ops.aten

# Global-pool registry (data, not if-chains): target -> pooling kind.
_POOL_FUNCTIONS: dict[Any, str] = {
    F.adaptive_avg_pool2d: "avg",
    F.adaptive_max_pool2d: "max",
    F.avg_pool2d: "avg",
    F.max_pool2d: "max",
    torch.mean: "avg",
    torch.amax: "max",
    aten.adaptive_avg_pool2d.default: "avg",
    aten._adaptive_avg_pool2d.default: "avg",
    aten.mean.dim: "avg",
    aten.avg_pool2d.default: "avg",
    aten.amax.default: "max",
    aten.max_pool2d.default: "max",
}
for _name in ("_max_pool2d", "_adaptive_max_pool2d"):
    if hasattr(F, _name):
        _POOL_FUNCTIONS[getattr(F, _name)] = "max"
_POOL_MODULES: dict[type, str] = {
    nn.AdaptiveAvgPool2d: "avg",
    nn.AdaptiveMaxPool2d: "max",
    nn.AvgPool2d: "avg",
    nn.MaxPool2d: "max",
}
_POOL_METHODS: dict[str, str] = {"mean": "avg", "amax": "max"}

# ops that only reshape or are no-ops in eval; left out of the head's description
_TRIVIAL = {"flatten", "view", "reshape", "squeeze", "getitem", "size", "contiguous", "dropout",
            "Dropout", "Identity", "Flatten", "getattr", "clone", "alias", "_guards_fn", "permute",
            "transpose", "unsqueeze", "dim", "sym_size", "detach"}


def _pool_kind(node: tfx.Node, modules: dict[str, nn.Module]) -> Optional[str]:
    if node.op == "call_function":
        return _POOL_FUNCTIONS.get(node.target)
    if node.op == "call_method":
        return _POOL_METHODS.get(str(node.target))
    if node.op == "call_module":
        mod = modules.get(str(node.target))
        return _POOL_MODULES.get(type(mod)) if mod is not None else None
    return None


def _op_name(node: tfx.Node, modules: dict[str, nn.Module]) -> str:
    if node.op == "call_module":
        return type(modules.get(str(node.target))).__name__
    t = node.target
    if isinstance(t, str):
        return t
    name = getattr(t, "__name__", None) or str(t)
    if hasattr(t, "_schema"):  # OpOverload: aten.linear.default -> linear
        name = str(t).split(".")[1] if str(t).startswith("aten.") else name
    return name


class _ShapeRecorder(tfx.Interpreter):
    """Runs a graph once and records each node's output shape in ``self.shapes``."""

    def __init__(self, gm: tfx.GraphModule) -> None:
        super().__init__(gm)
        self.shapes: dict[tfx.Node, tuple[int, ...]] = {}

    def run_node(self, n: tfx.Node) -> Any:
        out = super().run_node(n)
        if isinstance(out, Tensor):
            self.shapes[n] = tuple(out.shape)
        elif isinstance(out, (tuple, list)) and out and isinstance(out[0], Tensor):
            self.shapes[n] = tuple(out[0].shape)
        return out


@dataclass
class _Pool:
    node: tfx.Node
    source: tfx.Node
    kind: str
    layout: str          # layout of the source: NCHW / NHWC / NLC
    pooled_shape: tuple  # shape of P with batch replaced by -1, e.g. (-1, D, 1, 1)


def _global_pool(node: tfx.Node, modules: dict[str, nn.Module], shapes: dict) -> Optional[_Pool]:
    kind = _pool_kind(node, modules)
    if kind is None or not node.args or not isinstance(node.args[0], tfx.Node):
        return None
    src = node.args[0]
    si, so = shapes.get(src), shapes.get(node)
    if si is None or so is None or so[0] != si[0]:
        return None
    b = si[0]
    if len(si) == 4:
        nchw = so in ((b, si[1], 1, 1), (b, si[1])) and si[2] * si[3] > 1
        nhwc = so in ((b, 1, 1, si[3]), (b, si[3])) and si[1] * si[2] > 1
        if nchw and nhwc:  # ambiguous (b, d) output: the reduced dims decide
            nchw = _reduced_dims(node) != {1, 2}
        if nchw:
            return _Pool(node, src, kind, "NCHW", (-1,) + so[1:])
        if nhwc:
            return _Pool(node, src, kind, "NHWC", (-1,) + so[1:])
    if len(si) == 3 and so == (b, si[2]) and si[1] > 1:
        return _Pool(node, src, kind, "NLC", (-1, si[2]))
    return None


def _reduced_dims(node: tfx.Node) -> Optional[set[int]]:
    dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    if isinstance(dims, int):
        dims = [dims]
    if not isinstance(dims, (list, tuple)) or not all(isinstance(d, int) for d in dims):
        return None
    return {d % 4 for d in dims}


def _ancestors(node: tfx.Node) -> set[tfx.Node]:
    seen: set[tfx.Node] = set()
    stack = [node]
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        stack.extend(n.all_input_nodes)
    return seen


def _output_value(graph: tfx.Graph) -> tfx.Node:
    out = next(n for n in graph.nodes if n.op == "output")
    val = out.args[0]
    while isinstance(val, (tuple, list)) and len(val) == 1:
        val = val[0]
    if not isinstance(val, tfx.Node):
        raise HeadNotFoundError(f"the graph returns {type(val).__name__} of several values, not one logits tensor")
    return val


def _copy(graph_nodes: list[tfx.Node], keep: set[tfx.Node], env: dict[tfx.Node, tfx.Node],
          g: tfx.Graph, what: str) -> None:
    def lookup(n: tfx.Node) -> tfx.Node:
        if n not in env:
            raise HeadNotFoundError(f"the {what} uses activation '{n.name}' besides the pooled features")
        return env[n]

    for n in graph_nodes:
        if n in keep and n not in env:
            env[n] = g.node_copy(n, lookup)


def _module_from(root: nn.Module, graph: tfx.Graph) -> tfx.GraphModule:
    graph.lint()
    return tfx.GraphModule(root, graph)


def split_graph(gm: tfx.GraphModule, x: Tensor) -> tuple[tfx.GraphModule, tfx.GraphModule, tfx.GraphModule, _Pool, str]:
    """Split ``gm`` at its last global pool. Returns (features, pool, post, pool info, kind)."""
    rec = _ShapeRecorder(gm)
    with torch.no_grad():
        rec.run(x)
    modules = dict(gm.named_modules())
    nodes = list(gm.graph.nodes)
    y = _output_value(gm.graph)
    need_out = _ancestors(y)
    pools = [p for n in reversed(nodes) if n in need_out
             for p in [_global_pool(n, modules, rec.shapes)] if p is not None]
    if not pools:
        raise HeadNotFoundError(_no_pool_reason(nodes, modules, rec.shapes))
    placeholders = [n for n in nodes if n.op == "placeholder"]
    depends_on_input: dict[tfx.Node, bool] = {}
    for n in nodes:
        depends_on_input[n] = n.op == "placeholder" or any(depends_on_input.get(a, False) for a in n.all_input_nodes)
    first_error: Optional[HeadNotFoundError] = None
    for pool in pools:
        try:
            return _split_at(gm, nodes, placeholders, pool, y, need_out, depends_on_input, modules)
        except HeadNotFoundError as e:
            first_error = first_error or e
    assert first_error is not None
    raise first_error


def _split_at(gm, nodes, placeholders, pool: _Pool, y, need_out, dep_in, modules):
    feat_need = _ancestors(pool.source)
    pool_need = _ancestors(pool.node)
    # features: x -> X
    g1 = tfx.Graph()
    env1: dict = {}
    _copy(nodes, feat_need | set(placeholders), env1, g1, "feature extractor")
    g1.output(env1[pool.source])
    # pool: X -> P (the model's own pooling op and its arguments)
    g2 = tfx.Graph()
    env2 = {pool.source: g2.placeholder("features")}
    keep2 = {n for n in pool_need if n not in feat_need or not dep_in[n]}
    _copy(nodes, keep2, env2, g2, "pooling")
    g2.output(env2[pool.node])
    # post: P -> logits
    g3 = tfx.Graph()
    env3 = {pool.node: g3.placeholder("pooled")}
    dep_pool: dict = {}
    for n in nodes:
        dep_pool[n] = n is pool.node or any(dep_pool.get(a, False) for a in n.all_input_nodes)
    keep3 = {n for n in need_out if dep_pool[n] or not dep_in[n]}
    _copy(nodes, keep3, env3, g3, "head")
    g3.output(env3[y])
    post_ops = [_op_name(n, modules) for n in nodes if n in keep3 and dep_pool[n] and n is not pool.node
                and n.op in ("call_module", "call_function", "call_method")]
    kind = "+".join([pool.kind] + [o for o in post_ops if o not in _TRIVIAL]) or pool.kind
    return _module_from(gm, g1), _module_from(gm, g2), _module_from(gm, g3), pool, kind


def _no_pool_reason(nodes, modules, shapes) -> str:
    for n in nodes:
        if _op_name(n, modules) in ("flatten", "view", "reshape", "Flatten") and n.all_input_nodes:
            si = shapes.get(n.all_input_nodes[0])
            so = shapes.get(n)
            if si is not None and len(si) == 4 and si[2] * si[3] > 1 and so is not None and len(so) == 2:
                return (f"it flattens a {si[1]}x{si[2]}x{si[3]} map into its classifier (no global pooling, "
                        "e.g. VGG/AlexNet), so a per-location classifier is not defined")
    return "found no global pooling of a spatial map before the classifier"


class GraphSplit(HeadSplit):
    """Split produced by :func:`split_graph`; the three graph modules share the model's weights."""

    def __init__(self, features: tfx.GraphModule, pool: tfx.GraphModule, post: tfx.GraphModule,
                 info: _Pool, kind: str) -> None:
        super().__init__()
        self.features = features
        self.pool = pool
        self.post = post
        self.layout = info.layout
        self.pooling = info.kind
        self.pooled_shape = tuple(info.pooled_shape)
        self._kind = kind

    def forward_features(self, x: Tensor) -> Tensor:
        return self.features(x)

    def forward_baseline(self, f: Tensor) -> Tensor:
        return self.post(self.pool(f))

    def forward_single(self, v: Tensor) -> Tensor:
        if self.layout == "NHWC" and len(self.pooled_shape) == 4:
            z = v[:, None, None, :]
        else:
            z = v.reshape((v.shape[0],) + self.pooled_shape[1:])
        return self.post(z)

    def linear_head(self) -> Optional[nn.Module]:
        return sole_affine(self.post)

    def head_kind(self) -> str:
        return self._kind


def _torchscript_graph(model: torch.jit.ScriptModule, x: Tensor) -> tfx.GraphModule:
    """TorchScript -> fx graph of ATen ops (torch's TS2EP converter, without its re-export step,
    which fails on shape arithmetic that TorchScript handles; then the full converter)."""
    errors = []
    try:
        from torch._export import converter as c

        conv = c.TS2EPConverter(model, (x,))
        lifted, fqn = c.get_block_to_lifted_attrs(conv.ts_graph)
        gm = c.TS2FXGraphConverter(conv.ts_graph, conv.name_to_param, conv.name_to_buffer, lifted,
                                   conv.name_to_non_tensor_attributes, conv.name_to_constant, fqn).convert()
        c.replace_quantized_ops_with_standard_ops(gm)
        return gm
    except Exception as e:  # noqa: BLE001 - private torch API: fall back, then refuse clearly
        errors.append(f"{type(e).__name__}")
    try:
        from torch._export.converter import TS2EPConverter

        return TS2EPConverter(model, (x,)).convert().module()
    except Exception as e:  # noqa: BLE001
        errors.append(f"{type(e).__name__}")
    raise HeadNotFoundError(f"its TorchScript graph could not be converted for analysis ({', '.join(errors)}); "
                            "save a state dict and pass arch=, or export it with torch.export (.pt2)")


def trace_graph(model: nn.Module, x: Tensor) -> tfx.GraphModule:
    """A graph module for ``model``: itself if already one, else fx trace, else torch.export."""
    if isinstance(model, tfx.GraphModule):
        return model
    if isinstance(model, torch.jit.ScriptModule):
        return _torchscript_graph(model, x)
    errors = []
    try:
        return tfx.symbolic_trace(model)
    except Exception as e:  # noqa: BLE001
        errors.append(f"torch.fx: {type(e).__name__}")
    try:
        return torch.export.export(model, (x,), strict=False).module()
    except Exception as e:  # noqa: BLE001
        errors.append(f"torch.export: {type(e).__name__}")
    raise HeadNotFoundError("its forward could not be traced (" + ", ".join(errors) + ")")


@register_adapter("fx", priority=90, matches=lambda m: True)
def build_fx(model: nn.Module, x: Tensor) -> Iterator[HeadSplit]:
    gm = trace_graph(model, x)
    yield GraphSplit(*split_graph(gm, x))
