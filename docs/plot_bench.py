#!/usr/bin/env python3
"""Plot one datapath change's latency against table size (sockmesh, kube-proxy's
iptables and nftables layouts) from `cargo xtask bench`'s report.json."""
import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main(report_path: str, out_path: str) -> None:
    with open(report_path, encoding="utf-8") as f:
        report = json.load(f)
    rows = report.get("scale") or []
    if not rows:
        sys.exit("report has no 'scale' rows")
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for key, label, style in [
        ("sockmesh_p50_us", "sockmesh (xDS publish → kernel map), p50", "o-"),
        ("sockmesh_p99_us", "sockmesh, p99", "o--"),
        ("nftables_p50_us", "kube-proxy nftables layout (nft -f), p50", "s-"),
        ("iptables_p50_us", "kube-proxy iptables layout (iptables-restore --noflush), p50", "^-"),
    ]:
        pts = [(r["services"], r[key] / 1000.0) for r in rows if r.get(key) is not None]
        if pts:
            xs, ys = zip(*pts)
            ax.plot(xs, ys, style, label=label)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("services in the table (10 endpoints each)")
    ax.set_ylabel("one change: latency (ms, log)")
    ax.set_title("Endpoint change latency vs table size (" + report.get("kernel", "") + ")")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_path)
    print(f"plot: {out_path}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
