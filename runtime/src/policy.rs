//! The URL policy every snapshotter obeys.
//!
//! - `http` and `https` only; no user info; at most [`MAX_URL`] bytes;
//! - IPv4 literals only in canonical dotted-decimal form (`http://2130706433/`,
//!   `http://0x7f.1/`, `http://0177.0.0.1/` are refused, as are percent-encoded hosts);
//! - the host is resolved and **every** address must be public: loopback, RFC 1918,
//!   link-local (169.254.0.0/16, including the 169.254.169.254 metadata address), CGNAT
//!   100.64.0.0/10, unspecified, broadcast, multicast, documentation, benchmarking and
//!   reserved ranges are refused; for IPv6 only global unicast (2000::/3) is accepted and the
//!   embedded IPv4 of IPv4-mapped (::ffff:0:0/96), NAT64 (64:ff9b::/96) and 6to4 (2002::/16)
//!   addresses is checked too; Teredo, ULA (fc00::/7), link-local (fe80::/10) and
//!   documentation ranges are refused;
//! - callers connect only to the addresses this check returned (no second lookup, so DNS
//!   rebinding cannot swap in another address) and re-check every redirect hop;
//! - optionally, the operator restricts egress to listed hosts.
//!
//! Tests that serve pages on loopback opt in with [`UrlPolicy::allow_loopback_for_tests`];
//! the default refuses loopback.

use std::{
    future::Future,
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    pin::Pin,
    sync::Arc,
};

use url::{Host, Url};

/// Longest URL accepted (the protocol's cap for URLs in snapshot metadata).
pub const MAX_URL: usize = d402_protocol::messages::MAX_URL;

/// Why a URL or address was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    /// Not a URL.
    #[error("invalid URL: {0}")]
    Invalid(String),
    /// Longer than [`MAX_URL`].
    #[error("URL is longer than {MAX_URL} bytes")]
    TooLong,
    /// Not http or https.
    #[error("scheme {0:?} is not allowed (only http and https)")]
    Scheme(String),
    /// `user:pass@` in the URL.
    #[error("URLs with user info are refused")]
    UserInfo,
    /// No host.
    #[error("URL has no host")]
    NoHost,
    /// An IP address written in a non-canonical form (decimal, octal, hex, short) or a
    /// percent-encoded host.
    #[error("host {0:?} is an IP address in a non-canonical spelling")]
    ObfuscatedHost(String),
    /// The address is in a forbidden range.
    #[error("{host} resolves to {addr}, a {range} address")]
    Forbidden {
        /// The host as written.
        host: String,
        /// The refused address.
        addr: IpAddr,
        /// Which range it is in.
        range: &'static str,
    },
    /// The host is not on the operator's egress allowlist.
    #[error("host {0} is not on the operator's egress allowlist")]
    NotAllowlisted(String),
    /// The name did not resolve.
    #[error("DNS lookup of {host} failed: {message}")]
    Dns {
        /// The host.
        host: String,
        /// What the resolver said.
        message: String,
    },
    /// The name resolved to nothing.
    #[error("{0} resolved to no addresses")]
    NoAddresses(String),
}

/// Resolves host names. The default is the system resolver; tests may inject a fixed map
/// (never needed to allow anything: it only decides what a name means).
pub trait Resolver: Send + Sync + 'static {
    /// All addresses of `host`, with `port` set.
    fn lookup(
        &self,
        host: &str,
        port: u16,
    ) -> Pin<Box<dyn Future<Output = io::Result<Vec<SocketAddr>>> + Send + '_>>;
}

/// The operating system's resolver (`getaddrinfo` through tokio).
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemResolver;

impl Resolver for SystemResolver {
    fn lookup(
        &self,
        host: &str,
        port: u16,
    ) -> Pin<Box<dyn Future<Output = io::Result<Vec<SocketAddr>>> + Send + '_>> {
        let host = host.to_string();
        Box::pin(async move { Ok(tokio::net::lookup_host((host, port)).await?.collect()) })
    }
}

/// The URL policy.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct UrlPolicy {
    allow_loopback: bool,
    allowlist: Option<Vec<String>>,
}

/// A URL that passed the policy, with the addresses it may be fetched from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckedUrl {
    /// The parsed URL.
    pub url: Url,
    /// The checked addresses; connect to these and nothing else.
    pub addrs: Vec<SocketAddr>,
}

impl UrlPolicy {
    /// The default: public addresses only.
    pub fn new() -> Self {
        Self::default()
    }

    /// Also allows loopback addresses (127.0.0.0/8, ::1). For tests that serve pages on
    /// loopback; never for production workers.
    pub fn allow_loopback_for_tests() -> Self {
        UrlPolicy {
            allow_loopback: true,
            allowlist: None,
        }
    }

