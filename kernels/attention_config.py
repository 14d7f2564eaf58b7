"""The attention kernels' block-size policy, in one place (imports no triton).

Every launch of a ``fastebm.kernels.attention`` kernel takes its tile sizes, warps and pipeline
stages from :func:`launch_config`:

- in Triton's interpreter (no GPU) every tile is ``INTERPRETER_BLOCK`` rows (tests lower it to get
  multi-tile loops with ragged last tiles); warps and stages mean nothing there;
- on a GPU from the table ``attention_configs.json`` beside this file, keyed by input dtype,
  head-dim bucket (``d64``: d <= 64, ``d128``: d <= 128) and sequence-length bucket (``n256``,
  ``n1024``, ``nlong``; by max(Nq, Nk)). ``python -m fastebm.kernels.tune`` regenerates the table
  on a GPU with ``triton.testing.do_bench``; ``tune --dry-run`` checks the plumbing on CPU.

Each table entry is ``[BLOCK_M, BLOCK_N, num_warps, num_stages]``. ``BLOCK_M`` tiles query rows,
``BLOCK_N`` key rows; the column kernels (``dkdv``, ``dbwd_col``) keep ``BLOCK_N`` key rows resident
and loop over ``BLOCK_M``-row query tiles, the others the other way round. Every entry obeys
:func:`check_config` (also applied to the tuner's candidates): tiles powers of two >= 16
(``tl.dot``), and for 16-bit inputs a resident tile of >= 64 rows. The column kernels compute
S^T = K Q^T tiles, so the resident key tile is the row dimension of every product there too: with
64 rows each is a warpgroup MMA on sm_90 (``python -m fastebm.kernels.compile_check`` reports
``wgmma``, or ``mixed`` when some product is not). The committed entries are chosen from that
report: no register spills for 16-bit inputs with d <= 64 (query tiles of 64 rows in the column
kernels, pipelined loops where registers allow), the fewest spills elsewhere (float32 runs 3xTF32
products, whose operand splits need about twice the registers: its tiles are smaller, and at d = 128
its column kernel keeps 32 keys, as 64 would not fit shared memory).
"""
from __future__ import annotations

import contextlib
import json
import os
from typing import Dict, Iterator, Optional, Tuple

import torch

__all__ = ["KERNELS", "COLUMN_KERNELS", "INTERPRETER_BLOCK", "TABLE_PATH", "launch_config", "block_d",
           "head_dim_bucket", "seq_bucket", "table_key", "check_config", "load_table", "use_configs"]

KERNELS = ("fwd", "dkdv", "dq", "dbwd_row", "dbwd_col")
COLUMN_KERNELS = ("dkdv", "dbwd_col")
DTYPES = ("bfloat16", "float16", "float32", "float64")
HEAD_DIM_BUCKETS = (64, 128)
SEQ_BUCKETS = ((256, "n256"), (1024, "n1024"), (None, "nlong"))
FIELDS = ("BLOCK_M", "BLOCK_N", "num_warps", "num_stages")
# Tile size used in the interpreter. Its cost is Python overhead per tile operation, so large tiles
# are fastest; tests lower it (monkeypatch) to exercise multi-tile loops with ragged last tiles.
INTERPRETER_BLOCK = 64
TABLE_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "attention_configs.json")

Config = Tuple[int, int, int, int]
_table: Optional[dict] = None
_overrides: Dict[str, Config] = {}


def _next_power_of_2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def block_d(head_dim: int) -> int:
    """The head-dim tile: the next power of two >= max(head_dim, 16) (padded columns are masked)."""
    return max(16, _next_power_of_2(head_dim))


def head_dim_bucket(head_dim: int) -> str:
    """``d64`` for head dims 1..64, ``d128`` for 65..128."""
    for bound in HEAD_DIM_BUCKETS:
        if head_dim <= bound:
            return f"d{bound}"
    raise ValueError(f"head dim {head_dim} is above {HEAD_DIM_BUCKETS[-1]}; use backend='math' for it")


def seq_bucket(seq_len: int) -> str:
    """``n256`` for sequence lengths up to 256 (ViT at 224 px: 197), ``n1024`` up to 1024, else ``nlong``."""
    for bound, name in SEQ_BUCKETS:
        if bound is None or seq_len <= bound:
            return name
    raise AssertionError("unreachable")


def table_key(dtype: torch.dtype, head_dim: int, seq_len: int) -> Tuple[str, str, str]:
    """``(dtype name, head-dim bucket, sequence bucket)``: where a launch's entry sits in the table."""
    name = str(dtype).replace("torch.", "")
    if name not in DTYPES:
        raise ValueError(f"no attention kernel configuration for {dtype}; supported: {', '.join(DTYPES)}")
    return name, head_dim_bucket(head_dim), seq_bucket(seq_len)


