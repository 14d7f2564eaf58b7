"""The defaults the docs state are the parser's: every Markdown table row of README.md,
docs/training.md and docs/distributed.md that has a `--flag` column and a "default" column is
compared with ``build_parser()``; docs/training.md's table lists every flag; configs/demo.yaml is the
defaults, as it says."""
import os
import re
import sys

import pytest

from fastebm.train.config import ALIASES, DEPRECATED, build_parser, parse_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = ["README.md", "docs/training.md", "docs/distributed.md"]
TRUE, FALSE, NONE = {"on", "true", "yes"}, {"off", "false", "no"}, {"none", "off"}


def _cells(line):
    """A Markdown table row's cells (``\\|`` is a literal bar, as GitHub reads it)."""
    parts = re.split(r"(?<!\\)\|", line.strip())
    return [c.strip().replace("\\|", "|") for c in parts[1:-1]]


def _tables(path):
    """Every table of a Markdown file as (header cells, [(line number, cells)])."""
    tables, current = [], None
    with open(os.path.join(ROOT, path)) as fh:
        for number, line in enumerate(fh, start=1):
            if line.lstrip().startswith("|"):
                if current is None:
                    current = (_cells(line), [])
                    tables.append(current)
                elif not set(line.strip()) <= set("|-: "):
                    current[1].append((number, _cells(line)))
            else:
                current = None
    return tables


def _documented_defaults(path):
    """(line, flag names in the row, default cell) of every row of a table with a flag and a default column."""
    rows = []
    for header, body in _tables(path):
        names = [h.lower() for h in header]
        if "default" not in names or "flag" not in names:
            continue
        flag_col, default_col = names.index("flag"), names.index("default")
        for number, cells in body:
            assert len(cells) == len(header), f"{path}:{number}: {len(cells)} cells, header has {len(header)} (unescaped |?)"
            flags = list(dict.fromkeys(ALIASES.get(f, f) for f in re.findall(r"--([a-z_]+)", cells[flag_col])))
            rows.append((f"{path}:{number}", flags, cells[default_col]))
    return rows


def _first_token(cell):
    """The value a default cell starts with: its first `code span`, else its first word."""
    m = re.match(r"`([^`]*)`", cell)
    if m:
        return m.group(1)
    return re.split(r"[\s,;:(]+", cell, maxsplit=1)[0]


def _matches(default, cell):
    token = _first_token(cell).strip().lower()
    if isinstance(default, bool):
        return token in (TRUE if default else FALSE)
    if default is None:
        return token in NONE
    if isinstance(default, (int, float)):
        if default == 0 and token in FALSE | NONE:
            return True
        try:
            return float(token) == float(default)
        except ValueError:
            return False
    if isinstance(default, (list, tuple)):
        return token.replace(",", " ").split() == [str(d) for d in default]
    return token == str(default).lower()


def _parser_defaults():
    return {a.dest: a.default for a in build_parser()._actions if a.option_strings and a.dest not in ("help", "version")}


@pytest.mark.parametrize("path, at_least", [("README.md", 3), ("docs/training.md", 40), ("docs/distributed.md", 8)])
def test_documented_defaults_are_the_parsers(path, at_least):
    defaults = _parser_defaults()
    checked, wrong = 0, []
    for where, flags, cell in _documented_defaults(path):
        unknown = [f for f in flags if f not in defaults]
        assert not unknown, f"{where}: no such flag {unknown}"
        if len(flags) != 1:  # a row about several flags states no single default
            continue
        checked += 1
        if not _matches(defaults[flags[0]], cell):
            wrong.append(f"{where}: --{flags[0]} documented as {cell!r}, the parser's default is {defaults[flags[0]]!r}")
    assert not wrong, "\n".join(wrong)
    assert checked >= at_least, f"{path}: only {checked} documented defaults found (table format changed?)"


def test_the_training_flag_table_lists_every_flag():
    listed = {f for _, flags, _ in _documented_defaults("docs/training.md") for f in flags}
    flags = set(_parser_defaults()) - {"config"} - {f"deprecated_{old}" for old in DEPRECATED}
    assert flags - listed == set(), "flags missing from docs/training.md's table"


def test_the_checker_catches_a_drifted_default():
    """The comparison itself can fail: a stale value, a wrong word, a wrong list."""
    assert _matches(32, "32") and not _matches(32, "64")
    assert _matches(None, "`none` (all epochs)") and not _matches(None, "120 s (gloo)")
    assert _matches(False, "off") and not _matches(False, "on") and _matches(0.0, "off")
    assert _matches(("mim", "sr"), "`mim sr`") and not _matches(("mim", "sr"), "`mim sort`")
    assert _matches("auto", "`auto`") and not _matches("auto", "`cpu`")
    assert _cells("| `--a x \\| y` | 1 | z |") == ["`--a x | y`", "1", "z"]


def test_configs_demo_yaml_is_the_default_run():
    defaults = parse_config([])
    assert parse_config(["--config", os.path.join(ROOT, "configs", "demo.yaml")]) == defaults


def test_configs_builtin_32px_yaml_is_the_quality_studys_earlier_defaults(tmp_path):
    """configs/builtin_32px.yaml is what benchmarks/quality measured as ``fastebm_32px_2ep`` (the defaults
    before round 11): the arm's fastebm-train flags give the same configuration (the output folder aside)."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks", "quality"))
    import arms

    out = ["--output_dir", str(tmp_path)]
    from_yaml = parse_config(["--config", os.path.join(ROOT, "configs", "builtin_32px.yaml"), *out])
    assert from_yaml == parse_config([*arms.ARMS["fastebm_32px_2ep"].flags, *out])
    assert from_yaml != parse_config(out)  # it is not the default run
    assert (from_yaml.img_size, from_yaml.epochs) == (32, 2)


def test_the_quality_studys_reference_arm_is_the_shipped_default(tmp_path):
    """benchmarks/quality's ``fastebm`` arm (what the acceptance checks are about) pretrains with exactly
    fastebm-train's defaults: its flags and the study's epochs change nothing; vit_demo pretrains at 16 px,
    and the study evaluates that backbone and the untrained inits at fastebm-eval's default size for them."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks", "quality"))
    import arms
    from fastebm.eval.backbone import init_backbone

    out = ["--output_dir", str(tmp_path)]
    ref = arms.ARMS[arms.REFERENCE]
    assert ref.kind == "fastebm" and not ref.eval_img_size
    defaults = parse_config(out)
    assert parse_config([*ref.flags, "--epochs", str(arms.PRETRAIN_EPOCHS), *out]) == defaults
    assert (defaults.img_size, defaults.epochs) == (16, 8)
    # a default backbone's fastebm-eval size is the size it was pretrained at (the export test checks that)
    assert arms.eval_px(ref) == defaults.img_size == 16
    for name in ("random_timm", "random_fastebm"):
        arm = arms.ARMS[name]
        assert arms.eval_px(arm) == init_backbone(arm.init, "vit_demo", None, 0).eval_img_size == 16
    assert arms.eval_px(arms.ARMS["mae_flops"]) == 32 and arms.eval_px(arms.ARMS["mae_flops_16px"]) == 16
    # the default set's MAE baseline pretrains at the size the defaults pretrain at
    assert {arms.ARMS[a].mae_img_size for a in arms.DEFAULT_ARMS if arms.ARMS[a].kind == "mae"} == {defaults.img_size}
