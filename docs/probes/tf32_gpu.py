"""TF32 vs FP32 on a GPU, torch side (TensorFlow has no GPU build in this project).

Run on a CUDA machine with the project installed (pip install -e .):
python docs/probes/tf32_gpu.py.
Measured once (docs/PORTING.md, TF32 row); CI has no GPU, so this is a probe, not a test.
"""
import json
import numpy as np
import torch
import torch_impl  # noqa: F401  (turns TF32 off)
from shared import data
from shared.init import canonical_init
from torch_impl import model as tm, weights as tw

out = {"torch": torch.__version__, "device": torch.cuda.get_device_name(0)}
images = data.load_domains(size=64).target_train.images[:64]
for arch in ["tinyconv", "resnet18"]:
    m = tm.build_model(arch, 5)
    t = canonical_init(tw.canonical_shapes(m), 0)
    tw.import_weights(m, t)
    m.eval()
    x = torch.from_numpy(data.nhwc_to_nchw(images))
    with torch.no_grad():
        ref = m.double()(x.double()).numpy()
        m.float()
        cpu = m(x).numpy()
        g = m.cuda(); xg = x.cuda()
        torch.backends.cuda.matmul.allow_tf32 = False; torch.backends.cudnn.allow_tf32 = False
        fp32 = g(xg).cpu().numpy()
        torch.backends.cuda.matmul.allow_tf32 = True; torch.backends.cudnn.allow_tf32 = True
        tf32 = g(xg).cpu().numpy()
        torch.backends.cuda.matmul.allow_tf32 = False; torch.backends.cudnn.allow_tf32 = False
    out[arch] = {k: float(np.abs(v - ref).max()) for k, v in
                 {"cpu_fp32": cpu, "gpu_fp32": fp32, "gpu_tf32": tf32}.items()}
    out[arch]["gpu_fp32_vs_cpu"] = float(np.abs(fp32 - cpu).max())
    out[arch]["gpu_tf32_vs_cpu"] = float(np.abs(tf32 - cpu).max())
    out[arch]["logit_scale"] = float(np.abs(ref).max())
print(json.dumps(out, indent=1))
