#!/usr/bin/env bash
# Overwatch vs nginx vs HAProxy, on this machine, in one run, proxying to the same backends.
#
#   bench/proxy.sh [SECONDS_PER_RUN] [ROUNDS]
#
# Backends: the two instances (one HTTP, one HTTPS) that Overwatch itself runs; nginx and
# HAProxy are pointed at the same ports. Runs are interleaved (round 1: ow, nginx, haproxy;
# round 2: ...) and medians reported. Needs root-free loopback only; installs nothing: run
# `apt-get install wrk nghttp2-client nginx-light haproxy` first.
set -euo pipefail
cd "$(dirname "$0")/.."
DUR=${1:-5}
ROUNDS=${2:-3}
CONNS=64
for tool in wrk h2load nginx haproxy python3; do
  command -v "$tool" >/dev/null || { echo "missing $tool (apt-get install wrk nghttp2-client nginx-light haproxy)" >&2; exit 1; }
done
cargo build --release --quiet
BIN=$PWD/target/release
W=$(mktemp -d /tmp/ow-bench.XXXXXX)
chmod 755 "$W"
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$W"; }
trap cleanup EXIT

python3 - "$W" <<'PY'
import sys, subprocess
w = sys.argv[1]
subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
                "-keyout", f"{w}/key.pem", "-out", f"{w}/cert.pem"], check=True, capture_output=True)
PY

# Ports: Overwatch 18443/18080, nginx 28443/28080, HAProxy 38443/38080.
# As root, Overwatch refuses to run its workers as root: they get an unprivileged account.
ACCOUNTS=""
APP_ACCOUNT=""
if [ "$(id -u)" = 0 ]; then
  BENCH_USER=${BENCH_USER:-nobody}
  ACCOUNTS="user = \"$BENCH_USER\"
group = \"$(id -gn "$BENCH_USER")\""
  APP_ACCOUNT="user = \"$BENCH_USER\""
fi
cat > "$W/overwatch.toml" <<EOF
[overwatch]
$ACCOUNTS
control_socket = "control.sock"
state_dir = "state"
[proxy]
https = ["127.0.0.1:18443"]
http = ["127.0.0.1:18080"]
cert = "cert.pem"
key = "key.pem"
[app]
$APP_ACCOUNT
dir = "."
ports = "19000-19099"
[app.https]
count = 1
command = "exec $BIN/overwatch demo-app"
[app.http]
count = 1
command = "exec $BIN/overwatch demo-app"
[app.backup]
command = "exec $BIN/overwatch demo-app"
[health]
path = "/health"
EOF
RUST_LOG=warn "$BIN/overwatch" run --config "$W/overwatch.toml" > "$W/overwatch.log" 2>&1 &
pids+=($!)
status=""
for _ in $(seq 100); do
  status=$("$BIN/overwatchctl" --socket "$W/control.sock" status --json 2>/dev/null || true)
  [ "$(echo "$status" | python3 -c 'import json,sys; d=json.load(sys.stdin); print(sum(i["state"]=="ready" for i in d["instances"]))' 2>/dev/null)" = 2 ] && break
  sleep 0.2
done
if [ -z "$status" ]; then
  echo "overwatch did not become ready; its log:" >&2
  cat "$W/overwatch.log" >&2
  exit 1
