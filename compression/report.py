"""Summaries of an artifact's manifest, as data and as text tables (compress and inspect share them)."""

from __future__ import annotations


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    raise AssertionError


def summarize(manifest: dict, path: str | None = None) -> dict:
    branches = list(manifest["branches"])
    tensors = []
    errors: dict[str, list[float]] = {b: [] for b in branches}
    for name, spec in manifest["tensors"].items():
        row = {"name": name, "shape": spec["shape"], "kind": spec["kind"]}
        if spec["kind"] == "compressed":
            row["residual"] = spec["residual"]
            row["rank"] = spec["rank"]
            row["ranks"] = {b: spec["branches"][b].get("rank", spec["rank"]) for b in branches}
            row["error"] = {b: spec["branches"][b]["error"] for b in branches}
            row["residual_error"] = {b: spec["branches"][b]["residual_error"] for b in branches}
            for b in branches:
                errors[b].append(spec["branches"][b]["error"])
        tensors.append(row)
    sizes = manifest["sizes"]
    return {
        "path": path,
        "architecture": manifest["architecture"],
        "dtype": manifest["dtype"],
        "compression": manifest["compression"],
        "branches": [
            {
                "name": b,
                "source": manifest["branches"][b]["source"],
                "stored_bytes": sizes["branches"][b],
                "mean_error": sum(errors[b]) / len(errors[b]) if errors[b] else 0.0,
                "max_error": max(errors[b], default=0.0),
            }
            for b in branches
        ],
        "trunk_bytes": sizes["trunk"],
        "shared_bytes": sizes["shared"],
        "artifact_bytes": sizes["artifact"],
        "inputs_bytes": sizes["inputs"],
        "ratio": sizes["artifact"] / sizes["inputs"] if sizes["inputs"] else None,
        "tensors": tensors,
    }


def text_table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    return "\n".join(lines)


def format_summary(s: dict) -> str:
    c = s["compression"]
    setting = f"rank {c['rank']}" if c.get("rank") is not None else f"rate {c['rate']}"
    if c.get("allocation") == "gain":
        setting += " (ranks allocated by gain)"
    head = f"{s['architecture']}, {s['dtype']}, {setting}, backend {c['backend']} on {c['device']}, seed {c['seed']}"
    rows = [
        [b["name"], human_bytes(b["stored_bytes"]), f"{b['mean_error']:.4f}", f"{b['max_error']:.4f}"]
        for b in s["branches"]
    ]
    table = text_table(["branch", "stored", "mean rel. error", "max rel. error"], rows)
    ratio = f"{s['ratio']:.3f}" if s["ratio"] is not None else "n/a"
    totals = (
        f"trunk {human_bytes(s['trunk_bytes'])}, shared {human_bytes(s['shared_bytes'])}; "
        f"artifact {human_bytes(s['artifact_bytes'])} vs inputs {human_bytes(s['inputs_bytes'])} "
        f"({ratio}x)"
    )
    if "svd_seconds" in c:
        other = c["seconds"] - c["read_seconds"] - c["svd_seconds"] - c["write_seconds"]
        totals += (f"\ntime {c['seconds']:.1f} s: read {c['read_seconds']:.1f} s, rSVD {c['svd_seconds']:.1f} s, "
                   f"write {c['write_seconds']:.1f} s, other math {other:.1f} s")
    return f"{head}\n{table}\n{totals}"


def format_tensors(s: dict) -> str:
    names = [b["name"] for b in s["branches"]]
    rows = []
    for t in s["tensors"]:
        if t["kind"] != "compressed":
            rows.append([t["name"], "x".join(map(str, t["shape"])), t["kind"], "", *([""] * len(names))])
            continue
        rows.append(
            [
                t["name"],
                "x".join(map(str, t["shape"])),
                t["residual"],
                ("/".join(str(r) for r in t["ranks"].values()) if len(set(t["ranks"].values())) > 1
                 else str(t["rank"])) if t["residual"] == "lowrank" else "",
                *(f"{t['error'][b]:.4f}" for b in names),
            ]
        )
    return text_table(["tensor", "shape", "stored as", "rank", *(f"err {b}" for b in names)], rows)
