"""The command lines in the user docs compose: every `python train.py …` (and sample.py, eval/, scripts/ and
slurm/ entry point that takes Hydra overrides) in README.md, docs/*.md and slurm/README.md is composed with Hydra's
compose API and, for training, checked key by key against the constructors (`check_config`), so a renamed or
misspelt config key in the docs fails here rather than for the researcher who copies the line. Inline spans in the
prose that name a config key (`data.shuffle_buffer`, `callbacks.eval.every_n_steps=5000`) must name one that exists.
Placeholders (`<date>`, `…`, `$CKPT`) become dummy values; only the keys and group options are checked, not paths."""

import functools
import re
import shlex

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf

from ldm.utils.hydra_build import check_config
from tests.helpers import CONFIGS, ROOT

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "slurm" / "README.md"]

# entry point (as the docs name it) -> the config it composes
ENTRY_CONFIGS = {
    "train.py": "train",
    "slurm/train.sbatch": "train",
    "slurm/train_multinode.sbatch": "train",
    "sample.py": "sample",
    "eval/fid.py": "eval",
    "slurm/eval.sbatch": "eval",
    "eval/clip_score.py": "eval_clip",
    "scripts/cache_latents.py": "cache_latents",
    "slurm/cache_latents.sbatch": "cache_latents",
    "scripts/latent_stats.py": "latent_stats",
    "scripts/posthoc_ema.py": "posthoc_ema",
    "scripts/coco_to_shards.py": "coco_to_shards",
}
ELLIPSIS = ("...", "…")


def _command_lines(text: str) -> list[tuple[int, str]]:
    """(line number, command) for fenced and indented code blocks (continuation lines joined) and inline `…`
    spans that start with python/torchrun/sbatch."""
    out, lines, i = [], text.splitlines(), 0
    in_fence = False
    while i < len(lines):
        line = lines[i]
        if line.lstrip().startswith("```"):
            in_fence = not in_fence
            i += 1
            continue
        if in_fence or line.startswith("    "):
            start, cmd = i + 1, line.strip()
            while cmd.endswith("\\") and i + 1 < len(lines):
                i += 1
                cmd = cmd[:-1] + " " + lines[i].strip()
            if re.match(r"(python|torchrun|sbatch)\b", cmd):
                out.append((start, cmd))
        else:
            for span in re.findall(r"`([^`]+)`", line):
                if re.match(r"(python|torchrun|sbatch) ", span):
                    out.append((i + 1, span))
        i += 1
    return out


def _overrides(cmd: str) -> tuple[str, list[str]] | None:
    """(config name, overrides) of a command, or None when it runs no Hydra entry point. Placeholders (`<date>`,
    `…`, `$CKPT`) in values become dummies; tokens that are only a placeholder are dropped; a `-m` sweep is checked at
    its first point."""
    cmd = re.sub(r"<[^<>]*>", "x", cmd.split(" #")[0])
    try:
        tokens = shlex.split(cmd)
    except ValueError:  # an unbalanced quote in a line cut short by a comment
        tokens = shlex.split(cmd + "'")
    for i, tok in enumerate(tokens):
        if tok in ENTRY_CONFIGS:
            config, rest = ENTRY_CONFIGS[tok], tokens[i + 1 :]
            break
    else:
        return None
    overrides, skip, multirun = [], False, "-m" in rest or "--multirun" in rest
    for tok in rest:
        if skip:
            skip = False
            continue
        if tok in ("--cfg", "-c"):
            skip = True
            continue
        if tok.startswith("-") or tok in ELLIPSIS or tok in ("[use_shift=true]",) or "=" not in tok:
            continue
        key, _, value = tok.partition("=")
        if "<" in key or any(e in key for e in ELLIPSIS):
            continue
        value = re.sub(r"\$\{?[A-Z_]+\}?", "x", value)
        for e in ELLIPSIS:
            value = value.replace(e, "x")
        if multirun and "," in value and value[:1] not in "[{'\"":
            value = value.split(",")[0]  # a sweep: its first point
        overrides.append(f"{key}={value}")
    return config, overrides


def _cases():
    cases = []
    for doc in DOCS:
        for lineno, cmd in _command_lines(doc.read_text(encoding="utf-8")):
            parsed = _overrides(cmd)
            if parsed is not None:
                cases.append(pytest.param(*parsed, id=f"{doc.relative_to(ROOT)}:{lineno}"))
    return cases


CASES = _cases()


def test_the_docs_have_commands_to_check():
    assert len(CASES) >= 40, len(CASES)
    assert {c.values[0] for c in CASES} >= {"train", "sample", "eval", "cache_latents", "posthoc_ema"}


