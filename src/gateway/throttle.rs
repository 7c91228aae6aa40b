//! Slowing down repeated authentication failures, by client address and by caller name.
//!
//! * **By address**: an address with [`ADDRESS_LIMIT`] failures within [`WINDOW`] gets
//!   `429 rate_limited` for every request until the window that counted them ends — its
//!   credentials are not even checked. Only that address is affected, which is why the address
//!   must be the real client's: behind a load balancer it is taken from `X-Forwarded-For`, but
//!   only when the connection comes from one of `listen.trusted_proxies` (see
//!   [`client_address`]); otherwise anyone could blame an address of their choosing.
//! * **By caller name**: after [`NAME_LIMIT`] failures naming one caller within the window,
//!   each further *failure* for that name is answered only after [`NAME_DELAY`]. Success is never
//!   delayed and never refused, so a flood of wrong keys under a store's name cannot lock the
//!   store out; it only makes guessing that store's key slow (the attacker's connections wait,
//!   bounded by the listener's connection cap).
//!
//! Memory is bounded: at most [`MAX_ADDRESSES`] addresses are tracked (when full, windows that
//! have ended are dropped first, then everything: failing open on bookkeeping, never on
//! credentials).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The window failures are counted in.
pub const WINDOW: Duration = Duration::from_secs(60);
/// Failures from one address within the window before it is refused.
pub const ADDRESS_LIMIT: u32 = 20;
/// Failures naming one caller within the window before its failures are delayed.
pub const NAME_LIMIT: u32 = 10;
/// How long a failure for a caller name past the limit waits before its 401.
pub const NAME_DELAY: Duration = Duration::from_secs(1);
/// Addresses tracked at most.
pub const MAX_ADDRESSES: usize = 10_000;

/// One key's failures in its current window.
#[derive(Debug, Clone, Copy)]
struct Count {
    since: Instant,
    failures: u32,
}

impl Count {
    fn live(&self, now: Instant) -> bool {
        now.saturating_duration_since(self.since) < WINDOW
    }
}

/// Failure counts by address and by caller index.
#[derive(Debug, Default)]
pub struct Throttle {
    addresses: Mutex<HashMap<IpAddr, Count>>,
    names: Mutex<HashMap<usize, Count>>,
}

impl Throttle {
    /// `Some(retry_after)` when `address` is refused now.
    pub fn address_refused(&self, address: IpAddr, now: Instant) -> Option<Duration> {
        let map = self.addresses.lock().unwrap_or_else(|p| p.into_inner());
        let count = map.get(&address).filter(|c| c.live(now))?;
        (count.failures >= ADDRESS_LIMIT)
            .then(|| WINDOW.saturating_sub(now.saturating_duration_since(count.since)))
    }

    /// Records a failure from `address`, naming caller `named` if any; returns how long to
    /// wait before answering it.
    pub fn failed(&self, address: IpAddr, named: Option<usize>, now: Instant) -> Duration {
        {
            let mut map = self.addresses.lock().unwrap_or_else(|p| p.into_inner());
            if map.len() >= MAX_ADDRESSES && !map.contains_key(&address) {
                map.retain(|_, c| c.live(now));
                if map.len() >= MAX_ADDRESSES {
                    map.clear();
                }
            }
            bump(
                map.entry(address).or_insert(Count {
                    since: now,
                    failures: 0,
                }),
                now,
            );
        }
        let Some(index) = named else {
            return Duration::ZERO;
        };
        let mut names = self.names.lock().unwrap_or_else(|p| p.into_inner());
        let count = names.entry(index).or_insert(Count {
            since: now,
            failures: 0,
        });
        bump(count, now);
        if count.failures > NAME_LIMIT {
            NAME_DELAY
        } else {
            Duration::ZERO
        }
    }
}

fn bump(count: &mut Count, now: Instant) {
    if !count.live(now) {
        *count = Count {
            since: now,
            failures: 0,
        };
    }
    count.failures = count.failures.saturating_add(1);
}

/// An IP network: an address and a prefix length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Network {
    addr: IpAddr,
    prefix: u8,
}

impl Network {
    /// `10.0.0.0/8`, `192.168.1.5`, `fd00::/8`, `::1`.
    pub fn parse(text: &str) -> Result<Network, String> {
        let (addr, prefix) = match text.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (text, None),
        };
        let addr: IpAddr = addr.trim().parse().map_err(|_| {
            format!("{text:?} is not an IP address or network (such as 10.0.0.0/8)")
        })?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(p) => p
                .trim()
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| format!("{text:?} has a prefix length outside 0..={max}"))?,
        };
        Ok(Network { addr, prefix })
    }

    /// Whether `ip` is in this network (an IPv4-mapped IPv6 address counts as its IPv4 one).
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = canonical(ip);
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

