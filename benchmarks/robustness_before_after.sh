#!/usr/bin/env bash
# Issue #12: run each robustness test on the code from before its fix (expected: FAIL) and on this checkout
# (expected: pass). See benchmarks/results/robustness_tests_before_after.md for what each run shows.
#   benchmarks/robustness_before_after.sh [STAGE...]   stages: old pre1e54 pre7b2c pre708 head (default: all)
#   PY=/path/to/venv/bin/python (default .venv/bin/python), LOGS=folder for the pytest logs.
# Pre-fix worktrees: /tmp/rb12-* (git worktree, removed at the end). Slow: about an hour on 2 busy cores.
set -u
repo=$(cd "$(dirname "$0")/.." && pwd)
py=${PY:-$repo/.venv/bin/python}
logs=${LOGS:-/tmp/robustness_before_after}
results=$repo/benchmarks/results/robustness_tests_before_after.md
T=tests/test_server_robustness.py
mkdir -p "$logs"
# An editable install of the project serves any module missing from an old checkout (server/memory.py) from
# the installed tree; this sitecustomize, on PYTHONPATH for the pre-fix runs only, turns that finder off.
iso=$(mktemp -d)
cat >"$iso/sitecustomize.py" <<'EOF'
import sys

sys.meta_path[:] = [f for f in sys.meta_path if not getattr(f, "__module__", "").startswith("__editable__")]
EOF

# The tests, fixtures and server harness as they were when these runs were made (flat tests/, server/process.py):
# the adapted variants below import them by those names. Later checkouts moved them (tests/server/...,
# benchmarks/server_process.py); the pre-fix code is run with this fixed set of tests.
TESTS_AT=${TESTS_AT:-44782a1}
prepare() { # NAME COMMIT: a worktree of COMMIT with the tests, fixtures and server harness of $TESTS_AT
    local dir=/tmp/rb12-$1
    git -C "$repo" worktree add -f --detach "$dir" "$2" >/dev/null 2>&1 || return 1
    rm -rf "$dir/tests"
    git -C "$repo" archive "$TESTS_AT" tests/test_server_robustness.py tests/conftest.py tests/test_qa.py \
        tests/test_server.py tests/fixtures server/process.py | tar -x -C "$dir"
    # a checkout whose `moebert` command lives in moebert_cli (the harness starts `python -m moebert.cli serve`)
    [ -d "$dir/moebert_cli" ] && sed -i 's/"moebert\.cli"/"moebert_cli"/' "$dir/server/process.py"
    return 0
}
extract() { # FILE DIR: the results file's python block that starts with '# file: FILE' → DIR/tests/FILE
    awk -v f="# file: $1" '$0 == f {on = 1} on && /^```$/ {exit} on' "$results" >"$2/tests/$1"
}
run() { # LOG DIR ISOLATE TEST...: one pytest run, then its per-test outcome and one-line failure reasons
    local log=$logs/$1.log dir=$2 path=$2
    [ "$3" = 1 ] && path=$dir:$iso
    shift 3
    (cd "$dir" && PYTHONPATH=$path timeout 3000 "$py" -m pytest -q -rA -p no:cacheprovider --tb=line "$@") >"$log" 2>&1
    echo "== $log"
    grep -E "^(PASSED|FAILED|ERROR) |^/.*:[0-9]+: |^E  |[0-9]+ (passed|failed)" "$log" | cut -c1-300
}

stages=${*:-old pre1e54 pre7b2c pre708 head}
for stage in $stages; do
    case $stage in
    old) # 97c385f^: the code before the first issue-12 fix
        prepare old 97c385f^ || continue
        # flags the old CLI lacks: no deadline, header or body timeout existed
        sed -i -E 's/"--(request|header|body)-timeout-s", "[^"]*",? ?//g' /tmp/rb12-old/$T
        extract test_adapted_old_interface.py /tmp/rb12-old
        # the original blank-key and ONNX-labels tests would start serving in-process (port 8000) and hang;
        # their adapted variants run the server as a child process
        run old-original /tmp/rb12-old 1 $T --deselect $T::test_blank_api_key_refuses_to_start \
            --deselect $T::test_onnx_labels_disagreeing_with_config_fail
        run old-adapted /tmp/rb12-old 1 tests/test_adapted_old_interface.py
        extract race_windows.py /tmp/rb12-old # defect 1's cause: windowing from 6 threads on one tokenizer
        (cd /tmp/rb12-old && PYTHONPATH=/tmp/rb12-old:$iso timeout 120 "$py" tests/race_windows.py 20) >"$logs/old-race.log" 2>&1
        echo "== $logs/old-race.log" && tail -1 "$logs/old-race.log"
        ;;
    pre1e54) # 1e54db7^: admission without the request's own work, threads at the loop's priority
        prepare pre1e54 1e54db7^ || continue
        extract test_adapted_pre_1e54db7.py /tmp/rb12-pre1e54
        run pre1e54-original /tmp/rb12-pre1e54 1 $T::test_admission_by_estimated_time_to_answer \
            $T::test_qa_admission_estimate_counts_overlapping_windows $T::test_inference_threads_run_below_the_event_loop \
            $T::test_default_threads_leave_one_core_to_the_event_loop
        run pre1e54-adapted /tmp/rb12-pre1e54 1 tests/test_adapted_pre_1e54db7.py
        ;;
    pre7b2c) # 7b2cb44^: uvicorn's 5 s keep-alive
        prepare pre7b2c 7b2cb44^ || continue
        run pre7b2c /tmp/rb12-pre7b2c 1 $T::test_idle_kept_alive_connections_outlive_the_clients_pool_timeout
        ;;
    pre708) # 708c5b2^: an oversized Content-Length kept the connection alive
        prepare pre708 708c5b2^ || continue
        run pre708 /tmp/rb12-pre708 1 $T::test_an_oversized_body_gets_413_and_a_closed_connection
        ;;
    head) # this checkout: every original test; the adapted variants that use no pre-fix-only interface
        run head-original "$repo" 0 tests/server/test_server_robustness.py
        prepare head HEAD || continue
        extract test_adapted_old_interface.py /tmp/rb12-head
        extract test_adapted_pre_1e54db7.py /tmp/rb12-head
        run head-adapted /tmp/rb12-head 0 tests/test_adapted_old_interface.py tests/test_adapted_pre_1e54db7.py \
            -k "429_counted or process_metrics or blank_api or bad_checkpoints or concurrent or oversized or default_threads"
        ;;
    *) echo "unknown stage $stage" >&2 ;;
    esac
done
for dir in /tmp/rb12-*; do
    [ -d "$dir" ] && git -C "$repo" worktree remove --force "$dir"
done
rm -rf "$iso"
