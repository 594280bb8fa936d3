#!/usr/bin/env bash
# The real-data comparison behind docs/RESULTS.md (configs/real_smollm2.yaml): about a day of CPU time, so it runs
# in the background, in resumable stages, from ONE fixed commit: a git worktree of the commit that started it, next
# to this repository, so that later changes to the code cannot alter a resumed stage. Nothing but committed files
# outlives a session (180 min; each starts from a fresh clone), so everything a later stage needs is committed into
# this repository's docs/results/real_smollm2_1m/: the records as each stage ends (and every 20 minutes during
# one), the adapters of the finished fine-tunes at every budget point, and, at `save`, the last checkpoint of a
# training in progress. `resume` rebuilds the worktree at RUN_COMMIT and the run folder from those records.
# A session's commits are submitted only while their diffs, binary files included, stay under the workplace's
# limit (256 MiB; a checkpoint added and later removed counts twice): run `save` ONCE, just before the session
# stops, and it keeps the new checkpoint out (the last committed one stays) where it would pass RUN_SUBMIT_MIB.
#
#   bash scripts/run_real.sh start     # once: the worktree at HEAD (committed, clean), then the stages
#   bash scripts/run_real.sh resume    # every later session, first thing: the same commit, from where it stopped
#   bash scripts/run_real.sh save      # before a session stops: commit what is done so far
#   bash scripts/run_real.sh status    # the commit, the stages done, the last lines of the log
#   bash scripts/run_real.sh size      # the diffs this session's commits add up to (what the submission limit counts),
#                                        # from the commit resume (or session-start) marked as the session's base
#   bash scripts/run_real.sh paused -- CMD...   # run CMD (tests, a benchmark) with the run stopped (SIGSTOP/SIGCONT),
#                                                 # the pause recorded in pauses.tsv, so timed stages keep the cores
#   bash scripts/run_real.sh screen    # (here) the untuned model on candidate forgetting tasks
#
# Which stage runs next: the first in STAGES that can run; a training stage (train-<method>, task_level) where at
# least RUN_TRAIN_MINUTES (30) are left before RUN_DEADLINE (170 minutes after start/resume), enough to reach a
# checkpoint; otherwise the next evaluation stage whose fine-tune is done (eval-<method>), then the report.
# Finished fine-tunes, checkpoints and evaluation cells are reused, so an interrupted stage simply starts again.
# Inside the worktree `stages` runs them and `stage NAME` one. Nothing here runs in CI.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
cd "${MANYICL_RUN_HERE:-$repo}"  # save-here: this script, run in the run's worktree
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
config=${RUN_CONFIG:-configs/real_smollm2.yaml}  # (RUN_CONFIG, RUN_DIR, RUN_STAGES: for a smoke test of this script)
run=${RUN_DIR:-runs/real_smollm2_1m}  # the config's output_dir
run_name=$(basename "$run")
tree="$(dirname "$repo")/manyicl-run-$run_name"  # the worktree of the run's commit
records_repo="${MANYICL_RECORDS_REPO:-$repo}"  # inside the worktree: the repository that started the run
dest="$records_repo/docs/results/$run_name"
# shellcheck disable=SC2206  # the stage names are words
# The trainings come first (next_stage takes the first that can run); the order changes no result. task_level
# before few_shot_ft: its per-task LoRAs are trained and evaluated inside the stage and their weights are not
# committed, so it must end in the session it starts in, while a mixture fine-tune goes on from its checkpoint.
STAGES=(${RUN_STAGES:-train-manyicl train-many_shot_last_ft train-zero_shot_ft task_level train-few_shot_ft
    eval-manyicl eval-base eval-many_shot_last_ft eval-zero_shot_ft eval-few_shot_ft report})

launch() {  # the stages, in the worktree, in the background, in its own process group (for `paused`)
    mkdir -p "$tree/$run"
    cd "$tree"
    PYTHONPATH="$tree/src" MANYICL_RECORDS_REPO="$repo" RUN_CONFIG="$config" RUN_DIR="$run" RUN_STAGES="${STAGES[*]}" \
        RUN_DEADLINE="${RUN_DEADLINE:-$(( $(date +%s) + 170 * 60 ))}" \
        setsid nohup bash scripts/run_real.sh stages >> "$run/run.log" 2>&1 < /dev/null &
    echo $! > "$run/run.pid"
    cd "$repo"
    echo "started in $tree (commit $(git -C "$tree" rev-parse --short HEAD)); log: $tree/$run/run.log"
}

