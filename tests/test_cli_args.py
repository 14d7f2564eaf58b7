"""fastebm-train's command line: defaults in --help, YAML config + overrides, bad values -> exit 2."""
import os
import subprocess
import sys

import pytest
import torch

from fastebm.cli.train import main
from fastebm.errors import UsageError
from fastebm.train.config import TrainConfig, build_parser, parse_config


def test_help_lists_every_flag_with_default(capsys):
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for name in TrainConfig.__dataclass_fields__:
        assert f"--{name}" in text
    assert "(default: vit_demo)" in text and "(default: ./fastebm_out)" in text
    text = " ".join(text.split())
    assert "(default: None)" not in text  # a flag left unset says what none means instead
    assert "(default: mim sr denoise colorize)" in text  # a list default as the command line spells it


@pytest.mark.parametrize("argv, needle", [
    (["--batch_size", "0"], "--batch_size"),
    (["--batch_size", "many"], "--batch_size"),
    (["--blr", "-1"], "--blr"),
    (["--tasks", "mim", "paint"], "paint"),
    (["--grad_mode", "sideways"], "--grad_mode"),
    (["--device", "tpu"], "--device"),
    (["--mask_ratio", "1.5"], "--mask_ratio"),
    (["--warmup_epochs", "9", "--epochs", "2"], "--warmup_epochs"),
    (["--resume", "/no/such/ckpt.pt"], "/no/such/ckpt.pt"),
    (["--no_such_flag", "1"], "no_such_flag"),
    (["--steps", "0"], "--steps"),
    (["--img_size", "30"], "patch size 4; use e.g. 28 or 32"),
    (["--img_size", "15"], "use e.g. 12 or 16"),
    (["--lr", "0"], "--lr"),
    (["--lr", "1e-3", "--blr", "1e-3"], "--lr and --blr"),
    (["--save_ckpt_freq", "-1"], "--save_ckpt_freq"),
    (["--loader", "nvjpeg"], "nvjpeg"),
    (["--loader", "dali"], "built-in data is in memory"),
    (["--resume", "auto", "--overwrite"], "--overwrite and --resume"),
    (["--eval", "false", "--demo_eval", "true"], "--demo_eval"),
])
def test_invalid_values_exit_2_with_one_line(argv, needle, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fastebm-train: error:") and needle in err[0]


def test_engine_rejected_by_objective_exits_2(tmp_path, capsys):
    code = main(["--engine", "warp", "--output_dir", str(tmp_path), "--img_size", "16", "--demo_eval", "false"])
    assert code == 2
    err = capsys.readouterr().err
    assert "warp" in err and "Traceback" not in err


def test_yaml_config_and_command_line_override(tmp_path):
    cfg_file = tmp_path / "run.yaml"
    cfg_file.write_text("batch_size: 24\nblr: 0.002\ntasks: [mim, sort]\nclip_grad: null\nstrict_data: true\n")
    cfg = parse_config(["--config", str(cfg_file), "--blr", "0.005"])
    assert cfg.batch_size == 24 and cfg.blr == 0.005 and cfg.tasks == ["mim", "sort"]
    assert cfg.clip_grad is None and cfg.strict_data is True
    assert parse_config(["--tasks", "mim,sr", "denoise"]).tasks == ["mim", "sr", "denoise"]


@pytest.mark.parametrize("text, needle", [
    ("batch_sise: 3\n", "batch_sise"),
    ("batch_size: lots\n", "batch_size"),
    ("- a\n- b\n", "mapping"),
    ("grad_mode: wrong\n", "grad_mode"),
    ("steps: null\n", "config key steps: has no value; give a value or leave the setting out"),  # null only where the flag takes none
    ("energy: null\n", r"config key energy: has no value; give one of \['sqnorm'"),
    ("tasks:\n", "config key tasks: has no value; give one or more values"),  # a list key: not read as a task 'none'
    ("tasks: [mim, null]\n", "config key tasks: an item has no value"),
    ("fsdp: null\n", "config key fsdp: has no value; give true or false"),
    ("eval: null\n", "config key eval: has no value"),  # the key as the user spelled it, not the field it aliases
])
def test_bad_yaml_is_a_usage_error(tmp_path, text, needle):
    cfg_file = tmp_path / "bad.yaml"
    cfg_file.write_text(text)
    with pytest.raises(UsageError, match=needle):
        parse_config(["--config", str(cfg_file)])


def test_subprocess_bad_flag_has_no_traceback():
    proc = subprocess.run([sys.executable, "-m", "fastebm", "train", "--accum_iter", "-3"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("fastebm-train: error: --accum_iter")
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_func_engine_builds_math_attention_and_refuses_triton():
    from fastebm.train.build import build_objective

    objective = build_objective(parse_config(["--engine", "func", "--model", "vit_demo"]))
    assert objective.model.attn_backend == "math"  # "auto" would pick the fused kernel on CUDA
    assert build_objective(parse_config(["--engine", "eager"])).model.attn_backend == "auto"
    with pytest.raises(UsageError, match="func"):
        build_objective(parse_config(["--engine", "func", "--attn_backend", "triton"]))


@pytest.mark.parametrize("argv, needle", [([], "no command given"), (["tran"], "unknown command 'tran'")])
def test_python_m_fastebm_without_a_known_command_exits_2(argv, needle, capsys):
    from fastebm.__main__ import main as fastebm_main

    assert fastebm_main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fastebm: error:") and needle in err[0] and "train" in err[0]


def test_python_m_fastebm_train_dispatches_to_the_train_command(capsys):
    from fastebm.__main__ import main as fastebm_main

    assert fastebm_main(["train", "--steps", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fastebm-train: error: --steps")


def test_flag_types_follow_the_annotations():
    cfg = parse_config(["--img_size", "24", "--clip_grad", "0.5", "--demo_eval", "false", "--max_steps", "none",
                        "--alpha_init", "0.25", "--data", "none"])
    assert cfg.img_size == 24 and type(cfg.img_size) is int
    assert cfg.clip_grad == 0.5 and type(cfg.clip_grad) is float
    assert cfg.demo_eval is False and cfg.max_steps is None and cfg.data is None and cfg.alpha_init == 0.25
    assert parse_config(["--fsdp"]).fsdp is True  # a bare boolean flag means true
    with pytest.raises(UsageError, match="--img_size"):
        parse_config(["--img_size", "2.5"])


@pytest.mark.parametrize("flag, registry", [("--engine", "engines"), ("--attn_backend", "ops")])
def test_engine_and_attention_choices_come_from_their_registries(flag, registry, capsys):
    from fastebm.engines import ENGINES
    from fastebm.ops import available_backends

    names = list(ENGINES) if registry == "engines" else ["auto", *available_backends()]
    action = next(a for a in build_parser()._actions if flag in a.option_strings)
    assert list(action.choices) == names
    assert main([flag, "no_such_thing"]) == 2
    err = capsys.readouterr().err
    assert "no_such_thing" in err and all(n in err for n in names)


def test_log_messages_info_and_warnings_on_rank_0_only_errors_everywhere(monkeypatch, capsys):
    import logging

    import fastebm.log

    fastebm.log.setup_logging("prog-x")
    log = logging.getLogger("fastebm.some.module")
    for main_process in (False, True):
        monkeypatch.setattr(fastebm.log, "is_main", lambda: main_process)
        log.info("info line %d", 7)
        log.warning("warn line")
        log.error("error line")
        out, err = capsys.readouterr()
        assert ("info line 7" in out) == main_process and "warn" not in out and "error" not in out
        assert ("prog-x: warning: warn line" in err) == main_process
        assert "prog-x: error: error line" in err


def test_mae_flag_names_are_aliases_on_the_command_line_and_in_yaml(tmp_path):
    cfg = parse_config(["--input_size", "48", "--data_path", str(tmp_path)])
    assert cfg.img_size == 48 and cfg.data == str(tmp_path)
    cfg_file = tmp_path / "mae.yaml"
    cfg_file.write_text(f"input_size: 40\ndata_path: {tmp_path}\nlr: 0.0005\nsave_ckpt_freq: 20\n")
    cfg = parse_config(["--config", str(cfg_file)])
    assert (cfg.img_size, cfg.data, cfg.lr, cfg.save_ckpt_freq) == (40, str(tmp_path), 0.0005, 20)
    assert parse_config(["--config", str(cfg_file), "--img_size", "24"]).img_size == 24  # the command line wins
    text = build_parser().format_help()
    assert "--img_size IMG_SIZE, --input_size IMG_SIZE" in text and "--data DATA, --data_path DATA" in text
    twice = tmp_path / "twice.yaml"
    twice.write_text("input_size: 40\nimg_size: 48\n")
    with pytest.raises(UsageError, match="img_size twice"):
        parse_config(["--config", str(twice)])


def test_lr_replaces_blr_scaling_and_the_precedence_rules(tmp_path):
    assert parse_config([]).lr is None
    assert parse_config(["--lr", "0.002"]).lr == 0.002
    with pytest.raises(UsageError, match="--lr and --blr both given on the command line"):
        parse_config(["--blr", "0.01", "--lr", "0.002"])
    both = tmp_path / "both.yaml"
    both.write_text("blr: 0.01\nlr: 0.002\n")
    with pytest.raises(UsageError, match="in the config file"):
        parse_config(["--config", str(both)])
    only_blr, only_lr = tmp_path / "blr.yaml", tmp_path / "lr.yaml"
    only_blr.write_text("blr: 0.01\n")
    only_lr.write_text("lr: 0.002\n")
    cfg = parse_config(["--config", str(only_blr), "--lr", "0.003"])  # the command line overrides the file
    assert cfg.lr == 0.003
    cfg = parse_config(["--config", str(only_lr), "--blr", "0.05"])  # ... in both directions
    assert cfg.lr is None and cfg.blr == 0.05


def test_lr_sets_the_learning_rate_of_the_run(tmp_path):
    from test_train_helpers import fast_args, make_image_folder
    from fastebm.checkpoint import load_checkpoint
    from fastebm.runlog import read_metrics

    data, out = str(tmp_path / "data"), str(tmp_path / "out")
    make_image_folder(data, n=8)
    lr = float(torch.empty(1).uniform_(1e-4, 1e-2))
    argv = fast_args(out, data, max_steps=1, lr=lr, warmup_epochs=0)
    i = argv.index("--blr")
    del argv[i:i + 2]  # fast_args sets --blr; with --lr beside it the command would be refused
    assert main(argv) == 0
    state = load_checkpoint(os.path.join(out, "last.pt"))
    assert state["schedule"]["base_lr"] == lr  # not blr * batch / 256
    assert read_metrics(out)[0]["lr"] == pytest.approx(lr)  # no warm-up: step 0 runs at the peak


def test_version_prints_the_package_version(capsys):
    import fastebm

    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"fastebm {fastebm.__version__}"


def test_eval_is_a_deprecated_alias_of_demo_eval(tmp_path):
    with pytest.warns(FutureWarning, match="--eval is deprecated; use --demo_eval"):
        assert parse_config(["--eval", "false"]).demo_eval is False
    cfg_file = tmp_path / "old.yaml"
    cfg_file.write_text("eval: false\n")
    with pytest.warns(FutureWarning, match="key eval is deprecated; use .*demo_eval"):
        assert parse_config(["--config", str(cfg_file)]).demo_eval is False
    assert parse_config([]).demo_eval is True


def test_error_lines_carry_no_terminal_escapes(monkeypatch, capsys):
    """PyTorch's messages contain ANSI bold; the CLI prints plain single lines."""
    import fastebm.train.job as job_mod
    from fastebm.errors import CheckpointError

    def boom(cfg):
        raise CheckpointError("x.pt: \x1b[1mdo those steps only if you trust it\x1b[0m.\n\t(1) details")

    monkeypatch.setattr(job_mod, "train", boom)
    assert main([]) == 2
    err = capsys.readouterr().err
    assert err == "fastebm-train: error: x.pt: do those steps only if you trust it. (1) details\n"


def test_loader_dali_without_dali_installed_exits_2(monkeypatch, tmp_path, capsys):
    import sys as _sys

    from test_train_helpers import make_image_folder

    make_image_folder(str(tmp_path / "data"), n=4)
    for name in [m for m in _sys.modules if m == "nvidia.dali" or m.startswith("nvidia.dali.")]:
        monkeypatch.delitem(_sys.modules, name)
    monkeypatch.setitem(_sys.modules, "nvidia.dali", None)  # import nvidia.dali -> ImportError
    code = main(["--loader", "dali", "--data", str(tmp_path / "data"), "--output_dir", str(tmp_path / "out")])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and 'pip install "fastebm[dali]"' in err[0] and "--loader dali" in err[0]
    assert not os.path.exists(tmp_path / "out")
