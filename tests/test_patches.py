"""Every patch fenced (megatron_tsp/patches.py): each record's undo puts back the very object it
replaced (an absent attribute absent again, a filter or mode removed), installing twice is a
no-op, a target missing from the installed version fails at install, stacked patches undo in
order; and, read from the source with `ast` as tests/test_layering.py reads imports, no module
but patches.py assigns an attribute of torch / megatron / Megatron-LM, adds a logging filter, sets
a warnings filter outside `warnings.catch_warnings()` or enters a mode for good (each rule
catches a planted violation). docs/architecture.md's inventory is the records' own."""

import ast
import contextlib
import logging
import os
import sys
import types
import warnings

import pytest
import torch

from megatron_tsp import patches
from tests.utils import run_with_torch_blocked

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PKG = os.path.join(REPO, "megatron_tsp")
MEGATRON_LM = ("megatron.training", "gpt_builders")  # Megatron-LM's modules: not installed with megatron-core


def _owner_or_stand_in(p: patches.Attribute, monkeypatch):
    """The record's target, or for Megatron-LM's modules (absent here) a stand-in module holding
    the attribute, put into sys.modules for the test."""
    module = p.target.partition(":")[0]
    try:
        return p.owner()
    except ImportError:
        if not module.startswith(MEGATRON_LM):
            raise
    stand_in = types.ModuleType(module)
    setattr(stand_in, p.attribute, lambda *a, **k: None)
    monkeypatch.setitem(sys.modules, module, stand_in)
    assert p.owner() is stand_in
    return stand_in


_MISSING = object()


@pytest.mark.parametrize("p", [p for p in patches.records() if isinstance(p, patches.Attribute)],
                         ids=lambda p: p.what())
def test_attribute_patch_undo_restores_the_original(p, monkeypatch):
    owner = _owner_or_stand_in(p, monkeypatch)
    if owner is None:  # absent="skip": a module of other versions only
        assert p.absent == "skip" and not p.install(object())
        return
    if p.installed():  # the CPU shims (tests/conftest.py): installing again changes nothing
        value = vars(owner)[p.attribute]
        assert not p.install(object()) and vars(owner)[p.attribute] is value
        return
    before = vars(owner).get(p.attribute, _MISSING)
    present = hasattr(owner, p.attribute)
    mine, other, seen = object(), object(), []
    if (p.absent == "only") == present:  # nothing to patch in this version
        assert not p.install(mine) and vars(owner).get(p.attribute, _MISSING) is before and not p.installed()
        return
    if present:
        resolved = getattr(owner, p.attribute)
        assert p.install(wrap=lambda original: seen.append(original) or mine)
        assert len(seen) == 1 and seen[0] is resolved  # `wrap` builds around what it replaces
    else:
        assert p.install(mine)
    assert getattr(owner, p.attribute) is mine and p.installed()
    assert not p.install(other) and getattr(owner, p.attribute) is mine  # twice: a no-op
    assert p.undo() and not p.installed()
    assert vars(owner).get(p.attribute, _MISSING) is before  # the very object (or absent again)
    assert not p.undo()


def _fake_module(monkeypatch, **attributes):
    module = types.ModuleType("megatron_tsp_fake_target")
    for name, value in attributes.items():
        setattr(module, name, value)
    monkeypatch.setitem(sys.modules, module.__name__, module)
    return module


def _record(attribute="f", absent="error"):
    return patches.Attribute(target="megatron_tsp_fake_target", attribute=attribute, replacement="test",
                             absent=absent, versions="none", why="a test", when="in a test")


def test_missing_target_fails_at_install(monkeypatch):
    _fake_module(monkeypatch)
    with pytest.raises(patches.PatchError, match=r"megatron_tsp_fake_target\.f` does not exist .* for none"):
        _record().install(1)
    assert not _record(absent="skip").install(1)
    with pytest.raises(patches.PatchError, match="replacement or `wrap`"):
        _record().install()


def test_absent_only_creates_and_deletes(monkeypatch):
    module = _fake_module(monkeypatch)
    p = _record(absent="only")
    assert p.install(None) and module.f is None and p.installed()
    assert not p.install(None)
    assert p.undo() and not hasattr(module, "f")
    module.f = original = object()
    assert not p.install(None) and module.f is original  # the version binds it: left alone


