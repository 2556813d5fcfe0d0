"""Markdown tables from a benchmarks/attention.py or benchmarks/model_step.py JSON:
python benchmarks/table.py RESULTS.json"""

from __future__ import annotations

import json
import sys

SPARSE = ["flex", "fa4-sparse", "triton", "triton-bnhd", "triton-v3", "auto"]
PIPELINE = ["v2-permute", "v2-predict", "v2-attention", "v2-unpermute", "v2-end-to-end", "v2-end-to-end-triton",
            "v1-arm", "v1-end-to-end"]


def tables(report: dict) -> str:
    rows = report["rows"]
    presets = list(dict.fromkeys(r["preset"] for r in rows))
    out = [f"{report['card']}, {report['date']}, torch {report['torch']}, {report['dtype']}, "
           f"FlashAttention-4 {'present' if report['fa4'] else 'absent'}. Times are medians in ms; "
           "the ratio is SDPA cuDNN time / time (higher is faster).", ""]
    for preset in presets:
        mine = [r for r in rows if r["preset"] == preset]
        by = {(r["provider"], r["density"]): r for r in mine}
        cudnn = by[("sdpa-cudnn", 1.0)]["ms"]
        again = by.get(("sdpa-cudnn-again", 1.0))
        spread = f" (again: {again['ms']:.1f})" if again else ""
        out += [f"### {preset}", "", f"Dense: SDPA cuDNN {cudnn:.1f} ms{spread}, SDPA flash "
                f"{by[('sdpa-flash', 1.0)]['ms']:.1f} ms"
                + (f", FA4 {by[('fa4-dense', 1.0)]['ms']:.1f} ms" if ("fa4-dense", 1.0) in by else "") + ".", ""]
        densities = sorted({r["density"] for r in mine if r["provider"] == "triton"}, reverse=True)
        out.append("| density (realized) | " + " | ".join(p for p in SPARSE if any(k[0] == p for k in by)) + " |")
        out.append("|---" * (1 + sum(any(k[0] == p for k in by) for p in SPARSE)) + "|")
        for d in densities:
            realized = by[("triton", d)]["realized"]
            cells = [f"{by[(p, d)]['ms']:.2f} ({cudnn / by[(p, d)]['ms']:.2f}x)" for p in SPARSE if (p, d) in by]
            out.append(f"| {d} ({realized:.3f}) | " + " | ".join(cells) + " |")
        agreement = [by[("flex", d)]["rel_l2_vs_triton"] for d in densities if "rel_l2_vs_triton" in by.get(("flex", d), {})]
        if agreement:
            out += ["", f"FlexAttention's output against ours on the same masks: relative L2 "
                    f"{min(agreement):.4f}-{max(agreement):.4f}."]
        out += ["", "| RainFusion pipeline | density | ms | vs cuDNN |", "|---|---|---|---|"]
        for p in PIPELINE:
            r = next((r for r in mine if r["provider"] == p), None)
            if r:
                out.append(f"| {p} | {r['density']:.3f} | {r['ms']:.2f} | {cudnn / r['ms']:.2f}x |")
        out.append("")
    return "\n".join(out)


def model_tables(report: dict) -> str:
    out = [f"{report['card']}, {report['date']}, torch {report['torch']}, bfloat16, random weights; whole "
           f"schedule = {report['steps']} steps with each method's default dense warm-up.", ""]
    for result in report["models"]:
        rows = result["rows"]
        layers = ", ".join(f"{k} {v}" for k, v in result["layers"].items())
        out += [f"### {result['model']} ({layers}; diffusers {result['diffusers']})", "",
                f"Attention is {100 * result['attention_share']:.0f}% of the dense step.", "",
                "| step | kernel | ms | step speed-up | schedule speed-up (warm-up steps) | mean density |",
                "|---|---|---|---|---|---|"]
        for r in rows:
            speedups = (f"{r['step_speedup']:.2f}x | {r['schedule_speedup']:.2f}x ({r['warmup_steps']})"
                        if "step_speedup" in r else f"{rows[0]['ms'] / r['ms']:.2f}x | -")
            density = f"{r['density']:.3f}" if "density" in r else "-"
            out.append(f"| {r['method']} | {r.get('backend', '-')} | {r['ms']:.1f} | {speedups} | {density} |")
        out.append("")
    return "\n".join(out)


if __name__ == "__main__":
    with open(sys.argv[1]) as f:
        results = json.load(f)
    print(model_tables(results) if "models" in results else tables(results))