running() { [[ -f "$tree/$run/run.pid" ]] && kill -0 "$(cat "$tree/$run/run.pid")" 2>/dev/null; }

commit_records() {  # commit docs/results/<run> only (whatever else is staged stays staged); retried past a busy index
    local message=$1 try
    git -C "$records_repo" add -- "docs/results/$run_name" 2>/dev/null || true
    git -C "$records_repo" diff --cached --quiet -- "docs/results/$run_name" && { echo "records: nothing new"; return; }
    for try in 1 2 3 4 5; do
        git -C "$records_repo" commit -q -m "$message" -- "docs/results/$run_name" && return
        sleep $(( try * 3 ))
    done
    echo "records copied but not committed (commit docs/results/$run_name by hand)"
}

records() {  # what docs/RESULTS.md cites and later stages need, from the run folder into docs/results/<run>
    local with_checkpoint=${1:-}
    mkdir -p "$dest"
    (cd "$run" && find . \( -name results.json -o -name curves.json -o -name compare_config.yaml -o -name report.md \
        -o -path './plots/*.png' \) -not -path './train/*' -print0) |
        while IFS= read -r -d '' f; do mkdir -p "$dest/$(dirname "$f")"; cp "$run/$f" "$dest/$f"; done
    # a finished fine-tune (train_summary.json written last): its folder without checkpoints (the adapter, the logs,
    # the mixture), and at each budget point its checkpoint's adapter and marker (what budgets/ evaluates)
    local budget_steps summary method_dir step
    [[ -d "$run/train" ]] || mkdir -p "$run/train"
    budget_steps=$(python -c "import sys; from manyicl.compare import budget_steps; from manyicl.config import \
load_config; print(' '.join(map(str, budget_steps(load_config(sys.argv[1])))))" "$config")
    while IFS= read -r -d '' summary; do
        method_dir=$(dirname "$summary")
        local rel=${method_dir#"$run"/} skip=()
        # a per-task LoRA (train/task_level/<task>) is evaluated in its own stage: its weights are not needed later
        [[ $rel == train/*/* ]] && skip=(-not -name adapter_model.safetensors)
        # a checkpoint saved (save) while this fine-tune was still training is no longer needed
        if [[ -d "$dest/$rel/checkpoints" ]]; then
            find "$dest/$rel/checkpoints" -name optimizer.pt | while read -r f; do rm -rf "$(dirname "$f")"; done
        fi
        (cd "$method_dir" && find . -type f -not -path './checkpoints/*' -not -name manyicl.lock "${skip[@]}" -print0) |
            while IFS= read -r -d '' f; do mkdir -p "$dest/$rel/$(dirname "$f")"; cp "$method_dir/$f" "$dest/$rel/$f"; done
        for step in $budget_steps; do
            local ckpt="$method_dir/checkpoints/checkpoint-$step"
            [[ -f "$ckpt/manyicl_complete.json" && $rel != train/*/* ]] || continue
            mkdir -p "$dest/$rel/checkpoints/checkpoint-$step"
            cp "$ckpt"/adapter_config.json "$ckpt"/adapter_model.safetensors "$ckpt"/manyicl_complete.json \
                "$dest/$rel/checkpoints/checkpoint-$step/"
        done
    done < <(find "$run/train" -name train_summary.json -print0 2>/dev/null)
    if [[ -n "$with_checkpoint" ]]; then  # save: the last complete checkpoint of a training still in progress, whole
        for method_dir in "$run"/train/*/; do
            method_dir=${method_dir%/}
            [[ -f "$method_dir/train_summary.json" || ! -f "$method_dir/config.yaml" ]] && continue
            local last
            last=$(find "$method_dir/checkpoints" -maxdepth 2 -name manyicl_complete.json 2>/dev/null |
                sed 's|.*/checkpoint-\([0-9]*\)/.*|\1|' | sort -n | tail -1 || true)
            [[ -n "$last" ]] || continue
            rm -rf "$dest/${method_dir#"$run"/}"  # one checkpoint per training in progress: the last one
            mkdir -p "$dest/${method_dir#"$run"/}/checkpoints"
            (cd "$method_dir" && find . -maxdepth 1 -type f -not -name manyicl.lock -print0) |
                while IFS= read -r -d '' f; do cp "$method_dir/$f" "$dest/${method_dir#"$run"/}/$f"; done
            cp -r "$method_dir/checkpoints/checkpoint-$last" "$dest/${method_dir#"$run"/}/checkpoints/"
            echo "saved ${method_dir#"$run"/} at checkpoint-$last (training in progress)"
        done
    fi
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
    [[ -f "$run/pauses.tsv" ]] && cp "$run/pauses.tsv" "$dest/pauses.tsv"
    return 0
}

session_marker() { echo "$(git -C "$records_repo" rev-parse --absolute-git-dir)/manyicl-session-base"; }

marked_this_session() {  # the marker exists and is younger than a session (180 minutes)
    local marker; marker=$(session_marker)
    [[ -f $marker ]] && (( $(date +%s) - $(stat -c %Y "$marker") < 180 * 60 ))
}

mark_session() {  # resume, first thing in a session: the commit the session starts from, unless already marked
    local marker; marker=$(session_marker)
    marked_this_session && return 0
    git -C "$records_repo" rev-parse HEAD > "$marker"
    echo "this session's base: $(cut -c1-7 "$marker") (the submission limit counts the diffs from it)"
}

session_base() {  # the commit this session started from: as resume marked it within the last 180 minutes (a
    # session's length; a workspace may carry the last session's reflog), else the upstream where there is one,
    # else the branch's first reflog entry (a fresh clone creates main at the landed commit)
    if marked_this_session; then cat "$(session_marker)"; return; fi
    git -C "$records_repo" rev-parse -q --verify '@{upstream}' 2>/dev/null ||
        git -C "$records_repo" log -g --format=%H "$(git -C "$records_repo" symbolic-ref -q --short HEAD || echo HEAD)" | tail -1
}

submission_bytes() {  # this session's commits and what is staged, as diffs with binary files: what the limit counts
    local base; base=$(session_base)
    echo $(( $(git -C "$records_repo" log -p --binary --format= "$base..HEAD" | wc -c) + \
        $(git -C "$records_repo" diff --cached --binary | wc -c) ))
}

restore() {  # a fresh clone: the worktree at the run's commit and its run folder from the committed records
    [[ -f "$dest/RUN_COMMIT" ]] || { echo "$dest/RUN_COMMIT: missing, no run to resume (use start)" >&2; exit 2; }
    git worktree prune
    git worktree add --detach "$tree" "$(cat "$dest/RUN_COMMIT")"
    mkdir -p "$tree/$run/stages"
    cp -r "$dest/." "$tree/$run/"
    [[ -f "$dest/stages.tsv" ]] && cut -f1 "$dest/stages.tsv" | while read -r s; do touch "$tree/$run/stages/$s.done"; done
    echo "restored $tree at $(cat "$dest/RUN_COMMIT" | cut -c1-7) with the records of $dest"
}

done_stage() { [[ -f "$run/stages/$1.done" ]]; }

runnable() {  # why a stage cannot run now, on stdout; nothing when it can
    local name=$1 s
    case "$name" in
    train-*|task_level)
        # a training goes on in a later session from its last checkpoint (every save_steps; committed by save), so
        # it only needs the time to reach one; bf16 runs emulated on a CPU without AVX-512 BF16 (precision.py)
        if (( $(date +%s) + ${RUN_TRAIN_MINUTES:-30} * 60 > ${RUN_DEADLINE:-9999999999} )); then
            echo "fewer than RUN_TRAIN_MINUTES (30) minutes left before RUN_DEADLINE, too few to reach a checkpoint"
        fi ;;
    eval-base) ;;
    eval-*) done_stage "train-${name#eval-}" || echo "train-${name#eval-} is not done" ;;
    report) for s in "${STAGES[@]}"; do [[ $s == report ]] || done_stage "$s" || { echo "$s is not done"; break; }; done ;;
    esac
}

