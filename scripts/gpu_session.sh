#!/usr/bin/env bash
# Every GPU benchmark of issue 20 in one device call (under 9 minutes), from the repository root:
#
#   scripts/gpu_session.sh                   # the default parts: check decode offload prefetch
#   scripts/gpu_session.sh offload prefetch  # some of them (each may then get more time: OFFLOAD_S=300 ...)
#   SMOKE=1 scripts/gpu_session.sh           # toy sizes on the CPU, no peers: a check of this script
#   scripts/gpu_session.sh serve             # issue 21's serving benchmark, a call of its own (not a default part)
#   SERVE_PARTS=slo scripts/gpu_session.sh serve   # some of its parts (throughput,gating,slo)
#   SERVE_PARTS=throughput SERVE_EXTRA="--one-by-one --batches 1,64" scripts/gpu_session.sh serve
#                                            # any part: $<PART>_EXTRA's words are added to its script's arguments
#   scripts/gpu_session.sh ssd               # issue 24's SSD tier (a model 1.5x the host's RAM, or as much as the
#                                            # disk holds: see bench_ssd.py), a call of its own (not a default part);
#                                            # its expert files stay in .bench/ssd_experts for the next call
#   SSD_FORMAT=int4 scripts/gpu_session.sh ssd   # the same with int4 experts on disk, in host and over the link
#                                            # (Kimi-K2's case): bench_ssd_int4.json, files in .bench/ssd_experts-int4
#                                            # (each host cache size copy-only, then with --cpu-experts auto;
#                                            # SSD_CPU_EXPERTS=off: the copy-only rows alone)
#   scripts/gpu_session.sh compact           # issue 24's compact formats and CPU experts, a call of its own
#   scripts/gpu_session.sh missfetch         # one layer's miss fetches, several ways (at counter and at routing offsets)
#                                            # (probe_miss_fetch.py: where a batch's copies lose the link's bandwidth)
#   scripts/gpu_session.sh missfetch missfetch-lhs   # the same, then again under XLA's latency-hiding scheduler with
#                                            # pipelined host offloading (LHS_FLAGS): whether a layer's copy then
#                                            # overlaps the compute before it (the stream-pipelined row)
#   scripts/gpu_session.sh hostrows          # the copy kernel (`miss_copy='kernel'`, kernels/host_rows.cu, built here
#                                            # with nvcc) against XLA's fetch and the link's DMA (probe_host_rows.py);
#                                            # with OFFLOAD_EXTRA="--miss-copy xla,kernel" the engine's rows both ways
#   scripts/gpu_session.sh families kernel profile   # issue 23's offloaded families (resident + cached 25%, with
#                                            # transformers + accelerate), the in-place expert kernel against
#                                            # gather + einsum (probe_slab_kernel.py), and where a DeepSeek-V2-Lite
#                                            # decode step's GPU time goes (probe_engine.py --profile, once as it
#                                            # runs and once without command buffers, by operation): one call
#
# Parts run in order of risk, the riskiest last, so a timeout loses the least. Each has a hard limit
# (`timeout`, seconds: CHECK_S, DECODE_S, OFFLOAD_S, PREFETCH_S, SERVE_S, SSD_S, COMPACT_S, FAMILIES_S, KERNEL_S,
# PROFILE_S, MISSFETCH_S, HOSTROWS_S) and a time budget 20 s
# shorter within which the script starts a model or configuration only if it expects it to fit; every script writes
# its JSON after each row. Writes under $OUT: check_identical.json, bench_decode.json,
# bench_offload.json, bench_prefetch.json, bench_serve.json (+ .png, the SLO plot), bench_ssd.json, bench_compact.json,
# bench_offload_families.json, probe_slab_kernel.json, probe_miss_fetch.json (_lhs.json), probe_host_rows.json and
# session.log (the profile's lines)
# (everything printed); prints each part's table again at the end. The prefetch and serve parts need
# .data/traces/deepseek_v2_lite_prefill.npz, serve also the task mix .data/prompts/tasks.jsonl (a copy of
# ../shared/data/prompts/tasks.jsonl; .data is not in git: carry it). The serve part is long (a model per
# part of it, compiled at several batch sizes): run it alone, in a call of its own.
set -u
cd "$(dirname "$0")/.."
export XLA_CLIENT_MEM_FRACTION=0.95 PYTHONUNBUFFERED=1 PYTHONPATH=.
# The pinned pool: the benchmarks share one pinned copy of a model's experts (29 GB at most) between engines, and an
# engine keeping them one buffer per expert (`expert_stacks.per_expert_layout`: Mixtral's on a GPU) makes another.
export XLA_PJRT_GPU_HOST_MEMORY_LIMIT_GB=${XLA_PJRT_GPU_HOST_MEMORY_LIMIT_GB:-62}
export MOEJAX_COMPILATION_CACHE=${MOEJAX_COMPILATION_CACHE:-$PWD/.bench/jax-cache}  # kept while the machine stays warm
OUT=${OUT:-out}
PYTHON=${PYTHON:-$(command -v python || command -v python3)}
TRACES=${TRACES:-.data/traces/deepseek_v2_lite_prefill.npz}
TASKS=${TASKS:-.data/prompts/tasks.jsonl}
SERVE_PARTS=${SERVE_PARTS:-throughput,gating,slo}
CHECK_ARGS=() DECODE_ARGS=() OFFLOAD_ARGS=() PREFETCH_ARGS=() SERVE_ARGS=() SSD_ARGS=() COMPACT_ARGS=()
FAMILIES_ARGS=() KERNEL_ARGS=() MISSFETCH_ARGS=() HOSTROWS_ARGS=() PROFILE_ARGS=(--card deepseek-v2-lite --new-tokens 8)
if [ "${SMOKE:-}" = 1 ]; then
    : "${CHECK_S:=180}" "${DECODE_S:=180}" "${OFFLOAD_S:=180}" "${PREFETCH_S:=180}" "${SERVE_S:=240}" "${SSD_S:=180}"
    : "${COMPACT_S:=240}"
    SSD_ARGS=(--dims tiny --scale 2e-5 --new-tokens 6 --bandwidth-gb 0.01)
    CHECK_ARGS=(--quick)
    DECODE_ARGS=(--dims tiny --skip-peer --prompt-len 16 --new-tokens 8)
    OFFLOAD_ARGS=(--dims tiny --skip-peer --prompt-len 16 --new-tokens 8 --dense-offload-tokens 4)
    PREFETCH_ARGS=(--dims tiny --budget 0.6 --new-tokens 8 --sequences 1 --ttft-prompt 64)
    SERVE_ARGS=(--dims tiny --budget 0.5 --batches 1,4 --new-tokens 6 --slots 4 --requests 6 --loads 8x,2x
                --max-prompt 32 --max-tokens 8 --serve-max-seq-len 128 --prefill-chunk 32 --calibration-per-task 1 --warmup-requests 8)
    COMPACT_ARGS=(--dims tiny --budgets 0.5,0.2 --prompt-len 8 --new-tokens 8 --cost-link-gbps 0.001)
    FAMILIES_ARGS=(--dims tiny --skip-peer --budgets 0.5 --prompt-len 16 --new-tokens 8)
    KERNEL_ARGS=(--smoke --calls 2 --repeats 2 --new-tokens 4)
    PROFILE_ARGS=(--card olmoe-1b-7b --layers 1 --prompt-len 8 --new-tokens 4)
    MISSFETCH_ARGS=(--dims tiny --repeats 2 --misses 6,9)
    HOSTROWS_ARGS=(--shapes tiny --repeats 2)
