//! The Lua scripts the fleet's cache runs in Redis, each one atomic command.

/// Reserves `ARGV[1]` calls of a token's rate-limit window for replica `ARGV[3]`, in one
/// atomic command: the fleet's reservations so far in the window, this one included, and
/// how many replicas reserved some lately. The first reservation of a window sets when it
/// ends (`ARGV[2]` ms), and keeps the set of replicas for `ARGV[4]` ms more (several
/// windows: a replica that knows its fleet can fall back to its part of the budget).
pub(super) const LEASE: &str = "local n = redis.call('INCRBY', KEYS[1], ARGV[1]) \
    redis.call('SADD', KEYS[2], ARGV[3]) \
    if n == tonumber(ARGV[1]) then redis.call('PEXPIRE', KEYS[1], ARGV[2]) \
    redis.call('PEXPIRE', KEYS[2], ARGV[4]) end \
    return {n, redis.call('SCARD', KEYS[2])}";

/// Releases the fleet lock only if we still hold it (it may have expired and been taken).
pub(super) const RELEASE: &str =
    "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) else return 0 end";
