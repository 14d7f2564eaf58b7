"""Built-in demo data: shapes, determinism, and a held-out split that training never sees."""
import torch

from fastebm.data.builtin import HELD_OUT_DIGITS, BuiltinDemoData, digits_uint8


def test_builtin_split_shapes_and_determinism():
    size = 16
    seed = int(torch.randint(0, 1 << 30, (1,)))
    a, b = BuiltinDemoData(size, seed), BuiltinDemoData(size, seed + 1)
    all_digits, labels = digits_uint8(size)
    assert len(a.held_out.digits) == HELD_OUT_DIGITS
    assert len(a.train_digits) + HELD_OUT_DIGITS == len(all_digits)
    # the split does not depend on --seed
    assert torch.equal(a.held_out.digits, b.held_out.digits) and torch.equal(a.held_out.photos, b.held_out.photos)
    # held-out digits are disjoint from training digits (compare as rows: duplicates in the raw set are allowed)
    flat = lambda t: {bytes(r.numpy()) for r in t.flatten(1)}  # noqa: E731
    held, train = flat(a.held_out.digits), flat(a.train_digits)
    raw_dupes = len(all_digits) - len(flat(all_digits))
    assert len(held & train) <= raw_dupes
    # every sample is uint8 RGB at the requested size, a pure function of (seed, epoch, index)
    for index in [0, len(a.train_digits) - 1, len(a.train_digits), len(a) - 1]:
        x, _ = a.load(index, 2)
        assert x.dtype == torch.uint8 and x.shape == (3, size, size)
        assert torch.equal(x, a.load(index, 2)[0])
    photo = len(a.train_digits) + 3
    assert not torch.equal(a.load(photo, 0)[0], a.load(photo, 1)[0])
    assert a.held_out.restoration_images(5).shape == (10, 3, size, size)
    # labels of the probe sets are the digit classes
    assert set(a.train_digit_labels.tolist()) == set(range(10)) == set(a.held_out.digit_labels.tolist())
