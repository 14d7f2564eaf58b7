"""fastebm: kernel-accelerated energy-inspired self-supervised pretraining of vision models.

Public API::

    import fastebm
    model = fastebm.create_model("vit_demo")                       # EnergyViT, energy per image
    objective = fastebm.RestorationObjective(model, steps=2)       # restoration loss, one forward
    corrupted, weight = fastebm.corrupt(clean, "mim", seed=0)      # pretext tasks
    loss, stats = objective(clean, corrupted, weight)
"""
# First, before anything imports torch: the training command's OpenMP threads sleep when idle
# instead of spinning (read once, when torch loads OpenMP; fastebm/threads.py, docs/training.md "Threads").
from .threads import prefer_passive_wait as _prefer_passive_wait

_prefer_passive_wait()

__version__ = "0.1.0"  # before the imports below: modules they load read it

from .models import EnergyViT, create_model, list_models  # noqa: E402
from .restore import RestorationObjective  # noqa: E402
from .tools import energy_scores, restore_images  # noqa: E402

__all__ = ["EnergyViT", "RestorationObjective", "create_model", "list_models", "corrupt", "energy_scores",
           "restore_images", "__version__"]

# Imported last and eagerly: importing the subpackage binds ``fastebm.corrupt`` to the module,
# and this import rebinds the name to the function users call.
from .corrupt import corrupt  # noqa: E402
