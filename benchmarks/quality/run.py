"""The learning-quality benchmark (issue 12): fastebm backbones against random init and an MAE baseline.

One command runs the whole study on the built-in data and writes, into --output_dir,
``quality.json`` (every number, every command, versions, date, git commit, CPU time),
``quality.md`` (mean +- std over seeds), ``quality.png`` (bars per metric and arm) and
``quality_curves.png`` (the fine-tuning curves):

    nice -n 10 python benchmarks/quality/run.py                      # default set, 3 seeds, 2 jobs
    python benchmarks/quality/run.py --quick --output_dir /tmp/q      # plumbing check (CI), ~1-2 min
    python benchmarks/quality/run.py --arms variants --output_dir OUT   # the other fastebm variants (arms.py)
    python benchmarks/quality/run.py --arms blr4e-3 --output_dir OUT   # all-label FT at the lr before round 6
    python benchmarks/quality/run.py --arms blr32e-3 --output_dir OUT  # ... and at round 7's candidate
    python benchmarks/quality/run.py --arms ft1000steps,ft400steps --output_dir OUT  # ... for 1,000 / 400 steps
    python benchmarks/quality/run.py --benchmark textures --output_dir OUT  # the same study on textures.py's patches
    python benchmarks/quality/run.py --arms photos --output_dir OUT    # fastebm and MAE pretrained without the digits (round 15)

With ``--benchmark textures`` every evaluation reads the texture patches of textures.py (written into the
work folder) with ``fastebm-eval --recipe small``, the digits' recipe, and the outputs are named
``textures.*``; the arms and their pretraining runs are the same, so one work folder serves both benchmarks.

Each arm (arms.py) is pretrained per seed (fastebm-train, or mae.py), then evaluated with
fastebm-eval's built-in recipes, the same for every arm: linear probe and fine-tuning with 100
labels (10 per class, drawn by the seed) and with all 1,300, k-NN on all labels, a re-probe of each
fine-tuned backbone, diagnostics (diagnose.py). The MAE baseline runs at the same epochs and at
the epochs that buy the same training FLOPs as fastebm's defaults (flops.py). Jobs run in
--jobs processes of one thread each; finished outputs in --work_dir are reused (re-run to resume).
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import shlex
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)

import arms as A  # noqa: E402


NOT_RUN = "not run: a job it needs failed"


@dataclass
class Job:
    name: str
    argv: List[str]  # what runs (a pretraining command, or job.py over `commands`)
    commands: List[List[str]]  # the commands it stands for (shown in the outputs)
    done_file: str
    arm: str
    seed: int
    part: str
    deps: List[str] = field(default_factory=list)
    log: str = ""
    stamp: str = ""  # records the commands this job's outputs belong to (see reuse_conflicts)
    upstream: List[List[str]] = field(default_factory=list)  # the pretraining command whose backbone it evaluates
    rc: Optional[int] = None
    wall_s: float = 0.0
    cpu_s: float = 0.0
    skipped: str = ""

    def record(self) -> Dict:
        return {"name": self.name, "arm": self.arm, "seed": self.seed, "part": self.part, "rc": self.rc,
                "wall_s": round(self.wall_s, 2), "cpu_s": round(self.cpu_s, 2), "skipped": self.skipped,
                "commands": [show(c) for c in self.commands]}


def show(argv: List[str]) -> str:
    """A command as one copy-pasteable line, paths relative to the repository root."""
    out = ["python" if a == sys.executable else os.path.relpath(a, ROOT) if os.path.isabs(a) and a.startswith(ROOT) else a
           for a in argv]
    return " ".join(shlex.quote(a) for a in out)


def stamp_path(work: str, name: str) -> str:
    return os.path.join(work, "stamps", name.replace("/", "__") + ".json")


def identity(job: Job) -> List[str]:
    """What a job's outputs depend on: its commands and the pretraining command of the backbone it reads."""
    return [show(c) for c in job.commands + job.upstream]


