#!/usr/bin/env bash
# Container smoke test for machines without a Docker engine.
#
# Replays the Dockerfile in a temporary directory, step by step:
#   1. the build context: the repository's files (tracked + untracked, not ignored), as `docker
#      build .` would send them;
#   2. the `build` stage: every ENV, WORKDIR, COPY (from the context) and RUN, in order — so the
#      real `npm ci`, `npm run build` and `npm prune --omit=dev` run;
#   3. the final stage (or SMOKE_TARGET): its ENV, WORKDIR and COPY --from=build steps assemble a
#      runtime folder; its RUN steps set up the OS image (users, folders) and are only listed;
#   4. its CMD starts the service (MODEL_PATH unset: the embedded default model) on a free port
#      with ADAPTER_DIR / DEFAULT_MODEL_DIR / CACHE_DIR inside the temp dir; its HEALTHCHECK
#      command is polled until it passes (the same probe Docker would run);
#   5. SIGTERM, and the process must exit 0.
# Deviations from a real build, on purpose: npm runs with prefer-offline (the machine may have no
# internet) and ONNXRUNTIME_NODE_INSTALL is replaced by SMOKE_ORT_INSTALL (default `skip`): the
# CUDA provider download from NuGet needs the internet. With DEVICE=auto the service then logs why
# it uses the CPU, exactly as the CUDA image does on a machine without a GPU.
#
# Environment: SMOKE_TARGET (default: the last stage), SMOKE_READY_TIMEOUT seconds (300),
# SMOKE_STOP_TIMEOUT seconds (60), SMOKE_KEEP=1 keeps the temp dir, SMOKE_ORT_INSTALL.
# Exit 0 when every step passed; the last lines say what failed otherwise.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DOCKERFILE=${DOCKERFILE:-$ROOT/Dockerfile}
READY_TIMEOUT=${SMOKE_READY_TIMEOUT:-300}
STOP_TIMEOUT=${SMOKE_STOP_TIMEOUT:-60}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/loraserve-smoke.XXXXXX")
SERVER_PID=""

log() { printf '[smoke] %s\n' "$*"; }
fail() { printf '[smoke] FAIL: %s\n' "$*" >&2; exit 1; }

