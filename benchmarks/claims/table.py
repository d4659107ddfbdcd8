"""The claims results as the README's markdown table and one PNG (arm means +- std per claim)."""

from ke_tf.io.report import pyplot, save_figure

ORDER = ("ke", "kd", "ban", "reducenet", "lwm", "ekg", "kc")


def _num(value, scale):
    """Percent points with one decimal; other metrics (losses, variance fractions) with three."""
    return f"{scale * value:.1f}" if scale == 100.0 else f"{value:.3f}"


def _pm(stats, scale):
    return f"{_num(stats['mean'], scale)} ± {_num(stats['std'], scale)}"


def _scale(metric):
    """Accuracies are shown in percent, everything else as is."""
    return 100.0 if "top1" in metric or "acc" in metric or "agreement" in metric else 1.0


def _machine(result):
    m = result.get("machine", {})
    onednn = "oneDNN off" if m.get("TF_ENABLE_ONEDNN_OPTS") == "0" else "oneDNN default"
    return f"{m.get('cpu', '?')} ({m.get('cores', '?')} cores, {onednn}), TF {m.get('tensorflow', '?')}"


def claims_table(results):
    """Markdown: one row per comparison and check, in a fixed claim order."""
    lines = [
        "| method | claim | better arm | control | paired difference (95% lower bound) | seeds won | holds |",
        "|---|---|---|---|---|---|---|",
    ]
    machines = set()
    for name in [n for n in ORDER if n in results["claims"]]:
        r = results["claims"][name]
        machines.add(_machine(r))
        for v in r["verdicts"]:
            better, worse, metric = _parse(v["comparison"])
            s = _scale(metric)
            lines.append(
                f"| {r['title']} | {v['statement']} | {better} {_pm(r['arms'][better][metric], s)} | "
                f"{worse} {_pm(r['arms'][worse][metric], s)} | {'+' if v['mean_diff'] >= 0 else ''}"
                f"{_num(v['mean_diff'], s)} ± {_num(v['std_diff'], s)} "
                f"({'+' if v['lower_bound'] >= 0 else ''}{_num(v['lower_bound'], s)}) | "
                f"{v['seeds_won']}/{len(v['diffs'])} | "
                f"{'yes' if v['holds'] else '**no**'} |"
            )
        for c in r["checks"]:
            lines.append(f"| {r['title']} | {c['name']} | {c['detail']} | | | | {'yes' if c['holds'] else '**no**'} |")
    lines.append("")
    for name in [n for n in ORDER if n in results["claims"]]:
        r = results["claims"][name]
        lines.append(
            f"- {r['title']}: {r['setting']} Budget per seed: {r['budget']} Seeds: "
            f"{', '.join(str(s) for s in r['seeds'])}."
        )
    lines.append(f"- Measured on: {'; '.join(sorted(machines))}.")
    return "\n".join(lines)


def _parse(name):
    """'a vs b (metric)' -> (a, b, metric)."""
    pair, metric = name.rsplit(" (", 1)
    better, worse = pair.split(" vs ")
    return better, worse, metric.rstrip(")")


def claims_plot(results, path):
    """One bar panel per claim: every arm's mean +- std of the first comparison's metric."""
    names = [n for n in ORDER if n in results["claims"]]
    plt = pyplot(path)
    if plt is None or not names:
        return None
    fig, axes = plt.subplots(1, len(names), figsize=(3.2 * len(names), 3.6), squeeze=False)
    for ax, name in zip(axes[0], names):
        r = results["claims"][name]
        metric = _parse(r["verdicts"][0]["comparison"])[2]
        s = _scale(metric)
        arms = list(r["arms"])
        ax.bar(
            range(len(arms)),
            [s * r["arms"][a][metric]["mean"] for a in arms],
            yerr=[s * r["arms"][a][metric]["std"] for a in arms],
            capsize=4,
            color="tab:blue",
        )
        ax.set_xticks(range(len(arms)), arms, rotation=30, ha="right", fontsize=8)
        ax.set_title(r["title"], fontsize=9)
        ax.set_ylabel(metric + (" (%)" if s == 100.0 else ""), fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)
