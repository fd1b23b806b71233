"""Contrastive pretraining of the mini-CLIP on captioned mini-world scenes.

The shipped checkpoint is made by one command, which runs the three phases of `recipe()` in turn
(each resumable; a phase whose output exists is skipped; logs in
`safelib/assets/miniclip_pretrain*.json`):

    python -m safelib.experiments.miniclip_pretrain --recipe --threads 1

- phase 1 (the "pretrain_v1" style: canonical shapes): every batch in groups of 6 shape variants
  of 1-3 object scenes; stopped at step 966 of 2500, exported in float32 (600 s).
- phase 2: from phase 1's weights; 80% single-object shape-variant groups (6-way shape contrast)
  (881 s). Phases 1-2 made the issue-5 checkpoint. Phase 1 learned colours (99% zero-shot) but
  shapes barely (27% at step 1000); groups that differ only in shape then taught shape (90% on the
  training renderer after 1500 steps), yet only 67% on the tests' independent renderer.
- phase 3 (issue 11, the "pretrain" style): from phase 2's weights, 2000 steps of shapes in varied
  proportions, orientations, sizes, fills, stroke widths, corner roundings, backgrounds and blur;
  80% of each batch in shape-variant groups of 1-2 objects (1,265 s with 2 threads). Zero-shot
  shape accuracy on the independent renderer went from 66.7% to 96.2% (colour 100%), on the
  training renderer's canonical single objects from 89.7% to 92.3% (colour 99.0%); the same with
  the shipped templates and with the one prompt "a photo of a {}." (96.5% on the independent one).
  A shorter phase 3 (360 steps, without rounded corners or varied strokes) had reached only 77.4%;
  at step 918 of this one it was 90.3%.
  Why fine-tune rather than train from scratch: from scratch, shape needed about 2500 steps of
  canonical drawings before varied ones could help; the three phases together take 46 minutes.

Why the grid stays 4 x 4 (128 px): a 7 x 7 grid needs 224-px images through the same stem, 3.1x
the pixels of every pretraining step, cached dense map and chapter's trunk pass. Measured side by
side (2 threads, a batch of 60): 1.80 s a pretraining step at 224 px against 0.63 s at 128 px, so
the recipe's 4,466 steps, retrained from scratch at 224 px, would take about 2.2 hours here, past
issue 11's 90-minute budget.

A single phase runs with the flags below, e.g. phase 3 by hand:

    python -m safelib.experiments.miniclip_pretrain --threads 1 --work-dir runs/miniclip_recipe/phase3 \
        --init-from runs/miniclip_recipe/phase2.safetensors --steps 2000 --lr 5e-4 --min-lr 1e-5 \
        --warmup-steps 50 --variant-fraction 0.8 --variant-objects 1 2 --eval-every 250

Phases 1-2 of the shipped checkpoint ran with one thread, phase 3 with two (`threads` in each log):
a thread count changes float sums' order, so a rerun with another count matches to rounding, not bits.

The recipe is CLIP's (symmetric InfoNCE between image and caption embeddings, learnable
temperature, AdamW, warmup + cosine) at a size a 2-core CPU trains in under an hour. Every batch
is drawn from a generator seeded by (seed, step), so a run is a pure function of its config and a
resumed run sees exactly the batches an uninterrupted one would. State is saved atomically every
few minutes; rerunning the same command resumes. At the end it writes the fp16 safetensors file
(open_clip config in its metadata) and a JSON log (config, seed, loss curve, zero-shot checks).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from ..atomic import atomic_path, atomic_write_json
from ..data import miniworld as mw
from ..clip.miniclip import (CHECKPOINT, META_KEY, MiniClipConfig, build_miniclip, clip_from_config, get_tokenizer,
                             write_digest_beside)
from ..data.transforms import preprocess_images

LOG_PATH = CHECKPOINT.with_name("miniclip_pretrain.json")
RECIPE_DIR = "runs/miniclip_recipe"


@dataclass(frozen=True)
class PretrainConfig:
    """Everything a pretraining run depends on (the loss curve is a function of this)."""

    model: MiniClipConfig = field(default_factory=MiniClipConfig)
    steps: int = 2500
    batch_size: int = 60
    lr: float = 1e-3
    min_lr: float = 2e-5
    warmup_steps: int = 50
    weight_decay: float = 0.05
    seed: int = 0
    style: str = "pretrain"
    min_objects: int = 1
    max_objects: int = 3
    variant_fraction: float = 1.0  # share of each batch in shape-variant groups (see miniworld.shape_variants)
    n_variants: int = 6
    variant_objects: tuple[int, int] = (1, 3)  # objects per variant group (1: pure 6-way shape contrast)
    init_from: str | None = None  # start from these weights (a previous phase's safetensors), not random

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 2:
            raise ValueError(f"need steps >= 1 and batch_size >= 2 (contrastive), got {self.steps}, {self.batch_size}")
        if not 0 < self.min_lr <= self.lr:
            raise ValueError(f"need 0 < min_lr <= lr, got min_lr={self.min_lr}, lr={self.lr}")
        if self.warmup_steps < 0 or self.weight_decay < 0:
            raise ValueError("warmup_steps and weight_decay must be >= 0")
        mw.get_style(self.style)  # raises with the valid names
        if not 1 <= self.min_objects <= self.max_objects:
            raise ValueError(f"need 1 <= min_objects <= max_objects, got {self.min_objects}, {self.max_objects}")
        if not 0.0 <= self.variant_fraction <= 1.0:
            raise ValueError(f"variant_fraction must be in [0, 1], got {self.variant_fraction}")
        if not 2 <= self.n_variants <= len(mw.SHAPES):
            raise ValueError(f"n_variants must be in 2..{len(mw.SHAPES)}, got {self.n_variants}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "PretrainConfig":
        d = dict(d)
        model = dict(d.pop("model"))
        if "variant_objects" in d:
            d["variant_objects"] = tuple(d["variant_objects"])
        model["vision_layers"] = tuple(model["vision_layers"])
        return cls(model=MiniClipConfig(**model), **d)


def learning_rate(cfg: PretrainConfig, step: int) -> float:
    """Linear warmup, then cosine decay from lr to min_lr."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    t = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * min(1.0, t)))