def write_stamp(job: Job) -> None:
    os.makedirs(os.path.dirname(job.stamp), exist_ok=True)
    tmp = job.stamp + ".tmp"
    with open(tmp, "w") as fh:
        json.dump(identity(job), fh)
    os.replace(tmp, job.stamp)


def reuse_conflicts(jobs: List[Job]) -> List[str]:
    """Jobs whose folders hold outputs of other commands: a stamp that differs from the job's commands, or
    finished outputs with no stamp. An arm's folder is named after the arm, not its flags, so when an arm
    or the study's budget changes (round 11 changed what the arm ``fastebm`` runs), reusing the folder
    would report the old run under the new name."""
    bad = []
    for job in jobs:
        try:
            with open(job.stamp) as fh:
                recorded = json.load(fh)
        except (OSError, ValueError):
            recorded = None
        if (recorded is not None or os.path.exists(job.done_file)) and recorded != identity(job):
            bad.append(job.name)
    return bad


def run_job(job: Job) -> None:
    """Runs ``job`` as a child process with one thread; records exit code, wall and CPU seconds."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=HERE + os.pathsep + os.environ.get("PYTHONPATH", ""))
    t0 = time.time()
    with open(job.log, "w") as log:
        proc = subprocess.Popen(job.argv, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    job.rc, job.wall_s, job.cpu_s = proc.returncode, time.time() - t0, usage.ru_utime + usage.ru_stime


def schedule(jobs: List[Job], workers: int, say) -> None:
    """Runs the jobs on ``workers`` threads, each job once its dependencies succeeded, in list order."""
    lock = threading.Condition()
    pending = list(jobs)
    by_name = {j.name: j for j in jobs}

    def ready(job):
        deps = [by_name[d] for d in job.deps]
        if any(d.rc not in (None, 0) or d.skipped == NOT_RUN for d in deps):
            return "skip"
        return all(d.rc == 0 for d in deps)

    def worker():
        while True:
            with lock:
                job = None
                while pending:
                    for cand in pending:
                        state = ready(cand)
                        if state == "skip":
                            cand.skipped = NOT_RUN
                            pending.remove(cand)
                            lock.notify_all()
                            break
                        if state:
                            job = cand
                            pending.remove(cand)
                            break
                    else:
                        lock.wait()
                        continue
                    if job is not None:
                        break
                if job is None:
                    return
            if os.path.exists(job.done_file):
                job.rc = 0
                job.skipped = "reused"
            else:
                if job.stamp:
                    write_stamp(job)  # before it runs: a half-finished folder belongs to this command too
                run_job(job)
                say(f"{job.name}: rc {job.rc}, {job.wall_s:.0f} s wall, {job.cpu_s:.0f} s CPU")
            with lock:
                lock.notify_all()

    threads = [threading.Thread(target=worker) for _ in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def flops_table(arm_names: List[str], budget: A.Budget) -> Dict:
    """GFLOP per training step of every pretrained arm, the steps it runs, and MAE's equal-FLOPs epochs."""
    import flops
    from fastebm.data.builtin import BuiltinDemoData
    from fastebm.data.sampling import BatchPlan

    n_images = len(BuiltinDemoData(32, 0))
    steps_per_epoch = BatchPlan(n_images, A.PRETRAIN_BATCH).steps_per_epoch
    ref = flops.fastebm_step_flops([])
    mae_at = functools.lru_cache()(lambda px: flops.mae_step_flops(img_size=px))  # an MAE step at px, counted once
    mae = mae_at(A.MAE_PX)  # the default set's MAE baseline
    out = {"steps_per_epoch": steps_per_epoch, "fastebm_defaults_gflop_per_step": ref / 1e9, "mae_img_size": A.MAE_PX,
           "mae_gflop_per_step": mae / 1e9, "ratio": ref / mae,
           "mae_equal_flops_epochs": A.PRETRAIN_EPOCHS * ref / mae, "arms": {}}
    for name in arm_names:
        arm = A.ARMS[A.ARMS[name].pretrain_name]  # an evaluation-only arm costs what its pretraining did
        if arm.kind == "init":
            continue
        if arm.kind == "mae":
            per = mae_at(A.pretrain_px(arm))
            epochs = A.PRETRAIN_EPOCHS if arm.mae_budget == "epochs" else A.PRETRAIN_EPOCHS * ref / per
        else:
            per, epochs = (ref if not arm.flags else flops.fastebm_step_flops(arm.flags)), A.train_epochs(arm)
        arm_steps_per_epoch = BatchPlan(n_images, A.train_batch_size(arm)).steps_per_epoch  # fewer images, more steps
        steps = round(epochs * arm_steps_per_epoch) if not budget.quick else 2
        out["arms"][name] = {"gflop_per_step": per / 1e9, "epochs": epochs, "steps": steps, "pflop": per * steps / 1e15}
    return out


