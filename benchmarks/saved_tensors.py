"""What one layer saves for backward, measured, against the planner's formula.

    PYTHONPATH=. python benchmarks/saved_tensors.py            # CPU, bf16, world 1 (~20 s)
    (on a GPU machine the same command runs on CUDA and checks the CUDA kernels' saves)

Builds a 1-layer and a 2-layer GPT (TSP D=1 and Megatron's native layer with SDPA) with
megatron_tsp.training.build.build_gpt, runs the forward under torch.autograd.graph.saved_tensors_hooks
and sums the distinct storages saved (parameters excluded). The 2-layer minus 1-layer difference
is one layer; it must equal megatron_tsp.planner.formulas' per-token bytes x tokens.
"""

import sys
import warnings

warnings.filterwarnings("ignore")

import torch  # noqa: E402

from megatron.core import parallel_state as mpu  # noqa: E402
from megatron_tsp import parallel_state as tsp_state  # noqa: E402
from megatron_tsp.planner.formulas import native_saved, tsp_saved_per_token  # noqa: E402
from megatron_tsp.planner.model import Layout, ModelSpec  # noqa: E402
from megatron_tsp.training.build import ModelShape, build_gpt, init_distributed  # noqa: E402
from megatron_tsp.training.cpu import install_cpu_shims  # noqa: E402

H, S, V, HEADS, GROUPS = 256, 512, 1000, 4, 2


def saved_bytes(layout: str, layers: int) -> int:
    shape = ModelShape(num_layers=layers, hidden_size=H, num_attention_heads=HEADS, num_query_groups=GROUPS,
                       ffn_hidden_size=4 * H, vocab_size=V, seq_length=S, swiglu=True, normalization="RMSNorm")
    if mpu.model_parallel_is_initialized():
        tsp_state.destroy_model_parallel()
    if layout == "tsp":
        model = build_gpt(shape, layout="tsp", dtype=torch.bfloat16,
                          pg_collection=tsp_state.initialize_model_parallel(tsp_size=1))
    else:
        model = build_gpt(shape, layout="tp_sp", dtype=torch.bfloat16, core_attention="sdpa",
                          pg_collection=tsp_state.initialize_native_model_parallel(tensor_model_parallel_size=1))
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in params:
            seen[st.data_ptr()] = st.nbytes()
        return t

    dev = next(model.parameters()).device
    tokens = torch.randint(0, V, (1, S), device=dev)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(tokens, torch.arange(S, device=dev)[None], None, labels=tokens)
    return sum(seen.values())


def main():
    init_distributed()
    install_cpu_shims()  # no-op with CUDA
    m = ModelSpec(num_layers=1, hidden_size=H, num_attention_heads=HEADS, num_query_groups=GROUPS, ffn_hidden_size=4 * H, vocab_size=V)
    lay = Layout("tp_sp", tp=1)
    # the planner's norm model for what TSPNorm builds here: lean norms where the code has them,
    # torch's composite norm before (the planner's default is lean)
    from megatron_tsp.tsp import norm as tsp_norm

    kind = "lean" if hasattr(tsp_norm, "LeanRMSNorm") else "torch"
    want = {"tsp": sum(tsp_saved_per_token(m, save_activations=False, norm=kind).values()) * S,
            "tp_sp": sum(v for v, _ in native_saved(m, lay, norm=kind).values()) * S}
    ok = True
    for layout in ("tsp", "tp_sp"):
        got = saved_bytes(layout, 2) - saved_bytes(layout, 1)
        err = (got - want[layout]) / want[layout]
        ok &= abs(err) < 0.02
        print(f"{layout:6s}: one layer saves {got} bytes = {got / (S * H * 2):.3f} x [S, h] bf16; "
              f"planner {want[layout]:.0f} ({100 * err:+.2f}%)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
