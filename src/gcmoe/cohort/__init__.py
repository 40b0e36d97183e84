"""Prediction over a cohort of whole slides: slide lists and manifests, tissue-only reading, per-slide outputs,
resumable and shared runs, the cohort table and page (docs/predict.md, "A cohort")."""

from gcmoe.cohort.run import CohortResult, TissueSettings, predict_cohort, slide_folder
from gcmoe.cohort.slides import SlideJob, list_slides
from gcmoe.cohort.table import cohort_rows, write_cohort_html, write_cohort_table

__all__ = ["CohortResult", "SlideJob", "TissueSettings", "cohort_rows", "list_slides", "predict_cohort",
           "slide_folder", "write_cohort_html", "write_cohort_table"]
