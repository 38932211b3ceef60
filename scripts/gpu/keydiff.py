"""Which parts of Inductor's FX-graph cache key differ between processes, for the same graph.

Reads the logs `ray_vs_serve.sh` has each process write with R26_KEYS=1 (torch's "FX graph cache
hash details" debug lines: one `[hash] part: value` line per part of the key) and prints, for every
graph (its `gm` part) seen under more than one key, the parts whose hashes differ.
    python3 scripts/gpu/keydiff.py DIR
"""

from __future__ import annotations

import re
import sys
from collections import defaultdict
from pathlib import Path

PART = re.compile(r"^\[(\w+)\] ([\w\[\]\.]+): ?(.*)")


def blocks(path: Path) -> list[dict[str, tuple[str, str]]]:
    """Each key's parts in one log: {part: (hash, first line of its value)}."""
    out: list[dict[str, tuple[str, str]]] = []
    for line in path.read_text(errors="replace").splitlines():
        if line.startswith("FX graph cache hash details for key"):
            out.append({})
        elif out and (m := PART.match(line)):
            out[-1].setdefault(m[2], (m[1], m[3][:160]))
    return out


def main(root: Path) -> int:
    # {graph: {process log: [parts of each lookup, in order]}}
    graphs: dict[str, dict[str, list[dict[str, tuple[str, str]]]]] = defaultdict(lambda: defaultdict(list))
    for path in sorted(root.glob("keys-*.log")):
        for parts in blocks(path):
            if "gm" in parts:
                graphs[parts["gm"][0]][path.name].append(parts)
    for gm, by_log in graphs.items():
        logs = sorted(by_log)
        if len(logs) < 2:
            print(f"graph {gm}: traced by {logs[0]} alone")
            continue
        first, other = by_log[logs[0]], by_log[logs[1]]  # the n-th lookup of one against the other's n-th
        for n, (a, b) in enumerate(zip(first, other, strict=False)):
            differ = sorted(p for p in set(a) | set(b) if a.get(p, ("-",))[0] != b.get(p, ("-",))[0])
            print(f"graph {gm}, lookup {n}: {logs[0]} against {logs[1]}: differing parts {differ or 'none'}")
            for part in differ[:8]:
                print(f"    {part}: {a.get(part, ('-', 'absent'))[1]!r} / {b.get(part, ('-', 'absent'))[1]!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1])))
