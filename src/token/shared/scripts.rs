//! The Lua scripts the fleet's cache runs in Redis, each one atomic command.

/// Releases the fleet lock only if we still hold it (it may have expired and been taken).
pub(super) const RELEASE: &str =
    "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) else return 0 end";

/// Gives `ARGV[1]` reserved calls back to a window's counter, only if it still exists (a
/// counter made now would have no lifetime).
pub(super) const GIVE_BACK: &str =
    "if redis.call('EXISTS', KEYS[1]) == 1 then return redis.call('DECRBY', KEYS[1], ARGV[1]) else return -1 end";
