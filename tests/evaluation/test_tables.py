from gcmoe.evaluation.tables import method_table, results_markdown


def _results(two=False):
    d1 = {"ceiling": 0.8, "ceiling_std": 0.01, "n_cells": 10, "n_genes_eval": 5, "scheme": "strips",
          "fold_names": ["strip_1", "strip_2"],
          "models": {"ST-Net*": {"folds": [0.3, 0.5], "mean": 0.4, "std": 0.141},
                     "GC-MoE": {"folds": [0.5, 0.6], "mean": 0.55, "std": 0.07}}}
    ds = {"A": d1}
    if two:
        ds["B"] = {**d1, "ceiling": 0.6, "models": {"ST-Net*": {"folds": [0.7], "mean": 0.7, "std": 0.0},
                                                   "GC-MoE": {"folds": [0.1], "mean": 0.1, "std": 0.0}}}
    return {"datasets": ds}


def test_best_is_bold_and_ceiling_row():
    table = method_table(_results())
    assert "| GC-MoE | **0.550 ± 0.070** |" in table
    assert "| ST-Net* | 0.400 ± 0.141 |" in table
    assert "| *ceiling* | 0.800 ± 0.010 |" in table


def test_average_column_with_several_datasets():
    table = method_table(_results(two=True))
    assert table.splitlines()[0] == "| Method | A | B | Average |"
    assert "| ST-Net* | 0.400 ± 0.141 | **0.700 ± 0.000** | **0.550** |" in table
    assert "| GC-MoE | **0.550 ± 0.070** | 0.100 ± 0.000 | 0.325 |" in table
    assert "| *ceiling* | 0.800 ± 0.010 | 0.600 ± 0.010 | 0.700 |" in table


def test_markdown_has_fold_detail():
    md = results_markdown(_results())
    assert "| ST-Net* | 0.300 | 0.500 |" in md and "strip_1" in md


def test_ablation_table_marks_components():
    from gcmoe.evaluation.tables import ablation_table

    res = _results()
    res["datasets"]["A"]["models"]["GC-MoE"]["routing_accuracy"] = 0.8
    res["datasets"]["A"]["models"]["GC-MoE"]["share_of_ceiling"] = 0.5
    res["datasets"]["A"]["models"]["Ours w/o C2CA"] = {"folds": [0.5], "mean": 0.45, "std": 0.0, "routing_accuracy": 0.7}
    table = ablation_table(res)
    assert "| Ours w/o C2CA | ✓ | ✓ |  | 0.450 ± 0.000 | 0.700 | – |" in table
    assert "| GC-MoE | ✓ | ✓ | ✓ | **0.550 ± 0.070** | 0.800 | 50% |" in table
    assert "ST-Net*" not in table
    assert ablation_table({"datasets": {"A": {"models": {"ST-Net*": {}}}}}) is None


def test_excluded_genes_listed_only_when_present():
    res = _results()
    res["datasets"]["A"]["models"]["ST-Net*"]["excluded_genes"] = [[], []]
    assert "Genes excluded" not in results_markdown(res)
    res["datasets"]["A"]["models"]["ST-Net*"]["excluded_genes"] = [["g2"], ["g1", "g2"]]
    assert "- ST-Net*: g1, g2" in results_markdown(res)
