"""fastebm-eval finetune --head_init (LP-FT), the training accuracy, and the built-in probe schedule.

* the LP-FT head against scikit-learn's own pipeline (StandardScaler + LogisticRegression): the
  folded linear layer gives the same decision function, for many classes and for two;
* MAE's probe head folded into one linear layer against the head itself in eval mode;
* end to end: a fine-tuning run that starts from the probe and barely moves (lr 1e-12) scores
  exactly what its probe scored, and its head is the probe that a reference pipeline (a separate
  feature extraction + scikit-learn) fits; ``zero`` starts from a zero head;
* the built-in linear probe's step budget whatever the number of labels; the built-in fine-tuning's
  budget (1,000 steps with few labels, 2,000 with many), crop and gradient clipping, and that
  ``--clip_grad`` bounds the gradient norm of every fine-tuning step.
"""
import math

import numpy as np
import pytest
import torch

import fastebm.eval as fe
from fastebm.errors import UsageError
from fastebm.cli.eval import main
from fastebm.eval.config import make_config
from fastebm.eval.probe import fold_head, logistic_head, make_head
from fastebm.eval.recipes import (BLR_FEW, BLR_MANY, CROP_SCALE_MIN_FEW, CROP_SCALE_MIN_MANY, MANY_PER_CLASS, PROBE_UPDATE_BUDGET,
                                   RECIPES, UPDATE_BUDGET, UPDATE_BUDGET_MANY, resolve_blr, resolve_crop, resolve_probe_schedule,
                                   resolve_schedule)
from test_eval_support import image_folder, trained_checkpoint


def _sklearn_probe(f, y, seed):
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=5000, random_state=seed)).fit(f, y)


@pytest.mark.parametrize("classes", [2, 5])
def test_logistic_head_is_sklearns_probe_on_raw_features(classes):
    g = torch.Generator().manual_seed(int(torch.randint(0, 10_000, ())))
    n, d = 13 * classes, 11
    y = torch.arange(classes).repeat_interleave(13)
    # features with their own offsets and scales per dimension (the scaler must be folded in); scales from 0.5, as a
    # near-constant column makes the folded float32 weights large and its offset cancel (1e-5 missed ~1 run in 20,000)
    f = torch.randn(n, d, generator=g) * (0.5 + 3 * torch.rand(d, generator=g)) + torch.randn(d, generator=g) * 5
    f += 0.8 * torch.randn(classes, d, generator=g)[y]
    w, b = logistic_head(f, y, classes, seed=0)
    assert w.shape == (classes, d) and b.shape == (classes,) and w.dtype == torch.float32
    ref = _sklearn_probe(f.double().numpy(), y.numpy(), 0)
    scores = (f.double() @ w.double().T + b.double()).numpy()
    if classes == 2:  # one sklearn logit z = decision_function; the pair (-z/2, z/2) differs by z
        np.testing.assert_allclose(scores[:, 1] - scores[:, 0], ref.decision_function(f.double().numpy()), rtol=1e-4, atol=1e-4)
    else:
        np.testing.assert_allclose(scores, ref.decision_function(f.double().numpy()), rtol=1e-4, atol=1e-4)
    probs = torch.softmax(torch.from_numpy(scores), 1).numpy()
    np.testing.assert_allclose(probs, ref.predict_proba(f.double().numpy()), atol=1e-5)


def test_logistic_head_refuses_a_missing_class():
    from fastebm.errors import UsageError

    with pytest.raises(UsageError, match="every class"):
        logistic_head(torch.randn(6, 3), torch.tensor([0, 0, 1, 1, 3, 3]), 4, seed=0)


def test_fold_head_is_the_eval_mode_probe():
    g = torch.Generator().manual_seed(int(torch.randint(0, 10_000, ())))
    head = make_head(9, 4, 0.3, seed=1)
    with torch.no_grad():
        head[0].running_mean.copy_(torch.randn(9, generator=g) * 2)
        head[0].running_var.copy_(torch.rand(9, generator=g) * 3 + 0.05)
        head[1].bias.copy_(torch.randn(4, generator=g))
    f = torch.randn(17, 9, generator=g) * 2 + 1
    w, b = fold_head(head)
    ref = head.eval()(f.double().float()).double()
    torch.testing.assert_close(f.double() @ w.double().T + b.double(), ref, rtol=1e-5, atol=1e-5)


