"""Transcribe the worked examples of docs/spec.md §6 into tests/spec_examples.py.

Run once when the spec changes: python tools/extract_spec_examples.py docs/spec.md
The output is literal data taken from the specification (never from lampe's own code), so the
tests built on it can fail. In the specification, rows after the prompt are tagged "authors D=..."
(the authors' decode rule) and "shifted D=..." (lampe's); the transcription keeps them under the
keys "decode" and "shifted".
"""
import pprint
import re
import sys

NAMES = {"H": "local", "M": "map", "T": "sink", "F": "full"}


def ints(s):
    s = s.strip()
    if s.startswith("["):
        return [int(x) for x in s.strip("[]").split(",") if x.strip()]
    if ".." in s:
        a, b = (int(x) for x in s.split(".."))
        step = 1 if b >= a else -1
        return list(range(a, b + step, step))
    return [int(s)]


def parse_row(text):
    """'4 | H j=0..4 q=4 k=j rel=4..0 | M ...' -> (query, [(name, lo, hi, qpos, kpos, rel)])"""
    parts = [p.strip() for p in text.split("|")]
    query = int(parts[0])
    regions = []
    for part in parts[1:]:
        m = re.match(r"(\w) j=(\S+) q=(-?\d+) k=(\S+) rel=(\S+)$", part)
        if not m:
            raise ValueError(part)
        name, js, q, ks, rels = m.groups()
        keys = ints(js)
        kpos = keys if ks == "j" else ints(ks)
        regions.append((NAMES[name], keys[0], keys[-1], int(q), kpos, ints(rels)))
    return query, regions


def transcribe(text):
    """The content of tests/spec_examples.py for the specification ``text``."""
    out = {}
    for block in re.split(r"\n\*\*Config ", text)[1:]:
        name = block[0]
        head = re.search(r"^L=(\d+) H=(\d+) T=(\d+) U=(\d+)$", block, re.M)
        L, H, T, U = (int(x) for x in head.groups())
        m = [int(x) for x in re.search(r"^m = \[([^\]]*)\]$", block, re.M).group(1).split(",")]
        r = re.search(r"^R=(\d+) b1=(-?\d+) b2=(-?\d+) map_len=(\d+) fallback=(\w+)$", block, re.M)
        ex = {"L": L, "H": H, "T": T, "U": U, "m": m, "R": int(r.group(1)), "b1": int(r.group(2)),
              "b2": int(r.group(3)), "fallback": r.group(5) == "True", "prompt": {}, "decode": {}, "shifted": {}}
        for line in block.splitlines():
            s = line.strip()
            if re.match(r"^\d+ \|", s):
                q, regs = parse_row(s)
                ex["prompt"][q] = regs
            elif s.startswith("prompt rows:"):
                dup = re.search(r"duplicated\(i,j,regions\)=(\[.*\])", s).group(1)
                ex["prefill_duplicates"] = [(int(a), int(b), c) for a, b, c in
                                            re.findall(r"\((\d+), (\d+), '(\w+)'\)", dup)]
            else:
                md = re.match(r"^(authors|shifted) D=(\d+):\s+(.*)$", s)
                if md:
                    key = "shifted" if md.group(1) == "shifted" else "decode"
                    D = int(md.group(2))
                    body = md.group(3)
                    ex[key][D] = "error" if body.startswith("error") else parse_row(body)[1]
        out[name] = ex
    num = re.search(r"```\nrow +0 lse=.*?```", text, re.S).group(0)
    rows = {}
    for line in num.splitlines():
        mm = re.match(r"row\s+(\d+) lse=(\{.*?\}) w=(\{.*?\}) out=\[(.*)\]", line)
        if mm:
            rows[int(mm.group(1))] = {"lse": eval(mm.group(2)), "w": eval(mm.group(3)),
                                      "out": [float(x) for x in mm.group(4).split(",")]}
    return ('"""Worked examples of docs/spec.md §6, transcribed by tools/extract_spec_examples.py."""\n\n'
            + "CONFIGS = " + pprint.pformat(out, width=110, compact=True) + "\n\n"
            + "NUMERIC_ROWS = " + pprint.pformat(rows, width=110) + "\n")


def main(path):
    with open(path, encoding="utf-8") as f:
        text = transcribe(f.read())
    with open("tests/spec_examples.py", "w", encoding="utf-8") as f:
        f.write(text)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "docs/spec.md")
