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
    graphs: dict[str, list[tuple[str, dict[str, tuple[str, str]]]]] = defaultdict(list)
    for path in sorted(root.glob("keys-*.log")):
        for parts in blocks(path):
            if "gm" in parts:
                graphs[parts["gm"][0]].append((path.name, parts))
    alone = defaultdict(int)  # graphs one process alone traced: their code differs, not a setting
    for gm, seen in graphs.items():
        if len({name for name, _ in seen}) == 1:
            alone[seen[0][0]] += 1
            continue
        names = {p for _, parts in seen for p in parts}
        differ = sorted(p for p in names if len({parts.get(p, ("-",))[0] for _, parts in seen}) > 1)
        print(f"graph {gm}: {len(seen)} lookups in {len({n for n, _ in seen})} processes; differing parts: {differ}")
        for part in differ:
            for name, parts in seen:
                print(f"    {part} in {name}: {parts.get(part, ('-', 'absent'))[1]}")
    for name, count in sorted(alone.items()):
        print(f"{count} graphs only {name} traced")
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1])))
