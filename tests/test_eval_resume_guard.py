"""fastebm-eval finetune --resume continues the same run or none; --ckpt names a file fastebm can read.

* a resume under another backbone (--init instead of --ckpt, another file, the same path holding
  other weights), --few_shot, --seed, --epochs or the resolved lr is refused: exit 2, one line naming
  each change old -> new and the fix, and nothing in the output folder changes; so is a checkpoint of an
  earlier fastebm-eval that drew the augmentation per loader process;
* flags are compared as resolved: --model/--img_size/--lr/--device/--precision given with
  the value the run resolved to (or dropped, the reverse) are no change, also for a checkpoint written
  before the record of resolved values; the data folder through a symlink is the same folder;
* an allowed resume (--eval_every, the same --ckpt spelled differently) continues the run, warns,
  and summary.json records the change under "resumes"; --num_workers may change without a word (the
  augmentation is drawn per image: test_eval_runs checks the result is the same);
* a resume with nothing left to train warns in one line and writes nothing; a truncated checkpoint.pt
  is named as unreadable with what to do;
* a folder given as --ckpt (eval, export) or --resume names the files to give; a torch.save of
  pickled Python objects (MAE's argparse.Namespace) names them and says what to do.
"""
import argparse
import json
import os
import shutil

import pytest
import torch

from fastebm.cli.eval import main
from fastebm.cli.export import main as export_main
from fastebm.eval.backbone import read_backbone
from fastebm.eval.export import write_export
from test_eval_support import image_folder, trained_checkpoint


def _snapshot(folder):
    return {os.path.relpath(os.path.join(d, f), folder): open(os.path.join(d, f), "rb").read()
            for d, _, files in os.walk(folder) for f in files}


def _error(capsys, prog="fastebm-eval"):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith(f"{prog}: error: ") and "Traceback" not in err[0]
    return err[0][len(f"{prog}: error: "):]


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory):
    """A fine-tuning run from an exported backbone, stopped after epoch 1 of 2 (--max_epochs 1)."""
    root = tmp_path_factory.mktemp("resume_guard")
    data = image_folder(root / "data", size=16, per_class=(2, 2, 2), val_per_class=1)
    ckpt = str(root / "backbone.safetensors")
    write_export(read_backbone(trained_checkpoint()), ckpt)
    out = root / "ft"
    args = ["finetune", "--data", data, "--batch_size", "2", "--epochs", "2", "--warmup_epochs", "0",
            "--num_workers", "0", "--output_dir", str(out)]
    assert main([*args, "--ckpt", ckpt, "--few_shot", "1", "--max_epochs", "1"]) == 0
    return {"root": root, "out": out, "ckpt": ckpt, "args": args}


@pytest.mark.parametrize("change, expected", [
    (["--init", "random", "--few_shot", "1"], "(--ckpt: '{ckpt}' -> None, --init: None -> 'random')"),
    (["--ckpt", "{ckpt}", "--few_shot", "2", "--seed", "3"], "(--few_shot: 1 -> 2, --seed: 0 -> 3)"),
    (["--ckpt", "{ckpt}", "--few_shot", "1", "--epochs", "3"], "(--epochs: 2 -> 3)"),
    (["--ckpt", "{ckpt}", "--few_shot", "1", "--lr", "0.001"], "(lr (--blr/--lr): 3.90625e-06 -> 0.001)"),
])
def test_resume_with_changed_settings_is_refused(stopped_run, capsys, change, expected):
    out, ckpt = stopped_run["out"], stopped_run["ckpt"]
    before = _snapshot(out)
    capsys.readouterr()
    argv = [*stopped_run["args"], *[a.format(ckpt=ckpt) for a in change], "--resume", "auto"]
    assert main(argv) == 2
    msg = _error(capsys)
    path = os.path.join(str(out), "checkpoint.pt")
    assert msg.startswith(f"--resume {path}: refusing to continue that run with changed settings "
                          f"{expected.format(ckpt=ckpt)}: they change what it measures; give the same flags to "
                          f"continue it, or a new --output_dir to start another run"), msg
    assert ("keep --epochs and give --max_epochs" in msg) == ("--epochs" in change)
    assert _snapshot(out) == before  # the refused run wrote nothing


