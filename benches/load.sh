#!/usr/bin/env bash
# Load benchmark: tokengate against nginx and haproxy doing the same job — forward to one
# upstream with an Authorization header — measured side by side, in alternating rounds.
#
#   benches/load.sh                 # 3 rounds of 10 s each, 64 connections
#   ROUNDS=5 DURATION=20 CONNECTIONS=64 benches/load.sh
#   BASELINE=/path/to/an/older/tokengate benches/load.sh   # and that build beside this one
#   TRACED=1 benches/load.sh        # and this build exporting a span for every call
#
# Everything runs on loopback: the upstream is nginx (its own process, 1 worker) answering
# a small JSON body; in front of it nginx (2 workers, keep-alive upstream, fixed bearer
# header), haproxy (2 threads, http-reuse always, fixed bearer header) and tokengate (a
# real token from the built-in sandbox's login host, and a client key checked on every
# call, as in production). wrk drives each, and the upstream directly, in turn. Then each
# proxy holds 1,000 keep-alive connections under load for a while, and the table reports
# every process's peak RSS over the whole run. Needs nginx, haproxy and wrk (Debian:
# nginx-light haproxy wrk); it installs nothing itself.
set -euo pipefail
cd "$(dirname "$0")/.."

ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-10}
CONNECTIONS=${CONNECTIONS:-64}
THREADS=${THREADS:-1}

missing=()
for tool in nginx haproxy wrk; do
  command -v "$tool" >/dev/null || missing+=("$tool")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "benches/load.sh: missing ${missing[*]}; install them first (Debian: apt-get install nginx-light haproxy wrk)" >&2
  exit 1
fi

# 1,000 connections to each proxy, and as many onwards: raise the file limit to the hard one.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
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
up=$(free_port); ng=$(free_port); hp=$(free_port); tg=$(free_port)

# --- the upstream: nginx, one worker, a small JSON body ---
mkdir -p "$work/up" "$work/ng"
cat > "$work/up/nginx.conf" <<CONF
worker_processes 1;
pid $work/up/nginx.pid;
error_log $work/up/error.log;
events { worker_connections 4096; }
http {
  access_log off;
  keepalive_requests 1000000;
  server {
    listen 127.0.0.1:$up;
    location / { default_type application/json; return 200 '{"id":"7e4c1b9a","name":"Bench User","state":"active"}'; }
  }
}
CONF
nginx -c "$work/up/nginx.conf" -p "$work/up" -g 'daemon off;' &
pids+=($!)
upstream_pid=$!

# --- nginx in front: 2 workers, keep-alive upstream, a fixed bearer header ---
cat > "$work/ng/nginx.conf" <<CONF
worker_processes 2;
pid $work/ng/nginx.pid;
error_log $work/ng/error.log;
events { worker_connections 8192; }
http {
  access_log off;
  keepalive_requests 1000000;
  upstream api { server 127.0.0.1:$up; keepalive 128; }
  server {
    listen 127.0.0.1:$ng;
    location / {
      proxy_pass http://api;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Authorization "Bearer fixed-token-from-a-cron-job";
    }
  }
}
CONF
nginx -c "$work/ng/nginx.conf" -p "$work/ng" -g 'daemon off;' &
pids+=($!)
nginx_front=$!

# --- haproxy in front: 2 threads, http-reuse always, a fixed bearer header ---
cat > "$work/haproxy.cfg" <<CONF
global
  nbthread 2
  maxconn 4000
defaults
  mode http
  timeout connect 5s
  timeout client 30s
  timeout server 30s
  http-reuse always
frontend front
  bind 127.0.0.1:$hp
  http-request set-header Authorization "Bearer fixed-token-from-a-cron-job"
  default_backend api
backend api
  server up 127.0.0.1:$up
CONF
haproxy -f "$work/haproxy.cfg" -db &
pids+=($!)
haproxy_pid=$!

