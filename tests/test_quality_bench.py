"""benchmarks/quality/run.py --quick: the quality study's plumbing end to end on a tiny budget.

Checks the outputs' structure (JSON, Markdown, PNG), that every accuracy is finite and in [0, 1],
that the Markdown table carries the JSON's numbers, that the commands are recorded, and the FLOP
counts (fastebm's T = 2 step counted with its double backward costs more than an MAE step).
Also: the MAE baseline's masking and loss against a direct computation, and the FLOP counter
against a hand count on a linear layer.
"""
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUALITY = os.path.join(ROOT, "benchmarks", "quality")
sys.path.insert(0, QUALITY)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("quality")
    cmd = [sys.executable, os.path.join(QUALITY, "run.py"), "--quick", "--output_dir", str(out), "--jobs", "2"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1200, cwd=ROOT,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


def test_quick_outputs_are_complete_and_in_range(quick_run):
    import arms as A
    import report as R

    data = json.loads((quick_run / "quality.json").read_text())
    assert data["meta"]["quick"] is True and data["meta"]["seeds"] == [0] and data["meta"]["arms"] == A.QUICK_ARMS
    for key in ("date_utc", "git_commit", "torch", "timm", "sklearn", "python"):
        assert key in data["env"], key
    assert data["meta"]["wall_s"] > 0 and data["meta"]["cpu_s"] > 0
    for name in A.QUICK_ARMS:
        metrics = data["arms"][name]["seeds"]["0"]["metrics"]
        for m in R.METRICS + R.FIT:
            assert m in metrics, (name, m)
            assert math.isfinite(metrics[m]) and 0.0 <= metrics[m] <= 1.0, (name, m, metrics[m])
        for m in R.DIAG:
            assert math.isfinite(metrics[m]) and metrics[m] > 0, (name, m)
        assert metrics["ft_100_steps"] >= 1
        summary = data["arms"][name]["summary"]
        assert summary["ft_100"]["mean"] == metrics["ft_100"] and summary["ft_100"]["n"] == 1
        # the header's step counts are the runs' own
        assert f"{metrics['ft_100_steps']:.0f} (100 labels)" in data["settings"]["finetune_steps"]
        # ... and so are their learning rates (the built-in blr at batch 32)
        from fastebm.eval.recipes import BLR_FEW, BLR_MANY, many_labels

        assert metrics["ft_100_lr"] == pytest.approx(BLR_FEW * 32 / 256)
        # --quick's "all" is a few-shot subset: its lr is the one resolve_blr gives that many labels
        flags = A.Budget(quick=True).label_sets()["all"]
        n_all = 10 * int(flags[flags.index("--few_shot") + 1]) if flags else 1300
        expected = BLR_MANY if many_labels(n_all, 10) else BLR_FEW
        assert metrics["ft_all_lr"] == pytest.approx(expected * 32 / 256)
        assert f"{metrics['ft_100_lr']:g} (100 labels)" in data["settings"]["finetune_lr"]
    assert data["arms"]["fastebm"]["seeds"]["0"]["pretrain"]["step"] == 2
    jobs = data["jobs"]
    assert jobs and all(j["rc"] == 0 for j in jobs)
    assert all(c.startswith("python ") for j in jobs for c in j["commands"])
    finetunes = [c for j in jobs for c in j["commands"] if " eval finetune " in c]
    assert len(finetunes) == 2 * len(A.QUICK_ARMS) and any("--init random" in c for c in finetunes)
    assert {c["check"].split(" ")[1] for c in data["checks"]} >= {"ft_100", "lp_100", "knn_all"}


def test_quick_table_carries_the_json_numbers(quick_run):
    import arms as A
    import report as R

    data = json.loads((quick_run / "quality.json").read_text())
    table = (quick_run / "quality.md").read_text()
    assert "QUICK" in table and data["meta"]["argv"] in table
    # the header states the probe budget the quick run used, not the full recipe's step count
    assert f"LARS with `{' '.join(A.Budget(quick=True).linprobe_extra())}` (quick)" in table and "1800" not in table
    for name, arm in data["arms"].items():
        row = next(line for line in table.splitlines() if line.startswith(f"| {arm['label']} |"))
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[3] == f"{A.eval_px(A.ARMS[name])} px" == f"{arm['eval_img_size']} px"
        got = [float(c) for c in cells[4:4 + len(R.METRICS)]]
        want = [arm["summary"][m]["mean"] for m in R.METRICS]
        assert got == pytest.approx(want, abs=5e-4), (name, row)
    for name in ("quality.png", "quality_curves.png"):
        png = (quick_run / name).read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000, name


def test_quick_run_records_fine_tuning_curves(quick_run):
    import report as R

    data = json.loads((quick_run / "quality.json").read_text())
    for name, arm in data["arms"].items():
        rec = arm["seeds"]["0"]
        for part in ("ft_100", "ft_all"):
            curve = rec["curves"][part]
            # against the run's own per-epoch log, which the report does not read
            log = [json.loads(line) for line in (quick_run / "runs" / "eval" / f"{name}_s0" / part / "metrics.jsonl").open()]
            assert len(log) == 3 and curve["train_loss"] == [r["train_loss"] for r in log]
            assert curve["val_top1"][1:] == [r["val_top1"] for r in log if "val_top1" in r]
            assert curve["loss_step"][-1] == rec["metrics"][f"{part}_steps"]  # the trainer's own update count
            assert curve["val_step"][0] == 0.0 and 0.0 <= curve["val_top1"][0] <= 1.0  # the LP-FT probe: step 0
            assert rec["metrics"][f"{part}_loss_first"] == log[0]["train_loss"]
            assert rec["metrics"][f"{part}_loss_peak"] == max(r["train_loss"] for r in log)
        for m in R.SPIKE:
            assert m in rec["metrics"], (name, m)


def test_ft_curve_maps_epochs_to_optimiser_steps():
    import random

    import report as R

    rng = random.Random(int(torch.randint(0, 10_000, ())))
    epochs, per_epoch = rng.randint(5, 17), rng.randint(2, 9)
    every = rng.randint(2, 4)
    hist = [dict(epoch=e, train_loss=rng.uniform(0.5, 6.0)) for e in range(1, epochs + 1)]
    for h in hist:
        if h["epoch"] % every == 0 or h["epoch"] == epochs:
            h["val_top1"] = rng.uniform(0.1, 0.9)
    probe = rng.uniform(0.1, 0.9)
    summary = dict(history=hist, updates=epochs * per_epoch, epochs_done=epochs, probe=dict(top1=probe))
    c = R.ft_curve(summary)
    assert c["loss_step"] == [float(e * per_epoch) for e in range(1, epochs + 1)]
    assert c["train_loss"] == [h["train_loss"] for h in hist]
    with_val = [h for h in hist if "val_top1" in h]
    assert c["val_step"] == [0.0] + [float(h["epoch"] * per_epoch) for h in with_val]
    assert c["val_top1"] == [probe] + [h["val_top1"] for h in with_val]
    del summary["probe"]  # a random head: no step-0 point
    assert R.ft_curve(summary)["val_step"][0] == float(with_val[0]["epoch"] * per_epoch)
    # an interrupted run: its updates include a partial epoch; the step grid comes from the data size
    batch, accum, world = rng.randint(2, 8), rng.randint(1, 3), rng.randint(1, 3)
    n = per_epoch * batch * accum * world + rng.randint(0, batch - 1)  # drop_last: the remainder is no step
    summary.update(train_images=n, world_size=world, config=dict(batch_size=batch, accum_iter=accum),
                   updates=epochs * per_epoch + rng.randint(1, per_epoch), epochs_done=epochs)
    assert R.ft_curve(summary)["loss_step"] == [float(e * per_epoch) for e in range(1, epochs + 1)]


def test_quick_flops(quick_run):
    fl = json.loads((quick_run / "quality.json").read_text())["flops"]
    assert fl["fastebm_defaults_gflop_per_step"] > fl["mae_gflop_per_step"] > 0
    assert fl["ratio"] == pytest.approx(fl["fastebm_defaults_gflop_per_step"] / fl["mae_gflop_per_step"])
    import arms as A

    # MAE at equal FLOPs trains the study's fastebm epochs times the FLOP ratio of one step to one step
    assert fl["mae_equal_flops_epochs"] == pytest.approx(A.PRETRAIN_EPOCHS * fl["ratio"])


def test_flop_counter_counts_a_linear_layer_and_its_backward():
    import flops

    n, d_in, d_out = 7, 13, 5
    layer = torch.nn.Linear(d_in, d_out)
    x = torch.randn(n, d_in, requires_grad=True)
    # forward 2*n*d_in*d_out; backward: grad of the input and of the weight, the same again each
    assert flops.count(lambda: layer(x).sum().backward()) == 3 * 2 * n * d_in * d_out


def test_mae_masks_three_quarters_and_scores_only_masked_patches():
    import mae

    torch.manual_seed(int(torch.randint(0, 10_000, ())))
    model = mae.build(seed=3)
    x = torch.randn(3, 3, 32, 32)
    loss, pred, mask = model(x)
    n = (32 // 4) ** 2
    assert pred.shape == (3, n, 4 * 4 * 3) and mask.shape == (3, n)
    assert torch.equal(mask.sum(1), torch.full((3,), float(n - n // 4)))
    # the loss, recomputed from the patches directly (float64, norm_pix_loss, masked mean)
    p = x.double().unfold(2, 4, 4).unfold(3, 4, 4)  # (B, C, 8, 8, 4, 4)
    patches = p.permute(0, 2, 3, 4, 5, 1).reshape(3, n, 48)
    target = (patches - patches.mean(-1, keepdim=True)) / (patches.var(-1, keepdim=True) + 1e-6).sqrt()
    per = ((pred.detach().double() - target) ** 2).mean(-1)
    assert loss.detach().item() == pytest.approx(float((per * mask).sum() / mask.sum()), rel=1e-5)
    loss.backward()
    assert model.encoder.blocks[0].attn.qkv.weight.grad.abs().sum() > 0


def test_mae_at_16px_masks_three_quarters_of_its_16_patches_and_costs_less(tmp_path):
    """mae.py --img_size 16: 16 patches, 4 visible; its step costs less than at 32 px, so equal FLOPs buy
    more epochs (run.py's flops table), and a two-step run writes a 16 px backbone fastebm-eval reads."""
    import flops
    import mae
    from fastebm.eval.backbone import read_backbone

    model = mae.build(seed=int(torch.randint(0, 10_000, ())), img_size=16)
    x = torch.randn(5, 3, 16, 16)
    loss, pred, mask = model(x)
    assert pred.shape == (5, 16, 48) and torch.equal(mask.sum(1), torch.full((5,), 12.0))
    p = x.double().unfold(2, 4, 4).unfold(3, 4, 4).permute(0, 2, 3, 4, 5, 1).reshape(5, 16, 48)
    target = (p - p.mean(-1, keepdim=True)) / (p.var(-1, keepdim=True) + 1e-6).sqrt()
    per = ((pred.detach().double() - target) ** 2).mean(-1)
    assert loss.detach().item() == pytest.approx(float((per * mask).sum() / mask.sum()), rel=1e-5)
    assert 0 < flops.mae_step_flops(batch_size=4, img_size=16) < flops.mae_step_flops(batch_size=4, img_size=32)
    out = tmp_path / "m16"
    assert mae.main(["--output_dir", str(out), "--epochs", "1", "--max_steps", "2", "--img_size", "16"]) == 0
    assert read_backbone(str(out / "backbone.pth")).eval_img_size == 16
    assert json.loads((out / "summary.json").read_text())["img_size"] == 16
    with pytest.raises(SystemExit):
        mae.main(["--output_dir", str(tmp_path / "m18"), "--epochs", "1", "--img_size", "18"])
    assert not (tmp_path / "m18").exists()


def test_mae_refuses_to_replace_a_finished_run_without_overwrite(tmp_path, capsys):
    """mae.py into a folder holding a backbone: a one-line usage error and the backbone untouched;
    --overwrite replaces it with the new run's (another seed: other weights)."""
    import mae

    out = tmp_path / "m"
    seed = int(torch.randint(0, 10_000, ()))
    assert mae.main(["--output_dir", str(out), "--epochs", "1", "--max_steps", "1", "--img_size", "16", "--seed", str(seed)]) == 0
    before = (out / "backbone.pth").read_bytes()
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        mae.main(["--output_dir", str(out), "--epochs", "1", "--max_steps", "1", "--img_size", "16", "--seed", str(seed + 1)])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "holds a finished MAE run" in err and "--overwrite" in err and "Traceback" not in err
    assert (out / "backbone.pth").read_bytes() == before
    assert mae.main(["--output_dir", str(out), "--epochs", "1", "--max_steps", "1", "--img_size", "16",
                     "--seed", str(seed + 1), "--overwrite"]) == 0
    assert (out / "backbone.pth").read_bytes() != before
    assert json.loads((out / "summary.json").read_text())["seed"] == seed + 1


def test_every_arm_is_evaluated_at_its_pretraining_size_unless_it_names_one():
    """Round 12's protocol: each evaluation command names --img_size; it is the size the arm's backbone was
    pretrained at (an untrained init: vit_demo's pretraining size), except the arms measured at 32 px before."""
    import arms as A
    from fastebm.models import pretrain_img_size

    for name, arm in A.ARMS.items():
        cmds = [c for cs in A.eval_commands(arm, 0, "p", "e", A.Budget()).values() for c in cs]
        sizes = {c[c.index("--img_size") + 1] for c in cmds if "--img_size" in c}
        from_src = [c for c in cmds if "--ckpt" not in c or c[c.index("--ckpt") + 1].startswith("p")]
        assert all("--img_size" in c for c in from_src), name
        assert sizes == {str(A.eval_px(arm))}, name
        if arm.eval_img_size:
            assert A.eval_px(arm) == arm.eval_img_size
        elif arm.kind == "fastebm":
            flags = arm.flags
            assert A.eval_px(arm) == (int(flags[flags.index("--img_size") + 1]) if "--img_size" in flags
                                      else pretrain_img_size("vit_demo"))
    assert [A.eval_px(A.ARMS[a]) for a in A.DEFAULT_ARMS] == [16] * len(A.DEFAULT_ARMS)  # every default arm at 16 px


def test_quick_run_reports_the_pixel_reference(quick_run):
    data = json.loads((quick_run / "quality.json").read_text())
    ref = data["reference_pixels"]
    for metric in ("lp_100", "lp_all"):
        assert set(ref[metric]) == {"0"} and 0.1 < ref[metric]["0"] <= 1.0
    assert "logistic regression on the raw pixels" in (quick_run / "quality.md").read_text()


def test_pixel_reference_uses_fastebm_evals_labelled_sets():
    """pixels.py claims the labelled sets of fastebm-eval: its --few_shot draw is the images fastebm-eval trains on."""
    import numpy as np

    from fastebm.eval.config import make_config
    from fastebm.eval.datasets import builtin_digit_split, few_shot_indices, load_eval_data

    x_tr, y_tr, _, _ = builtin_digit_split(32)
    seed = 7
    data = load_eval_data(make_config("linprobe", init="random", few_shot=10, seed=seed), 32)
    idx = few_shot_indices(y_tr.tolist(), 10, seed, [str(c) for c in range(10)])
    assert [int(y_tr[i]) for i in idx] == data.train.labels
    ours = np.stack([np.asarray(data.train[i][0])[..., 0] for i in range(len(idx))])
    assert np.array_equal(ours, x_tr[idx][:, 0].numpy())


def test_acceptance_marks_gaps_inside_the_seed_spread():
    import random

    import report as R

    rng = random.Random()
    summary = lambda mean, std: {"mean": mean, "std": std, "n": 3}  # noqa: E731
    ft, lp, std_ft, std_lp = 0.6 + 0.3 * rng.random(), 0.5 * rng.random(), 0.01 + 0.05 * rng.random(), 0.01 + 0.05 * rng.random()
    close = ft - 0.5 * min(std_ft, std_lp)  # a random-init arm just below fastebm, inside the spread
    arms = {"fastebm": {"summary": {"ft_all": summary(ft, std_ft), "lp_all": summary(lp, std_lp)}},
            "random_timm": {"summary": {"ft_all": summary(close, std_lp), "lp_all": summary(lp - 0.2, None)}}}
    checks = {c["check"]: c for c in R.acceptance(arms)}
    vs_random = checks["fastebm ft_all > stronger random init (random_timm)"]
    assert vs_random["pass"] and vs_random["noise"] == max(std_ft, std_lp)
    assert R._verdict(vs_random) == "PASS (within noise)"
    vs_probe = checks["fastebm ft_all > lp_all (same labels)"]
    assert vs_probe["pass"] and R._verdict(vs_probe) == ("PASS" if ft - lp >= max(std_ft, std_lp) else "PASS (within noise)")
    lp_check = checks["fastebm lp_all > stronger random init (random_timm)"]
    assert lp_check["noise"] == std_lp and R._verdict(lp_check) == ("PASS" if 0.2 >= std_lp else "PASS (within noise)")


def test_the_stretch_check_compares_with_the_stronger_mae_at_equal_flops():
    """With MAE at equal FLOPs at two sizes in a report, each stretch check names and uses the stronger one."""
    import random

    import report as R

    rng = random.Random()
    summary = lambda mean: {"mean": mean, "std": 0.01, "n": 3}  # noqa: E731
    a, b = rng.random(), rng.random()
    arms = {"fastebm": {"summary": {"ft_100": summary(0.5), "ft_all": summary(0.5)}},
            "mae_flops": {"summary": {"ft_100": summary(a), "ft_all": summary(b)}},
            "mae_flops_16px": {"summary": {"ft_100": summary(b), "ft_all": summary(a)}}}
    checks = [c for c in R.acceptance(arms) if c["check"].startswith("stretch")]
    assert len(checks) == 2
    for c, metric in zip(checks, ("ft_100", "ft_all")):
        best = max(("mae_flops", "mae_flops_16px"), key=lambda n: arms[n]["summary"][metric]["mean"])
        assert c["check"].endswith(f"({best})") and c["theirs"] == max(a, b) and c["pass"] == (0.5 >= max(a, b))


def test_paired_differences_use_only_the_shared_seeds():
    import random
    import statistics

    import report as R

    rng = random.Random()
    seeds_a = {str(s): {"metrics": {"ft_all": rng.random(), "lp_all": rng.random()}} for s in range(5)}
    seeds_b = {str(s): {"metrics": {"ft_all": rng.random()}} for s in (1, 2, 4, 7)}  # seed 7 only in b, 0 and 3 only in a
    seeds_b["2"]["metrics"]["ft_all"] = None  # a run without a result is left out, not counted as 0
    arms = {"fastebm": {"seeds": seeds_a}, "random_timm": {"seeds": seeds_b}}
    diffs = [seeds_a[s]["metrics"]["ft_all"] - seeds_b[s]["metrics"]["ft_all"] for s in ("1", "4")]
    p = R.paired(arms, "fastebm", "ft_all", "random_timm", "ft_all")
    assert p["n"] == 2 and p["wins"] == sum(d > 0 for d in diffs)
    assert math.isclose(p["mean"], statistics.fmean(diffs), rel_tol=1e-12)
    assert math.isclose(p["std"], statistics.stdev(diffs), rel_tol=1e-9)
    within = R.paired(arms, "fastebm", "ft_all", "fastebm", "lp_all")  # ft vs lp of one arm: all five seeds
    assert within["n"] == 5
    assert math.isclose(within["mean"], statistics.fmean(v["metrics"]["ft_all"] - v["metrics"]["lp_all"] for v in seeds_a.values()))
    assert R.paired(arms, "random_timm", "lp_all", "fastebm", "lp_all") is None
    assert "higher in" in R._paired_text(p) and R._paired_text(None) == ""
    # wins counts the seeds where the FIRST arm is higher: two of three here, whatever the random values
    lo, hi = sorted(rng.random() for _ in range(2))
    order = {"0": (hi, lo), "1": (hi + 0.1, lo), "2": (lo, hi)}
    a = {s: {"metrics": {"m": x}} for s, (x, _) in order.items()}
    b = {s: {"metrics": {"m": y}} for s, (_, y) in order.items()}
    assert R.paired({"a": {"seeds": a}, "b": {"seeds": b}}, "a", "m", "b", "m")["wins"] == 2
    # a NaN result is left out like a missing one; nothing finite left gives None
    a["0"]["metrics"]["m"] = float("nan")
    assert R.paired({"a": {"seeds": a}, "b": {"seeds": b}}, "a", "m", "b", "m")["n"] == 2
    assert R.paired({"a": {"seeds": {"0": a["0"]}}, "b": {"seeds": b}}, "a", "m", "b", "m") is None


def test_acceptance_pairs_each_check_with_the_arm_it_compares():
    import random

    import report as R

    rng = random.Random()
    seeds = ("0", "1", "2", "3")
    # timm's init fine-tuned at its own lr (round 13) has the fine-tuning metric only: it competes there alone
    metrics_of = {"fastebm": ("ft_all", "lp_all"), "random_timm": ("ft_all", "lp_all"), "random_fastebm": ("ft_all", "lp_all"),
                  "random_timm_blr32e-3": ("ft_all",)}
    per_seed = {arm: {s: {"metrics": {m: rng.random() for m in ms}} for s in seeds} for arm, ms in metrics_of.items()}
    arms = {}
    for arm, recs in per_seed.items():
        summary = {k: dict(zip(("mean", "std", "n"), R.mean_std([r["metrics"][k] for r in recs.values()]))) for k in metrics_of[arm]}
        arms[arm] = {"seeds": recs, "summary": summary}
    checks = R.acceptance(arms)
    assert set(R.RANDOM_ARMS) >= set(metrics_of) - {"fastebm"}
    for c in checks:
        metric = c["check"].split(" ")[1]
        if "stronger random init" in c["check"]:
            other = c["check"].split("(")[1].rstrip(")")
            assert other == max((a for a in metrics_of if a != "fastebm" and metric in metrics_of[a]),
                                key=lambda a: arms[a]["summary"][metric]["mean"])
            want = [per_seed["fastebm"][s]["metrics"][metric] - per_seed[other][s]["metrics"][metric] for s in seeds]
        else:  # ft_all > lp_all of the same arm
            want = [per_seed["fastebm"][s]["metrics"]["ft_all"] - per_seed["fastebm"][s]["metrics"]["lp_all"] for s in seeds]
        assert c["paired"]["n"] == 4 and math.isclose(c["paired"]["mean"], sum(want) / 4, rel_tol=1e-9, abs_tol=1e-12)
    assert len(checks) == 3


def test_an_evaluation_only_arm_reuses_its_base_arms_pretraining(tmp_path, monkeypatch):
    """An arm with ``pretrained_as`` runs no pretraining of its own: its jobs wait for the base arm's
    run and read its backbone; ``ft_flags`` reach fine-tuning only, and ``parts`` limits the jobs."""
    import arms as A
    import run as RUN

    from fastebm.eval.config import parse_args

    extra = A.Arm("fastebm_ft_test", "test arm", "fastebm", pretrained_as="fastebm", ft_flags=["--blr", "0.0123"],
                  parts=["ft_all"])
    monkeypatch.setitem(A.ARMS, extra.name, extra)
    jobs = RUN.build_jobs(["fastebm", extra.name], [0, 3], str(tmp_path), A.Budget(), {"arms": {}})
    assert sorted(j.name for j in jobs if j.part == "pretrain") == ["pretrain/fastebm_s0", "pretrain/fastebm_s3"]
    mine = [j for j in jobs if j.arm == extra.name]
    assert sorted((j.part, j.seed) for j in mine) == [("ft_all", 0), ("ft_all", 3)]
    for j in mine:
        assert j.deps == [f"pretrain/fastebm_s{j.seed}"]
        (tmp_path / "pretrain" / f"fastebm_s{j.seed}").mkdir(parents=True, exist_ok=True)
        (tmp_path / "pretrain" / f"fastebm_s{j.seed}" / "backbone.pth").write_bytes(b"x")  # parse_args checks it exists
        ft = j.commands[0]
        _, cfg = parse_args(ft[ft.index("eval") + 1:])
        assert cfg.blr == pytest.approx(0.0123) and cfg.seed == j.seed
        assert cfg.ckpt == os.path.join(str(tmp_path), "pretrain", f"fastebm_s{j.seed}", "backbone.pth")
        assert all("--blr" not in c for c in j.commands[1:])  # the re-probe keeps its own recipe
    base = [j.commands[0] for j in jobs if j.arm == "fastebm" and j.part == "ft_all"]
    assert len(base) == 2 and all("--blr" not in c for c in base)
    assert {j.part for j in jobs if j.arm == "fastebm"} == {"pretrain", "frozen", "ft_100", "ft_all"}


@pytest.mark.parametrize("group", ["blr4e-3", "blr32e-3"])
def test_the_other_blr_groups_repeat_the_compared_arms_all_label_fine_tuning(tmp_path, group):
    """--arms blr4e-3 / blr32e-3: the compared arms, and each one's all-label fine-tuning at another lr, from the
    same backbone (random inits: --init, no pretraining; fastebm: its own pretraining run, once)."""
    import arms as A
    import run as RUN
    from fastebm.eval.recipes import BLR_MANY

    names = A.GROUPS[group]
    assert all(n in A.ARMS for n in names) and set(A.COMPARED) < set(names)
    assert float(A.OTHER_BLRS[group]) != BLR_MANY  # another lr than today's built-in with all labels
    jobs = RUN.build_jobs(names, [2], str(tmp_path), A.Budget(), {"arms": {}})
    assert [j.name for j in jobs if j.part == "pretrain"] == ["pretrain/fastebm_s2"]
    for base in A.COMPARED:
        mine = [j for j in jobs if j.arm == f"{base}_{group}"]
        assert [j.part for j in mine] == ["ft_all"]
        ft = mine[0].commands[0]
        assert ft[ft.index("--blr") + 1] == A.OTHER_BLRS[group] and "--few_shot" not in ft
        base_ft = next(j for j in jobs if j.arm == base and j.part == "ft_all").commands[0]
        assert "--blr" not in base_ft  # the default arm fine-tunes at the built-in rate
        src = ft[ft.index("finetune") + 1:ft.index("--seed")]
        assert src == base_ft[base_ft.index("finetune") + 1:base_ft.index("--seed")]  # the same backbone


@pytest.mark.parametrize("group", ["ft1000steps", "ft400steps"])
def test_the_budget_groups_repeat_the_compared_arms_all_label_fine_tuning_shorter(tmp_path, group):
    """--arms ft1000steps / ft400steps: each compared arm's all-label fine-tuning with fewer epochs, from the same
    backbone; the budget the arm's name promises is what fastebm-eval resolves for all 1,300 digits."""
    import arms as A
    import run as RUN
    from fastebm.eval.config import parse_args
    from fastebm.eval.recipes import RECIPES, UPDATE_BUDGET_MANY

    names = A.GROUPS[group]
    assert set(A.COMPARED) < set(names)
    jobs = RUN.build_jobs(names, [1], str(tmp_path), A.Budget(), {"arms": {}})
    assert [j.name for j in jobs if j.part == "pretrain"] == ["pretrain/fastebm_s1"]
    promised = int(group[len("ft"):-len("steps")])
    assert promised < UPDATE_BUDGET_MANY
    (tmp_path / "pretrain" / "fastebm_s1").mkdir(parents=True)
    (tmp_path / "pretrain" / "fastebm_s1" / "backbone.pth").write_bytes(b"x")  # parse_args checks it exists
    batch = RECIPES["small"]["finetune"]["batch_size"]
    for base in A.COMPARED:
        mine = [j for j in jobs if j.arm == f"{base}_{group}"]
        assert [j.part for j in mine] == ["ft_all"]
        ft = mine[0].commands[0]
        _, cfg = parse_args(ft[ft.index("eval") + 1:])
        assert cfg.epochs * (1300 // batch) == promised and cfg.few_shot is None
        base_ft = next(j for j in jobs if j.arm == base and j.part == "ft_all").commands[0]
        assert "--epochs" not in base_ft and "--blr" not in ft
        assert ft[ft.index("finetune") + 1:ft.index("--seed")] == base_ft[base_ft.index("finetune") + 1:base_ft.index("--seed")]


def test_shrink_perturb_matches_float64_and_round_trips(tmp_path):
    """shrink_perturb.py: lambda * theta + sigma * fresh per tensor (float64 reference); the written file is what
    fastebm-eval --ckpt reads; at (1, 0) it reproduces --init random's own starting weights exactly."""
    import shrink_perturb as SP
    from fastebm.eval.backbone import init_backbone, read_backbone

    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, ())))
    shapes = {"a": (3, 7), "b": (5,), "c": (2, 3, 5)}
    state = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    fresh = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    lam, sig = 0.37 + 0.5 * float(torch.rand((), generator=g)), 0.05 + 0.2 * float(torch.rand((), generator=g))
    out = SP.shrink_perturb(state, fresh, lam, sig)
    for k in shapes:
        ref = lam * state[k].double() + sig * fresh[k].double()
        assert torch.allclose(out[k].double(), ref, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError):
        SP.shrink_perturb(state, {**fresh, "a": torch.randn(3, 8)}, lam, sig)

    seed = 3
    path = str(tmp_path / "sp.pth")
    assert SP.main(["--src", "random", "--seed", str(seed), "--shrink", str(lam), "--perturb", str(sig), "--out", path]) == 0
    written = read_backbone(path).state
    bb = init_backbone("random", "vit_demo", 32, seed)  # shrink_perturb.py builds round 7's 32 px backbones
    theta, theta_fresh = SP.timm_init_state(bb, seed), SP.timm_init_state(bb, seed + SP.FRESH_SEED_OFFSET)
    assert set(written) == set(theta) and not torch.equal(theta["blocks.0.attn.qkv.weight"], theta_fresh["blocks.0.attn.qkv.weight"])
    for k, v in written.items():
        assert torch.allclose(v.double(), lam * theta[k].double() + sig * theta_fresh[k].double(), atol=1e-6)
    # the fresh init never reads the source's own weights (a backbone file as --src)
    assert all(torch.equal(v, theta[k]) for k, v in SP.timm_init_state(read_backbone(path), seed).items())
    # --src fastebm_init shrinks EnergyViT's own init (fastebm-eval --init fastebm --seed S), perturbed by timm's fresh one
    ebm = str(tmp_path / "ebm.pth")
    SP.main(["--src", "fastebm_init", "--seed", str(seed), "--shrink", str(lam), "--perturb", str(sig), "--out", ebm])
    own = init_backbone("fastebm", "vit_demo", 32, seed).state
    assert not torch.equal(own["blocks.0.attn.qkv.weight"], theta["blocks.0.attn.qkv.weight"])
    for k, v in read_backbone(ebm).state.items():
        assert torch.allclose(v.double(), lam * own[k].double() + sig * theta_fresh[k].double(), atol=1e-6)
    same = str(tmp_path / "same.pth")
    SP.main(["--src", "random", "--seed", str(seed), "--shrink", "1", "--perturb", "0", "--out", same])
    from fastebm.eval.timm_vit import build_classifier

    model = build_classifier(bb, 10, img_size=None, global_pool="avg", drop_path_rate=0.0, head_init_std=2e-5, seed=seed)
    own = model.state_dict()
    assert all(torch.equal(v, own[k]) for k, v in read_backbone(same).state.items())


def test_recipe_pilot_grids_build_valid_commands(tmp_path):
    """Every recipe of every recipe_pilot grid parses as a fastebm-eval finetune command with the recipe's lr, layer
    decay, crop and budget; shrink-and-perturb recipes start from the file their prep command writes."""
    import recipe_pilot as P
    from fastebm.eval.config import parse_args

    split = str(tmp_path / "split")
    os.makedirs(split)
    for grid, names in P.GRIDS.items():
        assert names and set(names) <= set(P.RECIPES), grid
        for recipe in names:
            head_init, steps, blr, scale_min, drop_path, *other = P.RECIPES[recipe]
            extra = other[0] if other else {}
            labels = 100 if steps == 1000 and scale_min < 1 else 1000
            out = str(tmp_path / f"{recipe}_s1")
            px = 16 if grid.startswith("round13") else P.PILOT_PX
            cmd = P.command(split, "random", labels, recipe, 1, out, px)
            if "shrink_perturb" in extra:  # fastebm-eval checks that the starting file exists
                open(P.start_file(out), "wb").close()
            command, cfg = parse_args(cmd[3:])
            assert cfg.img_size == px  # the untrained init is built at the pilot's size, not vit_demo's default
            assert command == "finetune" and cfg.blr == blr and cfg.scale_min == scale_min and cfg.head_init == head_init
            assert cfg.layer_decay == extra.get("layer_decay", 0.75) and cfg.drop_path == drop_path
            per_epoch = (100 if labels == 100 else 1000) // 32
            assert steps <= cfg.epochs * per_epoch < steps + per_epoch
            prep = P.prep_command("random", recipe, 1, out)
            if "shrink_perturb" in extra:
                assert cfg.ckpt == P.start_file(out) and cfg.init is None
                shrink, perturb = extra["shrink_perturb"]
                assert prep[prep.index("--out") + 1] == cfg.ckpt
                assert prep[prep.index("--src") + 1] == "random" and prep[prep.index("--seed") + 1] == "1"
                assert float(prep[prep.index("--shrink") + 1]) == shrink and float(prep[prep.index("--perturb") + 1]) == perturb
            else:
                assert prep is None and cfg.init == "random" and cfg.ckpt is None


def test_pretraining_without_val_never_sees_a_validation_digit(tmp_path, monkeypatch):
    """pretrain_without_val.py: fastebm-train's built-in data keeps its length, photo crops and every split-train
    digit, holds no validation digit of valsplit.py's split, and labels each slot with its image's label."""
    import pretrain_without_val as PV
    import fastebm.train.build as build
    from fastebm.data.builtin import BuiltinDemoData
    from fastebm.eval.datasets import builtin_digit_split
    from valsplit import split_indices

    monkeypatch.setattr(build, "BuiltinDemoData", BuiltinDemoData)  # restored after the test
    PV.install()
    img_size, seed = 20, int(torch.randint(0, 1000, ()))
    plain, patched = BuiltinDemoData(img_size, seed), build.BuiltinDemoData(img_size, seed)
    x, y, _, _ = builtin_digit_split(img_size)
    train, val = split_indices(y.numpy())
    assert len(patched) == len(plain) and patched.train_digits.shape == plain.train_digits.shape

    def nearest(a, b):  # exact distances (no matmul shortcut), so 0 means the same image
        return torch.cdist(a.flatten(1).double(), b.flatten(1).double(), compute_mode="donot_use_mm_for_euclid_dist").min(1)

    assert (nearest(x[val], patched.train_digits).values > 0).all()  # no validation digit left
    assert (nearest(x[train], patched.train_digits).values == 0).all()  # every split-train digit kept
    d, idx = nearest(patched.train_digits, x)
    assert (d == 0).all() and torch.equal(patched.train_digit_labels, y[idx])
    i = len(plain.train_digits) + int(torch.randint(0, plain.num_photo_crops, ()))
    assert torch.equal(patched.load(i, 1)[0], plain.load(i, 1)[0])  # photo crops untouched
    # the command's own training run builds its data through the patched class
    calls = []
    real = PV.without_val_digits
    monkeypatch.setattr(PV, "without_val_digits", lambda *a: calls.append(1) or real(*a))
    out = str(tmp_path / "run")
    threads, rng = torch.get_num_threads(), torch.get_rng_state()
    try:
        assert PV.main(["--output_dir", out, "--max_steps", "1", "--grid_every", "0", "--demo_eval", "false", "--threads", "1"]) == 0
    finally:  # fastebm-train sets both for its process; leave the rest of the session as it was
        torch.set_num_threads(threads)
        torch.set_rng_state(rng)
    assert calls and os.path.exists(os.path.join(out, "backbone.pth"))


def test_pretraining_without_the_digits_sees_only_photo_crops(tmp_path, monkeypatch):
    """photos_only.py (round 15): the built-in data's length, held-out split and photo crops, with a photo crop in
    every digit slot (no pixel-exact digit anywhere); fastebm-train and mae.py build their data through it, and the
    photos arms' pretraining commands ask for it."""
    import arms as A
    import mae
    import photos_only as P
    import fastebm.train.build as build
    from fastebm.data.builtin import BuiltinDemoData, digits_uint8

    img_size, seed, epoch = 12, int(torch.randint(0, 1000, ())), int(torch.randint(0, 5, ()))
    plain, photos = BuiltinDemoData(img_size, seed), P.PhotosOnlyData(img_size, seed)
    assert len(photos) == len(plain) and torch.equal(photos.held_out.digits, plain.held_out.digits)
    n = len(plain.train_digits)
    slots = torch.randperm(n)[:40].tolist()
    crops = torch.stack([photos.load(i, epoch)[0] for i in slots])
    assert {photos.load(i, epoch)[1] for i in slots} == {-1}
    all_digits = digits_uint8(img_size)[0]
    d = torch.cdist(crops.flatten(1).double(), all_digits.flatten(1).double(), compute_mode="donot_use_mm_for_euclid_dist")
    assert (d.min(1).values > 0).all()  # a digit slot holds no digit
    # and photo crops, not blanks or grey digits: a crop can fall on a flat patch of a photo (about one crop in
    # 2,000 is constant, all from one photo's flat region), so most, not all, of the 40 carry texture and colour
    textured = crops.float().std(dim=(1, 2, 3)) > 0
    coloured = (crops[:, 0] != crops[:, 1]).flatten(1).any(1) | (crops[:, 1] != crops[:, 2]).flatten(1).any(1)
    assert textured.sum() >= 30 and coloured.sum() >= 30
    # the photo slots are the built-in data's crops; the digit slots draw fresh ones, different per epoch
    i = n + int(torch.randint(0, plain.num_photo_crops, ()))
    assert torch.equal(photos.load(i, epoch)[0], plain.load(i, epoch)[0])
    # (one photo's dark border makes two crops equal ~1 in 350: any of 8 slots differs)
    assert any(not torch.equal(photos.load(s, epoch)[0], photos.load(s, epoch + 1)[0]) for s in slots[:8])
    assert photos.summary()["train_digits"] == 0 and photos.summary()["photo_crops_per_epoch"] == len(plain)
    with pytest.raises(ValueError, match="choose one of builtin, photos"):
        P.data_class("digits")
    # the arms: the same FLOPs arm and defaults, pretrained through this module
    fe, mf = A.ARMS["fastebm_photos"], A.ARMS["mae_flops_16px_photos"]
    budget = A.Budget()
    assert A.pretrain_command(fe, 0, "OUT", budget)[1] == os.path.join(QUALITY, "photos_only.py")
    assert A.pretrain_command(fe, 0, "OUT", budget)[2:] == A.pretrain_command(A.ARMS["fastebm"], 0, "OUT", budget)[4:]
    cmd = A.pretrain_command(mf, 0, "OUT", budget, mae_epochs=76.9)
    assert cmd[-2:] == ["--pretrain_data", "photos"] and cmd[:-2] == A.pretrain_command(A.ARMS["mae_flops_16px"], 0, "OUT", budget, 76.9)
    # fastebm-train and mae.py run on it
    monkeypatch.setattr(build, "BuiltinDemoData", BuiltinDemoData)  # restored after the test
    loads = []
    real_load = P.PhotosOnlyData.load
    monkeypatch.setattr(P.PhotosOnlyData, "load", lambda self, i, e: loads.append(i) or real_load(self, i, e))
    threads, rng = torch.get_num_threads(), torch.get_rng_state()
    try:
        assert P.main(["--output_dir", str(tmp_path / "fe"), "--max_steps", "1", "--grid_every", "0", "--demo_eval", "false",
                       "--threads", "1"]) == 0
    finally:  # fastebm-train sets both for its process; leave the rest of the session as it was
        torch.set_num_threads(threads)
        torch.set_rng_state(rng)
    assert len(loads) >= 32 and os.path.exists(tmp_path / "fe" / "backbone.pth")  # its batch came from PhotosOnlyData
    loads.clear()
    assert mae.main(["--output_dir", str(tmp_path / "m"), "--epochs", "1", "--max_steps", "1", "--img_size", "16",
                     "--pretrain_data", "photos"]) == 0
    assert len(loads) == 32 and json.loads((tmp_path / "m" / "summary.json").read_text())["pretrain_data"] == "photos"
    assert P.main(["--data", str(tmp_path)]) == 2  # --data would replace the data this script changes


def test_a_smaller_pretraining_batch_costs_the_same_flops_in_more_steps(monkeypatch):
    """The FLOPs table counts a --batch_size arm's steps at its own batch: the built-in data's images over that
    batch (the last partial batch dropped) per epoch, so a quarter of the batch is four times the steps and, with
    a quarter of the FLOPs per step, about the same training FLOPs as the defaults."""
    import arms as A
    import run as RUN
    from fastebm.data.builtin import BuiltinDemoData

    import flops

    def fake_step_flops(flags):  # FLOPs proportional to the batch: the table's arithmetic, not the counter, is tested
        return 1.37e9 * (int(flags[flags.index("--batch_size") + 1]) if "--batch_size" in flags else 32)

    monkeypatch.setattr(flops, "fastebm_step_flops", fake_step_flops)
    monkeypatch.setattr(flops, "mae_step_flops", lambda batch_size=32, img_size=32: 0.11e9 * batch_size * (img_size / 32) ** 2)
    bs = 8 + int(torch.randint(0, 20, ()))  # an odd batch too
    arm = A.Arm(f"fastebm_bs{bs}_test", "test arm", "fastebm", flags=["--batch_size", str(bs)])
    monkeypatch.setitem(A.ARMS, arm.name, arm)
    fl = RUN.flops_table(["fastebm", "fastebm_32px_2ep", "fastebm_bs8", arm.name, "mae_flops", "mae_flops_16px",
                          "mae_epochs_16px"], A.Budget())
    # MAE at equal FLOPs: the fastebm defaults' 8 epochs x the ratio of the two steps at the MAE arm's own size
    for name, px in (("mae_flops", 32), ("mae_flops_16px", 16)):
        assert fl["arms"][name]["epochs"] == pytest.approx(8 * 1.37e9 * 32 / (0.11e9 * 32 * (px / 32) ** 2))
        assert fl["arms"][name]["pflop"] == pytest.approx(fl["arms"]["fastebm"]["pflop"], rel=0.01)
    assert fl["arms"]["mae_epochs_16px"]["epochs"] == 8
    assert fl["mae_img_size"] == A.MAE_PX and fl["ratio"] == pytest.approx(1.37e9 / (0.11e9 * (A.MAE_PX / 32) ** 2))
    n = len(BuiltinDemoData(32, 0))
    # each arm beside the batch-32 arm with its epochs (the defaults' 8, or the 2 of the 32 px variants)
    for name, b, same_epochs in [("fastebm", 32, "fastebm"), ("fastebm_32px_2ep", 32, "fastebm_32px_2ep"),
                                 ("fastebm_bs8", 8, "fastebm_32px_2ep"), (arm.name, bs, "fastebm")]:
        row = fl["arms"][name]
        epochs = A.train_epochs(A.ARMS[name])
        assert epochs == A.train_epochs(A.ARMS[same_epochs])
        assert row["steps"] == round(epochs * (n // b)), name
        assert row["pflop"] == pytest.approx(b * 1.37e9 * row["steps"] / 1e15)
        assert row["pflop"] == pytest.approx(fl["arms"][same_epochs]["pflop"], rel=b / n + 32 / n)
    assert A.train_epochs(A.ARMS["fastebm"]) == 8 and A.train_epochs(A.ARMS["fastebm_bs8"]) == 2


def test_compare_plots_only_the_seeds_every_arm_shares(tmp_path, capsys):
    """compare.py merges an arm's seeds over the reports (the first report holding a seed wins), keeps the seeds
    all chosen arms share, prints paired differences that match a direct computation, and names a missing arm
    instead of plotting without it."""
    import compare
    from scipy import stats

    gen = torch.Generator().manual_seed(int(torch.randint(0, 10_000, ())))

    def report(path, arms_seeds):
        arms = {a: {"label": a.upper(), "seeds": {str(s): {"metrics": {m: float(torch.rand((), generator=gen))
                                                                          for m, _ in compare.METRICS}} for s in seeds}}
                for a, seeds in arms_seeds.items()}
        path.write_text(json.dumps({"arms": arms}))
        return str(path)

    r1 = report(tmp_path / "a.json", {"x": [0, 1, 2, 3], "y": [1, 2, 3]})
    r2 = report(tmp_path / "b.json", {"x": [2, 5], "z": [0, 2, 3, 5, 7]})
    first = json.loads((tmp_path / "a.json").read_text())["arms"]
    second = json.loads((tmp_path / "b.json").read_text())["arms"]
    data = compare.collect([r1, r2], ["x", "z"])
    assert set(data["x"]["seeds"]) == {0, 1, 2, 3, 5}  # seed 5 from the second report
    assert data["x"]["seeds"][2] == first["x"]["seeds"]["2"]  # the first report's seed 2 wins
    out = tmp_path / "cmp.png"
    assert compare.main(["--reports", r1, r2, "--arms", "x,y,z", "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "(seeds [2, 3])" in capsys.readouterr().out  # x has 0-3 and 5, y 1-3, z 0, 2, 3, 5, 7

    assert compare.main(["--reports", r1, r2, "--arms", "z,x", "--paired", "z"]) == 0
    table = capsys.readouterr().out
    shared = [0, 2, 3, 5]
    for m, _ in compare.METRICS:
        x = {0: first["x"]["seeds"]["0"], 2: first["x"]["seeds"]["2"], 3: first["x"]["seeds"]["3"],
             5: second["x"]["seeds"]["5"]}
        d = np.array([x[s]["metrics"][m] - second["z"]["seeds"][str(s)]["metrics"][m] for s in shared], dtype=np.float64)
        p = stats.ttest_1samp(d, 0).pvalue
        assert f"{d.mean():+.3f} ± {d.std(ddof=1):.3f}, {int((d > 0).sum())} of 4 (p {p:.3f})" in table, m
    with pytest.raises(SystemExit, match="share no seed"):
        compare.main(["--reports", r1, r2, "--arms", "x,y", "--seeds", "0", "--out", str(out)])
    with pytest.raises(SystemExit, match=r"\['w'\]"):
        compare.main(["--reports", r1, r2, "--arms", "x,w", "--out", str(out)])
    with pytest.raises(SystemExit, match="not one of"):
        compare.main(["--reports", r1, r2, "--arms", "x,z", "--paired", "y"])
    with pytest.raises(SystemExit, match="at least one more arm"):  # nothing to compare it to: no empty table
        compare.main(["--reports", r1, r2, "--arms", "x", "--paired", "x"])
    # an arm whose name outlived what it runs (another cost per step or other epochs) is not merged
    for other in ({"gflop_per_step": 10.68, "epochs": 8.0}, {"gflop_per_step": 44.54, "epochs": 8.0}):
        for path, cost in ((r1, {"gflop_per_step": 44.54, "epochs": 2.0}), (r2, other)):
            d = json.loads(open(path).read())
            d["flops"] = {"arms": {"x": cost}}
            open(path, "w").write(json.dumps(d))
        with pytest.raises(SystemExit, match="'x' ran differently"):
            compare.collect([r1, r2], ["x", "z"])
        assert set(compare.collect([r1, r2], ["y", "z"])) == {"y", "z"}  # the other arms still merge
    # ... nor one evaluated at another size (a report before round 12 holds no size: every arm ran at 32 px)
    for path in (r1, r2):
        d = json.loads(open(path).read())
        d.pop("flops", None)
        open(path, "w").write(json.dumps(d))
    assert set(compare.collect([r1, r2], ["x", "z"])) == {"x", "z"}
    d = json.loads(open(r2).read())
    d["arms"]["x"]["eval_img_size"] = 16
    open(r2, "w").write(json.dumps(d))
    with pytest.raises(SystemExit, match="'x' ran differently"):
        compare.collect([r1, r2], ["x", "z"])
    d["arms"]["x"]["eval_img_size"] = 32
    open(r2, "w").write(json.dumps(d))
    merged = compare.collect([r1, r2], ["x", "z"])
    assert set(merged) == {"x", "z"} and "evaluated at" not in merged["x"]["label"]
    # arms evaluated at different sizes may be compared, and their labels say so
    d["arms"]["z"]["eval_img_size"] = 16
    open(r2, "w").write(json.dumps(d))
    merged = compare.collect([r1, r2], ["x", "z"])
    assert merged["x"]["label"].endswith("[evaluated at 32 px]") and merged["z"]["label"].endswith("[evaluated at 16 px]")
    # a texture report (round 14) is never merged with a digits report (no "benchmark": the digits), even for an
    # arm that ran the same commands, and arms of two benchmarks are not compared
    d["arms"]["z"]["eval_img_size"] = 32
    d["meta"] = {"benchmark": "textures"}
    open(r2, "w").write(json.dumps(d))
    with pytest.raises(SystemExit, match="'x' ran differently"):
        compare.collect([r1, r2], ["x", "z"])
    with pytest.raises(SystemExit, match="different benchmarks"):
        compare.collect([r1, r2], ["y", "z"])
    d["meta"] = {"benchmark": "digits"}
    open(r2, "w").write(json.dumps(d))
    assert set(compare.collect([r1, r2], ["x", "y", "z"])) == {"x", "y", "z"}


def test_the_quick_run_records_every_jobs_commands(quick_run):
    """Every job of the quick run left a record of its commands, which a second build of the same study matches."""
    import arms as A
    import run as RUN

    data = json.loads((quick_run / "quality.json").read_text())
    jobs = RUN.build_jobs(A.QUICK_ARMS, [0], data["meta"]["work_dir"], A.Budget(quick=True), data["flops"])
    assert jobs and all(os.path.isfile(j.stamp) and os.path.isfile(j.done_file) for j in jobs)
    assert RUN.reuse_conflicts(jobs) == []


def test_a_work_dir_made_by_other_commands_is_refused(tmp_path, monkeypatch, capsys):
    """Finished jobs are reused by folder name, so run.py records each job's commands (and the pretraining
    command of the backbone it evaluates) and refuses a work dir whose outputs came from other commands:
    a changed arm, or outputs without a record."""
    import arms as A
    import run as RUN

    work = str(tmp_path / "work")
    names, budget, fl = ["random_timm", "fastebm"], A.Budget(quick=True), {"arms": {}}
    jobs = RUN.build_jobs(names, [0], work, budget, fl)
    assert RUN.reuse_conflicts(jobs) == []
    for job in jobs:  # as if every job had run
        RUN.write_stamp(job)
        os.makedirs(os.path.dirname(job.done_file), exist_ok=True)
        open(job.done_file, "w").close()
    assert RUN.reuse_conflicts(RUN.build_jobs(names, [0], work, budget, fl)) == []
    flags = ["--steps", str(1 + int(torch.randint(0, 3, ())))]  # what the arm runs changes, its name does not
    monkeypatch.setitem(A.ARMS, "fastebm", A.Arm("fastebm", "changed", "fastebm", flags=flags))
    changed = RUN.reuse_conflicts(RUN.build_jobs(names, [0], work, budget, fl))
    ours = [j.name for j in jobs if j.arm == "fastebm"]
    assert sorted(changed) == sorted(ours) and len(ours) == 1 + len(A.eval_commands(A.ARMS["fastebm"], 0, "p", "e", budget))
    monkeypatch.undo()
    timm_job = next(j for j in jobs if j.arm == "random_timm")
    os.remove(timm_job.stamp)  # finished outputs with no record of their commands
    assert RUN.reuse_conflicts(RUN.build_jobs(names, [0], work, budget, fl)) == [timm_job.name]
    assert RUN.main(["--quick", "--arms", ",".join(names), "--work_dir", work, "--output_dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert timm_job.name in err and "fresh --work_dir" in err
    assert not os.path.exists(tmp_path / "out" / "quality.json")


def test_the_chart_draws_no_bar_for_a_metric_an_arm_did_not_run(tmp_path, monkeypatch):
    """An arm that runs one part only (e.g. timm's init fine-tuned at its own lr) gets bars where it has
    numbers and nothing elsewhere: no zero-height bar that reads as a result of 0."""
    import matplotlib.axes
    import report as R

    rng = np.random.default_rng()
    full = {m: {"mean": float(rng.uniform(0.3, 0.99)), "std": float(rng.uniform(0, 0.05))} for m in R.METRICS}
    part = {"ft_all": {"mean": float(rng.uniform(0.3, 0.99)), "std": None}}
    data = {"arms": {"a": {"label": "A", "summary": full}, "b": {"label": "B", "summary": part}},
            "meta": {"seeds": [0]}, "reference_pixels": {}}
    drawn = {}
    real_bar = matplotlib.axes.Axes.bar

    def bar(self, x, height, *args, **kwargs):
        drawn[kwargs["label"]] = (list(np.asarray(x)), list(np.asarray(height)))
        return real_bar(self, x, height, *args, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "bar", bar)
    R.plot(data, str(tmp_path / "q.png"))
    assert (tmp_path / "q.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert drawn["A"][1] == pytest.approx([full[m]["mean"] for m in R.METRICS])
    xs, heights = drawn["B"]
    assert heights == pytest.approx([part["ft_all"]["mean"]]) and len(xs) == 1
    assert round(xs[0]) == R.METRICS.index("ft_all")  # in the fine-tuning group, beside arm A's bar


def test_an_evaluation_only_arm_shares_its_pretraining_run(tmp_path):
    """Round 17's arm evaluates MAE's 16 px equal-FLOPs backbones at 32 px: one pretraining job (with the FLOPs
    table's equal-FLOPs epochs) serves both arms, and only the evaluation size differs."""
    import arms as A
    import run as RUN

    names, seed = ["mae_flops_16px", "mae_flops_16px_eval32px"], int(torch.randint(0, 100, ()))
    budget = A.Budget()
    fl = RUN.flops_table(names, budget)
    assert fl["arms"][names[1]] == fl["arms"][names[0]] and fl["arms"][names[0]]["epochs"] == fl["mae_equal_flops_epochs"]
    jobs = RUN.build_jobs(names, [seed], str(tmp_path), budget, fl)
    pre = [j for j in jobs if j.part == "pretrain"]
    assert [j.name for j in pre] == [f"pretrain/mae_flops_16px_s{seed}"]
    ev = {n: [j for j in jobs if j.arm == n and j.part != "pretrain"] for n in names}
    assert all(len(v) == 3 and all(j.deps == [pre[0].name] for j in v) for v in ev.values())
    sizes = {n: {c[c.index("--img_size") + 1] for j in v for c in j.commands if "--img_size" in c} for n, v in ev.items()}
    assert sizes == {names[0]: {"16"}, names[1]: {"32"}}


def test_linear_cka_matches_the_hsic_definition_in_float64():
    """ft_drift.linear_cka against CKA written from HSIC with a centring matrix (Kornblith et al. 2019, eq. 3-4), on
    random features of odd sizes; 1 for a rotated, scaled and shifted copy, below 1 for unrelated features."""
    import ft_drift as D

    rng = np.random.default_rng()
    n, p, q = 37, 5, 11
    x = rng.normal(size=(n, p)).astype(np.float32)
    y = (x @ rng.normal(size=(p, q)) + 0.7 * rng.normal(size=(n, q))).astype(np.float32)
    h = np.eye(n) - np.ones((n, n)) / n

    def hsic(a, b):
        return np.trace(a @ a.T @ h @ b @ b.T @ h)

    x64, y64 = x.astype(np.float64), y.astype(np.float64)
    want = hsic(x64, y64) / np.sqrt(hsic(x64, x64) * hsic(y64, y64))
    assert D.linear_cka(x, y) == pytest.approx(want, rel=1e-6) and 0 < want < 1
    rot, _ = np.linalg.qr(rng.normal(size=(p, p)))
    assert D.linear_cka(x, 3.0 * x @ rot + 5.0) == pytest.approx(1.0, abs=1e-9)
    assert D.linear_cka(x, rng.normal(size=(n, q))) < 0.9


def test_weight_drift_groups_the_backbone_and_leaves_out_the_head():
    """ft_drift.drift: per block (and patch_embed, pos_embed with cls_token, norm) the norm of the change over the norm
    of the start, in float64; the head never counts."""
    import ft_drift as D

    g = torch.Generator().manual_seed(int(np.random.default_rng().integers(2 ** 31)))
    names = ["cls_token", "pos_embed", "patch_embed.proj.weight", "blocks.0.attn.qkv.weight", "blocks.0.mlp.fc1.bias",
             "blocks.2.norm1.weight", "norm.weight", "head.weight"]
    start = {k: torch.randn(3, 5, generator=g) for k in names}
    end = {k: v + torch.randn(3, 5, generator=g) * 0.1 for k, v in start.items()}
    got = D.drift(start, end)
    assert set(got) == {"pos_embed", "patch_embed", "block0", "block2", "norm"}

    def ref(keys):
        d = sum(float(((end[k].double() - start[k].double()) ** 2).sum()) for k in keys)
        return (d / sum(float((start[k].double() ** 2).sum()) for k in keys)) ** 0.5

    assert got["block0"] == pytest.approx(ref(["blocks.0.attn.qkv.weight", "blocks.0.mlp.fc1.bias"]), rel=1e-12)
    assert got["pos_embed"] == pytest.approx(ref(["cls_token", "pos_embed"]), rel=1e-12)
    assert D.drift(start, start)["block2"] == 0.0


def test_ft_drift_rebuilds_the_start_a_finetune_run_began_from(tmp_path):
    """A fine-tuning run at a negligible lr leaves every backbone group where ft_drift rebuilds its start (drift
    ~0, CKA ~1), so the start is the same seeded init; a run at the built-in lr has moved."""
    import ft_drift as D

    seed = int(np.random.default_rng().integers(1, 1000))
    for name, lr in (("still", "1e-12"), ("moved", "0.004")):
        proc = subprocess.run([sys.executable, "-m", "fastebm", "eval", "finetune", "--init", "random", "--few_shot", "4", "--batch_size", "8",
                               "--epochs", "2", "--lr", lr, "--min_lr", "0", "--img_size", "16", "--seed", str(seed), "--output_dir",
                               str(tmp_path / name)], capture_output=True, text=True, timeout=600, cwd=ROOT,
                              env=dict(os.environ, OMP_NUM_THREADS="1"))
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    still = D.measure(str(tmp_path / "still"), images=64)
    moved = D.measure(str(tmp_path / "moved"), images=64)
    assert set(still["drift"]) == {"patch_embed", "pos_embed", "norm", *(f"block{i}" for i in range(4))}
    assert max(still["drift"].values()) < 1e-6 and min(still["cka"].values()) > 1 - 1e-6
    assert max(moved["drift"].values()) > 1e-3
    assert D.main([str(tmp_path / "moved"), str(tmp_path / "nothing"), "--out", str(tmp_path / "d.json")]) == 0
    assert [r["run"] for r in json.loads((tmp_path / "d.json").read_text())["runs"]] == [str(tmp_path / "moved")]
