#!/usr/bin/env bash
# A pruned copy of Megatron-LM at a supported tag (patches/<tag>/: core_v0.16.1, core_v0.17.1,
# core_v0.18.2, core_v0.19.0) with only what pretrain_gpt.py needs next to an installed
# megatron-core: pretrain_gpt.py, gpt_builders.py, model_provider.py and megatron/ without core
# (training, legacy, rl, post_training, elastification, inference: those the tag has).
# megatron/core then comes from the installed megatron-core, which must match the tag's
# (0.16.1 for core_v0.16.1 ...); KEEP_CORE=1 copies the tag's own megatron/core too (e.g.
# core_v0.17.1 next to a newer installed megatron-core).
# For machines that cannot fetch Megatron-LM (the GPU machine): carry DEST as an ignored folder.
# Usage: [KEEP_CORE=1] bash scripts/prune_megatron_lm.sh <Megatron-LM checkout> [DEST]   (DEST: .megatron-lm)
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
die() { echo "prune_megatron_lm.sh: error: $*" >&2; exit 2; }
src=${1:?usage: prune_megatron_lm.sh <Megatron-LM checkout> [DEST]}
dest=${2:-.megatron-lm}
[ -f "$src/pretrain_gpt.py" ] && [ -d "$src/megatron/training" ] || die "$src is not a Megatron-LM checkout (no pretrain_gpt.py / megatron/training)"
tag=
for t in "$repo"/patches/*/; do
  t=$(basename "$t"); [ -f "$repo/patches/$t/COMMIT" ] || continue
  if git -C "$src" rev-parse HEAD >/dev/null 2>&1; then
    [ "$(git -C "$src" rev-parse HEAD)" = "$(cat "$repo/patches/$t/COMMIT")" ] && tag=$t
  elif (cd "$src" && sha256sum --quiet --check "$repo/patches/$t/pinned.sha256" >/dev/null 2>&1); then
    tag=$t
  fi
done
[ -n "$tag" ] || die "$src is at no supported Megatron-LM tag ($(ls "$repo/patches" | tr '\n' ' '))"
rm -rf "$dest"; mkdir -p "$dest/megatron"
cp "$src"/{pretrain_gpt.py,gpt_builders.py,model_provider.py,LICENSE} "$dest/"
dirs=(training legacy rl post_training elastification inference)
[ "${KEEP_CORE:-0}" = 1 ] && dirs+=(core)
for d in "${dirs[@]}"; do [ -d "$src/megatron/$d" ] && cp -r "$src/megatron/$d" "$dest/megatron/"; done
find "$dest" -name __pycache__ -prune -exec rm -rf {} +
cat "$repo/patches/$tag/COMMIT" > "$dest/PINNED_COMMIT"
echo "$tag" > "$dest/TAG"
echo "Megatron-LM $tag -> $dest"
du -sh "$dest"
