"""Report rendering: `Section` (one experiment's prose, tables, figures, verdict and numbers),
the small text helpers the experiments share (intervals, markdown tables, verdict words,
the settings lines), and `write_report`, which renders REPORT.md and results.json."""
from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Sequence, Tuple

import numpy as np
import torch

from fastdiff.experiments.reproduce.run import MODELS, SIGMA_HAT, Run
from fastdiff.io import atomic_write_bytes

REPORT_NAME = "REPORT.md"


@dataclass
class Section:
    """One experiment's part of the report, and its numbers."""
    number: int
    title: str
    claim: str
    settings: List[str]
    tables: List[str]
    figures: List[Tuple[str, str]]           # (file name in the output folder, caption)
    verdict: str
    short: str                               # the summary table's verdict
    notes: List[str] = field(default_factory=list)
    numbers: dict = field(default_factory=dict)


# --------------------------------------------------------------------------- text helpers
def fmt_ci(mean: float, lo: float, hi: float, digits: int = 3) -> str:
    return f"{mean:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def sign_verdict(lo: float, hi: float, expect_negative: bool) -> str:
    """'agrees', 'disagrees' or 'inconclusive' for a 95% interval of a difference whose
    expected sign is negative (expect_negative) or positive."""
    if hi < 0:
        return "agrees" if expect_negative else "disagrees"
    if lo > 0:
        return "disagrees" if expect_negative else "agrees"
    return "inconclusive"


def eta_label(eta) -> str:
    return "σ̂" if eta == SIGMA_HAT else f"η = {eta:g}"


def model_line(name: str) -> str:
    spec = MODELS[name]
    return (f"`{name}`: {spec['schedule']} schedule, loss {spec['loss']}, variance {spec['variance']}, "
            f"t-sampler {spec['t_sampler']}")


def train_line(run: Run) -> str:
    s = run.settings
    m = s.model_kwargs
    return (f"U-Net with {m['model_channels']} base channels, mult {tuple(m['channel_mult'])}, "
            f"{m['num_res_blocks']} res block(s) per level, attention at {tuple(m['attention_resolutions']) or 'none'}; "
            f"{s.image_size}x{s.image_size} shapes ({s.dataset_size} training images), eps-prediction, T = {s.T}; "
            f"{s.train_steps} AdamW steps of batch {s.batch_size}, lr {s.lr:g} (warm-up {s.warmup_steps}), "
            f"EMA {s.ema_rate}; training seed {run.seed}; one training run per model")


# --------------------------------------------------------------------------- REPORT.md
def _intro(run: Run, sections: Sequence[Section]) -> List[str]:
    s = run.settings
    return [f"# fastdiff reproduce — {s.name} run", "",
            "A small-scale reproduction of the claims the thesis (`diffusion models in depth`) reports, on the "
            "embedded `shapes` data and on the oracle kit. Every number in our tables was measured by this run (or "
            "read back from its cache, see *Provenance*); the papers' own numbers appear only in tables labelled "
            "*paper*, for their trend: our models are tiny and our images 16x16, so only trends can be compared.", "",
            *(["> **This is a `--quick` run**: settings shrunk until the whole pipeline runs in minutes (models "
               f"trained {s.train_steps} steps, T = {s.T}, {s.n_gen} samples per cell). It checks that the report is "
               "produced; its verdicts say nothing about the papers. Run without `--quick` for those.", ""]
              if s.name == "quick" else []),
            "## Summary", "",
            table(["#", "experiment", "verdict"],
                  [[str(sec.number), sec.title, sec.short] for sec in sections]), ""]


def _provenance(run: Run, wall_seconds: float, threads: int, command: str) -> List[str]:
    from fastdiff.metrics.features import SHAPES_RECORD

    s = run.settings
    first, last = run.cache_span()
    record_path = run.out / "features" / SHAPES_RECORD
    feats = json.loads(record_path.read_text()) if record_path.exists() else {}
    lines = ["## Provenance", "",
             f"- command: `{command}`",
             f"- this invocation: {wall_seconds / 60:.1f} min wall time with {threads} torch thread(s), of which "
             f"{run.new_seconds / 60:.1f} min computing results that were not cached yet (the rest read the cache "
             f"of earlier invocations on the same folder and drew the report)",
             f"- time spent computing all cached results, whichever invocation computed them: "
             f"{run.compute_seconds() / 60:.1f} min, of which training {run.training_seconds() / 60:.1f} min; "
             f"the cache was filled from {_utc(first)} to {_utc(last)} ({(last - first) / 60:.1f} min of wall clock)",
             *[f"- earlier invocation on this folder: `{inv['command']}`, finished {inv['finished']}, "
               f"{inv['wall_minutes']:.1f} min with {inv['threads']} thread(s), experiments {inv['experiments']}"
               for inv in run.invocations()[:-1]],
             f"- machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores (shared with other "
             f"work during the run), torch {torch.__version__}, Python {platform.python_version()}",
             f"- date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; seed {run.seed}; settings `{s.name}`",
             ]
    if feats:
        lines.append(f"- FID-like features: `ShapesCNN` penultimate layer ({feats.get('feature_dim')}-d), trained "
                     f"{feats.get('steps')} steps on {feats.get('dataset_size')} shapes at {s.image_size}px, held-out "
                     f"accuracy {feats.get('held_out_accuracy', float('nan')):.3f}")
    return lines


_INTERVALS = ("Intervals are 95%. bits/dim: Student-t over held-out images (paired for differences). FID-like: "
              "point ± 1.96 bootstrap standard errors, resampling generated and reference features (paired for "
              "differences between sample sets drawn from the same initial noise; numpy seeds --seed and --seed + 5). "
              "Oracle: Student-t over seeds. Each model is trained once, so no interval includes the variance between "
              "training seeds — the largest caveat of this report.")


def _section_lines(sec: Section) -> List[str]:
    lines = [f"## {sec.number}. {sec.title}", "", f"**Paper's claim.** {sec.claim}", "", "**Settings.**", ""]
    lines += [f"- {x}" for x in sec.settings] + [""]
    for t in sec.tables:
        lines += [t, ""]
    for fname, caption in sec.figures:
        lines += [f"![{caption}]({fname})", "", f"*{caption}*", ""]
    lines += [f"**Verdict.** {sec.verdict}", ""]
    lines += [f"*Note.* {n}" for n in sec.notes] + ([""] if sec.notes else [])
    return lines


def write_report(run: Run, sections: Sequence[Section], wall_seconds: float, threads: int, command: str) -> Path:
    """REPORT.md (intro, summary, provenance, one part per section) and results.json (every
    section's numbers) in the run's folder; returns REPORT.md's path."""
    lines = _intro(run, sections) + _provenance(run, wall_seconds, threads, command) + ["", _INTERVALS, ""]
    for sec in sections:
        lines += _section_lines(sec)
    path = run.out / REPORT_NAME
    atomic_write_bytes(path, "\n".join(lines).encode())
    numbers = {str(sec.number): sec.numbers for sec in sections}
    atomic_write_bytes(run.out / "results.json", json.dumps(numbers, indent=1, default=_json_default).encode())
    return path


def _utc(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(t))


def _json_default(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)