def batch_for_step(cfg: PretrainConfig, step: int) -> tuple[torch.Tensor, list[str]]:
    """The batch of step `step`: a pure function of (seed, step), which is what makes resuming exact."""
    rng = np.random.default_rng([cfg.seed, step])
    images, captions = mw.scene_batch(
        rng, cfg.batch_size, n_objects=(cfg.min_objects, cfg.max_objects),
        image_size=cfg.model.image_size, style=cfg.style, variant_fraction=cfg.variant_fraction, n_variants=cfg.n_variants,
        variant_objects=tuple(cfg.variant_objects),
    )
    return preprocess_images(images), captions  # B x 3 x S x S float32


def clip_loss(image_emb: torch.Tensor, text_emb: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """CLIP's symmetric cross-entropy over a batch of matched (image, caption) pairs."""
    image_emb = F.normalize(image_emb, dim=-1)
    text_emb = F.normalize(text_emb, dim=-1)
    logits = logit_scale.exp() * image_emb @ text_emb.T  # B x B
    target = torch.arange(len(logits), device=logits.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices and conv kernels only; not biases, norms, embeddings or the temperature."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.ndim < 2 or "embedding" in name or "logit_scale" in name:
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _atomic_torch_save(obj, path: Path) -> None:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


@torch.no_grad()
def zero_shot_check(model, cfg: MiniClipConfig, n_per_class: int = 20, seed: int = 12345, style: str = "plain") -> dict:
    """Zero-shot accuracy on fresh single objects: 6-way shape and 6-way colour prompts."""
    was_training = model.training
    model.eval()
    tokenizer = get_tokenizer(cfg.context_length)
    rng = np.random.default_rng(seed)
    out = {}
    for attr, names, templates in (("shape", mw.SHAPES, mw.SHAPE_TEMPLATES), ("colour", tuple(mw.COLOURS), mw.COLOUR_TEMPLATES)):
        weights = []
        for name in names:
            emb = F.normalize(model.encode_text(tokenizer([t.format(name) for t in templates])), dim=-1).mean(0)
            weights.append(F.normalize(emb, dim=0))
        W = torch.stack(weights, dim=1)  # D x K
        images, labels = [], []
        for k, name in enumerate(names):
            for _ in range(n_per_class):
                obj = mw.sample_object(rng, cfg.image_size, mw.get_style(style), **{attr: name})
                images.append(np.asarray(mw.make_scene(rng, image_size=cfg.image_size, style=style, objects=(obj,)).image))
                labels.append(k)
        feats = F.normalize(model.encode_image(preprocess_images(np.stack(images))), dim=-1)
        pred = (feats @ W).argmax(1).numpy()
        out[attr] = float((pred == np.array(labels)).mean())
    model.train(was_training)
    return out


def export_checkpoint(model: torch.nn.Module, cfg: PretrainConfig, summary: dict, path: Path,
                      dtype: torch.dtype = torch.float16) -> None:
    """Safetensors (fp16 by default) with the open_clip config and the run summary as JSON metadata."""
    state = {k: v.detach().to(dtype).contiguous(memory_format=torch.contiguous_format) for k, v in model.state_dict().items()
             if v.is_floating_point()}
    # BatchNorm's num_batches_tracked is an integer buffer nothing reads in eval mode; drop it.
    meta = {
        META_KEY: json.dumps(cfg.model.to_open_clip()),
        "miniclip_config": json.dumps(cfg.model.to_dict()),
        "pretrain_config": json.dumps(cfg.to_dict()),
        "summary": json.dumps(summary),
    }
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata=meta)
    write_digest_beside(path)  # safetensors has no checksum: build_miniclip checks the bytes against it


def pretrain(
    cfg: PretrainConfig,
    work_dir: str | os.PathLike,
    out: str | os.PathLike | None = CHECKPOINT,
    log_path: str | os.PathLike | None = LOG_PATH,
    *,
    save_every_s: float = 300.0,
    eval_every: int = 500,
    max_minutes: float | None = None,
    stop_at_step: int | None = None,
    export_dtype: torch.dtype = torch.float16,
    threads: int | None = None,
    progress: bool = True,
) -> dict:
    """Train (or resume) and export. Returns the log dict (also written to `log_path`)."""
    if threads is not None:
        torch.set_num_threads(threads)
    work = Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    state_path = work / "state.pt"

    torch.manual_seed(cfg.seed)
    model = clip_from_config(cfg.model.to_open_clip())
    # channels_last: about 1.5-2x faster convolutions on CPU here; the math is unchanged.
    model = model.to(memory_format=torch.channels_last).train()
    opt = torch.optim.AdamW(_param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.98), eps=1e-6)
    tokenizer = get_tokenizer(cfg.model.context_length)
    if cfg.init_from is not None:
        from safetensors.torch import load_file

        init = {k: v.float() for k, v in load_file(cfg.init_from).items()}
        missing, unexpected = model.load_state_dict(init, strict=False)
        if unexpected or [k for k in missing if not k.endswith("num_batches_tracked")]:
            raise ValueError(f"{cfg.init_from} does not fit the model config: missing {missing[:3]}, unexpected {unexpected[:3]}")
    log = {"config": cfg.to_dict(), "seed": cfg.seed, "threads": torch.get_num_threads(),
           "losses": [], "lrs": [], "logit_scales": [], "evals": [], "wall_s": 0.0, "step": 0}
    if state_path.exists():
        state = torch.load(state_path, weights_only=True, map_location="cpu")
        saved_cfg = json.loads(state["config_json"])
        if saved_cfg != json.loads(json.dumps(cfg.to_dict())):
            raise ValueError(f"{state_path} was written by a different config; use another --work-dir or delete it.\n"
                             f"saved: {saved_cfg}\nnow:   {cfg.to_dict()}")
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        log = json.loads(state["log_json"])
        if progress:
            print(f"resumed from {state_path} at step {log['step']}", flush=True)

    def save_state() -> None:
        _atomic_torch_save({"model": model.state_dict(), "optimizer": opt.state_dict(),
                            "config_json": json.dumps(cfg.to_dict()), "log_json": json.dumps(log)}, state_path)

    start = time.time() - log["wall_s"]
    last_save = time.time()
    stopped_early = False
    while log["step"] < cfg.steps:
        step = log["step"]
        lr = learning_rate(cfg, step)
        for group in opt.param_groups:
            group["lr"] = lr
        images, captions = batch_for_step(cfg, step)
        images = images.contiguous(memory_format=torch.channels_last)
        image_emb, text_emb, logit_scale = model(images, tokenizer(captions))
        loss = clip_loss(image_emb, text_emb, model.logit_scale)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():  # CLIP clamps the temperature at 100
            model.logit_scale.clamp_(0, math.log(100))
        log["step"] = step + 1
        log["losses"].append(round(loss.item(), 5))
        log["lrs"].append(lr)
        log["logit_scales"].append(round(model.logit_scale.exp().item(), 3))
        log["wall_s"] = time.time() - start
        if eval_every and (step + 1) % eval_every == 0:
            log["evals"].append({"step": step + 1, **zero_shot_check(model, cfg.model)})
        if progress and (step + 1) % 10 == 0:
            recent = np.mean(log["losses"][-10:])
            print(f"step {step + 1}/{cfg.steps} loss {recent:.4f} lr {lr:.2e} scale {log['logit_scales'][-1]:.1f} "
                  f"{log['wall_s'] / 60:.1f} min" + (f" eval {log['evals'][-1]}" if log["evals"] and log["evals"][-1]["step"] == step + 1 else ""),
                  flush=True)
        if time.time() - last_save > save_every_s:
            save_state()
            last_save = time.time()
        over_time = max_minutes is not None and log["wall_s"] > max_minutes * 60
        if (over_time or (stop_at_step is not None and log["step"] >= stop_at_step)) and log["step"] < cfg.steps:
            stopped_early = True  # deterministic when stopped by step, not when stopped by the clock
            break
    save_state()
    log["stopped_early"] = stopped_early
    model.eval()
    # The shipped numbers are measured after the fp16 cast, on the weights a reader loads.
    if out is not None:
        summary = {"steps_done": log["step"], "wall_s": round(log["wall_s"], 1), "final_loss": float(np.mean(log["losses"][-50:])),
                   "stopped_early": stopped_early}
        export_checkpoint(model, cfg, summary, Path(out), dtype=export_dtype)
        log["zero_shot_fp16"] = zero_shot_check(build_miniclip(out), cfg.model, n_per_class=50, seed=999)
        log["checkpoint_bytes"] = Path(out).stat().st_size
    if log_path is not None:
        atomic_write_json(Path(log_path), log)
    return log


