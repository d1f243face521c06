"""The optional mmsegmentation bridge: never imported by default, clear error without mmseg, registry with it."""
from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

import pytest
import torch


def test_bridge_is_not_imported_by_the_package():
    """No module of the package imports mmseg or the bridge (checked on the source, without importing)."""
    import internvl_fm.segmentation as seg

    folder = Path(seg.__file__).parent
    for file in folder.glob("*.py"):
        if file.name == "mmseg_bridge.py":
            continue
        for node in ast.walk(ast.parse(file.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""] + [alias.name for alias in node.names]
            assert not any(n and ("mmseg" in n.split(".")[0] or n.endswith("mmseg_bridge")) for n in names), file


def test_register_without_mmseg_says_what_to_install():
    if importlib.util.find_spec("mmseg") is not None:
        pytest.skip("mmseg is installed")
    from internvl_fm.segmentation import mmseg_bridge

    with pytest.raises(ImportError, match=r"internvl-fm\[mmseg\]"):
        mmseg_bridge.register()


def test_registered_backbone_builds_from_an_mmseg_config():
    pytest.importorskip("mmseg")
    from mmseg.registry import MODELS

    from internvl_fm.segmentation import mmseg_bridge

    registered = mmseg_bridge.register()
    assert {"InternViTSegBackbone", "InternViTLinearHead"} <= set(registered)
    vision = dict(hidden_size=32, num_attention_heads=2, intermediate_size=64, num_hidden_layers=4, image_size=56,
                  qkv_bias=True, qk_normalization=False, norm_type="layer_norm")
    backbone = MODELS.build(dict(type="InternViTSegBackbone", vision_config=vision, out_indices=[0, 1, 2, 3],
                                 with_pyramid=True))
    maps = backbone(torch.randn(1, 3, 56, 56))
    assert isinstance(maps, tuple) and [m.shape[-1] for m in maps] == [16, 8, 4, 2]
    head = MODELS.build(dict(type="InternViTLinearHead", in_channels=32, num_classes=5, in_index=-1))
    assert head(list(maps)).shape == (1, 5, 2, 2)
