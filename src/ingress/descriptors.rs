//! File descriptors: the limit the process may open, raised at start, and the connection
//! caps that fit under it.
//!
//! Every connection is a descriptor. A shell's usual `ulimit -n` is 1,024 while the default
//! `max_connections` is 10,000: 1,100 keyless connections used to take every descriptor,
//! and then every accept failed — the admin listener's too — and nothing could connect to
//! the API host either. So the soft limit is raised to the hard one (what any process may
//! do), and when even that is too low the proxy listener's cap is lowered to leave a
//! reserve for the admin listener, the connections to the upstreams and the files the
//! proxy opens.

/// Descriptors kept for everything but client connections and upstream connections: the
/// listeners, the token endpoint's and Redis's connections, the config, DNS, logs.
pub const RESERVE: usize = 64;

/// The limit of open files after raising the soft limit to the hard one; `None` where it
/// cannot be read.
pub fn raise_limit() -> Option<usize> {
    let (soft, hard) = rlimit::Resource::NOFILE.get().ok()?;
    let open_files = if soft < hard && rlimit::Resource::NOFILE.set(hard, hard).is_ok() {
        hard
    } else {
        soft
    };
    Some(usize::try_from(open_files).unwrap_or(usize::MAX))
}

/// The caps that fit `open_files`: the proxy listener's connections (at most `wanted`) and
/// the admin listener's (at most `admin_wanted`), after `upstream` connections and
/// [`RESERVE`]. Each at least 1.
pub fn fit(
    open_files: usize,
    wanted: usize,
    admin_wanted: usize,
    upstream: usize,
) -> (usize, usize) {
    let left = open_files.saturating_sub(RESERVE + upstream);
    let admin = admin_wanted.min(left / 8).max(1);
    let proxy = wanted.min(left.saturating_sub(admin)).max(1);
    (proxy, admin)
}

#[cfg(test)]
mod tests {
    use super::fit;

    #[test]
    fn caps_leave_room_for_the_admin_listener_the_upstreams_and_files() {
        // A shell's 1,024 with the defaults: 10,000 wanted, one upstream of 128.
        let (proxy, admin) = fit(1024, 10_000, 256, 128);
        assert_eq!((proxy, admin), (728, 104));
        assert!(proxy + admin + 128 + super::RESERVE <= 1024);
        // Plenty of descriptors: the configured caps stand.
        assert_eq!(fit(1 << 20, 10_000, 256, 128), (10_000, 256));
        // Hopelessly few: one each, never zero.
        assert_eq!(fit(10, 10_000, 256, 128), (1, 1));
    }
}
