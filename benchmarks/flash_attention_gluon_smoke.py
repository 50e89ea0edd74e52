"""First runs of the Gluon forward on a GPU, from the smallest case up, each in its own process with a time limit:
a hung barrier (a wrong mbarrier phase) costs seconds instead of a whole device call, and the first case that fails
says where to look (one key tile; the ring wrapping; both halves of a query tile; causal; D = 128; GQA; configs).

    python -m benchmarks.flash_attention_gluon_smoke            # an sm_90 GPU; prints one JSON line per case
    python -m benchmarks.flash_attention_gluon_smoke --quick    # six: causal at both head dims, GQA, split, ping-pong

Each line: the case, "ok" / "wrong" / "hung" / "error", the largest difference to ``kernels.reference`` and, for a
wrong output, which 64-row halves and which key tiles' rows differ.
"""
from __future__ import annotations

import json
import subprocess
import sys

#: (B, Hq, Hkv, Sq, Skv, D, causal, config), smallest first
CASES = [(1, 1, 1, 128, 128, 64, False, {}), (1, 1, 1, 128, 256, 64, False, {}), (1, 1, 1, 128, 512, 64, False, {}),
         (1, 2, 2, 256, 512, 64, False, {}), (1, 1, 1, 128, 128, 64, True, {}), (1, 1, 1, 256, 512, 64, True, {}),
         (1, 1, 1, 128, 256, 128, False, {}), (2, 8, 8, 1024, 1024, 128, True, {}), (1, 16, 4, 384, 1024, 64, True, {}),
         (1, 2, 2, 512, 512, 128, True, dict(STAGES=3)),
         (1, 2, 2, 512, 512, 128, True, dict(BLOCK_N=64)), (1, 2, 2, 512, 512, 128, True, dict(SPLIT_MASK=True)),
         (1, 2, 1, 512, 640, 64, True, dict(SPLIT_MASK=True, FMA_SOFTMAX=True, HEAVY_FIRST=True)),
         (1, 2, 2, 512, 512, 128, False, dict(FMA_SOFTMAX=True)), (1, 1, 1, 128, 128, 64, False, dict(PINGPONG=True)),
         (1, 2, 2, 512, 512, 128, False, dict(PINGPONG=True)), (1, 16, 4, 384, 1024, 64, True, dict(PINGPONG=True)),
         (1, 1, 1, 128, 128, 64, False, dict(PERSISTENT=True)),
         (1, 2, 2, 512, 512, 128, True, dict(PERSISTENT=True, SPLIT_MASK=True, HEAVY_FIRST=True)),
         (4, 16, 4, 1024, 1024, 64, True, dict(PERSISTENT=True)),
         (2, 16, 4, 1024, 1024, 64, True, dict(PERSISTENT=True, PINGPONG=True, HEAVY_FIRST=True)),
         (2, 8, 8, 1024, 1024, 64, True, dict(BLOCK_N=64, consumer_regs=104, maxnreg=80))]

CHILD = """
import json, sys, torch
import kernels.reference
from kernels import flash_attention_gluon as fg
B, Hq, Hkv, Sq, Skv, D, causal, config = json.loads(sys.argv[1])
g = torch.Generator(device="cuda").manual_seed(0)
q = torch.randn(B, Hq, Sq, D, device="cuda", dtype=torch.bfloat16, generator=g)
k = torch.randn(B, Hkv, Skv, D, device="cuda", dtype=torch.bfloat16, generator=g)
v = torch.randn(B, Hkv, Skv, D, device="cuda", dtype=torch.bfloat16, generator=g)
out = fg.flash_attention_gluon(q, k, v, causal=causal, config=config)
torch.cuda.synchronize()
want = kernels.reference.attention(q, k, v, causal=causal)
diff = (out.float() - want.float()).abs()
bad = diff.amax(dim=(0, 1, 3)) > 0.05                       # per query row
halves = sorted({int(r) // 64 % 2 for r in bad.nonzero().flatten().tolist()})
print(json.dumps(dict(max_diff=float(diff.max()), nan=bool(out.isnan().any()), bad_rows=int(bad.sum()),
                      rows=Sq, bad_halves=halves, first_bad_row=int(bad.nonzero()[0]) if bad.any() else None)))
"""


QUICK = [CASES[5], CASES[7], CASES[8], CASES[12], CASES[15], CASES[16], CASES[17], CASES[19], CASES[20]]


def main(quick: bool = False) -> int:
    """The number of cases that failed (every case, with one line saying why, where the kernel cannot run here)."""
    from kernels.flash_attention_gluon import gluon_status

    why = gluon_status()
    if why is not None:
        print(f"the Gluon kernel cannot run here: {why}")
        return len(QUICK if quick else CASES)
    failures = 0
    for case in QUICK if quick else CASES:
        try:
            done = subprocess.run([sys.executable, "-c", CHILD, json.dumps(case)], capture_output=True, text=True,
                                  timeout=60)
        except subprocess.TimeoutExpired:
            print(json.dumps(dict(case=case, status="hung")), flush=True)
            failures += 1
            continue
        if done.returncode:
            print(json.dumps(dict(case=case, status="error", stderr=done.stderr[-1500:])), flush=True)
            failures += 1
            continue
        got = json.loads(done.stdout.strip().splitlines()[-1])
        ok = got["bad_rows"] == 0 and not got["nan"]
        failures += not ok
        print(json.dumps(dict(case=case, status="ok" if ok else "wrong", **got)), flush=True)
    return failures


if __name__ == "__main__":
    sys.exit(1 if main(quick="--quick" in sys.argv[1:]) else 0)