# --- tokengate in front, with a real token from the sandbox's login host ---
./target/release/tokengate demo --listen 127.0.0.1:0 > "$work/demo.out" 2>/dev/null &
pids+=($!)
for _ in $(seq 100); do grep -q "login host" "$work/demo.out" 2>/dev/null && break; sleep 0.1; done
login=$(grep -oP 'login host\s+\K\S+' "$work/demo.out")
ad=$(free_port)
made=$(./target/release/tokengate key new)
key=$(awk '/^key:/ {print $2}' <<<"$made")
key_hash=$(awk '/^key_sha256:/ {print $2}' <<<"$made")
cat > "$work/proxy.toml" <<CONF
[server]
listen = "127.0.0.1:$tg"
admin_listen = "127.0.0.1:$ad"
[[client]]
name = "bench"
key_sha256 = "$key_hash"
[[upstream]]
name = "bench"
provider = "oauth2"
token_url = "$login"
base_url = "http://127.0.0.1:$up"
client_id = "sandbox-client"
client_secret = "sandbox-secret"
CONF
TOKENGATE_LOG=warn ./target/release/tokengate run -c "$work/proxy.toml" > "$work/tg.out" 2>&1 &
pids+=($!)
tokengate_pid=$!
# Another build of tokengate (BASELINE), same config on its own ports: before and after a
# change, measured in the same rounds.
if [ -n "${BASELINE:-}" ]; then
  bl=$(free_port); bad=$(free_port)
  sed -e "s/127.0.0.1:$tg/127.0.0.1:$bl/" -e "s/127.0.0.1:$ad/127.0.0.1:$bad/" "$work/proxy.toml" > "$work/baseline.toml"
  TOKENGATE_LOG=warn "$BASELINE" run -c "$work/baseline.toml" > "$work/bl.out" 2>&1 &
  pids+=($!)
  baseline_pid=$!
fi

# The same build with OpenTelemetry traces at sample_ratio 1.0 (TRACED=1): every call's
# spans exported over OTLP/HTTP; the upstream nginx plays the collector (it answers 200).
if [ -n "${TRACED:-}" ]; then
  tr=$(free_port); tad=$(free_port)
  sed -e "s/127.0.0.1:$tg/127.0.0.1:$tr/" -e "s/127.0.0.1:$ad/127.0.0.1:$tad/" "$work/proxy.toml" > "$work/traced.toml"
  printf '[telemetry]\notlp_endpoint = "http://127.0.0.1:%s"\nsample_ratio = 1.0\n' "$up" >> "$work/traced.toml"
  TOKENGATE_LOG=warn ./target/release/tokengate run -c "$work/traced.toml" > "$work/tr.out" 2>&1 &
  pids+=($!)
  traced_pid=$!
fi

auth="Authorization: Bearer $key"
for port in $up $ng $hp $tg ${bl:-} ${tr:-}; do
  for _ in $(seq 100); do curl -sf -H "$auth" "http://127.0.0.1:$port/api/v2/users/me" >/dev/null && break; sleep 0.1; done
done

peak_rss_mib() { # the sum of VmHWM over a process and its children, in MiB
  local total=0
  for p in "$@" $(pgrep -P "$1" || true); do
    kb=$(awk '/VmHWM/ {print $2}' "/proc/$p/status" 2>/dev/null || echo 0)
    total=$((total + ${kb:-0}))
  done
  echo "scale=1; $total / 1024" | bc
}

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
# the proxy's user and system time, the upstream's, and wrk's. Every target gets the same
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

declare -A results
names=(upstream nginx haproxy tokengate)
ports=($up $ng $hp $tg)
procs=($upstream_pid $nginx_front $haproxy_pid $tokengate_pid)
if [ -n "${BASELINE:-}" ]; then
  names+=(baseline); ports+=("$bl"); procs+=("$baseline_pid")
fi
if [ -n "${TRACED:-}" ]; then
  names+=(traced); ports+=("$tr"); procs+=("$traced_pid")
fi
for round in $(seq "$ROUNDS"); do
  for i in "${!names[@]}"; do
    results[${names[$i]}]+="$(run_wrk "${ports[$i]}" "${procs[$i]}")"$'\n'
  done
  echo "round $round of $ROUNDS done" >&2
done

# 1,000 keep-alive connections on each proxy (two threads of wrk), for the RSS column.
declare -A wide
for i in "${!names[@]}"; do
  [ "$i" = 0 ] && continue
  wide[${names[$i]}]="$(THREADS=2 run_wrk "${ports[$i]}" "${procs[$i]}" 1000 5)"
done
echo "1,000-connection phase done" >&2

median() { sort -g | awk '{a[NR]=$1} END { if (NR%2) print a[(NR+1)/2]; else print (a[NR/2]+a[NR/2+1])/2 }'; }
col() { awk -v c="$2" 'NF {print $c}' <<<"$1" | median; }

