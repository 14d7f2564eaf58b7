"""fastebm-restore and fastebm.restore_images: tiling and blending, the descent, metrics, CLI and bad input.

References are written independently here in float64: tile positions enumerated from their
definition, blending by per-pixel weighted sums, descent of a pointwise quadratic energy in
closed form, PSNR/SSIM recomputed from the written PNG files.
"""
import json
import math
import os

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

import fastebm
from fastebm.cli import restore as restore_cli
from fastebm.corrupt import IMAGENET_MEAN, IMAGENET_STD, prepare_batch
from fastebm.tools.descent import descend
from fastebm.tools.restoration import summarise
from fastebm.tools.tiling import plan_tiles

MEAN = torch.tensor(IMAGENET_MEAN, dtype=torch.float64).view(3, 1, 1)
STD = torch.tensor(IMAGENET_STD, dtype=torch.float64).view(3, 1, 1)


def ref_starts(length, tile, overlap):
    stride = tile - overlap
    starts = list(range(0, length - tile + 1, stride))
    if starts[-1] != length - tile:
        starts.append(length - tile)
    return starts


def ref_window(tile, overlap):
    w = np.ones(tile)
    for i in range(overlap):
        v = math.sin(math.pi / 2 * (i + 0.5) / overlap) ** 2
        w[i] = min(w[i], v)
        w[tile - 1 - i] = min(w[tile - 1 - i], v)
    return w


def ref_blend(tiles, height, width, tile, overlap):
    """float64 weighted mean of (n, C, th, tw) tiles placed at the reference positions."""
    th, tw = tile
    win = np.outer(ref_window(th, overlap), ref_window(tw, overlap))
    num = np.zeros((tiles.shape[1], height, width))
    den = np.zeros((height, width))
    k = 0
    for t in ref_starts(height, th, overlap):
        for l in ref_starts(width, tw, overlap):
            num[:, t:t + th, l:l + tw] += win * tiles[k]
            den[t:t + th, l:l + tw] += win
            k += 1
    assert k == len(tiles)
    return num / den


class PointwiseEnergy(nn.Module):
    """E(x) = 1/2 sum_c k_c sum_hw (x - m_c)^2 per image: dE/dx = k (x - m), the same in every tile."""

    def __init__(self, tile=(16, 16), patch_size=4):
        super().__init__()
        self.img_size = tile
        self.patch_size = patch_size
        self.k = nn.Parameter(0.2 + 0.5 * torch.rand(3))
        self.m = nn.Parameter(torch.randn(3))

    def forward(self, x):
        self.check = tuple(x.shape[-2:])
        assert tuple(x.shape[-2:]) == self.img_size
        return 0.5 * (self.k.view(1, 3, 1, 1) * (x - self.m.view(1, 3, 1, 1)).pow(2)).flatten(1).sum(1)


def tiny_vit_objective(steps=2, img=16, depth=1):
    model = fastebm.EnergyViT(img_size=img, patch_size=4, embed_dim=32, depth=depth, num_heads=2)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return fastebm.RestorationObjective(model, steps=steps, alpha_init=0.05 + 0.1 * torch.rand(()).item())


# ----------------------------------------------------------------------------- blending

@pytest.mark.parametrize("height,width,tile,overlap", [(700, 1000, (32, 32), 8), (37, 53, (16, 16), 4),
                                                        (41, 29, (16, 24), 8), (16, 16, (16, 16), 4)])
def test_blend_of_a_constant_image_is_that_constant(height, width, tile, overlap):
    value = float(torch.randn(()))
    layout = plan_tiles(height, width, tile, overlap)
    image = torch.full((3, height, width), value)
    out = layout.blend(layout.extract(image))
    assert out.shape == (3, height, width)
    torch.testing.assert_close(out, image, rtol=0, atol=4e-7 * max(1.0, abs(value)))


