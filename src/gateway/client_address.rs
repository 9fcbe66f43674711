//! Which address a request comes from: the TCP peer, or, when the peer is a trusted reverse proxy,
//! the right-most address in the proxy header (`X-Forwarded-For`) that is not itself a trusted
//! proxy. Proxies append the address they received the request from, so everything left of the
//! right-most untrusted hop was written by the client and is never believed.

use std::net::{IpAddr, SocketAddr};

use axum::http::{HeaderMap, HeaderName};

pub use crate::model::network::IpNetwork;
use crate::model::network::canonical;

/// The reverse proxies whose header names the client.
#[derive(Debug, Clone, Default)]
pub struct TrustedProxies {
    header: Option<HeaderName>,
    networks: Vec<IpNetwork>,
}

impl TrustedProxies {
    /// Trust `header` from peers in `networks` (no header, or no networks: the TCP peer always).
    pub fn new(header: Option<HeaderName>, networks: Vec<IpNetwork>) -> Self {
        Self { header, networks }
    }

    fn trusted(&self, ip: IpAddr) -> bool {
        self.networks.iter().any(|n| n.contains(ip))
    }

    /// The client's address: the peer's, unless the peer is a trusted proxy and the header names
    /// hops; then the right-most hop that is not a trusted proxy (all trusted: the left-most). A
    /// hop that is not an address ends the walk at the last good one, so garbage a client wrote
    /// never becomes its address.
    pub fn client_address(&self, peer: IpAddr, headers: &HeaderMap) -> IpAddr {
        let peer = canonical(peer);
        let Some(header) = &self.header else { return peer };
        if !self.trusted(peer) {
            return peer;
        }
        // Several header lines are one list, in order (RFC 9110 §5.3).
        let values = headers.get_all(header).iter().filter_map(|v| v.to_str().ok());
        let hops: Vec<&str> = values.flat_map(|v| v.split(',')).map(str::trim).filter(|h| !h.is_empty()).collect();
        let mut client = peer;
        for hop in hops.iter().rev() {
            let Some(ip) = parse_hop(hop) else { break };
            client = ip;
            if !self.trusted(ip) {
                break;
            }
        }
        client
    }
}

/// One hop: `203.0.113.7`, `203.0.113.7:4711`, `2001:db8::1` or `[2001:db8::1]:4711`.
fn parse_hop(hop: &str) -> Option<IpAddr> {
    if let Ok(ip) = hop.parse::<IpAddr>() {
        return Some(canonical(ip));
    }
    hop.parse::<SocketAddr>().ok().map(|s| canonical(s.ip()))
}

/// The key a client address is counted under: the same source as the TLS listeners count
/// unfinished handshakes under (IPv6 by its /64).
pub use crate::tls::source_of as rate_key;

#[cfg(test)]
mod tests {
    use axum::http::HeaderValue;

    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn net(s: &str) -> IpNetwork {
        s.parse().unwrap()
    }

    #[test]
    fn networks_parse_and_match_by_prefix() {
        assert!(net("10.0.0.0/8").contains(ip("10.200.1.2")));
        assert!(!net("10.0.0.0/8").contains(ip("11.0.0.1")));
        assert!(net("10.0.0.5").contains(ip("10.0.0.5")) && !net("10.0.0.5").contains(ip("10.0.0.6")));
        assert!(net("0.0.0.0/0").contains(ip("192.0.2.1")) && !net("0.0.0.0/0").contains(ip("2001:db8::1")));
        assert!(net("fd00::/8").contains(ip("fd12::1")) && !net("fd00::/8").contains(ip("fe80::1")));
        assert!(net("10.0.0.0/8").contains(ip("::ffff:10.1.2.3")), "v4-mapped counts as v4");
        assert_eq!(net(" 192.0.2.0/24 ").to_string(), "192.0.2.0/24");
        for bad in ["", "10.0.0.0/33", "fd00::/129", "10.0.0/8", "example.com", "10.0.0.0/x"] {
            assert!(bad.parse::<IpNetwork>().is_err(), "{bad:?}");
        }
    }

    fn headers(values: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for v in values {
            h.append("x-forwarded-for", HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn the_right_most_untrusted_hop_is_the_client_and_only_behind_a_trusted_proxy() {
        let proxies = TrustedProxies::new(Some(HeaderName::from_static("x-forwarded-for")), vec![net("10.0.0.0/8")]);
        let proxy = ip("10.0.0.2");
        let client = |values: &[&str]| proxies.client_address(proxy, &headers(values));
        assert_eq!(client(&["203.0.113.7"]), ip("203.0.113.7"));
        // What the client wrote itself (left of the hop our proxy added) is ignored.
        assert_eq!(client(&["1.2.3.4, 203.0.113.7"]), ip("203.0.113.7"));
        // Chains of trusted proxies are walked through; several lines are one list.
        assert_eq!(client(&["198.51.100.1, 203.0.113.7, 10.1.1.1"]), ip("203.0.113.7"));
        assert_eq!(client(&["198.51.100.1", "203.0.113.7", "10.1.1.1"]), ip("203.0.113.7"));
        assert_eq!(client(&["10.9.9.9, 10.1.1.1"]), ip("10.9.9.9"), "all trusted: the left-most");
        // Ports and brackets are accepted; garbage stops the walk at the last good hop.
        assert_eq!(client(&["[2001:db8::7]:4711"]), ip("2001:db8::7"));
        assert_eq!(client(&["203.0.113.7:80"]), ip("203.0.113.7"));
        assert_eq!(client(&["203.0.113.7, not-an-ip, 10.1.1.1"]), ip("10.1.1.1"));
        assert_eq!(client(&[]), proxy, "no header: the proxy itself");
        // From a peer that is not a trusted proxy, the header is not believed.
        assert_eq!(proxies.client_address(ip("192.0.2.9"), &headers(&["203.0.113.7"])), ip("192.0.2.9"));
        // Without a header configured, always the peer.
        let none = TrustedProxies::new(None, vec![net("10.0.0.0/8")]);
        assert_eq!(none.client_address(proxy, &headers(&["203.0.113.7"])), proxy);
    }

    #[test]
    fn ipv6_clients_count_by_their_64() {
        assert_eq!(rate_key(ip("2001:db8:1:2:aaaa::1")), ip("2001:db8:1:2::"));
        assert_eq!(rate_key(ip("2001:db8:1:2:bbbb::9")), rate_key(ip("2001:db8:1:2::1")));
        assert_ne!(rate_key(ip("2001:db8:1:3::1")), rate_key(ip("2001:db8:1:2::1")));
        assert_eq!(rate_key(ip("192.0.2.1")), ip("192.0.2.1"));
        assert_eq!(rate_key(ip("::ffff:192.0.2.1")), ip("192.0.2.1"));
    }
}
