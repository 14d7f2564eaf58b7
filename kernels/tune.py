"""Regenerates the attention kernels' launch table (``attention_configs.json``) by timing candidates.

    python -m fastebm.kernels.tune                        # on a GPU: rewrites the committed table
    python -m fastebm.kernels.tune --dtypes bfloat16 --head-dims 64 --out /tmp/t.json
    python -m fastebm.kernels.tune --dry-run              # CPU: the plumbing, in Triton's interpreter

For every (dtype, head-dim bucket, sequence bucket) and kernel it launches that one kernel with
each candidate ``[BLOCK_M, BLOCK_N, num_warps, num_stages]`` that the policy allows
(``attention_config.check_config``) on a representative call (12 heads, sequence lengths 197 /
1024 / 4096 for the buckets, about 64 * 197 rows in all), times it with ``triton.testing.do_bench``,
drops candidates that fail to compile or run (out of shared memory, registers) or whose outputs
differ from the committed entry's beyond rounding, and keeps the fastest. Entries it does not time
(other dtypes, head dims, kernels) are copied from the current table. The table is written
atomically (temp file + rename).

``--dry-run`` runs the same code in the interpreter on a tiny call with two small candidates per
kernel and a CPU timer (the timings mean nothing), writes to ``--out`` or a temporary file, and
refuses to write the committed table.
"""
from __future__ import annotations

import argparse
import itertools
import os
import sys
import tempfile
import time

_DRY_RUN = "--dry-run" in sys.argv[1:]
if _DRY_RUN:
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is first imported

import torch  # noqa: E402

from . import attention_config as C  # noqa: E402

BUCKET_SEQ_LEN = {"n256": 197, "n1024": 1024, "nlong": 4096}
HEADS = 12
ROWS = 64 * 197  # batch * sequence length of every timed call (a ViT-B/16 batch of 64)
SEARCH = dict(BLOCK_M=(16, 32, 64, 128), BLOCK_N=(16, 32, 64, 128), num_warps=(4, 8), num_stages=(1, 2, 3))


def candidates(kernel: str, dtype_name: str, dry_run: bool) -> list:
    """The configurations to time: the policy-valid grid of ``SEARCH`` (two tiny ones in a dry run)."""
    if dry_run:
        return [(16, 16, 4, 1), (32, 16, 4, 1)]
    out = []
    for cfg in itertools.product(*SEARCH.values()):
        try:
            out.append(C.check_config(kernel, cfg, dtype_name))
        except ValueError:
            pass
    return out


def _inputs(dtype: torch.dtype, head_dim: int, seq_len: int, device: str, dry_run: bool):
    from . import attention as A

    B = 1 if dry_run else max(1, ROWS // seq_len)
    H = 2 if dry_run else HEADS
    g = torch.Generator(device="cpu").manual_seed(0)
    x = {n: torch.randn(B, H, seq_len, head_dim, generator=g).to(device=device, dtype=dtype)
         for n in ("q", "k", "v", "do", "gq", "gk", "gv")}
    scale = head_dim ** -0.5
    x["o"], x["lse"] = A.attn_fwd(x["q"], x["k"], x["v"], scale)
    x["delta"] = A.attn_bwd_delta(x["o"], x["do"])
    x["scale"] = scale
    return x


def kernel_call(kernel: str, x: dict):
    """A function that launches ``kernel`` alone on the inputs ``x`` (with the configuration
    ``launch_config`` gives now) and returns its outputs. For ``dbwd_col`` the row kernel's
    statistics are computed once, here."""
    from . import attention as A

    q, k, v, do, lse, delta, s = x["q"], x["k"], x["v"], x["do"], x["lse"], x["delta"], x["scale"]
    nk = k.shape[2]
    strided = (q, k, v, do, x["gq"], x["gk"], x["gv"])

    def new(t):
        return torch.empty(t.shape, dtype=t.dtype, device=t.device)

    if kernel == "dbwd_col":
        r, c = new(lse), new(lse)
        A._launch(A._attn_dbwd_row_kernel, "dbwd_row", strided, (lse, delta, new(q), new(do), r, c), q, nk, s)
    launches = {
        "fwd": (A._attn_fwd_kernel, (q, k, v), lambda: (new(q), new(lse))),
        "dkdv": (A._attn_bwd_dkdv_kernel, (q, k, v, do), lambda: (lse, delta, new(k), new(v))),
        "dq": (A._attn_bwd_dq_kernel, (q, k, v, do), lambda: (lse, delta, new(q))),
        "dbwd_row": (A._attn_dbwd_row_kernel, strided, lambda: (lse, delta, new(q), new(do), new(lse), new(lse))),
        "dbwd_col": (A._attn_dbwd_col_kernel, strided, lambda: (lse, delta, r, c, new(k), new(v))),
    }
    fn, ins, outputs = launches[kernel]
    n_inputs = {"fwd": 0, "dkdv": 2, "dq": 2, "dbwd_row": 2, "dbwd_col": 4}[kernel]  # row statistics read

    def run():
        others = outputs()
        A._launch(fn, kernel, ins, others, q, nk, s)
        return others[n_inputs:]

    return run


def _bench(fn, on_gpu: bool) -> float:
    """Milliseconds per call: ``triton.testing.do_bench`` on a GPU, a plain timer in the interpreter."""
    if on_gpu:
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=10, rep=50))
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def _close(outs, ref, dtype: torch.dtype) -> bool:
    tol = 1e-4 if dtype in (torch.float32, torch.float64) else 2e-2
    for a, b in zip(outs, ref):
        a, b = a.double(), b.double()
        if not torch.isfinite(a).all() or (a - b).norm() > tol * max(b.norm().item(), 1e-30):
            return False
    return True


