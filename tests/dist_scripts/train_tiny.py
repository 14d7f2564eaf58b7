"""Trains a tiny RestorationObjective for a few steps, in one process or under torchrun.

Used by tests/test_distributed.py to check that N processes x B samples give the same parameters
as one process with N*B samples. Every sample (image and corruption) is a pure function of
(seed, step, global sample index), so the split of the global batch over ranks cannot change it.
Several runs share one launch (``--runs``) because starting torchrun costs more than training.

    python tests/dist_scripts/train_tiny.py --out_dir refs --runs plain:none,accum:none
    torchrun --nproc_per_node 2 tests/dist_scripts/train_tiny.py --out_dir multi --runs plain:ddp,accum:fsdp

Each run writes OUT_DIR/<setting>_<wrap>.pt (final and initial parameters, per-step losses, and
for DDP the (step, micro-step) of every gradient all-reduce).
"""
import argparse
import os
import sys

import torch

from fastebm import RestorationObjective, create_model
from fastebm import distributed as fdist

# name -> (global batch, accumulation micro-steps, energy, grad_mode)
SETTINGS = {
    "plain": (6, 1, "sqnorm", "exact"),
    # linear energy: its head bias gets no gradient through dE/dx (an unused parameter for DDP)
    "accum": (4, 2, "linear", "truncated"),
}


def sample(seed: int, step: int, index: int, img: int):
    """(clean, corrupted, weight) of one global sample: depends on (seed, step, index) only."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + index)
    clean = torch.randn(3, img, img, generator=g)
    g = torch.Generator().manual_seed((seed * 7919 + step) * 1_000_003 + index)
    corrupted = clean + 0.5 * torch.randn(3, img, img, generator=g)
    weight = (torch.rand(1, img, img, generator=g) < 0.7).float()
    return clean, corrupted, weight


def train_one(setting: str, wrap: str, info, args) -> dict:
    global_batch, accum, energy, grad_mode = SETTINGS[setting]
    world, rank, dev = info.world_size, info.rank, info.device
    if global_batch % world:
        raise SystemExit(f"global batch {global_batch} is not divisible by {world} processes")
    per_rank = global_batch // world

    torch.manual_seed(args.seed)  # identical initial weights on every rank (DDP also broadcasts rank 0's)
    model = create_model("vit_demo", img_size=args.img, depth=2, embed_dim=32, num_heads=2,
                         energy=energy, attn_backend="math")
    objective = RestorationObjective(model, steps=2, grad_mode=grad_mode, alpha_init=0.5).to(dev)
    initial = {k: v.detach().cpu().clone() for k, v in objective.state_dict().items()}
    synced_at = []  # (step, micro) of every DDP bucket all-reduce
    where = (0, 0)
    if wrap == "ddp":
        wrapped = fdist.wrap_ddp(objective, dev)
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

        def counting_hook(state, bucket):
            synced_at.append(where)
            return allreduce_hook(state, bucket)

        wrapped.register_comm_hook(None, counting_hook)
    elif wrap == "fsdp":
        wrapped = fdist.shard_fsdp(objective, dev)
    else:
        wrapped = objective
    params = [p for p in objective.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.05)

    losses = []
    for step in range(args.opt_steps):
        step_loss = 0.0
        for micro in range(accum):
            where = (step, micro)
            first = (step * accum + micro) * global_batch + rank * per_rank
            parts = [sample(args.seed, step, i, args.img) for i in range(first, first + per_rank)]
            clean, corrupted, weight = (torch.stack(t).to(dev) for t in zip(*parts))
            with fdist.gradient_sync(wrapped, sync=micro == accum - 1):
                loss, _ = wrapped(clean, corrupted, weight)
                (loss / accum).backward()
            step_loss += float(fdist.all_reduce_mean(loss.detach())) / accum
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(step_loss)
    state = fdist.full_state_dict(objective) if wrap == "fsdp" else objective.state_dict()
    return {"params": {k: v.detach().cpu() for k, v in state.items()}, "initial": initial, "losses": losses,
            "world_size": world, "synced_at": synced_at}


def probe_per_block_fsdp(info, args) -> dict:
    """Tries FSDP2 per-block sharding (the usual recipe) with the double backward; records what happens.

    Variants: (a) blocks + objective sharded; (b) the same, never resharding after backward;
    (c) blocks + model + objective sharded. Each is compared with the gradient of one process
    holding the whole global batch. fastebm refuses per-block sharding because none of them is right.
    """
    from torch.distributed.fsdp import fully_shard

    world, rank = info.world_size, info.rank
    outcomes = {}
    for variant in ("blocks", "blocks_no_reshard_after_backward", "blocks_model_objective"):
        torch.manual_seed(args.seed)
        ref = RestorationObjective(create_model("vit_demo", img_size=args.img, depth=2, embed_dim=32, num_heads=2,
                                                attn_backend="math"), steps=2)
        torch.manual_seed(args.seed)
        obj = RestorationObjective(create_model("vit_demo", img_size=args.img, depth=2, embed_dim=32, num_heads=2,
                                                attn_backend="math"), steps=2)
        parts = [sample(args.seed, 0, i, args.img) for i in range(2 * world)]
        clean, corrupted, weight = (torch.stack(t) for t in zip(*parts))
        ref(clean, corrupted, weight)[0].backward()
        units = list(obj.model.blocks) + ([obj.model] if variant == "blocks_model_objective" else []) + [obj]
        for m in units:
            fully_shard(m)
        if variant == "blocks_no_reshard_after_backward":
            for m in units:
                m.set_reshard_after_backward(False)
        mine = slice(2 * rank, 2 * rank + 2)
        try:
            obj(clean[mine], corrupted[mine], weight[mine])[0].backward()
            worst = 0.0
            for (name, p), q in zip(obj.named_parameters(), ref.parameters()):
                if q.grad is None:
                    continue
                g = p.grad.full_tensor() if p.grad is not None else torch.zeros_like(q.grad)
                worst = max(worst, float((g - q.grad).abs().max() / q.grad.abs().max().clamp_min(1e-12)))
            outcomes[variant] = f"max relative gradient error {worst:.3g}"
        except Exception as exc:  # noqa: BLE001 - the failure is the finding
            outcomes[variant] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
        fdist.barrier()
    return {"probe": outcomes}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out_dir", required=True)
    ap.add_argument("--runs", default="plain:none", help="comma-separated SETTING:WRAP, WRAP in none|ddp|fsdp")
    ap.add_argument("--opt_steps", type=int, default=3)
    ap.add_argument("--img", type=int, default=16)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    info = fdist.init_distributed(device=args.device, timeout_s=60)
    for item in args.runs.split(","):
        setting, wrap = item.split(":")
        result = probe_per_block_fsdp(info, args) if setting == "probe" else train_one(setting, wrap, info, args)
        if info.is_main:
            os.makedirs(args.out_dir, exist_ok=True)
            torch.save(result, os.path.join(args.out_dir, f"{setting}_{wrap}.pt"))
            print(f"world {info.world_size} {setting} {wrap}: {result.get('losses', result.get('probe'))}", flush=True)
        fdist.barrier()
    fdist.destroy_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