def test_class_attribute_inherited_is_deleted_again(monkeypatch):
    class Base:
        def f(self):
            return "base"

    class Child(Base):
        pass

    _fake_module(monkeypatch, Child=Child)
    p = patches.Attribute(target="megatron_tsp_fake_target:Child", attribute="f", replacement="test",
                          versions="none", why="a test", when="in a test")
    assert p.install(wrap=lambda f: lambda self: "patched " + f(self))
    assert Child().f() == "patched base"
    p.undo()
    assert "f" not in vars(Child) and Child().f() == "base"


def test_stacked_patches_undo_in_order(monkeypatch):
    module = _fake_module(monkeypatch, f=print)
    lower, upper = _record(), _record()
    lower.install(1)
    upper.install(wrap=lambda one: one + 1)
    assert module.f == 2 and lower.installed() and upper.installed()
    assert not lower.install(5) and module.f == 2  # still in place, under the other
    with pytest.raises(patches.PatchError, match="replaced again after this patch"):
        lower.undo()
    patches.undo(lower, upper)  # the last one first
    assert module.f is print and not lower.installed() and not upper.installed()


def test_applied_undoes_only_what_it_installed(monkeypatch):
    module = _fake_module(monkeypatch, f=print)
    p = _record()
    with pytest.raises(KeyError):
        with patches.applied(p, 1):
            assert module.f == 1
            with patches.applied(p, 2):  # nested: the outer one's stays
                assert module.f == 1
            assert module.f == 1
            raise KeyError
    assert module.f is print
    p.install(4)
    module.f = print  # put back behind the patch's back (a test's monkeypatch): not installed any more
    assert not p.installed() and not p.undo() and module.f is print
    assert p.install(5) and module.f == 5


# What megatron-core and torch say, as they say it: each filter's pattern must drop its message.
SAMPLES = {
    r"GPTModel IS DEPRECATED": "GPTModel IS DEPRECATED. GPTModel is only accepting critical bug fixes",
    r".*Unknown MLP type": "Unknown MLP type: <class 'megatron_tsp.tsp.mlp.TSPMLP'>. Using default kwargs.",
    r"Unable to save \w+ indexes": "Unable to save MockGPTDataset indexes because path_to_cache is None",
    r"No CUDA runtime is found": "No CUDA runtime is found, using CUDA_HOME='/usr/local'",
    r"MCore's async save is deprecated": "MCore's async save is deprecated and will be removed in the future releases.",
    r".*(Transformer Engine|Apex) (and Apex )?(is|are) not installed":
        "Transformer Engine and Apex are not installed. Falling back to Torch optimizers.",
    r".*absl\.logging is not installed": "absl.logging is not installed. Using logging.getLogger(__name__) instead.",
    r".*CUDA_DEVICE_MAX_CONNECTIONS": "When using sequence parallelism it is recommended to set the environment "
                                      "variable CUDA_DEVICE_MAX_CONNECTIONS to 1 for maximum speedup",
    r".*is experimental and still under active development":
        "ProcessGroupCollection is experimental and still under active development",
    r"`sequence_parallel` is set to `True`, but tensor model parallel size is 1\. Disabling sequence parallel":
        "`sequence_parallel` is set to `True`, but tensor model parallel size is 1. Disabling sequence parallel.",
    r"torch\.distributed is disabled, unavailable or uninitialized, assuming the intent is to load in a single":
        "torch.distributed is disabled, unavailable or uninitialized, assuming the intent is to load in a single "
        "process.",
    r"The argument order of load has been changed": "The argument order of load has been changed. Please check "
                                                    "the document to avoid future breakages.",
    r".*deprecated.*": "`torch.cuda.amp.custom_fwd(args...)` is deprecated.",
    r".*(Apex|Transformer Engine|deprecated|DEPRECATED).*": "Apex is not installed. Falling back to Torch Norm",
    "": "anything at all",
}


@pytest.mark.parametrize("p", [p for p in patches.records() if isinstance(p, patches.LogFilter)],
                         ids=lambda p: p.what())
def test_log_filter_drops_its_records_and_undo_restores(p):
    was_installed = p.installed()  # by an earlier test of this process (a TSP spec installs its filter once)
    if was_installed:
        assert p.undo()
    try:
        _check_log_filter(p)
    finally:
        if was_installed:
            p.install()


