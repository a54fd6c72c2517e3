#!/usr/bin/env bash
# Apply patches/*.patch (pretrain_gpt.py with --tsp-size) to a Megatron-LM tree at the pinned
# commit core_v0.16.1. Refuses, changing nothing, a git checkout at another commit, files that
# differ from the pinned commit's (patches/pinned.sha256), and an already patched tree.
# Usage: bash scripts/apply_patches.sh <Megatron-LM dir>
set -euo pipefail
PINNED=55ac7082517c3878ae653c07c09c534b8aed49f6
repo=$(cd "$(dirname "$0")/.." && pwd)
die() { echo "apply_patches.sh: error: $*" >&2; exit 2; }
[ $# -eq 1 ] || die "usage: bash scripts/apply_patches.sh <Megatron-LM dir>"
dir=$(cd "$1" 2>/dev/null && pwd) || die "$1: no such directory"
[ -f "$dir/pretrain_gpt.py" ] && [ -d "$dir/megatron/training" ] || die "$dir is not a Megatron-LM tree (no pretrain_gpt.py, megatron/training)"
patches=("$repo"/patches/*.patch)

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
command -v patch >/dev/null || command -v git >/dev/null || die "needs patch or git"

for p in "${patches[@]}"; do
  rev_check "$p" && die "$dir is already patched ($(basename "$p") is applied)"
done
if [ -e "$dir/.git" ]; then
  head=$(git -C "$dir" rev-parse HEAD 2>/dev/null) || die "$dir: cannot read its git HEAD"
  [ "$head" = "$PINNED" ] || die "$dir is at commit $head; the patches are for Megatron-LM core_v0.16.1 ($PINNED): git -C $dir checkout $PINNED"
fi
changed=$(cd "$dir" && sha256sum --check "$repo/patches/pinned.sha256" 2>/dev/null | sed -n 's/: FAILED.*$//p' | tr '\n' ' ' || true)
[ -z "$changed" ] || die "$dir: ${changed}differs from Megatron-LM core_v0.16.1 ($PINNED); the patches are for that commit"
for p in "${patches[@]}"; do
  run_patch --dry-run "$p" || die "$(basename "$p") does not apply to $dir"
done
for p in "${patches[@]}"; do
  run_patch "$p" || die "$(basename "$p") failed to apply to $dir"
  echo "applied $(basename "$p")"
done
