//! Usage per app: the platform counts calls per OAuth client, so behind the gate only the
//! gate can say which app used what. Calls per client and upstream, by the hour, kept 31
//! days in memory (and, with `[cache]`, added up across the fleet in Redis: see
//! `SharedCache::add_usage`).
//!
//! The observe layer counts every answer here. A row's counts for the current hour are
//! atomics (no lock on the request path); the turn of an hour moves them into the row's
//! past under its lock, once per row and hour. A count racing that move may land in the
//! new hour: counts are exact within an hour, and at worst a call or two moves across it.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;

/// Hours kept: 31 days.
pub const KEPT_HOURS: u64 = 31 * 24;

/// The counts of a row, in the order of [`COLUMNS`].
pub type Counts = [u64; 7];

/// The columns of `/usage.json` rows and `/usage.csv`, after `client` and `upstream`.
pub const COLUMNS: [&str; 7] = [
    "calls",
    "2xx",
    "4xx",
    "5xx",
    "rate_limited",
    "bytes_in",
    "bytes_out",
];

/// One answer, as usage counts it.
#[derive(Debug, Clone, Copy)]
pub struct Call {
    pub status: u16,
    /// The proxy refused it for the rate budget (its own 429).
    pub rate_limited: bool,
    /// The request's and the answer's declared body lengths (`Content-Length`; a body
    /// streamed without one counts 0).
    pub bytes_in: u64,
    pub bytes_out: u64,
}

impl Call {
    fn counts(&self) -> Counts {
        let class = |c: u16| u64::from(self.status / 100 == c);
        [
            1,
            class(2),
            class(4),
            class(5),
            u64::from(self.rate_limited),
            self.bytes_in,
            self.bytes_out,
        ]
    }
}

struct Row {
    /// The hour (since the epoch) `now` counts.
    hour: AtomicU64,
    now: [AtomicU64; 7],
    /// Counted and not yet added to the fleet's counts (only with `[cache]`).
    unshared: [AtomicU64; 7],
    /// Earlier hours, oldest first.
    past: Mutex<VecDeque<(u64, Counts)>>,
}

impl Row {
    fn new(hour: u64) -> Row {
        Row {
            hour: AtomicU64::new(hour),
            now: Default::default(),
            unshared: Default::default(),
            past: Mutex::new(VecDeque::new()),
        }
    }

    fn record(&self, hour: u64, counts: &Counts, shared: bool) {
        if self.hour.load(Ordering::Acquire) != hour {
            self.roll(hour);
        }
        for (slot, n) in self.now.iter().zip(counts) {
            if *n > 0 {
                slot.fetch_add(*n, Ordering::Relaxed);
            }
        }
        if shared {
            for (slot, n) in self.unshared.iter().zip(counts) {
                if *n > 0 {
                    slot.fetch_add(*n, Ordering::Relaxed);
                }
            }
        }
    }

    /// Move the current hour's counts into the past, if `hour` is a later one.
    fn roll(&self, hour: u64) {
        let mut past = self.past.lock().unwrap_or_else(|p| p.into_inner());
        let was = self.hour.load(Ordering::Acquire);
        if was >= hour {
            return;
        }
        let counts: Counts = std::array::from_fn(|i| self.now[i].swap(0, Ordering::Relaxed));
        if counts[0] > 0 {
            past.push_back((was, counts));
        }
        while past.front().is_some_and(|(h, _)| *h + KEPT_HOURS <= hour) {
            past.pop_front();
        }
        self.hour.store(hour, Ordering::Release);
    }

    /// Counts of the hours from `since_hour` on.
    fn since(&self, since_hour: u64, hour: u64) -> Counts {
        self.roll(hour);
        let past = self.past.lock().unwrap_or_else(|p| p.into_inner());
        let mut sum: Counts = std::array::from_fn(|i| self.now[i].load(Ordering::Relaxed));
        for (_, counts) in past.iter().filter(|(h, _)| *h >= since_hour) {
            for (s, n) in sum.iter_mut().zip(counts) {
                *s += n;
            }
        }
        sum
    }
}

type Rows = HashMap<Arc<str>, HashMap<Arc<str>, Arc<Row>>>;

/// The process's usage book; it outlives reloads.
#[derive(Default)]
pub struct Usage {
    rows: ArcSwap<Rows>,
    /// Serialises adding rows (rare: a client and upstream's first call).
    adding: Mutex<()>,
    /// The fleet adds its counts up in Redis (`[cache]`): keep what is not added yet.
    shared: std::sync::atomic::AtomicBool,
}

impl std::fmt::Debug for Usage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Usage")
    }
}

/// The hour since the epoch that `secs` (since the epoch) falls in.
pub fn hour_of(secs: u64) -> u64 {
    secs / 3600
}