    /// Whether loopback is allowed.
    pub fn allows_loopback(&self) -> bool {
        self.allow_loopback
    }

    /// Restricts egress to these hosts: an entry `example.com` allows exactly that host, an
    /// entry `.example.com` allows its subdomains. Addresses are still checked.
    pub fn with_allowlist(mut self, hosts: Vec<String>) -> Self {
        self.allowlist = Some(
            hosts
                .into_iter()
                .map(|h| h.trim_end_matches('.').to_ascii_lowercase())
                .collect(),
        );
        self
    }

    /// Parses `raw` and applies every check that does not need DNS.
    pub fn parse(&self, raw: &str) -> Result<Url, PolicyError> {
        if raw.len() > MAX_URL {
            return Err(PolicyError::TooLong);
        }
        let url = Url::parse(raw).map_err(|e| PolicyError::Invalid(e.to_string()))?;
        self.check_url(raw, url)
    }

    /// Resolves `location` against `base` (a redirect) and checks the result.
    pub fn parse_redirect(&self, base: &Url, location: &str) -> Result<Url, PolicyError> {
        if location.len() > MAX_URL {
            return Err(PolicyError::TooLong);
        }
        let url = base
            .join(location)
            .map_err(|e| PolicyError::Invalid(e.to_string()))?;
        if url.as_str().len() > MAX_URL {
            return Err(PolicyError::TooLong);
        }
        // The raw spelling of a relative location's host is the base's, already checked.
        let raw = if location.contains("://") || location.starts_with("//") {
            location.to_string()
        } else {
            url.as_str().to_string()
        };
        self.check_url(&raw, url)
    }

    fn check_url(&self, raw: &str, url: Url) -> Result<Url, PolicyError> {
        match url.scheme() {
            "http" | "https" => {}
            other => return Err(PolicyError::Scheme(other.to_string())),
        }
        if !url.username().is_empty() || url.password().is_some() {
            return Err(PolicyError::UserInfo);
        }
        let host = url.host().ok_or(PolicyError::NoHost)?;
        if let Some(raw_host) = raw_host(raw) {
            if raw_host.contains('%') {
                return Err(PolicyError::ObfuscatedHost(raw_host));
            }
            if let Host::Ipv4(v4) = host
                && raw_host.trim_end_matches('.') != v4.to_string()
            {
                return Err(PolicyError::ObfuscatedHost(raw_host));
            }
        }
        let host_str = url.host_str().unwrap_or_default().to_string();
        match host {
            Host::Ipv4(v4) => self.check_ip(&host_str, IpAddr::V4(v4))?,
            Host::Ipv6(v6) => self.check_ip(&host_str, IpAddr::V6(v6))?,
            Host::Domain(_) => {}
        }
        if let Some(list) = &self.allowlist {
            let h = host_str.trim_end_matches('.').to_ascii_lowercase();
            let ok = list.iter().any(|entry| {
                if let Some(suffix) = entry.strip_prefix('.') {
                    h.ends_with(entry.as_str()) || h == suffix
                } else {
                    h == *entry
                }
            });
            if !ok {
                return Err(PolicyError::NotAllowlisted(host_str));
            }
        }
        Ok(url)
    }

    /// Refuses `addr` unless it is a public address (or loopback, when allowed for tests).
    pub fn check_ip(&self, host: &str, addr: IpAddr) -> Result<(), PolicyError> {
        match classify(addr) {
            None => Ok(()),
            Some(Range::Loopback) if self.allow_loopback => Ok(()),
            Some(range) => Err(PolicyError::Forbidden {
                host: host.to_string(),
                addr,
                range: range.name(),
            }),
        }
    }

    /// Parses, resolves and checks: the addresses returned are the only ones to connect to.
    /// Every resolved address must pass, so a name that mixes public and private answers is
    /// refused.
    pub async fn resolve(
        &self,
        raw: &str,
        resolver: &dyn Resolver,
    ) -> Result<CheckedUrl, PolicyError> {
        let url = self.parse(raw)?;
        self.resolve_url(url, resolver).await
    }

    /// As [`UrlPolicy::resolve`] for an already-parsed (and checked) URL.
    pub async fn resolve_url(
        &self,
        url: Url,
        resolver: &dyn Resolver,
    ) -> Result<CheckedUrl, PolicyError> {
        let port = url.port_or_known_default().unwrap_or(80);
        let host_str = url.host_str().unwrap_or_default().to_string();
        let addrs = match url.host() {
            Some(Host::Ipv4(v4)) => vec![SocketAddr::new(IpAddr::V4(v4), port)],
            Some(Host::Ipv6(v6)) => vec![SocketAddr::new(IpAddr::V6(v6), port)],
            Some(Host::Domain(name)) => {
                resolver
                    .lookup(name, port)
                    .await
                    .map_err(|e| PolicyError::Dns {
                        host: host_str.clone(),
                        message: e.to_string(),
                    })?
            }
            None => return Err(PolicyError::NoHost),
        };
        if addrs.is_empty() {
            return Err(PolicyError::NoAddresses(host_str));
        }
        for a in &addrs {
            self.check_ip(&host_str, a.ip())?;
        }
        Ok(CheckedUrl { url, addrs })
    }
}

