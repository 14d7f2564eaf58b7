"""A reference without any network: logistic regression on the raw pixels of the built-in digits.

The same labelled sets as the benchmark's evaluations (all 1,300 training digits, and
``fastebm-eval``'s ``--few_shot 10`` draw for each seed), the same 497 held-out digits, the same
32 px images (one channel: the three are equal): scikit-learn ``StandardScaler`` +
``LogisticRegression`` (default C 1.0). It says where the benchmark's absolute numbers stand: a
backbone whose features lose to the pixels has not yet learned what a linear model sees for free.
"""
from __future__ import annotations

from typing import Dict, List


def pixel_logistic_regression(seeds: List[int], few_shot: int = 10, img_size: int = 32) -> Dict[str, Dict]:
    """{"lp_100": {seed: top-1}, "lp_all": {seed: top-1}} of the pixel model (top-1 fractions)."""
    from fastebm.eval.datasets import builtin_digit_split

    x_tr, y_tr, x_te, y_te = builtin_digit_split(img_size)
    flat = lambda x: x[:, 0].float().reshape(len(x), -1).numpy()  # noqa: E731
    classes = [str(c) for c in sorted(set(y_tr.tolist()))]
    return score_pixels(flat(x_tr), y_tr.numpy(), flat(x_te), y_te.numpy(), classes, seeds, few_shot)


def score_pixels(f_tr, y_tr, f_te, y_te, classes: List[str], seeds: List[int], few_shot: int) -> Dict[str, Dict]:
    """The pixel model on flat features (N, D) with integer labels (N,): fitted on fastebm-eval's ``--few_shot``
    draw for each seed and on every training image, scored on the test images (top-1 fractions)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from fastebm.eval.datasets import few_shot_indices

    def score(idx) -> float:
        model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=5000)).fit(f_tr[idx], y_tr[idx])
        return float(model.score(f_te, y_te))

    every = list(range(len(y_tr)))
    out = {"lp_100": {}, "lp_all": {}}
    for seed in seeds:
        out["lp_100"][str(seed)] = score(few_shot_indices(y_tr.tolist(), few_shot, seed, classes))
        out["lp_all"][str(seed)] = score(every)
    return out