@pytest.mark.parametrize("height,width,tile,overlap", [(45, 61, (16, 16), 4), (33, 70, (16, 24), 8)])
def test_blend_matches_float64_reference_and_reproduces_the_image(height, width, tile, overlap):
    layout = plan_tiles(height, width, tile, overlap)
    ys = ref_starts(height, tile[0], overlap)
    xs = ref_starts(width, tile[1], overlap)
    assert layout.starts == [(t, l) for t in ys for l in xs]
    tiles = torch.randn(len(layout.starts), 3, *tile)
    expected = ref_blend(tiles.double().numpy(), height, width, tile, overlap)
    np.testing.assert_allclose(layout.blend(tiles).double().numpy(), expected, rtol=1e-5, atol=1e-5)
    image = torch.randn(3, height, width)
    torch.testing.assert_close(layout.blend(layout.extract(image)), image, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("overlap", [4, 8, 12])
def test_blend_seams_stay_within_the_ramp_bound(overlap):
    """Tiles of unrelated constants: the output never jumps more than range * pi / overlap between
    neighbouring pixels (a hard paste would jump by the full range at every tile border)."""
    height, width, tile = 150, 97, (32, 32)
    layout = plan_tiles(height, width, tile, overlap)
    values = torch.rand(layout.count, 1, 1, 1).double()
    out = layout.blend(values.expand(-1, 1, *tile).contiguous().float()).double()
    spread = float(values.max() - values.min())
    jump = max(out.diff(dim=1).abs().max().item(), out.diff(dim=2).abs().max().item())
    assert jump <= spread * math.pi / overlap + 1e-6
    assert out.min() >= values.min() - 1e-6 and out.max() <= values.max() + 1e-6  # a convex combination
    hard = plan_tiles(height, width, tile, 0).blend(torch.rand(plan_tiles(height, width, tile, 0).count, 1, *tile))
    assert hard.diff(dim=2).abs().max() > spread * math.pi / overlap or spread < 0.2


# ----------------------------------------------------------------------------- descent

def test_tiled_descent_of_a_pointwise_energy_equals_the_closed_form_with_reused_last_alpha():
    """Steps beyond the trained T use alpha_{T-1}; tiling is exact for a position-independent energy."""
    model = PointwiseEnergy()
    objective = fastebm.RestorationObjective(model, steps=2, alpha_init=0.3)
    with torch.no_grad():
        objective.alpha_logits.copy_(torch.randn(2))
    image = torch.randint(0, 256, (3, 45, 70), dtype=torch.uint8)
    steps = 5
    [result] = fastebm.restore_images(objective, image, already_corrupted=True, steps=steps, overlap=4)
    alphas = torch.nn.functional.softplus(objective.alpha_logits.detach().double())
    k, m = model.k.detach().double().view(3, 1, 1), model.m.detach().double().view(3, 1, 1)
    x = (image.double() / 255 - MEAN) / STD
    for t in range(steps):
        x = x - alphas[min(t, 1)] * k * (x - m)
        np.testing.assert_allclose(result.steps[t].double().numpy(), (x * STD + MEAN).clamp(0, 1).numpy(),
                                   atol=2e-5)
    assert result.size == (45, 70) and len(result.energies) == steps + 1 and result.psnr_restored is None


def test_model_sized_images_follow_objective_restore_exactly():
    objective = tiny_vit_objective(steps=3)
    images = torch.randint(0, 256, (5, 3, 16, 16), dtype=torch.uint8)
    clean, corrupted, _, _ = prepare_batch(images, ["denoise"], seed=3, sample_ids=torch.arange(5), patch_size=4)
    layouts = [plan_tiles(16, 16, (16, 16), 4) for _ in range(5)]
    trajectories = descend(objective, list(corrupted), layouts, 3, batch_size=2)
    reference = objective.restore(corrupted)
    with torch.no_grad():
        energies = [objective.model(x) for x in reference]
    for i, traj in enumerate(trajectories):
        for t in range(4):
            torch.testing.assert_close(traj.xs[t], reference[t][i], rtol=1e-5, atol=1e-5)
            assert traj.energies[t] == pytest.approx(float(energies[t][i]), rel=1e-5)


def test_1000x700_image_restores_tilewise_to_its_size_matching_a_float64_blend_of_tile_gradients():
    objective = tiny_vit_objective(steps=1)
    image = torch.randint(0, 256, (3, 700, 1000), dtype=torch.uint8)
    [result] = fastebm.restore_images(objective, image, task="denoise", seed=2, batch_size=512)
    assert result.size == (700, 1000) and result.restored.shape == (3, 700, 1000)
    assert result.tiles == len(ref_starts(700, 16, 4)) * len(ref_starts(1000, 16, 4))
    assert all(torch.isfinite(x).all() for x in [result.corrupted, result.restored])
    # independent reference of the step: gradients of every tile, blended in float64
    clean, corrupted, _, _ = prepare_batch(image[None], ["denoise"], seed=2, sample_ids=torch.tensor([0]), patch_size=4)
    x0 = corrupted[0]
    tiles = torch.stack([x0[:, t:t + 16, l:l + 16] for t in ref_starts(700, 16, 4) for l in ref_starts(1000, 16, 4)])
    grads, energies = [], []
    for chunk in tiles.split(1024):
        chunk = chunk.clone().requires_grad_(True)
        e = objective.model(chunk)
        grads.append(torch.autograd.grad(e.sum(), chunk)[0])
        energies.append(e.detach())
    grad = ref_blend(torch.cat(grads).double().numpy(), 700, 1000, (16, 16), 4)
    x1 = x0.double() - float(objective.alphas[0].detach()) * torch.from_numpy(grad)
    expected = (x1 * STD + MEAN).clamp(0, 1)
    np.testing.assert_allclose(result.restored.double().numpy(), expected.numpy(), atol=2e-5)
    assert result.energies[0] == pytest.approx(float(torch.cat(energies).double().mean()), rel=1e-5)


def _smooth_images(n):
    x = torch.rand(n, 3, 2, 2)
    return (F.interpolate(x, size=(16, 16), mode="bilinear", align_corners=False) * 255).round().to(torch.uint8)


def test_a_tiny_trained_model_improves_psnr_for_denoise_and_mim():
    """80 AdamW steps on smooth images: restoring held-out ones beats the corrupted input and the untrained model."""
    objective = tiny_vit_objective(steps=2)
    objective.alpha_logits.data.fill_(0.5413)  # alpha = 1, the training default
    # 192 test images: one image's gain spans -3 to +4 dB, and over 12 the mean missed the floor ~1 run in 150
    train, test = _smooth_images(64), _smooth_images(192)
    untrained = {t: summarise(fastebm.restore_images(objective, test, task=t, seed=5))["psnr_gain"] for t in ("denoise", "mim")}
    optimizer = torch.optim.AdamW(objective.parameters(), lr=1e-2, weight_decay=0.0)
    for step in range(80):
        idx = torch.randint(0, len(train), (32,))
        clean, corrupted, weight, _ = prepare_batch(train[idx], ["mim", "denoise"], seed=0, offset=step,
                                                    sample_ids=torch.arange(32), patch_size=4)
        loss, _ = objective(clean, corrupted, weight)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    for task, floor in (("denoise", 0.8), ("mim", 0.3)):
        results = fastebm.restore_images(objective, test, task=task, seed=5)
        gain = summarise(results)["psnr_gain"]
        assert gain > floor and gain > untrained[task] + 0.2, (task, gain, untrained[task])


def test_steps_zero_and_bad_geometry_are_tool_input_errors():
    objective = tiny_vit_objective()
    image = torch.randint(0, 256, (3, 20, 20), dtype=torch.uint8)
    with pytest.raises(fastebm.tools.ToolInputError, match="steps"):
        fastebm.restore_images(objective, image, steps=0)
    with pytest.raises(fastebm.tools.ToolInputError, match="sr_factor 3 does not divide"):
        fastebm.restore_images(objective, image, task="sr", sr_factor=3)
    with pytest.raises(fastebm.tools.ToolInputError, match="overlap"):
        fastebm.restore_images(objective, image, overlap=6)


# ----------------------------------------------------------------------------- command line

def _save_checkpoint(path, img_size=16, steps=2):
    from fastebm.checkpoint import save_checkpoint
    from fastebm.train.config import TrainConfig

    cfg = TrainConfig(img_size=img_size, steps=steps)
    objective = fastebm.RestorationObjective(fastebm.create_model("vit_demo", img_size=img_size), steps=steps)
    with torch.no_grad():
        for p in objective.parameters():
            p.add_(0.01 * torch.randn_like(p))
    os.makedirs(path, exist_ok=True)
    save_checkpoint({"model": objective.state_dict(), "optimizer": {}, "step": 1, "config": cfg.to_dict(),
                     "rng": {}}, str(path))
    return os.path.join(str(path), "last.pt"), objective


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return _save_checkpoint(tmp_path_factory.mktemp("ckpt"))


def _write_images(folder, sizes):
    os.makedirs(folder, exist_ok=True)
    arrays = []
    for i, (h, w) in enumerate(sizes):
        arr = (np.random.rand(h, w, 3) * 255).astype(np.uint8)
        Image.fromarray(arr).save(os.path.join(folder, f"img{i}.png"))
        arrays.append(arr)
    return arrays


def _run(capsys, argv):
    code = restore_cli.main(argv)
    return code, capsys.readouterr()


def test_cli_restores_a_folder_writes_everything_and_skips_unreadable_files(tmp_path, checkpoint, capsys):
    ckpt, _ = checkpoint
    arrays = _write_images(tmp_path / "in" / "sub", [(23, 37), (16, 16), (9, 30)])
    (tmp_path / "in" / "broken.jpg").write_bytes(b"not a jpeg")
    out = tmp_path / "out"
    code, io = _run(capsys, ["--ckpt", ckpt, str(tmp_path / "in"), "-o", str(out), "--task", "denoise", "--steps", "3"])
    assert code == 0, io.err
    assert "broken.jpg" in io.err and "skipped" in io.err
    summary = json.loads((out / "results.json").read_text())
    assert [s["path"] for s in summary["skipped"]] == [str(tmp_path / "in" / "broken.jpg")]
    rows = summary["images"]
    assert len(rows) == 3 and summary["steps"] == 3 and len(summary["step_sizes"]) == 3
    assert summary["mean"]["psnr_per_step"][-1] == pytest.approx(np.mean([r["psnr_restored"] for r in rows]))
    assert summary["step_sizes"][2] == summary["step_sizes"][1]  # beyond T=2: the last learned step size
    for row, arr in zip(rows, arrays):
        restored = np.asarray(Image.open(out / row["restored"]), dtype=np.float64) / 255
        assert restored.shape == arr.shape
        assert os.path.isfile(out / row["strip"])
        assert len([k for k in row if k.startswith("energy_")]) == 4
        assert row["psnr_3"] == row["psnr_restored"] and row["psnr_1"] is not None
        # PSNR recomputed from the written 8-bit files (denoise: every pixel counts)
        clean = arr.astype(np.float64) / 255
        psnr = 10 * np.log10(1 / np.mean((restored - clean) ** 2))
        assert psnr == pytest.approx(row["psnr_restored"], abs=0.05)
        from skimage.metrics import structural_similarity

        win = min(7, min(arr.shape[:2]) - (1 - min(arr.shape[:2]) % 2))
        ssim = structural_similarity(clean, restored, channel_axis=2, data_range=1.0, win_size=win)
        assert ssim == pytest.approx(row["ssim_restored"], abs=0.02)
    csv_lines = (out / "metrics.csv").read_text().strip().splitlines()
    assert len(csv_lines) == 4 and "psnr_restored" in csv_lines[0]
    assert (out / "index.html").read_text().count("<img") == 3
    assert Image.open(out / "grid.png").size[0] > 0


def test_cli_already_corrupted_writes_energies_without_references(tmp_path, checkpoint, capsys):
    ckpt, _ = checkpoint
    _write_images(tmp_path / "in", [(40, 24)])
    out = tmp_path / "out"
    code, io = _run(capsys, ["--ckpt", ckpt, str(tmp_path / "in" / "img0.png"), "-o", str(out), "--already_corrupted"])
    assert code == 0, io.err
    row = json.loads((out / "results.json").read_text())["images"][0]
    assert row["psnr_restored"] is None and row["ssim_corrupted"] is None and row["task"] == "already_corrupted"
    assert all(np.isfinite(row[f"energy_{t}"]) for t in range(3))
    assert Image.open(out / row["restored"]).size == (24, 40)


def test_python_function_takes_a_checkpoint_path(checkpoint):
    ckpt, objective = checkpoint
    images = torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8)
    results = fastebm.restore_images(ckpt, images, task="mim", mask_ratio=0.5, device="cpu")
    clean, corrupted, _, _ = prepare_batch(images, ["mim"], seed=0, sample_ids=torch.arange(2), patch_size=4,
                                           params={"mim": {"ratio": 0.5}})
    expected = objective.eval().restore(corrupted)[-1]
    for i, r in enumerate(results):
        torch.testing.assert_close(r.restored, (expected[i].double() * STD + MEAN).clamp(0, 1).float(), atol=1e-5, rtol=0)


