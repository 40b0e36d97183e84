import pytest

from gcmoe.config import RunConfig, load_config, save_config
from gcmoe.errors import ConfigError


def test_yaml_overrides_defaults_and_roundtrips(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data:\n  tissue:\n    n_cells: 500\ntrain:\n  lr: 0.01\nmodels: [stnet]\n")
    cfg = load_config(path)
    assert cfg.data.tissue.n_cells == 500 and cfg.train.lr == 0.01 and cfg.train.batch_size == 1024
    save_config(cfg, tmp_path / "out.yaml")
    assert load_config(tmp_path / "out.yaml") == cfg


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("train:\n  lrate: 1\n", "unknown setting.*'lrate'.*valid ones"),
        ("train:\n  batch_size: many\n", "expected an integer"),
        ("cv:\n  scheme: random\n", "not one of"),
        ("- a\n- b\n", "top level must be a mapping"),
    ],
)
def test_bad_config_is_explained(tmp_path, text, message):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_config(path)


def test_defaults_are_the_papers():
    cfg = RunConfig()
    assert (cfg.train.batch_size, cfg.train.max_epochs, cfg.train.patience, cfg.train.lr) == (1024, 1000, 50, 1e-3)
    assert cfg.targets.n_top_genes == 50 and cfg.cv.n_folds == 5