def test_resume_from_a_checkpoint_holding_other_weights_is_refused(stopped_run, capsys, tmp_path):
    """The same --ckpt path, overwritten (e.g. by further training) since the run started: refused by the
    weights' SHA-256, whatever the path says."""
    out = tmp_path / "ft"
    shutil.copytree(stopped_run["out"], out)
    ckpt = str(tmp_path / "backbone.safetensors")
    bb = read_backbone(stopped_run["ckpt"])
    bb.state = {k: v + 0.01 for k, v in bb.state.items()}
    write_export(bb, ckpt)
    before = _snapshot(out)
    capsys.readouterr()
    args = [*stopped_run["args"][:-1], str(out), "--ckpt", ckpt, "--few_shot", "1", "--resume", "auto"]
    assert main(args) == 2
    msg = _error(capsys)
    assert f"(--ckpt: '{stopped_run['ckpt']}' -> '{ckpt}' holds other weights than the run started from (sha256 " in msg
    assert "give the same flags to continue it, or a new --output_dir" in msg
    assert "overwritten by further training?" not in msg  # another path: nothing says it was overwritten
    assert _snapshot(out) == before


def test_the_same_ckpt_path_holding_other_weights_asks_if_it_was_overwritten(stopped_run, capsys, tmp_path):
    out = tmp_path / "ft"
    shutil.copytree(stopped_run["out"], out)
    ckpt = str(tmp_path / "backbone.safetensors")
    shutil.copy(stopped_run["ckpt"], ckpt)
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    state["config"]["ckpt"], state["abspaths"]["ckpt"] = ckpt, ckpt  # the run started from this path
    torch.save(state, out / "checkpoint.pt")
    bb = read_backbone(ckpt)
    bb.state = {k: v + 0.01 for k, v in bb.state.items()}
    write_export(bb, ckpt)  # ... which further training has overwritten since
    capsys.readouterr()
    assert main([*stopped_run["args"][:-1], str(out), "--ckpt", ckpt, "--few_shot", "1", "--resume", "auto"]) == 2
    assert f"(--ckpt: '{ckpt}' holds other weights than the run started from (sha256 " in (msg := _error(capsys))
    assert msg.split("(sha256 ")[1].split(")")[0].endswith("; overwritten by further training?"), msg


def _nothing_left(out, max_epochs=1):
    epoch = torch.load(os.path.join(str(out), "checkpoint.pt"), weights_only=True)["epoch"]
    return (f"fastebm-eval: warning: nothing to train: {os.path.join(str(out), 'checkpoint.pt')} is at epoch {epoch} "
            f"and --max_epochs is {max_epochs} (the run has --epochs 2); the files are left as they are. To train "
            f"further, resume with a larger --max_epochs (at most --epochs)")


def test_a_resume_with_nothing_to_train_writes_nothing(stopped_run, capsys):
    out = stopped_run["out"]
    before = _snapshot(out)
    capsys.readouterr()
    argv = [*stopped_run["args"], "--ckpt", stopped_run["ckpt"], "--few_shot", "1", "--resume", "auto", "--max_epochs", "1"]
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert _nothing_left(out) in err.splitlines(), err
    assert "changed settings" not in err
    assert _snapshot(out) == before  # summary.json, the events file, the checkpoint: byte for byte


def test_a_finished_run_resumed_says_so_and_writes_nothing(stopped_run, capsys, tmp_path):
    out = tmp_path / "ft"
    shutil.copytree(stopped_run["out"], out)
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    state["epoch"] = 2  # as if the run had finished its --epochs 2
    torch.save(state, out / "checkpoint.pt")
    before = _snapshot(out)
    capsys.readouterr()
    assert main([*stopped_run["args"][:-1], str(out), "--ckpt", stopped_run["ckpt"], "--few_shot", "1",
                 "--resume", "auto"]) == 0
    assert (f"fastebm-eval: warning: nothing to train: {out / 'checkpoint.pt'} is at epoch 2, the end of the run "
            f"(--epochs 2); the files are left as they are. To train longer, start a new run with a larger --epochs "
            f"in another --output_dir") in capsys.readouterr().err.splitlines()
    assert _snapshot(out) == before


def test_run_finetune_with_nothing_to_train_returns_the_summary_unwritten(stopped_run):
    from fastebm.eval import finetune

    out = stopped_run["out"]
    before = _snapshot(out)
    s = finetune(data=str(stopped_run["root"] / "data"), batch_size=2, epochs=2, warmup_epochs=0, num_workers=0,
                 output_dir=str(out), ckpt=stopped_run["ckpt"], few_shot=1, max_epochs=1, resume="auto")
    assert s == json.loads((out / "summary.json").read_text()) and s["epochs_done"] == 1
    assert _snapshot(out) == before


_SAME_AS_RESOLVED = ["--model", "vit_demo", "--img_size", "16", "--lr", "3.90625e-06", "--device", "cpu",
                     "--precision", "fp32", "--num_workers", "0"]


def test_flags_given_as_they_resolved_are_no_change(stopped_run, capsys):
    """The run gave none of these; giving each with the value it resolved to continues the same run."""
    out = stopped_run["out"]
    before = _snapshot(out)
    capsys.readouterr()
    argv = [*stopped_run["args"], "--ckpt", stopped_run["ckpt"], "--few_shot", "1", "--resume", "auto",
            "--max_epochs", "1", *_SAME_AS_RESOLVED]
    assert main(argv) == 0, capsys.readouterr().err
    err = capsys.readouterr().err
    assert "changed settings" not in err and _nothing_left(out) in err.splitlines(), err
    assert _snapshot(out) == before


