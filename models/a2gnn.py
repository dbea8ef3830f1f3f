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

Two exact paths compute it: :meth:`AffinityAttention.forward` with an ``edge_index``
runs PyG message passing (any graph: grid graphs, superpixel graphs); with a
:class:`GridGraph` it runs as batched dense products over tiles of the grid, each tile
against the tile grown by the radius (a block-banded form of the dense matrix). A loop
over the K window offsets on (K, h, w) tensors was measured too and lost: it is
memory-bound, K small ops per layer.
:func:`dense_attention` is the released code's N x N formulation (tests, benchmark).
"""
from __future__ import annotations

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
    row); ``weight`` / ``mask`` (T, t^2, (t+2r)^2) hold E_ij and "edge exists" of every
    (centre, neighbour) pair of a tile; ``slot`` (N,) is each node's row in the
    flattened (T * t^2) centres. A layer then runs as batched dense products over the
    tiles: BLAS-efficient, with (t+2r)^2 / t^2 of the minimal work instead of N / K.
    """

    centre: torch.Tensor
    near: torch.Tensor
    weight: torch.Tensor
    mask: torch.Tensor
    slot: torch.Tensor

    @classmethod
    def from_edges(cls, edge_index: torch.Tensor, weight: torch.Tensor, grid: tuple[int, int],
                   tile: int = 8) -> "GridGraph":
        """From a raster-numbered edge list (``edge_index[1]`` = target i, ``[0]`` = source j)."""
        h, w = grid
        n, dev = h * w, weight.device
        src, dst = edge_index[0].long().to(dev), edge_index[1].long().to(dev)
        yi, xi, yj, xj = dst // w, dst % w, src // w, src % w
        r = int(max((yi - yj).abs().max(), (xi - xj).abs().max())) if len(src) else 0
        th, tw, span = -(-h // tile), -(-w // tile), tile + 2 * r
        pad_id = torch.full((th * tile + 2 * r, tw * tile + 2 * r), n, dtype=torch.long, device=dev)
        pad_id[r:r + h, r:r + w] = torch.arange(n, device=dev).view(h, w)

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
        dense = torch.zeros(th * tw, tile * tile, span * span, dtype=weight.dtype, device=dev)
        mask = torch.zeros(dense.shape, dtype=torch.bool, device=dev)
        dense[t, a, b] = weight
        mask[t, a, b] = True
        ys, xs = torch.arange(n, device=dev) // w, torch.arange(n, device=dev) % w
        slot = ((ys // tile) * tw + xs // tile) * tile * tile + (ys % tile) * tile + xs % tile
        return cls(centre, near, dense, mask, slot)

    def to(self, device) -> "GridGraph":
        return GridGraph(*(getattr(self, f).to(device) for f in ("centre", "near", "weight", "mask", "slot")))


class AffinityAttention(MessagePassing):
    """Affinity attention layer (Eq. 3.18), see the module docstring.

    Args:
        beta: weight of the edge term (10 in the released code).
        negative: ``drop`` (released code) or ``keep`` (printed equation) for cos < 0.
    """

    def __init__(self, beta: float = 10.0, negative: Literal["drop", "keep"] = "drop") -> None:
        super().__init__(aggr="add", node_dim=0)
        if negative not in ("drop", "keep"):
            raise ValueError(f"negative must be 'drop' or 'keep', got {negative!r}")
        self.beta = beta
        self.negative = negative
        self.w = nn.Parameter(torch.empty(1))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        super().reset_parameters()
        nn.init.uniform_(self.w, 0.0, 1.0)

    def logits(self, cos: torch.Tensor, edge: torch.Tensor) -> torch.Tensor:
        """The pre-softmax score of a pair from its cosine and edge weight."""
        if self.negative == "drop":
            return torch.where(cos < 0, torch.full_like(cos, NEG), self.w * cos + self.beta * edge)
        return self.w * cos + self.beta * (cos > 0).to(cos.dtype) * edge

    def forward(self, x: torch.Tensor, graph: torch.Tensor | GridGraph,
                edge_weight: torch.Tensor | None = None) -> torch.Tensor:
        """``x`` (N, d); ``graph`` an ``edge_index`` (2, E) with ``edge_weight`` (E,), or a
        :class:`GridGraph` (then N = h * w in raster order)."""
        if isinstance(graph, GridGraph):
            return self._grid(x, graph)
        x_norm = F.normalize(x, p=2.0, dim=-1)
        return self.propagate(graph, x=x, x_norm=x_norm, edge_weight=edge_weight)

    def message(self, x_j: torch.Tensor, x_norm_i: torch.Tensor, x_norm_j: torch.Tensor, edge_weight: torch.Tensor,
                index: torch.Tensor, ptr: torch.Tensor | None, size_i: int | None) -> torch.Tensor:
        alpha = edge_softmax(self.logits((x_norm_i * x_norm_j).sum(-1), edge_weight), index, ptr, size_i)
        return x_j * alpha.unsqueeze(-1)

    def _grid(self, x: torch.Tensor, graph: GridGraph) -> torch.Tensor:
        rows = torch.cat([x, x.new_zeros(1, x.shape[1])])  # row N: padding
        unit = F.normalize(rows, p=2.0, dim=-1)
        cos = torch.bmm(unit[graph.centre], unit[graph.near].transpose(1, 2))  # (T, t^2, (t+2r)^2)
        score = self.logits(cos, graph.weight).masked_fill(~graph.mask, NEG)
        out = torch.bmm(torch.softmax(score, -1), rows[graph.near])
        return out.reshape(-1, x.shape[1])[graph.slot]

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}(beta={self.beta}, negative={self.negative})"


def dense_attention(layer: AffinityAttention, x: torch.Tensor, adj: torch.Tensor, neighbours: torch.Tensor) -> torch.Tensor:
    """The released code's N x N formulation of ``layer``: ``adj`` (N, N) edge weights with
    the self-loops, ``neighbours`` (N, N) bool; ``P = softmax(score)`` row-wise, ``P x``."""
    norm = x.norm(dim=1, keepdim=True)
    cos = (x @ x.t()) / (norm @ norm.t() + 1e-7)
    score = layer.logits(cos, adj).masked_fill(~neighbours, NEG)
    return torch.softmax(score, 1) @ x


LAYERS = ("a2gnn", "gcn", "gat", "agnn")


class A2GNN(nn.Module):
    """Embedding (bias-free linear, ReLU, dropout) -> ``layers`` propagation layers ->
    bias-free linear to the classes (Eq. 3.16-3.19). ``forward`` returns
    ``(logits (N, C), features of the last propagation layer (N, hidden))``.

    ``layer``: ``a2gnn`` (affinity attention) or a torch_geometric baseline for the
    ablation of thesis Fig. 3.7: ``gcn`` (GCNConv with the edge weights), ``gat``
    (GATConv, one head), ``agnn`` (AGNNConv); the baselines run on edge lists.
    """

    def __init__(self, in_channels: int, num_classes: int, hidden: int = 256, layers: int = 3, dropout: float = 0.5,
                 layer: str = "a2gnn", beta: float = 10.0, negative: Literal["drop", "keep"] = "drop") -> None:
        super().__init__()
        if layer not in LAYERS:
            raise ValueError(f"unknown A2GNN layer {layer!r} (known: {', '.join(LAYERS)})")
        self.layer = layer
        self.dropout = dropout
        self.embed = nn.Linear(in_channels, hidden, bias=False)
        make = {"a2gnn": lambda: AffinityAttention(beta, negative), "gcn": lambda: GCNConv(hidden, hidden),
                "gat": lambda: GATConv(hidden, hidden, heads=1), "agnn": lambda: AGNNConv(requires_grad=True)}[layer]
        self.props = nn.ModuleList([make() for _ in range(layers)])
        self.out = nn.Linear(hidden, num_classes, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.xavier_uniform_(self.embed.weight)
        nn.init.xavier_uniform_(self.out.weight)
        for p in self.props:
            p.reset_parameters()

    def forward(self, x: torch.Tensor, graph: torch.Tensor | GridGraph,
                edge_weight: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        h = F.dropout(F.relu(self.embed(x)), self.dropout, self.training)
        weighted = self.layer in ("a2gnn", "gcn")  # GAT and AGNN learn their own edge weights
        for prop in self.props:
            h = prop(h, graph, edge_weight) if weighted else prop(h, graph)
        return self.out(h), h
