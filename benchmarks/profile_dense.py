"""One form of the Hopper dense kernel (``dispatch_dense.HOPPER_DENSE_KERNELS``: persistent,
pingpong, tma, wgmma; models get the persistent and ping-pong ones) launched a few times, for
Nsight Compute (sm_90a GPUs).

    ncu --kernel-name regex:dense --launch-skip 2 --launch-count 1 --set full \
        python benchmarks/profile_dense.py FORM N K [TILE_N STAGES]
"""

import sys

import torch
import tvm

from relax_masked_attn.passes.dispatch_dense import HOPPER_DENSE_KERNELS
from relax_masked_attn.targets import device_cuda_target

make = HOPPER_DENSE_KERNELS[sys.argv[1]]
n, k = int(sys.argv[2]), int(sys.argv[3])
tiles = tuple(int(a) for a in sys.argv[4:6]) or None  # None: the kernel's own default
func = make(n, k, "float16", tiles=tiles)
kernel = tvm.compile(tvm.IRModule({"main": func}), target=device_cuda_target())["main"]
x = torch.randn(8192, k, device="cuda", dtype=torch.float16)
w = torch.randn(n, k, device="cuda", dtype=torch.float16)
out = torch.empty(8192, n, device="cuda", dtype=torch.float16)
args = [tvm.runtime.from_dlpack(t) for t in (x, w, out)]
for _ in range(5):
    kernel(*args)
torch.cuda.synchronize()
