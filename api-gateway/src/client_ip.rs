//! Which address (and scheme) a request comes from, when the gateway may sit behind proxies
//! of its own.
//!
//! The per-IP quota on `/auth/*` and the audit log's `ip` need the client's address. With no
//! trusted proxies configured (the default) that is the TCP peer, and `X-Forwarded-For` is
//! never believed: any client can write one. Behind a load balancer every request would share
//! the balancer's address, so one guesser would lock everybody out of `/auth/*`; listing the
//! balancer in `TRUSTED_PROXIES` makes the gateway read `X-Forwarded-For` from it.
//!
//! The list is read from the right, the end each proxy appends to: starting at the peer,
//! while the address at hand is a trusted proxy, the entry before it names who that proxy
//! spoke to. The first address that is not a trusted proxy is the client. What a client
//! wrote itself sits further left and is never reached, unless every proxy on the way is
//! trusted and passed it on, which is the configuration's promise. An entry that is not an
//! address stops the walk at the proxy that wrote it, so a garbled header cannot make the
//! gateway attribute requests to a chosen address. A client inside a trusted network counts
//! as a proxy, and may then name the address it is counted and logged as; so the list should
//! hold the proxies' own addresses, not a range that clients share with them.

use std::{net::IpAddr, str::FromStr};

use axum::http::HeaderMap;

/// Entries of `X-Forwarded-For` looked at, at most: a hostile header cannot make the walk
/// long (the head size limit bounds it too).
const MAX_HOPS: usize = 32;

/// The per-IP limiter's key for a client at `ip`. An IPv4 client is one address; an IPv6
/// client is its /64, the smallest network a site is given (RFC 6177), since a host can
/// take any address in it (privacy addresses change on their own) and would otherwise get
/// a fresh quota with each one. An IPv4 address written as IPv6 (`::ffff:a.b.c.d`) counts
/// as itself.
pub fn limit_key(ip: Option<IpAddr>) -> String {
    match ip.as_ref().map(IpAddr::to_canonical) {
        Some(IpAddr::V4(v4)) => format!("ip:{v4}"),
        Some(IpAddr::V6(v6)) => {
            let network = std::net::Ipv6Addr::from(v6.to_bits() & !u128::from(u64::MAX));
            format!("ip:{network}/64")
        }
        None => "ip:unknown".to_owned(),
    }
}

/// A network: an address and how many of its leading bits are fixed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Network {
    address: IpAddr,
    prefix: u8,
}

/// Why a `TRUSTED_PROXIES` entry was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not an address or a network (`10.0.0.0/8`, `::1`)")]
pub struct BadNetwork(String);

impl FromStr for Network {
    type Err = BadNetwork;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let bad = || BadNetwork(text.to_owned());
        let (address, prefix) = match text.trim().split_once('/') {
            Some((address, prefix)) => (address, Some(prefix)),
            None => (text.trim(), None),
        };
        let written: IpAddr = address.parse().map_err(|_| bad())?;
        let bits = if written.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => bits,
            Some(prefix) => prefix
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= bits)
                .ok_or_else(bad)?,
        };
        let address = written.to_canonical();
        let prefix = if address.is_ipv4() && written.is_ipv6() {
            // `::ffff:10.0.0.0/104` is `10.0.0.0/8`.
            prefix.checked_sub(96).ok_or_else(bad)?
        } else {
            prefix
        };
        Ok(Self { address, prefix })
    }
}

