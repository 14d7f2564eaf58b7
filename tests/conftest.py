"""Test-suite set-up shared by every test file.

Triton runs on CPU only in its interpreter, and the interpreter must be chosen before triton is
imported; so this runs before any test imports torch/triton. A machine with an NVIDIA GPU runs the
compiled kernels instead.
"""
import os
import shutil


def _has_nvidia_gpu() -> bool:
    return os.path.exists("/dev/nvidia0") or shutil.which("nvidia-smi") is not None


if "TRITON_INTERPRET" not in os.environ and not _has_nvidia_gpu():
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_cuda = pytest.mark.skip(reason="needs a CUDA GPU (none on this machine)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip_cuda)


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    # Fresh random inputs every run (docs/design.md §10); a failing test's report shows the seed, and
    # FASTEBM_TEST_SEED=<seed> replays it.
    seed = int(os.environ.get("FASTEBM_TEST_SEED") or int.from_bytes(os.urandom(4), "little"))
    torch.manual_seed(seed)
    request.node.user_properties.append(("torch_seed", seed))
    yield seed


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        seeds = [v for k, v in item.user_properties if k == "torch_seed"]
        if seeds:
            report.sections.append(("random seed", f"FASTEBM_TEST_SEED={seeds[0]}"))


@pytest.fixture
def stage_calls(monkeypatch):
    """Counts the real (non-fake) executions of the attention stages behind the ``fastebm::attn_*``
    custom ops: a Counter with keys ``attn_fwd``, ``attn_bwd``, ``attn_dbwd``.

    It wraps the stage implementations that the ops look up when they run (the references of
    ``fastebm.kernels.attention_ref`` and the Triton wrappers of ``fastebm.kernels.attention``), so
    fake-tensor runs while tracing are not counted and compiled steps are."""
    from collections import Counter

    from fastebm.kernels import attention as kernels
    from fastebm.kernels import attention_ref

    calls = Counter()

    def count(module, attr, stage):
        fn = getattr(module, attr)

        def counted(*args, **kwargs):
            calls[stage] += 1
            return fn(*args, **kwargs)

        monkeypatch.setattr(module, attr, counted)

    for stage in ("attn_fwd", "attn_bwd", "attn_dbwd"):
        count(attention_ref, stage + "_ref", stage)
        count(kernels, stage, stage)
    return calls
