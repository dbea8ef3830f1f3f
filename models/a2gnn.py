"""A²GNN: affinity attention graph neural network (thesis Sect. 3.3.4, Eq. 3.16-3.19).

The affinity attention layer (Eq. 3.18) propagates node features over the graph of
:mod:`models.graph`:

.. math::

    P(i, j) = \\mathrm{softmax}_{j \\in S(i)}\\big(w_l \\cos(h_i, h_j)
              + \\beta\\,[\\cos(h_i, h_j) > 0]\\,E_{ij}\\big), \\qquad H' = P H

with ``S(i)`` the neighbours of i (i included), ``w_l`` a learnable scalar per layer
(initialised uniformly in (0, 1) as the released code) and ``beta`` a fixed weight.
Two variants (``negative``):

- ``drop`` (default, the released code): neighbours with ``cos < 0`` are removed from the
  softmax; the others get ``w_l cos + beta E_ij``;
- ``keep`` (the printed equation): every neighbour stays, the edge term only where cos > 0.

Three exact paths compute it, chosen by the type of ``graph`` in ``forward``: an
``edge_index`` runs PyG message passing (any graph: grid graphs, superpixel graphs); a
:class:`GridGraph` runs batched dense products over tiles of the grid, each tile against
the tile grown by the radius (a block-banded form of the dense matrix; the fast path); a
:class:`DenseGraph` is the released code's N x N formulation (tests, benchmark). Tiles
rather than a loop over the K window offsets on (K, h, w) tensors, because that loop is
memory-bound: K small ops per layer.

Independent models: ``A2GNN(..., models=M)`` holds M models' weights stacked on a leading
axis and runs them on M graphs of the same grid at once (``x`` (M, N, d), a stacked
:class:`GridGraph`). Their losses are summed; Adam is element-wise, so training M models
at once gives every model the update it would get alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch_geometric.nn import AGNNConv, GATConv, GCNConv, MessagePassing
from torch_geometric.utils import softmax as edge_softmax

NEG = -1e9  # the released code's mask value


@dataclass
class GridGraph:
    """A grid graph cut into ``tile x tile`` blocks of nodes, each with the block of its
    possible neighbours (the tile grown by the radius r on every side).

    ``centre`` (T, t^2) and ``near`` (T, (t+2r)^2) index the nodes (N = padding, a zero
    row); ``weight`` / ``mask`` (M, T, t^2, (t+2r)^2) hold E_ij and "edge exists" of every
    (centre, neighbour) pair of a tile, for each of M graphs on the same grid; ``slot`` (N,)
    is each node's row in the flattened (T * t^2) centres. A layer then runs as batched
    dense products over the tiles: BLAS-efficient, with (t+2r)^2 / t^2 of the minimal work
    instead of N / K.
    """

    centre: torch.Tensor
    near: torch.Tensor
    weight: torch.Tensor
    mask: torch.Tensor
    slot: torch.Tensor

    @classmethod
    def from_edges(
        cls,
        edge_index: torch.Tensor,
        weight: torch.Tensor,
        grid: tuple[int, int],
        tile: int = 8,
        radius: int | None = None,
    ) -> GridGraph:
        """From a raster-numbered edge list (``edge_index[1]`` = target i, ``[0]`` = source j);
        ``radius`` (default: the longest edge) must be the same for graphs to be stacked."""
        h, w = grid
        n, dev = h * w, weight.device
        src, dst = edge_index[0].long().to(dev), edge_index[1].long().to(dev)
        yi, xi, yj, xj = dst // w, dst % w, src // w, src % w
        longest = int(max((yi - yj).abs().max(), (xi - xj).abs().max())) if len(src) else 0
        if radius is not None and longest > radius:
            raise ValueError(f"the graph has an edge of length {longest} > radius {radius}")
        r = longest if radius is None else radius
        th, tw, span = -(-h // tile), -(-w // tile), tile + 2 * r
        pad_id = torch.full((th * tile + 2 * r, tw * tile + 2 * r), n, dtype=torch.long, device=dev)
        pad_id[r : r + h, r : r + w] = torch.arange(n, device=dev).view(h, w)

        def cells(rows: int, cols: int) -> tuple[torch.Tensor, torch.Tensor]:
            y, x = torch.meshgrid(torch.arange(rows, device=dev), torch.arange(cols, device=dev), indexing="ij")
            return y.reshape(-1), x.reshape(-1)

        ty, tx = (v[:, None] for v in cells(th, tw))  # one row per tile
        by, bx = (v[None] for v in cells(tile, tile))  # the tile's own cells
        ny, nx = (v[None] for v in cells(span, span))  # the tile grown by r
        centre = pad_id[r + ty * tile + by, r + tx * tile + bx]
        near = pad_id[ty * tile + ny, tx * tile + nx]
        t = (yi // tile) * tw + xi // tile
        a = (yi % tile) * tile + xi % tile
        b = (yj - (yi // tile) * tile + r) * span + (xj - (xi // tile) * tile + r)
        dense = torch.zeros(1, th * tw, tile * tile, span * span, dtype=weight.dtype, device=dev)
        mask = torch.zeros(dense.shape, dtype=torch.bool, device=dev)
        dense[0, t, a, b] = weight
        mask[0, t, a, b] = True
        ys, xs = torch.arange(n, device=dev) // w, torch.arange(n, device=dev) % w
        slot = ((ys // tile) * tw + xs // tile) * tile * tile + (ys % tile) * tile + xs % tile
        return cls(centre, near, dense, mask, slot)

    @classmethod
    def stack(cls, graphs: Sequence[GridGraph]) -> GridGraph:
        """M graphs of the same grid, tile and radius -> one with M stacked edge sets."""
        first = graphs[0]
        for g in graphs[1:]:
            if g.near.shape != first.near.shape or not torch.equal(g.near, first.near):
                raise ValueError("only graphs of the same grid, tile and radius can be stacked")
        return cls(
            first.centre,
            first.near,
            torch.cat([g.weight for g in graphs]),
            torch.cat([g.mask for g in graphs]),
            first.slot,
        )

    def to(self, device) -> GridGraph:
        return GridGraph(*(getattr(self, f).to(device) for f in ("centre", "near", "weight", "mask", "slot")))


@dataclass
class DenseGraph:
    """The released code's form of a graph: ``adj`` (N, N) edge weights with the
    self-loops, ``neighbours`` (N, N) bool (row i: the neighbours of node i)."""

    adj: torch.Tensor
    neighbours: torch.Tensor

    @classmethod
    def from_edges(cls, edge_index: torch.Tensor, weight: torch.Tensor, num_nodes: int) -> DenseGraph:
        adj = weight.new_zeros(num_nodes, num_nodes)
        adj[edge_index[1].long(), edge_index[0].long()] = weight
        neighbours = torch.zeros(num_nodes, num_nodes, dtype=torch.bool, device=weight.device)
        neighbours[edge_index[1].long(), edge_index[0].long()] = True
        return cls(adj, neighbours)

    def to(self, device) -> DenseGraph:
        return DenseGraph(self.adj.to(device), self.neighbours.to(device))


Graph = torch.Tensor | GridGraph | DenseGraph


class AffinityAttention(MessagePassing):
    """Affinity attention layer (Eq. 3.18), see the module docstring.

    Args:
        beta: weight of the edge term (10 in the released code).
        negative: ``drop`` (released code) or ``keep`` (printed equation) for cos < 0.
        models: M independent layers (one ``w_l`` each) run on a stacked :class:`GridGraph`.
    """

    def __init__(self, beta: float = 10.0, negative: Literal["drop", "keep"] = "drop", models: int = 1) -> None:
        super().__init__(aggr="add", node_dim=0)
        if negative not in ("drop", "keep"):
            raise ValueError(f"negative must be 'drop' or 'keep', got {negative!r}")
        self.beta = beta
        self.negative = negative
        self.w = nn.Parameter(torch.empty(models))
        self.reset_parameters()

    def reset_parameters(self, generators: Sequence[torch.Generator | None] | None = None) -> None:
        super().reset_parameters()
        with torch.no_grad():
            for m, g in enumerate(generators or [None] * len(self.w)):
                self.w[m : m + 1].uniform_(0.0, 1.0, generator=g)

    def logits(self, cos: torch.Tensor, edge: torch.Tensor, w: torch.Tensor | None = None) -> torch.Tensor:
        """The pre-softmax score of a pair from its cosine and edge weight (``w``: ``w_l``
        shaped to broadcast against ``cos``; default the single model's)."""
        w = self.w if w is None else w
        if self.negative == "drop":
            return torch.where(cos < 0, torch.full_like(cos, NEG), w * cos + self.beta * edge)
        return w * cos + self.beta * (cos > 0).to(cos.dtype) * edge

    def forward(self, x: torch.Tensor, graph: Graph, edge_weight: torch.Tensor | None = None) -> torch.Tensor:
        """``x`` (N, d), or (M, N, d) with a stacked :class:`GridGraph`; ``graph`` an
        ``edge_index`` (2, E) with ``edge_weight`` (E,), a :class:`GridGraph` (N = h * w in
        raster order) or a :class:`DenseGraph`."""
        if isinstance(graph, GridGraph):
            return self._grid(x, graph)
        if len(self.w) != 1:
            raise ValueError("several stacked models need a GridGraph")
        if isinstance(graph, DenseGraph):
            return self._dense(x, graph)
        x_norm = F.normalize(x, p=2.0, dim=-1)
        return self.propagate(graph, x=x, x_norm=x_norm, edge_weight=edge_weight)

    def message(
        self,
        x_j: torch.Tensor,
        x_norm_i: torch.Tensor,
        x_norm_j: torch.Tensor,
        edge_weight: torch.Tensor,
        index: torch.Tensor,
        ptr: torch.Tensor | None,
        size_i: int | None,
    ) -> torch.Tensor:
        alpha = edge_softmax(self.logits((x_norm_i * x_norm_j).sum(-1), edge_weight), index, ptr, size_i)
        return x_j * alpha.unsqueeze(-1)

    def _grid(self, x: torch.Tensor, graph: GridGraph) -> torch.Tensor:
        single = x.dim() == 2
        x = x[None] if single else x
        m, _, d = x.shape
        if graph.weight.shape[0] != m or len(self.w) != m:
            raise ValueError(f"{m} feature sets, {graph.weight.shape[0]} graphs, {len(self.w)} models")
        rows = torch.cat([x, x.new_zeros(m, 1, d)], 1)  # row N: padding
        unit = F.normalize(rows, p=2.0, dim=-1)
        tiles, a, b = graph.weight.shape[1:]

        def take(v: torch.Tensor, index: torch.Tensor, k: int) -> torch.Tensor:
            # index_select: its backward is index_add, much faster on CPU than the
            # accumulating index_put of advanced indexing
            return v.index_select(1, index.flatten()).view(-1, k, d)

        cos = torch.bmm(take(unit, graph.centre, a), take(unit, graph.near, b).transpose(1, 2)).view(m, tiles, a, b)
        score = self.logits(cos, graph.weight, self.w.view(-1, 1, 1, 1)).masked_fill(~graph.mask, NEG)
        out = torch.bmm(torch.softmax(score, -1).view(-1, a, b), take(rows, graph.near, b))
        out = out.view(m, tiles * a, d).index_select(1, graph.slot)
        return out[0] if single else out

    def _dense(self, x: torch.Tensor, graph: DenseGraph) -> torch.Tensor:
        """``P = softmax(score)`` row-wise over all N nodes, ``P x`` (the released form)."""
        norm = x.norm(dim=1, keepdim=True)
        cos = (x @ x.t()) / (norm @ norm.t() + 1e-7)
        score = self.logits(cos, graph.adj).masked_fill(~graph.neighbours, NEG)
        return torch.softmax(score, 1) @ x

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}(beta={self.beta}, negative={self.negative}, models={len(self.w)})"