impl std::fmt::Display for Network {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl serde::Serialize for Network {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// The client's address: the connection's peer, unless the peer is a trusted proxy — then the
/// right-most `X-Forwarded-For` entry that is not one (each proxy appends the address it saw,
/// so entries left of the first untrusted one could have been written by the client). An
/// unreadable header falls back to the peer.
pub fn client_address(peer: IpAddr, headers: &http::HeaderMap, trusted: &[Network]) -> IpAddr {
    let peer = canonical(peer);
    if !trusted.iter().any(|n| n.contains(peer)) {
        return peer;
    }
    let mut entries: Vec<&str> = Vec::new();
    for value in headers.get_all("x-forwarded-for") {
        let Ok(text) = value.to_str() else {
            return peer;
        };
        entries.extend(text.split(',').map(str::trim));
    }
    for entry in entries.iter().rev() {
        let Ok(ip) = entry.parse::<IpAddr>() else {
            return peer;
        };
        let ip = canonical(ip);
        if !trusted.iter().any(|n| n.contains(ip)) {
            return ip;
        }
    }
    peer
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn networks_parse_and_match() {
        let n = Network::parse("10.0.0.0/8").unwrap();
        assert!(n.contains(ip("10.1.2.3")));
        assert!(n.contains(ip("::ffff:10.1.2.3")));
        assert!(!n.contains(ip("11.0.0.1")));
        assert!(Network::parse("192.168.1.5")
            .unwrap()
            .contains(ip("192.168.1.5")));
        assert!(!Network::parse("192.168.1.5")
            .unwrap()
            .contains(ip("192.168.1.6")));
        assert!(Network::parse("fd00::/8").unwrap().contains(ip("fd12::1")));
        assert!(Network::parse("0.0.0.0/0").unwrap().contains(ip("8.8.8.8")));
        for bad in [
            "10.0.0.0/33",
            "fd00::/129",
            "example.com",
            "10.0.0/8",
            "10.0.0.0/x",
            "",
        ] {
            assert!(Network::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn forwarded_for_is_believed_only_from_trusted_proxies() {
        let trusted = [Network::parse("10.0.0.0/8").unwrap()];
        let mut h = http::HeaderMap::new();
        h.insert(
            "x-forwarded-for",
            "1.2.3.4, 203.0.113.7, 10.0.0.2".parse().unwrap(),
        );
        // From an untrusted peer the header is ignored.
        assert_eq!(
            client_address(ip("198.51.100.1"), &h, &trusted),
            ip("198.51.100.1")
        );
        // From the load balancer: the right-most address it did not add itself.
        assert_eq!(
            client_address(ip("10.0.0.9"), &h, &trusted),
            ip("203.0.113.7")
        );
        // Garbage, or nothing but proxies: the peer.
        h.insert("x-forwarded-for", "nonsense".parse().unwrap());
        assert_eq!(client_address(ip("10.0.0.9"), &h, &trusted), ip("10.0.0.9"));
        h.insert("x-forwarded-for", "10.0.0.3".parse().unwrap());
        assert_eq!(client_address(ip("10.0.0.9"), &h, &trusted), ip("10.0.0.9"));
        assert_eq!(
            client_address(ip("10.0.0.9"), &http::HeaderMap::new(), &trusted),
            ip("10.0.0.9")
        );
    }

    #[test]
    fn addresses_are_refused_after_the_limit_until_the_window_ends() {
        let t = Throttle::default();
        let now = Instant::now();
        let a = ip("203.0.113.7");
        for _ in 0..ADDRESS_LIMIT - 1 {
            t.failed(a, None, now);
        }
        assert!(t.address_refused(a, now).is_none());
        t.failed(a, None, now);
        let wait = t.address_refused(a, now + Duration::from_secs(10)).unwrap();
        assert_eq!(wait, Duration::from_secs(50));
        assert!(t.address_refused(ip("203.0.113.8"), now).is_none());
        assert!(t.address_refused(a, now + WINDOW).is_none());
    }

    #[test]
    fn failures_naming_a_caller_are_delayed_past_the_limit() {
        let t = Throttle::default();
        let now = Instant::now();
        for i in 0..NAME_LIMIT {
            // From many addresses: the name's count is its own.
            let addr = IpAddr::from([198, 51, 100, i as u8]);
            assert_eq!(t.failed(addr, Some(3), now), Duration::ZERO);
        }
        assert_eq!(t.failed(ip("198.51.100.200"), Some(3), now), NAME_DELAY);
        assert_eq!(t.failed(ip("198.51.100.200"), Some(4), now), Duration::ZERO);
        assert_eq!(
            t.failed(ip("198.51.100.200"), Some(3), now + WINDOW),
            Duration::ZERO
        );
    }

    #[test]
    fn address_memory_is_bounded() {
        let t = Throttle::default();
        let now = Instant::now();
        for i in 0..(MAX_ADDRESSES as u32 + 10) {
            t.failed(IpAddr::from(i.to_be_bytes()), None, now);
        }
        assert!(t.addresses.lock().unwrap().len() <= MAX_ADDRESSES);
    }
}