@dataclass(frozen=True)
class Phase:
    """One pretraining run of the recipe and how it ends (a step to stop at, the export dtype)."""

    config: PretrainConfig
    stop_at_step: int | None = None
    export_dtype: str = "float16"
    eval_every: int = 500


def recipe(recipe_dir: str = RECIPE_DIR) -> tuple[Phase, ...]:
    """The phases that make the shipped checkpoint; phase i + 1 starts from `{recipe_dir}/phase{i}.safetensors`."""
    return (
        Phase(PretrainConfig(style="pretrain_v1"), stop_at_step=966, export_dtype="float32", eval_every=250),
        Phase(PretrainConfig(style="pretrain_v1", steps=1500, lr=5e-4, min_lr=1e-5, warmup_steps=50,
                             variant_fraction=0.8, variant_objects=(1, 1),
                             init_from=f"{recipe_dir}/phase1.safetensors"), eval_every=250),
        Phase(PretrainConfig(style="pretrain", steps=2000, lr=5e-4, min_lr=1e-5, warmup_steps=50,
                             variant_fraction=0.8, variant_objects=(1, 2),
                             init_from=f"{recipe_dir}/phase2.safetensors"), eval_every=250),
    )


SHIPPED_PHASES = 3  # the shipped checkpoint is phase 3's output


