"""Evaluation of trained checkpoints: FID / KID / IS / precision-recall (and FD_DINOv2) against cached reference
statistics, and CLIP score.

Entry points: `python eval/fid.py …` and `python eval/clip_score.py …` (Hydra, configs/eval.yaml). The pieces:

- `features`: the FID Inception-v3 (offline weights, resize protocol) → pool features and logits
- `reference`: real-image statistics, computed once from shards and cached on disk
- `fid`: FID (torchmetrics, float64), KID, IS and precision / recall (torch-fidelity) against a reference
- `dinov2`: DINOv2 ViT-L/14 from Meta's weight file (timm, the hub model's position grid) → FD_DINOv2
- `clip_score`: `ClipScore`, a torchmetrics Metric over an OpenCLIP model
- `generate`: captions, the image ↔ (caption, seed) plan, its split over processes
- `distributed`: rank / world size from torchrun or Slurm, gathering features in image order
- `runner`: `Evaluator` (used by `ldm.training.eval_callback` too) and `run_evaluation`; `report`: JSON, plot, W&B

Never imports `ldm.training`.
"""