def _check_log_filter(p):
    loggers = [logging.getLogger(name) for name, _ in p.records]
    before = [list(logger.filters) for logger in loggers]

    def passes(logger, message):
        return logger.filter(logging.LogRecord(logger.name, logging.WARNING, __file__, 1, message, None, None))

    assert p.install() and p.installed()
    for logger, (_, pattern) in zip(loggers, p.records):
        assert not passes(logger, SAMPLES[pattern]), f"{pattern} does not drop its message"
        assert passes(logger, "something else")
    after = [list(logger.filters) for logger in loggers]
    assert not p.install() and [list(logger.filters) for logger in loggers] == after  # twice: a no-op
    with pytest.raises(patches.PatchError):
        p.install(object())
    assert p.undo() and not p.installed() and not p.undo()
    for logger, filters in zip(loggers, before):
        assert len(logger.filters) == len(filters) and all(x is y for x, y in zip(logger.filters, filters))
        assert passes(logger, SAMPLES[dict(p.records)[logger.name]])


@pytest.mark.parametrize("p", [p for p in patches.records() if isinstance(p, patches.WarningFilter)],
                         ids=lambda p: p.when.split("`")[1])
def test_warning_filter_ignores_and_undo_restores(p):
    with warnings.catch_warnings():
        warnings.resetwarnings()
        warnings.filterwarnings("error")  # what is not ignored raises
        warnings.filterwarnings("ignore", message="unrelated")  # there before: stays
        before = list(warnings.filters)
        assert p.install() and p.installed()
        for message, category in p.filters:
            warnings.warn(SAMPLES[message], category)  # ignored, or this raises
        every_warning = ("", Warning) in p.filters
        with contextlib.nullcontext() if every_warning else pytest.raises(UserWarning):
            warnings.warn("a warning the user must see", UserWarning)
        after = list(warnings.filters)
        assert not p.install() and warnings.filters == after  # twice: a no-op
        assert p.undo() and not p.installed() and not p.undo()
        assert len(warnings.filters) == len(before) and all(x is y for x, y in zip(warnings.filters, before))
        with pytest.raises(UserWarning):
            warnings.warn(SAMPLES[p.filters[0][0]], UserWarning)


def test_warning_filter_leaves_an_entry_it_did_not_add():
    with warnings.catch_warnings():
        warnings.resetwarnings()
        warnings.filterwarnings("ignore", category=FutureWarning)  # BENIGN_WARNINGS has this one too
        patches.BENIGN_WARNINGS.install()
        patches.BENIGN_WARNINGS.undo()
        assert warnings.filters == [("ignore", None, FutureWarning, None, 0)]


