"""One dense kernel launched a few times, for Nsight Compute: a form of the Hopper kernel
(``dispatch_dense.HOPPER_DENSE_KERNELS``: persistent, pingpong, tma, wgmma; models get the
persistent and ping-pong ones), the ``mma.sync`` kernel (``mma``: what sm_80-class GPUs get,
built for plain ``sm_90`` here) or cuBLAS through ``torch.nn.functional.linear`` (``torch``).

    ncu --kernel-name regex:'dense|nvjet|gemm' --launch-skip 2 --launch-count 1 --set full \
        python benchmarks/profile_dense.py FORM N K [TILES...]

``TILES`` overrides the kernel's tiles: (columns, stages) for the Hopper forms, (rows, columns,
k-step, warps along m, warps along n, stages) for ``mma``.
"""

import sys

import torch
import tvm

from relax_masked_attn.kernels import cuda_dense
from relax_masked_attn.passes.dispatch_dense import HOPPER_DENSE_KERNELS
from relax_masked_attn.targets import device_cuda_target

form = sys.argv[1]
n, k = int(sys.argv[2]), int(sys.argv[3])
tiles = tuple(int(a) for a in sys.argv[4:]) or None  # None: the kernel's own default
x = torch.randn(8192, k, device="cuda", dtype=torch.float16)
w = torch.randn(n, k, device="cuda", dtype=torch.float16)
out = torch.empty(8192, n, device="cuda", dtype=torch.float16)
if form == "torch":
    def launch():
        torch.matmul(x, w.t(), out=out)
else:
    if form == "mma":
        func = cuda_dense.dense_kernel(n, k, "float16", tiles=tiles)
        target = tvm.target.Target({**dict(device_cuda_target().export()), "arch": "sm_90"})
    else:
        func = HOPPER_DENSE_KERNELS[form](n, k, "float16", tiles=tiles)
        target = device_cuda_target()
    kernel = tvm.compile(tvm.IRModule({"main": func}), target=target)["main"]
    args = [tvm.runtime.from_dlpack(t) for t in (x, w, out)]

    def launch():
        kernel(*args)
for _ in range(5):
    launch()
torch.cuda.synchronize()
