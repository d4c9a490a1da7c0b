#!/usr/bin/env bash
# Launch wren training: one process, or N processes on this node through torchrun.
#
#   launch/train.sh CONFIG [--section.key=value ...]            # one process
#   launch/train.sh --nproc 2 CONFIG [--section.key=value ...]  # torchrun, 2 ranks on this node
#
# Config paths and overrides are passed to the trainer as separate arguments, never through a
# shell string. PYTHON selects the interpreter (default: the repository's .venv, else python3).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${PYTHON:-}"
if [[ -z "$python" ]]; then
  if [[ -x "$here/.venv/bin/python" ]]; then python="$here/.venv/bin/python"; else python=python3; fi
fi

nproc=1
args=()
while (($#)); do
  case "$1" in
    --nproc) [[ $# -ge 2 ]] || { echo "train.sh: --nproc needs a value" >&2; exit 2; }; nproc="$2"; shift 2 ;;
    --nproc=*) nproc="${1#*=}"; shift ;;
    *) args+=("$1"); shift ;;
  esac
done
if ! [[ "$nproc" =~ ^[1-9][0-9]*$ ]]; then
  echo "train.sh: --nproc must be a positive integer, got '$nproc'" >&2
  exit 2
fi

if ((nproc > 1)); then
  exec "$python" -m torch.distributed.run --standalone --nproc_per_node "$nproc" -m trainer.cli train "${args[@]}"
fi
exec "$python" -m trainer.cli train "${args[@]}"
