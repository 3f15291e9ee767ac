# Shared by the lvlm_region sbatch scripts (sourced, not run). Submit the scripts from the repository root,
# with the Python environment active (sbatch passes the submitting shell's environment to the job).
#
# What it does, once per (re)start of the job:
#   - nodes from SLURM_JOB_NODELIST (scontrol show hostnames), the first one hosts the rendezvous;
#   - one `torchrun` per node via `srun --ntasks-per-node=1`, with --nnodes / --node-rank from SLURM_NNODES /
#     SLURM_NODEID and --nproc-per-node = the GPUs SLURM gave this node (SLURM_GPUS_ON_NODE; else nvidia-smi;
#     else 1 CPU rank); torchrun sets RANK / WORLD_SIZE / LOCAL_RANK for DeepSpeed;
#   - `srun --kill-on-bad-exit=1`: a rank that dies ends the whole step at once (torchrun names the failed
#     rank, its exit code and pid) instead of leaving the other nodes to hang until the time limit;
#   - on USR1 (sent by `#SBATCH --signal=B:USR1@600` to this shell) it touches OUTPUT_DIR/STOP: every rank
#     finishes its step, writes a checkpoint and exits 0; the job then requeues itself and the next start
#     continues with --resume auto (added unless the command line has --resume).
#
# Environment variables users tune (exported before sbatch, or set here):
#   PYTHON                           interpreter with lvlm_region installed (default: python on PATH)
#   MASTER_PORT                      rendezvous port on the first node (default: 20000 + job id % 20000)
#   OMP_NUM_THREADS                  CPU threads per rank (default: the node's CPUs / ranks per node)
#   NCCL_SOCKET_IFNAME, NCCL_IB_HCA  which network NCCL uses between nodes (site specific)
#   NCCL_DEBUG=INFO                  NCCL's own logging, for a hang or a slow all-reduce
#   TORCH_NCCL_ASYNC_ERROR_HANDLING  1 (default here): a failed collective raises instead of hanging

arg_value() {  # arg_value --flag ARGS...: the value given to --flag (as `--flag V` or `--flag=V`)
    local flag=$1; shift
    while [ $# -gt 0 ]; do
        case "$1" in
            "$flag") echo "${2:-}"; return 0 ;;
            "$flag"=*) echo "${1#*=}"; return 0 ;;
        esac
        shift
    done
    return 1
}

run_stage() {  # run_stage launch/sft.py ARGS...
    local script=$1; shift
    local out
    if ! out=$(arg_value --output-dir "$@") || [ -z "$out" ]; then
        echo "error: pass --output-dir (checkpoints, STOP file and run.json live there)" >&2
        exit 2
    fi
    arg_value --resume "$@" >/dev/null || set -- "$@" --resume auto

    local nodes master gpus py
    mapfile -t nodes < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
    master=${MASTER_ADDR:-${nodes[0]}}
    gpus=${SLURM_GPUS_ON_NODE:-$(nvidia-smi -L 2>/dev/null | grep -c ^GPU || true)}
    [ "${gpus:-0}" -ge 1 ] 2>/dev/null || gpus=1
    py=${PYTHON:-python}
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( ${SLURM_CPUS_ON_NODE:-$gpus} / gpus > 0 ? ${SLURM_CPUS_ON_NODE:-$gpus} / gpus : 1 ))}
    export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
    export MASTER_PORT=${MASTER_PORT:-$(( 20000 + SLURM_JOB_ID % 20000 ))}

    # SLURM_NODEID differs per node, so it is expanded inside each srun task (single quotes).
    local cmd=(srun --kill-on-bad-exit=1 --nodes="$SLURM_NNODES" --ntasks-per-node=1
               bash -c 'exec "$0" -m torch.distributed.run --nnodes="$1" --node-rank="$SLURM_NODEID" \
                        --nproc-per-node="$2" --master-addr="$3" --master-port="$4" "${@:5}"'
               "$py" "$SLURM_NNODES" "$gpus" "$master" "$MASTER_PORT" "$script" "$@")
    echo "=== job ${SLURM_JOB_ID} (restart ${SLURM_RESTART_COUNT:-0}) on ${SLURM_NNODES} node(s) x ${gpus} rank(s): ${nodes[*]}"
    echo "=== $(date -Is) command:"
    printf '%q ' "${cmd[@]}"
    echo

    run_stoppable "$out" "${cmd[@]}"
}

run_stoppable() {  # run_stoppable OUTPUT_DIR COMMAND...: run COMMAND (a training run writing OUTPUT_DIR); on USR1
    # touch OUTPUT_DIR/STOP (the run checkpoints and exits 0); when it stopped so (run.json status interrupted),
    # requeue the job, which continues with --resume auto; exit with COMMAND's status.
    local out=$1; shift
    local py=${PYTHON:-python}
    mkdir -p "$out"
    trap 'echo "=== $(date -Is) USR1: asking the run to checkpoint and exit"; touch "$out/STOP"' USR1
    "$@" &
    local pid=$! rc=0
    # `wait` returns early (status > 128) when the trap fires; keep waiting until the command itself ends.
    while true; do
        rc=0
        wait "$pid" || rc=$?
        kill -0 "$pid" 2>/dev/null || break
    done
    trap - USR1

    local status
    status=$("$py" -c 'import json, sys; print(json.load(open(sys.argv[1])).get("status", ""))' \
             "$out/run.json" 2>/dev/null || true)
    echo "=== $(date -Is) exit code ${rc}; run status: ${status:-unknown}"
    if [ "$rc" -eq 0 ] && [ "$status" = interrupted ]; then
        echo "=== requeueing job ${SLURM_JOB_ID}; it continues from the checkpoint"
        scontrol requeue "$SLURM_JOB_ID"
    fi
    exit "$rc"
}