fi
CHECK_S=${CHECK_S:-70} DECODE_S=${DECODE_S:-165} OFFLOAD_S=${OFFLOAD_S:-145} PREFETCH_S=${PREFETCH_S:-160} SERVE_S=${SERVE_S:-540}
SSD_S=${SSD_S:-580} COMPACT_S=${COMPACT_S:-540} FAMILIES_S=${FAMILIES_S:-380} KERNEL_S=${KERNEL_S:-120}
PROFILE_S=${PROFILE_S:-90} MISSFETCH_S=${MISSFETCH_S:-75} HOSTROWS_S=${HOSTROWS_S:-150}
# the copy kernel's library, built on the machine by the first part that needs it, kept while it stays warm
export MOEJAX_KERNEL_DIR=${MOEJAX_KERNEL_DIR:-$PWD/.bench/kernels}
# missfetch-lhs: copies of host memory as asynchronous copy-start/copy-done that the scheduler may move across a loop's
# iterations (openxla/xla's host offloading)
LHS_FLAGS="--xla_gpu_enable_latency_hiding_scheduler=true --xla_gpu_enable_pipelined_host_offloading=true"
mkdir -p "$OUT"
LOGS=$(mktemp -d)
trap 'rm -rf "$LOGS"' EXIT
PARTS=${*:-check decode offload prefetch}
for name in $PARTS; do
    case $name in check | decode | offload | prefetch | serve | ssd | compact | families | kernel | profile \
        | missfetch | missfetch-lhs | hostrows) ;;
        *) echo "unknown part '$name' (parts: check decode offload prefetch serve ssd compact families kernel profile"\
                "missfetch missfetch-lhs hostrows)"
           exit 2 ;;
    esac
done