fi
read -r HTTPS_BACKEND HTTP_BACKEND < <(echo "$status" | python3 -c '
import json,sys; d=json.load(sys.stdin); p={i["pool"]:i["port"] for i in d["instances"]}; print(p["https"], p["http"])')
echo "backends: https instance :$HTTPS_BACKEND, http instance :$HTTP_BACKEND"
PROXY_PID=$(pgrep -f "overwatch worker proxy" | head -1)

mkdir -p "$W/nginx"
cat > "$W/nginx.conf" <<EOF
worker_processes auto;
pid $W/nginx/nginx.pid;
error_log $W/nginx/error.log warn;
events { worker_connections 4096; }
http {
  access_log off;
  client_body_temp_path $W/nginx; proxy_temp_path $W/nginx; fastcgi_temp_path $W/nginx;
  uwsgi_temp_path $W/nginx; scgi_temp_path $W/nginx;
  upstream app_http { server 127.0.0.1:$HTTP_BACKEND; keepalive 64; }
  upstream app_https { server 127.0.0.1:$HTTPS_BACKEND; keepalive 64; }
  server {
    listen 127.0.0.1:28080;
    location / { proxy_pass http://app_http; proxy_http_version 1.1; proxy_set_header Connection ""; }
  }
  server {
    listen 127.0.0.1:28443 ssl http2;
    ssl_certificate $W/cert.pem; ssl_certificate_key $W/key.pem;
    location / { proxy_pass https://app_https; proxy_http_version 1.1; proxy_set_header Connection "";
                 proxy_ssl_verify off; proxy_ssl_session_reuse on; }
  }
}
EOF
nginx -c "$W/nginx.conf" -g 'daemon off;' &
pids+=($!)

cat "$W/cert.pem" "$W/key.pem" > "$W/combined.pem"
cat > "$W/haproxy.cfg" <<EOF
global
  nbthread 2
  # Each connection costs two descriptors; stay below a common 20000 RLIMIT_NOFILE.
  maxconn 4096
defaults
  mode http
  timeout connect 5s
  timeout client 60s
  timeout server 60s
  http-reuse always
frontend fe_http
  bind 127.0.0.1:38080
  default_backend be_http
frontend fe_https
  bind 127.0.0.1:38443 ssl crt $W/combined.pem alpn h2,http/1.1
  default_backend be_https
backend be_http
  server s1 127.0.0.1:$HTTP_BACKEND
backend be_https
  server s1 127.0.0.1:$HTTPS_BACKEND ssl verify none
EOF
haproxy -f "$W/haproxy.cfg" -db &
pids+=($!)
for p in 28080 28443 38080 38443; do
  for _ in $(seq 50); do (exec 3<>/dev/tcp/127.0.0.1/$p) 2>/dev/null && break; sleep 0.1; done
  (exec 3<>/dev/tcp/127.0.0.1/$p) 2>/dev/null || { echo "nothing listens on :$p" >&2; exit 1; }
done

rss_kib() { # sum of VmRSS of the given pids
  local t=0; for p in "$@"; do v=$(awk '/VmRSS/{print $2}' /proc/$p/status 2>/dev/null || echo 0); t=$((t+v)); done; echo $t; }
proxy_pids() {
  case $1 in
    overwatch) echo "$PROXY_PID" ;;
    nginx) pgrep -f "nginx: worker process" | tr '\n' ' '; pgrep -f "nginx -c $W" | tr '\n' ' ' ;;
    haproxy) pgrep -f "haproxy -f $W" | tr '\n' ' ' ;;
  esac; }
port() { case $1 in overwatch) echo "$2" | sed 's/^/1/' ;; nginx) echo "$2" | sed 's/^/2/' ;; haproxy) echo "$2" | sed 's/^/3/' ;; esac; }

RES=$W/results.tsv
: > "$RES"
for name in overwatch nginx haproxy; do
  echo -e "$name\tidle_rss_kib\t$(rss_kib $(proxy_pids $name))" >> "$RES"
done
wrk_run() { # name test url [extra wrk args]
  local name=$1 test=$2 url=$3; shift 3
  local out; out=$(wrk -t2 -c$CONNS -d${DUR}s --latency "$@" "$url" 2>&1 || true)
  local rps p50 p99 errs
  rps=$(echo "$out" | awk '/Requests\/sec/{print $2}')
  p50=$(echo "$out" | awk '$1=="50%"{print $2}')
  p99=$(echo "$out" | awk '$1=="99%"{print $2}')
  errs=$(echo "$out" | awk '/Socket errors|Non-2xx/{print}' | tr '\n' ' ')
  echo -e "$name\t$test\t$rps\t$p50\t$p99\t$errs" >> "$RES"
}
for round in $(seq "$ROUNDS"); do
  for name in overwatch nginx haproxy; do
    echo "round $round: $name"
    wrk_run "$name" http1 "http://127.0.0.1:$(port $name 8080)/whoami"
    # RSS under load: sample in the middle of an HTTPS run.
    ( sleep $((DUR/2)); echo -e "$name\tload_rss_kib\t$(rss_kib $(proxy_pids $name))" >> "$RES" ) &
    wrk_run "$name" https1 "https://127.0.0.1:$(port $name 8443)/whoami"
    wait $!
    wrk_run "$name" tls_new_conn "https://127.0.0.1:$(port $name 8443)/whoami" -H "Connection: close"
    h2=$(h2load -c$CONNS -m10 -D$DUR -t2 "https://127.0.0.1:$(port $name 8443)/whoami" 2>&1 || true)
    echo -e "$name\th2\t$(echo "$h2" | awk '/^finished in/{gsub(",","",$4); print $4}')\t\t\t$(echo "$h2" | awk '/^requests:/{print}')" >> "$RES"
  done
