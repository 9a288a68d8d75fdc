"""farm_view.loadability: one reading of what the nodes' records say they can and cannot load, for the submit
check, the API's /v1/models and A1111's sd-models (issue 18: it was computed in three places)."""

from renderfarm.farm_view import loadability


def test_nodes_that_can_and_cannot_load_a_model():
    records = [
        {"name": "big", "loadable": ["tiny-sd15", "flux-dev"], "unloadable": {}},
        {"name": "small", "loadable": ["tiny-sd15"], "unloadable": {"flux-dev": "weights not found on this node"}},
        {"name": "old"},  # reports nothing: says nothing either way
        {"name": "odd", "loadable": "tiny-sd15", "unloadable": ["flux-dev"]},  # malformed: says nothing
        "not a record",
    ]
    assert loadability(records, "flux-dev") == (["big"], {"small": "weights not found on this node"})
    assert loadability(records, "tiny-sd15") == (["big", "small"], {})
    assert loadability(records, "sdxl") == ([], {})
    assert loadability([], "tiny-sd15") == ([], {})