def _reference_features(ckpt, root, split, size):
    """Mean normed patch tokens of every image of root/split, by a separate pipeline (timm + PIL by hand)."""
    import os

    from PIL import Image
    from timm.models.vision_transformer import VisionTransformer

    from fastebm.eval.backbone import read_backbone

    bb = read_backbone(ckpt)
    model = VisionTransformer(**{**bb.arch, "img_size": size}, num_classes=0).eval()
    from fastebm.eval.timm_vit import resample_state

    model.load_state_dict(resample_state(bb.state, model))
    mean, std = torch.tensor(bb.mean).view(3, 1, 1), torch.tensor(bb.std).view(3, 1, 1)
    feats, labels = [], []
    for label, name in enumerate(sorted(os.listdir(os.path.join(root, split)))):
        for file in sorted(os.listdir(os.path.join(root, split, name))):
            img = Image.open(os.path.join(root, split, name, file)).convert("RGB").resize((size, size), Image.BICUBIC)
            x = (torch.from_numpy(np.array(img)).permute(2, 0, 1).float() / 255 - mean) / std
            with torch.no_grad():
                feats.append(model.forward_features(x[None])[0, 1:].mean(0))
            labels.append(label)
    return torch.stack(feats).double().numpy(), np.array(labels)


def test_lpft_starts_from_the_probe_end_to_end(tmp_path):
    root = image_folder(tmp_path / "data", size=16, per_class=(7, 6, 6), val_per_class=5)
    out = tmp_path / "ft"
    s = fe.finetune(ckpt=trained_checkpoint(), data=root, head_init="probe", lr=1e-12, min_lr=0.0, epochs=2,
                    warmup_epochs=0, batch_size=4, num_workers=0, crop_pct=1.0, mixup=0.0, cutmix=0.0,
                    img_size=16, output_dir=str(out))
    assert s["head_init"] == "probe" and 0.0 <= s["probe"]["top1"] <= 1.0 and s["probe"]["pool"] == "avg"
    # the weights barely move, so the fine-tuned classifier scores what its starting probe scored
    assert [r["val_top1"] for r in s["history"]] == [s["probe"]["top1"]] * 2
    # ... and that head is the probe a separate pipeline fits on separately extracted features
    f_tr, y_tr = _reference_features(trained_checkpoint(), root, "train", 16)
    f_va, _ = _reference_features(trained_checkpoint(), root, "val", 16)
    ref = _sklearn_probe(f_tr, y_tr, 0)
    head = torch.load(out / "checkpoint.pt", weights_only=True)["model"]
    ours = f_va @ head["head.weight"].double().numpy().T + head["head.bias"].double().numpy()
    np.testing.assert_allclose(ours, ref.decision_function(f_va), rtol=2e-3, atol=2e-3)
    for r in s["history"]:
        assert 0.0 <= r["train_top1"] <= 1.0 and abs(r["train_top1"] * 16 - round(r["train_top1"] * 16)) < 1e-9
    assert s["train_top1"] == s["history"][-1]["train_top1"]
    assert "LP-FT" in (out / "results.md").read_text() and "train top-1" in (out / "results.md").read_text()


@pytest.mark.parametrize("head_init", ["zero", "random"])
def test_other_head_inits(tmp_path, head_init):
    root = image_folder(tmp_path / "data", size=16)
    s = fe.finetune(ckpt=trained_checkpoint(), data=root, head_init=head_init, lr=1e-12, min_lr=0.0, epochs=1,
                    warmup_epochs=0, batch_size=4, num_workers=0, output_dir=str(tmp_path / "ft"))
    assert "probe" not in s and s["head_init"] == head_init
    w = torch.load(tmp_path / "ft" / "checkpoint.pt", weights_only=True)["model"]["head.weight"]
    if head_init == "zero":
        assert float(w.abs().max()) < 1e-9
    else:  # MAE's trunc_normal(std 2e-5)
        assert 5e-6 < float(w.std()) < 5e-5


