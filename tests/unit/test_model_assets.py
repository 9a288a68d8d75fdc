"""The base-model fingerprints a node publishes (actors/model_assets.py): exact where the source names its
content (a hub snapshot's commit, a stand-in's recipe), a header digest for a local folder that changes with
its configs, file names, sizes and tensor headers, never with file times."""

from __future__ import annotations

import json
import os

import torch
from safetensors.torch import save_file

from renderfarm.actors.model_assets import fingerprint, folder_digest, model_assets
from renderfarm.loras.assets import node_assets, summary
from renderfarm.planning.catalog import default_catalog


def folder(tmp_path, width=4):
    root = tmp_path / "model"
    (root / "unet").mkdir(parents=True)
    (root / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    (root / "unet" / "config.json").write_text(json.dumps({"width": width}))
    save_file({"w": torch.zeros(width, width)}, root / "unet" / "diffusion_pytorch_model.safetensors")
    return root


def test_a_folder_digest_follows_content_shape_not_file_times(tmp_path):
    root = folder(tmp_path)
    first = folder_digest(root)
    weights = root / "unet" / "diffusion_pytorch_model.safetensors"
    os.utime(weights, (1e9, 1e9))
    assert folder_digest(root) == first  # a copy with other file times is the same copy
    save_file({"w": torch.zeros(8, 8)}, weights)  # another shape: another copy
    assert folder_digest(root) != first
    second = folder_digest(root)
    (root / "unet" / "config.json").write_text(json.dumps({"width": 8, "note": 1}))
    assert folder_digest(root) != second


def test_stand_ins_and_local_folders_are_fingerprinted_and_published(tmp_path):
    catalog = default_catalog()
    entry = catalog.get("tiny-sd15")
    assert fingerprint(entry)["kind"] == "standin"
    local = entry.model_copy(update={"standin": False, "source": str(folder(tmp_path))})
    assert fingerprint(local) == {"kind": "header", "fingerprint": folder_digest(tmp_path / "model"),
                                  "source": str(tmp_path / "model")}
    models = model_assets(catalog, ["tiny-sd15", "tiny-flux"])
    doc, version = node_assets(None, models)
    assert doc["models"] == models and doc["lora_dir_error"] == "no LoRA library"
    shown = summary(doc)["models"]
    assert shown[0].startswith("tiny-flux (standin ") and shown[1].startswith("tiny-sd15 (standin ")
    assert node_assets(None, models)[1] == version  # the same assets, the same digest (nothing re-published)
