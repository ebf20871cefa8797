//! Free loopback ports for test servers.
//!
//! Tests run in parallel (test threads and several test binaries at once), so ports are never
//! fixed. A port is picked at random *below* the kernel's ephemeral range (so it cannot clash
//! with the source port of some outgoing connection, nor with another process that asked the
//! kernel for port 0), checked by binding it on 127.0.0.1, then released for the server to take.
//! There is an unavoidable window between the check and the server binding the port; the server
//! starters in this crate detect "address already in use" and retry with other ports.
//!
//! Within one process, ports handed out are remembered until their [`PortReservation`] is
//! dropped, so two servers of the same test binary never get the same port, and a stopped server
//! keeps its port for [`restart`](crate::NatsServer::restart).

use std::collections::HashSet;
use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::net::{Ipv4Addr, TcpListener};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::error::{Error, Result};

/// Lowest port we pick from when choosing below the ephemeral range.
const LOW_PORT: u16 = 15_000;
/// How many candidates to try before giving up.
const ATTEMPTS: u32 = 500;

fn reserved() -> MutexGuard<'static, HashSet<u16>> {
    static RESERVED: OnceLock<Mutex<HashSet<u16>>> = OnceLock::new();
    RESERVED
        .get_or_init(|| Mutex::new(HashSet::new()))
        .lock()
        // A panic while holding this lock cannot leave the set inconsistent.
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A port held for one server in this process; released (for this process) on drop.
#[derive(Debug)]
pub(crate) struct PortReservation {
    port: u16,
}

impl PortReservation {
    /// The reserved port number.
    pub(crate) fn port(&self) -> u16 {
        self.port
    }
}

impl Drop for PortReservation {
    fn drop(&mut self) {
        reserved().remove(&self.port);
    }
}

/// Returns a TCP port on 127.0.0.1 that was free a moment ago.
///
/// The port is remembered for the rest of the process so no other caller of this crate gets it
/// again. Callers that start a server on it must still cope with losing a race to another
/// process (retry on "address already in use").
pub fn free_port() -> Result<u16> {
    let reservation = reserve_port()?;
    let port = reservation.port;
    // Keep it out of the in-process pool for good: the caller owns it now.
    std::mem::forget(reservation);
    Ok(port)
}

/// Picks a free port and reserves it in this process until the reservation is dropped.
pub(crate) fn reserve_port() -> Result<PortReservation> {
    let high = ephemeral_low().saturating_sub(1);
    for _ in 0..ATTEMPTS {
        let candidate = if high > LOW_PORT + 1000 {
            let span = u64::from(high - LOW_PORT);
            // `span` fits in u16, so the sum does too.
            LOW_PORT + u16::try_from(random_u64() % span).unwrap_or(0)
        } else {
            match kernel_port() {
                Some(p) => p,
                None => continue,
            }
        };
        let mut set = reserved();
        if set.contains(&candidate) || !is_free(candidate) {
            continue;
        }
        set.insert(candidate);
        return Ok(PortReservation { port: candidate });
    }
    Err(Error::NoFreePort)
}

/// Whether nothing listens on (or is bound to) `127.0.0.1:port` right now.
pub fn is_port_free(port: u16) -> bool {
    is_free(port)
}

fn is_free(port: u16) -> bool {
    TcpListener::bind((Ipv4Addr::LOCALHOST, port)).is_ok()
}

/// A port chosen by the kernel (bind to port 0), as a fallback when the ephemeral range leaves
/// no room below it.
fn kernel_port() -> Option<u16> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).ok()?;
    listener.local_addr().ok().map(|a| a.port())
}

/// The first port of the kernel's ephemeral range (32768 when unknown).
fn ephemeral_low() -> u16 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(32_768)
}

/// A cheap random number: std's per-process random hash keys, a counter, the time and the pid.
pub(crate) fn random_u64() -> u64 {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    static KEYS: OnceLock<RandomState> = OnceLock::new();
    let mut hasher = KEYS.get_or_init(RandomState::new).build_hasher();
    hasher.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    hasher.write_u32(std::process::id());
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    hasher.write_u128(nanos);
    hasher.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_are_distinct_and_free() {
        let a = reserve_port().unwrap();
        let b = reserve_port().unwrap();
        assert_ne!(a.port(), b.port());
        assert!(is_port_free(a.port()));
        assert!(a.port() < ephemeral_low());
    }

    #[test]
    fn reservation_is_released_on_drop() {
        let a = reserve_port().unwrap();
        let port = a.port();
        assert!(reserved().contains(&port));
        drop(a);
        assert!(!reserved().contains(&port));
    }
}