pub fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl Usage {
    /// From now on, keep counts for the fleet's (see [`Self::take_unshared`]).
    pub fn share(&self, on: bool) {
        self.shared.store(on, Ordering::Relaxed);
    }

    /// Count one answer for `client` on `upstream` (`""`: refused before routing).
    pub fn record(&self, client: &str, upstream: &str, call: Call) {
        let hour = hour_of(now_secs());
        let counts = call.counts();
        let shared = self.shared.load(Ordering::Relaxed);
        if let Some(row) = self.rows.load().get(client).and_then(|u| u.get(upstream)) {
            row.record(hour, &counts, shared);
            return;
        }
        let _adding = self.adding.lock().unwrap_or_else(|p| p.into_inner());
        let mut rows = Rows::clone(&self.rows.load());
        let row = Arc::clone(
            rows.entry(Arc::from(client))
                .or_default()
                .entry(Arc::from(upstream))
                .or_insert_with(|| Arc::new(Row::new(hour))),
        );
        self.rows.store(Arc::new(rows));
        row.record(hour, &counts, shared);
    }

    /// Every row's counts of the hours from the one `since` (seconds since the epoch)
    /// falls in: `(client, upstream, counts)`, sorted, rows with no call left out.
    pub fn since(&self, since: u64) -> Vec<(String, String, Counts)> {
        let hour = hour_of(now_secs());
        let mut out: Vec<_> = self
            .rows
            .load()
            .iter()
            .flat_map(|(client, upstreams)| {
                upstreams.iter().map(move |(upstream, row)| {
                    (
                        client.to_string(),
                        upstream.to_string(),
                        row.since(hour_of(since), hour),
                    )
                })
            })
            .filter(|(_, _, c)| c[0] > 0)
            .collect();
        out.sort();
        out
    }

    /// The counts not yet added to the fleet's (with `[cache]`), taken: `(client,
    /// upstream, counts)`. They are added to the hour they are taken in (a flush every
    /// few seconds: at most those seconds move across an hour's end).
    pub fn take_unshared(&self) -> Vec<(String, String, Counts)> {
        let mut out = Vec::new();
        for (client, upstreams) in self.rows.load().iter() {
            for (upstream, row) in upstreams {
                let counts: Counts =
                    std::array::from_fn(|i| row.unshared[i].swap(0, Ordering::Relaxed));
                if counts[0] > 0 {
                    out.push((client.to_string(), upstream.to_string(), counts));
                }
            }
        }
        out
    }

    /// Give counts taken with [`Self::take_unshared`] back, when the fleet could not
    /// take them (Redis away): the next flush tries again.
    pub fn untake(&self, rows: &[(String, String, Counts)]) {
        let book = self.rows.load();
        for (client, upstream, counts) in rows {
            if let Some(row) = book
                .get(client.as_str())
                .and_then(|u| u.get(upstream.as_str()))
            {
                for (slot, n) in row.unshared.iter().zip(counts) {
                    slot.fetch_add(*n, Ordering::Relaxed);
                }
            }
        }
    }
}

/// `/usage.csv`: a header line, then a line per row.
pub fn csv(rows: &[(String, String, Counts)]) -> String {
    let mut out = format!("client,upstream,{}\n", COLUMNS.join(","));
    for (client, upstream, counts) in rows {
        let numbers: Vec<String> = counts.iter().map(u64::to_string).collect();
        out.push_str(&format!(
            "{},{},{}\n",
            csv_field(client),
            csv_field(upstream),
            numbers.join(",")
        ));
    }
    out
}

/// A CSV field, quoted when it must be (RFC 4180); a leading `=`, `+`, `-` or `@` gets a
/// `'` so a spreadsheet does not run it as a formula.
fn csv_field(text: &str) -> String {
    let text = if text.starts_with(['=', '+', '-', '@']) {
        format!("'{text}")
    } else {
        text.to_string()
    };
    if text.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", text.replace('"', "\"\""))
    } else {
        text
    }
}

/// `/usage.json`.
pub fn json(since: u64, rows: &[(String, String, Counts)]) -> serde_json::Value {
    let rows: Vec<serde_json::Value> = rows
        .iter()
        .map(|(client, upstream, counts)| {
            let mut row = serde_json::Map::new();
            row.insert("client".into(), client.as_str().into());
            row.insert("upstream".into(), upstream.as_str().into());
            for (name, n) in COLUMNS.iter().zip(counts) {
                row.insert((*name).into(), (*n).into());
            }
            serde_json::Value::Object(row)
        })
        .collect();
    serde_json::json!({ "since": since, "rows": rows })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call(status: u16) -> Call {
        Call {
            status,
            rate_limited: status == 429,
            bytes_in: 10,
            bytes_out: 100,
        }
    }

    #[test]
    fn each_client_and_upstream_is_counted_by_status_class() {
        let usage = Usage::default();
        for s in [200, 204, 404, 429, 503] {
            usage.record("a", "genesys", call(s));
        }
        usage.record("b", "genesys", call(200));
        let rows = usage.since(0);
        assert_eq!(
            rows,
            vec![
                ("a".into(), "genesys".into(), [5, 2, 2, 1, 1, 50, 500]),
                ("b".into(), "genesys".into(), [1, 1, 0, 0, 0, 10, 100]),
            ]
        );
        assert_eq!(
            csv(&rows).lines().next(),
            Some("client,upstream,calls,2xx,4xx,5xx,rate_limited,bytes_in,bytes_out")
        );
    }

    #[test]
    fn an_hour_that_ends_moves_to_the_past_and_old_ones_go() {
        let row = Row::new(100);
        row.record(100, &call(200).counts(), false);
        row.record(101, &call(500).counts(), false);
        assert_eq!(row.since(100, 101)[0], 2);
        assert_eq!(row.since(101, 101)[0], 1, "the hour before is left out");
        assert_eq!(
            row.since(0, 100 + KEPT_HOURS)[0],
            1,
            "31 days later the first is gone"
        );
    }

    #[test]
    fn a_csv_field_cannot_break_its_line_or_run_as_a_formula() {
        assert_eq!(csv_field("a,b"), "\"a,b\"");
        assert_eq!(csv_field("=cmd()"), "'=cmd()");
        assert_eq!(csv_field("x\"y"), "\"x\"\"y\"");
    }
}
