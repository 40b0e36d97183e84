"""The embedded default data set: a virtual H&E tissue with single-cell expression and its ground truth.

``simulate_tissue`` lays out regions and cells (``layout``), draws each cell's morphology from its type and
state (``morphology``), renders the H&E image (``render``), draws expression (``expression``) and a matching
reference scRNA-seq set; ``expected_target`` and ``ceiling_pcc`` (``truth``) compute what a perfect model
would predict from the truth stored with the cells. docs/virtual_tissue.md describes the model and its
calibration against real Xenium breast data.
"""

from gcmoe.data.virtual_tissue.simulate import TissueTruth, VirtualTissue, simulate_tissue
from gcmoe.data.virtual_tissue.truth import ceiling_pcc, expected_target

__all__ = ["TissueTruth", "VirtualTissue", "ceiling_pcc", "expected_target", "simulate_tissue"]
