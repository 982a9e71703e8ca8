"""Turns qemu -d in_asm logs of an unstripped binary into an lld symbol ordering
file: every function that ran, in the order it first ran."""
import bisect, re, subprocess, sys
binary, out, logs = sys.argv[1], sys.argv[2], sys.argv[3:]
syms = []
for line in subprocess.run(["nm", "-S", "-n", "--defined-only", binary], capture_output=True, text=True).stdout.splitlines():
    f = line.split()
    # ARM's mapping symbols ($a, $t, $d, $x and their numbered forms) mark where
    # code and data start inside functions; every object has them, so one in the
    # list would give its priority to every section (lld orders sections by the
    # symbols they define) and stop the ordering there.
    if f and f[-1].startswith("$"):
        continue
    if len(f) == 4 and f[2] in "tTwW":
        syms.append((int(f[0], 16), int(f[1], 16), f[3]))
    elif len(f) == 3 and f[1] in "tTwW":
        syms.append((int(f[0], 16), 0, f[2]))
starts = [s[0] for s in syms]
tb = re.compile(r"^0x([0-9a-f]+):")
seen, order, unknown = set(), [], 0
for log in logs:
    for line in open(log):
        m = tb.match(line)
        if not m:
            continue
        a = int(m.group(1), 16)
        i = bisect.bisect_right(starts, a) - 1
        # Symbols without a size (assembly kernels) reach to the next symbol.
        end = syms[i][0] + syms[i][1] if i >= 0 and syms[i][1] else (starts[i + 1] if i + 1 < len(starts) else 0)
        if i < 0 or a >= end:
            unknown += 1
            continue
        name = syms[i][2]
        if name not in seen:
            seen.add(name)
            order.append(name)
size = sum(s[1] for s in syms if s[2] in seen)
open(out, "w").write("".join(n + "\n" for n in order))
print(f"{len(order)} functions ran ({size/1024:.0f} KiB of code); {unknown} blocks outside known symbols", file=sys.stderr)
