"""Naming the rank that failed: a liveness stamp, a step record, and the failure message.

Two records per rank in the rendezvous store: the step it last finished (written by the training
loop through :func:`heartbeat`) and a liveness stamp refreshed by a background thread every
:data:`LIVENESS_INTERVAL_S`. A rank blocked in a collective keeps its stamp fresh (the thread runs
while the main thread waits in C++); a killed, stopped or frozen process does not. So the rank that
notices a failure can name the rank that caused it, which torchrun's summary cannot do for a hang
(it names the rank whose collective timed out first).
"""
from __future__ import annotations

import datetime
import os
import threading
import time

import torch.distributed as tdist

from .process import is_initialized, rank, world_size

LIVENESS_INTERVAL_S = 2.0
_PREFIX = "fastebm/heartbeat/"


def _key(kind: str, r: int) -> str:
    return f"{_PREFIX}{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/{kind}/{r}"


def _open_store(timeout_s: float = 30.0):
    """A new client connection to the rendezvous store (MASTER_ADDR:MASTER_PORT), or None."""
    try:
        return tdist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                              timeout=datetime.timedelta(seconds=timeout_s))
    except Exception:  # no launcher store reachable: failure messages will just say less
        return None


class _Liveness:
    """Daemon thread: refreshes this rank's liveness stamp through its own store connection."""

    def __init__(self, store, interval_s: float):
        self.interval_s = interval_s
        self.stop_event = threading.Event()
        self.rank = rank()
        self.store = store
        self.thread = threading.Thread(target=self._run, name="fastebm-liveness", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop_event.is_set():
            try:
                self.store.set(_key("alive", self.rank), f"{time.time():.3f}")
            except Exception:  # store gone (job ending): nothing left to report to
                return
            self.stop_event.wait(self.interval_s)

    def stop(self) -> None:
        self.stop_event.set()
        self.thread.join(timeout=5)


_liveness = None
_main_store = None  # the main thread's own connection (heartbeats, failure reports)


def start_liveness() -> None:
    """Starts the stamp thread and opens the main thread's store connection (once per process group)."""
    global _liveness, _main_store
    if _liveness is None:
        thread_store, _main_store = _open_store(), _open_store()
        if thread_store is not None:
            _liveness = _Liveness(thread_store, LIVENESS_INTERVAL_S)


def stop_liveness() -> None:
    global _liveness, _main_store
    if _liveness is not None:
        _liveness.stop()
        _liveness = None
    _main_store = None


def _store():
    return _main_store if is_initialized() else None


def heartbeat(step: int) -> None:
    """Records in the rendezvous store that this rank finished ``step`` (cheap; once per step)."""
    store = _store()
    if store is None:
        return
    try:
        store.set(_key("step", rank()), str(int(step)))
    except Exception:  # the store itself may be gone when the job is ending
        pass


def describe_peers(timeout_s: float = 5.0) -> str:
    """One line naming the ranks that stopped (no liveness) or fell behind (step), for failure messages."""
    store = _store()
    if store is None:
        return ""
    try:
        store.set_timeout(datetime.timedelta(seconds=timeout_s))
    except Exception:
        pass

    def read(kind: str, r: int):
        try:
            return float(store.get(_key(kind, r)).decode())
        except Exception:
            return None

    now, me = time.time(), rank()
    alive = {r: read("alive", r) for r in range(world_size())}
    steps = {r: read("step", r) for r in range(world_size())}
    stale_after = 3 * LIVENESS_INTERVAL_S + 2
    silent = [r for r, t in alive.items() if r != me and t is not None and now - t > stale_after]
    parts = [f"rank {r} has shown no sign of life for {now - alive[r]:.0f} s (killed, stopped or frozen)" for r in silent]
    known = {r: s for r, s in steps.items() if s is not None}
    if known:
        best = max(known.values())
        behind = [r for r, s in known.items() if s < best and r not in silent]
        parts += [f"rank {r} is behind at step {int(known[r])} (others reached {int(best)})" for r in behind]
    if not parts:
        return ("no other rank looks stopped or behind from here: a peer may have just exited "
                "(torchrun's summary names the rank that failed first) or the network failed")
    return "; ".join(parts)


def explain_failure(exc: BaseException) -> str:
    """A one-paragraph message for a collective that failed (peer died, hung, or the network broke)."""
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
    peers = ""
    try:
        peers = describe_peers()
    except Exception:
        pass
    where = f"rank {rank()} of {world_size()}"
    text = f"{where}: a collective operation failed ({type(exc).__name__}: {first})"
    if peers:
        text += f"; {peers}"
    return text + ". The job stops; restart it with --resume auto (torchrun --max_restarts K does so automatically)."


def is_collective_failure(exc: BaseException) -> bool:
    """Heuristic: does ``exc`` come from a broken or timed-out collective?"""
    dist_error = getattr(tdist, "DistError", None)
    if dist_error is not None and isinstance(exc, dist_error):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and any(
        k in text for k in ("Connection closed by peer", "Connection reset by peer", "Timed out", "timed out",
                            "NCCL", "gloo", "Gloo", "Broken pipe", "ProcessGroup",
                            # gloo's "Application timeout caused pair closure": --dist_timeout expired
                            # inside DDP's backward all-reduce
                            "pair closure"))
