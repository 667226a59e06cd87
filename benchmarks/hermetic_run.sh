#!/usr/bin/env bash
# Is the suite hermetic? Two runs, each printing its wall time and pytest's pass/fail counts:
#   foreign:    the suite while processes of no test run beside it: stand-in MPS control daemons
#               (argv[0] nvidia-cuda-mps-control, -d, a pipe dir with a control file and a pid file;
#               one at /tmp/nvidia-mps, MPS's default), an MPS server stand-in, and a vLLM-like
#               engine (tests/kit/fakevllm.py), all started without the test kit's TESTKIT_SCOPE;
#   concurrent: two copies of the suite at once, this checkout and a clone of its HEAD (same venv;
#               each copy runs its own agent and kit).
#
#   benchmarks/hermetic_run.sh [foreign|concurrent|both]      (default both; ~4 + ~8 min on 2 cores)
#
# Exits 0 when every run passed. PYTHON (default .venv/bin/python) runs the suites and the stand-ins.
# Each run's pytest output stays in the logs directory printed at the end.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PYTHON=${PYTHON:-$ROOT/.venv/bin/python}
WHICH=${1:-both}
unset TESTKIT_SCOPE  # every suite makes its own session scope; the stand-ins here must carry none
WORK=$(mktemp -d /tmp/mpswatch-hermetic-XXXXXX)
LOGS=$(mktemp -d /tmp/mpswatch-hermetic-logs-XXXXXX)
FOREIGN_PIDS=()
MADE_DEFAULT_PIPE_DIR=""
STATUS=0

cleanup() {
    for pid in "${FOREIGN_PIDS[@]}"; do kill "$pid" 2>/dev/null; done
    wait 2>/dev/null
    [ -n "$MADE_DEFAULT_PIPE_DIR" ] && rm -rf /tmp/nvidia-mps
    rm -rf "$WORK"
}
trap cleanup EXIT

stand_in() {  # stand_in ARGV0 PIPE_DIR [ARG ...]: a sleeping process as discovery sees MPS's programs
    local argv0=$1 pipe_dir=$2
    shift 2
    (CUDA_MPS_PIPE_DIRECTORY=$pipe_dir exec -a "$argv0" "$PYTHON" -I -S -c 'import time; time.sleep(86400)' "$@") &
    FOREIGN_PIDS+=($!)
}

start_foreign() {
    local pipe_dirs=("$WORK/foreign-mps/pipe")
    if mkdir /tmp/nvidia-mps 2>/dev/null; then
        MADE_DEFAULT_PIPE_DIR=1
        pipe_dirs+=(/tmp/nvidia-mps)
    else
        echo "/tmp/nvidia-mps exists already: left as it is (whatever made it is foreign too)"
    fi
    for pipe_dir in "${pipe_dirs[@]}"; do
        mkdir -p "$pipe_dir" && touch "$pipe_dir/control"
        stand_in nvidia-cuda-mps-control "$pipe_dir" -d
        echo "${FOREIGN_PIDS[-1]}" > "$pipe_dir/nvidia-cuda-mps-control.pid"
    done
    stand_in nvidia-cuda-mps-server "$WORK/foreign-mps/pipe"
    local port=8000
    if ! "$PYTHON" -c "import socket; socket.socket().bind(('127.0.0.1', $port))" 2>/dev/null; then
        port=$("$PYTHON" -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
    fi
    CUDA_MPS_PIPE_DIRECTORY=/tmp/nvidia-mps "$PYTHON" tests/kit/fakevllm.py vllm serve Qwen/Qwen2.5-0.5B --port "$port" \
        > "$WORK/foreign-engine.log" 2>&1 &
    FOREIGN_PIDS+=($!)
    for _ in $(seq 100); do grep -q ready "$WORK/foreign-engine.log" && break; sleep 0.1; done
    echo "foreign processes (no TESTKIT_SCOPE): control daemons in ${pipe_dirs[*]}, an MPS server," \
         "a vLLM-like engine on port $port: pids ${FOREIGN_PIDS[*]}"
}

suite() {  # suite NAME DIR: runs the whole suite in DIR in the background; its log is $WORK/NAME.log
    local name=$1 dir=$2
    (
        cd "$dir" || exit 2
        started=$EPOCHREALTIME
        "$PYTHON" -m pytest -q -p no:cacheprovider > "$LOGS/$name.log" 2>&1
        code=$?
        echo "$code $(awk "BEGIN { print $EPOCHREALTIME - $started }")" > "$LOGS/$name.result"
    ) &
}

report() {  # report NAME: one line from the run's exit status, wall time and pytest's summary line
    local name=$1 code wall summary
    read -r code wall < "$LOGS/$name.result"
    summary=$(grep -E '^(=+ )?[0-9]+ (passed|failed)' "$LOGS/$name.log" | tail -1 | sed 's/=//g; s/^ *//; s/ *$//')
    printf '%-22s wall %6.1f s   exit %s   %s\n' "$name" "$wall" "$code" "${summary:-no summary line}"
    if [ "$code" != 0 ]; then
        STATUS=1
        grep -E '^(FAILED|ERROR) ' "$LOGS/$name.log" | sed 's/^/    /'
    fi
}

if [ "$WHICH" = foreign ] || [ "$WHICH" = both ]; then
    start_foreign
    suite foreign "$ROOT"
    wait "$!"
    report foreign
    for pid in "${FOREIGN_PIDS[@]}"; do kill "$pid" 2>/dev/null; done
    FOREIGN_PIDS=()
fi

if [ "$WHICH" = concurrent ] || [ "$WHICH" = both ]; then
    git clone -q --no-hardlinks "$ROOT" "$WORK/clone"
    echo "concurrent: $ROOT and a clone of its HEAD ($(git -C "$WORK/clone" log -1 --format=%h)) at $WORK/clone"
    suite concurrent-this "$ROOT"
    first=$!
    suite concurrent-clone "$WORK/clone"
    wait "$first" "$!"
    report concurrent-this
    report concurrent-clone
fi
echo "logs: $LOGS"
exit "$STATUS"