def test_function_mode_patch():
    from torch.overrides import TorchFunctionMode

    class Mode(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    p = patches.FunctionMode(mode="a test mode", versions="none", why="a test", when="in a test")
    depth = torch._C._len_torch_function_stack()
    assert p.install(Mode()) and p.installed() and torch._C._len_torch_function_stack() == depth + 1
    assert not p.install(Mode()) and torch._C._len_torch_function_stack() == depth + 1
    with Mode():  # another mode on top: undo refuses
        with pytest.raises(patches.PatchError, match="not the innermost"):
            p.undo()
    assert p.undo() and torch._C._len_torch_function_stack() == depth and not p.undo()
    assert patches.CUDA_TO_CPU_MODE.installed() == (not torch.cuda.is_available())  # conftest's shims


# -- nobody else patches: the source, read with ast ---------------------------------------------

# Top-level packages whose state only patches.py replaces.
PATCHED_ROOTS = ("torch", "megatron", "gpt_builders", "pretrain_gpt", "transformer_engine", "apex")
WARNINGS_SETTERS = ("filterwarnings", "simplefilter", "resetwarnings")


def _root(node):
    """The name an attribute / subscript chain starts from (None through a call: a fresh object)."""
    while isinstance(node, (ast.Attribute, ast.Subscript)):
        node = node.value
    return node.id if isinstance(node, ast.Name) else None


_SCOPES = (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef)


def _in_scope(body):
    """The nodes of one scope: its statements, not those of the functions / classes inside it."""
    stack = list(body)
    while stack:
        node = stack.pop()
        yield node
        stack.extend(child for child in ast.iter_child_nodes(node) if not isinstance(child, _SCOPES))


def _bound_names(target):
    """The names a plain assignment target binds (`x`, `x, y`), not those inside `x.attr = ...`."""
    if isinstance(target, ast.Name):
        return [target.id]
    if isinstance(target, (ast.Tuple, ast.List)):
        return [n for t in target.elts for n in _bound_names(t.value if isinstance(t, ast.Starred) else t)]
    return []


def _external_names(body, outer: frozenset, params=()) -> frozenset:
    """The names of one scope bound to torch / megatron / Megatron-LM objects: the enclosing
    scope's (less this scope's parameters), this scope's imports of them, and, to a fixed point,
    names assigned an attribute chain of one (`cls = module.Class`)."""
    names = set(outer) - set(params)
    nodes = list(_in_scope(body))
    for node in nodes:
        if isinstance(node, ast.Import):
            names.update((a.asname or a.name).split(".")[0] for a in node.names
                         if a.name.split(".")[0] in PATCHED_ROOTS)
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module.split(".")[0] in PATCHED_ROOTS:
            names.update(a.asname or a.name for a in node.names)
    grown = True
    while grown:
        grown = False
        for node in nodes:
            if isinstance(node, (ast.Assign, ast.AnnAssign)) and node.value is not None and _root(node.value) in names:
                for target in node.targets if isinstance(node, ast.Assign) else [node.target]:
                    for n in _bound_names(target):
                        grown |= n not in names
                        names.add(n)
    return frozenset(names)


def _parameters(node):
    if isinstance(node, ast.ClassDef):
        return ()
    a = node.args
    return [x.arg for x in a.posonlyargs + a.args + a.kwonlyargs + [v for v in (a.vararg, a.kwarg) if v]]


def violations(source: str, name: str) -> list:
    """What `source` (module `name`) does that only patches.py may do."""
    tree = ast.parse(source)
    bad = []

    def say(node, what):
        bad.append(f"{name}:{node.lineno} {what}: {ast.unparse(node)[:100]}")

    def visit(node, external, in_catch_warnings):
        if isinstance(node, _SCOPES):
            body = node.body if isinstance(node.body, list) else [node.body]
            external = _external_names(body, external, _parameters(node))
        if isinstance(node, ast.With) and any(
                isinstance(i.context_expr, ast.Call) and ast.unparse(i.context_expr.func).endswith("catch_warnings")
                for i in node.items):
            in_catch_warnings = True
        targets = []
        if isinstance(node, (ast.Assign, ast.Delete)):
            targets = node.targets
        elif isinstance(node, (ast.AugAssign, ast.AnnAssign)):
            targets = [node.target]
        for target in targets:
            for t in ast.walk(target):
                if isinstance(t, (ast.Attribute, ast.Subscript)) and _root(t) in external:
                    say(node, "replaces torch / megatron state")
                    break
        if isinstance(node, ast.Call):
            func = node.func
            if isinstance(func, ast.Name) and func.id in ("setattr", "delattr") and node.args \
                    and _root(node.args[0]) in external:
                say(node, "replaces torch / megatron state")
            if isinstance(func, ast.Attribute) and func.attr in ("addFilter", "removeFilter"):
                say(node, "changes a logger's filters")
            called = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
            if called in WARNINGS_SETTERS and not in_catch_warnings:
                say(node, "sets a warnings filter for the process")
            if isinstance(func, ast.Attribute) and func.attr == "__enter__" and isinstance(func.value, ast.Call):
                say(node, "enters an object it does not keep (never exited)")
        for child in ast.iter_child_nodes(node):
            visit(child, external, in_catch_warnings)

    visit(tree, _external_names(tree.body, frozenset()), False)
    return bad


def package_sources():
    for root, _, files in os.walk(PKG):
        for f in sorted(files):
            if f.endswith(".py"):
                path = os.path.join(root, f)
                yield os.path.relpath(path, REPO), open(path).read()


def test_only_the_patch_module_patches():
    bad = [v for name, source in package_sources() if name != os.path.join("megatron_tsp", "patches.py")
           for v in violations(source, name)]
    assert not bad, "patch through megatron_tsp/patches.py (a record, then install / applied):\n" + "\n".join(bad)


PLANTED = {
    "module_attribute": "\n\ndef _x():\n    torch.cuda.synchronize = None\n",
    "imported_module": "\n\ndef _x():\n    from megatron.core import tensor_parallel as tp\n    tp.checkpoint = None\n",
    "class_alias": ("\n\ndef _x():\n    from megatron.core.optimizer import optimizer as o\n"
                    "    cls = o.MegatronOptimizer\n    cls.step = None\n"),
    "setattr": "\n\ndef _x(f):\n    import torch.distributed as dist\n    setattr(dist, 'new_group', f)\n",
    "log_filter": "\n\ndef _x(f):\n    import logging\n    logging.getLogger('megatron.core').addFilter(f)\n",
    "warnings_filter": "\n\ndef _x():\n    import warnings\n    warnings.filterwarnings('ignore')\n",
    "mode_for_good": "\n\ndef _x(Mode):\n    Mode().__enter__()\n",
}


@pytest.mark.parametrize("planted", sorted(PLANTED))
def test_the_rule_catches_a_planted_patch(planted):
    """Test the test: one module (tsp/rope.py, which imports torch) with one planted patch fails."""
    path = os.path.join(PKG, "tsp", "rope.py")
    source = open(path).read()
    assert not violations(source, "rope")
    assert violations(source + PLANTED[planted], "rope"), planted


def test_scoped_warnings_filters_are_allowed():
    source = ("import warnings\n\ndef _x():\n    with warnings.catch_warnings():\n"
              "        warnings.simplefilter('ignore')\n")
    assert not violations(source, "x")


def test_every_record_is_used_and_every_use_is_a_record():
    names = {n for n, v in vars(patches).items() if isinstance(v, patches.Patch)}
    used = set()
    for name, source in package_sources():
        if name == os.path.join("megatron_tsp", "patches.py"):
            continue
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "patches" \
                    and node.attr.isupper():
                used.add(node.attr)
    assert not used - names - {"CPU_SHIMS"}, used - names
    assert not names - used, f"records nothing installs: {sorted(names - used)}"
    assert len(patches.records()) == len(names)


def test_the_inventory_in_the_docs_is_the_records():
    doc = open(os.path.join(REPO, "docs", "architecture.md")).read()
    begin, end = "<!-- patches.inventory() -->\n", "<!-- end of patches.inventory() -->"
    assert begin in doc and end in doc
    table = doc.split(begin, 1)[1].split(end, 1)[0]
    assert table == patches.inventory(), ("docs/architecture.md's patch inventory differs from the records: "
                                          "regenerate it with `python -m megatron_tsp.patches`")
    assert all(f"`{n}`" in table for n, v in vars(patches).items() if isinstance(v, patches.Patch))


def test_patch_module_imports_no_torch_or_megatron():
    """output.py (the launcher, `--help`) installs its filters through patches.py: neither imports
    torch or megatron; installing a filter record works with both blocked."""
    out = run_with_torch_blocked("from megatron_tsp import output, patches\n"
                                 "output.hide_benign_output(announce=False)\n"
                                 "assert patches.BENIGN_WARNINGS.installed() and patches.BENIGN_LOG_RECORDS.installed()\n"
                                 "print(patches.inventory(), end='')\n")
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout == patches.inventory()


def test_offload_checkpoint_is_scoped_to_the_forward():
    """`tsp/offload.py`: Megatron's checkpoint is replaced by the pre-hook of an offloading
    decoder's forward and back (the very object) after it, also when the forward raises."""
    from megatron.core import tensor_parallel

    from megatron_tsp.tsp import offload

    class Decoder(torch.nn.Module):
        def forward(self, x, fail=False):
            self.seen = tensor_parallel.checkpoint
            if fail:
                raise KeyError
            return x

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.config = types.SimpleNamespace(recompute_granularity="full", distribute_saved_activations=False,
                                                hidden_size=4)
            self.decoder = Decoder()

    megatrons = tensor_parallel.checkpoint
    model = Model()
    offload.offload_layer_inputs(model)
    model.decoder(torch.ones(1))
    assert model.decoder.seen is not megatrons and model.decoder.seen.func is offload._checkpoint
    assert model.decoder.seen.args == (megatrons,) and tensor_parallel.checkpoint is megatrons
    with pytest.raises(KeyError):
        model.decoder(torch.ones(1), fail=True)
    assert tensor_parallel.checkpoint is megatrons and not patches.OFFLOAD_CHECKPOINT.installed()
