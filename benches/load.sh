#!/usr/bin/env bash
# Load benchmark: tokengate against nginx and haproxy doing the same job — forward to one
# API host with an Authorization header — measured side by side, in alternating rounds,
# in three cases of what the API host speaks:
#
#   plain  HTTP/1.1 in the clear (the loopback floor)
#   tls1   HTTPS, HTTP/1.1 only
#   tls2   HTTPS offering h2 by ALPN, as api.mypurecloud.com does: haproxy twice (HTTP/1.1,
#          and `proto h2`), nginx (its upstreams are HTTP/1.1), tokengate (h2 by ALPN)
#
#   benches/load.sh                 # 3 rounds of 10 s each, 64 connections, every case
#   ROUNDS=5 DURATION=20 CONNECTIONS=64 CASES="tls2" benches/load.sh
#   BASELINE=/path/to/an/older/tokengate benches/load.sh   # and that build beside this one
#   TRACED=1 benches/load.sh        # and this build exporting a span for every call (plain)
#   IDLE=10000 benches/load.sh      # idle keep-alive callers for the memory figure (0: none)
#   SYSCALLS=0 benches/load.sh      # skip strace's count of syscalls per call (tls2)
#   PROFILE=/tmp/tg.perf benches/load.sh   # and a perf profile of tokengate on tls2
#
# Everything runs on loopback. The API host is nginx (its own process, 1 worker) answering
# a small JSON body, with a certificate from a private CA made here; every proxy verifies
# it and keeps its connections. In front of it nginx (2 workers, keep-alive upstream,
# fixed bearer header), haproxy (2 threads, http-reuse always, fixed bearer header) and
# tokengate (a real token from the built-in sandbox's login host, and a client key checked
# on every call, as in production). wrk drives each in turn. Then, on the plain case, each
# proxy holds 1,000 keep-alive connections under load for a while (the peak RSS column is
# read right after). Then fresh processes of nginx and tokengate hold IDLE callers that
# made one call each and wait (their RSS growth).
# Needs nginx, haproxy, wrk, openssl, python3 and strace (Debian: nginx-light haproxy wrk
# openssl strace); it installs nothing itself.
set -euo pipefail
cd "$(dirname "$0")/.."

ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-10}
CONNECTIONS=${CONNECTIONS:-64}
THREADS=${THREADS:-1}
CASES=${CASES:-plain tls1 tls2}
IDLE=${IDLE:-10000}
SYSCALLS=${SYSCALLS:-1}

missing=()
for tool in nginx haproxy wrk openssl python3 bc; do
  command -v "$tool" >/dev/null || missing+=("$tool")
