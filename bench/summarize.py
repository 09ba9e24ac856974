#!/usr/bin/env python3
"""Medians per (op, tool) from a side-by-side CSV (op,tool,rep,seconds) and the ratio
strata / qemu-img, as a Markdown table."""
import csv
import statistics
import sys
from collections import defaultdict

times = defaultdict(list)
ops = []
with open(sys.argv[1]) as f:
    for row in csv.DictReader(f):
        times[(row["op"], row["tool"])].append(float(row["seconds"]))
        if row["op"] not in ops:
            ops.append(row["op"])

print("| operation | qemu-img median s | strata median s | ratio strata/qemu-img | runs |")
print("|---|---:|---:|---:|---:|")
for op in ops:
    q = times.get((op, "qemu-img"), [])
    s = times.get((op, "strata"), [])
    if not q or not s:
        continue
    mq, ms = statistics.median(q), statistics.median(s)
    print(f"| {op} | {mq:.3f} | {ms:.3f} | {ms / mq:.2f} | {len(s)} |")
