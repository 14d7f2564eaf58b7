"""Config-file and Python-API numbers: an int setting never truncates a fraction, and a YAML key
given twice is an error naming both lines (fastebm/settings.py, shared by train and eval)."""
import pytest

from fastebm.errors import UsageError
from fastebm.train.config import parse_config


def _train(tmp_path, text, *argv):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return parse_config(["--config", str(path), *argv])


@pytest.mark.parametrize("text, message", [
    ("batch_size: 3.5\n", "config key batch_size: 3.5 is not a whole number; give an integer such as 3 or 4"),
    ("batch_size: 0.5\n", "config key batch_size: 0.5 is not a whole number; give an integer such as 0 or 1"),
    ("epochs: 0.5\n", "config key epochs: 0.5 is not a whole number; give an integer such as 0 or 1"),
    ("max_steps: 2.5\n", "config key max_steps: 2.5 is not a whole number"),  # Optional[int]
    ("batch_size: true\n", "config key batch_size: true is not a whole number"),
    ("batch_size: .nan\n", "config key batch_size: nan is not a whole number"),
    ("input_size: 16.5\n", "config key input_size: 16.5 is not a whole number"),  # an alias
])
def test_fractions_in_int_settings_are_errors(tmp_path, text, message):
    with pytest.raises(UsageError) as info:
        _train(tmp_path, text)
    assert str(info.value).startswith(message)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("text, message", [
    # PyYAML reads 1e3 (no dot) as the string '1e3': named as a float, never a bare "invalid value"
    ("max_steps: 1e3\n", "config key max_steps: '1e3' is 1000 written as a float; write 1000"),
    ("batch_size: 8e0\n", "config key batch_size: '8e0' is 8 written as a float; write 8"),
    ("max_steps: '1000.0'\n", "config key max_steps: '1000.0' is 1000 written as a float; write 1000"),
    ("max_steps: 25e-1\n", "config key max_steps: '25e-1' is not a whole number; give an integer such as 2 or 3"),
    ("batch_size: 'inf'\n", "config key batch_size: 'inf' is not a whole number; give an integer"),
])
def test_float_strings_in_int_settings_name_the_whole_number(tmp_path, text, message):
    with pytest.raises(UsageError) as info:
        _train(tmp_path, text)
    assert str(info.value) == message


def test_int_strings_and_non_numbers_in_int_settings(tmp_path):
    assert _train(tmp_path, "batch_size: '6'\n").batch_size == 6
    with pytest.raises(UsageError, match=r"^config key batch_size: invalid value 'six'$"):
        _train(tmp_path, "batch_size: six\n")


def test_a_setting_given_in_two_spellings_names_the_keys_as_written(tmp_path):
    with pytest.raises(UsageError) as info:
        _train(tmp_path, "batch_size: 4\nbatch-size: 8\n")
    assert str(info.value).endswith("gives batch_size twice (as batch_size and batch-size); keep one")
    with pytest.raises(UsageError) as info:
        _train(tmp_path, "batch-size: 4\nbatch_size: 8\n")
    assert str(info.value).endswith("gives batch_size twice (as batch-size and batch_size); keep one")


def test_whole_floats_are_taken_as_ints_and_floats_stay_floats(tmp_path):
    cfg = _train(tmp_path, "batch_size: 4.0\nmax_steps: 3.0\nblr: 1\nmask_ratio: 0.5\n")
    assert cfg.batch_size == 4 and type(cfg.batch_size) is int
    assert cfg.max_steps == 3 and type(cfg.max_steps) is int
    assert cfg.blr == 1.0 and cfg.mask_ratio == 0.5


def test_the_command_line_still_overrides_a_good_file(tmp_path):
    assert _train(tmp_path, "batch_size: 8\n", "--batch_size", "5").batch_size == 5


def test_duplicate_yaml_key_names_both_lines(tmp_path):
    with pytest.raises(UsageError) as info:
        _train(tmp_path, "# comment\nmax_steps: 2\nbatch_size: 4\nmax_steps: 3\n")
    text = str(info.value)
    assert "gives max_steps twice (lines 2 and 4); keep one" in text and "c.yaml" in text


def test_yaml_merge_keys_are_not_duplicates(tmp_path):
    from fastebm.settings import read_yaml_mapping

    path = tmp_path / "m.yaml"
    path.write_text("base: &b {x: 1}\nother:\n  <<: *b\n  y: 2\n")
    assert read_yaml_mapping(str(path))["other"] == {"x": 1, "y": 2}


def test_eval_config_and_python_api(tmp_path):
    from fastebm.eval.config import make_config, parse_args

    path = tmp_path / "e.yaml"
    path.write_text("k: 5.7\n")
    with pytest.raises(UsageError, match=r"^config key k: 5.7 is not a whole number; give an integer such as 5 or 6$"):
        parse_args(["knn", "--init", "random", "--config", str(path)])
    with pytest.raises(UsageError, match=r"^--k: 5.7 is not a whole number"):
        make_config("knn", init="random", k=5.7)
    with pytest.raises(UsageError, match=r"--k_sweep: 2.5 is not a whole number"):
        make_config("knn", init="random", k_sweep=[1, 2.5])
    assert make_config("knn", init="random", k=5.0).k == 5
    path.write_text("k: 5\nk: 7\n")
    with pytest.raises(UsageError, match=r"gives k twice \(lines 1 and 2\)"):
        parse_args(["knn", "--init", "random", "--config", str(path)])
