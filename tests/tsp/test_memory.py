"""Memory is the product: what a TSP layer saves for backward at D = 4 is at most 1.25/D of
what the same layer saves at D = 1 for the same global batch, and no saved tensor is another
rank's weight shard or a gathered K/V; in both recompute modes, `full` saving less. The
sequence-local LM head never creates more than one chunk of logits."""

import math

import pytest
import torch
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.transformer_layer import TransformerLayer

from megatron_tsp.config import TSPOptions
from megatron_tsp.tsp.specs import get_tsp_layer_spec
from megatron_tsp.training.build import ModelShape, build_gpt
from megatron_tsp.tsp.zigzag import to_zigzag
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
from tests.utils import OpShapes, device, init_tsp, mock_batch, saved_by_layer, singleton_pgs, tiny_config

pytestmark = pytest.mark.distributed  # runs under torchrun at every world size (scripts/test.sh N)

S, B, H, HEADS = 48, 2, 32, 4


def _saved_by_layer_forward(D, pgs, options):
    config = tiny_config(D, heads=HEADS, hidden=H, ffn=4 * H, dtype=torch.float32)
    spec = get_tsp_layer_spec(config, pgs.tp, options)
    layer = TransformerLayer(config, spec.submodules, pg_collection=pgs).to(device())
    x = to_zigzag(torch.randn(S, B, H, device=device()), D, 0)[: S // D].clone().requires_grad_()  # this rank's tokens
    rope = RotaryEmbedding(kv_channels=H // HEADS, rotary_percent=1.0)(S).to(device())
    return (*saved_by_layer(layer, x, rope), layer)


_BYTES = {}


@pytest.mark.parametrize("recompute", ["none", "full"])
@pytest.mark.parametrize("kv", ["gathered", "streamed"])  # parallel.tsp_attention_kv: the same saves
def test_saved_activations_shrink_with_D(world, recompute, kv):
    if world != 4:
        pytest.skip("needs D = 4")
    options = TSPOptions(tsp_recompute=recompute, tsp_mlp_exchange="ring", tsp_attention_kv=kv)
    init_tsp(1)
    _, _, bytes_d1, _ = _saved_by_layer_forward(1, singleton_pgs(), options)
    init_tsp(4)
    saved, params, bytes_d4, layer = _saved_by_layer_forward(4, ProcessGroupCollection.use_mpu_process_groups(), options)
    assert bytes_d4 <= 1.25 / 4 * bytes_d1, f"saved {bytes_d4} B at D=4 vs {bytes_d1} B at D=1"
    _BYTES[recompute, kv] = bytes_d4
    if (("full", kv) in _BYTES) and (("none", kv) in _BYTES):  # full recompute keeps the block inputs only
        assert _BYTES["full", kv] < 0.5 * _BYTES["none", kv], _BYTES

    weight_shapes = {tuple(p.shape) for p in layer.parameters() if p.dim() > 1}
    for t in saved:
        if t.data_ptr() in params:
            continue  # the owned shard: saved by reference, no extra memory
        assert t.shape[0] != S, f"a full-sequence tensor {tuple(t.shape)} (gathered K/V?) was saved"
        assert tuple(t.shape) not in weight_shapes, f"a foreign weight shard {tuple(t.shape)} was saved"


def test_tokens_mlp_saves_its_share_too(world):
    """`--tsp-mlp-exchange tokens` (what `auto` picks for short sequences) is Megatron's
    sequence-parallel MLP: it saves full-sequence activations split by features, still <= 1.25/D
    of the D = 1 layer's (gathered K/V stay unsaved: the attention is TSP's)."""
    if world != 4:
        pytest.skip("needs D = 4")
    options = TSPOptions(tsp_mlp_exchange="tokens")
    init_tsp(1)
    _, _, bytes_d1, _ = _saved_by_layer_forward(1, singleton_pgs(), options)
    init_tsp(4)
    _, _, bytes_d4, _ = _saved_by_layer_forward(4, ProcessGroupCollection.use_mpu_process_groups(), options)
    assert bytes_d4 <= 1.25 / 4 * bytes_d1, f"saved {bytes_d4} B at D=4 vs {bytes_d1} B at D=1"


@pytest.mark.parametrize("recompute", ["none", "full"])
def test_at_most_two_shards_of_gathered_kv_alive(world, recompute, monkeypatch):
    """The pipelined attention keeps the K/V of shard j in flight while shard j-1 attends (and in
    backward re-gathers one shard ahead): whenever a K/V all-gather is posted, at most two
    gathered-size buffers (zigzag or natural order) from earlier shards may still be alive, never
    all D shards' (checked to fail when they are kept)."""
    import weakref

    import megatron_tsp.tsp.attention as attention

    if world != 4:
        pytest.skip("needs D = 4")
    live, worst = [], {"n": 0}

    def alive():
        return sum(1 for r in live if r() is not None)

    real_gather, real_natural = attention.comm.all_gather_sequence_raw, attention.from_zigzag

    def gather(local, group, async_op=False):
        worst["n"] = max(worst["n"], alive())
        out = real_gather(local, group, async_op=async_op)
        live.append(weakref.ref(out[0] if async_op else out))
        return out

    def natural(t, D, dim):
        out = real_natural(t, D, dim)
        live.append(weakref.ref(out))
        return out

    monkeypatch.setattr(attention.comm, "all_gather_sequence_raw", gather)
    monkeypatch.setattr(attention, "from_zigzag", natural)
    init_tsp(4)
    _saved_by_layer_forward(4, ProcessGroupCollection.use_mpu_process_groups(),
                            TSPOptions(tsp_recompute=recompute, tsp_mlp_exchange="ring"))
    assert len(live) >= 2 * 4, "the attention should have gathered K/V at least once per shard"
    assert worst["n"] <= 2, f"{worst['n']} gathered K/V buffers alive when the next all-gather was posted"


# -- the LM head: no logits of all S tokens, nor more than one chunk's, ever exist -----------------

LM_SHAPE = ModelShape(num_layers=1, hidden_size=48, num_attention_heads=4, ffn_hidden_size=64, vocab_size=4 * 37,
                      seq_length=64)
LM_CHUNK = 12  # local tokens: 128 / D, never a multiple of 12




def _lm_head_footprint(D, lm_head):
    """Forward + backward of a TSPGPTModel with labels -> (most tokens' logits in one allocated
    tensor, in one saved tensor, whether any tensor has all S tokens x a vocab shard). A logits
    tensor is one with a V/D dimension that is not a vocab shard's weight [V/D, h]."""
    model = build_gpt(LM_SHAPE, layout="tsp", seed=5, pg_collection=init_tsp(D),
                      tsp_options=TSPOptions(tsp_lm_head=lm_head, lm_head_chunk_tokens=LM_CHUNK))
    tokens, labels, pos = mock_batch(0, 2, LM_SHAPE)
    params = {p.data_ptr() for p in model.parameters()}
    saved, allocations = [], OpShapes()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: (saved.append(t), t)[1], lambda t: t), allocations:
        model(tokens, pos, None, labels=labels).sum().backward()
    vocab_shard, h = LM_SHAPE.vocab_size // D, LM_SHAPE.hidden_size

    def logit_rows(shape):
        if vocab_shard not in shape or sorted(shape) == sorted((vocab_shard, h)):
            return 0
        return math.prod(shape) // vocab_shard

    allocated = max(map(logit_rows, allocations.shapes))
    kept = max([logit_rows(tuple(t.shape)) for t in saved if t.data_ptr() not in params], default=0)
    whole_sequence = any(vocab_shard in s and LM_SHAPE.seq_length in s for s in allocations.shapes)
    return allocated, kept, whole_sequence


def test_local_lm_head_never_holds_more_than_one_chunk_of_logits(world):
    """With `tsp_lm_head='local'` every logits tensor of forward and backward has at most
    lm_head_chunk_tokens rows and none is saved; Megatron's head (all S tokens' logits, saved for
    its backward) fails the same checks: the test of the test."""
    allocated, kept, whole_sequence = _lm_head_footprint(world, "local")
    assert allocated == LM_CHUNK, f"the largest logits tensor has {allocated} tokens' rows, chunk {LM_CHUNK}"
    assert kept == 0, f"a logits tensor of {kept} tokens was saved for backward"
    assert not whole_sequence, "a tensor with all S tokens x V/D was created"
    allocated, kept, whole_sequence = _lm_head_footprint(world, "megatron")
    tokens = LM_SHAPE.seq_length * 2
    assert allocated >= tokens and kept >= tokens and whole_sequence, (allocated, kept, whole_sequence)


# -- layer recompute (Megatron's checkpointing around TSP layers) and activation offload ---------

LAYERS = 4


def _chunks(method, n):
    """The (first, end) layers of each checkpointed chunk of a 4-layer stage."""
    if method == "uniform":
        return [(k, k + n) for k in range(0, LAYERS, n)]
    return [(k, k + 1) for k in range(n)]


def _model_forward_saves(D, options=None, offload_activations=False, record_inputs=None, before_forward=None, **config_kw):
    """One forward of a 4-layer TSPGPTModel with every saved activation (parameters excluded)
    attributed to where it was saved: layer i's forward (i), the checkpoint of layer i's input
    (('input', i): saved outside every layer, with the storage of what layer i received) or the
    rest of the model ('outside'). Returns (saves, the loss to call backward on, the model)."""
    from megatron_tsp.training.build import ModelShape, build_gpt

    pgs = init_tsp(D)
    shape = ModelShape(num_layers=LAYERS, hidden_size=H, num_attention_heads=HEADS, ffn_hidden_size=4 * H, seq_length=S)
    model = build_gpt(shape, layout="tsp", dtype=torch.float32, seed=7,
                      tsp_options=options or TSPOptions(tsp_mlp_exchange="ring"),
                      offload_activations=offload_activations, pg_collection=pgs, **config_kw)
    params = {p.data_ptr() for p in model.parameters()}
    current, inputs, recording = [None], {}, [True]

    def enter(i):
        def hook(module, args, kwargs):
            hidden = kwargs.get("hidden_states", args[0] if args else None)
            if recording[0]:  # kept alive until the forward ends: no other tensor can take its address
                inputs.setdefault(i, hidden)
                if record_inputs is not None:
                    record_inputs.setdefault(i, hidden)
            current[0] = i
        return hook

    def leave(module, args, output):
        current[0] = None

    for i, layer in enumerate(model.decoder.layers):
        layer.register_forward_pre_hook(enter(i), with_kwargs=True)
        layer.register_forward_hook(leave, always_call=True)
    saves = []

    def pack(t):
        if t.data_ptr() in params or t.numel() <= 1:
            return t
        where = current[0]
        if where is None:
            where = next((("input", i) for i, x in inputs.items() if x.data_ptr() == t.data_ptr()), "outside")
        saves.append((where, tuple(t.shape), t.untyped_storage().data_ptr()))
        return t

    tokens, labels, pos = mock_batch(0, B, shape, seed=7)
    if before_forward is not None:
        before_forward(model)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(tokens.to(device()), pos.to(device()), None, labels=labels.to(device())).sum()
    recording[0] = False
    inputs.clear()
    return saves, loss, model


def check_layer_recompute_saves(plain, got, chunks, D):
    """With layer recompute: the first layer of each checkpointed chunk keeps exactly its input
    [S/D, b, h], no recomputed layer keeps anything else, the other layers and the rest of the
    model keep what they kept without recompute (the RoPE table, shared by every layer, aside)."""
    rope = (S, 1, 1, H // HEADS)
    recomputed = {i for first, end in chunks for i in range(first, end)}

    def shapes(saves, where):
        return sorted(shape for w, shape, _ in saves if w in where and (w != "outside" or shape != rope))

    for i in range(LAYERS):
        if i in recomputed:
            assert shapes(got, [i]) == [], f"layer {i} is recomputed but its forward saved {shapes(got, [i])}"
            expected = [(S // D, B, H)] if any(first == i for first, _ in chunks) else []
            assert shapes(got, [("input", i)]) == expected, f"layer {i}: kept {shapes(got, [('input', i)])} of its input"
        else:
            assert shapes(got, [i, ("input", i)]) == shapes(plain, [i, ("input", i)]), f"layer {i} (not recomputed)"
    assert shapes(got, ["outside"]) == shapes(plain, ["outside"]), "the rest of the model saves something else"
    assert len({storage for w, shape, storage in got if w == "outside" and shape == rope}) <= 1, "more than one RoPE table kept"


@pytest.mark.parametrize("method, n", [("uniform", 1), ("uniform", 2), ("block", 2)])
@pytest.mark.parametrize("tsp_recompute", ["none", "full"])
def test_layer_recompute_keeps_one_input_per_chunk(world, method, n, tsp_recompute):
    options = TSPOptions(tsp_recompute=tsp_recompute, tsp_mlp_exchange="ring")
    plain, loss, _ = _model_forward_saves(world, options)
    loss.backward()
    got, loss, _ = _model_forward_saves(world, options, recompute_granularity="full", recompute_method=method,
                                        recompute_num_layers=n)
    loss.backward()
    check_layer_recompute_saves(plain, got, _chunks(method, n), world)


def test_layer_recompute_accounting_catches_no_checkpointing(world, monkeypatch):
    """Test the test: layers that run without Megatron's checkpoint (a recompute that does not
    happen) keep their activations, and the accounting says so."""
    from megatron.core import tensor_parallel

    plain, loss, _ = _model_forward_saves(world)
    loss.backward()
    monkeypatch.setattr(tensor_parallel, "checkpoint", lambda function, distribute, *args: function(*args))
    got, loss, _ = _model_forward_saves(world, recompute_granularity="full", recompute_method="uniform",
                                        recompute_num_layers=1)
    loss.backward()
    with pytest.raises(AssertionError, match="layer 0 is recomputed but its forward saved"):
        check_layer_recompute_saves(plain, got, _chunks("uniform", 1), world)


def _offload_run(world, offload_activations, method="uniform", n=1):
    """Forward with layer recompute; returns (weak references to the checkpointed layer inputs
    after the forward, the copies of their values, the backward's (saved tensor, host copy) of
    each fetched input, the offload events)."""
    import gc
    import weakref

    inputs = {}

    def log_events(model):
        if offload_activations:
            model.activation_offloader.events = []

    _, loss, model = _model_forward_saves(world, offload_activations=offload_activations, record_inputs=inputs,
                                          before_forward=log_events, recompute_granularity="full",
                                          recompute_method=method, recompute_num_layers=n)
    firsts = [first for first, _ in _chunks(method, n)]
    values = {i: inputs[i].detach().clone() for i in firsts}
    refs = {i: weakref.ref(inputs[i]) for i in firsts}
    inputs.clear()
    gc.collect()
    alive = [i for i, r in refs.items() if r() is not None]
    fetched = []
    offloader = getattr(model, "activation_offloader", None)
    if offloader is not None:
        real = offloader.fetch

        def fetch(handle):
            host = handle.host
            t = real(handle)
            fetched.append((handle.index, t, host))
            return t

        offloader.fetch = fetch
    loss.backward()
    return alive, values, fetched, offloader.events if offloader is not None else None


def check_layer_inputs_offloaded(alive, values, fetched):
    assert not alive, f"the inputs of checkpointed layers {alive} stayed where they were between forward and backward"
    assert len(fetched) == len(values)
    for (index, t, host), (layer, value) in zip(sorted(fetched, key=lambda f: f[0]), sorted(values.items())):
        assert host.device.type == "cpu", "the offloaded copy is not in host memory"
        if value.is_cuda:  # the backward gets a device copy of the pinned host copy
            assert host.is_pinned() and t.device == value.device and t.data_ptr() != host.data_ptr()
        else:  # on CPU the host copy itself
            assert t is host, "the saved tensor the backward got is not the host copy"
        assert t.data_ptr() != 0 and torch.equal(t, value), f"layer {layer}'s offloaded input changed"


@pytest.mark.parametrize("method, n", [("uniform", 1), ("block", 2)])
def test_offload_moves_every_checkpointed_input_off_the_device(world, method, n):
    """With offload no checkpointed layer input stays on the device between forward and backward
    (on CPU: the original is freed and the backward recomputes from the host copy), and the
    backward prefetches chunk i-1's input when chunk i's starts: at most two on the device."""
    from megatron.core import tensor_parallel

    megatrons = tensor_parallel.checkpoint
    alive, values, fetched, events = _offload_run(world, True, method, n)
    check_layer_inputs_offloaded(alive, values, fetched)
    # the offloading checkpoint is in place only while the decoder's forward runs
    assert tensor_parallel.checkpoint is megatrons, "offload left its checkpoint installed after the forward"
    k = len(_chunks(method, n))
    expected = [("offload", i) for i in range(k)] + [("fetch", k - 1)]
    for i in range(k - 1, 0, -1):
        expected += [("prefetch", i - 1), ("use", i - 1)]
    assert events == expected


def test_offload_accounting_catches_inputs_kept_on_the_device(world):
    """Test the test: layer recompute without offload keeps the inputs where they were."""
    alive, values, fetched, _ = _offload_run(world, False)
    with pytest.raises(AssertionError, match="stayed where they were"):
        check_layer_inputs_offloaded(alive, values, fetched)


def test_offloaded_model_is_freed(world):
    """A model with offload, after its forward and backward, is garbage once dropped, and so are
    its process groups once destroyed (their gloo threads with them). The offloader kept the last
    chunk's handle past the forward, whose host copy carried a grad_fn into the graph: the graph's
    CheckpointFunctionBackward holds the decoder, the decoder the offloader. A cycle through C++
    autograd nodes that gc cannot see: every such model stayed alive with its destroyed groups
    (57 threads per model at world 1)."""
    import gc
    import os
    import weakref

    import megatron_tsp

    def cycle():
        _, loss, model = _model_forward_saves(world, offload_activations=True, recompute_granularity="full",
                                              recompute_method="uniform", recompute_num_layers=1)
        loss.backward()
        refs = [weakref.ref(model), weakref.ref(model.activation_offloader)]
        del model, loss
        megatron_tsp.destroy_model_parallel()
        gc.collect()
        assert all(ref() is None for ref in refs), "the model with offload outlived its step"

    def threads():
        return len(os.listdir("/proc/self/task")) if os.path.isdir("/proc/self/task") else 0

    cycle()
    before = threads()
    for _ in range(2):
        cycle()
    assert threads() <= before + 2, f"threads grew from {before} to {threads()}: destroyed groups are still alive"
    init_tsp(world)