def check_config(kernel: str, cfg, dtype_name: Optional[str] = None) -> Config:
    """``cfg`` as a ``(BLOCK_M, BLOCK_N, num_warps, num_stages)`` tuple; ValueError if it breaks the
    policy. The >= 64-row resident tile is required of GPU entries for 16-bit inputs (``dtype_name``
    bfloat16 or float16); the interpreter takes any tiles."""
    if kernel not in KERNELS:
        raise ValueError(f"unknown kernel {kernel!r}; one of {', '.join(KERNELS)}")
    if len(cfg) != 4 or not all(isinstance(x, int) and x > 0 for x in cfg):
        raise ValueError(f"{kernel} config {cfg!r} must be 4 positive ints {list(FIELDS)}")
    bm, bn, warps, stages = cfg
    for name, b in (("BLOCK_M", bm), ("BLOCK_N", bn)):
        if b < 16 or b & (b - 1):
            raise ValueError(f"{kernel} {name}={b} must be a power of two >= 16 (tl.dot needs 16)")
    if warps not in (1, 2, 4, 8, 16):
        raise ValueError(f"{kernel} num_warps={warps} must be a power of two <= 16")
    resident, rows = ("BLOCK_N", bn) if kernel in COLUMN_KERNELS else ("BLOCK_M", bm)
    if dtype_name in ("bfloat16", "float16") and rows < 64:
        raise ValueError(f"{kernel} {resident}={rows}: the resident tile needs >= 64 rows (a wgmma's row count)")
    return bm, bn, warps, stages


def load_table(path: str = TABLE_PATH) -> dict:
    """The table ``{dtype: {d-bucket: {n-bucket: {kernel: [BLOCK_M, BLOCK_N, warps, stages]}}}}`` of
    ``path`` (the JSON file's ``configs``), every entry present and checked (:func:`check_config`)."""
    with open(path) as f:
        doc = json.load(f)
    configs = doc.get("configs") if isinstance(doc, dict) else None
    if not isinstance(configs, dict):
        raise ValueError(f"{path}: no 'configs' object; regenerate it with python -m fastebm.kernels.tune")
    for dtype_name in DTYPES:
        for bound in HEAD_DIM_BUCKETS:
            for _, seq in SEQ_BUCKETS:
                for kernel in KERNELS:
                    try:
                        cfg = configs[dtype_name][f"d{bound}"][seq][kernel]
                    except (KeyError, TypeError):
                        raise ValueError(f"{path}: no entry {dtype_name}/d{bound}/{seq}/{kernel}; regenerate it with "
                                         "python -m fastebm.kernels.tune") from None
                    check_config(kernel, tuple(cfg), dtype_name)
    return configs


def _gpu_table() -> dict:
    global _table
    if _table is None:
        _table = load_table()
    return _table


@contextlib.contextmanager
def use_configs(configs: Dict[str, Config]) -> Iterator[None]:
    """Within the block, ``launch_config`` returns ``configs[kernel]`` for the kernels named there, on
    a GPU and in the interpreter alike (the tuner times candidates this way)."""
    configs = {kernel: check_config(kernel, tuple(cfg)) for kernel, cfg in configs.items()}
    saved = dict(_overrides)
    _overrides.update(configs)
    try:
        yield
    finally:
        _overrides.clear()
        _overrides.update(saved)


def launch_config(dtype: torch.dtype, head_dim: int, kernel: str, *, on_gpu: bool, seq_len: int) -> dict:
    """``{BLOCK_M, BLOCK_N, BLOCK_D}`` and, on a GPU, ``{num_warps, num_stages}`` for launching
    ``kernel`` (one of ``KERNELS``) on inputs of ``dtype`` with this head dim and max(Nq, Nk) = ``seq_len``.

    Raises ValueError for an unknown kernel or dtype, or a head dim above 128."""
    if kernel not in KERNELS:
        raise ValueError(f"unknown kernel {kernel!r}; one of {', '.join(KERNELS)}")
    key = table_key(dtype, head_dim, seq_len)
    if kernel in _overrides:
        bm, bn, warps, stages = _overrides[kernel]
    elif on_gpu:
        dtype_name, d_bucket, n_bucket = key
        bm, bn, warps, stages = _gpu_table()[dtype_name][d_bucket][n_bucket][kernel]
    else:
        return dict(BLOCK_M=INTERPRETER_BLOCK, BLOCK_N=INTERPRETER_BLOCK, BLOCK_D=block_d(head_dim))
    cfg = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=block_d(head_dim))
    if on_gpu:
        cfg.update(num_warps=warps, num_stages=stages)
    return cfg


def dump_table(configs: dict, source: dict) -> str:
    """The table file's text: ``about``, ``source`` (how and where it was made) and ``configs``, one
    line per (dtype, head-dim bucket, sequence bucket) so a regenerated table diffs readably."""
    lines = ["{", f'  "about": {json.dumps(_ABOUT)},', f'  "source": {json.dumps(source, sort_keys=True)},',
             '  "configs": {']
    for i, dtype_name in enumerate(configs):
        lines.append(f"    {json.dumps(dtype_name)}: {{")
        for j, d in enumerate(configs[dtype_name]):
            lines.append(f"      {json.dumps(d)}: {{")
            seqs = configs[dtype_name][d]
            for k, seq in enumerate(seqs):
                entry = ", ".join(f"{json.dumps(kern)}: {json.dumps(list(cfg))}" for kern, cfg in seqs[seq].items())
                lines.append(f"        {json.dumps(seq)}: {{{entry}}}" + ("," if k < len(seqs) - 1 else ""))
            lines.append("      }" + ("," if j < len(configs[dtype_name]) - 1 else ""))
        lines.append("    }" + ("," if i < len(configs) - 1 else ""))
    lines += ["  }", "}", ""]
    text = "\n".join(lines)
    json.loads(text)  # the writer's own check that the text is JSON
    return text


_ABOUT = ("Launch configurations of fastebm.kernels.attention: configs[dtype][head-dim bucket][sequence bucket]"
          "[kernel] = [BLOCK_M, BLOCK_N, num_warps, num_stages]. Read by fastebm.kernels.attention_config."
          "launch_config; regenerate on a GPU with python -m fastebm.kernels.tune.")
