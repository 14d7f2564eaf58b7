"""The energy model as a tool: restore images (``fastebm-restore``) and score them (``fastebm-score``).

* :func:`restore_images`: corrupt (or take as given) images of any size, restore them by energy
  descent tile by tile, and measure PSNR / SSIM and the energy after each step;
* :func:`energy_scores`, :func:`energy_trajectories`: the energy of each image (and along a descent);
* :func:`ood_metrics`: AUROC, AUPR and FPR at 95 % TPR of the energy separating two image sets.

Checkpoints are read only through :mod:`fastebm.tools.checkpoint`.
"""
from .errors import ToolInputError
from .ood import energy_scores, energy_trajectories, ood_metrics
from .restoration import RestorationResult, restore_images

__all__ = ["RestorationResult", "ToolInputError", "energy_scores", "energy_trajectories", "ood_metrics",
           "restore_images"]
