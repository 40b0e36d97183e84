"""The whole job: data -> cell features -> folds -> train every model -> score -> tables.

``run_cv`` is what ``gcmoe cv`` and ``gcmoe demo`` call; ``train_model`` what ``gcmoe train`` calls. The
modules, in the order a run uses them:

- :mod:`~gcmoe.pipeline.qc`: the slide check of each slide read from files (``OUT/qc/``; a failure stops the run);
- :mod:`~gcmoe.pipeline.data`: data preparation (slides, reference, pooled cells, routing labels, features,
  neighbours, the cell store when streaming);
- :mod:`~gcmoe.pipeline.inputs`: input building (a registered model and the cells it reads, from its declared
  inputs; shared with prediction on a new slide, gcmoe.inference);
- :mod:`~gcmoe.pipeline.cv`: cross-validation; :mod:`~gcmoe.pipeline.train`: training one model;
- :mod:`~gcmoe.pipeline.outputs`: the model card, saved models, predictions, resumable fold states, results;
- :mod:`~gcmoe.pipeline.demo`: the settings of ``gcmoe demo``.

A run folder holds:

- ``results.json``: ``{"datasets": {NAME: {"ceiling", "n_cells", "n_genes_eval", "models": {MODEL: {"folds",
  "mean", "std", ...}}, ...}}, ...}`` (the schema is documented in docs/results.md);
- ``results.md``: Table 1 (methods), Table 2 (GC-MoE ablations) and per-fold detail; ``per_gene.csv``;
- ``config.yaml``: the resolved settings; ``log.txt``: the run's log; ``qc/``: each slide's check (files only);
- ``data/``: the virtual tissue and its reference, when the data were generated; ``cache/``: cell features,
  neighbour indices and, with ``train.stream``, the run's cell store (gcmoe.run_store);
- ``predictions/<fold>.h5ad``: each fold's test cells, measured targets and every model's prediction;
  ``models/<name>/``: each model as trained on the first fold (for figures: gcmoe.plotting, gcmoe.report).
"""

from gcmoe.pipeline.cv import run_cv
from gcmoe.pipeline.data import PooledCells, Routing, RunData, load_samples, pool_cells, prepare_run
from gcmoe.pipeline.demo import DEMO_MODELS, demo_config
from gcmoe.pipeline.inputs import build_model, cell_data, check_streamable
from gcmoe.pipeline.outputs import write_results
from gcmoe.pipeline.train import train_model

__all__ = [
    "DEMO_MODELS",
    "PooledCells",
    "Routing",
    "RunData",
    "build_model",
    "cell_data",
    "check_streamable",
    "demo_config",
    "load_samples",
    "pool_cells",
    "prepare_run",
    "run_cv",
    "train_model",
    "write_results",
]
