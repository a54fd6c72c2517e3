"""Can TSP's layers run inside megatron-core 0.19's HybridModel ("*-*-") on CPU without TE?
(The measurement behind docs/supported.md's "Supported megatron-core versions": TSPGPTModel stays a GPTModel.)
Builds the tiny TSPGPTModel at D=1 in float64, then a HybridModel whose attention and MLP layers
are get_tsp_layer_spec's: first as megatron-core builds it, then with HybridStack's hard-coded
TENorm final norm replaced by TSPNorm; copies the GPT weights in (GPT layer i -> hybrid layers
2i and 2i+1) and compares the per-token loss. Run from the repo root on megatron-core >= 0.18:
    PYTHONPATH=$PWD python benchmarks/hybrid_model_probe.py"""
import copy, functools, tempfile, time, traceback
import torch, torch.distributed as dist
from megatron_tsp.training.cpu import install_cpu_shims
install_cpu_shims()
dist.init_process_group("gloo", init_method="file://" + tempfile.mktemp(), rank=0, world_size=1)
from tests.utils import init_tsp
from megatron_tsp.training.build import ModelShape, build_gpt, transformer_config
from megatron_tsp.tsp.specs import get_tsp_layer_spec
from megatron_tsp.tsp.norm import TSPNorm
from megatron.core.models.hybrid.hybrid_model import HybridModel
from megatron.core.models.hybrid.hybrid_block import HybridStack, HybridStackSubmodules
from megatron.core.ssm.mlp_layer import MLPLayer
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules
from megatron.core.transformer.identity_op import IdentityOp
pgs = init_tsp(1)
shape = ModelShape(seq_length=32)
t = time.perf_counter(); gpt = build_gpt(shape, layout="tsp", dtype=torch.float64, pg_collection=pgs); t_gpt = time.perf_counter() - t
config = gpt.config
layer = get_tsp_layer_spec(config, gpt.tsp_group)
s = layer.submodules
attn = ModuleSpec(module=TransformerLayer, submodules=TransformerLayerSubmodules(
    input_layernorm=s.input_layernorm, self_attention=s.self_attention, self_attn_bda=s.self_attn_bda))
mlp = ModuleSpec(module=MLPLayer, submodules=TransformerLayerSubmodules(
    pre_mlp_layernorm=s.pre_mlp_layernorm, mlp=s.mlp, mlp_bda=s.mlp_bda))
stack = ModuleSpec(module=HybridStack, submodules=HybridStackSubmodules(attention_layer=attn, mlp_layer=mlp))
hcfg = copy.deepcopy(config); hcfg.num_layers = 2 * config.num_layers
print("gpt keys:", [k for k in gpt.state_dict() if "layers.0" in k or "layers.1" in k][:6])
import megatron.core.models.hybrid.hybrid_block as hb
results = {}
for label, spec in (("TSP layers in HybridStack", stack), ("same, final norm patched to TSPNorm", stack)):
    if "patched" in label:
        hb.TENorm = TSPNorm
    try:
        t = time.perf_counter()
        h = HybridModel(hcfg, spec, vocab_size=shape.vocab_size, max_sequence_length=shape.seq_length,
                        hybrid_layer_pattern="*-" * config.num_layers, position_embedding_type="rope")
        print(label, "built in %.2f s" % (time.perf_counter() - t), "; keys:", [k for k in h.state_dict() if "layers." in k and "extra" not in k][:8])
        gsd = gpt.state_dict(); hsd = h.state_dict(); new = {}
        for k in hsd:
            if ".layers." in k:
                pre, rest = k.split(".layers.", 1); i, tail = rest.split(".", 1); i = int(i)
                gk = f"{pre}.layers.{i // 2}.{tail}"
            else:
                gk = k.replace("decoder.final_norm", "decoder.final_layernorm")
            new[k] = gsd[gk]
        h.load_state_dict(new)
        h = h.double()
        tok = torch.randint(0, shape.vocab_size, (2, shape.seq_length)); pos = torch.arange(shape.seq_length).expand(2, -1)
        lg = gpt(tok, pos, None, labels=tok); lh = h(tok, pos, None, labels=tok)
        print("  loss TSPGPTModel %.12f HybridModel %.12f max|diff| %.2e" % (lg.mean().item(), lh.mean().item(), (lg - lh).abs().max().item()))
        t = time.perf_counter(); [gpt(tok, pos, None, labels=tok).mean().backward() for _ in range(3)]; tg = (time.perf_counter() - t) / 3
        t = time.perf_counter(); [h(tok, pos, None, labels=tok).mean().backward() for _ in range(3)]; th = (time.perf_counter() - t) / 3
        print("  fwd+bwd s/step: TSPGPTModel %.3f HybridModel %.3f" % (tg, th))
    except Exception as e:
        print(label, "FAILED:", type(e).__name__, str(e)[:300])
        traceback.print_exc(limit=-3)
print("TSPGPTModel built in %.2f s" % t_gpt)