def test_head_init_recipes_and_flag(tmp_path, capsys):
    assert make_config("finetune", init="random").head_init == "probe"
    folder = image_folder(tmp_path / "data")
    assert make_config("finetune", init="random", data=folder).head_init == "random"
    assert main(["finetune", "--init", "random", "--head_init", "linear"]) == 2
    assert "--head_init" in capsys.readouterr().err


@pytest.mark.parametrize("few_shot, steps_per_epoch", [(10, 1), (None, 20)])
def test_builtin_probe_is_a_fixed_number_of_steps(few_shot, steps_per_epoch):
    cfg = make_config("linprobe", init="random", few_shot=few_shot)
    assert cfg.epochs is None and cfg.warmup_epochs is None
    resolve_probe_schedule(cfg, steps_per_epoch)
    assert cfg.epochs * steps_per_epoch == PROBE_UPDATE_BUDGET
    assert cfg.warmup_epochs == pytest.approx(cfg.epochs / 9, abs=0.01)
    kept = make_config("linprobe", init="random", epochs=5)  # a user's value wins
    resolve_probe_schedule(kept, steps_per_epoch)
    assert kept.epochs == 5
    assert RECIPES["imagenet"]["linprobe"]["epochs"] == 90


@pytest.mark.parametrize("n_train, num_classes, expected", [
    (100, 10, CROP_SCALE_MIN_FEW), (1300, 10, CROP_SCALE_MIN_MANY), (MANY_PER_CLASS * 7 - 1, 7, CROP_SCALE_MIN_FEW),
    (MANY_PER_CLASS * 7, 7, CROP_SCALE_MIN_MANY)])
def test_builtin_crop_follows_labelled_images_per_class(n_train, num_classes, expected):
    cfg = make_config("finetune", init="random", few_shot=10)
    assert cfg.scale_min is None and cfg.drop_path == 0.0
    resolve_crop(cfg, n_train, num_classes)
    assert cfg.scale_min == expected
    kept = make_config("finetune", init="random", scale_min=0.3)  # a user's value wins
    resolve_crop(kept, n_train, num_classes)
    assert kept.scale_min == 0.3


@pytest.mark.parametrize("few_shot, n_train, num_classes, expected", [
    (10, 100, 10, BLR_FEW), (None, 1300, 10, BLR_MANY), (None, MANY_PER_CLASS * 7 - 1, 7, BLR_FEW),
    (None, MANY_PER_CLASS * 7, 7, BLR_MANY)])
def test_builtin_fine_tuning_lr_follows_labelled_images_per_class_and_who_wins(few_shot, n_train, num_classes, expected, tmp_path):
    assert BLR_FEW != BLR_MANY  # otherwise the threshold below is not tested
    cfg = make_config("finetune", init="random", few_shot=few_shot)
    assert cfg.blr is None
    resolve_blr(cfg, n_train, num_classes)
    assert cfg.blr == expected
    kept = make_config("finetune", init="random", blr=3e-4, few_shot=few_shot)  # a user's value wins
    resolve_blr(kept, n_train, num_classes)
    assert kept.blr == 3e-4
    by_lr = make_config("finetune", init="random", lr=7e-5, few_shot=few_shot)  # so does --lr, with blr left unset
    resolve_blr(by_lr, n_train, num_classes)
    assert by_lr.blr is None and by_lr.lr == 7e-5
    folder = make_config("finetune", init="random", data=image_folder(tmp_path / "data"))
    resolve_blr(folder, n_train, num_classes)
    assert folder.blr == RECIPES["imagenet"]["finetune"]["blr"] == 5e-4  # folder data keeps MAE's


def test_folder_finetune_keeps_maes_crop_and_drop_path(tmp_path):
    cfg = make_config("finetune", init="random", data=image_folder(tmp_path / "data"))
    resolve_crop(cfg, 10_000, 10)
    assert cfg.scale_min == RECIPES["imagenet"]["finetune"]["scale_min"] == 0.08
    assert cfg.drop_path == RECIPES["imagenet"]["finetune"]["drop_path"] == 0.1


