"""Every figure of the report, and the only module that touches matplotlib.

Each function takes numbers the experiments computed (no model, no cache), draws one PNG into
the output folder `out` and returns its file name. matplotlib is imported on first use, so the
package imports without it; `pyplot()` raises an ImportError with the install hint."""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Mapping, Sequence, Tuple

import numpy as np

MATPLOTLIB_HINT = 'fastdiff reproduce draws its plots with matplotlib: pip install "fastdiff[report]"'

#: (mean, low, high), as `stats.t_interval` returns it.
Interval = Tuple[float, float, float]


def pyplot():
    """matplotlib.pyplot on the Agg backend, or an ImportError saying how to install it."""
    try:
        import matplotlib
    except ImportError:
        raise ImportError(MATPLOTLIB_HINT) from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def mathtext(label: str) -> str:
    """β̃ (a combining tilde, which fonts draw poorly) as matplotlib mathtext."""
    return label.replace("β̃", r"$\tilde{\beta}$")


def _save(fig, out: Path, name: str) -> str:
    fig.tight_layout()
    fig.savefig(Path(out) / name, dpi=110)
    pyplot().close(fig)
    return name


def _error_bars(records: Sequence[dict], key: str) -> np.ndarray:
    """(2, N) distances from each record's point `key` down to ci[0] and up to ci[1]."""
    return np.array([[r[key] - r["ci"][0], r["ci"][1] - r[key]] for r in records]).T


def _vlb_terms(ax, vb_means: Mapping[str, np.ndarray], title: str, colors: Mapping[str, str] = None) -> None:
    """The held-out mean of each VLB term L_t against t, one line per model, log scale."""
    for n, vb in vb_means.items():
        kw = {"color": colors[n]} if colors else {}
        ax.plot(np.arange(len(vb)), vb, label=n, **kw)
    ax.set_yscale("log")
    ax.set_xlabel("t")
    ax.set_ylabel("L_t (bits/dim)")
    ax.set_title(title)
    ax.legend()


