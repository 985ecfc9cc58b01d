#!/usr/bin/env bash
# Zero-downtime runs: wrk on both listeners (keep-alive, 64 connections each) for the length of
# each operation; prints wall time and failed requests (non-2xx/3xx plus socket errors) per
# operation. Expected failures: 0.
#
#   bench/zero-downtime.sh [restart|upgrade|deploy|all]   (default: all; upgrade and deploy need root)
#
# restart/upgrade: the app is the built-in demo app (2 https + 2 http + root).
# deploy: the Next.js app of tests/fixtures/next-app (2 http instances) in a git repository
# cloned from a local bare origin, built with the pinned pnpm (as .ci/run installs it); a
# successful deploy of a new commit, then a deploy whose build fails and is rolled back.
# Everything runs on loopback.
set -euo pipefail
cd "$(dirname "$0")/.."
WHAT=${1:-all}
WINDOW=${WINDOW:-45}
command -v wrk >/dev/null || { echo "missing wrk (apt-get install wrk)" >&2; exit 1; }
cargo build --release --quiet
BIN=$PWD/target/release
W=$(mktemp -d /tmp/ow-zd.XXXXXX)
chmod 755 "$W"
UP=""
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$W"; if [ -n "$UP" ]; then rm -rf "$UP"; fi; }
trap cleanup EXIT

openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj /CN=localhost \
  -addext subjectAltName=DNS:localhost,IP:127.0.0.1 -keyout "$W/key.pem" -out "$W/cert.pem" 2>/dev/null
cp "$BIN/overwatch" "$W/overwatch-app"
users=""
if [ "$(id -u)" = 0 ] && id ow-proxy >/dev/null 2>&1 && id ow-app >/dev/null 2>&1; then
  users=$'user = "ow-proxy"\ngroup = "ow-ctl"'
  appuser='user = "ow-app"'
  mkdir -p "$W/app" && chown ow-app "$W/app"
else
  appuser=""
  mkdir -p "$W/app"
fi
cat > "$W/overwatch.toml" <<EOF
[overwatch]
$users
control_socket = "control.sock"
state_dir = "state"
[proxy]
https = ["127.0.0.1:19443"]
http = ["127.0.0.1:19080"]
cert = "cert.pem"
key = "key.pem"
[app]
dir = "app"
$appuser
ports = "19100-19199"
[app.https]
count = 2
command = "exec $W/overwatch-app demo-app"
[app.http]
count = 2
command = "exec $W/overwatch-app demo-app"
[app.root]
enabled = true
command = "exec $W/overwatch-app demo-app"
[app.backup]
command = "exec $W/overwatch-app demo-app"
[health]
path = "/health"
interval = "1s"
drain_timeout = "10s"
stop_timeout = "5s"
EOF
RUST_LOG=warn "$BIN/overwatch" run --config "$W/overwatch.toml" > "$W/overwatch.log" 2>&1 &
LAUNCHER=$!
pids+=($LAUNCHER)
CTL_SOCKET=$W/control.sock
ctl() { "$BIN/overwatchctl" --socket "$CTL_SOCKET" "$@"; }
ready() { # N: wait until N instances are ready
  for _ in $(seq 300); do
    n=$(ctl status --json 2>/dev/null | python3 -c 'import json,sys; d=json.load(sys.stdin); print(sum(i["state"]=="ready" for i in d["instances"]) if all(i["state"]=="ready" for i in d["instances"]) else -1)' 2>/dev/null || echo -1)
    [ "$n" = "$1" ] && return 0
    sleep 0.2
  done
  echo "instances not ready" >&2; return 1
}
ready 5

failed_of() { # wrk output file -> failed request count
  python3 - "$1" <<'PY'
import re, sys
t = open(sys.argv[1]).read()
n = 0
m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", t)
if m: n += sum(int(x) for x in m.groups())
m = re.search(r"Non-2xx or 3xx responses: (\d+)", t)
if m: n += int(m.group(1))
m = re.search(r"(\d+) requests in", t)
print(n, m.group(1) if m else "?")
PY
}