def build_jobs(arm_names: List[str], seeds: List[int], work: str, budget: A.Budget, fl: Dict) -> List[Job]:
    pre, ev = [], []
    for name in arm_names:
        arm = A.ARMS[name]
        base = A.ARMS[arm.pretrain_name]  # whose pretraining runs the arm evaluates (itself, unless pretrained_as)
        for seed in seeds:
            pdir = os.path.join(work, "pretrain", f"{base.name}_s{seed}")
            mae_epochs = fl["arms"].get(name, {}).get("epochs")
            cmd = A.pretrain_command(base, seed, pdir, budget, mae_epochs)
            deps = []
            if cmd is not None:
                if base.kind == "fastebm":  # a re-run resumes an unfinished run and keeps a finished one
                    cmd = cmd + ["--resume", "auto"]
                job = Job(f"pretrain/{base.name}_s{seed}", cmd, [cmd], os.path.join(pdir, "backbone.pth"), base.name, seed, "pretrain")
                job.log = pdir + ".log"
                job.stamp = stamp_path(work, job.name)
                if all(j.name != job.name for j in pre):  # two arms sharing one pretraining run it once
                    pre.append(job)
                deps = [job.name]
            edir = os.path.join(work, budget.eval_folder, f"{name}_s{seed}")
            for part, commands in A.eval_commands(arm, seed, pdir, edir, budget).items():
                spec = os.path.join(work, "jobs", f"{budget.eval_folder}_{name}_s{seed}_{part}.json")
                os.makedirs(os.path.dirname(spec), exist_ok=True)
                with open(spec, "w") as fh:
                    json.dump(commands, fh)
                import job as J

                job = Job(f"{budget.eval_folder}/{name}_s{seed}/{part}", [sys.executable, os.path.join(HERE, "job.py"), spec], commands,
                          J.output_of(commands[-1]), name, seed, part, deps, upstream=[cmd] if cmd is not None else [])
                job.log = os.path.join(edir, f"{part}.log")
                job.stamp = stamp_path(work, job.name)
                os.makedirs(edir, exist_ok=True)
                ev.append(job)
    # longest first: pretraining (fine-tunings wait for it), fine-tunings, then the short frozen jobs
    pre.sort(key=lambda j: -fl["arms"].get(j.arm, {}).get("pflop", 0))
    ev.sort(key=lambda j: (j.part == "frozen", j.part != "ft_all"))
    for j in pre:
        os.makedirs(os.path.dirname(j.log), exist_ok=True)
    return pre + ev


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny plumbing check: 1 seed, 2 arms, a few steps each")
    ap.add_argument("--seeds", type=int, nargs="+", default=None, help="default 0 1 2 (quick: 0)")
    ap.add_argument("--arms", default=None, help="comma-separated arm names (arms.py); \"variants\": the other fastebm variants; \"blr4e-3\" / \"blr32e-3\": "
                         "the compared arms, and their all-label fine-tuning at the built-in lr before round 6 / at round 7's candidate; "
                         "\"ft1000steps\" / \"ft400steps\": ... for 1,000 / 400 steps instead of 2,000; "
                         "\"photos\": fastebm's defaults and both MAE arms pretrained without the digits (photos_only.py); "
                         "default: the default set")
    ap.add_argument("--benchmark", choices=A.BENCHMARKS, default="digits",
                    help="digits: the built-in digits (outputs quality.*); textures: texture patches of ten photographs no arm "
                         "was pretrained on (textures.py; outputs textures.*); the same arms, pretraining runs and "
                         "evaluation commands")
    ap.add_argument("--jobs", type=int, default=2, help="processes at a time, one thread each")
    ap.add_argument("--output_dir", default=os.path.join(ROOT, "benchmarks", "results", "quality"))
    ap.add_argument("--work_dir", default=None, help="run folders (default OUTPUT_DIR/runs, git-ignored)")
    args = ap.parse_args(argv)
    if args.jobs < 1:
        print(f"run.py: error: --jobs must be >= 1 (got {args.jobs})", file=sys.stderr)
        return 2
    seeds = args.seeds if args.seeds is not None else ([0] if args.quick else [0, 1, 2])
    names = args.arms.split(",") if args.arms else (A.QUICK_ARMS if args.quick else A.DEFAULT_ARMS)
    names = list(dict.fromkeys(n for name in names for n in A.GROUPS.get(name, [name])))
    unknown = [n for n in names if n not in A.ARMS]
    if unknown:
        print(f"run.py: error: unknown arm(s) {unknown}; choose from {', '.join(A.ARMS)}", file=sys.stderr)
        return 2
    work = os.path.abspath(args.work_dir or os.path.join(args.output_dir, "runs"))
    try:
        os.makedirs(work, exist_ok=True)
    except OSError as exc:  # a file in the way, no permission
        print(f"run.py: error: cannot make the work folder {work}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    data_dir = None
    if args.benchmark == "textures":
        import textures

        data_dir = os.path.join(work, "data", "textures")
        try:
            textures.write_folder(data_dir)
        except OSError as exc:  # a folder of something else, a file in the way, no permission
            print(f"run.py: error: the texture benchmark's folder {data_dir}: {exc}", file=sys.stderr)
            return 2
    budget = A.Budget(quick=args.quick, data_dir=data_dir)
    import torch

    torch.set_num_threads(1)
    t0, load0 = time.time(), os.getloadavg()

    def say(msg):
        print(f"[{time.time() - t0:7.0f} s] {msg}", flush=True)

    fl = flops_table(names, budget)
    say(f"FLOPs per step: fastebm defaults {fl['fastebm_defaults_gflop_per_step']:.2f} G, MAE at {fl['mae_img_size']} px "
        f"{fl['mae_gflop_per_step']:.2f} G "
        f"(x{fl['ratio']:.1f}); MAE at equal FLOPs: {fl['mae_equal_flops_epochs']:.2f} epochs")
    jobs = build_jobs(names, seeds, work, budget, fl)
    conflicts = reuse_conflicts(jobs)
    if conflicts:
        print(f"run.py: error: {work} holds outputs of other commands for {len(conflicts)} job(s) ({', '.join(conflicts[:3])}"
              f"{' ...' if len(conflicts) > 3 else ''}): an arm or the study's budget changed since they ran, or they "
              f"predate the record of commands; give a fresh --work_dir, or delete those folders", file=sys.stderr)
        return 2
    say(f"{len(jobs)} jobs, {args.jobs} at a time; work dir {work}")
    schedule(jobs, args.jobs, say)
    import report

    meta = {"argv": show([sys.executable, os.path.abspath(__file__)] + (sys.argv[1:] if argv is None else list(argv))),
            "benchmark": args.benchmark, "eval_folder": budget.eval_folder, "quick": args.quick, "seeds": seeds, "arms": names, "jobs": args.jobs, "wall_s": time.time() - t0,
            "cpu_s": sum(j.cpu_s for j in jobs), "loadavg_start": load0, "loadavg_end": os.getloadavg(), "work_dir": work}
    paths = report.write(args.output_dir, meta, fl, jobs)
    say(f"wrote {', '.join(paths)}")
    failed = [j.name for j in jobs if j.rc not in (0, None) and j.part != "pretrain"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
