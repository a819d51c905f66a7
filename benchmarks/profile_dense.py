"""The Hopper dense kernel that models get (``DispatchDense.HOPPER_DENSE``: the persistent form
of the warp-specialized TMA kernel) launched a few times, for Nsight Compute (sm_90a GPUs).

    ncu --kernel-name regex:dense --launch-skip 2 --launch-count 1 --set full \
        python benchmarks/profile_dense.py N K [TILE_N STAGES]
"""

import sys

import torch
import tvm

from relax_masked_attn.passes.dispatch_dense import HOPPER_DENSE
from relax_masked_attn.targets import device_cuda_target

n, k = int(sys.argv[1]), int(sys.argv[2])
tiles = tuple(int(a) for a in sys.argv[3:5]) or None  # None: the kernel's own default
func = HOPPER_DENSE(n, k, "float16", tiles=tiles)
kernel = tvm.compile(tvm.IRModule({"main": func}), target=device_cuda_target())["main"]
x = torch.randn(8192, k, device="cuda", dtype=torch.float16)
w = torch.randn(n, k, device="cuda", dtype=torch.float16)
out = torch.empty(8192, n, device="cuda", dtype=torch.float16)
args = [tvm.runtime.from_dlpack(t) for t in (x, w, out)]
for _ in range(5):
    kernel(*args)
torch.cuda.synchronize()
