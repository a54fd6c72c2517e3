#!/usr/bin/env bash
# Apply patches/<tag>/*.patch (pretrain_gpt.py with --tsp-size) to a Megatron-LM tree at one of
# the supported tags (the folders of patches/: core_v0.16.1, core_v0.17.1, core_v0.18.2,
# core_v0.19.0). The tag is recognised by the tree's git commit (patches/<tag>/COMMIT; git
# checkouts) and by the hashes of the files the patch and the runner rely on
# (patches/<tag>/pinned.sha256; every tree, e.g. a pruned copy without .git). Refuses, with one
# error line and changing nothing: another commit, files that match no supported tag, and an
# already patched tree.
# Usage: bash scripts/apply_patches.sh <Megatron-LM dir>
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
die() { echo "apply_patches.sh: error: $*" >&2; exit 2; }
[ $# -eq 1 ] || die "usage: bash scripts/apply_patches.sh <Megatron-LM dir>"
dir=$(cd "$1" 2>/dev/null && pwd) || die "$1: no such directory"
[ -f "$dir/pretrain_gpt.py" ] && [ -d "$dir/megatron/training" ] || die "$dir is not a Megatron-LM tree (no pretrain_gpt.py, megatron/training)"
tags=()
for t in "$repo"/patches/*/; do t=$(basename "$t"); [ -f "$repo/patches/$t/COMMIT" ] && tags+=("$t"); done
[ ${#tags[@]} -gt 0 ] || die "no patches/<tag>/COMMIT in $repo"
supported=$(for t in "${tags[@]}"; do printf '%s (%s), ' "$t" "$(head -c 8 "$repo/patches/$t/COMMIT")"; done); supported=${supported%, }

# `patch` where available, else `git apply` (kept from looking for a repository above $dir).
run_patch() {  # run_patch [--dry-run] [-R] PATCHFILE
  if command -v patch >/dev/null; then
    patch -p1 -d "$dir" --batch --forward --silent "${@:1:$#-1}" < "${@: -1}" >/dev/null 2>&1 && return 0 || return 1
  fi
  local args=() f
  for f in "${@:1:$#-1}"; do case $f in --dry-run) args+=(--check);; -R) args+=(-R);; esac; done
  (cd "$dir" && GIT_CEILING_DIRECTORIES=$(dirname "$dir") git apply "${args[@]}" "${@: -1}") >/dev/null 2>&1
}
rev_check() {  # does the reverse of PATCHFILE apply (the tree holds the patch already)?
  if command -v patch >/dev/null; then
    patch -p1 -d "$dir" --batch --forward --silent --dry-run -R < "$1" >/dev/null 2>&1
  else
    (cd "$dir" && GIT_CEILING_DIRECTORIES=$(dirname "$dir") git apply --check -R "$1") >/dev/null 2>&1
  fi
}
changed_files() {  # the files of patches/TAG/pinned.sha256 that differ in $dir (space-separated)
  (cd "$dir" && sha256sum --check "$repo/patches/$1/pinned.sha256" 2>/dev/null | sed -n 's/: FAILED.*$//p' | tr '\n' ' ' || true)
}
command -v patch >/dev/null || command -v git >/dev/null || die "needs patch or git"

for t in "${tags[@]}"; do
  for p in "$repo"/patches/"$t"/*.patch; do
    rev_check "$p" && die "$dir is already patched (megatron-tsp's $(basename "$p") is applied)"
  done
done
tag=
if [ -e "$dir/.git" ]; then
  head=$(git -C "$dir" rev-parse HEAD 2>/dev/null) || die "$dir: cannot read its git HEAD"
  for t in "${tags[@]}"; do [ "$head" = "$(cat "$repo/patches/$t/COMMIT")" ] && tag=$t; done
  [ -n "$tag" ] || die "$dir is at commit $head, not a supported Megatron-LM tag: $supported (git -C $dir checkout <tag>)"
  changed=$(changed_files "$tag")
  [ -z "$changed" ] || die "$dir: ${changed}differs from Megatron-LM $tag ($(cat "$repo/patches/$tag/COMMIT")); the patches are for that commit"
else
  best= best_changed=
  for t in "${tags[@]}"; do
    changed=$(changed_files "$t")
    if [ -z "$changed" ]; then tag=$t; break; fi
    if [ -z "$best" ] || [ $(wc -w <<<"$changed") -lt $(wc -w <<<"$best_changed") ]; then best=$t best_changed=$changed; fi
  done
  [ -n "$tag" ] || die "$dir matches no supported Megatron-LM tag (${best_changed}differs from $best, the closest; supported: $supported)"
fi
patches=("$repo"/patches/"$tag"/*.patch)
for p in "${patches[@]}"; do
  run_patch --dry-run "$p" || die "$tag/$(basename "$p") does not apply to $dir"
done
for p in "${patches[@]}"; do
  run_patch "$p" || die "$tag/$(basename "$p") failed to apply to $dir"
  echo "applied $tag/$(basename "$p")"
done