cleanup() {
  if [[ -n "$SERVER_PID" ]] && kill -0 "$SERVER_PID" 2>/dev/null; then
    kill -KILL "$SERVER_PID" 2>/dev/null || true
  fi
  if [[ "${SMOKE_KEEP:-0}" == 1 ]]; then log "kept $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT

[[ -f "$DOCKERFILE" ]] || fail "no Dockerfile at $DOCKERFILE"

# --- 1. build context --------------------------------------------------------------------------
# .dockerignore patterns: simple globs matched against the path and its leading folders (no `!`)
IGNORES=()
if [[ -f "$ROOT/.dockerignore" ]]; then
  while IFS= read -r pat; do
    pat=${pat%%#*}
    pat=${pat%"${pat##*[![:space:]]}"}
    [[ -n "$pat" ]] || continue
    [[ "$pat" != '!'* ]] || fail ".dockerignore exceptions (!) are not replayed"
    IGNORES+=("${pat#/}")
  done <"$ROOT/.dockerignore"
fi
ignored() {
  local f="$1" pat
  for pat in "${IGNORES[@]}"; do
    # shellcheck disable=SC2053 # the pattern is a glob on purpose
    [[ "$f" == $pat || "$f" == $pat/* ]] && return 0
  done
  return 1
}
CONTEXT="$WORK/context"
mkdir -p "$CONTEXT"
(
  cd "$ROOT"
  git ls-files -z --cached --others --exclude-standard | while IFS= read -r -d '' f; do
    [[ -e "$f" ]] || continue # deleted in the working tree
    ! ignored "$f" || continue
    mkdir -p "$CONTEXT/$(dirname "$f")"
    cp -p "$f" "$CONTEXT/$f"
  done
)
log "context: $(find "$CONTEXT" -type f | wc -l) files"

# --- Dockerfile → one instruction per line -----------------------------------------------------
# Joins continuation lines and drops comments; no heredocs, no parser directives besides syntax=.
INSTRUCTIONS="$WORK/instructions"
awk '
  /^[ \t]*#/ { next }
  {
    line = $0
    if (line ~ /\\[ \t]*$/) { sub(/\\[ \t]*$/, "", line); acc = acc line; next }
    acc = acc line
    if (acc ~ /[^ \t]/) print acc
    acc = ""
  }
  END { if (acc ~ /[^ \t]/) print acc }
' "$DOCKERFILE" >"$INSTRUCTIONS"

# Global ARG defaults (before the first FROM) and stage names.
declare -A ARGS=()
STAGES=()
while IFS= read -r line; do
  read -r op rest <<<"$line"
  case "${op^^}" in
    ARG) if [[ ${#STAGES[@]} -eq 0 && "$rest" == *=* ]]; then ARGS["${rest%%=*}"]="${rest#*=}"; fi ;;
    FROM)
      if [[ "$rest" =~ [[:space:]][Aa][Ss][[:space:]]+([A-Za-z0-9_.-]+)$ ]]; then STAGES+=("${BASH_REMATCH[1]}"); else STAGES+=("stage${#STAGES[@]}"); fi
      ;;
  esac
done <"$INSTRUCTIONS"
[[ ${#STAGES[@]} -gt 0 ]] || fail "no FROM in $DOCKERFILE"
TARGET=${SMOKE_TARGET:-${STAGES[-1]}}
log "stages: ${STAGES[*]}; target: $TARGET"
for s in "${STAGES[@]}"; do [[ "$s" == build ]] && HAVE_BUILD=1; done
[[ "${HAVE_BUILD:-0}" == 1 ]] || fail "no stage named build"

subst_args() { # ${NAME} / $NAME from the global ARG defaults
  local s="$1" k
  for k in "${!ARGS[@]}"; do s="${s//\$\{$k\}/${ARGS[$k]}}"; s="${s//\$$k/${ARGS[$k]}}"; done
  printf '%s' "$s"
}

# JSON exec form → NUL-separated words
json_words() { node -e 'const a = JSON.parse(process.argv[1]); if (!Array.isArray(a)) process.exit(3); for (const w of a) process.stdout.write(String(w) + "\0");' "$1"; }

# container path → host path under a stage root
host_path() { # root workdir path
  local root="$1" wd="$2" p="$3"
  [[ "$p" == /* ]] || p="$wd/$p"
  printf '%s%s' "$root" "$p"
}

# COPY semantics: a directory's contents go into dest; files go into dest/ when dest ends with /
# or there are several sources, else become dest.
docker_copy() { # src-host dest-host dest-as-written n-sources cp-command...
  local src="$1" dhost="$2" dest="$3" n="$4"
  shift 4
  if [[ -d "$src" ]]; then
    mkdir -p "$dhost"
    "$@" "$src/." "$dhost/"
  elif [[ "$dest" == */ || "$n" -gt 1 ]]; then
    mkdir -p "$dhost"
    "$@" "$src" "$dhost/"
  else
    mkdir -p "$(dirname "$dhost")"
    "$@" "$src" "$dhost"
  fi
}

# ENV instruction → NAME=VALUE lines (simple values only: no quotes, no spaces)
env_pairs() {
  local rest="$1"
  if [[ "$rest" != *=* ]]; then # legacy `ENV NAME value`
    read -r k v <<<"$rest"
    printf '%s=%s\n' "$k" "$v"
    return
  fi
  local w
  for w in $rest; do
    [[ "$w" == *=* ]] || fail "unsupported ENV form: $rest"
    [[ "$w" != *\"* && "$w" != *\'* ]] || fail "quoted ENV values are not replayed: $rest"
    printf '%s\n' "$w"
  done
}

# --- 2./3. replay stages -------------------------------------------------------------------------
BUILD_ROOT="$WORK/stage-build"
RUN_ROOT="$WORK/stage-$TARGET"
declare -A BUILD_ENV=() TARGET_ENV=()
BUILD_WD=/ TARGET_WD=/
HEALTHCHECK_JSON="" CMD_JSON="" EXPOSED=""
stage="" n=-1
while IFS= read -r line; do
  read -r op rest <<<"$line"
  OP=${op^^}
  if [[ "$OP" == FROM ]]; then
    n=$((n + 1))
    stage=${STAGES[$n]}
    log "FROM $(subst_args "${rest%% *}") ($stage)"
    continue
  fi
  if [[ "$stage" == build ]]; then
    case "$OP" in
      ENV)
        while IFS= read -r kv; do
          k=${kv%%=*} v=${kv#*=}
          if [[ "$k" == ONNXRUNTIME_NODE_INSTALL ]]; then
            log "ENV $k=$v (Dockerfile) → ${SMOKE_ORT_INSTALL:-skip} here: the CUDA provider download needs the internet"
            v=${SMOKE_ORT_INSTALL:-skip}
          fi
          BUILD_ENV[$k]=$v
        done < <(env_pairs "$rest")
        ;;
      WORKDIR) BUILD_WD=$rest; mkdir -p "$(host_path "$BUILD_ROOT" / "$BUILD_WD")" ;;
      COPY)
        [[ "$rest" != --from* ]] || fail "build stage copies from another stage: $line"
        read -r -a words <<<"$rest"
        words=("${words[@]/#--chown=*/}")
        dest=${words[-1]}
        unset 'words[-1]'
        dhost=$(host_path "$BUILD_ROOT" "$BUILD_WD" "$dest")
        srcs=()
        for w in "${words[@]}"; do [[ -n "$w" ]] && srcs+=("$w"); done
        for src in "${srcs[@]}"; do
          [[ -e "$CONTEXT/$src" ]] || fail "COPY $src: not in the build context (untracked and ignored, or missing)"
          docker_copy "$CONTEXT/$src" "$dhost" "$dest" "${#srcs[@]}" cp -a
        done
        log "COPY ${words[*]} → $dest"
        ;;
      RUN)
        [[ "$rest" != \[* ]] || fail "exec-form RUN is not replayed: $line"
        log "RUN $rest"
        # a clean environment, as in a docker build (an outer `npm test` exports npm_* variables
        # that would steer a nested npm); HOME stays for npm's cache
        envargs=(PATH="$PATH" HOME="$HOME" npm_config_prefer_offline=true npm_config_update_notifier=false)
        for k in "${!BUILD_ENV[@]}"; do envargs+=("$k=${BUILD_ENV[$k]}"); done
        (cd "$(host_path "$BUILD_ROOT" / "$BUILD_WD")" && env -i "${envargs[@]}" sh -ec "$rest") || fail "RUN $rest"
        ;;
      ARG | LABEL | USER | EXPOSE | VOLUME | STOPSIGNAL | SHELL) ;;
      *) fail "build stage instruction not replayed: $OP" ;;
    esac
  elif [[ "$stage" == "$TARGET" ]]; then
    case "$OP" in
      ENV) while IFS= read -r kv; do TARGET_ENV[${kv%%=*}]=${kv#*=}; done < <(env_pairs "$rest") ;;
      WORKDIR) TARGET_WD=$rest; mkdir -p "$(host_path "$RUN_ROOT" / "$TARGET_WD")" ;;
      COPY)
        read -r -a words <<<"$rest"
        from=""
        srcs=()
        for w in "${words[@]}"; do
          case "$w" in --from=*) from=${w#--from=} ;; --*) ;; *) srcs+=("$w") ;; esac
        done
        dest=${srcs[-1]}
        unset 'srcs[-1]'
        if [[ "$from" != build ]]; then log "COPY --from=$from ${srcs[*]}: image files, not replayed"; continue; fi
        dhost=$(host_path "$RUN_ROOT" "$TARGET_WD" "$dest")
        for src in "${srcs[@]}"; do
          shost=$(host_path "$BUILD_ROOT" "$BUILD_WD" "$src")
          [[ -e "$shost" ]] || fail "COPY --from=build $src: the build stage has no such path"
          # hard links: node_modules is large and nothing writes into it
          docker_copy "$shost" "$dhost" "$dest" "${#srcs[@]}" cp -al
        done
        log "COPY --from=build ${srcs[*]} → $dest"
        ;;
      RUN) log "RUN (image setup, not replayed): $rest" ;;
      HEALTHCHECK)
        [[ "$rest" =~ CMD[[:space:]]+(\[.*\])[[:space:]]*$ ]] || fail "HEALTHCHECK must use the exec form CMD [...]"
        HEALTHCHECK_JSON=${BASH_REMATCH[1]}
        ;;
      CMD) CMD_JSON=$rest ;;
      EXPOSE) EXPOSED=$rest ;;
      ENTRYPOINT) fail "ENTRYPOINT is not replayed; use CMD" ;;
      ARG | LABEL | USER | VOLUME | STOPSIGNAL | SHELL) ;;
      *) fail "target stage instruction not replayed: $OP" ;;
    esac
  fi
