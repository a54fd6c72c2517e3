"""Importing megatron_tsp patches nothing: every module of the package imported in a fresh
process leaves megatron.core.parallel_state, torch.cuda, Megatron's RNG helpers, every target of
megatron_tsp/patches.py's records, the loggers' and warnings filters and torch's dispatch /
function-mode stacks as they were. The patches happen only when asked for: an entry point that
runs on CPU calls `install_cpu_shims` (the test of the test: calling it does change what is
checked), and undoing its records puts every watched object back."""

import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CODE = r"""
import importlib, pkgutil, sys, warnings
warnings.simplefilter("ignore")
import torch
from megatron.core import parallel_state as mpu
from megatron.core import tensor_parallel
from megatron.core.tensor_parallel import random as mrandom
import importlib.util
# the records, read without importing the package (its __init__ is part of what is checked)
spec = importlib.util.spec_from_file_location("_records", "megatron_tsp/patches.py")
records = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = records  # dataclasses look their module up there
spec.loader.exec_module(records)
targets = []
for p in records.records():
    if isinstance(p, records.Attribute):
        try:
            owner = p.owner()
        except ImportError:  # Megatron-LM's modules: not installed here
            continue
        if owner is not None:
            targets.append((p.what(), owner, p.attribute))

def snapshot():
    watched = {"mpu." + k: id(v) for k, v in vars(mpu).items() if not k.startswith("__")}
    watched.update({"torch.cuda." + k: id(getattr(torch.cuda, k))
                    for k in ("current_device", "synchronize", "current_stream", "Stream", "stream")})
    watched["tensor_parallel.checkpoint"] = id(tensor_parallel.checkpoint)
    import logging
    watched.update({"logger " + name: tuple(map(id, logger.filters)) for name, logger in logging.Logger.manager.loggerDict.items()
                    if isinstance(logger, logging.Logger) and logger.filters})
    watched.update({"mrandom." + k: id(v) for k, v in vars(mrandom).items() if callable(v)})
    watched["modes"] = (torch._C._len_torch_dispatch_stack(), torch._C._len_torch_function_stack())
    watched.update({"record " + what: id(vars(owner).get(attribute)) for what, owner, attribute in targets})
    watched["warnings.filters"] = tuple(warnings.filters)
    return watched

before = snapshot()
import megatron_tsp
skipped = []
for m in sorted(pkgutil.walk_packages(megatron_tsp.__path__, "megatron_tsp."), key=lambda m: m.name):
    try:
        importlib.import_module(m.name)
    except ImportError as e:  # Megatron-LM (megatron.training) is not installed here
        if "megatron.training" not in str(e) and "gpt_builders" not in str(e):
            raise
        skipped.append(m.name)
for name in megatron_tsp.__all__:
    getattr(megatron_tsp, name)
after = snapshot()
changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
print("CHANGED", changed)
print("SKIPPED", skipped)
if sys.argv[1:] == ["shims"]:
    from megatron_tsp.training.cpu import install_cpu_shims
    install_cpu_shims()
    print("AFTER SHIMS", sorted(k for k in after if after[k] != snapshot().get(k)))
    # torch.cuda.Stream stays a class: `torch.cuda.Stream | None` at import time (transformers) works
    print("STREAM", [isinstance(torch.cuda.Stream, type), isinstance(torch.cuda.Stream(), torch.cuda.Stream),
                     torch.cuda.Stream() is torch.cuda.current_stream(), str(torch.cuda.Stream | None) != ""])
    from megatron_tsp import patches
    patches.undo(*patches.CPU_SHIMS)
    print("UNDONE", sorted(k for k in set(after) | set(snapshot()) if after.get(k) != snapshot().get(k)))
"""


def _run(*args):
    out = subprocess.run([sys.executable, "-c", CODE, *args], cwd=REPO, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "PYTHONPATH": REPO})
    assert out.returncode == 0, out.stderr[-3000:]
    return {line.split(" ", 1)[0] if not line.startswith("AFTER") else "AFTER": eval(line.split(" ", 1)[1].replace("SHIMS ", ""))
            for line in out.stdout.splitlines() if line.startswith(("CHANGED", "SKIPPED", "AFTER", "STREAM", "UNDONE"))}


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="the shims are CPU-only")
def test_importing_the_package_patches_nothing():
    res = _run("shims")
    assert res["CHANGED"] == []
    # the modules that need Megatron-LM's megatron.training are the only ones not imported here
    assert all(m.startswith("megatron_tsp.megatron_lm.") for m in res["SKIPPED"]), res["SKIPPED"]
    # test the test: the CPU shims, once installed, are seen
    assert "torch.cuda.current_device" in res["AFTER"] and "modes" in res["AFTER"]
    assert "record `torch.distributed.all_to_all_single`" in res["AFTER"]
    assert res["STREAM"] == [True, True, True, True]
    assert res["UNDONE"] == []  # the CPU shims' records undone: every watched object is the original again
