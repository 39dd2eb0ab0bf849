"""Pivot the records of one or more ``bench_models.py --json`` runs into the init comparison table.

    python benchmarks/models_table.py RUN1.json RUN2.json ...        # markdown table + target checks
    python benchmarks/models_table.py RUN*.json --json table.json    # the same, machine-readable

Each row is one (bit width / group size, method). Its two perplexity columns are the method's
reference start (min-max for RTN and GPTQ, the shrink search for decoupleQ) and NeUQI's start,
read from records of the same calibration / evaluation budget; ``ratio`` is NeUQI over the
reference start. UniQuanF has one start (its own unified initialisation) and fills the first column.
Rows with distillation are listed apart. The checks under the table are issue 12's targets:
NeUQI at or below the reference start for every method at 2 and 3 bits, GPTQ + NeUQI at W2 g64 at
most 0.1x min-max GPTQ, and the best W2 g64 perplexity at most 2x full precision.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_models import config_label, method_label  # noqa: E402

REFERENCE_INIT = {"rtn": "minmax", "gptq": "minmax", "decoupleq": "shrink"}
METHOD_ORDER = [("rtn", False), ("gptq", False), ("decoupleq", False), ("decoupleq", True), ("uniquanf", False)]
BUDGET_KEYS = ("num_samples", "seq_len", "eval_windows", "eval_seq_len", "full_eval")


def read_records(paths):
    """All successful records of the given files; every file must share one calibration / eval budget."""
    records, budgets = [], set()
    for path in paths:
        data = json.loads(Path(path).read_text())
        for rec in data if isinstance(data, list) else data.get("records", []):
            if rec.get("ppl") is None:
                continue
            if rec["method"] != "fp":
                budgets.add(tuple(rec.get(k) for k in BUDGET_KEYS))
            records.append(rec)
    if len(budgets) > 1:
        raise SystemExit(f"records mix calibration/evaluation budgets {sorted(budgets)}: pass runs of one budget")
    return records


def pivot(records):
    """Rows keyed by (bits, group_size, method, blockwise, distill_steps, block-tuning epochs) with
    'reference' / 'neuqi' cells."""
    rows = {}
    for rec in records:
        if rec["method"] == "fp":
            continue
        epochs = rec.get("bt_epochs") if rec["blockwise"] else None
        key = (rec["bits"], rec["group_size"], rec["method"], bool(rec["blockwise"]), rec.get("distill_steps") or 0,
               epochs)
        init = rec.get("init")
        column = "neuqi" if init == "neuqi" else (
            "reference" if rec["method"] == "uniquanf" or init == REFERENCE_INIT.get(rec["method"]) else None)
        if column is not None:
            rows.setdefault(key, {})[column] = rec
    return rows


def cell(rec):
    return None if rec is None else dict(ppl=rec["ppl"], bits_per_weight=rec.get("bits_per_weight"),
                                         seconds=rec.get("seconds"), init=rec.get("init"))


def build(records):
    fp = [r["ppl"] for r in records if r["method"] == "fp"]
    fp_ppl = fp[0] if fp else None
    rows = pivot(records)
    configs = sorted({(k[0], k[1]) for k in rows}, key=lambda c: (c[0], c[1] if c[1] > 0 else 10**9))
    table = []
    for bits, gs in configs:
        for distill in sorted({k[4] for k in rows if k[:2] == (bits, gs)}):
            for method, bt in METHOD_ORDER:
                keys = sorted((k for k in rows if k[:5] == (bits, gs, method, bt, distill)),
                              key=lambda k: k[5] or 0)
                for key in keys:
                    got = rows[key]
                    ref, neu = cell(got.get("reference")), cell(got.get("neuqi"))
                    table.append(dict(bits=bits, group_size=gs, method=method, blockwise=bt, distill_steps=distill,
                                      bt_epochs=key[5], reference=ref, neuqi=neu,
                                      ratio=(neu["ppl"] / ref["ppl"]) if ref and neu else None))
    return fp_ppl, table


def checks(fp_ppl, table):
    out = []
    for row in table:
        if row["bits"] <= 3 and row["ratio"] is not None and row["distill_steps"] == 0:
            out.append(dict(target=f"NeUQI <= reference start, {config_label(row['bits'], row['group_size'])} "
                                   f"{method_label(row['method'], row['blockwise'])}",
                            value=row["ratio"], bound=1.0, met=row["ratio"] <= 1.0))
    gptq = [r for r in table if (r["bits"], r["group_size"], r["method"], r["distill_steps"]) == (2, 64, "gptq", 0)]
    if gptq and gptq[0]["ratio"] is not None:
        out.append(dict(target="GPTQ + NeUQI / min-max GPTQ at W2 g64", value=gptq[0]["ratio"], bound=0.1,
                        met=gptq[0]["ratio"] <= 0.1))
    w2g64 = [c["ppl"] for r in table if (r["bits"], r["group_size"]) == (2, 64)
             for c in (r["reference"], r["neuqi"]) if c]
    if w2g64 and fp_ppl:
        best = min(w2g64) / fp_ppl
        out.append(dict(target="best W2 g64 / full precision", value=best, bound=2.0, met=best <= 2.0))
    return out


def fmt(c):
    if c is None:
        return "", "", ""
    bpw = "" if c["bits_per_weight"] is None else f"{c['bits_per_weight']:.2f}"
    return f"{c['ppl']:.2f}", bpw, f"{c['seconds']:.0f}"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", type=Path, help="JSON files written by bench_models.py --json")
    p.add_argument("--json", type=Path, default=None, help="also write the table and checks here")
    args = p.parse_args(argv)
    records = read_records(args.runs)
    fp_ppl, table = build(records)
    print(f"full precision: {fp_ppl:.2f}" if fp_ppl else "full precision: (no fp record)")
    print("| config | method | tuning epochs | distill | ref. start | ppl | NeUQI ppl | NeUQI / ref. | bits/weight "
          "| s (ref.) | s (NeUQI) |")
    print("|---|---|---:|---:|---|---:|---:|---:|---:|---:|---:|")
    for row in table:
        rp, rb, rs = fmt(row["reference"])
        npl, nb, ns = fmt(row["neuqi"])
        ref_name = "unified" if row["method"] == "uniquanf" else REFERENCE_INIT[row["method"]]
        ratio = "" if row["ratio"] is None else f"{row['ratio']:.3f}"
        print(f"| {config_label(row['bits'], row['group_size'])} | {method_label(row['method'], row['blockwise'])} | "
              f"{row['bt_epochs'] or ''} | {row['distill_steps'] or ''} | {ref_name} | {rp} | {npl} | {ratio} | {rb or nb} | {rs} | {ns} |")
    found = checks(fp_ppl, table)
    print()
    for c in found:
        print(f"{'met   ' if c['met'] else 'MISSED'} {c['target']}: {c['value']:.3f} (bound {c['bound']:g})")
    if args.json is not None:
        args.json.write_text(json.dumps(dict(fp_ppl=fp_ppl, rows=table, checks=found), indent=1))


if __name__ == "__main__":
    main()