/// The host as written in `raw` (between `//` and the path, without user info or port).
fn raw_host(raw: &str) -> Option<String> {
    let after = raw.split_once("//")?.1;
    let end = after.find(['/', '?', '#', '\\']).unwrap_or(after.len());
    let authority = &after[..end];
    let hostport = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    if hostport.starts_with('[') {
        return None;
    }
    let host = match hostport.rsplit_once(':') {
        Some((h, port)) if port.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => hostport,
    };
    Some(host.to_ascii_lowercase())
}

/// Forbidden address ranges.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Range {
    /// 127.0.0.0/8, ::1.
    Loopback,
    /// RFC 1918.
    Private,
    /// 169.254.0.0/16 (cloud metadata lives here), fe80::/10.
    LinkLocal,
    /// 100.64.0.0/10.
    Cgnat,
    /// 0.0.0.0/8, ::.
    Unspecified,
    /// 255.255.255.255.
    Broadcast,
    /// 224.0.0.0/4, ff00::/8.
    Multicast,
    /// Documentation ranges.
    Documentation,
    /// 198.18.0.0/15, 2001:2::/48.
    Benchmarking,
    /// fc00::/7.
    UniqueLocal,
    /// Other special-purpose or reserved ranges.
    Reserved,
    /// Teredo (2001::/32), whose embedded IPv4 is obfuscated.
    Teredo,
}

impl Range {
    /// A short name for error messages.
    pub fn name(self) -> &'static str {
        match self {
            Range::Loopback => "loopback",
            Range::Private => "private (RFC 1918)",
            Range::LinkLocal => "link-local",
            Range::Cgnat => "carrier-grade NAT",
            Range::Unspecified => "unspecified",
            Range::Broadcast => "broadcast",
            Range::Multicast => "multicast",
            Range::Documentation => "documentation",
            Range::Benchmarking => "benchmarking",
            Range::UniqueLocal => "unique-local",
            Range::Reserved => "reserved",
            Range::Teredo => "Teredo",
        }
    }
}

fn in_v4(a: Ipv4Addr, net: [u8; 4], bits: u32) -> bool {
    let mask = if bits == 0 {
        0
    } else {
        u32::MAX << (32 - bits)
    };
    u32::from(a) & mask == u32::from(Ipv4Addr::from(net)) & mask
}

fn in_v6(a: Ipv6Addr, net: Ipv6Addr, bits: u32) -> bool {
    let mask = if bits == 0 {
        0
    } else {
        u128::MAX << (128 - bits)
    };
    u128::from(a) & mask == u128::from(net) & mask
}

fn classify_v4(a: Ipv4Addr) -> Option<Range> {
    let table: &[([u8; 4], u32, Range)] = &[
        ([0, 0, 0, 0], 8, Range::Unspecified),
        ([10, 0, 0, 0], 8, Range::Private),
        ([100, 64, 0, 0], 10, Range::Cgnat),
        ([127, 0, 0, 0], 8, Range::Loopback),
        ([169, 254, 0, 0], 16, Range::LinkLocal),
        ([172, 16, 0, 0], 12, Range::Private),
        ([192, 0, 0, 0], 24, Range::Reserved),
        ([192, 0, 2, 0], 24, Range::Documentation),
        ([192, 88, 99, 0], 24, Range::Reserved),
        ([192, 168, 0, 0], 16, Range::Private),
        ([198, 18, 0, 0], 15, Range::Benchmarking),
        ([198, 51, 100, 0], 24, Range::Documentation),
        ([203, 0, 113, 0], 24, Range::Documentation),
        ([224, 0, 0, 0], 4, Range::Multicast),
        ([255, 255, 255, 255], 32, Range::Broadcast),
        ([240, 0, 0, 0], 4, Range::Reserved),
    ];
    table
        .iter()
        .find(|(net, bits, _)| in_v4(a, *net, *bits))
        .map(|(_, _, r)| *r)
}

fn v6(s: &str) -> Ipv6Addr {
    s.parse().unwrap_or(Ipv6Addr::UNSPECIFIED)
}

