//! A listener's connection caps: how many connections it holds at once, in all and per
//! client address, so one client cannot take every slot.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use tokio::sync::{AcquireError, OwnedSemaphorePermit, Semaphore};

/// How many connections a listener holds at once.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionLimits {
    pub max_connections: usize,
    pub max_per_address: usize,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        ConnectionLimits {
            max_connections: 10_000,
            max_per_address: 10_000,
        }
    }
}

/// The connection slots of one listening address, shared by every socket accepting on it
/// (one per worker), so the caps hold for the address as a whole.
pub struct ConnectionGate {
    max: usize,
    slots: Arc<Semaphore>,
    per_address: Arc<PerAddress>,
    max_per_address: usize,
}

impl ConnectionGate {
    pub fn new(limits: ConnectionLimits) -> Arc<ConnectionGate> {
        Arc::new(ConnectionGate {
            max: limits.max_connections.max(1),
            slots: Arc::new(Semaphore::new(limits.max_connections.max(1))),
            per_address: Arc::new(PerAddress::default()),
            max_per_address: limits.max_per_address,
        })
    }

    /// A place under the cap of all connections, when one is free.
    pub(super) async fn slot(&self) -> Result<OwnedSemaphorePermit, AcquireError> {
        Arc::clone(&self.slots).acquire_owned().await
    }

    /// A place under `ip`'s cap, if it has one left.
    pub(super) fn enter(&self, ip: IpAddr) -> Option<AddressSlot> {
        PerAddress::enter(&self.per_address, ip, self.max_per_address)
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.max.saturating_sub(self.slots.available_permits())
    }
}

/// Connections per client address.
#[derive(Default)]
struct PerAddress(Mutex<HashMap<IpAddr, usize>>);

/// A connection's places under the listener's caps: one of all, one of its address's.
pub(super) type Slots = (OwnedSemaphorePermit, AddressSlot);

/// Holds one slot of an address; frees it when dropped.
pub(super) struct AddressSlot {
    table: Arc<PerAddress>,
    ip: IpAddr,
}

impl PerAddress {
    fn enter(table: &Arc<PerAddress>, ip: IpAddr, max: usize) -> Option<AddressSlot> {
        let mut map = table.0.lock().unwrap_or_else(|p| p.into_inner());
        let n = map.entry(ip).or_insert(0);
        if *n >= max {
            return None;
        }
        *n += 1;
        Some(AddressSlot {
            table: Arc::clone(table),
            ip,
        })
    }
}

impl Drop for AddressSlot {
    fn drop(&mut self) {
        let mut map = self.table.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = map.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.ip);
            }
        }
    }
}
