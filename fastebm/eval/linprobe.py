"""Linear probe: logistic regression on frozen backbone features."""
from __future__ import annotations

from typing import Dict

import numpy as np
import torch

from ..ops import first_order_attention
from .psnr import IMAGENET_MEAN, IMAGENET_STD


@torch.no_grad()
def extract_features(model, images: torch.Tensor, *, device=None, batch_size: int = 256,
                     mean=IMAGENET_MEAN, std=IMAGENET_STD) -> np.ndarray:
    """Mean of the normed patch tokens (``forward_features``, class token excluded) for uint8 images.

    Forward only, so attention runs the fastest first-order kernel (``first_order_attention``)."""
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    m = torch.tensor(mean, device=device).view(1, -1, 1, 1)
    s = torch.tensor(std, device=device).view(1, -1, 1, 1)
    feats = []
    try:
        with first_order_attention():
            for start in range(0, len(images), batch_size):
                x = images[start:start + batch_size].to(device).float().div(255.0)
                tokens = model.forward_features((x - m) / s)
                feats.append(tokens[:, 1:].mean(1).float().cpu())
    finally:
        model.train(was_training)
    return torch.cat(feats).numpy().astype(np.float64)


def linear_probe_accuracy(model, train_images, train_labels, test_images, test_labels, *, device=None,
                          seed: int = 0) -> Dict[str, float]:
    """Top-1 accuracy of a multinomial logistic regression (standardised features) on the test split."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    f_train = extract_features(model, train_images, device=device)
    f_test = extract_features(model, test_images, device=device)
    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, C=1.0, random_state=seed))
    clf.fit(f_train, np.asarray(train_labels))
    acc = float((clf.predict(f_test) == np.asarray(test_labels)).mean())
    return {"accuracy": acc, "train": int(len(f_train)), "test": int(len(f_test))}
