//! The Lua scripts the fleet's cache runs in Redis, each one atomic command.

/// Releases the fleet lock only if we still hold it (it may have expired and been taken).
pub(super) const RELEASE: &str =
    "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) else return 0 end";