RESULTS=()
HTTPS_URL=https://127.0.0.1:19443/whoami
HTTP_URL=http://127.0.0.1:19080/whoami
WRK_EXTRA=()
run_op() { # name, command...
  local name=$1; shift
  if [ -n "$HTTPS_URL" ]; then
    wrk -t1 -c64 -d${WINDOW}s "${WRK_EXTRA[@]}" "$HTTPS_URL" > "$W/wrk-https.txt" 2>&1 &
  else
    echo "0 requests in" > "$W/wrk-https.txt" &
  fi
  local w1=$!
  wrk -t1 -c64 -d${WINDOW}s "${WRK_EXTRA[@]}" "$HTTP_URL" > "$W/wrk-http.txt" 2>&1 &
  local w2=$!
  sleep 2
  local t0 t1
  t0=$(date +%s.%N)
  "$@" > "$W/op.txt" 2>&1 || { echo "$name failed:"; cat "$W/op.txt"; }
  t1=$(date +%s.%N)
  wait $w1 $w2
  read -r f1 r1 < <(failed_of "$W/wrk-https.txt")
  read -r f2 r2 < <(failed_of "$W/wrk-http.txt")
  local wall; wall=$(python3 -c "print(f'{$t1-$t0:.1f}')")
  RESULTS+=("| $name | ${wall} s | $((r1 + r2)) | $((f1 + f2)) |")
  echo "$name: ${wall}s, $((f1 + f2)) failed of $((r1 + r2))"
}

kill_instance() {
  local pid
  pid=$(ctl status --json | python3 -c 'import json,sys; d=json.load(sys.stdin); print([i["pid"] for i in d["instances"] if i["pool"]=="http"][0])')
  kill -9 "$pid"
  for _ in $(seq 300); do
    ctl status --json | python3 -c "import json,sys; d=json.load(sys.stdin); sys.exit(0 if len(d['instances'])==5 and all(i['state']=='ready' and i['pid']!=$pid for i in d['instances']) else 1)" && return 0
    sleep 0.1
  done
  return 1
}

upgrade_ten() {
  # A root-owned directory outside /tmp: the launcher trusts only binaries no one else can write.
  UP=$(mktemp -d /run/ow-zd-up.XXXXXX); chmod 755 "$UP"
  for i in $(seq 10); do
    cp "$BIN/overwatch" "$UP/overwatch-$i"; chmod 755 "$UP/overwatch-$i"
    ctl upgrade --binary "$UP/overwatch-$i"
    for _ in $(seq 300); do
      [ "$(readlink /proc/$LAUNCHER/exe)" = "$UP/overwatch-$i" ] && [ "$(pgrep -P $LAUNCHER -f 'worker' | wc -l)" = 2 ] && break
      sleep 0.1
    done
    ready 5
  done
}

if [ "$WHAT" = restart ] || [ "$WHAT" = all ]; then
  run_op "restart-all" ctl restart-all
  run_op "restart-all --ssl 4 --http 1" ctl restart-all --ssl 4 --http 1
  run_op "restart-all --ssl 1 --http 3 --root false" ctl restart-all --ssl 1 --http 3 --root false
  run_op "restart-all --ssl 2 --http 2 --root true (scale back up)" ctl restart-all --ssl 2 --http 2 --root true
  run_op "SIGKILL of an http instance" kill_instance
fi
if [ "$WHAT" = upgrade ] || [ "$WHAT" = all ]; then
  [ "$(id -u)" = 0 ] || { echo "upgrade needs root" >&2; exit 1; }
  run_op "10 upgrades in a row" upgrade_ten
fi