done <"$INSTRUCTIONS"

[[ -n "$CMD_JSON" ]] || fail "stage $TARGET has no CMD"
[[ -n "$HEALTHCHECK_JSON" ]] || fail "stage $TARGET has no HEALTHCHECK"
[[ "${TARGET_ENV[PORT]:-}" == "${EXPOSED%%/*}" ]] || fail "EXPOSE $EXPOSED differs from ENV PORT=${TARGET_ENV[PORT]:-unset}"
[[ -z "${TARGET_ENV[MODEL_PATH]:-}" ]] || fail "the image sets MODEL_PATH; it must stay unset (embedded default model)"

# --- 4. start the service ----------------------------------------------------------------------
PORT=$(node -e 'const s = require("node:net").createServer().listen(0, "127.0.0.1", () => { console.log(s.address().port); s.close(); });')
DATA="$WORK/data"
mkdir -p "$DATA/adapters" "$DATA/default-model" "$DATA/cache"
runenv=(PATH="$PATH" HOME="$WORK" TMPDIR="${TMPDIR:-/tmp}")
for k in "${!TARGET_ENV[@]}"; do runenv+=("$k=${TARGET_ENV[$k]}"); done
# container paths → temp dir; the same port for the service and its health check
runenv+=(PORT="$PORT" HOST=127.0.0.1 ADAPTER_DIR="$DATA/adapters" DEFAULT_MODEL_DIR="$DATA/default-model" CACHE_DIR="$DATA/cache")
mapfile -d '' CMD_WORDS < <(json_words "$CMD_JSON")
mapfile -d '' HC_WORDS < <(json_words "$HEALTHCHECK_JSON")
APP_DIR=$(host_path "$RUN_ROOT" / "$TARGET_WD")
LOG="$WORK/server.log"
log "CMD ${CMD_WORDS[*]} (in $APP_DIR, port $PORT)"
(cd "$APP_DIR" && exec env -i "${runenv[@]}" "${CMD_WORDS[@]}") >"$LOG" 2>&1 &
SERVER_PID=$!
started=$SECONDS

