"""The exported backbone (backbone.pth) loads strictly into timm and computes the same features."""
import timm  # a test dependency (pyproject [test])
import torch

import fastebm
from fastebm.eval.export import backbone_from_objective_state, export_backbone


def test_exported_backbone_loads_into_timm(tmp_path):
    model = fastebm.create_model("vit_demo", img_size=16, depth=2)
    objective = fastebm.RestorationObjective(model, steps=2)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))  # not the initial values
    path = export_backbone(model, str(tmp_path / "backbone.pth"))
    state = torch.load(path, weights_only=True)
    assert state.keys() == backbone_from_objective_state(objective.state_dict()).keys()
    assert not any(k.startswith("energy_head") or "alpha" in k for k in state)
    vit = timm.models.vision_transformer.VisionTransformer(img_size=16, patch_size=4, embed_dim=128, depth=2,
                                                           num_heads=4, num_classes=0)
    vit.load_state_dict(state, strict=True)
    x = torch.randn(3, 3, 16, 16)
    model.eval(), vit.eval()
    with torch.no_grad():
        torch.testing.assert_close(vit.forward_features(x), model.forward_features(x), rtol=1e-5, atol=1e-5)