def test_one_folder_path_one_file_path_and_one_pil_image_are_each_a_whole_input(tmp_path, checkpoint):
    """A single path is not iterated per character; a single PIL image is one image."""
    ckpt, objective = checkpoint
    arrays = _write_images(tmp_path / "imgs", [(16, 16), (16, 16), (16, 16)])
    by_folder = fastebm.restore_images(ckpt, str(tmp_path / "imgs"), task="denoise", device="cpu")
    by_list = fastebm.restore_images(ckpt, [str(tmp_path / "imgs" / f"img{i}.png") for i in range(3)],
                                     task="denoise", device="cpu")
    assert len(by_folder) == 3
    for a, b in zip(by_folder, by_list):
        torch.testing.assert_close(a.restored, b.restored, rtol=0, atol=0)
    # image 0 keeps sample id 0 (its corruption draw) alone and in the folder
    [one_file] = fastebm.restore_images(ckpt, tmp_path / "imgs" / "img0.png", task="denoise", device="cpu")
    [one_pil] = fastebm.restore_images(ckpt, Image.fromarray(arrays[0]), task="denoise", device="cpu")
    torch.testing.assert_close(one_file.restored, one_pil.restored, rtol=0, atol=0)
    torch.testing.assert_close(one_file.restored, by_folder[0].restored, rtol=0, atol=0)
    energies = fastebm.energy_scores(ckpt, str(tmp_path / "imgs"), device="cpu")
    assert energies.shape == (3,) and torch.isfinite(energies).all()