grants=$(curl -s "http://127.0.0.1:$ad/metrics" | awk '/^tokengate_token_grants_total/ {s+=$NF} END {print s+0}')
echo
cpu=$(awk -F': ' '/model name/ {print $2; exit}' /proc/cpuinfo)
echo "tokengate load benchmark — $(date -u +%Y-%m-%dT%H:%MZ), $(nproc) cores ($cpu), wrk -t$THREADS -c$CONNECTIONS -d${DURATION}s, $ROUNDS alternating rounds, medians"
echo
printf '| %-10s | %10s | %8s | %8s | %7s | %13s | %20s |\n' target "req/s" "p50 ms" "p99 ms" errors "peak RSS MiB" "CPU us/call usr+sys"
printf '|%s|%s|%s|%s|%s|%s|%s|\n' "------------" "------------" "----------" "----------" "---------" "---------------" "----------------------"
for n in "${names[@]}"; do
  case $n in
    nginx) rss=$(peak_rss_mib "$nginx_front") ;;
    haproxy) rss=$(peak_rss_mib "$haproxy_pid") ;;
    tokengate) rss=$(peak_rss_mib "$tokengate_pid") ;;
    baseline) rss=$(peak_rss_mib "$baseline_pid") ;;
    traced) rss=$(peak_rss_mib "$traced_pid") ;;
    *) rss="-" ;;
  esac
  errs=$(awk 'NF {s+=$4} END {print s+0}' <<<"${results[$n]}")
  cpu_col=$(printf '%.1f + %.1f' "$(col "${results[$n]}" 5)" "$(col "${results[$n]}" 6)")
  printf '| %-10s | %10.0f | %8.2f | %8.2f | %7s | %13s | %20s |\n' "$n" "$(col "${results[$n]}" 1)" "$(col "${results[$n]}" 2)" "$(col "${results[$n]}" 3)" "$errs" "$rss" "$cpu_col"
done
echo
echo "With 1,000 keep-alive connections (wrk -t2 -c1000 -d5s, once each): req/s, p99 ms, errors"
for n in "${names[@]:1}"; do
  read -r rps p50 p99 errs _ <<<"${wide[$n]}"
  printf '  %-10s %10.0f %8.2f %7s\n' "$n" "$rps" "$p99" "$errs"
done
tg_rps=$(col "${results[tokengate]}" 1); tg_p99=$(col "${results[tokengate]}" 3)
echo
for peer in nginx haproxy; do
  printf 'tokengate / %-8s throughput %.2fx, p99 %.2fx\n' "$peer" \
    "$(echo "$tg_rps / $(col "${results[$peer]}" 1)" | bc -l)" \
    "$(echo "$tg_p99 / $(col "${results[$peer]}" 3)" | bc -l)"
done
# Where the CPU of one call goes on these shared cores: wrk + proxy + upstream. For 1.2x
# nginx's throughput the whole chain may spend at most nginx's chain / 1.2 per call; what
# is left of that for tokengate, next to the system time it spends on its sockets.
chain() { echo "$(col "${results[$1]}" 5) + $(col "${results[$1]}" 6) + $(col "${results[$1]}" 7) + $(col "${results[$1]}" 8)" | bc -l; }
echo
for n in "${names[@]:1}"; do
  printf 'CPU per call, whole chain via %-9s %6.1f us (wrk %.1f, proxy %.1f + %.1f, upstream %.1f)\n' "$n" "$(chain "$n")" \
    "$(col "${results[$n]}" 8)" "$(col "${results[$n]}" 5)" "$(col "${results[$n]}" 6)" "$(col "${results[$n]}" 7)"
done
budget=$(echo "$(chain nginx) / 1.2 - $(col "${results[tokengate]}" 8) - $(col "${results[tokengate]}" 7)" | bc -l)
printf 'for 1.2x nginx, tokengate may spend %.1f us per call in all; its system time alone is %.1f us\n' "$budget" "$(col "${results[tokengate]}" 6)"
echo "token grants by tokengate during the run: $grants"
if [ -n "${TRACED:-}" ]; then
  failed=$(curl -s "http://127.0.0.1:$tad/metrics" | awk '/^tokengate_telemetry_export_failures_total/ {print $NF}')
  printf 'traced: CPU per call %.1f us more than tokengate without traces; exports that failed: %s\n' \
    "$(echo "$(col "${results[traced]}" 5) + $(col "${results[traced]}" 6) - $(col "${results[tokengate]}" 5) - $(col "${results[tokengate]}" 6)" | bc -l)" "${failed:-?}"
fi