stop_saver() {  # (|| true: the saver may have ended by the time it is killed; under set -e a failed kill would end
    # the stages right after a stage's work, before it is recorded as done, as it once did at 7f324d2)
    [[ -n "${saver:-}" ]] && { pkill -P "$saver" 2>/dev/null || true; kill "$saver" 2>/dev/null || true; }
    saver=
}

stage() {
    local name=$1 start
    start=$(date +%s)
    done_stage "$name" && { echo "stage $name: done before"; return; }
    echo "== stage $name ($(date -u +%FT%TZ), commit $(git rev-parse --short HEAD))"
    # every 20 minutes the records so far are committed: a session that stops mid-stage loses at most that
    ( while sleep 1200; do records >/dev/null && commit_records "real run: stage $name in progress"; done ) &
    saver=$!  # (global: the trap runs after this function has returned)
    trap 'stop_saver' EXIT
    case "$name" in
    train-*) manyicl compare "$config" --train-only --only "${name#train-}" ;;
    eval-*) manyicl compare "$config" --only "${name#eval-}" ;;
    task_level) manyicl compare "$config" --only task_level ;;
    report) manyicl compare "$config" ;;  # every method, all reused: the report of the whole run
    *) echo "scripts/run_real.sh: unknown stage '$name'; use one of ${STAGES[*]}" >&2; exit 2 ;;
    esac
    stop_saver
    local seconds=$(( $(date +%s) - start ))
    echo "wall time (stage $name): $seconds s"
    records
    printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$(git rev-parse HEAD)" "$(date -u +%FT%TZ)" "$seconds" \
        "$(lscpu | sed -n 's/^Model name: *//p' | head -1)" >> "$dest/stages.tsv"
    commit_records "real run (commit $(git rev-parse --short HEAD)): stage $name done in $seconds s"
    mkdir -p "$run/stages" && touch "$run/stages/$name.done"  # after its records are copied and committed
}