def run_recipe(recipe_dir: str = RECIPE_DIR, out: str | os.PathLike = CHECKPOINT,
               log_path: str | os.PathLike = LOG_PATH, threads: int | None = None,
               n_phases: int = SHIPPED_PHASES) -> dict:
    """Run the first `n_phases` phases of `recipe` in turn; the last writes `out` and `log_path`, earlier
    ones `{recipe_dir}/phase{i}.safetensors` and `miniclip_pretrain_phase{i}.json` next to `log_path`."""
    all_phases = recipe(recipe_dir)
    if not 1 <= n_phases <= len(all_phases):
        raise ValueError(f"n_phases must be in 1..{len(all_phases)}, got {n_phases}")
    phases = all_phases[:n_phases]
    log: dict = {}
    for i, phase in enumerate(phases, start=1):
        last = i == len(phases)
        phase_out = Path(out) if last else Path(recipe_dir) / f"phase{i}.safetensors"
        phase_log = Path(log_path) if last else Path(log_path).with_name(f"miniclip_pretrain_phase{i}.json")
        if not last and phase_out.is_file():
            print(f"phase {i}: {phase_out} exists; skipped", flush=True)
            continue
        log = pretrain(phase.config, Path(recipe_dir) / f"phase{i}", phase_out, phase_log,
                       stop_at_step=phase.stop_at_step, export_dtype=getattr(torch, phase.export_dtype),
                       threads=threads, eval_every=phase.eval_every)
        log.update(phase=i, recipe="python -m safelib.experiments.miniclip_pretrain --recipe")
        atomic_write_json(phase_log, log)
    return log


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    d = PretrainConfig()
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--warmup-steps", type=int, default=d.warmup_steps)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--style", default=d.style, choices=sorted(mw.STYLES))
    p.add_argument("--variant-fraction", type=float, default=d.variant_fraction)
    p.add_argument("--n-variants", type=int, default=d.n_variants)
    p.add_argument("--variant-objects", type=int, nargs=2, default=list(d.variant_objects))
    p.add_argument("--min-lr", type=float, default=d.min_lr)
    p.add_argument("--init-from", default=None, help="weights to start from (a previous phase's safetensors)")
    p.add_argument("--work-dir", default="runs/miniclip", help="resumable training state lives here")
    p.add_argument("--out", default=str(CHECKPOINT), help="fp16 safetensors to write at the end")
    p.add_argument("--log", default=str(LOG_PATH), help="JSON log to write at the end")
    p.add_argument("--max-minutes", type=float, default=None, help="stop early (and export) after this much training time")
    p.add_argument("--stop-at-step", type=int, default=None, help="stop (and export) after this step, mid-schedule")
    p.add_argument("--export-dtype", default="float16", choices=["float16", "float32"],
                   help="float32 for a phase that seeds another (--init-from); the shipped file is float16")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--eval-every", type=int, default=500)
    p.add_argument("--recipe", action="store_true",
                   help=f"run the phases of the shipped recipe (work in {RECIPE_DIR}); other training flags are ignored")
    p.add_argument("--recipe-phases", type=int, default=SHIPPED_PHASES,
                   help="how many phases of the recipe to run (3: the shipped checkpoint; fewer: that phase's weights go to --out)")
    a = p.parse_args(argv)
    if a.recipe:
        log = run_recipe(out=a.out, log_path=a.log, threads=a.threads, n_phases=a.recipe_phases)
        print(json.dumps({k: log[k] for k in ("step", "wall_s", "zero_shot_fp16", "checkpoint_bytes") if k in log}))
        return
    cfg = PretrainConfig(steps=a.steps, batch_size=a.batch_size, lr=a.lr, warmup_steps=a.warmup_steps,
                         seed=a.seed, style=a.style, variant_fraction=a.variant_fraction,
                         n_variants=a.n_variants, variant_objects=tuple(a.variant_objects), min_lr=a.min_lr,
                         init_from=a.init_from)
    log = pretrain(cfg, a.work_dir, a.out, a.log, max_minutes=a.max_minutes, stop_at_step=a.stop_at_step,
                   export_dtype=getattr(torch, a.export_dtype), threads=a.threads, eval_every=a.eval_every)
    print(json.dumps({k: log[k] for k in ("step", "wall_s", "zero_shot_fp16", "checkpoint_bytes") if k in log}))


if __name__ == "__main__":
    main()