# --------------------------------------------------------------------------- experiment 1
def schedules_figure(out: Path, alphas_cumprod: Mapping[str, np.ndarray], vb_means: Mapping[str, np.ndarray],
                     bpd: Mapping[str, dict], name: str) -> str:
    """Three panels: ᾱ_t per schedule, the per-step VLB terms per model, held-out bits/dim bars."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for sched, a in alphas_cumprod.items():
        axes[0].plot(np.arange(len(a)) / len(a), a, label=sched)
    axes[0].set_xlabel("diffusion step t / T")
    axes[0].set_ylabel("ᾱ_t")
    axes[0].set_title("ᾱ_t (cf. Nichol & Dhariwal Fig. 5)")
    axes[0].legend()
    _vlb_terms(axes[1], vb_means, "VLB terms per step (held-out mean)")
    names = list(bpd)
    axes[2].bar(names, [bpd[n]["bpd"] for n in names], yerr=_error_bars([bpd[n] for n in names], "bpd"),
                capsize=6, color=["tab:blue", "tab:orange"])
    axes[2].set_ylabel("bits/dim (95% CI)")
    axes[2].set_title("held-out bits/dim")
    return _save(fig, out, name)


# --------------------------------------------------------------------------- experiment 2
def losses_figure(out: Path, curves: Mapping[str, Tuple[np.ndarray, np.ndarray]],
                  vb_means: Mapping[str, np.ndarray], bpd: Mapping[str, dict], fid: Mapping[str, dict],
                  colors: Mapping[str, str], quality_steps: int, name: str) -> str:
    """Three panels: smoothed training curves, per-step VLB terms, bits/dim next to FID-like."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.6))
    for n, (st, lo) in curves.items():
        if len(lo):
            k = max(1, len(lo) // 40)
            smooth = np.convolve(lo, np.ones(k) / k, mode="valid")
            axes[0].plot(st[k - 1:], smooth, label=n, color=colors[n])
    axes[0].set_yscale("log")
    axes[0].set_xlabel("training step")
    axes[0].set_ylabel("training loss (own objective, smoothed)")
    axes[0].set_title("training curves")
    axes[0].legend()
    _vlb_terms(axes[1], vb_means, "VLB terms per step (cf. N&D Fig. 2)", colors)
    names = list(bpd)
    x = np.arange(len(names))
    axes[2].bar(x - 0.2, [bpd[n]["bpd"] for n in names], 0.4, yerr=_error_bars([bpd[n] for n in names], "bpd"),
                capsize=5, label="bits/dim", color="tab:blue")
    ax2 = axes[2].twinx()
    ax2.bar(x + 0.2, [fid[n]["fid"] for n in names], 0.4, yerr=_error_bars([fid[n] for n in names], "fid"),
            capsize=5, label="FID-like", color="tab:gray")
    axes[2].set_xticks(x)
    axes[2].set_xticklabels([n.replace("cosine-", "") for n in names])
    axes[2].set_ylabel("bits/dim (blue)")
    ax2.set_ylabel(f"FID-like, ancestral {quality_steps} steps (gray)")
    axes[2].set_title("bits/dim and FID-like (95% CI)")
    return _save(fig, out, name)


# --------------------------------------------------------------------------- experiments 3, 4 (and samples)
def fid_vs_steps(out: Path, steps: Sequence[int], series: Sequence[Tuple[str, Sequence[dict]]], floor: dict,
                 xlabel: str, title: str, name: str, legend_size: int = 8,
                 points: Sequence[Tuple[str, float, dict]] = ()) -> str:
    """FID-like (with its interval) against sampling steps, one line per (label, cells) series
    whose cells hold 'fid' and 'ci', log-log, the real-image floor dotted; `points` (label, x,
    cell) are single cells at their own x (an adaptive sampler's measured NFE), drawn unjoined."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for label, cells in series:
        ax.errorbar(steps, [c["fid"] for c in cells], yerr=list(_error_bars(cells, "fid")), marker="o", capsize=3,
                    label=label)
    for (label, x, cell), marker in zip(points, "sDP^v<>*"):
        ax.errorbar([x], [cell["fid"]], yerr=list(_error_bars([cell], "fid")), marker=marker, ls="none",
                    capsize=3, color="black", mfc="white", label=label)
    ax.axhline(floor["fid"], color="gray", ls=":", label="real images (floor)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("FID-like (95% normal bootstrap CI)")
    ax.set_title(title)
    ax.legend(fontsize=legend_size)
    return _save(fig, out, name)


def sample_strip(out: Path, entries: Sequence[Tuple[str, np.ndarray]], name: str, per_row: int = 16) -> str:
    """One row of per_row samples per entry (label, uint8 images (N, C, H, W))."""
    plt = pyplot()
    fig, axes = plt.subplots(len(entries), 1, figsize=(per_row * 0.45 + 1.5, 0.62 * len(entries) + 0.3),
                             squeeze=False)
    for ax, (label, imgs) in zip(axes[:, 0], entries):
        imgs = imgs[:per_row]
        c, h, w = imgs.shape[1:]
        strip = np.ones((h, per_row * (w + 1), 3), dtype=np.uint8) * 255
        for i, im in enumerate(imgs):
            strip[:, i * (w + 1): i * (w + 1) + w] = im.transpose(1, 2, 0) if c == 3 else im[0][..., None]
        ax.imshow(strip, interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_ylabel(mathtext(label), rotation=0, ha="right", va="center", fontsize=8)
    return _save(fig, out, name)


# --------------------------------------------------------------------------- experiment 5
def oracle_figure(out: Path, steps: Sequence[int], intervals: Dict[str, Sequence[Interval]], exact: Interval,
                  name: str) -> str:
    """MMD² (with its interval) against steps, one line and band per sampler label, log-log; the
    exact samples' noise floor as a gray band. Values and interval ends at or below 0 are drawn
    at the axis' floor (a tenth of the smallest positive mean)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    positive = [v[0] for ivs in intervals.values() for v in ivs if v[0] > 0] + ([exact[2]] if exact[2] > 0 else [])
    floor_y = min(positive) / 10 if positive else 1e-6
    for label, ivs in intervals.items():
        m, lo, hi = (np.array([v[i] for v in ivs]) for i in range(3))
        ax.plot(steps, np.maximum(m, floor_y), marker="o", label=mathtext(label))
        ax.fill_between(steps, np.maximum(lo, floor_y), np.maximum(hi, floor_y), alpha=0.2)
    ax.axhspan(floor_y, max(exact[2], floor_y), color="gray", alpha=0.2,
               label="exact samples: below their 95% CI's upper end")
    ax.set_ylim(bottom=floor_y)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("sampling steps S")
    ax.set_ylabel("MMD² to the exact law (×1e3, 95% CI over seeds)")
    ax.set_title("Oracle: sampler error vs steps (3-component 2-D mixture)")
    ax.legend(fontsize=8)
    return _save(fig, out, name)


# --------------------------------------------------------------------------- experiment 5 (PF-ODE orders)
def solver_order_figure(out: Path, curves: Mapping[str, Tuple[np.ndarray, np.ndarray]], slopes: Mapping[str, float],
                        adaptive: Tuple[np.ndarray, np.ndarray, Sequence[float]], name: str) -> str:
    """Error of x_0 against NFE, log-log: one line per fixed-step solver (label, with its fitted
    slope), the adaptive solver as points labelled with their rtol."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.8, 4.6))
    for label, (nfe, err) in curves.items():
        ax.plot(nfe, err, marker="o", ms=4, label=f"{label} (slope {slopes[label]:.2f})")
    nfe, err, rtols = adaptive
    ax.plot(nfe, err, ls="none", marker="s", color="black", mfc="white", label="adaptive RK45 (rtol labelled)")
    for x, y, r in zip(nfe, err, rtols):
        ax.annotate(f"{r:g}", (x, y), textcoords="offset points", xytext=(5, 3), fontsize=7)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("network evaluations (NFE)")
    ax.set_ylabel("max |x − exact flow| at the grid's end")
    ax.set_title("PF-ODE solvers vs the closed form (Gaussian data)")
    ax.legend(fontsize=7)
    return _save(fig, out, name)


# --------------------------------------------------------------------------- experiment 7
def bpd_pairs_figure(out: Path, pairs: Mapping[str, Tuple[np.ndarray, np.ndarray]], name: str) -> str:
    """Per-image (VLB bits/dim, ODE bits/dim), one colour per model, with the diagonal."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.2, 4.6))
    lo = min(min(v.min(), o.min()) for v, o in pairs.values())
    hi = max(max(v.max(), o.max()) for v, o in pairs.values())
    for label, (vlb, ode) in pairs.items():
        ax.scatter(vlb, ode, s=10, alpha=0.7, label=label)
    ax.plot([lo, hi], [lo, hi], color="gray", ls=":", label="ODE = VLB")
    ax.set_xlabel("VLB bits/dim (per image)")
    ax.set_ylabel("PF-ODE bits/dim (per image)")
    ax.set_title("Exact ODE likelihood vs the variational bound")
    ax.legend(fontsize=8)
    return _save(fig, out, name)


# --------------------------------------------------------------------------- experiment 8
def latent_vs_pixel(out: Path, cells: Mapping[str, dict], recon: dict, floor: dict, speedup: float, name: str) -> str:
    """Two panels: sampling milliseconds per image of the pixel and latent models (log scale), and
    their FID-like with 95% intervals beside the autoencoder's reconstructions and real images."""
    plt = pyplot()
    fig, (ax_t, ax_f) = plt.subplots(1, 2, figsize=(9.5, 3.8))
    kinds = list(cells)
    ms = [1e3 * cells[k]["seconds_per_image"] for k in kinds]
    ax_t.bar(kinds, ms, color=["tab:blue", "tab:orange"][:len(kinds)])
    ax_t.set_yscale("log")
    ax_t.set_ylabel("ms per sampled image")
    ax_t.set_title(f"sampling time (latent {speedup:.1f}x faster)")
    entries = [(k, cells[k]) for k in kinds] + [("AE recon.", recon), ("real", floor)]
    ax_f.errorbar(range(len(entries)), [e["fid"] for _, e in entries],
                  yerr=list(_error_bars([e for _, e in entries], "fid")), fmt="o", capsize=4)
    ax_f.set_xticks(range(len(entries)))
    ax_f.set_xticklabels([label for label, _ in entries])
    ax_f.set_ylabel("FID-like (95% bootstrap CI)")
    ax_f.set_title("sample quality")
    return _save(fig, out, name)