def _explicit_checkpoint(stopped_run, tmp_path, keep_record):
    """A copy of the stopped run as if it had been started with the flags of _SAME_AS_RESOLVED (keep_record
    False: a checkpoint from before fastebm recorded resolved values)."""
    out = tmp_path / "ft"
    shutil.copytree(stopped_run["out"], out)
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert state["resolved"]["lr"] == pytest.approx(3.90625e-06) and state["resolved"]["model"] == "vit_demo"
    state["config"].update(model="vit_demo", img_size=16, lr=3.90625e-06, blr=None, device="cpu", precision="fp32")
    if not keep_record:
        del state["resolved"]  # (it keeps the record of per-image augmentation draws, which is another check)
    torch.save(state, out / "checkpoint.pt")
    return out


@pytest.mark.parametrize("keep_record", [True, False])
def test_dropping_flags_that_resolved_to_the_same_is_no_change(stopped_run, capsys, tmp_path, keep_record):
    out = _explicit_checkpoint(stopped_run, tmp_path, keep_record)
    before = _snapshot(out)
    capsys.readouterr()
    argv = [*stopped_run["args"][:-1], str(out), "--ckpt", stopped_run["ckpt"], "--few_shot", "1",
            "--resume", "auto", "--max_epochs", "1"]
    assert main(argv) == 0, capsys.readouterr().err
    err = capsys.readouterr().err
    assert "changed settings" not in err and _nothing_left(out) in err.splitlines(), err
    assert _snapshot(out) == before


def test_a_checkpoint_with_augmentation_drawn_per_loader_process_is_refused(stopped_run, capsys, tmp_path):
    """A checkpoint without the record of per-image augmentation draws came from an earlier fastebm-eval:
    its epochs drew their augmentation per loader process, so no resume here could continue it exactly."""
    out = tmp_path / "ft"
    shutil.copytree(stopped_run["out"], out)
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert state.pop("augment_draws").startswith("per image")
    torch.save(state, out / "checkpoint.pt")
    before = _snapshot(out)
    capsys.readouterr()
    assert main([*stopped_run["args"][:-1], str(out), "--ckpt", stopped_run["ckpt"], "--few_shot", "1",
                 "--resume", "auto"]) == 2
    msg = _error(capsys)
    assert msg.startswith(f"--resume {out / 'checkpoint.pt'} was written by an earlier fastebm-eval") and msg.endswith(
        "start a new run in another --output_dir"), msg
    assert _snapshot(out) == before


def test_an_old_checkpoint_still_refuses_a_really_different_size(stopped_run, capsys, tmp_path):
    out = _explicit_checkpoint(stopped_run, tmp_path, keep_record=False)
    capsys.readouterr()
    argv = [*stopped_run["args"][:-1], str(out), "--ckpt", stopped_run["ckpt"], "--few_shot", "1",
            "--resume", "auto", "--max_epochs", "1", "--img_size", "32", "--lr", "0.0005"]
    assert main(argv) == 2
    assert "(--img_size: 16 -> 32, lr (--blr/--lr): 3.90625e-06 -> 0.0005)" in _error(capsys)


def test_flags_from_a_config_file_as_they_resolved_are_no_change(stopped_run, capsys, tmp_path):
    cfg = tmp_path / "same.yaml"
    cfg.write_text("model: vit_demo\nimg_size: 16\n")
    out = stopped_run["out"]
    capsys.readouterr()
    argv = [*stopped_run["args"], "--ckpt", stopped_run["ckpt"], "--few_shot", "1", "--resume", "auto",
            "--max_epochs", "1", "--config", str(cfg)]
    assert main(argv) == 0, capsys.readouterr().err
    assert "changed settings" not in capsys.readouterr().err


def test_the_data_through_a_symlink_is_the_same_folder(stopped_run, capsys, tmp_path):
    link = tmp_path / "link"
    os.symlink(stopped_run["root"] / "data", link)
    args = list(stopped_run["args"])
    args[args.index("--data") + 1] = str(link)
    capsys.readouterr()
    assert main([*args, "--ckpt", stopped_run["ckpt"], "--few_shot", "1", "--resume", "auto", "--max_epochs", "1"]) == 0
    err = capsys.readouterr().err
    assert "refusing" not in err and "nothing to train" in err, err


