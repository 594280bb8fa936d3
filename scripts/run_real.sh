#!/usr/bin/env bash
# The real-data comparison behind docs/RESULTS.md (configs/real_smollm2.yaml): about a day of CPU time, so it runs
# in the background, in resumable stages, from ONE fixed commit: a git worktree of the commit that started it, next
# to this repository, so that later changes to the code cannot alter a resumed stage. Each stage prints its wall
# time and, as it ends, copies its records into this repository's docs/results/real_smollm2_1m/ and commits them.
#
#   bash scripts/run_real.sh start     # once: the worktree at HEAD (committed, clean), then every stage in order
#   bash scripts/run_real.sh resume    # every later session: the same worktree and commit, from where it stopped
#   bash scripts/run_real.sh status    # the commit, the stages done, the last lines of the log
#   bash scripts/run_real.sh paused -- CMD...   # run CMD (tests, a benchmark) with the run stopped (SIGSTOP/SIGCONT),
#                                                 # the pause recorded in pauses.tsv, so timed stages keep the cores
#   bash scripts/run_real.sh screen    # (here) the untuned model on candidate forgetting tasks
#
# Inside the worktree `stages` runs them all and `stage NAME` one (train-<method>, eval-<method>, task_level,
# report); finished fine-tunes, checkpoints and evaluation cells are reused, so an interrupted stage simply starts
# again. Nothing here runs in CI.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
cd "$repo"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
config=${RUN_CONFIG:-configs/real_smollm2.yaml}  # (RUN_CONFIG, RUN_DIR, RUN_STAGES: for a smoke test of this script)
run=${RUN_DIR:-runs/real_smollm2_1m}  # the config's output_dir
run_name=$(basename "$run")
tree="$(dirname "$repo")/manyicl-run-$run_name"  # the worktree of the run's commit
# shellcheck disable=SC2206  # the stage names are words
STAGES=(${RUN_STAGES:-train-manyicl eval-base eval-manyicl train-many_shot_last_ft eval-many_shot_last_ft
    train-zero_shot_ft eval-zero_shot_ft train-few_shot_ft eval-few_shot_ft task_level report})

launch() {  # every stage, in the worktree, in the background, in its own process group (for `paused`)
    mkdir -p "$tree/$run"
    cd "$tree"
    PYTHONPATH="$tree/src" MANYICL_RECORDS_REPO="$repo" RUN_CONFIG="$config" RUN_DIR="$run" RUN_STAGES="${STAGES[*]}" \
        setsid nohup bash scripts/run_real.sh stages >> "$run/run.log" 2>&1 < /dev/null &
    echo $! > "$run/run.pid"
    cd "$repo"
    echo "started in $tree (commit $(git -C "$tree" rev-parse --short HEAD)); log: $tree/$run/run.log"
}

running() { [[ -f "$tree/$run/run.pid" ]] && kill -0 "$(cat "$tree/$run/run.pid")" 2>/dev/null; }

records() {  # what docs/RESULTS.md cites, from the run folder into the repository that started the run; committed
    local stage=$1 seconds=$2 target="${MANYICL_RECORDS_REPO:-$PWD}" dest
    dest="$target/docs/results/$run_name"
    mkdir -p "$dest"
    (cd "$run" && find . \( -name results.json -o -name curves.json -o -name train_log.jsonl -o -name mixture.json \
        -o -name train_summary.json -o -name compare_config.yaml -o -name report.md -o -path './plots/*.png' \) \
        -not -path './train/*/checkpoints/*' -print0) |
        while IFS= read -r -d '' f; do mkdir -p "$dest/$(dirname "$f")"; cp "$run/$f" "$dest/$f"; done
    # the per-query rows the report's intervals are computed from, without the inputs and label scores (their size):
    # `manyicl report docs/results/$run_name` regenerates the report from these records
    python - "$run" "$dest" <<'PY'
import json, pathlib, sys
run, dest = map(pathlib.Path, sys.argv[1:])
for f in run.glob("**/predictions/**/*.jsonl"):
    out = dest / f.relative_to(run)
    if out.exists() and out.stat().st_mtime >= f.stat().st_mtime:
        continue
    out.parent.mkdir(parents=True, exist_ok=True)
    keep = ("prediction", "golds", "skipped", "metric_row")
    rows = [json.loads(line) for line in f.read_text(encoding="utf-8").splitlines() if line.strip()]
    out.write_text("".join(json.dumps({k: r[k] for k in keep if k in r}, ensure_ascii=False) + "\n" for r in rows),
                   encoding="utf-8")
PY
    printf '%s\t%s\t%s\t%s\t%s\n' "$stage" "$(git rev-parse HEAD)" "$(date -u +%FT%TZ)" "$seconds" \
        "$(lscpu | sed -n 's/^Model name: *//p' | head -1)" >> "$dest/stages.tsv"
    [[ -f "$run/pauses.tsv" ]] && cp "$run/pauses.tsv" "$dest/pauses.tsv"
    if [[ -n "${MANYICL_RECORDS_REPO:-}" ]]; then
        git -C "$target" add -- "docs/results/$run_name" || true
        if git -C "$target" diff --cached --quiet -- "docs/results/$run_name"; then
            echo "records of stage $stage: nothing new to commit"
        elif ! git -C "$target" commit -q -m "real run (commit $(git rev-parse --short HEAD)): stage $stage done in $seconds s" \
                -- "docs/results/$run_name"; then
            echo "records of stage $stage copied but not committed (commit them by hand)"
        fi
    fi
}

