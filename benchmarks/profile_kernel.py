"""The attention kernel a GPU's target gets (``sm_90a`` on Hopper: the ``wgmma`` kernel; else the
``mma.sync`` one), or a ``wgmma`` layout given by ``--tiles``, launched a few times on one
config, for Nsight Compute:

    ncu --kernel-name regex:attention --launch-skip 2 --launch-count 1 --set full \
        python benchmarks/profile_kernel.py [--config 16,1024,16,8,128] \
        [--mode causal_padded_left] [--tiles 1,0,2,1,1,128]

``--tiles`` are the fields of ``config.WgmmaAttentionTiles`` (0/1 for the flags).
"""

import argparse

import torch
import tvm

from relax_masked_attn.kernels import cuda_mma, cuda_wgmma
from relax_masked_attn.targets import device_cuda_target

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--config", default="16,1024,16,8,128",
                    help="batch, seq, heads_q, heads_kv, head_dim")
parser.add_argument("--mode", default="causal_padded_left")
parser.add_argument("--dtype", default="float16", choices=["float16", "bfloat16"])
parser.add_argument("--tiles", help="a wgmma layout (sm_90a only); default: the configured one")
args = parser.parse_args()

batch, seq, hq, hkv, d = (int(x) for x in args.config.split(","))
target = device_cuda_target()
scale = d**-0.5
wgmma = cuda_wgmma.supports(target, d, args.dtype)
if wgmma:
    tiles = None
    if args.tiles:
        fields = [int(x) for x in args.tiles.split(",")]
        tiles = (fields[0], bool(fields[1]), fields[2], bool(fields[3]), bool(fields[4]),
                 *fields[5:])
    func = cuda_wgmma.wgmma_attention_kernel(hq, hkv, d, args.dtype, args.mode, scale,
                                             tiles=tiles)
else:
    func = cuda_mma.tensor_core_kernel(hq, hkv, d, args.dtype, args.mode, scale)
func = func.with_attr("global_symbol", "attention")  # CUDA kernel "attention_kernel"
kernel = tvm.compile(tvm.IRModule({"attention": func}), target=target)["attention"]
tdt = getattr(torch, args.dtype)
q, k, v = (torch.randn(batch, seq, h, d, device="cuda", dtype=tdt) for h in (hq, hkv, hkv))
valid_len = torch.full((batch,), seq, dtype=torch.int32, device="cuda")
out = torch.empty_like(q)
tensors = [tvm.runtime.from_dlpack(x) for x in (q, k, v, valid_len, out)]
for _ in range(5):
    kernel(*tensors)
torch.cuda.synchronize()
print(f"ran the {'wgmma' if wgmma else 'mma.sync'} kernel on {target.attrs['arch']}: "
      f"({args.config}) {args.mode}")
