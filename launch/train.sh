#!/usr/bin/env bash
# Launch wren training with one entry point: this process, torchrun, SLURM or Ray.
#
#   launch/train.sh [LAUNCHER OPTIONS] CONFIG [--section.key=value ...]
#
#   --launcher local|torchrun|slurm|ray   default: local, or torchrun when --nproc > 1
#   --nodes N            nodes (torchrun, slurm, ray; default 1)
#   --nproc N            processes per node (default 1)
#   --max-restarts N     torchrun: restart all ranks up to N times after a failure (default 0);
#                        ray: FailureConfig(max_failures=N)
#   --rdzv-endpoint H:P  torchrun with --nodes > 1: the rendezvous host:port (run once per node)
#   --address ADDR       ray: submit to this cluster with `ray job submit` (e.g. http://head:8265);
#                        without it, a local Ray cluster is started for the run
#   --dry-run            print the command that would run, one shell-quoted line, and exit
#   --                   end of launcher options; everything after goes to the trainer
#
# Launcher options may appear anywhere before `--`; every other argument (the config and its
# `--section.key=value` overrides) is handed to the trainer unchanged, as separate argv entries:
# nothing from the command line or a config is ever evaluated as shell code. The SLURM launcher
# submits launch/slurm.sbatch with sbatch (SBATCH_* variables such as SBATCH_PARTITION,
# SBATCH_TIMELIMIT or SBATCH_GPUS_PER_NODE reach sbatch as usual), or runs it directly inside an
# existing allocation (salloc). PYTHON selects the interpreter (default: the repository's .venv,
# else python3). See docs/launching.md.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${PYTHON:-}"
if [[ -z "$python" ]]; then
  if [[ -x "$here/.venv/bin/python" ]]; then python="$here/.venv/bin/python"; else python=python3; fi
fi

die() { echo "train.sh: $*" >&2; exit 2; }
positive() { [[ "$2" =~ ^[1-9][0-9]*$ ]] || die "$1 must be a positive integer, got '$2'"; }

launcher="" nodes=1 nproc=1 max_restarts=0 rdzv_endpoint="" address="" dry_run=0
args=()
while (($#)); do
  case "$1" in
    --) shift; args+=("$@"); break ;;
    --launcher|--nodes|--nproc|--max-restarts|--rdzv-endpoint|--address)
      [[ $# -ge 2 ]] || die "$1 needs a value"
      set -- "$1=$2" "${@:3}"
      continue ;;
    --launcher=*) launcher="${1#*=}" ;;
    --nodes=*) nodes="${1#*=}" ;;
    --nproc=*) nproc="${1#*=}" ;;
    --max-restarts=*) max_restarts="${1#*=}" ;;
    --rdzv-endpoint=*) rdzv_endpoint="${1#*=}" ;;
    --address=*) address="${1#*=}" ;;
    --dry-run) dry_run=1 ;;
    *) args+=("$1") ;;
  esac
  shift
done
positive --nodes "$nodes"
positive --nproc "$nproc"
[[ "$max_restarts" =~ ^[0-9]+$ ]] || die "--max-restarts must be a non-negative integer, got '$max_restarts'"
if [[ -z "$launcher" ]]; then
  if ((nproc > 1 || nodes > 1)); then launcher=torchrun; else launcher=local; fi
fi
[[ -z "$address" || "$launcher" == ray ]] || die "--address is for --launcher ray"
[[ -z "$rdzv_endpoint" || "$launcher" == torchrun ]] || die "--rdzv-endpoint is for --launcher torchrun"

trainer=(-m trainer.cli train "${args[@]}")
case "$launcher" in
  local)
    ((nodes == 1 && nproc == 1)) || die "--launcher local runs one process; use torchrun, slurm or ray for --nodes/--nproc"
    ((max_restarts == 0)) || die "--max-restarts needs --launcher torchrun or ray"
    cmd=("$python" "${trainer[@]}") ;;
  torchrun)
    cmd=("$python" -m torch.distributed.run --nnodes "$nodes" --nproc-per-node "$nproc" --max-restarts "$max_restarts")
    if ((nodes == 1)); then
      cmd+=(--standalone)
    else
      [[ -n "$rdzv_endpoint" ]] || die "--launcher torchrun with --nodes > 1 needs --rdzv-endpoint HOST:PORT (the first node)"
      cmd+=(--rdzv-backend c10d --rdzv-endpoint "$rdzv_endpoint" --rdzv-id "wren-$rdzv_endpoint")
    fi
    cmd+=("${trainer[@]}") ;;
  slurm)
    # The batch script reads these; `env` sets them for it without any shell evaluation.
    settings=(WREN_PYTHON="$python" WREN_NPROC_PER_NODE="$nproc" WREN_MAX_RESTARTS="$max_restarts")
    if [[ -n "${SLURM_JOB_ID:-}" ]]; then  # inside an allocation: run the job script here
      cmd=(env "${settings[@]}" bash "$here/launch/slurm.sbatch" "${args[@]}")
    else
      cmd=(env "${settings[@]}" sbatch --nodes "$nodes" "$here/launch/slurm.sbatch" "${args[@]}")
    fi ;;
  ray)
    ray_args=(--num-workers "$((nodes * nproc))" --max-failures "$max_restarts")
    if [[ -n "$address" ]]; then
      # `ray job submit` quotes each entrypoint argument itself (shlex.join) before its shell runs it.
      cmd=("$python" -m ray.scripts.scripts job submit --address "$address" --
           "$python" -m launch.ray_job "${ray_args[@]}" --chdir "$PWD" -- "${args[@]}")
    else
      cmd=("$python" -m launch.ray_job "${ray_args[@]}" -- "${args[@]}")
    fi ;;
  *) die "--launcher must be one of local, torchrun, slurm, ray; got '$launcher'" ;;
esac

if ((dry_run)); then
  "$python" -c 'import shlex, sys; print(shlex.join(sys.argv[1:]))' "${cmd[@]}"
  exit 0
fi
exec "${cmd[@]}"
