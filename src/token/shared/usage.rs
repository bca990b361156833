//! The fleet's usage per app in Redis: one hash per hour, `<prefix>:usage:<hour>`, a field
//! per client, upstream and column (joined by U+001F, a character no name has), raised by
//! each replica's flush and read back summed (see [`crate::telemetry::usage`]). Kept 32
//! days.

use super::store::{SharedCache, Unavailable};

const SEPARATOR: char = '\u{1f}';
const KEPT_SECS: u64 = 32 * 24 * 3600;

/// `(client, upstream, counts)`, counts in the order of the columns given.
pub type UsageRows = Vec<(String, String, [u64; 7])>;

impl SharedCache {
    fn usage_key(&self, hour: u64) -> String {
        format!("{}:usage:{hour}", self.config.key_prefix)
    }

    /// Add a replica's new counts to `hour`'s (one pipeline: an `HINCRBY` per count that
    /// is not zero, and the hash's lifetime at the first flush of the hour).
    pub async fn add_usage(
        &self,
        hour: u64,
        columns: &[&str; 7],
        rows: &UsageRows,
    ) -> Result<(), Unavailable> {
        let key = self.usage_key(hour);
        let mut pipe = redis::pipe();
        for (client, upstream, counts) in rows {
            for (column, n) in columns.iter().zip(counts).filter(|(_, n)| **n > 0) {
                let field = format!("{client}{SEPARATOR}{upstream}{SEPARATOR}{column}");
                pipe.cmd("HINCRBY").arg(&key).arg(field).arg(*n).ignore();
            }
        }
        // The hash's lifetime, once per hour and replica (a flush a minute need not).
        let dated = self.usage_dated.load(std::sync::atomic::Ordering::Relaxed) == hour;
        if !dated {
            pipe.cmd("EXPIRE").arg(&key).arg(KEPT_SECS).ignore();
        }
        let mut redis = self.connection().await?;
        self.run(pipe.query_async::<()>(&mut redis)).await?;
        self.usage_dated
            .store(hour, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    /// The fleet's counts of the hours `from..=to`, summed per client and upstream.
    pub async fn usage(
        &self,
        from: u64,
        to: u64,
        columns: &[&str; 7],
    ) -> Result<UsageRows, Unavailable> {
        let mut pipe = redis::pipe();
        for hour in from..=to {
            pipe.cmd("HGETALL").arg(self.usage_key(hour));
        }
        let mut redis = self.connection().await?;
        let hours: Vec<Vec<(String, u64)>> = self.run(pipe.query_async(&mut redis)).await?;
        let mut sums: std::collections::BTreeMap<(String, String), [u64; 7]> = Default::default();
        for (field, n) in hours.into_iter().flatten() {
            let mut parts = field.split(SEPARATOR);
            let (Some(client), Some(upstream), Some(column)) =
                (parts.next(), parts.next(), parts.next())
            else {
                continue;
            };
            let Some(i) = columns.iter().position(|c| *c == column) else {
                continue;
            };
            sums.entry((client.to_string(), upstream.to_string()))
                .or_default()[i] += n;
        }
        Ok(sums
            .into_iter()
            .map(|((client, upstream), counts)| (client, upstream, counts))
            .filter(|(_, _, counts)| counts[0] > 0)
            .collect())
    }
}
