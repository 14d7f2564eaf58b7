"""Unreadable files anywhere in a folder: replaced deterministically, reported, never fatal while one file decodes."""
import io
import os

import numpy as np
import pytest
import torch
from PIL import Image

from test_train_helpers import fast_args, read_summary
from fastebm.cli.train import main
from fastebm.data.errors import DataError
from fastebm.data.folder import ImageFolderData, decode_image, scan_image_files
from fastebm.data.loader import MicroBatchStream
from fastebm.data.sampling import (AUGMENT_STREAM, BatchPlan, epoch_order, generator_for, resolve_sample, spread_order,
                                    substitute_order)
from fastebm.data.transforms import crop_flip_resize


def _seed():
    return int(torch.randint(0, 1 << 30, (1,)))


def _jpeg_bytes(rng, size=(20, 26)):
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, size=(size[1], size[0], 3)).astype(np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def make_damaged_folder(root, n_bad, n_good, seed, good_classes=1):
    """``n_bad`` partially downloaded JPEGs in class folder 'a_partial' (sorted first), then ``n_good`` good ones."""
    rng = np.random.default_rng(seed)
    os.makedirs(root / "a_partial")
    bad = []
    for i in range(n_bad):
        data = _jpeg_bytes(rng)
        path = root / "a_partial" / f"{i:04d}.jpg"
        path.write_bytes(data[: int(len(data) * rng.uniform(0.2, 0.8))])
        bad.append(str(path))
    good = []
    for i in range(n_good):
        folder = root / f"g{i % good_classes}"
        folder.mkdir(exist_ok=True)
        path = folder / f"{i:04d}.jpg"
        path.write_bytes(_jpeg_bytes(rng))
        good.append(str(path))
    return bad, good


def test_substitute_and_spread_orders_visit_every_index_once():
    seed = _seed()
    for n in (1, 2, 3, 10, 97, 360, 1001):
        index = seed % n
        order = list(substitute_order(n, seed, 4, index))
        assert sorted(order) == [i for i in range(n) if i != index]
        assert order == list(substitute_order(n, seed, 4, index))  # a pure function
        assert sorted(spread_order(n)) == list(range(n))
    many = {tuple(substitute_order(360, seed, e, 7))[:3] for e in range(8)}
    # each epoch walks differently: a walk is a (start, stride) pair, so two of 8 epochs share one ~1 run in 1,000;
    # a walk that ignored the epoch would give 1
    assert len(many) >= 7
    for n in (97, 360, 1001):
        first = list(spread_order(n))[:16]
        assert {4 * p // n for p in first} == {0, 1, 2, 3}  # the first probes reach every quarter of the list


def test_resolve_sample_walks_lazily_to_the_first_readable_index():
    seed = _seed()
    rng = np.random.default_rng(seed)
    for n in (1, 5, 97, 360):
        readable = rng.random(n) < 0.15
        for index in rng.integers(0, n, 6).tolist():
            calls = []
            chosen, bad = resolve_sample(n, seed, 3, index, lambda i: calls.append(i) or bool(readable[i]))
            walk = [index] + list(substitute_order(n, seed, 3, index))  # the rule, written out
            first = next((k for k, i in enumerate(walk) if readable[i]), None)
            if first is None:
                assert chosen is None and bad == walk == calls and sorted(bad) == list(range(n))
            else:
                assert chosen == walk[first] and bad == walk[:first] and calls == walk[: first + 1]


def test_80_bad_files_sorted_before_8_good_ones_train(tmp_path, capsys):
    """The real-world case: a class folder of partial downloads sorted before the good images."""
    seed = _seed()
    data = tmp_path / "data"
    bad, good = make_damaged_folder(data, 80, 8, seed)
    out = str(tmp_path / "out")
    assert main(fast_args(out, str(data), batch_size=4, max_steps=3, num_workers=0, seed=seed)) == 0
    summary = read_summary(out)
    assert summary["step"] == 3
    listed = {entry.split(" (", 1)[0] for entry in summary["skipped_files"]["files"]}
    assert summary["skipped_files"]["count"] == len(listed) and listed <= set(bad)
    plan = BatchPlan(88, 4, seed=seed)
    paths = scan_image_files(str(data))[0]
    drawn = {paths[k.index] for s in range(3) for k in plan.micro_batch_keys(s, 0)}
    assert drawn & set(bad) <= listed  # every bad file the plan drew is counted
    assert "Traceback" not in capsys.readouterr().err


def test_folder_with_only_bad_files_exits_2_in_one_line(tmp_path, capsys):
    data = tmp_path / "data"
    make_damaged_folder(data, 80, 0, _seed())
    assert main(fast_args(str(tmp_path / "out"), str(data), batch_size=4, max_steps=3, num_workers=0)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fastebm-train: error: --data: no readable image")
    assert "all 80 file(s)" in err[0] and "Traceback" not in err[0]


def test_check_readable_looks_past_a_long_damaged_run(tmp_path):
    data = tmp_path / "data"
    truncated = _jpeg_bytes(np.random.default_rng(_seed()))[:150]
    os.makedirs(data / "a")
    for i in range(1001):
        (data / "a" / f"{i:04d}.jpg").write_bytes(truncated)
    os.makedirs(data / "z")
    Image.new("RGB", (9, 7), (10, 200, 30)).save(data / "z" / "last.png")  # the only good file, sorted last
    source = ImageFolderData(str(data), 8, 0)
    assert source.check_readable() == 1001

    os.remove(data / "z" / "last.png")
    source = ImageFolderData(str(data), 8, 0)
    with pytest.warns(UserWarning, match="the first 50 files probed"):
        with pytest.raises(DataError, match="no readable image.*all 1001 file"):
            source.check_readable(warn_after=50)


def _collect(source, plan, workers, start, end):
    batches = list(MicroBatchStream(source, plan, num_workers=workers).iterate(start, end))
    return [(b["step"], b["images"], b["labels"], b["positions"], b["bad"]) for b in batches]


def assert_substitution_rule(source, plan, batches, bad_paths):
    """Each sample of ``batches`` against the rule written out here from its definition: the first file
    not in ``bad_paths`` along [index] + substitute_order(n, seed, epoch, index), cropped and flipped
    with the draw of the requested index; ``bad`` lists the files passed on the way, sample after sample."""
    n = len(source)
    for batch in batches:
        epoch = batch["step"] // plan.steps_per_epoch
        passed = []
        for row, pos in enumerate(batch["positions"].tolist()):
            index = int(epoch_order(n, plan.seed, epoch)[pos])
            walk = [index] + list(substitute_order(n, plan.seed, epoch, index))
            k = next(k for k, i in enumerate(walk) if source.paths[i] not in bad_paths)
            passed += [source.paths[i] for i in walk[:k]]
            assert batch["labels"][row] == source.labels[walk[k]]
            expected = crop_flip_resize(decode_image(source.paths[walk[k]]), source.img_size,
                                        generator_for(source.seed, AUGMENT_STREAM, epoch, index))
            assert torch.equal(batch["images"][row], expected)
        assert [b.split(" (", 1)[0] for b in batch["bad"]] == passed


def test_substitutes_are_exact_across_worker_counts_and_resume(tmp_path):
    seed = _seed()
    data = tmp_path / "data"
    bad, good = make_damaged_folder(data, 30, 6, seed, good_classes=6)
    source = ImageFolderData(str(data), 12, seed)
    plan = BatchPlan(len(source), 4, seed=seed)
    end = plan.steps_per_epoch + 3  # crosses an epoch boundary
    ref = _collect(source, plan, 0, 0, end)
    for other in (_collect(ImageFolderData(str(data), 12, seed), plan, 2, 0, end),
                  [None] * 4 + _collect(ImageFolderData(str(data), 12, seed), plan, 2, 4, end)):
        for a, b in zip(ref, other):
            if b is None:
                continue
            assert a[0] == b[0] and torch.equal(a[1], b[1]) and torch.equal(a[2], b[2]) and torch.equal(a[3], b[3])
            assert a[4] == b[4]  # the same reports too: every bad file the walk passed, per sample
    # bad samples become good files spread over the good set, with their own crops
    labels = torch.cat([r[2] for r in ref])
    assert (labels == 0).sum() == 0  # class 0 is 'a_partial': nothing from it reaches a batch
    assert len(set(labels.tolist())) >= 4
    # each sample is the rule's file with the requested sample's own crop draw (not the substitute's)
    assert_substitution_rule(source, plan, [{"step": r[0], "images": r[1], "labels": r[2], "positions": r[3], "bad": r[4]}
                                            for r in ref], set(bad))
    reported = {b.split(" (", 1)[0] for r in ref for b in r[4]}
    assert reported <= set(bad) and len(reported) >= 10


def test_files_damaged_during_the_run_stop_with_one_line_data_error(tmp_path):
    data = tmp_path / "data"
    _, good = make_damaged_folder(data, 3, 5, _seed())
    source = ImageFolderData(str(data), 8, 0)
    source.check_readable()
    for path in good:
        with open(path, "r+b") as fh:
            fh.truncate(100)
    stream = MicroBatchStream(source, BatchPlan(len(source), 4, seed=1), num_workers=2)
    with pytest.raises(DataError) as info:
        next(iter(stream.iterate(0, 1)))
    assert "\n" not in str(info.value) and "no readable image left" in str(info.value)