done
[ "$SYSCALLS" = 0 ] || command -v strace >/dev/null || missing+=(strace)
if [ ${#missing[@]} -gt 0 ]; then
  echo "benches/load.sh: missing ${missing[*]}; install them first (Debian: apt-get install nginx-light haproxy wrk openssl strace bc)" >&2
  exit 1
fi
has_case() { [[ " $CASES " == *" $1 "* ]]; }

# 10,000 callers to a proxy: raise the file limit to the hard one.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
files=$(ulimit -n)
if [ "$files" -lt $((IDLE + 2000)) ]; then
  echo "benches/load.sh: the open-files limit $files is too low for IDLE=$IDLE; lower IDLE" >&2
  exit 1
fi
cargo build --release --quiet
work=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# --- a private CA and the API host's certificate (localhost and 127.0.0.1) ---
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 \
  -subj /CN=tokengate-bench-ca -keyout "$work/ca.key" -out "$work/ca.pem" 2>/dev/null
openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj /CN=localhost \
  -keyout "$work/host.key" -out "$work/host.csr" 2>/dev/null
printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\n' > "$work/host.ext"
openssl x509 -req -in "$work/host.csr" -CA "$work/ca.pem" -CAkey "$work/ca.key" -CAcreateserial \
  -days 2 -extfile "$work/host.ext" -out "$work/host.pem" 2>/dev/null

# --- the API host: nginx, one worker, a small JSON body; in the clear, TLS, TLS + h2 ---
declare -A up_port
for c in plain tls1 tls2; do up_port[$c]=$(free_port); done
mkdir -p "$work/up" "$work/ng"
body='{"id":"7e4c1b9a","name":"Bench User","state":"active"}'
cat > "$work/up/nginx.conf" <<CONF
worker_processes 1;
pid $work/up/nginx.pid;
error_log $work/up/error.log;
events { worker_connections 4096; }
http {
  access_log off;
  keepalive_requests 1000000;
  keepalive_timeout 300s;
  ssl_certificate $work/host.pem;
  ssl_certificate_key $work/host.key;
  server {
    listen 127.0.0.1:${up_port[plain]};
    location / { default_type application/json; return 200 '$body'; }
  }
  server {
    listen 127.0.0.1:${up_port[tls1]} ssl;
    location / { default_type application/json; return 200 '$body'; }
  }
  server {
    listen 127.0.0.1:${up_port[tls2]} ssl http2;
    http2_max_concurrent_streams 256;
    location / { default_type application/json; return 200 '$body'; }
  }
}
CONF
nginx -c "$work/up/nginx.conf" -p "$work/up" -g 'daemon off;' &
pids+=($!)
upstream_pid=$!

# --- nginx in front: 2 workers, keep-alive upstream (HTTP/1.1: nginx has no h2 upstream),
# the API host's certificate verified, TLS sessions reused, a fixed bearer header ---
declare -A ng_port hp_port tg_port bl_port
for c in plain tls1 tls2; do ng_port[$c]=$(free_port); hp_port[$c]=$(free_port); done
hp_h2=$(free_port)
nginx_server() { # case scheme
  local tls=""
  [ "$2" = https ] && tls="proxy_ssl_verify on; proxy_ssl_trusted_certificate $work/ca.pem; proxy_ssl_name localhost; proxy_ssl_server_name on; proxy_ssl_session_reuse on;"
  cat <<CONF
  upstream api_$1 { server 127.0.0.1:${up_port[$1]}; keepalive 128; }
  server {
    listen 127.0.0.1:${ng_port[$1]};
    location / {
      proxy_pass $2://api_$1;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Authorization "Bearer fixed-token-from-a-cron-job";
      $tls
    }
  }
CONF
}
nginx_conf() { # dir, then the cases it proxies as "case scheme" arguments
  local dir=$1; shift
  cat <<CONF
worker_processes 2;
pid $dir/nginx.pid;
error_log $dir/error.log;
worker_rlimit_nofile $files;
events { worker_connections 16384; }
http {
  access_log off;
  keepalive_requests 1000000;
  keepalive_timeout 300s;
CONF
  for c in "$@"; do nginx_server $c; done
  echo "}"
}
nginx_conf "$work/ng" "plain http" "tls1 https" "tls2 https" > "$work/ng/nginx.conf"
nginx -c "$work/ng/nginx.conf" -p "$work/ng" -g 'daemon off;' &
pids+=($!)
nginx_front=$!

# --- haproxy in front: 2 threads, http-reuse always, a fixed bearer header; to the h2 API
# host both over HTTP/1.1 and with `proto h2` (one multiplexed connection) ---
haproxy_pair() { # name port server-line
  cat <<CONF
frontend f_$1
  bind 127.0.0.1:$2
  http-request set-header Authorization "Bearer fixed-token-from-a-cron-job"
  default_backend b_$1
backend b_$1
  server s 127.0.0.1:$3
CONF
}
verify="ssl verify required ca-file $work/ca.pem sni str(localhost) verifyhost localhost"
cat > "$work/haproxy.cfg" <<CONF
global
  nbthread 2
  maxconn $(( (files - 200) / 2 ))
defaults
  mode http
  timeout connect 5s
  timeout client 300s
  timeout server 300s
  http-reuse always
$(haproxy_pair plain "${hp_port[plain]}" "${up_port[plain]}")
$(haproxy_pair tls1 "${hp_port[tls1]}" "${up_port[tls1]} $verify")
$(haproxy_pair tls2 "${hp_port[tls2]}" "${up_port[tls2]} $verify")
$(haproxy_pair tls2h2 "$hp_h2" "${up_port[tls2]} $verify alpn h2 proto h2")
CONF
haproxy -f "$work/haproxy.cfg" -db &
pids+=($!)
haproxy_pid=$!

# --- tokengate in front, one process per case, with a real token from the sandbox's
# login host; the API host's certificate verified against the private CA (ca_file) ---
./target/release/tokengate demo --listen 127.0.0.1:0 > "$work/demo.out" 2>/dev/null &
pids+=($!)
for _ in $(seq 100); do grep -q "login host" "$work/demo.out" 2>/dev/null && break; sleep 0.1; done
login=$(grep -oP 'login host\s+\K\S+' "$work/demo.out")
made=$(./target/release/tokengate key new)
key=$(awk '/^key:/ {print $2}' <<<"$made")
key_hash=$(awk '/^key_sha256:/ {print $2}' <<<"$made")
declare -A tg_pid bl_pid tg_admin
started=0
start_tokengate() { # binary case port pid-variable admin-port-variable [extra config]
  local admin conf
  admin=$(free_port); started=$((started + 1)); conf="$work/tokengate-$started.toml"
  local scheme=http ca=""
  if [ "$2" != plain ]; then scheme=https; ca="ca_file = \"$work/ca.pem\""; fi
  cat > "$conf" <<CONF
[server]
listen = "127.0.0.1:$3"
admin_listen = "127.0.0.1:$admin"
max_connections = $((IDLE + 2000))
max_connections_per_address = $((IDLE + 2000))
[[client]]
name = "bench"
key_sha256 = "$key_hash"
[[upstream]]
name = "bench"
provider = "oauth2"
token_url = "$login"
base_url = "$scheme://127.0.0.1:${up_port[$2]}"
$ca
client_id = "sandbox-client"
client_secret = "sandbox-secret"
${6:-}
CONF
  TOKENGATE_LOG=warn "$1" run -c "$conf" > "$conf.out" 2>&1 &
  pids+=($!)
  printf -v "$4" '%s' "$!"
  printf -v "$5" '%s' "$admin"
}
for c in $CASES; do
  tg_port[$c]=$(free_port)
  start_tokengate ./target/release/tokengate "$c" "${tg_port[$c]}" p a
  tg_pid[$c]=$p; tg_admin[$c]=$a
  # Another build of tokengate (BASELINE), same config on its own ports: before and after
  # a change, measured in the same rounds.
  if [ -n "${BASELINE:-}" ]; then
    bl_port[$c]=$(free_port)
    start_tokengate "$BASELINE" "$c" "${bl_port[$c]}" p a
    bl_pid[$c]=$p
  fi
done
# The same build with OpenTelemetry traces at sample_ratio 1.0 (TRACED=1, plain case):
# every call's spans exported over OTLP/HTTP; the API host plays the collector (200).
if [ -n "${TRACED:-}" ]; then
  tr=$(free_port)
  start_tokengate ./target/release/tokengate plain "$tr" traced_pid traced_admin \
    "$(printf '[telemetry]\notlp_endpoint = "http://127.0.0.1:%s"\nsample_ratio = 1.0\n' "${up_port[plain]}")"
fi

auth="Authorization: Bearer $key"
# Each case's targets: "name port pid" (a target's CPU is its process's and its children's).
declare -A targets
targets[plain]="upstream ${up_port[plain]} $upstream_pid
nginx ${ng_port[plain]} $nginx_front
haproxy ${hp_port[plain]} $haproxy_pid"
targets[tls1]="nginx ${ng_port[tls1]} $nginx_front
haproxy ${hp_port[tls1]} $haproxy_pid"
targets[tls2]="nginx ${ng_port[tls2]} $nginx_front
haproxy ${hp_port[tls2]} $haproxy_pid
haproxy-h2 $hp_h2 $haproxy_pid"
for c in $CASES; do
  targets[$c]+=$'\n'"tokengate ${tg_port[$c]} ${tg_pid[$c]}"
  [ -n "${BASELINE:-}" ] && targets[$c]+=$'\n'"baseline ${bl_port[$c]} ${bl_pid[$c]}"
done
[ -n "${TRACED:-}" ] && targets[plain]+=$'\n'"traced $tr $traced_pid"
for c in $CASES; do
  while read -r _ port _; do
    ok=""
    for _ in $(seq 100); do curl -sf -H "$auth" "http://127.0.0.1:$port/api/v2/users/me" >/dev/null && ok=1 && break; sleep 0.1; done
    [ -n "$ok" ] || { echo "benches/load.sh: 127.0.0.1:$port ($c) does not answer" >&2; cat "$work"/*.out "$work"/*/error.log >&2; exit 1; }
  done <<<"${targets[$c]}"
done

rss_kib() { # the sum of a field of /proc/PID/status (VmHWM, VmRSS) over processes and their children, in KiB
  local field=$1 total=0 p kb
  shift
  for p in "$@" $(for q in "$@"; do pgrep -P "$q"; done || true); do
    kb=$(awk -v f="$field:" '$1==f {print $2}' "/proc/$p/status" 2>/dev/null || echo 0)
    total=$((total + ${kb:-0}))
  done
  echo "$total"
}
mib() { echo "scale=1; $1 / 1024" | bc; }

# CPU time (user, system; in clock ticks) of processes and their children's threads so far.
cpu_ticks() {
  local user=0 sys=0 p task
  for p in "$@" $(for q in "$@"; do pgrep -P "$q"; done || true); do
    for task in /proc/"$p"/task/*/stat; do
      read -r u s < <(awk '{print $14, $15}' "$task" 2>/dev/null || echo "0 0")
      user=$((user + ${u:-0})); sys=$((sys + ${s:-0}))
    done
  done
  echo "$user $sys"
}
# CPU time of the calling shell's finished children (wrk), in clock ticks, from `times`
# output on stdin (`times` must run in that shell itself, not in a command substitution).
children_ticks() { awk -v hz="$(getconf CLK_TCK)" 'NR==2 { for (i=1;i<=2;i++) { v=$i; sub(/s$/,"",v); split(v,a,"m"); t+=(a[1]*60+a[2])*hz } print int(t) }'; }

# wrk's numbers: req/s, p50 and p99 in ms, non-2xx count, then CPU microseconds per call:
# the proxy's user and system time, the API host's, and wrk's. Every target gets the same
# Authorization header (the peers overwrite it; tokengate checks it as a client key).
run_wrk() { # port proxy-pid [connections] [seconds]
  local out before after up_before up_after wrk_before wrk_after
  before=$(cpu_ticks "$2"); up_before=$(cpu_ticks "$upstream_pid"); times > "$work/times"
  wrk_before=$(children_ticks < "$work/times")
  out=$(wrk -t"$THREADS" -c"${3:-$CONNECTIONS}" -d"${4:-$DURATION}s" --latency -H "$auth" "http://127.0.0.1:$1/api/v2/users/me")
  times > "$work/times"; wrk_after=$(children_ticks < "$work/times")
  after=$(cpu_ticks "$2"); up_after=$(cpu_ticks "$upstream_pid")
  local rps p50 p99 errors calls
  rps=$(awk '/Requests\/sec/ {print $2}' <<<"$out")
  calls=$(awk '/requests in/ {print $1}' <<<"$out")
  p50=$(awk '$1=="50%" {print $2}' <<<"$out")
  p99=$(awk '$1=="99%" {print $2}' <<<"$out")
  errors=$(awk '/Non-2xx/ {n+=$NF} /Socket errors/ {gsub(",", ""); n+=$4+$6+$8+$10} END {print n+0}' <<<"$out")
  to_ms() { awk -v v="$1" 'BEGIN { if (v ~ /us$/) { sub(/us/,"",v); print v/1000 } else if (v ~ /ms$/) { sub(/ms/,"",v); print v } else { sub(/s/,"",v); print v*1000 } }'; }
  per_call() { awk -v t="$1" -v n="$calls" -v hz="$(getconf CLK_TCK)" 'BEGIN { printf "%.2f", (n > 0 ? t * 1e6 / hz / n : 0) }'; }
  read -r u0 s0 <<<"$before"; read -r u1 s1 <<<"$after"
  read -r uu0 us0 <<<"$up_before"; read -r uu1 us1 <<<"$up_after"
  if [ "$2" = "$upstream_pid" ]; then uu1=$uu0; us1=$us0; fi
  echo "$rps $(to_ms "$p50") $(to_ms "$p99") ${errors:-0} $(per_call $((u1 - u0))) $(per_call $((s1 - s0))) $(per_call $((uu1 + us1 - uu0 - us0))) $(per_call $((wrk_after - wrk_before)))"
}

declare -A wide peak idle_growth
front_targets=$(tail -n +2 <<<"${targets[plain]:-}")

declare -A results
for round in $(seq "$ROUNDS"); do
  for c in $CASES; do
    while read -r name port pid; do
      results[$c/$name]+="$(run_wrk "$port" "$pid")"$'\n'
    done <<<"${targets[$c]}"
  done
  echo "round $round of $ROUNDS done" >&2
done

# The plain case's proxies: 1,000 keep-alive connections (two threads of wrk) for the
# peak RSS column, read right after.
if has_case plain; then
  while read -r name port pid; do
    wide[$name]="$(THREADS=2 run_wrk "$port" "$pid" 1000 5)"
    peak[$name]=$(mib "$(rss_kib VmHWM "$pid")")
  done <<<"$front_targets"
  echo "1,000-connection phase done" >&2
fi
# Peak RSS of the other cases' tokengate processes (no 1,000-connection phase there).
for c in tls1 tls2; do
  has_case "$c" && peak[tokengate-$c]=$(mib "$(rss_kib VmHWM "${tg_pid[$c]}")")
done

# Syscalls per call on the h2 case: strace -c on every thread of each proxy for a short
# wrk run (strace slows them down; the counts per call are what matter).
declare -A syscalls
if [ "$SYSCALLS" != 0 ] && has_case tls2; then
  while read -r name port pid; do
    tids=()
    for p in "$pid" $(pgrep -P "$pid" || true); do
      for t in /proc/"$p"/task/*; do tids+=(-p "$(basename "$t")"); done
    done
    strace -c -f -o "$work/strace.out" "${tids[@]}" 2>/dev/null &
    strace_pid=$!
    sleep 1 # strace attaches in the background; nothing to wait on but its attaching
    out=$(wrk -t1 -c"$CONNECTIONS" -d3s -H "$auth" "http://127.0.0.1:$port/api/v2/users/me")
    kill -INT "$strace_pid"; wait "$strace_pid" 2>/dev/null || true
    calls=$(awk '/requests in/ {print $1}' <<<"$out")
    syscalls[$name]=$(awk -v n="$calls" '$NF != "total" && $4 ~ /^[0-9]+$/ { c[$NF] = $4; t += $4 }
      END { printf "%.2f:", t / n; for (s in c) if (c[s] / n >= 0.05) printf " %s %.2f,", s, c[s] / n }' "$work/strace.out")
  done <<<"${targets[tls2]}"
  echo "syscall phase done" >&2
fi

# IDLE callers on fresh processes of nginx and tokengate (and BASELINE), as in the plain
# case: each caller makes one call, then waits; the RSS each proxy grew by is what an
# idle keep-alive connection costs it. (haproxy sizes itself to two descriptors per
# connection: it cannot hold IDLE callers under this limit.)
if has_case plain && [ "$IDLE" -gt 0 ]; then
  mkdir -p "$work/ng-idle"
  ng_idle=$(free_port)
  # The plain case's nginx again, on a port of its own.
  up_port[idle]=${up_port[plain]}; ng_port[idle]=$ng_idle
  nginx_conf "$work/ng-idle" "idle http" > "$work/ng-idle/nginx.conf"
  nginx -c "$work/ng-idle/nginx.conf" -p "$work/ng-idle" -g 'daemon off;' &
  pids+=($!)
  idle_targets="nginx $ng_idle $!"
  tg_idle=$(free_port)
  start_tokengate ./target/release/tokengate plain "$tg_idle" p a
  idle_targets+=$'\n'"tokengate $tg_idle $p"
  if [ -n "${BASELINE:-}" ]; then
    bl_idle=$(free_port)
    start_tokengate "$BASELINE" plain "$bl_idle" p a
    idle_targets+=$'\n'"baseline $bl_idle $p"
  fi
  while read -r name port pid; do
    for _ in $(seq 100); do curl -sf -H "$auth" "http://127.0.0.1:$port/api/v2/users/me" >/dev/null && break; sleep 0.1; done
    # Settled first: the lowest RSS over 3 s (an allocator may still be returning what
    # the process freed after its start; growth is measured from where it rests).
    before=$(rss_kib VmRSS "$pid")
    for _ in 1 2 3; do
      sleep 1; now=$(rss_kib VmRSS "$pid"); [ "$now" -lt "$before" ] && before=$now
    done
    : > "$work/idle.out"
    exec {to_idle}> >(python3 benches/idle_callers.py "$port" "$IDLE" "Bearer $key" > "$work/idle.out")
    for _ in $(seq 600); do grep -q ready "$work/idle.out" 2>/dev/null && break; sleep 0.5; done
    # Idle now. The lowest RSS over the next 9 s while every caller is still connected:
    # tokengate frees a connection's buffers after 1 s quiet, and its memory watcher
    # trims the heap at its next look (every 5 s); it closes connections quiet for 11 s.
    after=$(rss_kib VmRSS "$pid")
    for _ in $(seq 9); do
      sleep 1
      held=$(ss -Htn state established "( sport = :$port )" | wc -l)
      [ "$held" -ge "$IDLE" ] || break
      now=$(rss_kib VmRSS "$pid"); [ "$now" -lt "$after" ] && after=$now
    done
    idle_growth[$name]="$(mib "$((after - before))") $(( (after - before) * 1024 / IDLE )) $(awk '{print $2, $3}' "$work/idle.out")"
    exec {to_idle}>&-
    # Wait for the callers' connections to be gone before the next target.
    for _ in $(seq 200); do pgrep -f idle_callers.py >/dev/null || break; sleep 0.1; done
  done <<<"$idle_targets"
  echo "idle-callers phase done" >&2
fi

# PROFILE=/path/perf.data: a perf profile (call graphs) of tokengate on the h2 case, under
# the same wrk load, for `perf report -i /path/perf.data`.
if [ -n "${PROFILE:-}" ] && has_case tls2; then
  perf record -F 1999 -g -p "${tg_pid[tls2]}" -o "$PROFILE" 2>/dev/null &
  perf_pid=$!
  sleep 1 # perf attaches in the background; nothing to wait on but its attaching
  wrk -t1 -c"$CONNECTIONS" -d5s -H "$auth" "http://127.0.0.1:${tg_port[tls2]}/api/v2/users/me" >/dev/null
  kill -INT "$perf_pid"; wait "$perf_pid" 2>/dev/null || true
  echo "profile of tokengate (tls2) in $PROFILE" >&2
fi

median() { sort -g | awk '{a[NR]=$1} END { if (NR%2) print a[(NR+1)/2]; else print (a[NR/2]+a[NR/2+1])/2 }'; }
col() { awk -v c="$2" 'NF {print $c}' <<<"$1" | median; }

grants=0
for c in $CASES; do
  g=$(curl -s "http://127.0.0.1:${tg_admin[$c]}/metrics" | awk '/^tokengate_token_grants_total/ {s+=$NF} END {print s+0}')
  grants=$((grants + g))
done
echo
cpu=$(awk -F': ' '/model name/ {print $2; exit}' /proc/cpuinfo)
echo "tokengate load benchmark — $(date -u +%Y-%m-%dT%H:%MZ), $(nproc) cores ($cpu), wrk -t$THREADS -c$CONNECTIONS -d${DURATION}s, $ROUNDS alternating rounds, medians"
declare -A title=([plain]="API host: HTTP/1.1 in the clear" [tls1]="API host: HTTPS, HTTP/1.1 only" [tls2]="API host: HTTPS, h2 offered by ALPN")
for c in $CASES; do
  echo
  echo "${title[$c]}"
  printf '| %-10s | %10s | %8s | %8s | %7s | %21s |\n' target "req/s" "p50 ms" "p99 ms" errors "CPU us/call usr+sys"
  printf '|%s|%s|%s|%s|%s|%s|\n' "------------" "------------" "----------" "----------" "---------" "-----------------------"
  while read -r n _ _; do
    r=${results[$c/$n]}
    errs=$(awk 'NF {s+=$4} END {print s+0}' <<<"$r")
    cpu_col=$(printf '%.1f + %.1f = %.1f' "$(col "$r" 5)" "$(col "$r" 6)" "$(echo "$(col "$r" 5) + $(col "$r" 6)" | bc -l)")
    printf '| %-10s | %10.0f | %8.2f | %8.2f | %7s | %21s |\n' "$n" "$(col "$r" 1)" "$(col "$r" 2)" "$(col "$r" 3)" "$errs" "$cpu_col"
  done <<<"${targets[$c]}"
done
ratio() { # case target peer: CPU per call of target over peer's
  echo "($(col "${results[$1/$2]}" 5) + $(col "${results[$1/$2]}" 6)) / ($(col "${results[$1/$3]}" 5) + $(col "${results[$1/$3]}" 6))" | bc -l
}
echo
has_case plain && printf 'plain: tokengate CPU per call %.2fx nginx, %.2fx haproxy\n' "$(ratio plain tokengate nginx)" "$(ratio plain tokengate haproxy)"
has_case tls1 && printf 'tls1:  tokengate CPU per call %.2fx nginx, %.2fx haproxy\n' "$(ratio tls1 tokengate nginx)" "$(ratio tls1 tokengate haproxy)"
if has_case tls2; then
  printf 'tls2:  tokengate CPU per call %.2fx haproxy-h2, throughput %.2fx haproxy-h2; %.2fx nginx\n' "$(ratio tls2 tokengate haproxy-h2)" \
    "$(echo "$(col "${results[tls2/tokengate]}" 1) / $(col "${results[tls2/haproxy-h2]}" 1)" | bc -l)" "$(ratio tls2 tokengate nginx)"
fi
if has_case plain; then
  echo
  echo "Peak RSS after 1,000 keep-alive connections (wrk -t2 -c1000 -d5s, once each): MiB, req/s, p99 ms, errors"
  while read -r n _ _; do
    read -r rps _ p99 errs _ <<<"${wide[$n]}"
    printf '  %-10s %6s MiB %10.0f %8.2f %7s\n' "$n" "${peak[$n]}" "$rps" "$p99" "$errs"
  done <<<"$front_targets"
  if [ "$IDLE" -gt 0 ]; then
    echo
    echo "RSS growth with $IDLE idle keep-alive callers (each made one call): MiB, bytes per connection, calls answered/failed"
    for n in nginx tokengate baseline; do
      [ -n "${idle_growth[$n]:-}" ] || continue
      read -r g per ok failed <<<"${idle_growth[$n]}"
      printf '  %-10s %7s MiB %7s B %6s/%s\n' "$n" "$g" "$per" "$ok" "$failed"
    done
  fi
fi
for c in tls1 tls2; do
  [ -n "${peak[tokengate-$c]:-}" ] && echo "peak RSS of tokengate ($c): ${peak[tokengate-$c]} MiB"
done
if [ -n "${syscalls[*]:-}" ]; then
  echo
  echo "Syscalls per call, h2 case (strace -c -f, wrk -c$CONNECTIONS -d3s): total: those at 0.05 or more"
  while read -r n _ _; do printf '  %-10s %s\n' "$n" "${syscalls[$n]}"; done <<<"${targets[tls2]}"
fi
if [ -n "${TRACED:-}" ]; then
  failed=$(curl -s "http://127.0.0.1:$traced_admin/metrics" | awk '/^tokengate_telemetry_export_failures_total/ {print $NF}')
  printf 'traced: CPU per call %.1f us more than tokengate without traces; exports that failed: %s\n' \
    "$(echo "$(col "${results[plain/traced]}" 5) + $(col "${results[plain/traced]}" 6) - $(col "${results[plain/tokengate]}" 5) - $(col "${results[plain/tokengate]}" 6)" | bc -l)" "${failed:-?}"
fi
echo "token grants by tokengate during the run: $grants"