done

python3 - "$RES" "$DUR" "$ROUNDS" <<'PY'
import sys, statistics, collections, platform, subprocess, datetime
res, dur, rounds = sys.argv[1], sys.argv[2], sys.argv[3]
rows = [l.rstrip("\n").split("\t") for l in open(res) if l.strip()]
def ms(v):
    v = v.strip()
    if not v: return None
    for suf, f in (("us", 0.001), ("ms", 1), ("s", 1000)):
        if v.endswith(suf): return float(v[:-len(suf)]) * f
    return None
data = collections.defaultdict(lambda: collections.defaultdict(list))
errors = collections.defaultdict(set)
for r in rows:
    name, test = r[0], r[1]
    if test.endswith("rss_kib"):
        data[name][test].append(float(r[2])); continue
    if r[2]: data[name][test + " req/s"].append(float(r[2]))
    if len(r) > 3 and ms(r[3]) is not None: data[name][test + " p50 ms"].append(ms(r[3]))
    if len(r) > 4 and ms(r[4]) is not None: data[name][test + " p99 ms"].append(ms(r[4]))
    note = r[5].strip() if len(r) > 5 else ""
    if test == "h2":
        # h2load's summary line: only worth reporting when something failed.
        import re
        m = re.search(r"(\d+) failed, (\d+) errored, (\d+) timeout", note)
        if m and not any(int(x) for x in m.groups()): note = ""
    if note: errors[name].add(f"{test}: {note}")
metrics = ["http1 req/s", "http1 p50 ms", "http1 p99 ms", "https1 req/s", "https1 p50 ms", "https1 p99 ms",
           "tls_new_conn req/s", "h2 req/s", "idle_rss_kib", "load_rss_kib"]
names = ["overwatch", "nginx", "haproxy"]
cpu = subprocess.run(["sh", "-c", "grep -m1 'model name' /proc/cpuinfo | cut -d: -f2"], capture_output=True, text=True).stdout.strip()
print(f"### proxy benchmark, {datetime.date.today()}\n")
print(f"Machine: {cpu}, {subprocess.run(['nproc'], capture_output=True, text=True).stdout.strip()} cores; "
      f"kernel {platform.release()}. Command: `bench/proxy.sh {dur} {rounds}` "
      f"(wrk -t2 -c64 -d{dur}s, h2load -c64 -m10 -t2 -D{dur}; medians of {rounds} interleaved rounds).\n")
print("| metric | overwatch | nginx | haproxy | ow/nginx | ow/haproxy |")
print("|---|---|---|---|---|---|")
for m in metrics:
    vals = {n: statistics.median(data[n][m]) if data[n][m] else None for n in names}
    def f(v): return "-" if v is None else (f"{v:,.0f}" if v >= 100 else f"{v:.2f}")
    def ratio(a, b): return "-" if a is None or not b else f"{a / b:.2f}"
    print(f"| {m} | {f(vals['overwatch'])} | {f(vals['nginx'])} | {f(vals['haproxy'])} | "
          f"{ratio(vals['overwatch'], vals['nginx'])} | {ratio(vals['overwatch'], vals['haproxy'])} |")
for n in names:
    for e in sorted(errors[n]): print(f"\n{n} errors: {e}")
PY
