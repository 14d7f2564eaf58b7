"""Fine-tuning augmentation is a function of (seed, epoch, image), not of the loader process drawing it.

* ``seeded_global_rngs`` seeds Python's, NumPy's and torch's CPU global RNGs as independently seeded
  generators would be, and leaves the caller's streams exactly where they were;
* a training ``LabelledImages`` with ``augment_seed`` gives the same tensor for an item however the global
  RNGs stand and whichever loader worker reads it (0 or 2 workers: the same batches), a different one
  in another epoch, and without ``augment_seed`` it draws from the global RNGs as before.
"""
import random
from types import SimpleNamespace

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader

from fastebm.data.sampling import mix_seed, seeded_global_rngs
from fastebm.eval.datasets import LabelledImages, make_transforms, with_transform
from fastebm.eval.recipes import RAND_AUGMENT


def test_seeded_global_rngs_draw_as_fresh_generators_and_restore_the_callers_streams():
    seed = mix_seed(int(torch.randint(0, 2 ** 31, ())), 7)
    random.seed(int(torch.randint(0, 2 ** 31, ())))
    np.random.seed(int(torch.randint(0, 2 ** 31, ())))
    states = random.getstate(), np.random.get_state(), torch.get_rng_state()
    with seeded_global_rngs(seed):
        got = random.random(), np.random.rand(3), torch.rand(5)
    assert got[0] == random.Random(seed).random()
    assert np.array_equal(got[1], np.random.RandomState(seed % 2 ** 32).rand(3))
    assert torch.equal(got[2], torch.rand(5, generator=torch.Generator().manual_seed(seed)))
    assert random.getstate() == states[0] and torch.equal(torch.get_rng_state(), states[2])
    assert all(np.array_equal(a, b) for a, b in zip(np.random.get_state()[1:], states[1][1:]))
    # and the caller's streams go on as if the block had not run
    after = random.random(), np.random.rand(), torch.rand(1)
    random.setstate(states[0]), np.random.set_state(states[1]), torch.set_rng_state(states[2])
    assert after == (random.random(), np.random.rand(), torch.rand(1))


def _images(n, size):
    g = torch.Generator().manual_seed(int(torch.randint(0, 2 ** 31, ())))
    pixels = torch.randint(0, 256, (n, size, size, 3), dtype=torch.uint8, generator=g).numpy()
    return [Image.fromarray(p) for p in pixels]


def _training_transform(img_size):
    recipe = SimpleNamespace(interpolation="bicubic", crop_pct=1.0, aa=RAND_AUGMENT, scale_min=0.2, hflip=0.5,
                             reprob=0.25, remode="pixel", recount=1)
    return make_transforms(recipe, img_size, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), training=True)


def test_an_images_augmentation_depends_on_seed_epoch_and_index_only():
    n, size, img_size, seed = 11, 23, 17, int(torch.randint(0, 1000, ()))
    imgs = _images(n, size)
    base = LabelledImages(lambda i: imgs[i], list(range(n)))
    ds = with_transform(base, _training_transform(img_size), augment_seed=seed)
    ds.set_epoch(3)
    first = [ds[i][0] for i in range(n)]
    assert first[0].shape == (3, img_size, img_size) and first[0].dtype == torch.float32
    torch.manual_seed(int(torch.randint(0, 2 ** 31, ())))  # the global RNGs elsewhere: no effect
    random.seed(5)
    again = [ds[i][0] for i in reversed(range(n))][::-1]
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    ds.set_epoch(4)
    assert sum(not torch.equal(a, ds[i][0]) for i, a in enumerate(first)) >= n - 1  # another epoch, other draws
    other_seed = with_transform(base, ds.transform, augment_seed=seed + 1)
    other_seed.set_epoch(3)
    assert sum(not torch.equal(a, other_seed[i][0]) for i, a in enumerate(first)) >= n - 1
    # a subset keeps the seed (the few-shot training set is one)
    sub = ds.subset([4, 2])
    sub.set_epoch(4)
    again0 = LabelledImages(lambda i: imgs[4], [4], ds.transform, augment_seed=seed)  # image 4 as item 0
    again0.set_epoch(4)
    assert sub.augment_seed == seed and torch.equal(sub[0][0], again0[0][0])
    # without a seed the transform reads the global RNGs: the same global state, the same draw; another, another
    plain = with_transform(base, ds.transform)
    torch.manual_seed(1), random.seed(1), np.random.seed(1)
    x = plain[0][0]
    torch.manual_seed(1), random.seed(1), np.random.seed(1)
    assert torch.equal(x, plain[0][0])


def test_zero_and_two_loader_workers_give_the_same_batches():
    n, size, img_size, seed = 10, 21, 16, int(torch.randint(0, 1000, ()))
    imgs = _images(n, size)
    ds = with_transform(LabelledImages(lambda i: imgs[i], list(range(n))), _training_transform(img_size), augment_seed=seed)
    ds.set_epoch(int(torch.randint(0, 9, ())))
    batches = {}
    for workers in (0, 2):
        loader = DataLoader(ds, batch_size=3, num_workers=workers, generator=torch.Generator().manual_seed(workers))
        batches[workers] = [x for x, _ in loader]
    assert len(batches[0]) == 4 and all(torch.equal(a, b) for a, b in zip(batches[0], batches[2]))
