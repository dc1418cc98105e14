//! `--peer` values: `host:port` (dialled over TCP, the PeerId learnt in the handshake) or a
//! full multiaddr (optionally ending in `/p2p/<PeerId>`, which the handshake must match).

use std::{fmt, net::IpAddr, str::FromStr};

use libp2p::{Multiaddr, PeerId, multiaddr::Protocol};

use super::NetError;

/// Longest `--peer` value accepted.
const MAX_LEN: usize = 512;

/// A bootstrap peer as given on the command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerSpec {
    /// What the operator wrote.
    pub input: String,
    /// Where to dial.
    pub addr: Multiaddr,
    /// The PeerId, when the multiaddr names one.
    pub peer_id: Option<PeerId>,
}

impl fmt::Display for PeerSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.input)
    }
}

impl FromStr for PeerSpec {
    type Err = NetError;

    fn from_str(input: &str) -> Result<Self, NetError> {
        let bad = |reason: &str| NetError::PeerAddress {
            input: input.chars().take(80).collect(),
            reason: reason.to_string(),
        };
        let s = input.trim();
        if s.is_empty() {
            return Err(bad("empty"));
        }
        if s.len() > MAX_LEN {
            return Err(bad("too long"));
        }
        if s.starts_with('/') {
            let mut addr: Multiaddr = s.parse().map_err(|e| bad(&format!("{e}")))?;
            let peer_id = match addr.iter().last() {
                Some(Protocol::P2p(id)) => {
                    addr.pop();
                    Some(id)
                }
                _ => None,
            };
            check_dialable(&addr).map_err(|r| bad(&r))?;
            return Ok(PeerSpec {
                input: s.to_string(),
                addr,
                peer_id,
            });
        }
        let (host, port) = split_host_port(s).map_err(|r| bad(&r))?;
        let port: u16 = port
            .parse()
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| bad("port must be 1 to 65535"))?;
        let mut addr = Multiaddr::empty();
        match host.parse::<IpAddr>() {
            Ok(IpAddr::V4(ip)) => addr.push(Protocol::Ip4(ip)),
            Ok(IpAddr::V6(ip)) => addr.push(Protocol::Ip6(ip)),
            Err(_) => {
                check_dns_name(host).map_err(|r| bad(&r))?;
                addr.push(Protocol::Dns(host.to_string().into()))
            }
        }
        addr.push(Protocol::Tcp(port));
        Ok(PeerSpec {
            input: s.to_string(),
            addr,
            peer_id: None,
        })
    }
}

impl PeerSpec {
    /// Checks a bare host (IP or DNS name), as `--advertise-host` takes.
    pub fn from_str_host(host: &str) -> Result<(), NetError> {
        if host.parse::<IpAddr>().is_ok() {
            return Ok(());
        }
        check_dns_name(host).map_err(|reason| NetError::PeerAddress {
            input: host.chars().take(80).collect(),
            reason,
        })
    }
}

fn split_host_port(s: &str) -> Result<(&str, &str), String> {
    if let Some(rest) = s.strip_prefix('[') {
        let (host, port) = rest
            .split_once("]:")
            .ok_or("IPv6 addresses are written [addr]:port")?;
        return Ok((host, port));
    }
    let (host, port) = s
        .rsplit_once(':')
        .ok_or("expected host:port or a multiaddr starting with /")?;
    if host.contains(':') {
        return Err("IPv6 addresses are written [addr]:port".into());
    }
    if host.is_empty() {
        return Err("host is empty".into());
    }
    Ok((host, port))
}

fn check_dns_name(host: &str) -> Result<(), String> {
    let ok = host.len() <= 253
        && host.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        });
    if ok {
        Ok(())
    } else {
        Err(format!("{host:?} is not an IP address or a DNS name"))
    }
}

/// Checks that a multiaddr names a transport this node speaks (TCP or QUIC v1).
fn check_dialable(addr: &Multiaddr) -> Result<(), String> {
    let mut has_host = false;
    let mut has_transport = false;
    for p in addr.iter() {
        match p {
            Protocol::Ip4(_)
            | Protocol::Ip6(_)
            | Protocol::Dns(_)
            | Protocol::Dns4(_)
            | Protocol::Dns6(_) => has_host = true,
            Protocol::Tcp(port) if port != 0 => has_transport = true,
            Protocol::QuicV1 => has_transport = true,
            Protocol::Tcp(_) | Protocol::Udp(_) => {}
            other => return Err(format!("unsupported protocol {other} in the address")),
        }
    }
    if !has_host || !has_transport {
        return Err("a multiaddr must name a host and /tcp/<port> or /udp/<port>/quic-v1".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_port_forms() {
        let p: PeerSpec = "127.0.0.1:9000".parse().unwrap();
        assert_eq!(p.addr.to_string(), "/ip4/127.0.0.1/tcp/9000");
        assert_eq!(p.peer_id, None);
        let p: PeerSpec = "[::1]:9000".parse().unwrap();
        assert_eq!(p.addr.to_string(), "/ip6/::1/tcp/9000");
        let p: PeerSpec = "boot-1.example.org:9000".parse().unwrap();
        assert_eq!(p.addr.to_string(), "/dns/boot-1.example.org/tcp/9000");
    }

    #[test]
    fn multiaddr_forms() {
        let id = PeerId::random();
        let p: PeerSpec = format!("/ip4/10.0.0.1/udp/9000/quic-v1/p2p/{id}")
            .parse()
            .unwrap();
        assert_eq!(p.peer_id, Some(id));
        assert_eq!(p.addr.to_string(), "/ip4/10.0.0.1/udp/9000/quic-v1");
        let p: PeerSpec = "/dns4/boot.example/tcp/9000".parse().unwrap();
        assert_eq!(p.peer_id, None);
    }

    #[test]
    fn bad_values_are_refused() {
        for bad in [
            "",
            "9000",
            "host",
            "host:0",
            "host:70000",
            "host:x",
            "::1:9000",
            "bad_name!:9000",
            ":9000",
            "/ip4/1.2.3.4",
            "/ip4/1.2.3.4/tcp/0",
            "/ip4/1.2.3.4/udp/9000/webrtc-direct",
            "/garbage",
        ] {
            assert!(bad.parse::<PeerSpec>().is_err(), "{bad:?} accepted");
        }
        let long = format!("{}:9000", "a".repeat(600));
        assert!(long.parse::<PeerSpec>().is_err());
    }
}
