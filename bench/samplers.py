"""Sampler comparison on a trained stage-2 checkpoint: prompt adherence and distance to a converged reference
against the number of model calls, for every sampler config in configs/sampler/.

    python bench/samplers.py --ckpt quickstart_out/ldm/checkpoints/last.ckpt

For each sampler and step count, the same prompts and seeds (the same initial noise) are sampled; reported are
- model calls (UNet evaluations per image; classifier-free guidance batches the two branches into one call),
- adherence: the synthetic data's judge (colour, background, shape, all three) on seen and held-out prompts,
- rmse: root-mean-square pixel distance ([0, 1] scale) to a DDIM run with `--reference-steps` steps from the same
  noise, the sampling ODE's solution up to that run's own error. Ancestral samplers (Euler-a) inject fresh noise,
  so they do not converge to that reference and their rmse measures something else.
Results go to bench/results/samplers.json and a markdown table on stdout (paste it into docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

from quickstart import HELD_OUT_PROMPTS, SEEN_PROMPTS  # noqa: E402

from ldm.data.synthetic import judge, parse_caption  # noqa: E402
from ldm.inference import TextToImage  # noqa: E402

SAMPLERS = ("ddim", "euler", "euler_ancestral", "heun", "dpmpp_2m", "dpmpp_2m_karras")


class CountingSampler:
    """Wraps a sampler so that every call of its model function is counted."""

    def __init__(self, sampler) -> None:
        self.sampler, self.calls = sampler, 0

    def __call__(self, model_fn, *args, **kwargs):
        def counted(x, t):
            self.calls += 1
            return model_fn(x, t)

        return self.sampler(counted, *args, **kwargs)


def make_sampler(name: str, steps: int):
    cfg = OmegaConf.load(ROOT / "configs" / "sampler" / f"{name}.yaml")
    cfg.num_steps = steps
    return instantiate(cfg)


def adherence(images: torch.Tensor, prompts: list[str], held_out: set[str]) -> dict:
    """Share of images the judge finds right, per group (seen / held-out) and attribute."""
    tallies: dict[str, dict[str, list[bool]]] = {}
    for image, prompt in zip(images, prompts, strict=True):
        pil = Image.fromarray((image.permute(1, 2, 0) * 255).round().byte().numpy())
        verdict = judge(pil, parse_caption(prompt))
        group = tallies.setdefault("held-out" if prompt in held_out else "seen", {})
        for key, ok in verdict.items():
            group.setdefault(key, []).append(ok)
    return {g: {k: sum(v) / len(v) for k, v in t.items()} for g, t in tallies.items()}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--ckpt", default="quickstart_out/ldm/checkpoints/last.ckpt")
    parser.add_argument("--seeds", type=int, default=8, help="images per prompt")
    parser.add_argument("--steps", default="5,10,20,50", help="step counts to try")
    parser.add_argument("--samplers", default=",".join(SAMPLERS))
    parser.add_argument("--reference-steps", type=int, default=250)
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "samplers.json"))
    args = parser.parse_args()

    torch.manual_seed(0)
    pipe, _ = TextToImage.from_checkpoint(args.ckpt)
    prompts = [p for p in SEEN_PROMPTS + HELD_OUT_PROMPTS for _ in range(args.seeds)]
    seeds = [i % args.seeds for i in range(len(prompts))]
    held_out = set(HELD_OUT_PROMPTS)

    def run(name: str, steps: int) -> tuple[torch.Tensor, int, float]:
        sampler = CountingSampler(make_sampler(name, steps))
        start = time.perf_counter()
        images = pipe(prompts, sampler, guidance_scale=args.guidance, seeds=seeds)
        return images, sampler.calls, time.perf_counter() - start

    reference, ref_calls, _ = run("ddim", args.reference_steps)
    rows = [
        {
            "sampler": "ddim",
            "steps": args.reference_steps,
            "model_calls": ref_calls,
            "rmse_to_reference": 0.0,
            "adherence": adherence(reference, prompts, held_out),
            "reference": True,
        }
    ]
    for name in args.samplers.split(","):
        for steps in (int(s) for s in args.steps.split(",")):
            images, calls, seconds = run(name, steps)
            rmse = (images - reference).square().mean().sqrt().item()
            rows.append(
                {
                    "sampler": name,
                    "steps": steps,
                    "model_calls": calls,
                    "rmse_to_reference": rmse,
                    "adherence": adherence(images, prompts, held_out),
                    "seconds": round(seconds, 2),
                }
            )
            print(f"{name:>16} {steps:>3} steps {calls:>4} calls  rmse {rmse:.4f}", flush=True)

    result = {
        "checkpoint": str(args.ckpt),
        "images": len(prompts),
        "guidance_scale": args.guidance,
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "torch": torch.__version__,
        "rows": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))

    print(
        "\n| sampler | steps | model calls | rmse to reference | seen: colour / bg / shape | held-out: colour / bg / shape |"
    )
    print("| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        label = f"{r['sampler']} (reference)" if r.get("reference") else r["sampler"]
        print(
            f"| {label} | {r['steps']} | {r['model_calls']} | {r['rmse_to_reference']:.4f} | "
            f"{_percent(r['adherence']['seen'])} | {_percent(r['adherence']['held-out'])} |"
        )


def _percent(group: dict) -> str:
    return f"{group['color']:.0%} / {group['background']:.0%} / {group['shape']:.0%}"


if __name__ == "__main__":
    main()
