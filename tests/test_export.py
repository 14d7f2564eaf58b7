"""fastebm-export: the exported backbone loads into timm (strictly at the same size, through
pretrained_cfg_overlay at another size), computes fastebm's features, and fine-tunes a step."""
import json
import os

import pytest
import timm
import torch

import fastebm
from fastebm.cli.export import main
from fastebm.eval.backbone import read_backbone
from fastebm.eval.export import export_backbone, sidecar_path
from test_eval_support import trained_checkpoint


def _energy_vit_of(ckpt):
    bb = read_backbone(ckpt)
    ref = fastebm.create_model("vit_demo", img_size=bb.arch["img_size"], attn_backend="math").eval()
    ref.load_state_dict({**ref.state_dict(), **bb.state})
    return ref, bb


@pytest.mark.parametrize("ext", [".safetensors", ".pth"])
def test_export_loads_strictly_and_matches_features(ext, tmp_path, capsys):
    out = tmp_path / f"model{ext}"
    assert main(["--ckpt", trained_checkpoint(), "--out", str(out)]) == 0
    meta = json.loads(open(sidecar_path(str(out))).read())
    assert meta["architecture"] is None and meta["fastebm_model"] == "vit_demo"  # timm has no name for vit_demo
    assert meta["img_size"] == 16 and meta["patch_size"] == 4 and len(meta["mean"]) == 3
    if ext == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(out))
    else:
        state = torch.load(out, weights_only=True)
    assert not any(k.startswith("energy_head") or "alpha" in k for k in state)
    # the README's two-line load, strict
    from timm.models.vision_transformer import VisionTransformer

    vit = VisionTransformer(**meta["model_args"], num_classes=0).eval()
    vit.load_state_dict(state, strict=True)
    # MAE-style average pooling loads strictly too (fc_norm=False keeps the pretrained final norm)
    vit_avg = VisionTransformer(**meta["model_args"], num_classes=0, global_pool="avg", fc_norm=False).eval()
    vit_avg.load_state_dict(state, strict=True)
    ref, _ = _energy_vit_of(trained_checkpoint())
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(vit.forward_features(x), ref.forward_features(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(vit_avg(x), ref.forward_features(x)[:, 1:].mean(1), rtol=1e-5, atol=1e-5)


def _timm_named_export(tmp_path):
    """A vit_tiny_patch16 backbone (timm name vit_tiny_patch16_224), perturbed, exported at 32 px."""
    model = fastebm.create_model("vit_tiny_patch16", img_size=32)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    path = export_backbone(model, str(tmp_path / "tiny.safetensors"))
    return model, path


def test_timm_name_checkpoint_path_same_size(tmp_path):
    model, path = _timm_named_export(tmp_path)
    meta = json.loads(open(sidecar_path(path)).read())
    assert meta["architecture"] == "vit_tiny_patch16_224"
    vit = timm.create_model(meta["architecture"], checkpoint_path=path, num_classes=0, img_size=32).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(vit.forward_features(x), model.forward_features(x), rtol=1e-5, atol=1e-5)
    strict = timm.create_model(meta["architecture"], pretrained=True, num_classes=0, img_size=32,
                               pretrained_cfg_overlay=dict(file=path, num_classes=0))  # equal classes: strict load
    assert torch.equal(strict.pos_embed, model.pos_embed.detach())


def test_pretrained_cfg_overlay_other_size_and_finetune_step(tmp_path):
    model, path = _timm_named_export(tmp_path)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=True, num_classes=7, img_size=48,
                            pretrained_cfg_overlay=dict(file=path))
    from timm.layers import resample_abs_pos_embed

    want = resample_abs_pos_embed(model.pos_embed.detach(), new_size=[3, 3], num_prefix_tokens=1)
    torch.testing.assert_close(vit.pos_embed.detach(), want)
    assert torch.equal(vit.blocks[5].mlp.fc2.weight.detach(), model.blocks[5].mlp.fc2.weight.detach())
    # one fine-tuning step moves the weights and the loss is finite
    opt = torch.optim.SGD(vit.parameters(), lr=0.1)
    x, y = torch.randn(4, 3, 48, 48), torch.randint(0, 7, (4,))
    before = vit.blocks[0].attn.qkv.weight.detach().clone()
    loss = torch.nn.functional.cross_entropy(vit(x), y)
    loss.backward()
    opt.step()
    assert torch.isfinite(loss) and not torch.equal(before, vit.blocks[0].attn.qkv.weight.detach())


def test_exported_file_is_accepted_by_fastebm_eval(tmp_path):
    out = tmp_path / "m.safetensors"
    assert main(["--ckpt", trained_checkpoint(), "--out", str(out)]) == 0
    os.remove(sidecar_path(str(out)))  # the safetensors metadata alone describes the model
    a, b = read_backbone(str(out)), read_backbone(trained_checkpoint())
    assert a.arch == b.arch and a.preset == "vit_demo"
    assert all(torch.equal(a.state[k], b.state[k]) for k in b.state)


def test_export_bad_inputs(tmp_path, capsys):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(os.urandom(300))
    for argv, needle in [(["--ckpt", str(tmp_path / "none.pt")], "does not exist"),
                         (["--ckpt", str(junk)], "cannot be read"),
                         (["--ckpt", trained_checkpoint(), "--out", str(tmp_path / "m.onnx")], ".onnx")]:
        assert main(argv + (["--out", str(tmp_path / "m.safetensors")] if "--out" not in argv else [])) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("fastebm-export: error:") and needle in err[0]
    assert sorted(os.listdir(tmp_path)) == ["junk.pt"]  # nothing written


def test_fastebm_eval_builds_timm_named_models_from_an_export(tmp_path):
    import fastebm.eval as fe
    from test_eval_support import image_folder

    model, path = _timm_named_export(tmp_path)
    root = image_folder(tmp_path / "data", size=32, per_class=(3, 3, 3))
    s = fe.knn(ckpt=path, data=root, k=2, crop_pct=1.0, num_workers=0, output_dir=str(tmp_path / "knn"))
    assert s["model"] == "vit_tiny_patch16" and s["timm_name"] == "vit_tiny_patch16_224"
    assert s["arch"]["img_size"] == 32 and s["arch"]["depth"] == 12 and 0.0 <= s["top1"] <= 1.0


def test_a_backbone_is_evaluated_at_the_size_it_was_pretrained_at(tmp_path):
    """fastebm-train pretrains vit_demo at 16 px by default; fastebm-eval evaluates that backbone at 16 px,
    from the training checkpoint and from its export (no timm ``test_input_size`` is written), and builds an
    untrained --init baseline at 16 px too. An export that names a ``test_input_size`` (timm's field, which
    timm's resolve_data_config reads) is believed, and --img_size overrides everything."""
    from timm.data import resolve_data_config

    from fastebm.eval.backbone import Backbone, init_backbone

    ckpt = read_backbone(trained_checkpoint())
    assert ckpt.arch["img_size"] == 16 and ckpt.eval_img_size == 16
    out = tmp_path / "m.safetensors"
    assert main(["--ckpt", trained_checkpoint(), "--out", str(out)]) == 0
    meta = json.loads(open(sidecar_path(str(out))).read())
    assert meta["pretrained_cfg"]["input_size"] == [3, 16, 16] and "test_input_size" not in meta["pretrained_cfg"]
    assert read_backbone(str(out)).eval_img_size == 16
    # a missing folder is made; one that cannot be (a file in the way) is a usage error naming the path
    nested = tmp_path / "new" / "deeper" / "m.safetensors"
    assert main(["--ckpt", trained_checkpoint(), "--out", str(nested)]) == 0 and nested.is_file()
    (tmp_path / "afile").write_text("not a folder")
    assert main(["--ckpt", trained_checkpoint(), "--out", str(tmp_path / "afile" / "m.safetensors")]) == 2
    # any size is kept: vit_demo at 24 px, vit_tiny_patch16 at 32 px (not its preset's 224)
    for name, size in (("vit_demo", 24), ("vit_tiny_patch16", 32)):
        path = export_backbone(fastebm.create_model(name, img_size=size), str(tmp_path / f"{name}.safetensors"))
        side = json.loads(open(sidecar_path(path)).read())
        assert "test_input_size" not in side["pretrained_cfg"] and read_backbone(path).eval_img_size == size
    # an export that names its own test_input_size is believed, and re-exporting it keeps it
    side = json.loads(open(sidecar_path(str(out))).read())
    side["pretrained_cfg"]["test_input_size"] = [3, 28, 28]
    pth = tmp_path / "other.pth"
    torch.save(read_backbone(str(out)).state, pth)
    open(sidecar_path(str(pth)), "w").write(json.dumps(side))
    other = read_backbone(str(pth))
    assert other.eval_img_size == 28
    again = tmp_path / "again.safetensors"
    assert main(["--ckpt", str(pth), "--out", str(again)]) == 0
    cfg = json.loads(open(sidecar_path(str(again))).read())["pretrained_cfg"]
    assert cfg["test_input_size"] == [3, 28, 28]
    assert tuple(resolve_data_config(pretrained_cfg=cfg, use_test_size=True)["input_size"]) == (3, 28, 28)
    # the README's recipe for building it at another size: resample pos_embed, then a strict load
    from safetensors.torch import load_file
    from timm.layers import resample_abs_pos_embed
    from timm.models.vision_transformer import VisionTransformer

    state = load_file(str(out))
    state["pos_embed"] = resample_abs_pos_embed(state["pos_embed"], [32 // meta["patch_size"]] * 2, num_prefix_tokens=1)
    vit = VisionTransformer(**{**meta["model_args"], "img_size": 32}, num_classes=0).eval()
    vit.load_state_dict(state)
    with torch.no_grad():
        assert vit.forward_features(torch.randn(2, 3, 32, 32)).shape == (2, 65, 128)
    assert Backbone(dict(ckpt.arch), None, "random", None).eval_img_size == 16  # no preset: its own size
    # the untrained baselines: at vit_demo's pretraining size unless a size is given
    for kind in ("random", "fastebm"):
        assert init_backbone(kind, "vit_demo", None, 0).eval_img_size == 16
        assert init_backbone(kind, "vit_demo", 32, 0).eval_img_size == 32
        assert init_backbone(kind, "vit_tiny_patch16", None, 0).eval_img_size == 224
    # fastebm-eval without --img_size runs at 16 px; with it, at the size given
    import fastebm.eval as fe

    s = fe.knn(ckpt=trained_checkpoint(), k=3, few_shot=3, output_dir=str(tmp_path / "knn"))
    assert s["img_size"] == 16 and s["arch"]["img_size"] == 16
    s = fe.knn(ckpt=trained_checkpoint(), k=3, few_shot=3, img_size=32, output_dir=str(tmp_path / "knn32"))
    assert s["img_size"] == 32
    s = fe.knn(init="random", k=3, few_shot=3, output_dir=str(tmp_path / "knn_init"))
    assert s["img_size"] == 16