fn embedded_v4(a: Ipv6Addr, offset_bits: u32) -> Ipv4Addr {
    Ipv4Addr::from((u128::from(a) >> offset_bits) as u32)
}

fn classify_v6(a: Ipv6Addr) -> Option<Range> {
    if a == Ipv6Addr::UNSPECIFIED {
        return Some(Range::Unspecified);
    }
    if a == Ipv6Addr::LOCALHOST {
        return Some(Range::Loopback);
    }
    // Forms that embed an IPv4 address: judge the IPv4 address.
    if in_v6(a, v6("::ffff:0:0"), 96) || in_v6(a, v6("64:ff9b::"), 96) {
        return classify_v4(embedded_v4(a, 0));
    }
    if in_v6(a, v6("2002::"), 16) {
        return classify_v4(embedded_v4(a, 80));
    }
    let table: &[(&str, u32, Range)] = &[
        ("::", 96, Range::Reserved), // deprecated IPv4-compatible
        ("64:ff9b:1::", 48, Range::Reserved),
        ("100::", 64, Range::Reserved),
        ("2001::", 32, Range::Teredo),
        ("2001:2::", 48, Range::Benchmarking),
        ("2001:10::", 28, Range::Reserved),
        ("2001:20::", 28, Range::Reserved),
        ("2001:db8::", 32, Range::Documentation),
        ("3fff::", 20, Range::Documentation),
        ("fc00::", 7, Range::UniqueLocal),
        ("fe80::", 10, Range::LinkLocal),
        ("fec0::", 10, Range::Reserved),
        ("ff00::", 8, Range::Multicast),
    ];
    if let Some((_, _, r)) = table.iter().find(|(net, bits, _)| in_v6(a, v6(net), *bits)) {
        return Some(*r);
    }
    if !in_v6(a, v6("2000::"), 3) {
        return Some(Range::Reserved);
    }
    None
}

/// The forbidden range `addr` is in, or `None` for a public address.
pub fn classify(addr: IpAddr) -> Option<Range> {
    match addr {
        IpAddr::V4(a) => classify_v4(a),
        IpAddr::V6(a) => classify_v6(a),
    }
}

/// A resolver answering from a fixed table (for tests and for pinning names).
#[derive(Debug, Clone, Default)]
pub struct StaticResolver {
    entries: Arc<Vec<(String, Vec<IpAddr>)>>,
}

impl StaticResolver {
    /// A resolver that knows exactly these names.
    pub fn new(entries: Vec<(String, Vec<IpAddr>)>) -> Self {
        StaticResolver {
            entries: Arc::new(entries),
        }
    }
}

impl Resolver for StaticResolver {
    fn lookup(
        &self,
        host: &str,
        port: u16,
    ) -> Pin<Box<dyn Future<Output = io::Result<Vec<SocketAddr>>> + Send + '_>> {
        let found = self
            .entries
            .iter()
            .find(|(h, _)| h.eq_ignore_ascii_case(host.trim_end_matches('.')))
            .map(|(_, ips)| ips.iter().map(|ip| SocketAddr::new(*ip, port)).collect());
        Box::pin(async move {
            found.ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no such host"))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canonical_ipv4_and_names_pass_parse() {
        let p = UrlPolicy::new();
        assert!(p.parse("https://example.com/a?b#c").is_ok());
        assert!(p.parse("http://93.184.215.14:8080/").is_ok());
        assert!(p.parse("http://[2606:4700::1111]/").is_ok());
    }

    #[test]
    fn raw_host_extraction() {
        assert_eq!(
            raw_host("http://a:b@0x7f.1:80/x").as_deref(),
            Some("0x7f.1")
        );
        assert_eq!(
            raw_host("http://EXAMPLE.com?x").as_deref(),
            Some("example.com")
        );
        assert_eq!(raw_host("http://[::1]/"), None);
    }

    #[test]
    fn classify_ranges() {
        let c = |s: &str| classify(s.parse().unwrap());
        assert_eq!(c("8.8.8.8"), None);
        assert_eq!(c("2606:4700::1111"), None);
        assert_eq!(c("::ffff:8.8.8.8"), None);
        assert_eq!(c("64:ff9b::808:808"), None);
        assert_eq!(c("2002:808:808::1"), None);
        assert_eq!(c("172.31.255.255"), Some(Range::Private));
        assert_eq!(c("172.32.0.0"), None);
        assert_eq!(c("100.127.255.255"), Some(Range::Cgnat));
        assert_eq!(c("100.128.0.0"), None);
        assert_eq!(c("2002:a9fe:a9fe::"), Some(Range::LinkLocal));
        assert_eq!(c("::ffff:10.1.2.3"), Some(Range::Private));
        assert_eq!(c("64:ff9b::7f00:1"), Some(Range::Loopback));
    }
}