@pytest.mark.parametrize("command", ["finetune", "linprobe", "knn"])
def test_recipe_small_gives_a_folder_the_digits_recipe_and_imagenet_gives_the_digits_maes(command, tmp_path):
    """--recipe picks the defaults of every field marked recipe, whatever the data; a user's flag still wins."""
    folder = image_folder(tmp_path / "data")
    small = make_config(command, init="random", data=folder, recipe="small")
    auto_digits = make_config(command, init="random")
    for name, value in RECIPES["small"][command].items():
        assert getattr(small, name) == getattr(auto_digits, name) == value, name
    mae = make_config(command, init="random", recipe="imagenet")  # the built-in digits, MAE's recipe
    auto_folder = make_config(command, init="random", data=folder)
    for name, value in RECIPES["imagenet"][command].items():
        assert getattr(mae, name) == getattr(auto_folder, name) == value, name
    assert RECIPES["small"][command] != RECIPES["imagenet"][command]  # otherwise nothing above is tested
    # the config names the recipe it resolved to (summary.json and checkpoints record it)
    assert (small.recipe, auto_digits.recipe, mae.recipe, auto_folder.recipe) == ("small", "small", "imagenet", "imagenet")
    if command == "finetune":
        assert small.epochs is None  # the small recipe's schedule follows the data size ...
        resolve_schedule(small, 3, 100, 10)
        resolve_blr(small, 100, 10)
        resolve_crop(small, 100, 10)
        assert small.epochs == math.ceil(UPDATE_BUDGET / 3) and small.blr == BLR_FEW and small.scale_min == CROP_SCALE_MIN_FEW
        mine = make_config(command, init="random", data=folder, recipe="small", layer_decay=0.5, hflip=0.5)
        assert mine.layer_decay == 0.5 and mine.hflip == 0.5  # ... and a user's value wins


@pytest.mark.parametrize("command, recipe", [("finetune", "small"), ("finetune", "imagenet"), ("linprobe", "small"),
                                             ("linprobe", "imagenet")])
def test_an_lr_given_leaves_the_recipes_blr_unset(command, recipe):
    """--lr replaces the blr scaling: the config (and so summary.json) must not record a recipe blr that was not used."""
    lr = float(torch.empty(()).uniform_(1e-4, 1e-2))
    cfg = make_config(command, init="random", recipe=recipe, lr=lr)
    assert cfg.lr == lr and cfg.blr is None
    if command == "finetune":
        resolve_blr(cfg, 1300, 10)  # the small recipe's data-dependent blr respects --lr too
        assert cfg.blr is None
    without = make_config(command, init="random", recipe=recipe)
    assert without.blr is not None or (command, recipe) == ("finetune", "small")  # the recipe does fill it otherwise
    # --lr wins over a --blr given too, and over a blr an earlier config filled in (the API's cfg= reuse)
    assert make_config(command, init="random", recipe=recipe, blr=lr * 3, lr=lr).blr is None
    assert make_config(command, cfg=without, lr=lr).blr is None


def test_recipe_flags_say_their_default_comes_from_the_recipe_and_no_flag_shows_default_none():
    from fastebm.eval.config import build_parser

    sub = build_parser()._subparsers._group_actions[0].choices
    for command in ("finetune", "linprobe", "knn"):
        text = " ".join(sub[command].format_help().split())
        assert "(default: None)" not in text, command
        assert "(default: from --recipe" in text and "(recipe" not in text, command
        assert "(default: 0)" in text  # --seed: a real default is still shown


