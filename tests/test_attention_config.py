"""The attention kernels' block-size policy and its table (``fastebm.kernels.attention_config``),
and the tuner that regenerates the table (``python -m fastebm.kernels.tune``), whose dry run works
in Triton's interpreter and never writes the committed table."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import pytest
import torch

from fastebm.kernels import attention_config as C


def test_committed_table_is_complete_and_obeys_the_policy():
    table = C.load_table()  # raises on a missing or invalid entry
    for dtype in C.DTYPES:
        for d in ("d64", "d128"):
            for _, seq in C.SEQ_BUCKETS:
                for kernel in C.KERNELS:
                    bm, bn, warps, stages = table[dtype][d][seq][kernel]
                    if dtype in ("bfloat16", "float16"):
                        # a resident tile of >= 64 rows: every product a wgmma on sm_90
                        assert (bn if kernel in C.COLUMN_KERNELS else bm) >= 64, (dtype, d, seq, kernel)
    # the ViT case: 16-bit, d = 64, N = 197: 64-row query tiles in the column kernels and pipelined
    # double-backward kernels where registers allow (compile_check: no spills)
    vit = table["bfloat16"]["d64"]["n256"]
    assert vit["dkdv"][0] >= 64 and vit["dbwd_col"][0] >= 64 and vit["dbwd_row"][3] >= 2


@pytest.mark.parametrize("n,bucket", [(1, "n256"), (197, "n256"), (256, "n256"), (257, "n1024"), (1024, "n1024"),
                                      (1025, "nlong"), (10 ** 6, "nlong")])
def test_sequence_buckets(n, bucket):
    assert C.seq_bucket(n) == bucket


def test_launch_config_reads_the_table_and_the_interpreter_block(monkeypatch):
    table = C.load_table()
    for dtype, d, n in ((torch.bfloat16, 64, 197), (torch.float32, 100, 4096), (torch.float64, 7, 1000)):
        for kernel in C.KERNELS:
            cfg = C.launch_config(dtype, d, kernel, on_gpu=True, seq_len=n)
            entry = table[str(dtype)[6:]][C.head_dim_bucket(d)][C.seq_bucket(n)][kernel]
            assert [cfg[k] for k in C.FIELDS] == entry and cfg["BLOCK_D"] == C.block_d(d)
    monkeypatch.setattr(C, "INTERPRETER_BLOCK", 32)
    assert C.launch_config(torch.float32, 24, "dq", on_gpu=False, seq_len=5) == dict(BLOCK_M=32, BLOCK_N=32, BLOCK_D=32)
    with pytest.raises(ValueError, match="head dim 129"):
        C.launch_config(torch.float32, 129, "dq", on_gpu=True, seq_len=5)
    with pytest.raises(ValueError, match="no attention kernel configuration"):
        C.launch_config(torch.int32, 64, "dq", on_gpu=True, seq_len=5)


def test_use_configs_overrides_and_restores():
    before = C.launch_config(torch.bfloat16, 64, "dbwd_col", on_gpu=True, seq_len=197)
    with C.use_configs({"dbwd_col": (16, 32, 4, 1)}):
        assert C.launch_config(torch.bfloat16, 64, "dbwd_col", on_gpu=True, seq_len=197)["BLOCK_M"] == 16
        assert C.launch_config(torch.float32, 64, "dbwd_col", on_gpu=False, seq_len=9)["BLOCK_N"] == 32
        assert C.launch_config(torch.bfloat16, 64, "dq", on_gpu=True, seq_len=197) != {}
    assert C.launch_config(torch.bfloat16, 64, "dbwd_col", on_gpu=True, seq_len=197) == before
    with pytest.raises(ValueError, match="power of two"):
        with C.use_configs({"fwd": (48, 64, 4, 1)}):
            pass


@pytest.mark.parametrize("kernel,cfg,dtype,match", [
    ("fwd", (8, 64, 4, 1), None, "power of two >= 16"),
    ("fwd", (64, 64, 3, 1), None, "num_warps"),
    ("fwd", (64, 64, 4), None, "4 positive ints"),
    ("dbwd_col", (64, 32, 8, 1), "bfloat16", "resident tile needs >= 64 rows"),
    ("dbwd_row", (32, 64, 4, 1), "float16", "resident tile needs >= 64 rows"),
    ("bwd", (64, 64, 4, 1), None, "unknown kernel"),
])
def test_check_config_rejects(kernel, cfg, dtype, match):
    with pytest.raises(ValueError, match=match):
        C.check_config(kernel, cfg, dtype)


def test_broken_table_is_a_clear_error(tmp_path):
    table = C.load_table()
    del table["float16"]["d128"]["nlong"]["dq"]
    path = tmp_path / "t.json"
    path.write_text(C.dump_table(table, {"how": "test"}))
    with pytest.raises(ValueError, match="no entry float16/d128/nlong/dq; regenerate it"):
        C.load_table(str(path))
    path.write_text("{}")
    with pytest.raises(ValueError, match="no 'configs' object"):
        C.load_table(str(path))


def test_dump_table_round_trips():
    table = C.load_table()
    text = C.dump_table(table, {"how": "test", "device": None})
    assert json.loads(text)["configs"] == table
    assert text.count("\n") < 80  # one line per (dtype, head dim, sequence bucket): readable diffs


def _sha(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def test_tune_dry_run_writes_a_valid_table_elsewhere(tmp_path):
    committed = _sha(C.TABLE_PATH)
    out = tmp_path / "tuned.json"
    cmd = [sys.executable, "-m", "fastebm.kernels.tune", "--dry-run", "--buckets", "n256", "--kernels", "fwd,dbwd_col",
           "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert _sha(C.TABLE_PATH) == committed
    doc = json.loads(out.read_text())
    assert doc["source"]["dry_run"] is True and "tune --dry-run" in doc["source"]["how"]
    tuned = C.load_table(str(out))
    old = C.load_table()
    # the timed entries are among the dry run's candidates; every other entry is copied unchanged
    for kernel in ("fwd", "dbwd_col"):
        assert tuned["float32"]["d64"]["n256"][kernel] in ([16, 16, 4, 1], [32, 16, 4, 1])
        tuned["float32"]["d64"]["n256"][kernel] = old["float32"]["d64"]["n256"][kernel]
    assert tuned == old
    assert "fwd [16, 16, 4, 1]:" in proc.stdout and "dbwd_col [32, 16, 4, 1]:" in proc.stdout


def test_tune_refuses_to_overwrite_the_committed_table_in_a_dry_run():
    committed = _sha(C.TABLE_PATH)
    cmd = [sys.executable, "-m", "fastebm.kernels.tune", "--dry-run", "--out", C.TABLE_PATH]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "never writes the committed table" in proc.stderr
    assert _sha(C.TABLE_PATH) == committed


@pytest.mark.parametrize("args,match", [(["--kernels", "bwd"], "unknown kernel 'bwd'"),
                                        (["--head-dims", "256"], "head dim 256"),
                                        (["--dtypes", "int8"], "unknown dtype 'int8'")])
def test_tune_bad_arguments(args, match):
    proc = subprocess.run([sys.executable, "-m", "fastebm.kernels.tune", "--dry-run", *args],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and match in proc.stderr, proc.stderr[-1000:]
