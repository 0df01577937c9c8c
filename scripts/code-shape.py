#!/usr/bin/env python3
"""Prints the shape figures of the Rust sources: the largest files, the longest functions, and the library's
public items (declarations marked `pub` that are reachable from host/src/lib.rs through `pub mod` or `pub use`).

Usage: python3 scripts/code-shape.py [ROOT]   (ROOT defaults to the repository this script is in)
Functions are measured from their `fn` line to the closing brace at the same indentation (rustfmt layout)."""
import os, re, sys

root = sys.argv[1] if len(sys.argv) > 1 else os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
skip = {"target", ".git", "node_modules"}
files = []
for top in ["host", "guest-sdk", "tests", "bench", "fixtures", "fuzz"]:
    for dirpath, dirnames, filenames in os.walk(os.path.join(root, top)):
        dirnames[:] = [d for d in dirnames if d not in skip]
        files += [os.path.join(dirpath, f) for f in filenames if f.endswith(".rs")]

fn_re = re.compile(r"^(\s*)(pub(\([^)]*\))?\s+)?(const\s+)?(async\s+)?(unsafe\s+)?(extern\s+\"C\"\s+)?fn\s+(\w+)")
sizes, fns = [], []
for path in files:
    lines = open(path, encoding="utf-8").read().split("\n")
    rel = os.path.relpath(path, root)
    sizes.append((len(lines) - 1, rel))
    for i, line in enumerate(lines):
        m = fn_re.match(line)
        if not m:
            continue
        indent = m.group(1)
        for j in range(i, len(lines)):
            if lines[j].rstrip().endswith(";") and j == i:
                break  # a declaration without a body
            if j > i and lines[j] == indent + "}":
                fns.append((j - i + 1, f"{rel}:{i + 1} {m.group(8)}"))
                break

print("largest files:")
for n, rel in sorted(sizes, reverse=True)[:8]:
    print(f"  {n:5} {rel}")
print("longest functions:")
for n, where in sorted(fns, reverse=True)[:8]:
    print(f"  {n:5} {where}")
print(f"functions over 80 lines: {sum(1 for n, _ in fns if n > 80)}")

# Public items reachable from the library root.
src = os.path.join(root, "host", "src")
item_re = re.compile(r"^\s*pub\s+(async\s+)?(fn|struct|enum|trait|type|const|static|mod|use)\b")
def module_file(parent_dir, name):
    for candidate in (os.path.join(parent_dir, name + ".rs"), os.path.join(parent_dir, name, "mod.rs")):
        if os.path.exists(candidate):
            return candidate
    return None
count, seen = 0, set()
def walk(path, is_root):
    global count
    if path in seen:
        return
    seen.add(path)
    here = os.path.dirname(path) if is_root or path.endswith("mod.rs") else os.path.splitext(path)[0]
    in_tests = False
    lines = open(path, encoding="utf-8").read().split("\n")
    for i, line in enumerate(lines):
        if re.match(r"^#\[cfg\(test\)\]", line):
            following = next((l for l in lines[i + 1 :] if not l.startswith("#[")), "")
            # An inline test module ends the file's public items; `mod tests;` (a file of its own) does not.
            in_tests = in_tests or not following.rstrip().endswith(";")
        if in_tests:
            continue
        reexport = re.match(r"^\s*pub\s+use\s+(\w+)::(\w+);", line)
        if reexport:
            # A module re-exported from a private one (`pub use raw::defaults;`): count its items as well.
            inner = module_file(here, reexport.group(1))
            if inner:
                text = open(inner, encoding="utf-8").read()
                block = re.search(r"(?ms)^pub mod " + reexport.group(2) + r" \{\n(.*?)^\}", text)
                if block:
                    count += sum(1 for l in block.group(1).split("\n") if item_re.match(l))
        m = item_re.match(line)
        if m:
            if m.group(2) == "mod":
                name = re.match(r"^\s*pub\s+mod\s+(\w+)", line).group(1)
                child = module_file(here, name)
                if child and line.strip().endswith(";"):
                    walk(child, False)
            count += 1
walk(os.path.join(src, "lib.rs"), True)
print(f"public items of the library: {count}")
