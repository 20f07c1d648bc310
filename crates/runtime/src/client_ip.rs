//! The client's address behind `TRUSTED_PROXY_HOPS` proxies.
//!
//! Each proxy in front appends the address it received the request from to
//! `X-Forwarded-For`. With `hops` trusted proxies, the last `hops` entries were written
//! by them and the `hops`-th from the right is the client as the outermost trusted
//! proxy saw it; everything further left is whatever the client claimed. So every
//! entry counts as a hop, whatever it holds: an entry that is not an address (`unknown`,
//! an obfuscated `_node`, an empty one) is still a proxy's entry, and skipping it
//! would let the client's own claims slide into the trusted position. When the chosen
//! entry is not an address, the client is [`ClientIp::Unknown`], one shared bucket,
//! never one the client chose.
//!
//! Entries may carry a port (`203.0.113.9:4431`, `[2001:db8::1]:443`), as some
//! balancers write them; the port is dropped. With fewer entries than hops, the
//! request did not come through the proxies (a probe from inside the cluster): the TCP
//! peer is the client.

use std::{
    fmt,
    net::{IpAddr, SocketAddr},
};

use axum::http::HeaderMap;

/// Who sent a request, as far as the trusted proxies say.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ClientIp {
    Known(IpAddr),
    /// A trusted proxy wrote something that is not an address.
    Unknown,
}

impl ClientIp {
    /// The client as a subject of per-address limits: an IPv4 address whole, an IPv6
    /// one by its /64, which is what one subscriber (one phone, one home) is given:
    /// rotating addresses inside it does not make a client new.
    #[must_use]
    pub fn subject(self) -> Self {
        match self {
            Self::Known(IpAddr::V6(v6)) => match v6.to_ipv4_mapped() {
                Some(v4) => Self::Known(IpAddr::V4(v4)),
                None => Self::Known(IpAddr::V6((u128::from(v6) & !u128::from(u64::MAX)).into())),
            },
            other => other,
        }
    }
}

impl fmt::Display for ClientIp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Known(ip) => ip.fmt(f),
            Self::Unknown => f.write_str("unknown"),
        }
    }
}

/// The client of a request from `peer` with `headers`, behind `hops` trusted proxies.
pub fn client_ip(headers: &HeaderMap, peer: Option<IpAddr>, hops: usize) -> ClientIp {
    let from_peer = peer.map_or(ClientIp::Unknown, ClientIp::Known);
    if hops == 0 {
        return from_peer;
    }
    let entries: Vec<&[u8]> = headers
        .get_all("x-forwarded-for")
        .iter()
        .flat_map(|value| value.as_bytes().split(|b| *b == b','))
        .collect();
    match entries.iter().rev().nth(hops - 1) {
        Some(entry) => std::str::from_utf8(entry)
            .ok()
            .and_then(parse_entry)
            .map_or(ClientIp::Unknown, ClientIp::Known),
        None => from_peer,
    }
}

/// `1.2.3.4`, `1.2.3.4:80`, `2001:db8::1`, `[2001:db8::1]`, `[2001:db8::1]:443`.
fn parse_entry(entry: &str) -> Option<IpAddr> {
    let entry = entry.trim();
    if let Ok(ip) = entry.parse::<IpAddr>() {
        return Some(ip);
    }
    if let Ok(addr) = entry.parse::<SocketAddr>() {
        return Some(addr.ip());
    }
    entry
        .strip_prefix('[')
        .and_then(|rest| rest.strip_suffix(']'))
        .and_then(|inner| inner.parse().ok())
}

#[cfg(test)]
mod tests {
    use axum::http::HeaderValue;

    use super::*;

