"""The study's figures, drawn from the results dict alone (the projections are drawn by the run)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from steer.experiments.figures import save_figure
from steer.experiments.study.curves import is_chosen


def _figure(w: float, h: float, n_cols: int = 1, n_rows: int = 1):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h), layout="constrained")
    axes = fig.subplots(n_rows, n_cols, squeeze=False)
    return fig, axes


def _save(fig, path: Path) -> str:
    return save_figure(fig, path).name


def make_figures(results: dict, out: Path) -> dict[str, str]:
    """Draw every figure into `out`: {name: file name} (projections: those the run drew)."""
    out = Path(out)
    rep = results["dev"]["representation"]
    targets = [t for t in results["test"] if t != "pre"]
    figs: dict[str, str] = {}
    figs["retrieval"] = _save(retrieval_figure(results, rep, targets), out / "retrieval_per_language.png")
    figs["heatmap"] = _save(heatmap_figure(results, rep, targets), out / "retrieval_change_heatmap.png")
    figs["k_sweep"] = _save(k_sweep_figure(results, targets), out / "k_sweep_dev.png")
    if len({r["layer"] for r in results["dev"]["records"]}) > 1:
        figs["layers"] = _save(layers_figure(results, targets), out / "layers_dev.png")
    figs["control"] = _save(control_figure(results, rep, targets), out / "random_control.png")
    if results.get("methods"):
        figs["methods"] = _save(methods_figure(results, rep, targets), out / "methods.png")
    if results.get("curves"):
        figs["curves"] = _save(curves_figure(results, targets), out / "curves.png")
    for t in targets:
        if (out / f"projection_{t}.png").exists():
            figs[f"projection_{t}"] = f"projection_{t}.png"
    return figs


def retrieval_figure(results: dict, rep: str, targets: list[str]):
    """Per-language retrieval pre/post with CIs (both directions that involve the target)."""
    fig, axes = _figure(11, 3.2 * len(targets), 2, len(targets))
    for row, t in enumerate(targets):
        pairs = results["test"][t]["retrieval"][rep]["pairs"]
        others = [k.split("->")[1] for k in pairs if k.startswith(f"{t}->")]
        for col, (title, keys) in enumerate((
                (f"query {t} -> candidate xx (setting a)", [f"{t}->{o}" for o in others]),
                (f"query xx -> candidate {t}", [f"{o}->{t}" for o in others]))):
            ax = axes[row][col]
            x = np.arange(len(others))
            for j, (name, color) in enumerate((("pre", "#999999"), ("post", "#d62728"))):
                v = np.array([pairs[k][name] for k in keys], dtype=float)
                err = np.abs(v[:, 1:] - v[:, :1]).T
                ax.bar(x + (j - 0.5) * 0.38, v[:, 0], 0.38, yerr=err, capsize=2, color=color, label=name)
            ax.set_xticks(x, others)
            top = max(pairs[k][name][2] for k in keys for name in ("pre", "post"))
            ax.set_ylim(0, min(1.05, max(0.05, top * 1.15)))
            ax.set_ylabel("top-1")
            ax.set_title(f"{title}, k={results['test'][t]['k']}", fontsize=10)
            ax.legend(fontsize=8)
    return fig


def heatmap_figure(results: dict, rep: str, targets: list[str]):
    """Heat map of the change of top-1 over all ordered pairs."""
    fig, axes = _figure(5.2 * len(targets), 4.6, len(targets), 1)
    for i, t in enumerate(targets):
        pairs = results["test"][t]["retrieval"][rep]["pairs"]
        langs = list(dict.fromkeys(k.split("->")[0] for k in pairs))
        m = np.full((len(langs), len(langs)), np.nan)
        for a_i, a in enumerate(langs):
            for b_i, b in enumerate(langs):
                if a != b:
                    m[a_i, b_i] = pairs[f"{a}->{b}"]["delta"][0]
        ax = axes[0][i]
        lim = max(0.05, float(np.nanmax(np.abs(m))))
        im = ax.imshow(m, cmap="RdBu_r", vmin=-lim, vmax=lim)
        ax.set_xticks(range(len(langs)), langs)
        ax.set_yticks(range(len(langs)), langs)
        ax.set_xlabel("candidate language")
        ax.set_ylabel("query language")
        ax.set_title(f"top-1 post - pre, experts of {t} (k={results['test'][t]['k']})", fontsize=10)
        if len(langs) <= 10:
            for a_i in range(len(langs)):
                for b_i in range(len(langs)):
                    if a_i != b_i:
                        ax.text(b_i, a_i, f"{m[a_i, b_i]:+.2f}", ha="center", va="center", fontsize=7,
                                color="white" if abs(m[a_i, b_i]) > 0.6 * lim else "black")
        fig.colorbar(im, ax=ax, shrink=0.8)
    return fig


def k_sweep_figure(results: dict, targets: list[str]):
    """The k sweep on dev (the numbers k was chosen from)."""
    chosen = results["dev"]["chosen"]
    layer = chosen["layer"]
    recs = [r for r in results["dev"]["records"] if r["layer"] == layer]
    fig, axes = _figure(5 * len(targets), 3.6, len(targets), 1)
    for i, t in enumerate(targets):
        ax = axes[0][i]
        rs = sorted([r for r in recs if r["target"] == t and r["k"] > 0], key=lambda r: r["k"])
        pre = next(r for r in recs if r["target"] == t and r["k"] == 0)
        for s, color in (("a", "#d62728"), ("b", "#1f77b4")):
            ax.plot([r["k"] for r in rs], [r[s] for r in rs], "o-", color=color, label=f"setting ({s}) steered")
            ax.axhline(pre[s], color=color, ls="--", lw=1, label=f"setting ({s}) unsteered")
        ax.axvline(chosen["k"][t], color="black", ls=":", lw=1, label=f"chosen k={chosen['k'][t]}")
        ax.set_xscale("log")
        ax.set_xlabel("k (experts forced)")
        ax.set_ylabel("mean top-1 (dev)")
        ax.set_title(f"dev k sweep, experts of {t}, layer {layer}", fontsize=10)
        ax.legend(fontsize=7)
    return fig


def layers_figure(results: dict, targets: list[str]):
    """The layer profile on dev (unsteered vs steered at the chosen k)."""
    chosen = results["dev"]["chosen"]
    layer = chosen["layer"]
    fig, axes = _figure(5 * len(targets), 3.4, len(targets), 1)
    for i, t in enumerate(targets):
        ax = axes[0][i]
        rs = [r for r in results["dev"]["records"] if r["target"] == t]
        layers = sorted({r["layer"] for r in rs})
        for k, color, name in ((0, "#999999", "unsteered"), (chosen["k"][t], "#d62728", f"k={chosen['k'][t]}")):
            ys = [next(r["a"] for r in rs if r["layer"] == l and r["k"] == k) for l in layers]
            ax.plot(layers, ys, "o-", ms=3, color=color, label=f"setting (a), {name}")
        ax.axvline(layer, color="black", ls=":", lw=1, label=f"read-out layer {layer}")
        ax.set_xlabel("hidden state (layer)")
        ax.set_ylabel("mean top-1 (dev)")
        ax.set_title(f"dev retrieval by layer, experts of {t}", fontsize=10)
        ax.legend(fontsize=7)
    return fig


def control_figure(results: dict, rep: str, targets: list[str]):
    """The random-neuron control: unsteered, experts and random neurons per setting."""
    fig, axes = _figure(5 * len(targets), 3.4, len(targets), 1)
    for i, t in enumerate(targets):
        ax = axes[0][i]
        c = results["control"][t]
        x = np.arange(2)
        pre = [c["pre"]["retrieval"][rep][s] for s in ("a", "b")]
        exp = [c["experts"]["retrieval"][rep][s] for s in ("a", "b")]
        rnd = [c["random"]["retrieval"][rep][s] for s in ("a", "b")]
        ax.bar(x - 0.27, pre, 0.27, color="#999999", label="unsteered")
        ax.bar(x, exp, 0.27, color="#d62728", label=f"experts (k={c['k']})")
        ax.bar(x + 0.27, [r[0] for r in rnd], 0.27, yerr=[r[1] for r in rnd], capsize=3, color="#1f77b4",
               label=f"random neurons, {c['random']['n_seeds']} seeds (mean ± sd)")
        for j, s in enumerate(("a", "b")):
            ys = [sd["retrieval"][rep][s] for sd in c["seeds"]]
            ax.scatter([j + 0.27] * len(ys), ys, s=8, color="black", zorder=3)
        ax.set_xticks(x, ["setting (a)", "setting (b)"])
        top = max(pre + exp + [r[0] + r[1] for r in rnd]
                  + [sd["retrieval"][rep][s] for sd in c["seeds"] for s in ("a", "b")])
        ax.set_ylim(0, min(1.05, max(0.05, top * 1.3)))
        ax.set_ylabel("mean top-1 (test subset)")
        ax.set_title(f"random-neuron control, {t} ({results['control']['rows']} verses)", fontsize=10)
        ax.legend(fontsize=7)
    return fig


def methods_figure(results: dict, rep: str, targets: list[str]):
    """Per target: each method's change in setting (a) top-1 on test (paired 95 % CI), and its
    target-language fraction in generation against the perplexity ratio."""
    m = results["methods"]
    names = m["names"]
    fig, axes = _figure(10, 3.4 * len(targets), 2, len(targets))
    for row, t in enumerate(targets):
        ax = axes[row][0]
        deltas = [m["test"][n].get(t, {}).get("retrieval", {}).get(rep, {}).get("settings", {}).get("a", {}).get("delta")
                  for n in names]
        xs = range(len(names))
        for x, d in zip(xs, deltas):
            if d is not None:
                ax.errorbar([x], [d[0]], yerr=[[d[0] - d[1]], [d[2] - d[0]]], fmt="o", capsize=4)
        ax.axhline(0.0, color="grey", lw=0.8)
        ax.set_xticks(list(xs), names)
        ax.set_ylabel("Δ top-1, setting (a)")
        ax.set_title(f"{t}: retrieval change on test ({rep})")
        ax = axes[row][1]
        base = m["generation"]["base"][t]
        ax.scatter([1.0], [base["fraction"]], marker="x", color="black", label="unsteered")
        ratios = [1.0]
        for n in names:
            g = m["generation"][n].get(t)
            if g and g.get("ppl_ratio") is not None:
                ax.scatter([g["ppl_ratio"]], [g["fraction"]], label=n)
                ratios.append(g["ppl_ratio"])
        if max(ratios) / min(ratios) > 10:
            ax.set_xscale("log")
        ax.set_xlabel("held-out perplexity, steered / unsteered")
        ax.set_ylabel(f"fraction of samples in {t}")
        ax.set_title(f"{t}: language steering in generation")
        ax.legend(fontsize=7)
    return fig


CURVE_COLORS = {"experts": "#d62728", "random": "#7f7f7f", "lape": "#1f77b4"}
PPL_CAP = 30.0  # perplexity ratios above it are drawn at it (the report's tables have them all)


def curves_figure(results: dict, targets: list[str]):
    """Per target: forcing against the perplexity ratio (the frontier: right and low is better),
    and forcing against the perturbation size; one line per curve in dose order, Wilson 95 % CIs,
    the methods study's dev-chosen points ringed."""
    from matplotlib.ticker import NullFormatter

    cur = results["curves"]["targets"]
    chosen = (results.get("methods") or {}).get("chosen", {})
    fig, axes = _figure(5.2 * len(targets), 8, len(targets), 2)
    greens = iter(["#2ca02c", "#98df8a", "#17becf", "#bcbd22"])
    colors: dict[str, str] = {}
    for col, t in enumerate(targets):
        base = cur[t]["base"]
        for name, points in cur[t]["curves"].items():
            color = colors.setdefault(name, CURVE_COLORS.get(name) or next(greens, "#000000"))
            f = np.array([p["fraction"] for p in points])
            err = np.abs(np.array([p["ci95"] for p in points]).T - f)
            for ax, x, y, xerr, yerr in ((axes[0][col], f, [min(p["ppl_ratio"], PPL_CAP) for p in points], err, None),
                                         (axes[1][col], [p["perturbation"] for p in points], f, None, err)):
                ax.errorbar(x, y, xerr=xerr, yerr=yerr, color=color, marker="o", ms=4, capsize=2, lw=1.2, label=name)
            mark = [i for i, p in enumerate(points) if is_chosen(p, chosen, t)]
            for i in mark:
                p = points[i]
                axes[0][col].plot(p["fraction"], min(p["ppl_ratio"], PPL_CAP), "o", ms=13, mfc="none", mec="black")
                axes[1][col].plot(p["perturbation"], p["fraction"], "o", ms=13, mfc="none", mec="black")
        axes[0][col].plot(base["fraction"], 1.0, "k*", ms=10, label="unsteered")
        axes[0][col].set_yscale("log")
        axes[0][col].set_xlim(-0.03, 1.03)
        axes[0][col].set_xlabel(f"share of samples in {t} (Wilson 95 % CI)")
        axes[0][col].set_ylabel(f"perplexity ratio on dev (> {PPL_CAP:g} drawn at {PPL_CAP:g})")
        axes[0][col].set_title(f"target {t}: forcing vs fluency (ringed: the study's dev choice)", fontsize=9)
        axes[1][col].set_xscale("log")
        axes[1][col].xaxis.set_minor_formatter(NullFormatter())
        axes[1][col].set_ylim(-0.03, 1.03)
        axes[1][col].set_xlabel("perturbation: Σ_layers ||Δ|| / ||residual||, mean over tokens")
        axes[1][col].set_ylabel(f"share of samples in {t}")
        axes[0][col].legend(fontsize=7)
    return fig