next_stage() {  # the first stage, in order, that is not done and can run now; the others' reasons on stderr
    local s why
    for s in "${STAGES[@]}"; do
        done_stage "$s" && continue
        why=$(runnable "$s")
        [[ -z "$why" ]] && { echo "$s"; return; }
        echo "stage $s: not now: $why" >&2
    done
}

case "${1:-}" in
start)
    [[ -e "$tree" || -f "$dest/RUN_COMMIT" ]] && { echo "the run was started (use resume)" >&2; exit 2; }
    [[ -z "$(git status --porcelain --untracked-files=no)" ]] || {
        echo "uncommitted changes: commit them first, the run is made from a commit" >&2; exit 2; }
    git worktree add --detach "$tree" HEAD
    mkdir -p "$dest" && git rev-parse HEAD > "$dest/RUN_COMMIT"
    commit_records "real run: started from commit $(git rev-parse --short HEAD)"
    launch
    ;;
resume)
    mark_session
    if [[ -d "$tree" ]]; then
        running && { echo "already running (pid $(cat "$tree/$run/run.pid"))" >&2; exit 2; }
        if [[ "$(git -C "$tree" rev-parse HEAD)" != "$(cat "$dest/RUN_COMMIT")" ]]; then  # RUN_COMMIT moved on
            git -C "$tree" checkout -q --detach "$(cat "$dest/RUN_COMMIT")"
            echo "the worktree is now at RUN_COMMIT $(cut -c1-7 "$dest/RUN_COMMIT")"
        fi
    else
        restore
    fi
    launch
    ;;
save)  # (here) commit the records so far and the last checkpoint of a training in progress, from the worktree
    [[ -d "$tree" ]] || { echo "$tree: no run here"; exit 0; }
    # this script (not the worktree's older copy) runs in the worktree, with the run's code on the path
    MANYICL_RUN_HERE="$tree" PYTHONPATH="$tree/src" MANYICL_RECORDS_REPO="$repo" RUN_CONFIG="$config" RUN_DIR="$run" \
        bash "$repo/scripts/run_real.sh" save-here
    ;;
save-here)
    records with-checkpoint
    # a per-task LoRA of task_level trained but not yet evaluated (cell and learning curve): records leaves its weights
    # out, and the stage, resumed in the next session, reuses the training and must load them to evaluate it
    python - "$run" "$dest" "$config" <<'PY'
