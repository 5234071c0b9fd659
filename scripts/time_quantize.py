"""Time the quantizer's ``best`` preset (m2v8g128) on one GPU, for docs/BENCHMARKS.md.

The GGUF model cannot travel to the device machine, so this uses Gemma 3 270M's architecture with random
weights and random-token calibration: the work (shapes, samples, epochs) is the real run's, the quality is not.
Usage: python3 scripts/time_quantize.py [OUT.json]   (QB_LAYERS / QB_NSAMPLES shrink it for a smoke test)
"""
import json, os, sys, time
import torch
from transformers import AutoModelForCausalLM
import codegemm
from codegemm.bench.archs import architecture_config

device = "cuda" if torch.cuda.is_available() else "cpu"
layers = int(os.environ.get("QB_LAYERS", "0")) or None
nsamples = int(os.environ.get("QB_NSAMPLES", "64"))
torch.manual_seed(0)
cfg = architecture_config("gemma3-270m", num_layers=layers)
model = AutoModelForCausalLM.from_config(cfg).to(device=device, dtype=torch.float32)
tokens = torch.randint(0, cfg.vocab_size, (nsamples, 512))
start = time.perf_counter()
report = codegemm.quantize(model, "m2v8g128", tokens, preset="best", nsamples=nsamples, seqlen=512)
if device == "cuda":
    torch.cuda.synchronize()
seconds = time.perf_counter() - start
errors = [layer.rel_error for layer in report.layers]
row = dict(device=torch.cuda.get_device_name() if device == "cuda" else "cpu", preset="best", config="m2v8g128",
           layers=cfg.num_hidden_layers, nsamples=nsamples, seqlen=512, seconds=round(seconds, 1),
           mean_rel_error=round(sum(errors) / len(errors), 4), torch=torch.__version__)
print(json.dumps(row))
if len(sys.argv) > 1:
    open(sys.argv[1], "w").write(json.dumps(row) + "\n")