LAYERS = ("a2gnn", "gcn", "gat", "agnn")


class A2GNN(nn.Module):
    """Embedding (bias-free linear, ReLU, dropout) -> ``layers`` propagation layers ->
    bias-free linear to the classes (Eq. 3.16-3.19). ``forward`` returns
    ``(logits (N, C), features of the last propagation layer (N, hidden))``, each with a
    leading M axis for ``models=M`` stacked independent models.

    ``layer``: ``a2gnn`` (affinity attention) or a torch_geometric baseline for the
    ablation of thesis Fig. 3.7: ``gcn`` (GCNConv with the edge weights), ``gat``
    (GATConv, one head), ``agnn`` (AGNNConv); the baselines run on edge lists, one model.
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        hidden: int = 256,
        layers: int = 3,
        dropout: float = 0.5,
        layer: str = "a2gnn",
        beta: float = 10.0,
        negative: Literal["drop", "keep"] = "drop",
        models: int = 1,
    ) -> None:
        super().__init__()
        if layer not in LAYERS:
            raise ValueError(f"unknown A2GNN layer {layer!r} (known: {', '.join(LAYERS)})")
        if layer != "a2gnn" and models != 1:
            raise ValueError(f"the {layer} baseline trains one model at a time")
        self.layer = layer
        self.dropout = dropout
        self.embed = nn.Parameter(torch.empty(models, hidden, in_channels))
        make = {
            "a2gnn": lambda: AffinityAttention(beta, negative, models),
            "gcn": lambda: GCNConv(hidden, hidden),
            "gat": lambda: GATConv(hidden, hidden, heads=1),
            "agnn": lambda: AGNNConv(requires_grad=True),
        }[layer]
        self.props = nn.ModuleList([make() for _ in range(layers)])
        self.out = nn.Parameter(torch.empty(models, num_classes, hidden))
        self.reset_parameters()

    @property
    def models(self) -> int:
        return self.embed.shape[0]

    def reset_parameters(self, generators: Sequence[torch.Generator | None] | None = None) -> None:
        """Xavier-uniform linears, ``w_l`` uniform in (0, 1); model m draws from
        ``generators[m]`` (so a model's weights do not depend on what it is stacked with)."""
        generators = list(generators or [None] * self.models)
        for m, g in enumerate(generators):
            nn.init.xavier_uniform_(self.embed.data[m], generator=g)
            nn.init.xavier_uniform_(self.out.data[m], generator=g)
        for p in self.props:
            if isinstance(p, AffinityAttention):
                p.reset_parameters(generators)
            else:
                p.reset_parameters()

    def forward(
        self, x: torch.Tensor, graph: Graph, edge_weight: torch.Tensor | None = None, noise: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``x`` (N, d) or (M, N, d). ``noise``: uniform draws shaped like the embedding
        (the dropout mask is ``noise >= dropout``; default ``torch.rand``), so a caller
        can give every model its own random stream."""
        single = x.dim() == 2
        x = x[None] if single else x
        h = F.relu(torch.matmul(x, self.embed.transpose(1, 2)))
        if self.training and self.dropout > 0:
            noise = torch.rand_like(h) if noise is None else noise.view(h.shape)
            h = h * (noise >= self.dropout).to(h.dtype) / (1.0 - self.dropout)
        if self.layer == "a2gnn" and isinstance(graph, GridGraph):
            for prop in self.props:
                h = prop(h, graph)
        else:
            if self.models != 1:
                raise ValueError("several stacked models need a GridGraph")
            weighted = self.layer in ("a2gnn", "gcn")  # GAT and AGNN learn their own edge weights
            h = h[0]
            for prop in self.props:
                h = prop(h, graph, edge_weight) if weighted else prop(h, graph)
            h = h[None]
        logits = torch.matmul(h, self.out.transpose(1, 2))
        return (logits[0], h[0]) if single else (logits, h)
