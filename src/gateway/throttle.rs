//! Slowing down repeated authentication failures, by client address and by caller name.
//!
//! * **By address**: an address with [`ADDRESS_LIMIT`] failures within [`WINDOW`] gets
//!   `429 rate_limited` until the window that counted them ends — except for callers that
//!   authenticated successfully from that address within the window (stores behind one shared
//!   address, an SD-WAN exit, are not locked out by one misconfigured or removed neighbour), and
//!   requests identified by a verified client certificate, which cannot be guessed. IPv6
//!   addresses count by their /64 (one subscriber's prefix). Only that address is affected, which
//!   is why the address
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
//! have ended are dropped first, then the oldest tenth), each remembering at most
//! [`MAX_KNOWN_GOOD`] callers that succeeded from it.

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
/// Callers remembered per address as having authenticated from it.
pub const MAX_KNOWN_GOOD: usize = 64;

/// One key's failures in its current window.
#[derive(Debug, Clone, Copy)]
struct Count {
    since: Instant,
    failures: u32,
}

/// One address: its failures, and the callers that succeeded from it, in the current window.
#[derive(Debug, Clone)]
struct Address {
    count: Count,
    good: Vec<usize>,
}

impl Count {
    fn live(&self, now: Instant) -> bool {
        now.saturating_duration_since(self.since) < WINDOW
    }
}

/// Failure counts by address and by caller index.
#[derive(Debug, Default)]
pub struct Throttle {
    addresses: Mutex<HashMap<IpAddr, Address>>,
    names: Mutex<HashMap<usize, Count>>,
}

impl Throttle {
    /// `Some(retry_after)` when `address` is over its limit now. `caller`, once known, is let
    /// through when it authenticated from this address earlier in the window.
    pub fn address_refused(
        &self,
        address: IpAddr,
        caller: Option<usize>,
        now: Instant,
    ) -> Option<Duration> {
        let map = self.addresses.lock().unwrap_or_else(|p| p.into_inner());
        let entry = map.get(&key(address)).filter(|a| a.count.live(now))?;
        if caller.is_some_and(|c| entry.good.contains(&c)) {
            return None;
        }
        (entry.count.failures >= ADDRESS_LIMIT)
            .then(|| WINDOW.saturating_sub(now.saturating_duration_since(entry.count.since)))
    }

    /// Records that `caller` authenticated from `address`.
    pub fn succeeded(&self, address: IpAddr, caller: usize, now: Instant) {
        let mut map = self.addresses.lock().unwrap_or_else(|p| p.into_inner());
        // Only addresses with failures are tracked: a quiet fleet costs nothing here.
        if let Some(entry) = map.get_mut(&key(address)) {
            if !entry.count.live(now) {
                *entry = Address {
                    count: Count {
                        since: now,
                        failures: 0,
                    },
                    good: Vec::new(),
                };
            }
            if !entry.good.contains(&caller) && entry.good.len() < MAX_KNOWN_GOOD {
                entry.good.push(caller);
            }
        }
    }

    /// Records a failure from `address`, naming caller `named` if any; returns how long to
    /// wait before answering it.
    pub fn failed(&self, address: IpAddr, named: Option<usize>, now: Instant) -> Duration {
        {
            let mut map = self.addresses.lock().unwrap_or_else(|p| p.into_inner());
            let address = key(address);
            if map.len() >= MAX_ADDRESSES && !map.contains_key(&address) {
                map.retain(|_, a| a.count.live(now));
                if map.len() >= MAX_ADDRESSES {
                    // The oldest tenth goes; the blocks of recent offenders stay.
                    let mut ages: Vec<Instant> = map.values().map(|a| a.count.since).collect();
                    ages.sort_unstable();
                    let cut = ages[MAX_ADDRESSES / 10];
                    map.retain(|_, a| a.count.since > cut);
                }
            }
            let entry = map.entry(address).or_insert(Address {
                count: Count {
                    since: now,
                    failures: 0,
                },
                good: Vec::new(),
            });
            if !entry.count.live(now) {
                entry.good.clear();
            }
            bump(&mut entry.count, now);
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

/// The key an address counts under: IPv4 as is, IPv6 by its /64.
fn key(ip: IpAddr) -> IpAddr {
    match canonical(ip) {
        IpAddr::V6(v6) => IpAddr::V6((u128::from(v6) & !((1u128 << 64) - 1)).into()),
        v4 => v4,
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
        let Some(ip) = parse_forwarded(entry) else {
            return peer;
        };
        let ip = canonical(ip);
        if !trusted.iter().any(|n| n.contains(ip)) {
            return ip;
        }
    }
    peer
}

/// An `X-Forwarded-For` entry: an address, or (as some load balancers write) `ip:port` or
/// `[v6]:port`.
fn parse_forwarded(entry: &str) -> Option<IpAddr> {
    if let Ok(ip) = entry.parse() {
        return Some(ip);
    }
    if let Some(rest) = entry.strip_prefix('[') {
        return rest.split_once(']')?.0.parse().ok();
    }
    let (ip, port) = entry.rsplit_once(':')?;
    port.parse::<u16>().ok()?;
    ip.parse::<std::net::Ipv4Addr>().ok().map(IpAddr::V4)
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
        assert!(t.address_refused(a, None, now).is_none());
        t.failed(a, None, now);
        let wait = t
            .address_refused(a, None, now + Duration::from_secs(10))
            .unwrap();
        assert_eq!(wait, Duration::from_secs(50));
        assert!(t.address_refused(ip("203.0.113.8"), None, now).is_none());
        assert!(t.address_refused(a, None, now + WINDOW).is_none());
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
    fn known_good_callers_and_ipv6_prefixes() {
        let t = Throttle::default();
        let now = Instant::now();
        let shared = ip("203.0.113.7");
        t.failed(shared, None, now);
        t.succeeded(shared, 5, now);
        for _ in 0..ADDRESS_LIMIT {
            t.failed(shared, None, now);
        }
        // A neighbour that authenticated here earlier passes; anyone else is refused.
        assert!(t.address_refused(shared, Some(5), now).is_none());
        assert!(t.address_refused(shared, Some(6), now).is_some());
        assert!(t.address_refused(shared, None, now).is_some());
        // One /64 is one address.
        for i in 0..ADDRESS_LIMIT {
            t.failed(
                IpAddr::from([0x2001, 0xdb8, 0, 1, 0, 0, 0, i as u16]),
                None,
                now,
            );
        }
        assert!(t
            .address_refused(ip("2001:db8:0:1::ffff"), None, now)
            .is_some());
        assert!(t
            .address_refused(ip("2001:db8:0:2::1"), None, now)
            .is_none());
        // Ports and brackets in X-Forwarded-For.
        assert_eq!(
            parse_forwarded("198.51.100.1:4711"),
            Some(ip("198.51.100.1"))
        );
        assert_eq!(
            parse_forwarded("[2001:db8::1]:443"),
            Some(ip("2001:db8::1"))
        );
        assert_eq!(parse_forwarded("2001:db8::1"), Some(ip("2001:db8::1")));
        assert_eq!(parse_forwarded("nonsense:80"), None);
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
