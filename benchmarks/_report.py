"""Writing a benchmark report: JSON for machines, Markdown for people, the Markdown echoed."""
import json
import os


def write_report(report: dict, markdown: str, out_dir: str, stem: str) -> str:
    """Writes ``OUT_DIR/STEM.json`` and ``OUT_DIR/STEM.md``, prints the table; returns the path stem."""
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, stem)
    with open(path + ".json", "w") as f:
        json.dump(report, f, indent=2)
    with open(path + ".md", "w") as f:
        f.write(markdown)
    print(markdown)
    print(f"wrote {path}.json and {path}.md")
    return path


def kernel_bench_main(argv, *, description: str, stem: str, run, to_markdown, cuda: bool, gpu_reps: int) -> int:
    """Command line shared by the kernel benchmarks: ``--out``, ``--reps``, ``--warmup``.

    CPU smoke results are not results: without CUDA they go to a temporary folder by default and
    their file names say ``cpu_smoke``.
    """
    import argparse
    import tempfile

    parser = argparse.ArgumentParser(description=description)
    default_out = "benchmarks/results" if cuda else os.path.join(tempfile.gettempdir(), "fastebm_bench")
    parser.add_argument("--out", default=default_out, help=f"folder for {stem}.{{json,md}} ({default_out})")
    parser.add_argument("--reps", type=int, default=gpu_reps if cuda else 2)
    parser.add_argument("--warmup", type=int, default=3 if cuda else 0)
    args = parser.parse_args(argv)
    if args.reps < 1 or args.warmup < 0:
        parser.error("--reps must be >= 1 and --warmup >= 0")
    report = run(args.reps, args.warmup)
    write_report(report, to_markdown(report), args.out, stem if cuda else stem + "_cpu_smoke")
    return 0