@pytest.mark.parametrize("case", ["empty_dir", "all_unreadable", "missing", "wrong_ckpt", "backbone_ckpt",
                                  "sr_factor", "steps0", "unwritable", "task_and_corrupted"])
def test_cli_bad_input_exits_2_with_one_line(tmp_path, checkpoint, capsys, case):
    ckpt, objective = checkpoint
    _write_images(tmp_path / "imgs", [(20, 20)])
    images, out = str(tmp_path / "imgs"), str(tmp_path / "out")
    argv = ["--ckpt", ckpt, images, "-o", out]
    if case == "empty_dir":
        os.makedirs(tmp_path / "empty")
        argv[2] = str(tmp_path / "empty")
    elif case == "all_unreadable":
        (tmp_path / "bad").mkdir()
        (tmp_path / "bad" / "a.png").write_bytes(b"\x89PNG broken")
        argv[2] = str(tmp_path / "bad")
    elif case == "missing":
        argv[2] = str(tmp_path / "nope")
    elif case == "wrong_ckpt":
        torch.save({"weights": torch.zeros(3)}, tmp_path / "other.pt")
        argv[1] = str(tmp_path / "other.pt")
    elif case == "backbone_ckpt":
        torch.save(objective.model.backbone_state_dict(), tmp_path / "backbone.pth")
        argv[1] = str(tmp_path / "backbone.pth")
    elif case == "sr_factor":
        argv += ["--task", "sr", "--sr_factor", "3"]
    elif case == "steps0":
        argv += ["--steps", "0"]
    elif case == "unwritable":
        (tmp_path / "file").write_text("x")
        argv[4] = str(tmp_path / "file" / "out")
    else:
        argv += ["--task", "mim", "--already_corrupted"]
    code, io = _run(capsys, argv)
    assert code == 2
    lines = io.err.strip().splitlines()
    assert lines[-1].startswith("fastebm-restore: error: ") and "Traceback" not in io.err
    assert len([ln for ln in lines if "error" in ln]) == 1