@pytest.mark.parametrize("config, overrides", CASES)
def test_doc_command_composes(config, overrides):
    extra = ["data.train_urls=/nonexistent/x.tar", "run_dir=/tmp/ldm-doc-run"] if config == "train" else []
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose(config, overrides=[*extra, *overrides])
    if config == "train":
        check_config(cfg)


# Inline overrides in the prose (`stage.loss.disc_start=…`-style spans): each key must be one that some entry
# point's config has, on its own or once the option that brings it is chosen (a stage, data, strategy, experiment).
# Only spans whose first key names a config key or group are checked (not Python keywords such as `fused=True`).
BASES = [
    ("train", ()),
    ("train", ("experiment=tiny",)),
    ("train", ("experiment=vae_laion_256",)),
    ("train", ("experiment=inpaint_tiny",)),
    ("train", ("data=latents",)),
    ("train", ("strategy=fsdp",)),
    ("train", ("diffusion=rectified_flow",)),
    ("train", ("data/filters=laion",)),
    ("train", ("sampler=heun",)),
    *(
        (c, ())
        for c in (
            "sample",
            "eval",
            "eval_clip",
            "cache_latents",
            "latent_stats",
            "posthoc_ema",
            "coco_to_shards",
        )
    ),
]
_OVERRIDE = re.compile(r"[a-z_][\w./@]*=\S*")
_DOTTED = re.compile(r"[a-z_][a-z0-9_]*(\.[a-z0-9_]+)+")
_FILE_SUFFIXES = (
    ".md",
    ".py",
    ".yaml",
    ".json",
    ".txt",
    ".ckpt",
    ".png",
    ".tar",
    ".pth",
    ".safetensors",
    ".bin",
    ".sh",
)


@functools.cache
def _base(config: str, overrides: tuple[str, ...]):
    extra = ["data.train_urls=/nonexistent/x.tar", "run_dir=/tmp/ldm-doc-run"] if config == "train" else []
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return compose(config, overrides=[*extra, *overrides])


def _groups() -> set[str]:
    return {str(d.relative_to(CONFIGS)) for d in CONFIGS.rglob("*") if d.is_dir()}


def _has_key(key: str) -> bool:
    group = key.split("@")[0]
    if group in _groups():
        return True
    parent, _, leaf = key.rpartition(".")
    for base in BASES:
        cfg = _base(*base)
        node = OmegaConf.select(cfg, parent) if parent else cfg
        if isinstance(node, DictConfig) and leaf in node.keys():  # noqa: SIM118 (`in node` is False for ??? values)
            return True
    return False


def _roots() -> set[str]:
    roots = {g.split("/")[0] for g in _groups()}
    for base in (b for b in BASES if not b[1]):  # each entry point's own top-level keys
        roots |= set(_base(*base).keys())
    return roots


def _inline_keys(text: str) -> list[tuple[int, list[tuple[str, str]]]]:
    out, in_fence = [], False
    for lineno, line in enumerate(text.splitlines(), 1):
        if line.lstrip().startswith("```"):
            in_fence = not in_fence
        if in_fence or line.startswith("    "):
            continue
        for span in re.findall(r"`([^`]+)`", line):
            try:
                tokens = shlex.split(re.sub(r"<[^<>]*>", "x", span))
            except ValueError:
                continue
            if tokens and all(_OVERRIDE.fullmatch(t) for t in tokens):
                out.append((lineno, [tuple(t.split("=", 1)) for t in tokens]))
            elif _DOTTED.fullmatch(span) and not span.endswith(_FILE_SUFFIXES):  # a key named alone
                out.append((lineno, [(span, "x")]))
    return out


INLINE = [
    pytest.param(pairs, id=f"{doc.relative_to(ROOT)}:{lineno}")
    for doc in DOCS
    for lineno, pairs in _inline_keys(doc.read_text(encoding="utf-8"))
]


def test_the_docs_have_inline_overrides_to_check():
    assert len(INLINE) >= 100, len(INLINE)


@pytest.mark.parametrize("pairs", INLINE)
def test_doc_inline_override_key_exists(pairs):
    roots = _roots()
    for key, value in pairs:
        if key.startswith("hydra.") or re.split(r"[./@]", key)[0] not in roots:
            continue  # a Python keyword argument or another tool's setting, not an override
        assert _has_key(key), f"`{key}={value}`: no entry point's config has the key {key!r}"
        group = key.split("@")[0]
        if group in _groups() and value not in ("", "x", "null") and not value.startswith(("{", "[")):
            assert (CONFIGS / group / f"{value}.yaml").is_file(), (
                f"`{key}={value}`: no configs/{group}/{value}.yaml"
            )
