"""The model registry: names, display names, declared inputs, errors that list the valid names."""

from __future__ import annotations

import pytest

from gcmoe.errors import UnknownNameError
from gcmoe.models import create_model, get_model_entry, list_models, register_model
from gcmoe.models.inputs import ModelInputs
from gcmoe.models.registry import TABLE_ORDER, models_in_table_order


def test_every_table_model_is_registered_with_a_display_name():
    names = list_models()
    assert set(TABLE_ORDER) <= set(names) and names == sorted(names)
    for name in names:
        entry = get_model_entry(name)
        assert entry.name == name and entry.display_name and entry.description
    assert models_in_table_order()[: len(TABLE_ORDER)] == list(TABLE_ORDER)


def test_each_model_class_declares_the_inputs_its_entry_carries():
    for name in list_models():
        entry = get_model_entry(name)
        model = create_model(name, 6, 4, **({"n_types": 3} if entry.inputs.cell_types else {}))
        assert model.inputs == entry.inputs, name
    assert get_model_entry("stnet").inputs == ModelInputs()
    assert get_model_entry("gcmoe").inputs == ModelInputs(neighbours=True, cell_types=True, coexpression=True)
    assert get_model_entry("gcmoe_no_c2ca").inputs == ModelInputs(cell_types=True, coexpression=True)
    assert get_model_entry("histogene").inputs.in_memory_only == ["windows"]
    assert get_model_entry("ghist").inputs.pixels and not get_model_entry("ghist").inputs.streamable


def test_model_inputs_union_and_positions():
    both = ModelInputs(neighbours=True) | ModelInputs(targets=True)
    assert both == ModelInputs(neighbours=True, targets=True) and both.positions
    assert both.names() == ["neighbours", "targets"] and both.in_memory_only == ["targets"]
    assert not ModelInputs(cell_types=True, coexpression=True).positions


def test_input_geometry_comes_from_the_model_settings():
    histogene = create_model("histogene", 6, 4, window_um=120.0, max_window_cells=64)
    assert histogene.input_geometry().windows.window_um == 120.0 and histogene.input_geometry().windows.max_cells == 64
    triplex = create_model("triplex", 6, 4, context_um=50.0, context_size=3)
    assert (triplex.input_geometry().context.context_um, triplex.input_geometry().context.size) == (50.0, 3)
    assert create_model("stnet", 6, 4).input_geometry().windows is None


def test_unknown_names_and_parameters_are_refused_with_the_valid_names():
    with pytest.raises(UnknownNameError, match="available models: .*stnet"):
        get_model_entry("no_such_model")
    from gcmoe.errors import ConfigError

    with pytest.raises(ConfigError, match=r"model 'stnet' has no parameter\(s\) \['depthh'\].*its parameters: \['dropout'"):
        create_model("stnet", 6, 4, depthh=3)
    with pytest.raises(ValueError, match="registered twice"):
        register_model("stnet", "again")(lambda in_dim, n_genes: None)


def test_only_models_with_a_router_route():
    import torch

    gcmoe = create_model("gcmoe_no_cap_c2ca", 6, 4, n_types=3).eval()
    assert gcmoe.routes and not create_model("stnet", 6, 4).routes
    assert not create_model("gcmoe_no_moe_cap_c2ca", 6, 4, n_types=3).routes
    pi = gcmoe.routing(features=torch.randn(5, 6))
    assert pi.shape == (5, 3) and torch.allclose(pi.sum(1), torch.ones(5))
    with pytest.raises(NotImplementedError, match="does not route"):
        create_model("stnet", 6, 4).routing(features=torch.randn(2, 6))
