"""Analysis for notebooks/06_ablations: which SAFE choice a record varies, paired effects against seed noise.

The ablation grid (``notebooks/grids/ablations.yaml``) runs SAFE at its default settings and at one
change at a time, on the same tasks, shots and seeds. A record's *variant* is what its setting changes
against SAFE's defaults (``{}`` for the default run). An effect is paired: for each (task, shots,
seed) the variant's test accuracy minus the default's, so the sample's and the seed's luck cancel;
its standard error is the spread of those differences over the square root of their number

    d_i = acc(variant)_i - acc(default)_i,   effect = mean(d),   SE = std(d, ddof=1) / sqrt(n)

and it "exceeds seed noise" when ``|effect| > 2 SE``. Fixed-blend variants need no runs of their
own: every SAFE record keeps the test accuracy at each blend of its sweep (``record["test_sweep"]``),
read here for notebooks/06_ablations only; the runs themselves choose their blend on validation.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure

from ..methods.reference import RAFT
from ..runs.aggregate import load_records
from ..runs.config import RunConfig
from ..runs.records import read_record

__all__ = ["CHOICES", "Choice", "ablation_frame", "paired_differences", "paired_effect", "wins_everywhere",
           "choice_effects", "closing_table", "comparison_table", "plot_choice", "raft_settings", "variant_of",
           "choice", "verdict", "show", "rule_verdict", "coverage"]

PAIR_KEYS = ("dataset", "shots", "seed")
DEFAULT = "default"


@dataclass(frozen=True)
class Choice:
    """One choice the abstract leaves open: its variants as {label: change of the setting}; the default's
    label first. ``method``: the method whose records it reads (SAFE-A's adapter choice reads SAFE-A's)."""

    name: str
    knob: str
    variants: Mapping[str, Mapping[str, Any]]
    default_label: str
    method: str = "safe"
    derived: bool = field(default=False)  # fixed blends: read from the default runs' test sweeps
    across_methods: bool = field(default=False)  # variants are other methods' default runs: {"method": name}


def _grid(step: float) -> list[float]:
    return [round(i * step, 2) for i in range(int(round(1 / step)) + 1)]


CHOICES: tuple[Choice, ...] = (
    Choice("trainable tensors", "trainable", {
        "all": {}, "attention (pos, q, k)": {"trainable": "attention"}, "values (v, c)": {"trainable": "values"},
        "positional": {"trainable": "positional"}, "q alone": {"trainable": "query"}}, "all"),
    Choice("loss target", "loss_on", {"fine-tuned": {}, "blend (0.5)": {"loss_on": "blended"}}, "fine-tuned"),
    Choice("consistency to CLIP's logits (L1)", "consistency", {
        "0": {}, "0.5": {"consistency": 0.5}, "2": {"consistency": 2.0}}, "0"),
    Choice("blend value", "blend", {
        "chosen on val": {}, **{f"fixed {b:g}": {"blend": b} for b in (0.0, 0.25, 0.5, 0.75, 1.0)}},
        "chosen on val", derived=True),
    Choice("blend by", "blend_by", {"features": {}, "logits": {"blend_by": "logits"}}, "features"),
    Choice("blend grid step", "blend_grid", {"0.1": {}, "0.02": {"blend_grid": _grid(0.02)}}, "0.1"),
    Choice("learning rate x epochs", "lr, epochs", {
        "1e-3 x 30": {}, "3e-4 x 30": {"lr": 3e-4}, "3e-3 x 30": {"lr": 3e-3},
        "1e-3 x 10": {"epochs": 10}, "1e-3 x 60": {"epochs": 60}}, "1e-3 x 30"),
    Choice("warm-up", "lr_warmup_epochs", {"none": {}, "5 epochs": {"lr_warmup_epochs": 5}}, "none"),
    Choice("weight decay", "weight_decay, decay_to", {
        "none": {}, "10 to zero": {"weight_decay": 10.0},
        "10 to pretrained": {"weight_decay": 10.0, "decay_to": "pretrained"}}, "none"),
    Choice("train views K", "train_views", {
        "10": {}, "1": {"train_views": 1}, "2": {"train_views": 2}, "4": {"train_views": 4}}, "10"),
    Choice("recipe", "preset", {"ours": {}, "RAFT": {"preset": "raft"}}, "ours"),
    Choice("SAFE-A: which adapter", "method", {
        "Tip-Adapter-F": {"method": "safe_a_tip"}, "CLIP-Adapter": {"method": "safe_a_clip_adapter"}},
        "Tip-Adapter-F", method="safe_a_tip", across_methods=True),
    Choice("SAFE-A (Tip-Adapter-F): the adapter's input", "blends", {
        "blended (b searched)": {}, "original (b = 0)": {"blends": [0.0]}}, "blended (b searched)", method="safe_a_tip"),
    Choice("SAFE-A (CLIP-Adapter): the adapter's input", "blends", {
        "blended (b searched)": {}, "original (b = 0)": {"blends": [0.0]}}, "blended (b searched)",
        method="safe_a_clip_adapter"),
)


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True)


def _default_setting(method: str = "safe") -> dict[str, Any]:
    """The flattened setting of a default run of ``method`` (data fields left out)."""
    return RunConfig(dataset="miniworld_shape_largest", method=method, shots=1, seed=1).setting


def variant_of(setting: Mapping[str, Any], method: str = "safe") -> dict[str, Any]:
    """What a record's flattened setting (``RunConfig.setting``) changes against ``method``'s defaults."""
    default = _default_setting(method)
    return {k: v for k, v in sorted(setting.items()) if _canonical(default.get(k)) != _canonical(v)}


def ablation_frame(results_dir: str | Path) -> pd.DataFrame:
    """One row per (record, variant): dataset, shots, seed, method, choice, label, change (JSON), test and
    val accuracy. Each record is placed under every choice whose variant it is (the default run under
    all of them); the default SAFE runs also give the fixed-blend rows from their test sweeps.
    An absent or empty folder gives an empty frame with these columns."""
    columns = ["dataset", "shots", "seed", "method", "choice", "label", "change", "test_acc", "val_acc",
               "attention", "attention_original"]
    if not Path(results_dir).is_dir():
        return pd.DataFrame(columns=columns)
    records = load_records(results_dir)
    rows = []
    defaults: dict[str, dict[str, Any]] = {}
    for _, row in records.iterrows():
        method = row["method"]
        if method not in defaults:
            defaults[method] = _default_setting(method)
        change = {k: v for k, v in sorted(json.loads(row["setting"]).items())
                  if _canonical(defaults[method].get(k)) != _canonical(v)}
        base = {"dataset": row["dataset"], "shots": int(row["shots"]), "seed": int(row["seed"]), "method": method}
        record = read_record(row["path"])  # once per record: its attention and its test sweep
        # SAFE-A's pooling is its SAFE stage's, trained at SAFE's defaults whatever the adapter: no attention rows
        attention = _attention_of(record) if method == "safe" else {"attention": np.nan, "attention_original": np.nan}
        for choice in CHOICES:
            if choice.across_methods:
                for label, wanted in choice.variants.items():
                    if wanted["method"] == method and not change:
                        rows.append({**base, "choice": choice.name, "label": label, "change": _canonical(wanted),
                                     "test_acc": row["test_acc"], "val_acc": row["val_acc"], **attention})
                continue
            if choice.method != method:
                continue
            for label, wanted in choice.variants.items():
                if choice.derived and wanted:
                    if change:
                        continue
                    sweep = {p["blend"]: p["accuracy"] for p in record.get("test_sweep", [])}
                    if wanted["blend"] in sweep:
                        rows.append({**base, "choice": choice.name, "label": label, "change": _canonical(wanted),
                                     "test_acc": sweep[wanted["blend"]], "val_acc": np.nan,
                                     "attention": np.nan, "attention_original": np.nan})
                elif _canonical(change) == _canonical(dict(wanted)):
                    rows.append({**base, "choice": choice.name, "label": label, "change": _canonical(change),
                                 "test_acc": row["test_acc"], "val_acc": row["val_acc"], **attention})
    return pd.DataFrame(rows, columns=columns)


def _attention_of(record: Mapping[str, Any]) -> dict[str, float]:
    """A record's attention on the target (percent of spatial attention), fine-tuned and original pooling;
    NaN where the record has none (RAFT's background pooling, or records written before runs kept it)."""
    masses = record.get("attention_on_target") or {}
    return {"attention": 100 * masses.get("fine_tuned", np.nan),
            "attention_original": 100 * masses.get("original", np.nan)}


def paired_differences(frame: pd.DataFrame, baseline: str, variant: str, metric: str = "test_acc",
                       keys: Sequence[str] = PAIR_KEYS) -> pd.DataFrame:
    """Per (task, shots, seed) present for both: ``variant``'s ``metric`` minus ``baseline``'s, column ``diff``.

    ``frame`` holds one choice's rows (column ``label`` names the variant)."""
    keys = list(keys)
    a = frame[frame["label"] == baseline].set_index(keys)[metric]
    b = frame[frame["label"] == variant].set_index(keys)[metric]
    if a.index.has_duplicates or b.index.has_duplicates:
        raise ValueError(f"more than one row per {keys} for {baseline!r} or {variant!r}")
    both = pd.concat({"baseline": a, "variant": b}, axis=1, join="inner")
    both["diff"] = both["variant"] - both["baseline"]
    return both.reset_index()


def paired_effect(diffs: pd.DataFrame | Sequence[float]) -> dict[str, float]:
    """Mean of paired differences, its standard error (std ddof=1 over sqrt n), n, and whether
    ``|mean| > 2 SE`` (``beyond_noise``). One pair: SE is NaN and nothing is beyond noise."""
    d = np.asarray(diffs["diff"] if isinstance(diffs, pd.DataFrame) else diffs, dtype=float)
    n = len(d)
    mean = float(d.mean()) if n else math.nan
    se = float(d.std(ddof=1) / math.sqrt(n)) if n > 1 else math.nan
    beyond = bool(n > 1 and abs(mean) > 2 * se) if not math.isnan(se) else False
    return {"effect": mean, "se": se, "n": n, "beyond_noise": beyond}


def wins_everywhere(diffs: pd.DataFrame) -> bool:
    """The book's rule for changing a default: at every shot count the paired effect (over tasks and
    seeds) is positive and beyond seed noise, and on every task at every shot count the mean difference
    is positive. Needs at least two tasks' pairs at each shot count."""
    if diffs.empty:
        return False
    for _, at_shots in diffs.groupby("shots"):
        effect = paired_effect(at_shots)
        if not (effect["beyond_noise"] and effect["effect"] > 0):
            return False
        if at_shots["dataset"].nunique() < 2 or (at_shots.groupby("dataset")["diff"].mean() <= 0).any():
            return False
    return True


def choice_effects(frame: pd.DataFrame, choice: Choice, metric: str = "test_acc") -> pd.DataFrame:
    """Every variant of ``choice`` against its default: effect (points), SE, pairs, beyond noise, wins everywhere."""
    rows = frame[frame["choice"] == choice.name]
    out = []
    for label in choice.variants:
        if label == choice.default_label:
            continue
        diffs = paired_differences(rows, choice.default_label, label, metric)
        if diffs.empty:
            continue
        out.append({"choice": choice.name, "setting": label, **paired_effect(diffs),
                    "wins_everywhere": wins_everywhere(diffs)})
    return pd.DataFrame(out, columns=["choice", "setting", "effect", "se", "n", "beyond_noise", "wins_everywhere"])


def closing_table(frame: pd.DataFrame, metric: str = "test_acc") -> pd.DataFrame:
    """One row per choice: the default, the best setting (largest mean paired effect; the default itself
    when no variant beats it), its effect in points with SE, pairs, and the two noise verdicts."""
    rows = []
    for choice in CHOICES:
        effects = choice_effects(frame, choice, metric)
        if effects.empty:
            continue
        best = effects.loc[effects["effect"].idxmax()]
        if best["effect"] <= 1e-9:  # float noise of equal accuracies is no gain
            rows.append({"choice": choice.name, "default": choice.default_label, "best": choice.default_label,
                         "effect": 0.0, "se": 0.0, "n": int(best["n"]), "beyond_noise": False,
                         "wins_everywhere": False, "best_variant": best["setting"],
                         "best_variant_effect": best["effect"], "best_variant_se": best["se"]})
        else:
            rows.append({"choice": choice.name, "default": choice.default_label, "best": best["setting"],
                         "effect": best["effect"], "se": best["se"], "n": int(best["n"]),
                         "beyond_noise": bool(best["beyond_noise"]), "wins_everywhere": bool(best["wins_everywhere"]),
                         "best_variant": best["setting"], "best_variant_effect": best["effect"],
                         "best_variant_se": best["se"]})
    return pd.DataFrame(rows)


def comparison_table(frame: pd.DataFrame, metric: str = "test_acc") -> pd.DataFrame:
    """Mean ``metric`` over tasks and seeds per shot count for: SAFE's defaults, zero-shot CLIP (SAFE's
    blend 0 on test), the RAFT preset, and each choice's best non-default variant; rows are settings."""
    named = [("SAFE defaults", "trainable tensors", "all"), ("zero-shot CLIP (blend 0)", "blend value", "fixed 0"),
             ("RAFT recipe", "recipe", "RAFT")]
    table = closing_table(frame, metric)
    named += [(f"{r['choice']}: {r['best_variant']}", r["choice"], r["best_variant"]) for _, r in table.iterrows()
              if r["best_variant"] != "RAFT" and r["best_variant"] != "fixed 0"]
    out = {}
    for name, choice, label in named:
        rows = frame[(frame["choice"] == choice) & (frame["label"] == label)]
        if len(rows):
            out[name] = rows.groupby("shots")[metric].mean()
    return pd.DataFrame(out).T.rename_axis(index="setting", columns="shots")


def plot_choice(frame: pd.DataFrame, choice: Choice, metric: str = "test_acc") -> Figure:
    """Accuracy against the choice's settings, one panel per shot count, a line per task: mean over
    seeds with a band of the seeds' range (each point's three seeds drawn as dots). Where the records
    measured it, a second row shows the attention on the target (the original pooling's as a dotted line)."""
    rows = frame[frame["choice"] == choice.name]
    if rows.empty:
        raise ValueError(f"no records of {choice.name!r}")
    order = [label for label in choice.variants if label in set(rows["label"])]
    shots = sorted(rows["shots"].unique())
    tasks = sorted(rows["dataset"].unique())
    panels = [(metric, "test accuracy (%)" if metric == "test_acc" else metric)]
    if "attention" in rows and rows["attention"].notna().any():
        panels.append(("attention", "attention on target (%)"))
    sns.set_theme(style="whitegrid", context="notebook")
    fig, axes = plt.subplots(len(panels), len(shots), sharey="row", squeeze=False,
                             figsize=(max(4.0, 1.2 * len(order)) * len(shots) / 1.3 + 1, 3.4 * len(panels)))
    for row_axes, (column, ylabel) in zip(axes, panels):
        for ax, k in zip(row_axes, shots):
            at = rows[(rows["shots"] == k) & rows[column].notna()]
            _panel(ax, at, column, order, tasks, legend=column == metric and ax is row_axes[-1])
            ax.set_title(f"{k} shots (seeds {', '.join(map(str, sorted(at['seed'].unique())))})", fontsize=10)
            ax.set_xlabel(choice.knob if column == panels[-1][0] else "")
            ax.set_ylabel(ylabel)
            ax.tick_params(axis="x", rotation=30 if max(len(s) for s in order) > 6 else 0)
            if column == "attention":  # each task's original pooling, dotted in the task's colour
                for task, colour in zip(tasks, sns.color_palette(n_colors=len(tasks))):
                    original = at.loc[at["dataset"] == task, "attention_original"].mean()
                    ax.axhline(original, color=colour, linestyle=":", linewidth=1.2)
                ax.annotate("dotted: original pooling", (0.01, 0.98), xycoords="axes fraction", va="top",
                            fontsize=8, color="gray")
    legend = axes[0][-1].get_legend()
    if legend is not None:
        legend.set_bbox_to_anchor((1.02, 1))
        legend.set_loc("upper left")
        legend.set_frame_on(False)
    fig.suptitle(choice.name, fontsize=11)
    fig.tight_layout()
    return fig


def _panel(ax, at: pd.DataFrame, column: str, order: list[str], tasks: list[str], legend: bool) -> None:
    """One panel of ``plot_choice``: per task, the seeds' mean with their range, and each seed as a dot."""
    dodge = 0.3 if at["dataset"].nunique() > 1 else False
    sns.pointplot(data=at, x="label", y=column, hue="dataset", hue_order=tasks, order=order,
                  errorbar=("pi", 100), dodge=dodge, capsize=0.1, ax=ax, legend=legend)
    sns.stripplot(data=at, x="label", y=column, hue="dataset", hue_order=tasks, order=order, dodge=bool(dodge),
                  size=3, alpha=0.5, ax=ax, legend=False, palette="dark:gray")


def raft_settings() -> dict[str, Any]:
    """RAFT's recipe as SAFE config fields (what the preset "raft" fills in)."""
    return dict(RAFT)


def choice(name: str) -> Choice:
    """The ``Choice`` of ``CHOICES`` named ``name``."""
    for c in CHOICES:
        if c.name == name:
            return c
    raise ValueError(f"no choice {name!r}; valid: {', '.join(c.name for c in CHOICES)}")


def verdict(frame: pd.DataFrame, name: str, metric: str = "test_acc") -> str:
    """One sentence, computed from the records: the best setting of choice ``name`` against its default,
    its paired effect with SE, and whether it is beyond seed noise and wins on every task and shot count."""
    c = choice(name)
    effects = choice_effects(frame, c, metric)
    if effects.empty:
        return f"No paired records of {c.name!r} yet."
    best = effects.loc[effects["effect"].idxmax()]
    size = f"{best['effect']:+.2f} ± {best['se']:.2f} points over {int(best['n'])} (task, shots, seed) pairs"
    noise = "beyond seed noise (more than twice its standard error)" if best["beyond_noise"] else "within seed noise"
    if best["effect"] <= 1e-9:  # float noise of equal accuracies is no gain
        return (f"No setting of {c.knob} beats the default ({c.default_label}); the closest, {best['setting']}, "
                f"differs by {size}, {noise}.")
    everywhere = ("and it wins on both tasks at every shot count beyond noise" if best["wins_everywhere"]
                  else "but it does not win on both tasks at every shot count beyond noise")
    return (f"The best setting of {c.knob}, {best['setting']}, beats the default ({c.default_label}) by {size}, "
            f"{noise}, {everywhere}.")


def show(frame: pd.DataFrame, name: str, metric: str = "test_acc") -> pd.DataFrame | None:
    """A section of notebooks/06_ablations: prints the verdict, draws the figure, returns the effects table
    (None, after a plain sentence, when there are no records of the choice)."""
    c = choice(name)
    if frame[frame["choice"] == c.name].empty:
        print(f"No records of {c.name!r} in the results folder: the ablation grid makes them.")
        return None
    print(verdict(frame, name, metric))
    plot_choice(frame, c, metric)
    plt.show()
    table = choice_effects(frame, c, metric).drop(columns="choice").set_index("setting")
    rows = frame[frame["choice"] == c.name]
    attention = rows.groupby("label")["attention"].mean()
    if attention.notna().any():  # mean attention on the target (%), over tasks, shots and seeds
        print(f"Attention on the target: {attention.get(c.default_label, np.nan):.1f}% at the default "
              f"({c.default_label}), {rows['attention_original'].mean():.1f}% with the original pooling.")
        table["attention on target (%)"] = attention.reindex(table.index)
    return table.round({"effect": 2, "se": 2, "attention on target (%)": 1})


def rule_verdict(table: pd.DataFrame) -> str:
    """The book's rule for defaults, applied to ``closing_table``: which choices have a setting that wins on
    both tasks at every shot count beyond seed noise (a candidate for a new default)."""
    if table.empty:
        return "No records, so no evidence for or against any default."
    winners = table[table["wins_everywhere"]]
    if winners.empty:
        return ("No setting wins on both tasks at every shot count beyond seed noise: the evidence is mixed or "
                "null for every choice, so every default stays.")
    named = "; ".join(f"{r['choice']}: {r['best']}" for _, r in winners.iterrows())
    return f"Settings that win on both tasks at every shot count beyond seed noise: {named}."


def coverage(frame: pd.DataFrame) -> pd.DataFrame:
    """What the records hold, per task and shot count: the seeds with a default SAFE run and how many
    (choice, setting, seed) results there are."""
    default = frame[(frame["choice"] == CHOICES[0].name) & (frame["label"] == CHOICES[0].default_label)]
    seeds = default.groupby(["dataset", "shots"])["seed"].agg(lambda s: ", ".join(map(str, sorted(s))))
    results = frame.drop_duplicates(["dataset", "shots", "seed", "choice", "label"]).groupby(["dataset", "shots"]).size()
    return pd.DataFrame({"seeds of the default run": seeds, "results": results}).fillna("")
