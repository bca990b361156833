//! `GET /usage.json?since=<unix>` and `GET /usage.csv?since=<unix>`: calls per client and
//! upstream by status class, the proxy's own 429s and bytes, by the hour from the one
//! `since` falls in (all 31 days kept, without it). With `[cache]`, the fleet's: every
//! replica adds its counts to Redis once a minute (and before it answers these), and these
//! read the sums back; when
//! Redis does not answer, this replica's own, said so in `"fleet": false`.

use http::{Response, StatusCode};

use crate::http::answers::text;
use crate::http::body::ProxyBody;
use crate::live::Live;
use crate::telemetry::usage::{self, hour_of, now_secs, COLUMNS};

/// The usage answer for `path` (`/usage.json` or `/usage.csv`) and its `query`.
pub async fn answer(live: &Live, path: &str, query: Option<&str>) -> Response<ProxyBody> {
    let since = match since(query) {
        Ok(s) => s,
        Err(why) => return text(StatusCode::BAD_REQUEST, "text/plain", format!("{why}\n")),
    };
    let now = live.current();
    let now_hour = hour_of(now_secs());
    let from = hour_of(since).max(now_hour.saturating_sub(usage::KEPT_HOURS - 1));
    let fleet = match &now.shared {
        Some(shared) => {
            // This replica's own counts first, so they are current in the answer.
            share(&now).await;
            shared.usage(from, now_hour, &COLUMNS).await.ok()
        }
        None => None,
    };
    let from_fleet = fleet.is_some();
    let rows = fleet.unwrap_or_else(|| now.board.usage.since(since));
    if path.ends_with(".csv") {
        return text(StatusCode::OK, "text/csv; charset=utf-8", usage::csv(&rows));
    }
    let mut doc = usage::json(since, &rows);
    if now.shared.is_some() {
        doc["fleet"] = from_fleet.into();
    }
    text(StatusCode::OK, "application/json", doc.to_string())
}

/// `since=<unix seconds>` from the query; none: everything kept.
fn since(query: Option<&str>) -> Result<u64, String> {
    let Some(query) = query else { return Ok(0) };
    for (k, v) in form_urlencoded::parse(query.as_bytes()) {
        if k == "since" {
            return v.parse().map_err(|_| {
                format!("since must be a time in seconds since 1970 (unix), not \"{v}\"")
            });
        }
    }
    Ok(0)
}

/// Add this replica's new counts to the fleet's, once a minute (while `[cache]` is
/// configured) and before it answers a usage request: a minute's counts of a replica
/// per flush, a handful of commands, whatever the traffic.
pub async fn share_usage(live: Live) {
    let mut tick = tokio::time::interval(SHARE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        share(&live.current()).await;
    }
}

const SHARE_EVERY: std::time::Duration = std::time::Duration::from_secs(60);

/// One flush; counts Redis did not take are kept for the next.
async fn share(now: &crate::live::Generation) {
    let Some(shared) = now.shared.clone() else {
        return;
    };
    let rows = now.board.usage.take_unshared();
    if rows.is_empty() {
        return;
    }
    if shared
        .add_usage(hour_of(now_secs()), &COLUMNS, &rows)
        .await
        .is_err()
    {
        now.board.usage.untake(&rows);
    }
}
