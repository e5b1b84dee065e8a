#!/usr/bin/env python3
"""Prints the module dependency graph of vmm/src (which module names which, through
`crate::...` paths outside #[cfg(test)] code) and any cycle among its modules.
Usage: resources/scripts/module-deps.py [--check]   (--check: exit 1 on a cycle)"""
import os, re, sys

ROOT = os.environ.get("VMM_SRC") or os.path.join(os.path.dirname(__file__), "..", "..", "vmm", "src")

def module_of(path):
    rel = os.path.relpath(path, ROOT)[:-3]
    parts = rel.split(os.sep)
    if parts[-1] == "mod":
        parts = parts[:-1]
    return "::".join(parts) or "lib"

def production(text):
    # Drop `#[cfg(test)] mod tests { ... }` blocks (they start a line; to the end).
    m = re.search(r"^#\[cfg\(test\)\]\s*\nmod tests", text, re.M)
    return text[: m.start()] if m else text

mods = {}
for dirpath, _, files in os.walk(ROOT):
    for f in files:
        if f.endswith(".rs") and f not in ("tests.rs", "testing.rs", "fuzzing.rs"):
            p = os.path.join(dirpath, f)
            mods[module_of(p)] = production(open(p).read())

def resolve(target):
    parts = target.split("::")
    while parts and "::".join(parts) not in mods:
        parts.pop()
    return "::".join(parts) if parts else None

edges = {m: set() for m in mods}
for m, text in mods.items():
    for use in re.findall(r"crate::((?:[a-z_0-9]+::)*[a-z_0-9]+)", text):
        t = resolve(use)
        if t and t != m and not m.startswith(t + "::") and not t.startswith(m + "::"):
            edges[m].add(t)
    # `use crate::a::{b, c}` forms
    for base, inner in re.findall(r"crate::((?:[a-z_0-9]+::)*)\{([^}]*)\}", text):
        for item in inner.split(","):
            item = item.strip().split("::")[0]
            t = resolve((base + item).strip(":"))
            if t and t != m and not m.startswith(t + "::") and not t.startswith(m + "::"):
                edges[m].add(t)

cycles = []
def visit(node, stack, seen):
    for nxt in sorted(edges[node]):
        if nxt in stack:
            cycles.append(stack[stack.index(nxt):] + [nxt])
        elif nxt not in seen:
            seen.add(nxt)
            visit(nxt, stack + [nxt], seen)

for m in sorted(edges):
    visit(m, [m], {m})
for m in sorted(edges):
    if edges[m]:
        print(f"{m} -> {', '.join(sorted(edges[m]))}")
unique = {tuple(sorted(set(c))) : c for c in cycles}
for c in unique.values():
    print("cycle: " + " -> ".join(c))
if "--check" in sys.argv and unique:
    sys.exit(1)