    const PEER: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 1));

    fn ip(text: &str) -> ClientIp {
        ClientIp::Known(text.parse().unwrap())
    }

    fn client(xff: &[&str], hops: usize) -> ClientIp {
        let mut headers = HeaderMap::new();
        for value in xff {
            headers.append("x-forwarded-for", HeaderValue::from_str(value).unwrap());
        }
        client_ip(&headers, Some(PEER), hops)
    }

    #[test]
    fn without_proxies_the_peer_is_the_client() {
        assert_eq!(client(&["6.6.6.6"], 0), ClientIp::Known(PEER));
        assert_eq!(client_ip(&HeaderMap::new(), None, 0), ClientIp::Unknown);
    }

    #[test]
    fn the_hops_th_entry_from_the_right_is_the_client() {
        let spoofed = ["6.6.6.6, 203.0.113.7"];
        assert_eq!(client(&spoofed, 1), ip("203.0.113.7"));
        assert_eq!(client(&spoofed, 2), ip("6.6.6.6"));
        // More hops configured than entries: not through the proxies.
        assert_eq!(client(&spoofed, 3), ClientIp::Known(PEER));
        // Several headers are one list, in order.
        assert_eq!(client(&["6.6.6.6", "203.0.113.7"], 1), ip("203.0.113.7"));
        assert_eq!(client(&["6.6.6.6", "203.0.113.7"], 2), ip("6.6.6.6"));
    }

    /// Google's external Application Load Balancer appends two entries, the client and
    /// its own forwarding-rule address (`<claimed>, <client>, <lb>`): the GKE
    /// component's TRUSTED_PROXY_HOPS=2 takes the client, and 1 would take the load
    /// balancer, making every client one rate-limit bucket.
    #[test]
    fn behind_gkes_load_balancer_two_hops_are_the_client() {
        let from_google = ["6.6.6.6, 198.51.100.23, 34.120.1.1"];
        assert_eq!(client(&from_google, 2), ip("198.51.100.23"));
        assert_eq!(client(&from_google, 1), ip("34.120.1.1"));
    }

    #[test]
    fn ports_are_dropped() {
        assert_eq!(client(&["6.6.6.6, 203.0.113.9:4431"], 1), ip("203.0.113.9"));
        assert_eq!(
            client(&["6.6.6.6, [2001:db8::9]:443"], 1),
            ip("2001:db8::9")
        );
        assert_eq!(client(&["6.6.6.6, [2001:db8::9]"], 1), ip("2001:db8::9"));
        assert_eq!(client(&["6.6.6.6,2001:db8::9"], 1), ip("2001:db8::9"));
    }

    #[test]
    fn an_ipv6_client_is_one_subject_per_64() {
        assert_eq!(
            ip("2001:db8:1:2:aaaa::1").subject(),
            ip("2001:db8:1:2:bbbb::ffff").subject()
        );
        assert_eq!(ip("2001:db8:1:2:aaaa::1").subject(), ip("2001:db8:1:2::"));
        assert_ne!(
            ip("2001:db8:1:2::1").subject(),
            ip("2001:db8:1:3::1").subject()
        );
        assert_eq!(ip("::ffff:203.0.113.9").subject(), ip("203.0.113.9"));
        assert_eq!(ip("203.0.113.9").subject(), ip("203.0.113.9"));
        assert_eq!(ClientIp::Unknown.subject(), ClientIp::Unknown);
    }

    #[test]
    fn an_entry_that_is_not_an_address_is_still_a_hop() {
        // The proxy could not tell: the client is unknown, not the spoofed entry.
        assert_eq!(client(&["6.6.6.6, unknown"], 1), ClientIp::Unknown);
        assert_eq!(client(&["6.6.6.6, _hidden"], 1), ClientIp::Unknown);
        assert_eq!(client(&["6.6.6.6, "], 1), ClientIp::Unknown);
        // And it takes its place in the count: two hops reach past it.
        assert_eq!(client(&["6.6.6.6, unknown"], 2), ip("6.6.6.6"));
        assert_eq!(client(&["7.7.7.7, 6.6.6.6:1, unknown"], 2), ip("6.6.6.6"));
        // A header that is not UTF-8 at that position is no address either.
        let mut headers = HeaderMap::new();
        headers.append(
            "x-forwarded-for",
            HeaderValue::from_bytes(b"6.6.6.6, \xff").unwrap(),
        );
        assert_eq!(client_ip(&headers, Some(PEER), 1), ClientIp::Unknown);
    }
}
