"""HisToGene*: a transformer over the cells of a spatial window, predicting every cell of the window.

HisToGene (Pang et al. 2021) embeds every spot's image patch linearly, adds learned embeddings of the spot's
x and y grid positions, runs a ViT encoder over all spots of the slide and regresses each spot's genes from
its output token. Here the tokens are cells: the shared frozen cell feature, standardised, embedded linearly,
plus learned x and y embeddings of the cell's offset from its window's centre (binned into ``n_pos`` bins
over the window's side). A slide-wide sequence of every cell is too long, so the slide is tiled with
overlapping windows (side S, stride S/2; :func:`gcmoe.features.context.tile_windows`) and each cell is
predicted from the window in which it lies most centrally, so it always sees at least S/4 of context on every
side inside the slide. For window w with members j and cell i owned by w:

    t_j   = W_e z_j + X[bin(o_jx)] + Y[bin(o_jy)]             o_j = p_j - c_w  (um), bin over [-S/2, S/2]
    h     = Transformer({t_j : j in w})                          masked over padding
    y_i   = W_o LayerNorm(h_i) + b_o

Every cell of the window is a token (test cells too: their image feature only, never their expression);
the loss reaches only the cells of the batch, and batches are whole windows of training cells (the
trainer's ``CellData.groups``).

Shapes: window_features (U, T, D), window_offsets (U, T, 2) um, window_mask (U, T) bool, window_index (B,)
row of each cell's window, window_slot (B,) its column -> ModelOutput(prediction (B, G), {}).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from gcmoe.models.base import CellModel, ModelOutput
from gcmoe.models.inputs import InputGeometry, ModelInputs, WindowSpec
from gcmoe.models.layers import TransformerEncoder
from gcmoe.models.registry import register_model


class HisToGene(CellModel):
    """Transformer encoder over the cells of a window (HisToGene adapted to cells and frozen features)."""

    inputs = ModelInputs(windows=True)

    def __init__(
        self,
        in_dim: int,
        n_genes: int,
        window_um: float = 256.0,
        max_window_cells: int = 1024,
        dim: int = 128,
        depth: int = 2,
        heads: int = 4,
        mlp_ratio: float = 2.0,
        dropout: float = 0.1,
        n_pos: int = 64,
        windows_per_pass: int = 32,
    ) -> None:
        super().__init__(in_dim, n_genes)
        self.window_um = float(window_um)
        self.max_window_cells = int(max_window_cells)
        self.n_pos = int(n_pos)
        self.windows_per_pass = int(windows_per_pass)
        self.embed = nn.Linear(in_dim, dim)
        self.x_embed = nn.Embedding(n_pos, dim)
        self.y_embed = nn.Embedding(n_pos, dim)
        self.dropout = nn.Dropout(dropout)
        self.encoder = TransformerEncoder(dim, depth, heads, mlp_ratio, dropout)
        self.head = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, n_genes))

    def position_bins(self, offsets: Tensor) -> Tensor:
        """Bin offsets (..., 2) um from the window centre into ``n_pos`` bins per axis over [-S/2, S/2]."""
        bins = torch.floor((offsets / self.window_um + 0.5) * self.n_pos)
        return bins.clamp(0, self.n_pos - 1).long()

    def encode_windows(self, window_features: Tensor, window_offsets: Tensor, window_mask: Tensor) -> Tensor:
        """Output tokens (U, T, dim) of the windows, ``windows_per_pass`` windows at a time."""
        out = []
        for start in range(0, window_features.shape[0], self.windows_per_pass):
            part = slice(start, start + self.windows_per_pass)
            bins = self.position_bins(window_offsets[part])
            tokens = self.embed(self.standardize(window_features[part]))
            tokens = self.dropout(tokens + self.x_embed(bins[..., 0]) + self.y_embed(bins[..., 1]))
            out.append(self.encoder(tokens, window_mask[part]))
        return torch.cat(out)

    def input_geometry(self) -> InputGeometry:
        """The windows this model was built for."""
        return InputGeometry(windows=WindowSpec(self.window_um, self.max_window_cells))

    def forward(
        self,
        features: Tensor,
        window_features: Tensor | None = None,
        window_offsets: Tensor | None = None,
        window_mask: Tensor | None = None,
        window_index: Tensor | None = None,
        window_slot: Tensor | None = None,
        **_: Tensor,
    ) -> ModelOutput:
        if window_features is None or window_offsets is None or window_mask is None or window_index is None \
                or window_slot is None:
            raise ValueError("HisToGene* needs window_features, window_offsets, window_mask, window_index and "
                             "window_slot (CellData with windows)")
        tokens = self.encode_windows(window_features, window_offsets, window_mask)
        return ModelOutput(self.head(tokens[window_index, window_slot]), {})


@register_model(
    "histogene", "HisToGene*",
    "transformer over the cells of overlapping windows; each cell predicted from the window where it is most central",
    inputs=HisToGene.inputs,
)
def create_histogene(in_dim: int, n_genes: int, **params) -> HisToGene:
    return HisToGene(in_dim, n_genes, **params)
