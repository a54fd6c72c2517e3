"""Recipe keys of the context-parallel baselines: parallel.context_size and parallel.fsdp; every
impossible combination is one RecipeError naming the keys."""

import pytest

from megatron_tsp.training.recipe import RecipeError, load_recipe

CP4 = ["parallel.layout=dp", "parallel.context_size=4"]


@pytest.mark.parametrize("override,message", [
    (["parallel.context_size=2"], r"parallel.context_size = 2 cannot be combined with parallel.layout = tsp"),
    (["parallel.fsdp=true"], r"parallel.fsdp = true cannot be combined with parallel.layout = tsp"),
    (["parallel.layout=dp", "parallel.context_size=0"], r"parallel.context_size = 0 must be >= 1"),
    (CP4 + ["model.seq_length=36"], r"model.seq_length = 36 must be divisible by 2 x parallel.context_size = 8"),
    (["parallel.layout=tp_sp", "parallel.size=4", "parallel.context_size=2", "model.seq_length=20"],
     r"model.seq_length / parallel.context_size = 10 must be divisible by parallel.size = 4"),
    (["parallel.layout=tp", "parallel.size=4", "parallel.context_size=2", "model.num_query_groups=2"],
     r"model.num_query_groups = 2 must be divisible by parallel.size = 4"),
    (CP4 + ["parallel.baseline_attention=local"], r"parallel.context_size = 4 runs on torch SDPA: parallel.baseline_attention = 'local' must be sdpa"),
    (CP4 + ["parallel.fsdp=true", "train.distributed_optimizer=true"], r"parallel.fsdp = true cannot be combined with train.distributed_optimizer"),
    (CP4 + ["parallel.fsdp=true", "parallel.pipeline_size=2"], r"parallel.fsdp = true cannot be combined with parallel.pipeline_size = 2"),
    (CP4 + ["parallel.fsdp=true", "train.save_dir=/tmp/x"], r"parallel.fsdp = true cannot be combined with train.save_dir"),
])
def test_bad_context_parallel_recipes(override, message):
    with pytest.raises(RecipeError, match=message):
        load_recipe(None, override)


def test_world_size_counts_the_context_axis():
    recipe = load_recipe(None, ["parallel.layout=tp_sp", "parallel.size=2", "parallel.context_size=2"])
    recipe.check(world_size=4)
    with pytest.raises(RecipeError, match=r"world size 2 does not fit the layout: parallel.size \(2\) x "
                                          r"parallel.pipeline_size \(1\) x parallel.context_size \(2\) = 4"):
        recipe.check(world_size=2)
    with pytest.raises(RecipeError, match=r"data-parallel size \(4\)"):
        recipe.check(world_size=16)


def test_fsdp_over_cp_recipe_loads():
    recipe = load_recipe(None, CP4 + ["parallel.fsdp=true"])
    assert recipe.parallel.context_size == 4 and recipe.parallel.fsdp
    recipe.check(world_size=4)
