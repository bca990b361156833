//! The status page: [`status_json`] joins the [board](crate::telemetry::board)'s counts
//! with each token source's [snapshot](crate::token::TokenSnapshot) into the document
//! served as `/status.json`, and [`status_html`] renders the same document as the page
//! served at `/`: plain HTML that is complete without JavaScript, reloads itself every few
//! seconds, and counts token expiry down live where scripts run. Everything is embedded;
//! nothing is fetched from elsewhere. No token, secret or client key is ever part of it —
//! only names, states, counts and times.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};

use super::chart::{esc, rate_chart, text};
use crate::telemetry::board::{StatusBoard, BUCKET_SECS};
use crate::token::shared::SharedCache;
use crate::upstream::Upstream;

const REFRESH_SECS: u32 = 5;

fn unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

fn secs(d: Option<Duration>) -> Value {
    d.map_or(Value::Null, |d| {
        json!((d.as_secs_f64() * 10.0).round() / 10.0)
    })
}

/// The status document (`/status.json`; its shape is documented in docs/operations.md).
pub fn status_json(
    listen: std::net::SocketAddr,
    upstreams: &[Arc<Upstream>],
    board: &StatusBoard,
    shared: Option<&SharedCache>,
    realtime: (
        &crate::back::websocket::Sockets,
        &crate::back::notifications::Channels,
    ),
) -> Value {
    let (sockets, channels) = (realtime.0.snapshot(), realtime.1.snapshot());
    // Open sockets and live channels, of an upstream (`client` None) or of a client.
    // A client's sockets include the keyless ones on its channels (counted apart for
    // `max_websockets`, shown as its).
    let sockets_of = |upstream: Option<&str>, client: Option<&str>| -> usize {
        sockets
            .iter()
            .filter(|(u, c, _)| {
                upstream.is_none_or(|x| **u == *x)
                    && client.is_none_or(|x| {
                        **c == *x || **c == *crate::back::notifications::keyless_sockets_of(x)
                    })
            })
            .map(|(_, _, n)| n)
            .sum()
    };
    let channels_of = |upstream: Option<&str>, client: Option<&str>| -> usize {
        channels
            .iter()
            .filter(|(u, c)| {
                upstream.is_none_or(|x| **u == *x) && client.is_none_or(|x| c.as_deref() == Some(x))
            })
            .count()
    };
    let second = board.started.elapsed().as_secs();
    let now = SystemTime::now();
    let upstream_docs: Vec<Value> = upstreams
        .iter()
        .map(|u| {
            // The pool's first token stands for the state; counts add up over the pool.
            let snaps: Vec<_> = u.tokens.iter().map(|t| t.snapshot()).collect();
            let mut snap = snaps[0].clone();
            snap.grants_ok = snaps.iter().map(|s| s.grants_ok).sum();
            snap.grants_failed = snaps.iter().map(|s| s.grants_failed).sum();
            if snaps.iter().any(|s| s.state == "failing") {
                snap.state = "failing";
            }
            let stats = board.upstreams.iter().find(|s| s.name == *u.name());
            let (requests, errors) = stats.map_or((0, 0), |s| s.window.totals(second));
            let last_failure = snap.last_failure.as_ref().map(|f| {
                let d = crate::cli::check::diagnose(&u.config, String::new(), Err(f.error.clone()));
                json!({
                    "at_unix": unix(f.at),
                    "grant_error": d.grant_error,
                    "status": d.status,
                    "hint": d.hint,
                    "message": d.message,
                    "detail": f.error.to_string(),
                })
            });
            json!({
                "name": u.name().as_ref(),
                "provider": u.config.provider.as_str(),
                "region": u.config.region.map(|r| r.name),
                "prefix": u.config.prefix,
                "auth_method": u.config.grant.auth_method.name(),
                // Which of client_secret / client_secret_next the last grant used (never
                // either value).
                "secret_in_use": snap.secret_in_use,
                "egress_proxy": u.config.grant.egress.proxy.as_ref().and_then(|p| p.shown(true)),
                "api_host": u.api_base().and_then(|b| b.authority().map(|a| a.to_string())),
                "token": {
                    "state": snap.state,
                    "expires_in_secs": secs(snap.expires_in),
                    // The org's idle token timeout, once the platform told it.
                    "idle_timeout_secs": snap.idle_timeout.map(|d| d.as_secs()),
                    "age_secs": secs(snap.age),
                    "pool_size": u.tokens.len(),
                },
                "grants": {"ok": snap.grants_ok, "failed": snap.grants_failed},
                "last_failure": last_failure,
                "last_minute": {"requests": requests, "errors": errors},
                "retries_401": stats.map_or(0, |s| s.retries_401.load(Ordering::Relaxed)),
                "throttled_429": stats.map_or(0, |s| s.throttled_429.load(Ordering::Relaxed)),
                "websockets_open": sockets_of(Some(u.name()), None),
                "channels_live": channels_of(Some(u.name()), None),
                "notification_channels": u.config.notification_channels,
                "rate_budget": u.budget.budget().map(|b| json!({
                    "allowed": b.allowed,
                    "used": b.used,
                    "remaining": b.allowed.saturating_sub(b.used),
                    "window_secs": b.window.as_secs(),
                    "waiting": b.waiting,
                })),
                "calls_per_10s": {
                    "bucket_secs": BUCKET_SECS,
                    // The budget, as calls per bucket, for the chart's line.
                    "budget_per_bucket": u.budget.budget().filter(|b| !b.window.is_zero()).map(|b| {
                        b.allowed as f64 * BUCKET_SECS as f64 / b.window.as_secs_f64()
                    }),
                    "clients": board.clients.iter().enumerate().map(|(i, c)| json!({
                        "client": c.name.as_ref(),
                        "counts": stats.map(|s| s.history[i].counts(second)).unwrap_or_default(),
                    })).collect::<Vec<_>>(),
                },
            })
        })
        .collect();
    let client_docs: Vec<Value> = board
        .clients
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let calls_10min: u64 = board
                .upstreams
                .iter()
                .flat_map(|u| u.history.get(i).map(|h| h.counts(second)))
                .flatten()
                .sum();
            json!({
                "name": c.name.as_ref(),
                "share": c.share,
                "max_per_minute": c.max_per_minute,
                // By fingerprint: never a key, nor enough of its hash to look one up.
                "keys": c.keys.iter().map(|k| json!({
                    "fingerprint": k.fingerprint(),
                    "not_after": k.not_after.map(crate::config::rfc3339),
                    "expires_in_secs": k.not_after.map(|t| seconds_until(t, now)),
                    "last_used": k.last_used().map(crate::config::rfc3339),
                })).collect::<Vec<_>>(),
                "calls_last_10_min": calls_10min,
                "requests": c.requests.load(Ordering::Relaxed),
                "forbidden": c.forbidden.load(Ordering::Relaxed),
                "websockets_open": sockets_of(None, Some(&c.name)),
                "channels_live": channels_of(None, Some(&c.name)),
                // Live channels on each upstream that has any.
                "channels": upstreams
                    .iter()
                    .filter_map(|u| {
                        let live = channels_of(Some(u.name()), Some(&c.name));
                        (live > 0).then(|| json!({"upstream": u.name().as_ref(), "live": live}))
                    })
                    .collect::<Vec<_>>(),
            })
        })
        .collect();
    json!({
        "version": env!("CARGO_PKG_VERSION"),
        "generated_at_unix": unix(SystemTime::now()),
        "uptime_secs": board.started.elapsed().as_secs(),
        "listen": listen.to_string(),
        "upstreams": upstream_docs,
        "clients": client_docs,
        "shared_cache": shared.map(|c| {
            let (taken, stored) = c.counts();
            json!({
                "redis": c.config().redis_target,
                "state": if c.is_up() { "ok" } else { "unavailable" },
                "tokens_taken": taken,
                "tokens_stored": stored,
            })
        }),
    })
}

