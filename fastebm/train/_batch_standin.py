"""TEMPORARY stand-in for fastebm.corrupt.prepare_batch (deleted once the real one lands)."""
import torch
import torch.nn.functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def prepare_batch(images, tasks, *, seed, offset=0, sample_ids=None, patch_size=16, mean=IMAGENET_MEAN,
                  std=IMAGENET_STD, params=None, backend="auto"):
    params = params or {}
    x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
    m = torch.tensor(mean, device=x.device).view(1, -1, 1, 1)
    s = torch.tensor(std, device=x.device).view(1, -1, 1, 1)
    clean = (x - m) / s
    B, C, H, W = clean.shape
    ids = sample_ids if sample_ids is not None else torch.arange(B)
    corrupted = clean.clone()
    weight = torch.ones(B, 1, H, W, device=x.device)
    task_ids = torch.zeros(B, dtype=torch.long)
    for i in range(B):
        g = torch.Generator().manual_seed(int(seed) * 1000003 + int(offset) * 7919 + int(ids[i]))
        t = int(torch.randint(len(tasks), (1,), generator=g))
        task = tasks[t]
        task_ids[i] = t
        if task == "mim":
            gh, gw = H // patch_size, W // patch_size
            mask = (torch.rand(gh * gw, generator=g) < params.get("mim", {}).get("ratio", 0.6)).float().view(1, 1, gh, gw)
            mask = F.interpolate(mask, scale_factor=patch_size, mode="nearest")[0].to(x.device)
            corrupted[i] = clean[i] * (1 - mask)
            weight[i] = mask
        elif task == "denoise":
            corrupted[i] = clean[i] + 0.2 * torch.randn(C, H, W, generator=g).to(x.device) / s[0]
        elif task == "sr":
            corrupted[i] = F.interpolate(F.avg_pool2d(clean[i:i + 1], 4), scale_factor=4, mode="nearest")[0]
        elif task == "colorize":
            xi = x[i]
            y = 0.299 * xi[0] + 0.587 * xi[1] + 0.114 * xi[2]
            corrupted[i] = (y.expand(3, H, W) - m[0]) / s[0]
    return clean, corrupted, weight, task_ids
