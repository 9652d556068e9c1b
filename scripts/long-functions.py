#!/usr/bin/env python3
"""Lists Rust functions longer than a limit (default 80 lines), tests excluded:
`scripts/long-functions.py [LIMIT] [PATH...]`. Exits 1 when any is found."""
import re, sys, pathlib

limit = int(sys.argv[1]) if len(sys.argv) > 1 and sys.argv[1].isdigit() else 80
roots = [a for a in sys.argv[1:] if not a.isdigit()] or ["src", "crates"]
found = 0
for root in roots:
    for path in sorted(pathlib.Path(root).rglob("*.rs")):
        lines = path.read_text().splitlines()
        in_tests = False
        i = 0
        while i < len(lines):
            line = lines[i]
            if re.match(r"\s*#\[cfg\(test\)\]", line):
                in_tests = True
            m = re.match(r"(\s*)(pub(\([^)]*\))? )?(const )?(unsafe )?(async )?fn (\w+)", line)
            if m and not in_tests and not line.rstrip().endswith(";"):
                indent = len(m.group(1))
                start = i
                # the body ends at the first line at the same indent that is `}`
                j = i
                while j < len(lines) and not (lines[j].startswith(" " * indent + "}") and len(lines[j]) - len(lines[j].lstrip()) == indent):
                    j += 1
                n = j - start + 1
                if n > limit:
                    print(f"{path}:{start + 1}: {m.group(7)} {n} lines")
                    found += 1
                i = j
            i += 1
sys.exit(1 if found else 0)