deadline=$((SECONDS + READY_TIMEOUT))
ready=0
while ((SECONDS < deadline)); do
  if ! kill -0 "$SERVER_PID" 2>/dev/null; then
    wait "$SERVER_PID" && rc=0 || rc=$?
    SERVER_PID=""
    tail -n 40 "$LOG" >&2
    fail "the service exited with status $rc before it was ready"
  fi
  if (cd "$APP_DIR" && env -i "${runenv[@]}" "${HC_WORDS[@]}") >/dev/null 2>&1; then ready=1; break; fi
  sleep 1
done
if [[ $ready != 1 ]]; then
  tail -n 40 "$LOG" >&2
  fail "HEALTHCHECK did not pass within ${READY_TIMEOUT}s"
fi
log "ready $((SECONDS - started))s after start: $(curl -fsS "http://127.0.0.1:$PORT/readyz")"
# which execution provider the service chose, and why (DEVICE=auto without a GPU: the CPU)
grep -o 'onnxruntime session on [a-z]* ([^"]*' "$LOG" | head -n 1 | sed 's/^/[smoke] /' || true
curl -fsS "http://127.0.0.1:$PORT/healthz" >/dev/null || fail "/healthz"
code=$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$PORT/docs")
[[ "$code" == 200 ]] || fail "/docs answered $code (is openapi.yaml in the image?)"

# --- 5. stop ---------------------------------------------------------------------------------------
kill -TERM "$SERVER_PID"
stop_deadline=$((SECONDS + STOP_TIMEOUT))
while kill -0 "$SERVER_PID" 2>/dev/null && ((SECONDS < stop_deadline)); do sleep 0.2; done
if kill -0 "$SERVER_PID" 2>/dev/null; then
  tail -n 40 "$LOG" >&2
  fail "still running ${STOP_TIMEOUT}s after SIGTERM"
fi
wait "$SERVER_PID" && rc=0 || rc=$?
SERVER_PID=""
if [[ $rc != 0 ]]; then
  tail -n 40 "$LOG" >&2
  fail "exit status $rc after SIGTERM (0 expected)"
fi
log "stopped with status 0 after SIGTERM"
log "PASS"
