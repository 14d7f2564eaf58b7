"""fastebm-score and fastebm.energy_scores: energies against the model called directly, OOD metrics
against brute-force float64 definitions, the CLI on folders and on the built-in case, bad input."""
import csv
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

import fastebm
from fastebm.cli import score as score_cli
from fastebm.corrupt import IMAGENET_MEAN, IMAGENET_STD
from fastebm.tools import energy_trajectories, ood_metrics

from test_restore_tool import _save_checkpoint, ref_starts, tiny_vit_objective

MEAN = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
STD = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)


def normalised(images_uint8):
    return (images_uint8.float() / 255 - MEAN) / STD


# ----------------------------------------------------------------------------- metrics

def brute_force_metrics(e_in, e_out):
    """Definitions, not library calls: pair counting, a threshold sweep, step-wise average precision."""
    s_in, s_out = -np.asarray(e_in, np.float64), -np.asarray(e_out, np.float64)
    wins = (s_in[:, None] > s_out[None, :]).sum() + 0.5 * (s_in[:, None] == s_out[None, :]).sum()
    auroc = wins / (len(s_in) * len(s_out))
    fpr95 = min((s_out >= thr).mean() for thr in np.unique(np.concatenate([s_in, s_out]))
                if (s_in >= thr).mean() >= 0.95)

    def average_precision(pos, neg):
        ap, prev_recall = 0.0, 0.0
        for thr in np.unique(np.concatenate([pos, neg]))[::-1]:  # decreasing thresholds
            tp, fp = (pos >= thr).sum(), (neg >= thr).sum()
            recall = tp / len(pos)
            ap += (recall - prev_recall) * tp / (tp + fp)
            prev_recall = recall
        return ap

    return {"auroc": auroc, "fpr_at_95_tpr": fpr95, "aupr_in": average_precision(s_in, s_out),
            "aupr_out": average_precision(-s_out, -s_in)}


@pytest.mark.parametrize("n_in,n_out", [(37, 23), (101, 9)])
def test_ood_metrics_match_their_definitions_with_ties(n_in, n_out):
    e_in = np.round(np.random.randn(n_in) * 2, 1)  # rounding makes ties within and across the sets
    e_out = np.round(np.random.randn(n_out) * 2 + float(np.random.rand()) * 2, 1)
    got = ood_metrics(e_in, e_out)
    want = brute_force_metrics(e_in, e_out)
    for key, value in want.items():
        assert got[key] == pytest.approx(value, abs=1e-12), key
    assert got["n_in"] == n_in and got["n_out"] == n_out


def test_ood_metrics_drop_non_finite_energies_and_count_them():
    e_in, e_out = np.random.randn(20), np.random.randn(15) + 1
    got = ood_metrics(np.append(e_in, np.nan), np.append(e_out, np.inf))
    assert got["dropped_nonfinite"] == 2 and got["auroc"] == pytest.approx(ood_metrics(e_in, e_out)["auroc"])


# ----------------------------------------------------------------------------- energies

def test_energy_scores_equal_the_model_on_model_sized_images():
    objective = tiny_vit_objective()
    images = torch.randint(0, 256, (7, 3, 16, 16), dtype=torch.uint8)
    with torch.no_grad():
        expected = objective.model(normalised(images)).double()
    torch.testing.assert_close(fastebm.energy_scores(objective, images, batch_size=3), expected, rtol=1e-5, atol=1e-5)


def test_energy_of_a_large_image_is_the_mean_over_its_tiles():
    objective = tiny_vit_objective()
    image = torch.randint(0, 256, (3, 44, 61), dtype=torch.uint8)  # padded to 44x64 (patch multiple), overlap 4
    padded = torch.cat([image, image[:, :, -1:].expand(-1, -1, 3)], dim=2)
    x = normalised(padded[None])[0]
    tiles = torch.stack([x[:, t:t + 16, l:l + 16] for t in ref_starts(44, 16, 4) for l in ref_starts(64, 16, 4)])
    with torch.no_grad():
        expected = objective.model(tiles).double().mean()
    got = fastebm.energy_scores(objective, [image])
    assert got.shape == (1,) and float(got[0]) == pytest.approx(float(expected), rel=1e-5)
    resized = fastebm.energy_scores(objective, [image], resize=True)
    assert float(resized[0]) != pytest.approx(float(expected), rel=1e-3)


def test_energy_trajectories_follow_objective_restore():
    objective = tiny_vit_objective(steps=2)
    images = torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8)
    traj = energy_trajectories(objective, images, steps=2)
    xs = objective.restore(normalised(images))
    with torch.no_grad():
        expected = torch.stack([objective.model(x) for x in xs], dim=1).double()
    assert traj.shape == (4, 3)
    torch.testing.assert_close(traj, expected, rtol=1e-5, atol=1e-5)


