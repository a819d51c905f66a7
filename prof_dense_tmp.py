import torch, tvm, sys
from relax_masked_attn.kernels import cuda_dense
from relax_masked_attn.legalize import device_cuda_target
n, k, tn, st = (int(a) for a in sys.argv[1:5])
f = cuda_dense.wgmma_dense_kernel(n, k, "float16", tiles=(tn, st))
kern = tvm.compile(tvm.IRModule({"main": f}), target=device_cuda_target())["main"]
x = torch.randn(8192, k, device="cuda", dtype=torch.float16)
w = torch.randn(n, k, device="cuda", dtype=torch.float16)
o = torch.empty(8192, n, device="cuda", dtype=torch.float16)
a = [tvm.runtime.from_dlpack(t) for t in (x, w, o)]
for _ in range(5): kern(*a)
torch.cuda.synchronize()
