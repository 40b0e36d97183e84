"""GHIST*: a U-Net trained from scratch on raw H&E pixels, its expression map pooled within each cell.

GHIST (Fu et al., 2024) predicts single-cell expression from H&E with a network trained end to end on the
image, supervised at the cell level through the cells' segmentation masks, with auxiliary tasks (nuclei
segmentation, cell type, neighbourhood composition). GHIST* keeps its architecture class, a dense
pixel-to-map network pooled within cells, and none of the cached encoder features:

    M      = UNet(normalise(tile))                     (G + 1, T, T): G expression maps and a nuclei logit map
    y_i    = mean over the pixels p of D_i of M[:G, p]  D_i: the disc of radius r_cell around cell i's centre
    L_nuc  = lambda_nuclei * BCE(M[G], N)               N: 1 within r_nuc of any cell centre of the tile

where the tile is the one owning cell i (:mod:`gcmoe.features.pixel_tiles`: tiles of ``tile_size`` working
pixels at ``mpp`` um/px, overlapping by ``2 * margin``, each cell predicted from the tile where it is most
central). The U-Net has ``len(widths)`` levels (two 3x3 conv + GroupNorm + ReLU blocks each, 2x2 max-pool
down, 2x2 transposed conv up, skip concatenation) and a 1x1 head. GroupNorm, not BatchNorm, so a tile's map
never depends on the other tiles of its batch, in training or evaluation. Training tiles get a random
rotation by a multiple of 90 degrees and a random flip (``augment``); the maps are turned back before
pooling, so cell positions and targets need no transform. Pixels arrive as uint8 and are normalised here,
``(x / 255 - 0.5) / 0.25`` per channel.

Shapes: tile_pixels (U, 3, T, T) uint8, tile_index (B,) row of each cell's tile, cell_xy (B, 2) working
pixels, tile_nuclei (U, 1, T, T) in training -> ModelOutput(prediction (B, G), {"nuclei": scalar}).
``features`` (B, D) is accepted and ignored.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gcmoe.errors import ConfigError
from gcmoe.models.base import CellModel, ModelOutput
from gcmoe.models.inputs import InputGeometry, ModelInputs, PixelSpec
from gcmoe.models.registry import register_model
from gcmoe.ops import disc_pixels


def _block(c_in: int, c_out: int, groups: int) -> nn.Sequential:
    def norm(c: int) -> nn.GroupNorm:
        return nn.GroupNorm(min(groups, c), c)

    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), norm(c_out), nn.ReLU(inplace=True),
        nn.Conv2d(c_out, c_out, 3, padding=1, bias=False), norm(c_out), nn.ReLU(inplace=True),
    )


class UNet(nn.Module):
    """A plain U-Net: ``len(widths)`` levels, 3 input channels -> ``out_channels`` at full resolution.

    Tile sides must be multiples of ``2 ** (len(widths) - 1)``.
    """

    def __init__(self, out_channels: int, widths: tuple[int, ...] = (16, 32, 64), groups: int = 8) -> None:
        super().__init__()
        self.down = nn.ModuleList()
        c_in = 3
        for w in widths:
            self.down.append(_block(c_in, w, groups))
            c_in = w
        self.up = nn.ModuleList()
        self.merge = nn.ModuleList()
        for w in reversed(widths[:-1]):
            self.up.append(nn.ConvTranspose2d(c_in, w, 2, stride=2))
            self.merge.append(_block(2 * w, w, groups))
            c_in = w
        self.head = nn.Conv2d(c_in, out_channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        skips = []
        for k, block in enumerate(self.down):
            if k:
                x = F.max_pool2d(x, 2)
            x = block(x)
            skips.append(x)
        for up, merge, skip in zip(self.up, self.merge, reversed(skips[:-1])):
            x = merge(torch.cat([up(x), skip], dim=1))
        return self.head(x)


def pool_discs(maps: Tensor, tile_index: Tensor, cell_xy: Tensor, radius: float) -> Tensor:
    """Mean of ``maps`` (U, C, T, T) over each cell's disc of ``radius`` px in its tile -> (B, C).

    Differentiable in ``maps`` (a gather and an index_add); a disc with no pixel inside the tile falls back to
    the pixel holding the centre (clamped into the tile).
    """
    u, c, t, _ = maps.shape
    flat = maps.permute(0, 2, 3, 1).reshape(u * t * t, c)
    owner, row, col = disc_pixels(cell_xy, radius, t)
    b = cell_xy.shape[0]
    counts = torch.bincount(owner, minlength=b)
    empty = counts == 0
    if bool(empty.any()):  # a sub-pixel radius or a centre outside the tile: use the nearest pixel
        extra = torch.nonzero(empty, as_tuple=True)[0]
        pix = cell_xy[extra].floor().long().clamp(0, t - 1)
        owner = torch.cat([owner, extra])
        row, col = torch.cat([row, pix[:, 1]]), torch.cat([col, pix[:, 0]])
        counts = torch.bincount(owner, minlength=b)
    index = tile_index[owner] * (t * t) + row * t + col
    sums = torch.zeros(b, c, dtype=maps.dtype, device=maps.device).index_add_(0, owner, flat.index_select(0, index))
    return sums / counts.to(maps.dtype).unsqueeze(1)


class GHIST(CellModel):
    """A U-Net on raw pixel tiles -> per-pixel expression and nuclei maps, pooled within cell discs."""

    inputs = ModelInputs(pixels=True)

    def __init__(
        self,
        in_dim: int,
        n_genes: int,
        mpp: float = 2.0,
        tile_size: int = 64,
        margin: int = 8,
        widths: tuple[int, ...] | list[int] = (16, 32, 64),
        groups: int = 8,
        cell_radius_um: float = 6.0,
        nucleus_radius_um: float = 3.0,
        lambda_nuclei: float = 0.5,
        augment: bool = True,
        tiles_per_pass: int = 16,
    ) -> None:
        super().__init__(in_dim, n_genes)
        widths = tuple(int(w) for w in widths)
        factor = 2 ** (len(widths) - 1)
        if not widths or tile_size % factor:
            raise ConfigError(f"GHIST*: tile_size ({tile_size}) must be a multiple of {factor} for a "
                              f"{len(widths)}-level U-Net")
        if not (mpp > 0 and cell_radius_um > 0 and nucleus_radius_um > 0):
            raise ConfigError("GHIST*: mpp, cell_radius_um and nucleus_radius_um must be > 0")
        if 2 * margin >= tile_size or margin * mpp < cell_radius_um:
            raise ConfigError(f"GHIST*: margin ({margin} px = {margin * mpp:g} um) must cover cell_radius_um "
                              f"({cell_radius_um}) and stay below half the tile ({tile_size} px)")
        self.mpp = float(mpp)
        self.tile_size = int(tile_size)
        self.margin = int(margin)
        self.widths = widths
        self.cell_radius_um = float(cell_radius_um)
        self.nucleus_radius_um = float(nucleus_radius_um)
        self.lambda_nuclei = float(lambda_nuclei)
        self.augment = bool(augment)
        self.tiles_per_pass = int(tiles_per_pass)
        self.unet = UNet(n_genes + 1, widths, groups)

    @property
    def cell_radius_px(self) -> float:
        return self.cell_radius_um / self.mpp

    def input_geometry(self) -> InputGeometry:
        """The pixel tiling this model was built for."""
        return InputGeometry(pixels=PixelSpec(self.mpp, self.tile_size, self.margin, self.nucleus_radius_um))

    def maps(self, tile_pixels: Tensor) -> Tensor:
        """The U-Net's output (U, G + 1, T, T) for uint8 (or [0, 255] float) tiles (U, 3, T, T)."""
        x = (tile_pixels.float() / 255.0 - 0.5) / 0.25
        if not (self.training and self.augment):
            return self.unet(x)
        k = torch.randint(0, 4, (x.shape[0],))
        flip = torch.randint(0, 2, (x.shape[0],)).bool()
        x = torch.stack([_dihedral(x[i], int(k[i]), bool(flip[i])) for i in range(x.shape[0])])
        out = self.unet(x)
        return torch.stack([_dihedral_inverse(out[i], int(k[i]), bool(flip[i])) for i in range(out.shape[0])])

    def forward(
        self,
        features: Tensor,
        tile_pixels: Tensor | None = None,
        tile_index: Tensor | None = None,
        cell_xy: Tensor | None = None,
        tile_nuclei: Tensor | None = None,
        **_: Tensor,
    ) -> ModelOutput:
        if tile_pixels is None or tile_index is None or cell_xy is None:
            raise ValueError("GHIST* needs tile_pixels, tile_index and cell_xy (CellData with pixels, built by the "
                             "pipeline for models that need 'pixels')")
        if tile_pixels.shape[-1] != self.tile_size or tile_pixels.shape[-2] != self.tile_size:
            raise ValueError(f"GHIST* was built for {self.tile_size}-px tiles, got {tuple(tile_pixels.shape)}")
        prediction = cell_xy.new_zeros(cell_xy.shape[0], self.n_genes)
        nuclei_loss = cell_xy.new_zeros(())
        for start in range(0, tile_pixels.shape[0], self.tiles_per_pass):
            stop = min(start + self.tiles_per_pass, tile_pixels.shape[0])
            out = self.maps(tile_pixels[start:stop])
            cells = torch.nonzero((tile_index >= start) & (tile_index < stop), as_tuple=True)[0]
            if len(cells):
                pooled = pool_discs(out[:, : self.n_genes], tile_index[cells] - start, cell_xy[cells],
                                    self.cell_radius_px)
                prediction = prediction.index_copy(0, cells, pooled)
            if tile_nuclei is not None and self.lambda_nuclei > 0:
                part = F.binary_cross_entropy_with_logits(out[:, self.n_genes :], tile_nuclei[start:stop].float(),
                                                          reduction="sum")
                nuclei_loss = nuclei_loss + part
        losses = {}
        if tile_nuclei is not None and self.lambda_nuclei > 0:
            losses["nuclei"] = self.lambda_nuclei * nuclei_loss / tile_nuclei.numel()
        return ModelOutput(prediction, losses)


def _dihedral(x: Tensor, k: int, flip: bool) -> Tensor:
    x = torch.rot90(x, k, dims=(-2, -1))
    return torch.flip(x, dims=(-1,)) if flip else x


def _dihedral_inverse(x: Tensor, k: int, flip: bool) -> Tensor:
    if flip:
        x = torch.flip(x, dims=(-1,))
    return torch.rot90(x, -k, dims=(-2, -1))


@register_model(
    "ghist", "GHIST*",
    "U-Net from scratch on raw H&E pixel tiles; expression maps pooled within cell discs, nuclei map as aux task",
    inputs=GHIST.inputs,
)
def create_ghist(in_dim: int, n_genes: int, **params) -> GHIST:
    return GHIST(in_dim, n_genes, **params)
