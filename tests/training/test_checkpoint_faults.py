"""What a save does when the disk fills up (ENOSPC, simulated where megatron-core writes each
shard's bytes, and where rank 0 writes the file list): every rank raises one error naming the
directory, the partial step is removed, `latest` and the checkpoint it names stay as they were,
and a resume continues from there. train.keep_checkpoints keeps the newest complete ones."""

import errno
import os

import pytest

from megatron_tsp.training import checkpoint as ckpt_module
from megatron_tsp.training.checkpoint import CheckpointSaveError
from megatron_tsp.training.checkpoint_files import checkpoint_problem, latest_step, step_dir, step_dirs
from megatron_tsp.training.loop import run
from megatron_tsp.training.recipe import load_recipe

pytestmark = pytest.mark.distributed  # in-process runs at world 1 and 2 (TSP 2; skips at 4)

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = os.path.join(REPO, "configs", "tiny.yaml")
COMMON = ["train.log_interval=100", "train.progress_bar=false", "model.num_layers=1",
          "train.save_interval=2"]


def _disk_full(*_args, **_kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _fail_shard_writes(monkeypatch):
    """Every shard write fails as on a full disk (megatron-core's writer and torch's own)."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async
    from torch.distributed.checkpoint import filesystem

    monkeypatch.setattr(filesystem_async, "_write_item", _disk_full)
    monkeypatch.setattr(filesystem, "_write_item", _disk_full)


def _fail_file_list(monkeypatch):
    monkeypatch.setattr(ckpt_module, "write_manifest", _disk_full)


def _fail_metadata(monkeypatch):
    """Rank 0's `.metadata` (torch's writer's finish, which megatron-core's calls after every shard)."""
    from torch.distributed.checkpoint import filesystem

    monkeypatch.setattr(filesystem._FileSystemWriter, "finish", _disk_full)


def _fail_config(monkeypatch):
    """Rank 0's metadata.json (megatron-core's save_config, the save's last write)."""
    import json
    from types import SimpleNamespace

    from megatron.core.dist_checkpointing import core

    monkeypatch.setattr(core, "json", SimpleNamespace(dump=_disk_full, load=json.load))  # the resume reads it


def test_keep_checkpoints_and_a_full_disk_during_a_save(world, shared_tmp_path, monkeypatch):
    """At world 2 (TSP 2) the shard write fails on rank 1 alone: every rank still raises,
    and rank 0's line quotes rank 1's errno. Rank 0's own writes (`.metadata`, metadata.json, the file
    list) fail while the others wait for it in a collective of megatron-core's: they raise at once, not
    after the collective timeout (30 s here; the test's time shows a wait)."""
    import torch.distributed as dist

    if world > 2:
        pytest.skip("worlds 1 and 2")
    save_dir = os.path.join(shared_tmp_path, "faults_ckpt")
    common = COMMON + [f"parallel.size={world}"]  # TSP over the world: every rank writes shards of its own
    run(load_recipe(TINY, common + ["train.steps=6", f"train.save_dir={save_dir}", "train.keep_checkpoints=2"]))
    assert step_dirs(save_dir) == [4, 6] and latest_step(save_dir) == 6  # step 2 removed once 4 and 6 were complete
    files_before = sorted(os.listdir(step_dir(save_dir, 6)))

    failing = world - 1  # the rank whose write fails (the file list: always rank 0, which writes it)
    for fail in (_fail_shard_writes, _fail_metadata, _fail_config, _fail_file_list):
        with monkeypatch.context() as m:
            if dist.get_rank() == (failing if fail is _fail_shard_writes else 0):
                fail(m)
            with pytest.raises(CheckpointSaveError) as e:
                run(load_recipe(TINY, common + ["train.steps=8", f"train.save_dir={save_dir}", "train.resume=true",
                                                "train.keep_checkpoints=1", "train.collective_timeout_s=30"]))
        text = str(e.value)
        who = failing if fail is _fail_shard_writes else 0
        assert "\n" not in text, text
        assert f"saving the checkpoint of step 8 in {save_dir} failed (rank {who}: No space left on device [errno 28]" \
            in text, text
        assert f"{save_dir}/latest still names step 6" in text, text
        assert latest_step(save_dir) == 6 and step_dirs(save_dir) == [4, 6], fail  # nothing pruned, nothing added
        assert not [n for n in os.listdir(save_dir) if n.endswith((".incomplete", ".tmp"))], os.listdir(save_dir)
        assert checkpoint_problem(step_dir(save_dir, 6)) is None
        assert sorted(os.listdir(step_dir(save_dir, 6))) == files_before

    resumed = run(load_recipe(TINY, common + ["train.steps=8", f"train.save_dir={save_dir}", "train.resume=true",
                                              "train.keep_checkpoints=1"]))
    assert [h["step"] for h in resumed["history"]] == [7, 8]
    assert step_dirs(save_dir) == [8] and latest_step(save_dir) == 8