def test_unreadable_file_gives_a_nan_row(tmp_path):
    objective = tiny_vit_objective()
    Image.fromarray((np.random.rand(16, 16, 3) * 255).astype(np.uint8)).save(tmp_path / "a.png")
    (tmp_path / "b.png").write_bytes(b"broken")
    with pytest.warns(UserWarning, match="b.png"):
        scores = fastebm.energy_scores(objective, [str(tmp_path / "a.png"), str(tmp_path / "b.png")])
    assert torch.isfinite(scores[0]) and torch.isnan(scores[1])


# ----------------------------------------------------------------------------- command line

@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return _save_checkpoint(tmp_path_factory.mktemp("ckpt"))[0]


def _folder(path, n, size, kind):
    os.makedirs(path, exist_ok=True)
    for i in range(n):
        h, w = size
        arr = (np.random.rand(h, w, 3) * 255) if kind == "noise" else np.full((h, w, 3), np.random.rand() * 255)
        Image.fromarray(arr.astype(np.uint8)).save(os.path.join(path, f"{i}.png"))
    return str(path)


def test_cli_scores_folders_and_its_metrics_match_the_csv(tmp_path, checkpoint, capsys):
    flat = _folder(tmp_path / "flat", 6, (16, 20), "flat")
    noise = _folder(tmp_path / "noise", 5, (24, 16), "noise")
    noise2 = _folder(tmp_path / "more" / "noise", 4, (16, 16), "noise")
    out = tmp_path / "out"
    code = score_cli.main(["--ckpt", checkpoint, "--in", flat, "--ood", noise, noise2, "-o", str(out),
                           "--restore_steps", "1", "--random_init"])
    io = capsys.readouterr()
    assert code == 0, io.err
    with open(out / "energies.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 2 * (6 + 5 + 4)
    assert {r["set"] for r in rows} == {"flat", "noise", "noise_2"} and {r["model"] for r in rows} == {"checkpoint", "random init"}
    summary = json.loads((out / "ood.json").read_text())
    assert len(summary["metrics"]) == 2 * 2 * 2  # models x scores x out-sets
    for m in summary["metrics"]:
        pick = lambda s: [float(r[m["score"]]) for r in rows if r["model"] == m["model"] and r["set"] == s]
        inside, outside = pick("flat"), pick(m["out_set"])
        want = brute_force_metrics(inside, outside)
        # the CSV holds 6 significant digits: two energies that print alike tie there (half a win) and not in ood.json
        ties = sum(a == b for a in inside for b in outside)
        assert m["auroc"] == pytest.approx(want["auroc"], abs=1e-4 + 0.5 * ties / (len(inside) * len(outside)))
    assert (out / "energy_hist.png").stat().st_size > 0 and "AUROC" in (out / "ood.md").read_text()


def test_cli_builtin_case_with_a_checkpoint_writes_table_and_histogram(tmp_path, checkpoint, capsys):
    out = tmp_path / "out"
    code = score_cli.main(["--ckpt", checkpoint, "-o", str(out)])
    io = capsys.readouterr()
    assert code == 0, io.err
    summary = json.loads((out / "ood.json").read_text())
    assert summary["builtin"] and summary["in_set"] == "digits"
    assert summary["sets"] == {"digits": 497, "photos": 128, "noise": 497, "blurred_digits": 497}
    pairs = {(m["model"], m["out_set"]) for m in summary["metrics"]}
    assert pairs == {(model, s) for model in ("checkpoint", "random init") for s in ("photos", "noise", "blurred_digits")}
    assert all(0.0 <= m["auroc"] <= 1.0 for m in summary["metrics"])
    assert "| random init | energy | noise |" in io.out and (out / "energy_hist.png").is_file()


@pytest.mark.parametrize("case", ["ood_without_in", "no_default_ckpt", "negative_steps", "wrong_ckpt", "empty_in",
                                  "unwritable"])
def test_cli_bad_input_exits_2_with_one_line(tmp_path, checkpoint, capsys, monkeypatch, case):
    flat = _folder(tmp_path / "flat", 2, (16, 16), "flat")
    argv = ["--ckpt", checkpoint, "--in", flat, "--ood", flat, "-o", str(tmp_path / "out")]
    if case == "ood_without_in":
        argv = ["--ckpt", checkpoint, "--ood", flat, "-o", str(tmp_path / "out")]
    elif case == "no_default_ckpt":
        monkeypatch.chdir(tmp_path)
        argv = argv[2:]
    elif case == "negative_steps":
        argv += ["--restore_steps", "-1"]
    elif case == "wrong_ckpt":
        torch.save({"state_dict": {}}, tmp_path / "x.pt")
        argv[1] = str(tmp_path / "x.pt")
    elif case == "empty_in":
        os.makedirs(tmp_path / "empty")
        argv[3] = str(tmp_path / "empty")
    else:
        (tmp_path / "f").write_text("")
        argv[-1] = str(tmp_path / "f" / "out")
    code = score_cli.main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("fastebm-score: error: "), err