part() {  # part NAME LIMIT SCRIPT ARGS... (then the words of $<NAME>_EXTRA, e.g. SERVE_EXTRA="--one-by-one")
    local name=$1 limit=$2 script=$3 start=$SECONDS status extra_var extra
    shift 3
    extra_var=${name^^}_EXTRA
    extra_var=${extra_var//-/_}
    read -ra extra <<< "${!extra_var:-}"
    echo "=== $name: $script ${extra[*]} (limit ${limit} s) $(date +%T)"
    timeout -k 5 "$limit" "$PYTHON" "$script" --time-budget $((limit - 20)) "$@" "${extra[@]}" 2>&1 | tee "$LOGS/$name.log"
    status=${PIPESTATUS[0]}
    echo "=== $name: exit status $status after $((SECONDS - start)) s$([ "$status" = 124 ] && echo ' (timed out)')"
}

{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null
    for name in $PARTS; do
        case $name in
            check) part check "$CHECK_S" scripts/check_identical.py --out "$OUT/check_identical.json" "${CHECK_ARGS[@]}" ;;
            decode) part decode "$DECODE_S" scripts/bench_decode.py --out "$OUT/bench_decode.json" "${DECODE_ARGS[@]}" ;;
            offload) part offload "$OFFLOAD_S" scripts/bench_offload.py --out "$OUT/bench_offload.json" "${OFFLOAD_ARGS[@]}" ;;
            prefetch) part prefetch "$PREFETCH_S" scripts/bench_prefetch.py --traces "$TRACES" --out "$OUT/bench_prefetch.json" \
                "${PREFETCH_ARGS[@]}" ;;
            serve) part serve "$SERVE_S" scripts/bench_serve.py --parts "$SERVE_PARTS" --traces "$TRACES" --task-mix "$TASKS" \
                --out "$OUT/bench_serve.json" "${SERVE_ARGS[@]}" ;;
            ssd) part ssd "$SSD_S" scripts/bench_ssd.py --out "$OUT/bench_ssd${SSD_FORMAT:+_$SSD_FORMAT}.json" \
                ${SSD_FORMAT:+--expert-format "$SSD_FORMAT" --dir ".bench/ssd_experts-$SSD_FORMAT"} \
                --cpu-experts "${SSD_CPU_EXPERTS:-off,auto}" "${SSD_ARGS[@]}" ;;
            compact) part compact "$COMPACT_S" scripts/bench_compact.py --out "$OUT/bench_compact.json" "${COMPACT_ARGS[@]}" ;;
            families) part families "$FAMILIES_S" scripts/bench_offload.py --models deepseek-v2-lite,gpt-oss-20b:8,qwen3-30b-a3b:16 \
                --modes resident,cached --budgets 0.25 --peer-timeout 90 --out "$OUT/bench_offload_families.json" "${FAMILIES_ARGS[@]}" ;;
            kernel) part kernel "$KERNEL_S" scripts/probe_slab_kernel.py --out "$OUT/probe_slab_kernel.json" "${KERNEL_ARGS[@]}" ;;
            missfetch) part missfetch "$MISSFETCH_S" scripts/probe_miss_fetch.py --out "$OUT/probe_miss_fetch.json" \
                "${MISSFETCH_ARGS[@]}" ;;
            missfetch-lhs) XLA_FLAGS="${XLA_FLAGS:-} $LHS_FLAGS" part missfetch-lhs "$MISSFETCH_S" scripts/probe_miss_fetch.py \
                --out "$OUT/probe_miss_fetch_lhs.json" "${MISSFETCH_ARGS[@]}" ;;
            hostrows) part hostrows "$HOSTROWS_S" scripts/probe_host_rows.py --out "$OUT/probe_host_rows.json" \
                "${HOSTROWS_ARGS[@]}" ;;
            profile) part profile "$PROFILE_S" scripts/probe_engine.py --configs resident --repeats 1 --profile 8 "${PROFILE_ARGS[@]}"
                # the same without command buffers: the step's time by operation (a command buffer is one to the profiler)
                XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_command_buffer=" part profile-ops "$PROFILE_S" scripts/probe_engine.py \
                    --configs resident --repeats 1 --profile 8 "${PROFILE_ARGS[@]}" ;;
        esac
    done
} 2>&1 | tee "$OUT/session.log"

echo
echo "=== tables"
for name in $PARTS; do
    [ -f "$LOGS/$name.log" ] || continue
    echo "--- $name"
    # Each script's table is what it prints after its last empty line.
    awk 'BEGIN { n = 0 } /^$/ { n = NR } { line[NR] = $0 } END { for (i = n + 1; i <= NR; i++) print line[i] }' "$LOGS/$name.log"
done
