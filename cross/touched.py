"""Counts the code of a binary that ran, from qemu -d in_asm logs: distinct 4-KB
pages and 64-KB windows (the kernel maps file pages around each fault in windows
of that size, so the windows touched bound the code that becomes resident)."""
import re, subprocess, sys
binary, logs = sys.argv[1], sys.argv[2:]
text = None
for line in subprocess.run(["readelf", "-SW", binary], capture_output=True, text=True).stdout.splitlines():
    m = re.search(r"\]\s+\.text\s+\S+\s+([0-9a-f]+)\s+[0-9a-f]+\s+([0-9a-f]+)", line)
    if m:
        text = (int(m.group(1), 16), int(m.group(1), 16) + int(m.group(2), 16))
if text is None:
    sys.exit(f"touched.py: {binary} has no .text section")
insn = re.compile(r"^0x([0-9a-f]+):")
pages = set()
for log in logs:
    for line in open(log):
        m = insn.match(line)
        if m and text[0] <= int(m.group(1), 16) < text[1]:
            pages.add(int(m.group(1), 16) >> 12)
windows = {p >> 4 for p in pages}
size = text[1] - text[0]
print(f"{binary}: .text {size / 2**20:.1f} MB; code that ran: {len(pages)} pages of 4 KB "
      f"({len(pages) * 4 / 1024:.1f} MB) in {len(windows)} windows of 64 KB ({len(windows) / 16:.1f} MB)")
