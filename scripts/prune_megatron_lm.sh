#!/usr/bin/env bash
# A pruned copy of Megatron-LM at the pinned commit with only what pretrain_gpt.py needs next to
# the megatron-core wheel (pretrain_gpt.py, gpt_builders.py, model_provider.py, megatron/training,
# legacy, rl, post_training; megatron/core comes from the wheel, which is the same code).
# For machines that cannot fetch Megatron-LM (the GPU machine): carry DEST as an ignored folder.
# Usage: bash scripts/prune_megatron_lm.sh <Megatron-LM checkout> [DEST]   (DEST: .megatron-lm)
set -euo pipefail
PINNED=55ac7082517c3878ae653c07c09c534b8aed49f6
src=${1:?usage: prune_megatron_lm.sh <Megatron-LM checkout> [DEST]}
dest=${2:-.megatron-lm}
[ -f "$src/pretrain_gpt.py" ] && [ -d "$src/megatron/training" ] || { echo "error: $src is not a Megatron-LM checkout (no pretrain_gpt.py / megatron/training)" >&2; exit 2; }
if git -C "$src" rev-parse HEAD >/dev/null 2>&1; then
  head=$(git -C "$src" rev-parse HEAD)
  [ "$head" = "$PINNED" ] || { echo "error: $src is at $head, not the pinned core_v0.16.1 ($PINNED)" >&2; exit 2; }
fi
rm -rf "$dest"; mkdir -p "$dest/megatron"
cp "$src"/{pretrain_gpt.py,gpt_builders.py,model_provider.py,LICENSE} "$dest/"
for d in training legacy rl post_training; do cp -r "$src/megatron/$d" "$dest/megatron/"; done
find "$dest" -name __pycache__ -prune -exec rm -rf {} +
echo "$PINNED" > "$dest/PINNED_COMMIT"
du -sh "$dest"
