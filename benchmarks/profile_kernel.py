"""Run the tensor-core kernel once on one config, for Nsight Compute:

    ncu --kernel-name regex:zz_masked --launch-skip 2 --launch-count 1 \
        --section SpeedOfLight --section WarpStateStats python benchmarks/profile_kernel.py
"""

import numpy as np
import torch
import tvm
from tvm import relax

import relax_masked_attn as rma

batch, seq, hq, hkv, d = 16, 1024, 16, 8, 128
dev = tvm.cuda(0)
target = tvm.target.Target.from_device(dev)
ex = tvm.compile(rma.op.standalone_module(hq, hkv, d, "float16", "causal_padded_left"), target)
run = relax.VirtualMachine(ex, dev)["main"]
q, k, v = (torch.randn(batch, seq, h, d, device="cuda", dtype=torch.float16)
           for h in (hq, hkv, hkv))
vl = torch.full((batch,), seq, dtype=torch.int32, device="cuda")
args = [tvm.runtime.from_dlpack(x) for x in (q, k, v, vl)]
for _ in range(4):
    run(*args)
torch.cuda.synchronize()
print("ran", np.prod(q.shape))