def test_a_null_recipe_in_yaml_names_the_choices(tmp_path, capsys):
    from fastebm.cli.eval import main

    cfg = tmp_path / "eval.yaml"
    cfg.write_text("recipe: null\n")
    assert main(["knn", "--init", "random", "--config", str(cfg), "--output_dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "config key recipe: has no value; give one of ['auto', 'small', 'imagenet']" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()
    cfg.write_text("k_sweep: [1, null]\n")  # a list key
    assert main(["knn", "--init", "random", "--config", str(cfg), "--output_dir", str(tmp_path / "out")]) == 2
    assert "config key k_sweep: an item has no value" in capsys.readouterr().err
    with pytest.raises(UsageError, match="--weight_decay: has no value; give a value or leave the setting out"):
        make_config("finetune", init="random", weight_decay=None)  # the Python API: the same words fit


def test_an_unknown_recipe_is_a_usage_error(capsys):
    from fastebm.cli.eval import main

    assert main(["finetune", "--init", "random", "--recipe", "cifar"]) == 2
    err = capsys.readouterr().err
    assert "--recipe" in err and "small" in err and "imagenet" in err and "Traceback" not in err


def test_a_warmup_the_recipe_set_is_named_as_the_recipes_in_the_error(capsys):
    """--recipe imagenet --epochs 2: the 5 warm-up epochs are MAE's, not the user's; the error says so."""
    from fastebm.cli.eval import main

    assert main(["finetune", "--init", "random", "--recipe", "imagenet", "--epochs", "2"]) == 2
    err = capsys.readouterr().err
    warmup = RECIPES["imagenet"]["finetune"]["warmup_epochs"]
    assert f"--warmup_epochs ({warmup}) (the imagenet recipe's; give --warmup_epochs too) exceeds --epochs (2)" in err
    assert main(["finetune", "--init", "random", "--recipe", "imagenet", "--epochs", "2", "--warmup_epochs", "3"]) == 2
    assert "--warmup_epochs (3.0) exceeds --epochs (2)" in capsys.readouterr().err  # the user's own value: no blame


@pytest.mark.parametrize("n_train, num_classes, budget", [
    (100, 10, UPDATE_BUDGET), (1300, 10, UPDATE_BUDGET_MANY), (MANY_PER_CLASS * 7 - 1, 7, UPDATE_BUDGET),
    (MANY_PER_CLASS * 7, 7, UPDATE_BUDGET_MANY)])
def test_builtin_finetune_budget_follows_labelled_images_per_class(n_train, num_classes, budget):
    steps_per_epoch = n_train // 32
    cfg = make_config("finetune", init="random")
    assert cfg.epochs is None and cfg.clip_grad == 1.0
    resolve_schedule(cfg, steps_per_epoch, n_train, num_classes)
    # the smallest number of whole epochs that reaches the budget
    assert cfg.epochs * steps_per_epoch >= budget > (cfg.epochs - 1) * steps_per_epoch
    assert cfg.warmup_epochs == pytest.approx(0.1 * cfg.epochs, abs=0.01)
    kept = make_config("finetune", init="random", epochs=3)  # a user's value wins
    resolve_schedule(kept, steps_per_epoch, n_train, num_classes)
    assert kept.epochs == 3
    # a user's clipping wins too, and 0 (off) is not refilled with the recipe's 1.0
    assert make_config("finetune", init="random", clip_grad=0.5).clip_grad == 0.5
    assert make_config("finetune", init="random", clip_grad=0.0).clip_grad == 0.0


def test_folder_finetune_keeps_maes_unclipped_gradients(tmp_path):
    assert make_config("finetune", init="random", data=image_folder(tmp_path / "data")).clip_grad is None


def test_clip_grad_bounds_every_fine_tuning_step(tmp_path, monkeypatch):
    max_norm = float(torch.empty(()).uniform_(0.003, 0.01))  # small enough that every step of a fresh head clips
    seen = []
    real = torch.nn.utils.clip_grad_norm_

    def recording(params, limit, *args, **kwargs):
        params = list(params)
        before = real(params, limit, *args, **kwargs)
        after = torch.linalg.vector_norm(torch.stack([p.grad.double().norm() for p in params if p.grad is not None]))
        seen.append((limit, float(before), float(after)))
        return before

    ckpt = trained_checkpoint()  # built (and clipped by fastebm-train) before the recording starts
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", recording)
    root = image_folder(tmp_path / "data", size=16, per_class=(5, 4, 6), val_per_class=3)
    fe.finetune(ckpt=ckpt, data=root, head_init="random", epochs=2, warmup_epochs=0, batch_size=5,
                num_workers=0, mixup=0.0, cutmix=0.0, clip_grad=max_norm, output_dir=str(tmp_path / "ft"))
    assert len(seen) == 2 * (15 // 5)  # one call per optimiser step
    for limit, before, after in seen:
        assert limit == max_norm and before > max_norm
        assert after == pytest.approx(max_norm, rel=1e-4)  # scaled down to the limit, not zeroed
    seen.clear()  # --clip_grad 0: off
    fe.finetune(ckpt=ckpt, data=root, head_init="random", epochs=1, warmup_epochs=0, batch_size=5,
                num_workers=0, mixup=0.0, cutmix=0.0, clip_grad=0.0, output_dir=str(tmp_path / "ft0"))
    assert seen == []
