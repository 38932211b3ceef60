"""Which parts of Inductor's FX-graph cache key differ between processes, for the same graph.

Reads the logs `ray_vs_serve.sh` has each process write with R26_KEYS=1 (torch's "FX graph cache
hash details" debug lines, one `[hash] part: value` line per part of the key; named
keys-PID-serve.log and keys-PID-ray.log) and prints, for every graph (its `gm` part), the parts
whose hashes differ between the serve worker's n-th lookup of it and each Ray process's n-th.
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
        serve = sorted(name for name in by_log if name.endswith("-serve.log"))
        if not serve or len(by_log) < 2:
            print(f"graph {gm}: traced by {', '.join(sorted(by_log))} alone")
            continue
        for other in sorted(name for name in by_log if name != serve[0]):
            for n, (a, b) in enumerate(zip(by_log[serve[0]], by_log[other], strict=False)):
                differ = sorted(p for p in set(a) | set(b) if a.get(p, ("-",))[0] != b.get(p, ("-",))[0])
                print(f"graph {gm}, lookup {n}: {serve[0]} against {other}: differing parts {differ or 'none'}")
                for part in differ[:8]:
                    print(f"    {part}: {a.get(part, ('-', 'absent'))[1]!r} / {b.get(part, ('-', 'absent'))[1]!r}")
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python3 scripts/gpu/keydiff.py DIR (the keys-PID-serve.log and keys-PID-ray.log files)")
    sys.exit(main(Path(sys.argv[1])))
