"""Pretext tasks (PyTorch reference): the acceptance bullets of issue 2 about corruptions.

Every test draws fresh random images and a fresh seed; expected values come from independent
float64 computations (numpy loops, torch pooling ops), never from the code under test.
"""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fastebm.corrupt import IMAGENET_MEAN, IMAGENET_STD, TASK_ID, TASKS, corrupt, prepare_batch


def fresh_seed() -> int:
    """A new seed per call, drawn from torch's generator (seeded per test by conftest: replayable)."""
    return int(torch.randint(0, 2**48, ()).item())


def rand_images(b, c, h, w):
    return torch.randn(b, c, h, w, generator=torch.Generator().manual_seed(fresh_seed()))


def patches_of(x, p):
    """(B, P, C*p*p) float64 patches in row-major patch order (independent of the library helper)."""
    b, c, h, w = x.shape
    out = np.empty((b, (h // p) * (w // p), c * p * p))
    xn = x.double().numpy()
    for i in range(h // p):
        for j in range(w // p):
            out[:, i * (w // p) + j] = xn[:, :, i * p:(i + 1) * p, j * p:(j + 1) * p].reshape(b, -1)
    return out


def patch_task(task, shape, p, ratio):
    """Fresh images corrupted by a patch task: (x, w, k, patches of x, of the result, of w), with k the
    number of patches the task must touch per sample (round half up of ratio * patches)."""
    x = rand_images(*shape)
    y, w = corrupt(x, task, seed=fresh_seed(), ratio=ratio, patch_size=p)
    n = (shape[2] // p) * (shape[3] // p)
    return x, w, math.floor(ratio * n + 0.5), patches_of(x, p), patches_of(y, p), patches_of(w, p)


# ---------------------------------------------------------------------------------------------- mim


@pytest.mark.parametrize("shape,p,ratio", [((3, 3, 32, 48), 8, 0.6), ((5, 1, 12, 20), 4, 0.75), ((1, 2, 9, 9), 3, 0.3)])
def test_mim_masks_exact_count_and_weights_only_there(shape, p, ratio):
    x, w, k, px, py, pw = patch_task("mim", shape, p, ratio)
    for b in range(shape[0]):
        masked = np.all(py[b] == 0, axis=1)
        assert masked.sum() == k
        np.testing.assert_array_equal(py[b][~masked], px[b][~masked])  # the rest untouched
        assert np.all(pw[b][masked] == 1) and np.all(pw[b][~masked] == 0)
    assert w.shape == (shape[0], 1) + shape[2:] and w.dtype == x.dtype


def test_mim_patches_differ_between_samples_and_cover_the_image():
    x = rand_images(64, 1, 16, 16)
    _, w = corrupt(x, "mim", seed=fresh_seed(), ratio=0.5, patch_size=4)
    masks = patches_of(w, 4)[:, :, 0]  # (B, P)
    # per-sample masks: 64 draws of 8 of 16 patches collide as Poisson(0.157); one mask for all would give 1
    assert len({tuple(m) for m in masks}) >= 56
    freq = masks.mean(0)  # every patch masked about half of the time
    assert freq.min() > 0.15 and freq.max() < 0.85


# --------------------------------------------------------------------------------------------- sort


@pytest.mark.parametrize("shape,p,ratio", [((4, 3, 32, 24), 8, 0.25), ((3, 2, 15, 10), 5, 0.5), ((2, 1, 8, 8), 2, 0.9)])
def test_sort_keeps_multiset_and_moves_only_the_subset(shape, p, ratio):
    _, w, k, px, py, _ = patch_task("sort", shape, p, ratio)
    for b in range(shape[0]):
        # same multiset of patches: sorting the rows of both gives the same matrix
        np.testing.assert_array_equal(np.array(sorted(map(tuple, px[b]))), np.array(sorted(map(tuple, py[b]))))
        moved = ~np.all(px[b] == py[b], axis=1)
        assert moved.sum() == k  # random data: every chosen patch lands on a different position
        # the moved patches are a permutation of the patches that were at the moved positions
        np.testing.assert_array_equal(np.array(sorted(map(tuple, px[b][moved]))), np.array(sorted(map(tuple, py[b][moved]))))
    assert torch.equal(w, torch.ones_like(w))


# ----------------------------------------------------------------------------------------------- sr


def sr_float64(x, f):
    """Mean of each f x f block (partial blocks at the border), loops in float64."""
    xn = x.double().numpy()
    out = np.empty_like(xn)
    h, w = xn.shape[2:]
    for i in range(0, h, f):
        for j in range(0, w, f):
            out[:, :, i:i + f, j:j + f] = xn[:, :, i:i + f, j:j + f].mean(axis=(2, 3), keepdims=True)
    return out


@pytest.mark.parametrize("shape,f", [((2, 3, 16, 24), 4), ((3, 3, 13, 17), 4), ((1, 2, 9, 7), 2), ((2, 1, 5, 11), 3)])
def test_sr_equals_area_down_then_up(shape, f):
    x = rand_images(*shape)
    y, w = corrupt(x, "sr", seed=fresh_seed(), factor=f)
    np.testing.assert_allclose(y.double().numpy(), sr_float64(x, f), rtol=1e-5, atol=1e-6)
    # the torch composition: area pooling (ceil mode, no padded zeros) then block replication
    down = F.avg_pool2d(x.double(), f, f, ceil_mode=True, count_include_pad=False)
    up = down.repeat_interleave(f, 2).repeat_interleave(f, 3)[:, :, : shape[2], : shape[3]]
    torch.testing.assert_close(y.double(), up, rtol=1e-5, atol=1e-6)
    if shape[2] % f == 0 and shape[3] % f == 0:  # divisible: F.interpolate area, then nearest
        down = F.interpolate(x.double(), size=(shape[2] // f, shape[3] // f), mode="area")
        torch.testing.assert_close(y.double(), F.interpolate(down, size=shape[2:], mode="nearest"), rtol=1e-5, atol=1e-6)
    assert torch.equal(w, torch.ones_like(w))


# ---------------------------------------------------------------------------------------- colorize


def test_colorize_three_equal_channels_equal_to_bt601_luma():
    x = torch.rand(3, 3, 11, 14, generator=torch.Generator().manual_seed(fresh_seed()))
    y, w = corrupt(x, "colorize")
    luma = 0.299 * x[:, 0].double() + 0.587 * x[:, 1].double() + 0.114 * x[:, 2].double()
    for c in range(3):
        torch.testing.assert_close(y[:, c].double(), luma, rtol=1e-6, atol=1e-6)
    assert torch.equal(y[:, 0], y[:, 1]) and torch.equal(y[:, 1], y[:, 2])
    assert torch.equal(w, torch.ones_like(w))


def test_colorize_with_mean_std_takes_luma_in_pixel_space():
    pix = torch.rand(2, 3, 7, 9, generator=torch.Generator().manual_seed(fresh_seed())).double()
    mean, std = torch.tensor(IMAGENET_MEAN).double(), torch.tensor(IMAGENET_STD).double()
    x = ((pix - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)).float()
    y, _ = corrupt(x, "colorize", mean=IMAGENET_MEAN, std=IMAGENET_STD)
    luma = 0.299 * pix[:, 0] + 0.587 * pix[:, 1] + 0.114 * pix[:, 2]
    for c in range(3):
        torch.testing.assert_close(y[:, c].double(), (luma - mean[c]) / std[c], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(y[:, c].double() * std[c] + mean[c], luma, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------- denoise


def test_denoise_noise_has_requested_std():
    x = rand_images(8, 3, 64, 64)
    sigma = 0.05 + 0.3 * torch.rand(()).item()
    y, w = corrupt(x, "denoise", seed=fresh_seed(), sigma=sigma, mean=IMAGENET_MEAN, std=IMAGENET_STD)
    noise = (y.double() - x.double())
    n = noise[:, 0].numel()
    for c in range(3):
        z = noise[:, c] / (sigma / IMAGENET_STD[c])
        # 8 standard errors: a true failure is a wrong scale, not a 1-in-10^15 draw
        assert abs(z.mean().item()) < 8 / math.sqrt(n)
        assert abs(z.std().item() - 1) < 8 / math.sqrt(2 * n)
    y2, _ = corrupt(x, "denoise", seed=fresh_seed(), sigma=sigma)  # no std given: sigma itself
    assert abs((y2.double() - x.double()).std().item() / sigma - 1) < 8 / math.sqrt(2 * noise.numel())
    assert torch.equal(w, torch.ones_like(w))


def test_denoise_sigma_zero_is_identity():
    x = rand_images(2, 3, 5, 7)
    y, _ = corrupt(x, "denoise", seed=fresh_seed(), sigma=0.0)
    assert torch.equal(y, x)


# --------------------------------------------------------------------------------- determinism, mix


RANDOM_TASKS = [("mim", {}), ("sort", {}), ("denoise", {}), ("mix", {})]


@pytest.mark.parametrize("task,params", RANDOM_TASKS + [("sr", {}), ("colorize", {})])
def test_same_seed_same_output(task, params):
    x = rand_images(4, 3, 32, 32)
    seed = fresh_seed()
    a = corrupt(x, task, seed=seed, patch_size=8, **params)
    b = corrupt(x.clone(), task, seed=seed, patch_size=8, **params)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@pytest.mark.parametrize("task,params", RANDOM_TASKS)
def test_different_seed_or_offset_different_output(task, params):
    x = rand_images(6, 3, 32, 32)
    seed = fresh_seed()
    a, _ = corrupt(x, task, seed=seed, patch_size=8, **params)
    b, _ = corrupt(x, task, seed=seed + 1, patch_size=8, **params)
    c, _ = corrupt(x, task, seed=seed, offset=1, patch_size=8, **params)
    assert not torch.equal(a, b) and not torch.equal(a, c)


def test_mix_gives_each_sample_its_own_task():
    x = rand_images(40, 3, 16, 16)
    seed = fresh_seed()
    y, w = corrupt(x, "mix", seed=seed, patch_size=4)
    seen = set()
    for i in range(x.shape[0]):  # every sample equals exactly one single-task corruption of itself
        hits = []
        for t in TASKS[:5]:
            yi, wi = corrupt(x[i:i + 1], t, seed=seed, patch_size=4, sample_ids=[i])
            if torch.equal(yi, y[i:i + 1]) and torch.equal(wi, w[i:i + 1]):
                hits.append(t)
        assert len(hits) == 1, hits
        seen.add(hits[0])
    assert len(seen) >= 3  # 40 samples over 5 tasks: all the same would be a broken choice


def test_mix_task_frequencies_are_uniform():
    images = torch.randint(0, 256, (1000, 1, 4, 4), dtype=torch.uint8)
    *_, ids = prepare_batch(images, ["sr", "denoise", "mim"], seed=fresh_seed(), patch_size=2, mean=None, std=None)
    counts = torch.bincount(ids, minlength=5)
    assert counts[TASK_ID["sort"]] == 0 and counts[TASK_ID["colorize"]] == 0
    for t in ("sr", "denoise", "mim"):  # binomial(1000, 1/3): sd ~ 15
        assert abs(counts[TASK_ID[t]].item() - 1000 / 3) < 100


@pytest.mark.parametrize("task", ["mim", "sort", "sr", "denoise", "colorize", "mix"])
def test_batch_split_gives_identical_corruptions(task):
    b = 3
    x = rand_images(2 * b, 3, 24, 40)
    seed, offset = fresh_seed(), int(torch.randint(0, 2**31, ()).item())
    whole = corrupt(x, task, seed=seed, offset=offset, patch_size=8, sample_ids=torch.arange(100, 100 + 2 * b))
    first = corrupt(x[:b], task, seed=seed, offset=offset, patch_size=8, sample_ids=torch.arange(100, 100 + b))
    second = corrupt(x[b:], task, seed=seed, offset=offset, patch_size=8, sample_ids=torch.arange(100 + b, 100 + 2 * b))
    assert torch.equal(whole[0], torch.cat([first[0], second[0]]))
    assert torch.equal(whole[1], torch.cat([first[1], second[1]]))


@pytest.mark.parametrize("b", [1, 2, 7])
@pytest.mark.parametrize("hw", [(8, 8), (40, 24), (64, 16)])
def test_odd_batch_and_image_sizes(b, hw):
    x = rand_images(b, 3, *hw)
    for task in TASKS:
        y, w = corrupt(x, task, seed=fresh_seed(), patch_size=2)
        assert y.shape == x.shape and w.shape == (b, 1) + hw and torch.isfinite(y).all()


def test_float64_input_keeps_dtype():
    x = rand_images(2, 3, 16, 16).double()
    for task in TASKS:
        y, w = corrupt(x, task, seed=1, patch_size=4)
        assert y.dtype == torch.float64 and w.dtype == torch.float64


# ------------------------------------------------------------------------------------ prepare_batch


def test_prepare_batch_normalises_and_matches_corrupt():
    images = torch.randint(0, 256, (3, 3, 16, 24), dtype=torch.uint8)
    seed = fresh_seed()
    clean, corrupted, weight, ids = prepare_batch(images, "mim", seed=seed, patch_size=8, params={"mim": {"ratio": 0.5}})
    mean, std = torch.tensor(IMAGENET_MEAN).double(), torch.tensor(IMAGENET_STD).double()
    expect = (images.double() / 255 - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)
    torch.testing.assert_close(clean.double(), expect, rtol=1e-6, atol=1e-6)
    assert clean.dtype == corrupted.dtype == weight.dtype == torch.float32 and ids.dtype == torch.int64
    assert weight.shape == (3, 1, 16, 24) and torch.equal(ids, torch.full((3,), TASK_ID["mim"]))
    y, w = corrupt(clean, "mim", seed=seed, patch_size=8, ratio=0.5)
    assert torch.equal(y, corrupted) and torch.equal(w, weight)


def test_prepare_batch_uint8_and_float_inputs_agree():
    images = torch.randint(0, 256, (5, 3, 16, 16), dtype=torch.uint8)
    seed = fresh_seed()
    a = prepare_batch(images, "mix", seed=seed, patch_size=4)
    b = prepare_batch(images.float() / torch.full((1,), 255.0), "mix", seed=seed, patch_size=4)
    for u, v in zip(a, b):
        assert torch.equal(u, v)


# -------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda x: corrupt(x, "blur"), "unknown task"),
        (lambda x: corrupt(x, "mim", ratio=0.0), "between 0 and 1"),
        (lambda x: corrupt(x, "mim", ratio=1.0), "between 0 and 1"),
        (lambda x: corrupt(x, "sort", ratio=-0.2), "between 0 and 1"),
        (lambda x: corrupt(x, "sort", ratio=1.5), "between 0 and 1"),
        (lambda x: corrupt(x[0], "sr"), "4-D"),
        (lambda x: corrupt(x[:, :1], "colorize"), "3-channel"),
        (lambda x: corrupt(x, "sr", factor=1), ">= 2"),
        (lambda x: corrupt(x, "sr", factor=2.5), ">= 2"),
        (lambda x: corrupt(x, "denoise", sigma=-0.1), ">= 0"),
        (lambda x: corrupt(x, "mim", patch_size=7), "not divisible by patch_size"),
        (lambda x: corrupt(x, "sort", ratio=0.01), "fewer than 2"),
        (lambda x: corrupt(x, "mim", sigma=0.1), "unknown parameter"),
        (lambda x: corrupt(x, "denoise", mean=(0.5,), std=(0.2,)), "entries"),
        (lambda x: corrupt(x, "denoise", in_chans=1), "in_chans"),
        (lambda x: corrupt(x, "mix", tasks=["mim", "warp"]), "unknown task"),
        (lambda x: corrupt(x, "mix", tasks=[]), "empty"),
        (lambda x: corrupt((x * 255).to(torch.uint8), "mim"), "float tensor"),
        (lambda x: corrupt(x, "mim", seed=-1), "seed"),
        (lambda x: corrupt(x, "mim", sample_ids=[0, 1]), "sample_ids"),
        (lambda x: prepare_batch((x * 50).to(torch.uint8), "mim", seed=0, backend="gpu"), "unknown backend"),
        (lambda x: prepare_batch((x * 50).to(torch.uint8), "mim", seed=0, backend="cuda"), "CUDA tensors"),
        (lambda x: prepare_batch((x * 50).to(torch.uint8), "mim", seed=0, params={"mimm": {}}), "unknown task"),
        (lambda x: prepare_batch(x[:, :1].abs(), "mim", seed=0), "C=1"),
        (lambda x: prepare_batch(x.abs().to(torch.int32), "mim", seed=0), "uint8"),
    ],
)
def test_bad_input_raises_value_error_naming_the_fix(call, match):
    x = rand_images(3, 3, 32, 32)
    with pytest.raises(ValueError, match=match):
        call(x)


def test_prepare_batch_split_across_processes_is_identical():
    images = torch.randint(0, 256, (6, 3, 16, 16), dtype=torch.uint8)
    kw = dict(seed=fresh_seed(), offset=17, patch_size=4)
    whole = prepare_batch(images, "mix", sample_ids=list(range(40, 46)), **kw)
    parts = [prepare_batch(images[i:i + 3], "mix", sample_ids=list(range(40 + i, 43 + i)), **kw) for i in (0, 3)]
    for k in range(4):
        assert torch.equal(whole[k], torch.cat([parts[0][k], parts[1][k]]))
