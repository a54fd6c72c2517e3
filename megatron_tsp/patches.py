"""Every process-wide replacement megatron_tsp makes of torch, megatron-core or Megatron-LM state,
one record each: what it replaces, what replaces it (and where that is defined), the versions
that need it, why, and when it is installed and undone. docs/architecture.md's patch inventory
is generated from these records (`python -m megatron_tsp.patches`).

Nothing is installed at import. A module that needs a patch calls `install(RECORD, ...)` or
`with applied(RECORD, ...)`; no other module assigns an attribute of torch, megatron or
Megatron-LM, adds a logging or warnings filter, or enters a torch mode for good
(tests/test_patches.py reads the source for that). The replacement object lives with the code it
belongs to (the CPU harness, the offload, the probe, ...) and is handed to `install`:
`install(p, value)`, or `install(p, wrap=make)` where `make(original)` builds it around what it
replaces. Filters are whole records (`LogFilter`, `WarningFilter`).

- `install` is idempotent: a patch in place is left as it is (returns False); a target missing
  from the installed version fails loudly (`PatchError`) unless the record says the versions
  differ there (`absent="skip"` or `"only"`).
- `undo` puts back exactly what was there: the same object, an attribute that was absent deleted
  again, a filter or a mode removed. It refuses (`PatchError`) while another patch sits on top of
  this one (undo that one first).
- `applied(...)`: installed for a block, undone when the block ends if the block installed it.

Standard library only at import (`output.py`, which the launcher and `--help` import, installs
its filters through here); the targets are imported when a patch is installed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import logging
import re
import warnings
from typing import Any, Callable, Optional, Tuple


def _code(text: str) -> str:
    """`text` as Markdown code (doubled backticks around one that holds a backtick)."""
    return f"`` {text} ``" if "`" in text else f"`{text}`"


class PatchError(RuntimeError):
    """A patch that cannot be installed or undone as its record says."""


_ABSENT = object()  # an attribute that did not exist before its patch
_UNSET = object()


@dataclasses.dataclass(eq=False, kw_only=True)
class Patch:
    """One process-wide replacement. `versions`: the torch / megatron-core / Megatron-LM versions
    it is for; `why`: what breaks without it; `when`: who installs it, when, and when it is undone."""

    versions: str
    why: str
    when: str

    def what(self) -> str:
        raise NotImplementedError

    def replaced_with(self) -> str:
        raise NotImplementedError

    def installed(self) -> bool:
        raise NotImplementedError

    def install(self, replacement: Any = _UNSET, *, wrap: Optional[Callable] = None) -> bool:
        raise NotImplementedError

    def undo(self) -> bool:
        raise NotImplementedError


@dataclasses.dataclass(eq=False, kw_only=True)
class Attribute(Patch):
    """`target.attribute` replaced. `target`: a module ("torch.cuda") or a class in one
    ("megatron.core.x.y:Class"). `absent`: "error" (it must exist: a renamed target in a new
    version fails at install instead of patching nothing), "skip" (only some versions have the
    module or attribute: nothing to do where it is missing), "only" (it binds a name some versions
    lack: nothing to do where it exists; undo deletes it again)."""

    target: str
    attribute: str
    replacement: str
    absent: str = "error"
    _state: Optional[tuple] = dataclasses.field(default=None, init=False, repr=False)  # (owner, original, new)

    def __post_init__(self):
        if self.absent not in ("error", "skip", "only"):
            raise ValueError(f"absent = {self.absent!r} is not one of error, skip, only")

    def what(self) -> str:
        return f"`{self.target.replace(':', '.')}.{self.attribute}`"

    def replaced_with(self) -> str:
        return self.replacement

    def owner(self):
        """The module or class holding the attribute; None where an `absent="skip"` target's
        module does not exist in this version."""
        module, _, cls = self.target.partition(":")
        try:
            obj = importlib.import_module(module)
        except ImportError:
            if self.absent == "skip":
                return None
            raise
        for name in cls.split(".") if cls else ():
            obj = getattr(obj, name)
        return obj

    def installed(self) -> bool:
        # in place unless the original is back (another patch may sit on top of this one)
        if self._state is None:
            return False
        owner, original, _ = self._state
        return vars(owner).get(self.attribute, _ABSENT) is not original

    def install(self, replacement: Any = _UNSET, *, wrap: Optional[Callable] = None) -> bool:
        if (replacement is _UNSET) == (wrap is None):
            raise PatchError(f"{self.what()}: give its replacement or `wrap`, one of them")
        if self.installed():
            return False
        owner = self.owner()
        if owner is None:
            return False
        present = hasattr(owner, self.attribute)
        if not present and self.absent == "error":
            raise PatchError(f"{self.what()} does not exist in the installed versions; the patch is for "
                             f"{self.versions}: {self.why}")
        if (not present and self.absent == "skip") or (present and self.absent == "only"):
            return False
        original = vars(owner).get(self.attribute, _ABSENT)  # a class's own entry (inherited: absent)
        new = wrap(getattr(owner, self.attribute)) if wrap is not None else replacement
        setattr(owner, self.attribute, new)
        self._state = (owner, original, new)
        return True

    def undo(self) -> bool:
        if self._state is None:
            return False
        owner, original, new = self._state
        current = vars(owner).get(self.attribute, _ABSENT)
        if current is original:  # already put back (a test's monkeypatch, say)
            self._state = None
            return False
        if current is not new:
            raise PatchError(f"{self.what()} was replaced again after this patch ({self.when}): undo that first")
        if original is _ABSENT:
            delattr(owner, self.attribute)
        else:
            setattr(owner, self.attribute, original)
        self._state = None
        return True


class _DropMatching(logging.Filter):
    def __init__(self, pattern: str):
        super().__init__()
        self.pattern = re.compile(pattern)

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.pattern.match(record.getMessage())


@dataclasses.dataclass(eq=False, kw_only=True)
class LogFilter(Patch):
    """Records dropped from loggers: `records` = ((logger name, message regex, `re.match`), ...)."""

    records: Tuple[Tuple[str, str], ...]
    _added: Optional[list] = dataclasses.field(default=None, init=False, repr=False)  # [(logger, filter)]

    def what(self) -> str:
        return "filter on logger " + ", ".join(f"`{name}`" for name in dict(self.records))

    def replaced_with(self) -> str:
        return "drops " + "; ".join(_code(pattern) for _, pattern in self.records)

    def installed(self) -> bool:
        return self._added is not None and all(f in logger.filters for logger, f in self._added)

    def install(self, replacement: Any = _UNSET, *, wrap: Optional[Callable] = None) -> bool:
        if replacement is not _UNSET or wrap is not None:
            raise PatchError(f"{self.what()}: its record is the whole patch (no replacement)")
        if self.installed():
            return False
        self.undo()  # a partly removed one: start over
        self._added = []
        for name, pattern in self.records:
            logger, drop = logging.getLogger(name), _DropMatching(pattern)
            logger.addFilter(drop)
            self._added.append((logger, drop))
        return True

    def undo(self) -> bool:
        if self._added is None:
            return False
        for logger, f in self._added:
            logger.removeFilter(f)
        self._added = None
        return True


@dataclasses.dataclass(eq=False, kw_only=True)
class WarningFilter(Patch):
    """Python warnings ignored: `filters` = ((message regex, category), ...), as
    `warnings.filterwarnings("ignore", message, category)` (an empty message: every message)."""

    filters: Tuple[Tuple[str, type], ...]
    _added: Optional[list] = dataclasses.field(default=None, init=False, repr=False)  # the entries it added

    def what(self) -> str:
        return "Python warnings filter"

    def replaced_with(self) -> str:
        return "ignores " + "; ".join((_code(m) if m else "every message")
                                      + ("" if c is Warning else f" ({c.__name__})") for m, c in self.filters)

    def _entries(self):
        # what warnings.filterwarnings puts into warnings.filters (the message compiled with re.I)
        return [("ignore", re.compile(m, re.I) if m else None, c, None, 0) for m, c in self.filters]

    def installed(self) -> bool:
        return self._added is not None and all(e in warnings.filters for e in self._entries())

    def install(self, replacement: Any = _UNSET, *, wrap: Optional[Callable] = None) -> bool:
        if replacement is not _UNSET or wrap is not None:
            raise PatchError(f"{self.what()}: its record is the whole patch (no replacement)")
        if self.installed():
            return False
        self._added = []
        for (message, category), entry in zip(self.filters, self._entries()):
            if entry not in warnings.filters:  # one already there stays another's to remove
                self._added.append(entry)
            warnings.filterwarnings("ignore", message=message, category=category)
        return True

    def undo(self) -> bool:
        if self._added is None:
            return False
        for entry in self._added:
            if entry in warnings.filters:
                warnings.filters.remove(entry)
        _filters_mutated()
        self._added = None
        return True


def _filters_mutated() -> None:
    """Tell the warnings module its filters changed (it caches which one applies where)."""
    mutated = getattr(warnings, "_filters_mutated", None)
    if mutated is not None:  # Python <= 3.13
        mutated()
    else:
        with warnings._lock:
            warnings._filters_mutated_lock_held()


@dataclasses.dataclass(eq=False, kw_only=True)
class FunctionMode(Patch):
    """A torch function mode entered for the rest of the process (or until undone): the
    replacement handed to `install` is the mode object."""

    mode: str
    _mode: Any = dataclasses.field(default=None, init=False, repr=False)

    def what(self) -> str:
        return "torch's function-mode stack"

    def replaced_with(self) -> str:
        return self.mode

    @staticmethod
    def _stack():
        import torch

        return [torch._C._get_function_stack_at(i) for i in range(torch._C._len_torch_function_stack())]

    def installed(self) -> bool:
        return self._mode is not None and any(m is self._mode for m in self._stack())

    def install(self, replacement: Any = _UNSET, *, wrap: Optional[Callable] = None) -> bool:
        if replacement is _UNSET or wrap is not None:
            raise PatchError(f"{self.what()}: give the mode object to enter")
        if self.installed():
            return False
        replacement.__enter__()
        self._mode = replacement
        return True

    def undo(self) -> bool:
        if not self.installed():
            self._mode = None
            return False
        stack = self._stack()
        if stack[-1] is not self._mode:
            raise PatchError(f"{self.mode} is not the innermost torch function mode: exit the later ones first")
        self._mode.__exit__(None, None, None)
        self._mode = None
        return True


def install(patch: Patch, replacement: Any = _UNSET, *, wrap: Optional[Callable] = None) -> bool:
    """Install `patch` (see the module's docstring); returns whether this call installed it."""
    return patch.install(replacement, wrap=wrap)


def undo(*patches: Patch) -> None:
    """Undo `patches`, the last one first (give them in the order they were installed)."""
    for patch in reversed(patches):
        patch.undo()


@contextlib.contextmanager
def applied(patch: Patch, replacement: Any = _UNSET, *, wrap: Optional[Callable] = None):
    """`patch` installed for the block; undone at its end (however it ends) if this block
    installed it (an enclosing block that did keeps it)."""
    mine = patch.install(replacement, wrap=wrap)
    try:
        yield
    finally:
        if mine:
            patch.undo()


# -- the records --------------------------------------------------------------------------------
# megatron-core 0.16.1-0.19.2 and torch 2.x are the supported range (compat.py); a record says
# where only part of it needs the patch.

_CPU_WHEN = ("by `training/cpu.py:install_cpu_shims`, which each CPU entry point calls (training run, generate, bench "
             "worker, probe, tests' conftest; a no-op with CUDA); never undone (the process runs on CPU to its end)")
_CPU_VERSIONS = "megatron-core 0.16.1-0.19.2, torch 2.x"

CUDA_CURRENT_DEVICE = Attribute(
    target="torch.cuda", attribute="current_device", replacement="`training/cpu.py`: the CPU device",
    versions=_CPU_VERSIONS, when=_CPU_WHEN,
    why="megatron-core allocates on `torch.cuda.current_device()` (buffers, RNG, DDP)")
CUDA_SYNCHRONIZE = Attribute(
    target="torch.cuda", attribute="synchronize", replacement="`training/cpu.py`: a no-op",
    versions=_CPU_VERSIONS, when=_CPU_WHEN,
    why="megatron-core synchronizes in DDP, its timers, pipeline p2p and checkpoint saves")
CUDA_CURRENT_STREAM = Attribute(
    target="torch.cuda", attribute="current_stream", replacement="`training/cpu.py:_CPUStream` (the one CPU stream)",
    versions="megatron-core 0.19 (DDP's `start_grad_sync` waits on it), 0.16.1-0.19.2 MoE dispatcher",
    when=_CPU_WHEN, why="work on the CPU is already ordered: every wait is a no-op")
CUDA_STREAM_CLASS = Attribute(
    target="torch.cuda", attribute="Stream", replacement="`training/cpu.py:_CPUStream`, a class (constructing it "
    "answers the one CPU stream)", versions=_CPU_VERSIONS, when=_CPU_WHEN,
    why="the MoE all-to-all dispatcher makes a side stream for its split sizes' host copies; a class, so that "
        "`torch.cuda.Stream | None` at import (transformers) still works")
CUDA_STREAM_CONTEXT = Attribute(
    target="torch.cuda", attribute="stream", replacement="`training/cpu.py`: a context that does nothing",
    versions=_CPU_VERSIONS, when=_CPU_WHEN, why="the MoE dispatcher enters its side stream with `torch.cuda.stream`")
RNG_TRACKER = Attribute(
    target="megatron.core.tensor_parallel.random", attribute="_CUDA_RNG_STATE_TRACKER",
    replacement="`training/cpu.py`: Megatron's `CudaRNGStatesTracker` on the CPU generator",
    versions=_CPU_VERSIONS, when=_CPU_WHEN,
    why="the tracker forks CUDA generators; `model_parallel_cuda_manual_seed` then seeds this one unchanged")
RNG_TRACKER_INITIALIZED = Attribute(
    target="megatron.core.tensor_parallel.random", attribute="_CUDA_RNG_STATE_TRACKER_INITIALIZED",
    replacement="`True`", versions=_CPU_VERSIONS, when=_CPU_WHEN,
    why="else `get_cuda_rng_tracker()` replaces the CPU tracker with a new CUDA one")
GET_CUDA_RNG_STATE = Attribute(
    target="megatron.core.tensor_parallel.random", attribute="_get_cuda_rng_state",
    replacement="`training/cpu.py`: `torch.get_rng_state()`", versions=_CPU_VERSIONS, when=_CPU_WHEN,
    why="activation checkpointing saves \"the CUDA RNG state\" around the recomputation")
SET_CUDA_RNG_STATE = Attribute(
    target="megatron.core.tensor_parallel.random", attribute="_set_cuda_rng_state",
    replacement="`training/cpu.py`: `torch.set_rng_state()`", versions=_CPU_VERSIONS, when=_CPU_WHEN,
    why="and restores it (the pair of `GET_CUDA_RNG_STATE`)")
ALL_TO_ALL_TENSOR_SPLITS = Attribute(
    target="torch.distributed", attribute="all_to_all_single",
    replacement="`training/cpu.py`: the original, with split sizes given as tensors turned into lists",
    versions=_CPU_VERSIONS, when=_CPU_WHEN,
    why="the MoE dispatcher's split sizes are host copies (numpy) on a GPU, tensors on the CPU, which the gloo "
        "binding refuses; a function, not the mode below: the combine's backward runs outside the mode")
HYBRID_OPTIMIZER_SPLIT = Attribute(
    target="megatron.core.optimizer.cpu_offloading.hybrid_optimizer:HybridDeviceOptimizer",
    attribute="_get_sub_optimizer_param_groups",
    replacement="`training/cpu.py`: the original, with its parameters answering `is_cuda` true",
    versions=_CPU_VERSIONS, when=_CPU_WHEN,
    why="the optimizer CPU offload splits parameters by `is_cuda`: on the CPU none would be offloaded and its "
        "copy-back hook fails; this way the CPU run takes the GPU run's path")
CUDA_TO_CPU_MODE = FunctionMode(
    mode="`training/cpu.py:_CudaToCpuMode` (CUDA devices -> CPU, no pinned memory, `.cuda()` a no-op, CUDA "
         "type names)", versions=_CPU_VERSIONS, when=_CPU_WHEN,
    why="megatron-core writes `device='cuda'`, `.cuda()`, `pin_memory=True` and asserts "
        "`param.type() == 'torch.cuda.FloatTensor'` (docs/design.md §9)")
CPU_SHIMS = (CUDA_CURRENT_DEVICE, CUDA_SYNCHRONIZE, CUDA_CURRENT_STREAM, CUDA_STREAM_CLASS, CUDA_STREAM_CONTEXT,
             RNG_TRACKER, RNG_TRACKER_INITIALIZED, GET_CUDA_RNG_STATE, SET_CUDA_RNG_STATE, ALL_TO_ALL_TENSOR_SPLITS,
             HYBRID_OPTIMIZER_SPLIT, CUDA_TO_CPU_MODE)

TE_MIN_VERSION_WITHOUT_TE = Attribute(
    target="megatron.core.optimizer.optimizer_config", attribute="is_te_min_version",
    replacement="`compat.py`: answers False (Transformer Engine absent: no version of it)",
    versions="megatron-core 0.16.1 (0.19.2 answers itself)",
    when="by `compat.te_version_check_without_te` when an offloading optimizer is built without Transformer Engine; "
         "never undone",
    why="`OptimizerConfig.__post_init__` compares `get_te_version()`, None without TE, and raises TypeError")
TE_GENERAL_GEMM = Attribute(
    target="megatron.core.transformer.moe.moe_utils", attribute="te_general_gemm", absent="only",
    replacement="`None` (the torch path)", versions="megatron-core 0.16.1 (later versions bind it themselves)",
    when="by `compat.bind_missing_te_general_gemm` when an MoE model is built; never undone",
    why="the router gating tests `te_general_gemm is not None`, a name bound only when TE imports: NameError "
        "on every router call")
GPT_MODEL_DEPRECATION_NOTICE = LogFilter(
    records=(("megatron.core.models.gpt.gpt_model", r"GPTModel IS DEPRECATED"),),
    versions="megatron-core 0.19",
    when="by `compat.quiet_gpt_model_deprecation` while a TSPGPTModel (or inference's decode model) constructs; "
         "undone when it is built",
    why="TSPGPTModel stays a GPTModel (docs/supported.md); plain GPTModels keep the notice")

OFFLOAD_CHECKPOINT = Attribute(
    target="megatron.core.tensor_parallel", attribute="checkpoint",
    replacement="`tsp/offload.py:_checkpoint` (the original, with the chunk's input offloaded)",
    versions="megatron-core 0.16.1-0.19.2",
    when="by `tsp/offload.py` while an offloading decoder's forward runs (its forward pre-hook); undone when the "
         "outermost one ends (its `always_call` forward hook)",
    why="Megatron's TransformerBlock calls it by module attribute; the offload wraps each checkpointed layer input")
UNKNOWN_MLP_NOTICE = LogFilter(
    records=(("megatron.core.transformer.transformer_layer", r".*Unknown MLP type"),),
    versions="megatron-core 0.16.1 (0.19.2 no longer logs it)",
    when="by `tsp/specs.py` when the first TSP layer spec is built; never undone",
    why="TransformerLayer logs it for any MLP subclass, ours included")
FSDP_CPU_DEVICE_MESH = Attribute(
    target="megatron.core.distributed.torch_fully_sharded_data_parallel", attribute="DeviceMesh",
    replacement="`baselines/fsdp.py`: the original's `from_group` on device type cpu",
    versions="megatron-core 0.16.1-0.19.2",
    when="by `baselines/fsdp.py` while FSDP over CP wraps a model without CUDA; undone when it is built",
    why="Megatron's TorchFullyShardedDataParallel builds its mesh on device type cuda")

_PROBE_WHEN = "by `probe/__init__.py:fake_world` inside the probe's fake world; undone when it exits"
FAKE_WORLD_NEW_GROUP = Attribute(
    target="torch.distributed", attribute="new_group",
    replacement="`probe/__init__.py`: the original without `backend=` / `pg_options=`", versions="torch 2.x",
    when=_PROBE_WHEN, why="the fake backend cannot make the gloo groups and NCCL options Megatron asks for")
FAKE_WORLD_ALL_GATHER = Attribute(
    target="torch.distributed", attribute="all_gather_into_tensor",
    replacement="`probe/__init__.py`: integer tensors filled as in a rotation-symmetric world", versions="torch 2.x",
    when=_PROBE_WHEN, why="the MoE dispatcher sizes buffers from gathered token counts (left uninitialized otherwise)")
FAKE_WORLD_ALL_TO_ALL = Attribute(
    target="torch.distributed", attribute="all_to_all_single",
    replacement="`probe/__init__.py`: integer tensors filled as in a rotation-symmetric world", versions="torch 2.x",
    when=_PROBE_WHEN, why="the same, for the token counts' all-to-all")
FAKE_WORLD_MAPPINGS_ALL_GATHER = Attribute(
    target="megatron.core.tensor_parallel.mappings", attribute="dist_all_gather_func", absent="skip",
    replacement="as `FAKE_WORLD_ALL_GATHER`", versions="megatron-core 0.16.1-0.19.2", when=_PROBE_WHEN,
    why="megatron-core keeps its own reference to the all-gather")
FAKE_WORLD_UTILS_ALL_GATHER = Attribute(
    target="megatron.core.utils", attribute="dist_all_gather_func", absent="skip",
    replacement="as `FAKE_WORLD_ALL_GATHER`", versions="megatron-core 0.16.1-0.19.2", when=_PROBE_WHEN,
    why="megatron-core keeps its own reference to the all-gather")

_MLM_WHEN = "by `megatron_lm/hooks.py:install` (`megatron-tsp run`, the runner); never undone (the runner's process)"
_MLM_VERSIONS = "Megatron-LM core_v0.16.1-core_v0.19.0 (`megatron_lm/hooks.py:SUPPORTED_TAGS`)"
MLM_ADD_ARGUMENTS = Attribute(
    target="megatron.training.arguments", attribute="add_megatron_arguments",
    replacement="`megatron_lm/hooks.py`: the original, then the `--tsp-*` flags", versions=_MLM_VERSIONS,
    when=_MLM_WHEN, why="`--tsp-size` and friends in Megatron-LM's own parser, mapped before `validate_args`")
MLM_GPT_BUILDER = Attribute(
    target="gpt_builders", attribute="gpt_builder", replacement="`megatron_lm/hooks.py:tsp_gpt_builder`",
    versions="Megatron-LM core_v0.16.1-core_v0.18.2 (the model provider's builder)", when=_MLM_WHEN,
    why="the TSP model behind the model provider")
MLM_GPT_CONFIG_FROM_ARGS = Attribute(
    target="megatron.training.argument_utils", attribute="gpt_config_from_args", absent="skip",
    replacement="`megatron_lm/hooks.py:tsp_gpt_config_from_args`",
    versions="Megatron-LM core_v0.19.0+ (`pretrain` builds the model its config names)", when=_MLM_WHEN,
    why="the model config names the TSP model builder")
MLM_SETUP_MODEL_AND_OPTIMIZER = Attribute(
    target="megatron.training.training", attribute="setup_model_and_optimizer",
    replacement="`megatron_lm/hooks.py`: the original, then `check_built_model`", versions=_MLM_VERSIONS,
    when=_MLM_WHEN, why="a script whose model path bypasses the builders cannot train Megatron's model under "
                        "`--tsp-size`")
_HELPERS_WHEN = ("by `megatron_lm/hooks.py:_use_packaged_dataset_helpers` when the TSP flags are added to "
                 "Megatron-LM's parser; never undone")
MLM_DATASET_HELPERS = Attribute(
    target="megatron.core.datasets", attribute="helpers_cpp", absent="only",
    replacement="`megatron_lm/hooks.py`: the installed megatron-core's compiled helpers of the same helpers.cpp",
    versions=_MLM_VERSIONS + ", a tree next to an installed megatron-core",
    when=_HELPERS_WHEN,
    why="Megatron-LM compiles its dataset helpers at start-up with `make` (needs pybind11); the installed "
        "module is also put into `sys.modules`, as an import would")
MLM_COMPILE_HELPERS = Attribute(
    target="megatron.core.datasets.utils", attribute="compile_helpers",
    replacement="`megatron_lm/hooks.py`: prints which compiled helpers are used", versions=_MLM_VERSIONS,
    when=_HELPERS_WHEN,
    why="with compiled helpers of the same source at hand, `make` is skipped: the megatron-core wheel ships them "
        "compiled without the Makefile (`make` would fail and Megatron exit)")

# Known-benign output of megatron-core and torch (output.py's docstring says where each comes from).
_ENTRY_WHEN = "by `output.hide_benign_output` at a command's start (not with --verbose); never undone"
BENIGN_WARNINGS = WarningFilter(
    filters=(
        (r".*(Transformer Engine|Apex) (and Apex )?(is|are) not installed", Warning),
        (r".*absl\.logging is not installed", Warning),
        (r".*CUDA_DEVICE_MAX_CONNECTIONS", Warning),
        (r".*is experimental and still under active development", Warning),
        # Megatron's expert MLPs (SequentialMLP) are built from the model's config, whose sequence_parallel is on
        # (TSP / TP+SP), on the expert tensor-parallel group, of size 1 here (the dispatcher hands each expert
        # whole tokens): their linears say they turn SP off, once per rank. Megatron-LM at TP+SP with
        # expert_tensor_parallel_size=1 prints it too; nothing to act on. Size 1 only.
        (r"`sequence_parallel` is set to `True`, but tensor model parallel size is 1\. Disabling sequence parallel",
         Warning),
        # torch's distributed checkpoint while megatron-core loads a checkpoint's common part and metadata
        # (no_dist on purpose) and calls load with its older argument order: on every resume, per rank.
        (r"torch\.distributed is disabled, unavailable or uninitialized, assuming the intent is to load in a single",
         Warning),
        (r"The argument order of load has been changed", Warning),
        ("", FutureWarning),
    ),
    versions="megatron-core 0.16.1-0.19.2, torch 2.x", when=_ENTRY_WHEN,
    why="notices with nothing to act on, once per rank (TE / apex / absl absent, CPU machine, checkpoint API)")
BENIGN_LOG_RECORDS = LogFilter(
    records=(
        ("megatron.core.datasets.gpt_dataset", r"Unable to save \w+ indexes"),
        ("megatron.core.datasets.blended_megatron_dataset_builder", r"Unable to save \w+ indexes"),
        ("torch.utils.cpp_extension", r"No CUDA runtime is found"),
        # every save, per rank: megatron-core's own save path (dist_checkpointing.save) logs it
        ("megatron.core.dist_checkpointing.strategies.torch", r"MCore's async save is deprecated"),
    ),
    versions="megatron-core 0.16.1-0.19.2, torch 2.x", when=_ENTRY_WHEN,
    why="the mock dataset's index cache, a CPU machine, megatron-core's own save path: nothing to act on")
TRAIN_DEPRECATION_WARNINGS = WarningFilter(
    filters=((r".*deprecated.*", Warning),), versions="megatron-core 0.16.1-0.19.2, torch 2.x",
    when="by `training/loop.py:main` (a training worker's start, also with --verbose); never undone",
    why="megatron-core's and torch's deprecation notes about their own internals, per rank")
GENERATE_WARNINGS = WarningFilter(
    filters=((r".*(Apex|Transformer Engine|deprecated|DEPRECATED).*", Warning), ("", FutureWarning)),
    versions="megatron-core 0.16.1-0.19.2, torch 2.x",
    when="by `inference/cli.py:main` (a generate worker's start); never undone",
    why="the generated text is the output: TE / apex absence and deprecation notes, per rank")
BENCH_WORKER_WARNINGS = WarningFilter(
    filters=(("", Warning),), versions="megatron-core 0.16.1-0.19.2, torch 2.x",
    when="by `bench/worker.py:worker` (a benchmark worker's start); never undone",
    why="a worker's output is its rows and failure records; the launcher reports")


def records() -> Tuple[Patch, ...]:
    """Every record, in the order of this file."""
    return tuple(v for v in globals().values() if isinstance(v, Patch))


def inventory() -> str:
    """docs/architecture.md's patch inventory: the records, one table per `when`."""
    out, when = [], None
    for name, value in globals().items():
        if not isinstance(value, Patch):
            continue
        if value.when != when:
            when = value.when
            out += ["" if out else None, f"Installed {when}:", "",
                    "| record | replaces | with | versions | why |", "|---|---|---|---|---|"]
        cells = (f"`{name}`", value.what(), value.replaced_with(), value.versions, value.why)
        out.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(line for line in out if line is not None) + "\n"


if __name__ == "__main__":
    print(inventory(), end="")