import json, pathlib, shutil, sys
from manyicl.config import load_config
run, dest = map(pathlib.Path, sys.argv[1:3])
ev = load_config(sys.argv[3]).evaluation
def rows(name):
    return json.loads((run / name).read_text(encoding="utf-8")) if (run / name).exists() else []
results, curves = rows("results.json"), rows("curves.json")
for summary in run.glob("train/task_level/*/train_summary.json"):
    task, weights = summary.parent.name, summary.parent / "adapter" / "adapter_model.safetensors"
    cell = any(r["method"] == "task_level" and r["task"] == task for r in results)
    curve = sum(c["method"] == "task_level" and c["task"] == task for c in curves) >= ev.curve_sequences
    if weights.exists() and not (cell and (curve or not ev.learning_curve)):
        (dest / weights.relative_to(run)).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(weights, dest / weights.relative_to(run))
        print(f"saved task_level/{task}'s weights (trained, not yet evaluated)")
PY
    git -C "$records_repo" add -- "docs/results/$run_name"
    limit=$(( ${RUN_SUBMIT_MIB:-200} * 1024 * 1024 )) bytes=$(submission_bytes)
    if (( bytes > limit )); then  # the checkpoints of trainings in progress stay as last committed
        for method_dir in "$run"/train/*/; do
            rel=docs/results/$run_name/${method_dir#"$run"/}
            # (as records chose them: a fine-tune still training; its log goes back with its checkpoint)
            [[ -f "$method_dir/train_summary.json" || ! -f "$method_dir/config.yaml" ]] && continue
            git -C "$records_repo" rm -r -q --cached --ignore-unmatch -- "$rel"
            rm -rf "$records_repo/$rel"
            git -C "$records_repo" checkout -q HEAD -- "$rel" 2>/dev/null || true
        done
        echo "save: with the new checkpoint this session's diffs would come to $(( bytes >> 20 )) MiB, over" \
             "RUN_SUBMIT_MIB=${RUN_SUBMIT_MIB:-200}: it is not committed (the last committed checkpoint stays);" \
             "the training resumes from that one"
    fi
    commit_records "real run (commit $(git rev-parse --short HEAD)): saved while in progress"
    echo "this session's diffs: $(( $(submission_bytes) >> 20 )) MiB (the submission limit: 256 MiB)"
    ;;
session-start)  # (resume does it) mark this session's base by hand, in a session that does not resume
    mark_session
    ;;
size)
    echo "this session's diffs (from $(session_base | cut -c1-7)): $(( $(submission_bytes) >> 20 )) MiB" \
         "(the submission limit: 256 MiB)"
    ;;
status)
    [[ -d "$tree" ]] || { echo "not started here (resume rebuilds it from $dest)"; exit 0; }
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
        # pauses may overlap (two test runs at once): a count under a lock; the first stops the run, the last
        # one out lets it continue
        count="$tree/$run/pause.count"
        exec 9>"$tree/$run/pause.lock"
        carry_on() {  # on every exit: the run continues once no other pause holds it, and the pause is on record
            flock 9
            local n; n=$(( $(cat "$count" 2>/dev/null || echo 1) - 1 ))
            (( n > 0 )) && echo "$n" > "$count" || { rm -f "$count"; kill -CONT -- "-$pgid"; }
            flock -u 9
            printf '%s\t%s\t%s\n' "$(date -u -d "@$from" +%FT%TZ)" "$(( $(date +%s) - from ))" "$cmd" >> "$tree/$run/pauses.tsv"
        }
        trap carry_on EXIT  # set before the stop, so nothing can leave the run stopped
        flock 9
        echo $(( $(cat "$count" 2>/dev/null || echo 0) + 1 )) > "$count"
        kill -STOP -- "-$pgid"
        flock -u 9
    fi
    "$@"
    ;;
stages)
    while s=$(next_stage) && [[ -n "$s" ]]; do stage "$s"; done
    echo "no stage can run now ($(date -u +%FT%TZ))"
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
    echo "scripts/run_real.sh: use start, resume, save, status, size, session-start, paused -- CMD, screen (or, in the" \
         "run's worktree, stages or stage NAME)" >&2
    exit 2
    ;;
esac