def tune_kernel(kernel: str, x: dict, dtype_name: str, on_gpu: bool, dry_run: bool, log) -> tuple:
    """The fastest valid candidate for ``kernel`` on inputs ``x`` (None if none ran)."""
    ref = kernel_call(kernel, x)()
    best, best_ms = None, float("inf")
    for cfg in candidates(kernel, dtype_name, dry_run):
        try:
            with C.use_configs({kernel: cfg}):
                run = kernel_call(kernel, x)
                if not _close(run(), ref, x["q"].dtype):
                    log(f"  {kernel} {list(cfg)}: outputs differ from the current entry's; dropped")
                    continue
                ms = _bench(run, on_gpu)
        except Exception as exc:  # noqa: BLE001 - a candidate that does not compile or fit is skipped
            log(f"  {kernel} {list(cfg)}: {type(exc).__name__}: {str(exc)[:120]}")
            continue
        log(f"  {kernel} {list(cfg)}: {ms:.4f} ms")
        if ms < best_ms:
            best, best_ms = cfg, ms
    return best


def tune(dtypes, head_dims, buckets, kernels, dry_run: bool, log=print) -> dict:
    """The current table with the timed entries replaced by the fastest candidates."""
    table = C.load_table()
    on_gpu = torch.cuda.is_available() and not dry_run
    device = "cuda" if on_gpu else "cpu"
    for dtype_name, d, bucket in itertools.product(dtypes, head_dims, buckets):
        dtype = getattr(torch, dtype_name)
        seq_len = 37 if dry_run else BUCKET_SEQ_LEN[bucket]
        x = _inputs(dtype, d, seq_len, device, dry_run)
        log(f"{dtype_name} d={d} {bucket} (N={seq_len}, B*H={x['q'].shape[0] * x['q'].shape[1]})")
        for kernel in kernels:
            best = tune_kernel(kernel, x, dtype_name, on_gpu, dry_run, log)
            if best is not None:
                table[dtype_name][C.head_dim_bucket(d)][bucket][kernel] = list(best)
    return table


def write_table(table: dict, source: dict, path: str) -> None:
    """``table`` as the JSON file ``path``, atomically (temp file in the same folder + rename)."""
    text = C.dump_table(table, source)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".attention_configs.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtypes", default="bfloat16,float16,float32")
    parser.add_argument("--head-dims", default="64,128", help="one head dim per bucket (<= 64, <= 128)")
    parser.add_argument("--buckets", default=",".join(BUCKET_SEQ_LEN), help="sequence buckets to time")
    parser.add_argument("--kernels", default=",".join(C.KERNELS))
    parser.add_argument("--out", default=None, help=f"table to write (default: the committed {C.TABLE_PATH})")
    parser.add_argument("--dry-run", action="store_true",
                        help="CPU plumbing check in Triton's interpreter on a tiny call; never writes the committed table")
    args = parser.parse_args(argv)
    dtypes, kernels = args.dtypes.split(","), args.kernels.split(",")
    buckets = args.buckets.split(",")
    for name, values, allowed in (("dtype", dtypes, C.DTYPES), ("kernel", kernels, C.KERNELS),
                                  ("bucket", buckets, tuple(BUCKET_SEQ_LEN))):
        bad = [v for v in values if v not in allowed]
        if bad:
            parser.error(f"unknown {name} {bad[0]!r}; choose from {', '.join(allowed)}")
    try:
        head_dims = [int(d) for d in args.head_dims.split(",")]
        [C.head_dim_bucket(d) for d in head_dims]
    except ValueError as exc:
        parser.error(f"--head-dims: {exc}")
    out = args.out
    if args.dry_run:
        if out is not None and os.path.abspath(out) == os.path.abspath(C.TABLE_PATH):
            parser.error("--dry-run never writes the committed table; give another --out")
        if out is None:
            out = os.path.join(tempfile.mkdtemp(prefix="fastebm_tune_"), "attention_configs.json")
        dtypes, head_dims = ["float32"], [16]
    elif not torch.cuda.is_available():
        parser.error("tuning needs a CUDA GPU (timings in the interpreter mean nothing); use --dry-run on CPU")
    table = tune(dtypes, head_dims, buckets, kernels, args.dry_run)
    source = dict(how="python -m fastebm.kernels.tune " + " ".join(argv if argv is not None else sys.argv[1:]),
                  device=None if args.dry_run else torch.cuda.get_device_name(),
                  triton=__import__("triton").__version__, torch=torch.__version__,
                  date=time.strftime("%Y-%m-%d"), dry_run=args.dry_run)
    write_table(table, source, out or C.TABLE_PATH)
    print(f"wrote {out or C.TABLE_PATH}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