impl Network {
    /// Whether `ip` is in this network (IPv4-mapped IPv6 addresses count as IPv4).
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.address, ip.to_canonical()) {
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

/// The proxies whose `X-Forwarded-For` the gateway believes.
#[derive(Debug, Clone, Default)]
pub struct TrustedProxies(Vec<Network>);

impl TrustedProxies {
    /// Trusts `networks`; none means the peer is always the client.
    pub fn new(networks: Vec<Network>) -> Self {
        Self(networks)
    }

    fn trusts(&self, ip: IpAddr) -> bool {
        self.0.iter().any(|network| network.contains(ip))
    }

    /// The scheme the client used: `https` when the peer is a trusted proxy whose last
    /// `X-Forwarded-Proto` entry says so (it ended TLS), `http`, the gateway's own, otherwise.
    pub fn scheme(&self, peer: IpAddr, headers: &HeaderMap) -> &'static str {
        let https = self.trusts(peer.to_canonical())
            && headers
                .get_all("x-forwarded-proto")
                .iter()
                .next_back()
                .and_then(|line| line.to_str().ok())
                .and_then(|line| line.rsplit(',').next())
                .is_some_and(|entry| entry.trim().eq_ignore_ascii_case("https"));
        if https { "https" } else { "http" }
    }

    /// The client's address, for a request from `peer` carrying `headers`.
    pub fn client(&self, peer: IpAddr, headers: &HeaderMap) -> IpAddr {
        let peer = peer.to_canonical();
        if !self.trusts(peer) {
            return peer;
        }
        // Every X-Forwarded-For line, as one list, walked from its right end.
        let entries = headers
            .get_all("x-forwarded-for")
            .iter()
            .rev()
            .flat_map(|line| line.to_str().unwrap_or("?").rsplit(','))
            .take(MAX_HOPS);
        let mut client = peer;
        for entry in entries {
            let Ok(ip) = entry.trim().parse::<IpAddr>() else {
                // Not an address: whoever appended it is as far as the list can be followed.
                return client;
            };
            client = ip.to_canonical();
            if !self.trusts(client) {
                return client;
            }
        }
        client
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv6_clients_are_limited_by_their_64_and_ipv4_by_address() {
        let key = |ip: &str| limit_key(Some(ip.parse().unwrap()));
        assert_eq!(key("203.0.113.7"), "ip:203.0.113.7");
        assert_eq!(key("::ffff:203.0.113.7"), "ip:203.0.113.7");
        assert_eq!(key("2001:db8:1:2:aaaa::1"), "ip:2001:db8:1:2::/64");
        assert_eq!(
            key("2001:db8:1:2:ffff:ffff:ffff:ffff"),
            "ip:2001:db8:1:2::/64"
        );
        assert_ne!(key("2001:db8:1:3::1"), key("2001:db8:1:2::1"));
        assert_eq!(key("::1"), "ip:::/64");
        assert_eq!(limit_key(None), "ip:unknown");
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    fn proxies(networks: &[&str]) -> TrustedProxies {
        TrustedProxies::new(networks.iter().map(|n| n.parse().unwrap()).collect())
    }

    fn forwarded(lines: &[&str]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        for line in lines {
            headers.append("x-forwarded-for", line.parse().unwrap());
        }
        headers
    }

    #[test]
    fn only_a_trusted_proxy_can_say_the_client_used_https() {
        let proto = |lines: &[&str]| {
            let mut headers = HeaderMap::new();
            for line in lines {
                headers.append("x-forwarded-proto", line.parse().unwrap());
            }
            headers
        };
        let none = proxies(&[]);
        let lb = proxies(&["10.0.0.5"]);
        assert_eq!(none.scheme(ip("10.0.0.5"), &proto(&["https"])), "http");
        assert_eq!(lb.scheme(ip("192.0.2.1"), &proto(&["https"])), "http");
        assert_eq!(lb.scheme(ip("10.0.0.5"), &proto(&["https"])), "https");
        assert_eq!(lb.scheme(ip("10.0.0.5"), &proto(&["HTTPS "])), "https");
        assert_eq!(
            lb.scheme(ip("::ffff:10.0.0.5"), &proto(&["https"])),
            "https"
        );
        // The proxy's own entry is the last one; what came before it is the client's.
        assert_eq!(lb.scheme(ip("10.0.0.5"), &proto(&["https, http"])), "http");
        assert_eq!(
            lb.scheme(ip("10.0.0.5"), &proto(&["http", "https"])),
            "https"
        );
        assert_eq!(lb.scheme(ip("10.0.0.5"), &proto(&["gopher"])), "http");
        assert_eq!(lb.scheme(ip("10.0.0.5"), &HeaderMap::new()), "http");
    }

    #[test]
    fn networks_parse_and_contain() {
        let net: Network = "10.0.0.0/8".parse().unwrap();
        assert!(net.contains(ip("10.255.0.1")));
        assert!(!net.contains(ip("11.0.0.1")));
        assert!(net.contains(ip("::ffff:10.1.2.3")), "IPv4-mapped");
        let one: Network = "127.0.0.1".parse().unwrap();
        assert!(one.contains(ip("127.0.0.1")) && !one.contains(ip("127.0.0.2")));
        let v6: Network = "fd00::/8".parse().unwrap();
        assert!(v6.contains(ip("fd12::1")) && !v6.contains(ip("fe80::1")));
        assert!(!v6.contains(ip("10.0.0.1")));
        let everything: Network = "0.0.0.0/0".parse().unwrap();
        assert!(everything.contains(ip("203.0.113.9")));
        let mapped: Network = "::ffff:10.0.0.0/104".parse().unwrap();
        assert!(mapped.contains(ip("10.9.9.9")) && !mapped.contains(ip("11.0.0.0")));
        for bad in [
            "",
            "10.0.0.0/33",
            "::/129",
            "10.0.0/8",
            "10.0.0.0/x",
            "host",
            "::ffff:10.0.0.0/95",
        ] {
            assert!(bad.parse::<Network>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn without_trusted_proxies_the_peer_is_the_client() {
        let headers = forwarded(&["203.0.113.9"]);
        assert_eq!(
            TrustedProxies::default().client(ip("127.0.0.1"), &headers),
            ip("127.0.0.1")
        );
        // A trusted list that does not hold the peer: the header is the peer's own claim.
        assert_eq!(
            proxies(&["10.0.0.0/8"]).client(ip("198.51.100.7"), &headers),
            ip("198.51.100.7")
        );
    }

    #[test]
    fn the_first_untrusted_address_from_the_right_is_the_client() {
        let trusted = proxies(&["10.0.0.0/8"]);
        let peer = ip("10.0.0.1");
        assert_eq!(
            trusted.client(peer, &forwarded(&["203.0.113.9"])),
            ip("203.0.113.9")
        );
        // What the client wrote itself, left of what the proxies appended, is never used.
        assert_eq!(
            trusted.client(peer, &forwarded(&["1.1.1.1, 203.0.113.9, 10.0.0.2"])),
            ip("203.0.113.9")
        );
        // Several header lines are one list, in order.
        assert_eq!(
            trusted.client(peer, &forwarded(&["1.1.1.1", "203.0.113.9", "10.0.0.2"])),
            ip("203.0.113.9")
        );
        // Only trusted proxies all the way: the farthest one.
        assert_eq!(
            trusted.client(peer, &forwarded(&["10.0.0.3, 10.0.0.2"])),
            ip("10.0.0.3")
        );
        // No header from a trusted proxy: the proxy itself.
        assert_eq!(trusted.client(peer, &HeaderMap::new()), peer);
        // IPv6 and IPv4-mapped forms.
        assert_eq!(
            trusted.client(ip("::ffff:10.0.0.1"), &forwarded(&["2001:db8::5"])),
            ip("2001:db8::5")
        );
        assert_eq!(
            trusted.client(peer, &forwarded(&["::ffff:203.0.113.9"])),
            ip("203.0.113.9")
        );
    }

    #[test]
    fn a_garbled_list_stops_at_the_proxy_that_wrote_it() {
        let trusted = proxies(&["10.0.0.0/8"]);
        let peer = ip("10.0.0.1");
        for hostile in [
            "203.0.113.9, nonsense",
            "203.0.113.9, 203.0.113.10:80",
            "203.0.113.9,",
            "unknown",
        ] {
            assert_eq!(
                trusted.client(peer, &forwarded(&[hostile])),
                peer,
                "{hostile}"
            );
        }
        assert_eq!(
            trusted.client(peer, &forwarded(&["203.0.113.9, junk, 10.0.0.7"])),
            ip("10.0.0.7")
        );
        // A header that is not even text.
        let mut headers = HeaderMap::new();
        headers.insert(
            "x-forwarded-for",
            axum::http::HeaderValue::from_bytes(b"\xff203.0.113.9").unwrap(),
        );
        assert_eq!(trusted.client(peer, &headers), peer);
        // A very long chain of trusted hops is followed only MAX_HOPS deep.
        let long = vec!["10.0.0.9"; 1_000].join(",");
        let headers = forwarded(&[&format!("203.0.113.9, {long}")]);
        assert_eq!(trusted.client(peer, &headers), ip("10.0.0.9"));
    }
}
