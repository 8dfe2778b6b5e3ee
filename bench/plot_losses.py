"""Compare runs' training and validation losses from their metrics.jsonl files: a table of the end
figures (last-N-steps mean training loss, last validation loss, relative differences to the first
run) and, with --png, a plot (matplotlib).

    python bench/plot_losses.py runs/a/metrics.jsonl runs/b/metrics.jsonl --labels bf16,fp8 --png out.png
"""

import argparse
import json
import statistics
import sys


def read(path: str) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
    train, val = [], []
    with open(path) as f:
        for line in f:
            r = json.loads(line)
            if r["kind"] == "train":
                train.append((r["step"], r["loss"]))
            elif r["kind"] == "eval":
                val.append((r["step"], r["val_loss"]))
    return train, val


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("metrics", nargs="+")
    p.add_argument("--labels", default=None, help="comma-separated, one per file")
    p.add_argument("--last", type=int, default=10, help="training loss: mean of the last N logged values")
    p.add_argument("--png", default=None)
    a = p.parse_args()
    labels = a.labels.split(",") if a.labels else a.metrics
    runs = [read(m) for m in a.metrics]
    ends = []
    for label, (train, val) in zip(labels, runs):
        end_train = statistics.fmean(loss for _, loss in train[-a.last:])
        end_val = val[-1][1] if val else float("nan")
        ends.append((end_train, end_val))
    print("| run | final train loss (mean of last %d logs) | vs first | final validation loss | vs first |" % a.last)
    print("|---|---|---|---|---|")
    for label, (tr, va) in zip(labels, ends):
        print(f"| {label} | {tr:.4f} | {100 * (tr / ends[0][0] - 1):+.2f}% | {va:.4f} | "
              f"{100 * (va / ends[0][1] - 1):+.2f}% |")
    if a.png:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
        for label, (train, val) in zip(labels, runs):
            ax1.plot([s for s, _ in train], [v for _, v in train], label=label, linewidth=0.8)
            ax2.plot([s for s, _ in val], [v for _, v in val], marker="o", label=label)
        ax1.set(xlabel="step", ylabel="training loss (nats/token)", title="training loss")
        ax2.set(xlabel="step", ylabel="validation log perplexity", title="validation")
        ax1.set_ylim(top=min(ax1.get_ylim()[1], 8))
        for ax in (ax1, ax2):
            ax.grid(alpha=0.3)
            ax.legend()
        fig.tight_layout()
        fig.savefig(a.png, dpi=120)
        print(f"wrote {a.png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
