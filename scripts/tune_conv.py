"""Time the Triton chunk-conv kernels for a few block shapes (d=4096, N=32768, bf16) on a GPU."""
import torch
from triton.testing import do_bench

from fastweights.ops import inplace_ttt_triton as tr

B, N, d, C = 1, 32768, 4096, 4096
s = torch.randn(B, N, d, device="cuda", dtype=torch.bfloat16)
dt = torch.randn_like(s)
w = torch.randn(d, 5, device="cuda", dtype=torch.bfloat16)
g = (torch.arange(N, device="cuda") // C).expand(B, N)
nbytes = s.numel() * 2
for bn, bd in [(32, 128), (64, 128), (16, 256), (32, 256), (64, 64), (128, 64), (256, 64), (8, 512)]:
    tr.FWD_BLOCK = tr.BWD_BLOCK = (bn, bd)
    tf = do_bench(lambda: tr.chunk_conv(s, w, g), return_mode="median")
    tb = do_bench(lambda: tr.chunk_conv_backward(dt, s, w, g, True), return_mode="median")
    print(f"BN={bn:4d} BD={bd:4d}: fwd {tf * 1e3:7.1f} us ({2 * nbytes / tf / 1e6:6.0f} GB/s)  "
          f"bwd {tb * 1e3:7.1f} us ({3 * nbytes / tb / 1e6:6.0f} GB/s)", flush=True)