def test_a_truncated_checkpoint_is_named_unreadable(stopped_run, capsys, tmp_path):
    out = tmp_path / "ft"
    shutil.copytree(stopped_run["out"], out)
    path = out / "checkpoint.pt"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    before = _snapshot(out)
    capsys.readouterr()
    assert main([*stopped_run["args"][:-1], str(out), "--ckpt", stopped_run["ckpt"], "--few_shot", "1",
                 "--resume", "auto"]) == 2
    msg = _error(capsys)
    assert msg.startswith(f"--resume {path} is unreadable, truncated or corrupt ("), msg
    assert msg.endswith(f"); delete it to start the run over in {out}, or give another --output_dir"), msg
    assert _snapshot(out) == before


def test_allowed_resume_continues_warns_and_records(stopped_run, capsys, tmp_path):
    """--eval_every and another file with the same weights (here a .pth export of them) may change."""
    out = tmp_path / "ft"
    shutil.copytree(stopped_run["out"], out)
    ckpt = str(tmp_path / "same.pth")
    write_export(read_backbone(stopped_run["ckpt"]), ckpt)
    args = [*stopped_run["args"][:-1], str(out), "--ckpt", ckpt, "--few_shot", "1", "--resume", "auto",
            "--eval_every", "2"]
    capsys.readouterr()
    assert main(args) == 0
    err = capsys.readouterr().err
    assert (f"fastebm-eval: warning: resuming {os.path.join(str(out), 'checkpoint.pt')} with changed settings "
            f"(eval_every: 1 -> 2, ckpt: '{stopped_run['ckpt']}' -> '{ckpt}'); allowed, as they do not change what "
            f"the run measures (summary.json lists them under 'resumes')") in err
    s = json.loads((out / "summary.json").read_text())
    assert s["status"] == "completed" and s["epochs_done"] == 2 and s["init"] == "export" and s["ckpt"] == ckpt
    assert s["resumes"] == [{"after_epoch": 1, "changed": {"eval_every": [1, 2], "ckpt": [stopped_run["ckpt"], ckpt]}}]
    assert s["backbone_sha256"] == torch.load(out / "checkpoint.pt", weights_only=True)["backbone_sha256"]
    assert [r["epoch"] for r in s["history"]] == [1, 2]


def test_a_folder_as_ckpt_names_the_files_in_it(tmp_path, capsys):
    run = os.path.dirname(trained_checkpoint())  # fastebm-train's folder: last.pt, backbone.pth
    expected = f"--ckpt: {run!r} is a folder; give a checkpoint file, e.g. {run}/last.pt or {run}/backbone.pth"
    assert main(["knn", "--ckpt", run, "--output_dir", str(tmp_path / "knn")]) == 2
    assert _error(capsys) == expected
    assert export_main(["--ckpt", run, "--out", str(tmp_path / "x.safetensors")]) == 2
    assert _error(capsys, "fastebm-export") == expected
    (tmp_path / "empty").mkdir()
    assert main(["knn", "--ckpt", str(tmp_path / "empty"), "--output_dir", str(tmp_path / "knn")]) == 2
    assert "is a folder and holds no checkpoint (no last.pt, backbone.pth or .safetensors)" in _error(capsys)
    assert main(["finetune", "--init", "random", "--resume", str(tmp_path / "empty"),
                 "--output_dir", str(tmp_path / "ft")]) == 2
    assert _error(capsys).startswith(f"--resume: {str(tmp_path / 'empty')!r} is a folder; give its checkpoint file")
    assert sorted(os.listdir(tmp_path)) == ["empty"]  # nothing written


def test_a_pickle_of_python_objects_names_them(tmp_path, capsys):
    """MAE's checkpoints: torch.save({"model": state_dict, "args": argparse.Namespace(...)})."""
    path = str(tmp_path / "mae_like.pth")
    torch.save({"model": read_backbone(trained_checkpoint()).state, "args": argparse.Namespace(lr=1e-3)}, path)
    start = (f"--ckpt {path} holds pickled Python objects (argparse.Namespace), which fastebm does not load "
             f"(unpickling can run code); if you trust the file, save its weights alone and give that file, e.g. in "
             f"Python torch.save(torch.load({path!r}, weights_only=False)['model'], 'backbone.pth')")
    assert export_main(["--ckpt", path, "--out", str(tmp_path / "x.safetensors")]) == 2
    assert _error(capsys, "fastebm-export").startswith(start)
    assert main(["knn", "--ckpt", path, "--output_dir", str(tmp_path / "knn")]) == 2
    assert _error(capsys).startswith(start)
    assert main(["finetune", "--init", "random", "--resume", path, "--output_dir", str(tmp_path / "ft")]) == 2
    assert "is not a fastebm-eval fine-tuning checkpoint (it holds pickled objects: argparse.Namespace)" in _error(capsys)
    assert sorted(os.listdir(tmp_path)) == ["mae_like.pth"]  # nothing written