stage() {
    local name=$1 start
    start=$(date +%s)
    [[ -f "$run/stages/$name.done" ]] && { echo "stage $name: done before"; return; }
    echo "== stage $name ($(date -u +%FT%TZ), commit $(git rev-parse --short HEAD))"
    case "$name" in
    train-*) manyicl compare "$config" --train-only --only "${name#train-}" ;;
    eval-*) manyicl compare "$config" --only "${name#eval-}" ;;
    task_level) manyicl compare "$config" --only task_level ;;
    report) manyicl compare "$config" ;;  # every method, all reused: the report of the whole run
    *) echo "scripts/run_real.sh: unknown stage '$name'; use one of ${STAGES[*]}" >&2; exit 2 ;;
    esac
    local seconds=$(( $(date +%s) - start ))
    echo "wall time (stage $name): $seconds s"
    records "$name" "$seconds"
    mkdir -p "$run/stages" && touch "$run/stages/$name.done"  # after its records are copied and committed
}

case "${1:-}" in
start)
    [[ -e "$tree" ]] && { echo "$tree exists: the run was started (use resume)" >&2; exit 2; }
    [[ -z "$(git status --porcelain --untracked-files=no)" ]] || {
        echo "uncommitted changes: commit them first, the run is made from a commit" >&2; exit 2; }
    git worktree add --detach "$tree" HEAD
    launch
    ;;
resume)
    [[ -d "$tree" ]] || { echo "$tree: no run to resume (use start)" >&2; exit 2; }
    running && { echo "already running (pid $(cat "$tree/$run/run.pid"))" >&2; exit 2; }
    launch
    ;;
status)
    [[ -d "$tree" ]] || { echo "not started"; exit 0; }
    echo "commit $(git -C "$tree" rev-parse HEAD); $(running && echo running || echo 'not running')"
    ls "$tree/$run/stages" 2>/dev/null | sed 's/^/done: /'
    tail -n 5 "$tree/$run/run.log" 2>/dev/null | tr '\r' '\n' | tail -n 5
    ;;
paused)
    shift; [[ "${1:-}" == "--" ]] && shift
    if running; then
        pgid=$(ps -o pgid= "$(cat "$tree/$run/run.pid")" | tr -d ' ')
        from=$(date +%s)
        cmd="$*"
        carry_on() {  # on every exit: the run continues and the pause is on record
            kill -CONT -- "-$pgid"
            printf '%s\t%s\t%s\n' "$(date -u -d "@$from" +%FT%TZ)" "$(( $(date +%s) - from ))" "$cmd" >> "$tree/$run/pauses.tsv"
        }
        trap carry_on EXIT  # set before the stop, so nothing can leave the run stopped
        kill -STOP -- "-$pgid"
    fi
    "$@"
    ;;
stages)
    for s in "${STAGES[@]}"; do stage "$s"; done
    ;;
stage)
    stage "$2"
    ;;
screen)
    start=$(date +%s)
    manyicl eval configs/forgetting_screen.yaml "${@:2}"
    echo "wall time (screen stage): $(( $(date +%s) - start )) s"
    cp runs/forgetting_screen/results.json docs/results/forgetting_screen_results.json
    ;;
*)
    echo "scripts/run_real.sh: use start, resume, status, paused -- CMD, screen (or, in the run's worktree, stages" \
         "or stage NAME)" >&2
    exit 2
    ;;
esac