/// Seconds from `now` until `t` (negative once it has passed).
pub fn seconds_until(t: SystemTime, now: SystemTime) -> i64 {
    match t.duration_since(now) {
        Ok(d) => d.as_secs() as i64,
        Err(e) => -(e.duration().as_secs() as i64),
    }
}

/// `h:mm:ss`, as the page's script also writes it.
fn clock(secs: f64) -> String {
    let s = secs.max(0.0) as u64;
    format!("{}:{:02}:{:02}", s / 3600, s / 60 % 60, s % 60)
}

/// The status page, from the status document.
pub fn status_html(doc: &Value) -> String {
    let mut rows = String::new();
    let mut failures = String::new();
    let mut charts = String::new();
    let mut quiet: Vec<String> = Vec::new();
    let empty = Vec::new();
    for u in doc["upstreams"].as_array().unwrap_or(&empty) {
        let name = esc(&text(&u["name"]));
        let state = text(&u["token"]["state"]);
        let where_ = match (&u["region"], &u["api_host"]) {
            (Value::String(r), Value::String(h)) => {
                format!("{} <small>({})</small>", esc(r), esc(h))
            }
            (Value::String(r), _) => esc(r),
            (_, Value::String(h)) => esc(h),
            _ => "discovering".into(),
        };
        let expiry = match u["token"]["expires_in_secs"].as_f64() {
            Some(s) => format!(
                "<span class=\"countdown\" id=\"countdown-{name}\" data-expires-in=\"{s}\">{}</span>",
                clock(s)
            ),
            None => "—".into(),
        };
        let age = u["token"]["age_secs"].as_f64().map_or("—".into(), clock);
        let mut auth = esc(&text(&u["auth_method"]));
        if let Some(s) = u["secret_in_use"].as_str() {
            auth.push_str(&format!(
                ", secret in use: <span class=\"secret-in-use\">{}</span>",
                esc(s)
            ));
        }
        if let Some(p) = u["egress_proxy"].as_str() {
            auth.push_str(&format!(", via {}", esc(p)));
        }
        rows.push_str(&format!(
            "<tr id=\"upstream-{name}\" class=\"state-{state}\"><th scope=\"row\">{name}</th><td>{provider}<br><small class=\"auth\">{auth}</small></td><td>{where_}</td>\
             <td><span class=\"badge {state}\">{state}</span></td><td>{expiry}</td><td>{age}</td><td>{pool}</td>\
             <td>{ok} / {failed}</td><td>{req} / {err}</td><td>{retries}</td><td>{throttled}</td></tr>\n",
            provider = esc(&text(&u["provider"])),
            state = esc(&state),
            pool = text(&u["token"]["pool_size"]),
            ok = text(&u["grants"]["ok"]),
            failed = text(&u["grants"]["failed"]),
            req = text(&u["last_minute"]["requests"]),
            err = text(&u["last_minute"]["errors"]),
            retries = text(&u["retries_401"]),
            throttled = text(&u["throttled_429"]),
        ));
        // An upstream nobody called in ten minutes gets a line, not an empty chart.
        let called = u["calls_per_10s"]["clients"].as_array().is_some_and(|cs| {
            cs.iter().any(|c| {
                c["counts"]
                    .as_array()
                    .is_some_and(|n| n.iter().any(|v| v.as_f64().unwrap_or(0.0) > 0.0))
            })
        });
        if called {
            charts.push_str(&rate_chart(u));
        } else {
            quiet.push(name.clone());
        }
        if let Some(f) = u["last_failure"].as_object() {
            failures.push_str(&format!(
                "<li id=\"failure-{name}\"><strong>{name}</strong>: <code class=\"grant-error\">{grant_error}</code> \
                 (HTTP {status}) — hint <code class=\"hint\">{hint}</code>: {message}<br><small>{detail}</small></li>\n",
                grant_error = esc(&text(&f["grant_error"])),
                status = esc(&text(&f["status"])),
                hint = esc(&text(&f["hint"])),
                message = esc(&text(&f["message"])),
                detail = esc(&text(&f["detail"])),
            ));
        }
    }
    let mut clients = String::new();
    for c in doc["clients"].as_array().unwrap_or(&empty) {
        let name = esc(&text(&c["name"]));
        let cap = c["max_per_minute"]
            .as_u64()
            .map_or("—".into(), |n| format!("{n}/min"));
        let keys: Vec<String> = c["keys"]
            .as_array()
            .unwrap_or(&empty)
            .iter()
            .map(|k| {
                format!(
                    "<code>{}</code> until {}, last used {}",
                    esc(&text(&k["fingerprint"])),
                    k["not_after"].as_str().map_or("—".into(), esc),
                    k["last_used"].as_str().map_or("never".into(), esc),
                )
            })
            .collect();
        let keys = keys.join("<br>");
        clients.push_str(&format!(
            "<tr id=\"client-{name}\"><th scope=\"row\">{name}</th><td class=\"keys\">{keys}</td><td class=\"share\">{}</td><td>{cap}</td><td class=\"use\">{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>\n",
            text(&c["share"]),
            text(&c["calls_last_10_min"]),
            text(&c["requests"]),
            text(&c["forbidden"]),
            text(&c["websockets_open"]),
            text(&c["channels_live"]),
        ));
    }
    if !quiet.is_empty() {
        charts.push_str(&format!(
            "<p class=\"quiet\" id=\"quiet-upstreams\">no calls in the last 10 minutes: {}</p>",
            quiet.join(", ")
        ));
    }
    // The failures come first on the page: they are what an operator opens it for.
    let failures = if failures.is_empty() {
        String::new()
    } else {
        format!("<h2>Last grant failures</h2>\n<ul class=\"failures\" id=\"failures\">\n{failures}</ul>")
    };
    let shared = match doc["shared_cache"].as_object() {
        None => String::new(),
        Some(c) => format!(
            "<p id=\"shared-cache\">tokens shared through Redis at {redis}: <span class=\"badge {badge}\">{state}</span> · {taken} taken from the fleet, {stored} stored for it</p>",
            redis = esc(&text(&c["redis"])),
            badge = if c["state"] == "ok" { "valid" } else { "failing" },
            state = esc(&text(&c["state"])),
            taken = text(&c["tokens_taken"]),
            stored = text(&c["tokens_stored"]),
        ),
    };
    format!(
        r#"<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="refresh" content="{REFRESH_SECS}">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>tokengate status</title>
<style>
body{{font:14px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;margin:1.5rem;color:#1d2430;background:#f6f7f9}}
h1{{font-size:1.3rem;margin:0}} h2{{font-size:1.05rem;margin:1.4rem 0 .5rem}}
header p{{margin:.2rem 0;color:#5b6472}}
table{{border-collapse:collapse;background:#fff;box-shadow:0 1px 2px #0002}}
table{{max-width:100%}}
th,td{{padding:.35rem .55rem;border-bottom:1px solid #e3e6ea;text-align:left;white-space:nowrap}}
thead th{{background:#eef1f4;font-weight:600;white-space:normal;vertical-align:bottom}}
td small.auth{{white-space:normal;display:inline-block;max-width:14rem}}
p.quiet{{color:#5b6472}}
.badge{{padding:.1rem .5rem;border-radius:.7rem;font-weight:600;font-size:.85em}}
.valid{{background:#d8f3dc;color:#1b5e20}} .refreshing{{background:#fff3bf;color:#7a5b00}}
.failing{{background:#ffd6d6;color:#8b0000}} .none{{background:#e9ecef;color:#495057}}
.countdown{{font-variant-numeric:tabular-nums}}
ul.failures{{background:#fff;padding:.6rem 1.6rem;box-shadow:0 1px 2px #0002}}
code{{background:#eef1f4;padding:0 .25rem;border-radius:.2rem}}
figure.chart{{background:#fff;box-shadow:0 1px 2px #0002;margin:0 0 1rem;padding:.6rem .8rem;display:inline-block}}
figure.chart figcaption{{font-weight:600;margin-bottom:.3rem}}
.legend span{{margin-right:1rem}} .legend i{{display:inline-block;width:.8rem;height:.8rem;margin-right:.3rem;vertical-align:-.1rem}}
</style></head>
<body>
<header><h1>tokengate</h1>
<p>version {version} · listening on {listen} · up {uptime} · this page reloads every {REFRESH_SECS} s · <a href="status.json">status.json</a> · <a href="metrics">metrics</a></p>
{shared}</header>
{failures}
<h2>Upstreams</h2>
<table id="upstreams"><thead><tr><th>upstream</th><th>provider</th><th>region / host</th><th>token</th><th>expires in</th><th>token age</th><th>pool</th><th>grants ok / failed</th><th>last minute: requests / errors</th><th>401 retries</th><th>429s</th></tr></thead>
<tbody>
{rows}</tbody></table>
<h2>Rate budget: calls per 10 s, last 10 minutes</h2>
{charts}
<h2>Clients</h2>
<table id="clients"><thead><tr><th>client</th><th>keys</th><th>share</th><th>max per minute</th><th>calls sent, last 10 min</th><th>requests</th><th>403s</th><th>WebSockets open</th><th>notification channels</th></tr></thead>
<tbody>
{clients}</tbody></table>
<script>
(function () {{
  var start = Date.now();
  function clock(s) {{
    s = Math.max(0, Math.floor(s));
    var m = Math.floor(s / 60) % 60, ss = s % 60;
    return Math.floor(s / 3600) + ":" + (m < 10 ? "0" : "") + m + ":" + (ss < 10 ? "0" : "") + ss;
  }}
  function tick() {{
    var gone = (Date.now() - start) / 1000;
    document.querySelectorAll(".countdown").forEach(function (el) {{
      var left = parseFloat(el.getAttribute("data-expires-in")) - gone;
      el.textContent = left > 0 ? clock(left) : "expired";
      el.setAttribute("data-live", "1");
    }});
  }}
  tick();
  setInterval(tick, 1000);
}})();
</script>
</body></html>
"#,
        version = esc(&text(&doc["version"])),
        listen = esc(&text(&doc["listen"])),
        uptime = clock(doc["uptime_secs"].as_f64().unwrap_or(0.0)),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn html_escapes_what_it_shows() {
        assert_eq!(
            esc("<a href=\"x\">&'"),
            "&lt;a href=&quot;x&quot;&gt;&amp;&#39;"
        );
        assert_eq!(clock(3725.9), "1:02:05");
    }
}
