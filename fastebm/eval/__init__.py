"""Evaluation of pretrained energy models: restoration PSNR gain, linear probe, backbone export."""
from .export import export_backbone, export_checkpoint
from .linprobe import extract_features, linear_probe_accuracy
from .psnr import mean_gain, psnr_gain

__all__ = ["export_backbone", "export_checkpoint", "extract_features", "linear_probe_accuracy", "mean_gain", "psnr_gain"]