deploy_bench() {
  [ "$(id -u)" = 0 ] && id ow-app >/dev/null 2>&1 || { echo "deploy needs root and the ow-app account (.ci/run)" >&2; exit 1; }
  command -v pnpm >/dev/null || { echo "deploy needs pnpm (see .ci/run)" >&2; exit 1; }
  kill "$LAUNCHER" 2>/dev/null || true; wait "$LAUNCHER" 2>/dev/null || true
  local D=$W/deploy store=/var/cache/ow-pnpm-store fixture=$PWD/tests/fixtures/next-app
  mkdir -p "$D/work/pages" "$D/home" "$store"; chmod 755 "$D"
  export GIT_CONFIG_GLOBAL=$D/gitconfig npm_config_store_dir=$store NEXT_TELEMETRY_DISABLED=1
  printf '[safe]\n\tdirectory = *\n[user]\n\tname = bench\n\temail = bench@localhost\n[init]\n\tdefaultBranch = main\n' > "$GIT_CONFIG_GLOBAL"
  chmod 644 "$GIT_CONFIG_GLOBAL"
  for f in package.json pnpm-lock.yaml next.config.js .gitignore pages/index.js; do cp "$fixture/$f" "$D/work/$f"; done
  git init -q --bare "$D/origin.git"
  (cd "$D/work" && git init -q && git add -A && git commit -qm "first release" \
     && git remote add origin ../origin.git && git push -q -u origin main)
  git clone -q "$D/origin.git" "$D/app"
  (cd "$D/app" && pnpm install --frozen-lockfile >/dev/null && pnpm build >/dev/null)
  chown -R ow-app "$D/origin.git" "$D/app" "$D/home" "$store"
  cat > "$D/overwatch.toml" <<EOF
[overwatch]
user = "ow-proxy"
group = "ow-ctl"
control_socket = "control.sock"
state_dir = "state"
[proxy]
https = []
http = ["127.0.0.1:19080"]
[app]
dir = "app"
user = "ow-app"
ports = "19200-19299"
env = { NODE_ENV = "production", NEXT_TELEMETRY_DISABLED = "1", HOME = "$D/home", npm_config_store_dir = "$store" }
[app.https]
count = 0
command = "pnpm start"
[app.http]
count = 2
command = "pnpm start"
[health]
path = "/"
ready_timeout = "60s"
drain_timeout = "10s"
stop_timeout = "5s"
[deploy]
build = "pnpm build"
install = "pnpm install --no-frozen-lockfile"
EOF
  RUST_LOG=warn "$BIN/overwatch" run --config "$D/overwatch.toml" > "$D/overwatch.log" 2>&1 &
  LAUNCHER=$!
  pids+=($LAUNCHER)
  CTL_SOCKET=$D/control.sock
  ready 2
  HTTPS_URL=""
  HTTP_URL=http://127.0.0.1:19080/
  WRK_EXTRA=(--timeout 30s)
  WINDOW=${DEPLOY_WINDOW:-120}
  echo "// second release" >> "$D/work/pages/index.js"
  (cd "$D/work" && git commit -qam "second release" && git push -q origin main)
  run_op "deploy of a new commit (Next.js, pnpm build)" ctl deploy
  printf 'export default function Broken( {\n' > "$D/work/pages/index.js"
  (cd "$D/work" && git commit -qam "broken build" && git push -q origin main)
  run_op "deploy whose build fails (rolled back, instances untouched)" expect_failure ctl deploy
}

expect_failure() { ! "$@"; }

if [ "$WHAT" = deploy ] || [ "$WHAT" = all ]; then
  deploy_bench
fi

echo
echo "### zero-downtime runs, $(date -u +%F)"
echo
echo "Machine: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(nproc) cores. Command: \`bench/zero-downtime.sh $WHAT\` (wrk -t1 -c64 on each listener, keep-alive, for the whole operation)."
echo
echo "| operation | wall time | requests | failed |"
echo "|---|---|---|---|"
printf '%s\n' "${RESULTS[@]}"
