"""Decode one layer of an llm-compressor "pack-quantized" checkpoint by hand and
check it against compressed-tensors' own unpacking (documents the format).

    runs/rival-venv/bin/python benchmarks/rivals/inspect_ckpt.py CKPT_DIR [--layer model.layers.0.mlp.down_proj]

Format as found with compressed-tensors 0.19.0:
  <layer>.weight_packed      int32 [out, ceil(in*bits/32)]: each row is a dense little-endian
                             bit stream, value i at bit offset bits*i (3-bit values straddle
                             int32 words), stored unsigned = signed q + 2**(bits-1)
  <layer>.weight_scale       model dtype (float32 here) [out, in/group] ([out, 1] per channel)
  <layer>.weight_zero_point  asymmetric only: int32 [ceil(out*bits/32), in/group], packed along
                             dim 0 (the OUTPUT dim), signed zero point + 2**(bits-1)
  <layer>.weight_shape       int64 [2]
  w = (q - zp) * scale, with q, zp in [-2**(bits-1), 2**(bits-1)-1]
"""

import argparse
import json
from pathlib import Path

import torch
from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
from safetensors.torch import load_file

ap = argparse.ArgumentParser()
ap.add_argument("ckpt")
ap.add_argument("--layer", default="model.layers.0.mlp.down_proj")
args = ap.parse_args()

cfg = json.loads((Path(args.ckpt) / "config.json").read_text())["quantization_config"]
sd = load_file(str(Path(args.ckpt) / "model.safetensors"))
p = args.layer + "."
group = next(g for g in cfg["config_groups"].values()
             if any(t.startswith("re:") and __import__("re").match(t[3:], args.layer) for t in g["targets"]))
bits = group["weights"]["num_bits"]
packed, shape = sd[p + "weight_packed"], sd[p + "weight_shape"]
ref = unpack_from_int32(packed, bits, torch.Size(shape.tolist()))

u = packed.to(torch.int64) & 0xFFFFFFFF
stream = ((u.unsqueeze(-1) >> torch.arange(32)) & 1).reshape(u.shape[0], -1)
n = int(shape[1])
vals = (stream[:, : n * bits].reshape(u.shape[0], n, bits) * (1 << torch.arange(bits))).sum(-1)
off = 1 << (bits - 1)
print(f"{args.layer}: bits={bits} group={group['weights']['group_size']} "
      f"packed {tuple(packed.shape)} {packed.dtype}; hand decode == ct unpack: {torch.equal(vals - off, ref.long())}; "
      f"q range [{ref.min().item()}, {ref.max().item()}]")
print(f"  weight_scale {tuple(sd[p + 'weight_scale'].shape)} {sd[p + 'weight_scale'].dtype}")
if p + "weight_zero_point" in sd:
    zp = sd[p + "weight_zero_point"]
    zpu = unpack_from_int32(zp, bits, torch.Size([int(shape[0]), zp.shape[1]]), packed_dim=0)
    print(f"  weight_zero_point packed {tuple(zp.shape)} {zp.dtype} (along dim 0) -> {tuple(zpu.shape)} "
          f"range [{zpu.min().item()}, {zpu.max().item()}]")
print("  other tensors of this layer:", sorted(k[len(p):] for k in sd if k.startswith(p)))
