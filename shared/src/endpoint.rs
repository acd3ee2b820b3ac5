//! One `scope.network` entry: protocol, destination (address, CIDR block
//! or host name) and port, parsed once into typed values.
//!
//! ```text
//! entry    = [ protocol ":" ] host ":" port
//! protocol = "tcp" | "udp"                      (absent: tcp)
//! host     = ipv4 [ "/" prefix ]                 10.0.0.5, 10.0.0.0/24
//!          | "[" ipv6 [ "/" prefix ] "]"         [2001:db8::1], [2001:db8::/64]
//!          | name                                mirror.internal
//! port     = 1-65535
//! ```
//!
//! A name is resolved by the agent when a run starts (and the addresses it
//! resolved to are reported); the kernel then filters by address and port.
//! IPv6 addresses must be bracketed: `2001:db8::1:80` has no one reading.
//! A CIDR block must have its host bits clear (`10.0.0.5/24` is refused:
//! it reads like one host but would allow 256).

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The longest DNS name (RFC 1035, without the trailing dot).
const MAX_NAME: usize = 253;

/// Why a `scope.network` entry does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EndpointError {
    #[error("no port: use \"[tcp:|udp:]host:port\"")]
    MissingPort,
    #[error("port {0:?} is not a number from 1 to 65535")]
    BadPort(String),
    #[error("IPv6 addresses must be written in brackets, e.g. \"tcp:[2001:db8::1]:443\"")]
    UnbracketedIpv6,
    #[error("{0:?} is not an IPv6 address or block")]
    BadIpv6(String),
    #[error("{0:?} looks like an IPv4 address but is not one")]
    BadIpv4(String),
    #[error("prefix length {0:?} is invalid for this address family")]
    BadPrefix(String),
    #[error(
        "{0} has bits set beyond its prefix length; write the network address (e.g. 10.0.0.0/24)"
    )]
    HostBitsSet(String),
    #[error("host name {0:?} is invalid: use DNS labels of letters, digits, '-' and '_', at most {MAX_NAME} characters")]
    BadName(String),
}

/// The transport protocol an entry allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An address block: an address with the host bits beyond `prefix` clear.
/// A single host is a block with the full prefix (32 or 128).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct IpNet {
    addr: IpAddr,
    prefix: u8,
}

impl IpNet {
    /// The block of exactly one address.
    pub fn host(addr: IpAddr) -> Self {
        IpNet {
            addr,
            prefix: max_prefix(addr),
        }
    }

    /// `addr/prefix`, refused if `prefix` is too long for the family or
    /// `addr` has host bits set.
    pub fn new(addr: IpAddr, prefix: u8) -> Result<Self, EndpointError> {
        if prefix > max_prefix(addr) {
            return Err(EndpointError::BadPrefix(prefix.to_string()));
        }
        let net = IpNet { addr, prefix };
        if net.masked() != addr {
            return Err(EndpointError::HostBitsSet(format!("{addr}/{prefix}")));
        }
        Ok(net)
    }

    /// `addr` or `addr/prefix`, IPv6 without brackets (the [`Display`]
    /// form).
    ///
    /// [`Display`]: fmt::Display
    pub fn parse(raw: &str) -> Result<Self, EndpointError> {
        let addr = raw.split_once('/').map_or(raw, |(a, _)| a);
        parse_net(raw, addr.contains(':'))
    }

    /// The IPv4-mapped IPv6 block (`::ffff:10.0.0.0/120` for
    /// `10.0.0.0/24`): what an IPv6 socket uses to reach an IPv4 address.
    pub fn to_ipv6_mapped(&self) -> Self {
        match self.addr {
            IpAddr::V4(a) => IpNet {
                addr: IpAddr::V6(a.to_ipv6_mapped()),
                prefix: self.prefix + 96,
            },
            IpAddr::V6(_) => *self,
        }
    }

    pub fn addr(&self) -> IpAddr {
        self.addr
    }

    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    /// The address bytes in network order (4 or 16).
    pub fn octets(&self) -> Vec<u8> {
        match self.addr {
            IpAddr::V4(a) => a.octets().to_vec(),
            IpAddr::V6(a) => a.octets().to_vec(),
        }
    }

    /// The netmask bytes in network order (4 or 16).
    pub fn mask_octets(&self) -> Vec<u8> {
        let len = if self.addr.is_ipv4() { 4 } else { 16 };
        let prefix = usize::from(self.prefix);
        (0..len)
            .map(|i| {
                let bits = prefix.saturating_sub(i * 8).min(8);
                // 8 bits: 0xff; 0 bits: 0x00.
                (0xff_u16 << (8 - bits)) as u8
            })
            .collect()
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        let (a, b) = match (self.addr, ip) {
            (IpAddr::V4(a), IpAddr::V4(b)) => (a.octets().to_vec(), b.octets().to_vec()),
            (IpAddr::V6(a), IpAddr::V6(b)) => (a.octets().to_vec(), b.octets().to_vec()),
            _ => return false,
        };
        let mask = self.mask_octets();
        a.iter()
            .zip(&b)
            .zip(&mask)
            .all(|((x, y), m)| x & m == y & m)
    }

    fn masked(&self) -> IpAddr {
        let bytes: Vec<u8> = self
            .octets()
            .iter()
            .zip(self.mask_octets())
            .map(|(b, m)| b & m)
            .collect();
        match self.addr {
            IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::from(
                <[u8; 4]>::try_from(&bytes[..]).unwrap_or([0; 4]),
            )),
            IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::from(
                <[u8; 16]>::try_from(&bytes[..]).unwrap_or([0; 16]),
            )),
        }
    }

    fn is_host(&self) -> bool {
        self.prefix == max_prefix(self.addr)
    }
}

fn max_prefix(addr: IpAddr) -> u8 {
    if addr.is_ipv4() {
        32
    } else {
        128
    }
}

impl fmt::Display for IpNet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_host() {
            write!(f, "{}", self.addr)
        } else {
            write!(f, "{}/{}", self.addr, self.prefix)
        }
    }
}

impl Serialize for IpNet {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for IpNet {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let raw = String::deserialize(d)?;
        IpNet::parse(&raw).map_err(serde::de::Error::custom)
    }
}

/// A DNS name, lowercased.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct HostName(String);

impl HostName {
    pub fn parse(raw: &str) -> Result<Self, EndpointError> {
        let bad = || EndpointError::BadName(raw.to_string());
        let name = raw.strip_suffix('.').unwrap_or(raw);
        if name.is_empty() || name.len() > MAX_NAME {
            return Err(bad());
        }
        for label in name.split('.') {
            let ok = !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
            if !ok {
                return Err(bad());
            }
        }
        // All digits and dots is an IPv4 address gone wrong (1.2.3, 1.2.3.256),
        // not a name.
        if name.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
            return Err(EndpointError::BadIpv4(raw.to_string()));
        }
        Ok(HostName(name.to_ascii_lowercase()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for HostName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Where an entry allows traffic to.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum EndpointHost {
    /// An address or address block.
    Net(IpNet),
    /// A name the agent resolves when the run starts.
    Name(HostName),
}

impl fmt::Display for EndpointHost {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EndpointHost::Net(net) if net.addr.is_ipv6() => write!(f, "[{net}]"),
            EndpointHost::Net(net) => write!(f, "{net}"),
            EndpointHost::Name(name) => write!(f, "{name}"),
        }
    }
}

/// One allowed destination: protocol, host and port.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct NetworkEndpoint {
    pub protocol: Protocol,
    pub host: EndpointHost,
    pub port: u16,
}

impl NetworkEndpoint {
    pub fn parse(raw: &str) -> Result<Self, EndpointError> {
        let (protocol, rest) = match raw.split_once(':') {
            Some(("tcp", rest)) => (Protocol::Tcp, rest),
            Some(("udp", rest)) => (Protocol::Udp, rest),
            _ => (Protocol::Tcp, raw),
        };
        let (host, port) = rest.rsplit_once(':').ok_or(EndpointError::MissingPort)?;
        let port = parse_port(port)?;
        let host = if let Some(inner) = host.strip_prefix('[') {
            let inner = inner
                .strip_suffix(']')
                .ok_or_else(|| EndpointError::BadIpv6(host.to_string()))?;
            EndpointHost::Net(parse_net(inner, true)?)
        } else if host.contains(':') || host.contains(']') {
            return Err(EndpointError::UnbracketedIpv6);
        } else if host.contains('/') || host.parse::<Ipv4Addr>().is_ok() {
            EndpointHost::Net(parse_net(host, false)?)
        } else {
            EndpointHost::Name(HostName::parse(host)?)
        };
        Ok(NetworkEndpoint {
            protocol,
            host,
            port,
        })
    }
}

fn parse_port(raw: &str) -> Result<u16, EndpointError> {
    let bad = || EndpointError::BadPort(raw.to_string());
    if raw.is_empty() || raw.len() > 5 || !raw.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    match raw.parse::<u16>() {
        Ok(0) | Err(_) => Err(bad()),
        Ok(port) => Ok(port),
    }
}

/// `addr[/prefix]`, IPv6 (inside brackets) or IPv4.
fn parse_net(raw: &str, v6: bool) -> Result<IpNet, EndpointError> {
    let bad_addr = || {
        if v6 {
            EndpointError::BadIpv6(raw.to_string())
        } else {
            EndpointError::BadIpv4(raw.to_string())
        }
    };
    let (addr, prefix) = match raw.split_once('/') {
        Some((a, p)) => (a, Some(p)),
        None => (raw, None),
    };
    let addr: IpAddr = if v6 {
        IpAddr::V6(Ipv6Addr::from_str(addr).map_err(|_| bad_addr())?)
    } else {
        IpAddr::V4(Ipv4Addr::from_str(addr).map_err(|_| bad_addr())?)
    };
    match prefix {
        None => Ok(IpNet::host(addr)),
        Some(p) => {
            let ok = !p.is_empty() && p.len() <= 3 && p.bytes().all(|b| b.is_ascii_digit());
            let prefix: u8 = p
                .parse()
                .ok()
                .filter(|_| ok)
                .ok_or_else(|| EndpointError::BadPrefix(p.to_string()))?;
            IpNet::new(addr, prefix)
        }
    }
}

/// The canonical spelling, which parses back to the same value:
/// `tcp:10.0.0.0/24:443`, `udp:[2001:db8::1]:53`, `tcp:mirror.internal:80`.
impl fmt::Display for NetworkEndpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}", self.protocol, self.host, self.port)
    }
}

impl Serialize for NetworkEndpoint {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> EndpointHost {
        let (a, p) = s.split_once('/').unwrap_or((s, ""));
        let addr: IpAddr = a.parse().unwrap();
        EndpointHost::Net(if p.is_empty() {
            IpNet::host(addr)
        } else {
            IpNet::new(addr, p.parse().unwrap()).unwrap()
        })
    }

    #[test]
    fn every_form_parses() {
        let cases: [(&str, Protocol, EndpointHost, u16, &str); 10] = [
            (
                "tcp:10.0.0.5:443",
                Protocol::Tcp,
                net("10.0.0.5"),
                443,
                "tcp:10.0.0.5:443",
            ),
            (
                "tcp:[2001:db8::1]:443",
                Protocol::Tcp,
                net("2001:db8::1"),
                443,
                "tcp:[2001:db8::1]:443",
            ),
            (
                "tcp:10.0.0.0/24:443",
                Protocol::Tcp,
                net("10.0.0.0/24"),
                443,
                "tcp:10.0.0.0/24:443",
            ),
            (
                "udp:10.0.0.53:53",
                Protocol::Udp,
                net("10.0.0.53"),
                53,
                "udp:10.0.0.53:53",
            ),
            (
                "tcp:mirror.internal:80",
                Protocol::Tcp,
                EndpointHost::Name(HostName("mirror.internal".into())),
                80,
                "tcp:mirror.internal:80",
            ),
            // A bare host:port keeps meaning TCP.
            (
                "127.0.0.1:47011",
                Protocol::Tcp,
                net("127.0.0.1"),
                47011,
                "tcp:127.0.0.1:47011",
            ),
            (
                "Mirror.Example.com.:8080",
                Protocol::Tcp,
                EndpointHost::Name(HostName("mirror.example.com".into())),
                8080,
                "tcp:mirror.example.com:8080",
            ),
            (
                "[::1]:65535",
                Protocol::Tcp,
                net("::1"),
                65535,
                "tcp:[::1]:65535",
            ),
            (
                "udp:[2001:db8::/32]:53",
                Protocol::Udp,
                net("2001:db8::/32"),
                53,
                "udp:[2001:db8::/32]:53",
            ),
            (
                "tcp:0.0.0.0/0:443",
                Protocol::Tcp,
                net("0.0.0.0/0"),
                443,
                "tcp:0.0.0.0/0:443",
            ),
        ];
        for (raw, protocol, host, port, canonical) in cases {
            let e = NetworkEndpoint::parse(raw).unwrap_or_else(|e| panic!("{raw}: {e}"));
            assert_eq!(e.protocol, protocol, "{raw}");
            assert_eq!(e.host, host, "{raw}");
            assert_eq!(e.port, port, "{raw}");
            assert_eq!(e.to_string(), canonical, "{raw}");
            assert_eq!(
                NetworkEndpoint::parse(canonical).unwrap(),
                e,
                "{raw} round trip"
            );
            assert_eq!(
                serde_json::to_value(&e).unwrap(),
                serde_json::Value::String(canonical.into())
            );
        }
    }

    #[test]
    fn every_malformed_form_is_refused() {
        use EndpointError::*;
        type Expect = fn(&EndpointError) -> bool;
        let cases: &[(&str, Expect)] = &[
            ("", |e| matches!(e, MissingPort)),
            ("example.com", |e| matches!(e, MissingPort)),
            ("tcp:example.com", |e| matches!(e, MissingPort)),
            ("udp:53", |e| matches!(e, MissingPort)),
            ("example.com:0", |e| matches!(e, BadPort(_))),
            ("example.com:70000", |e| matches!(e, BadPort(_))),
            ("example.com:+80", |e| matches!(e, BadPort(_))),
            ("example.com:", |e| matches!(e, BadPort(_))),
            ("example.com:http", |e| matches!(e, BadPort(_))),
            ("example.com:000443", |e| matches!(e, BadPort(_))),
            ("icmp:10.0.0.1:1", |e| matches!(e, UnbracketedIpv6)),
            ("sctp:10.0.0.1:1", |e| matches!(e, UnbracketedIpv6)),
            ("TCP:10.0.0.1:1", |e| matches!(e, UnbracketedIpv6)),
            ("2001:db8::1:443", |e| matches!(e, UnbracketedIpv6)),
            ("tcp:2001:db8::1:443", |e| matches!(e, UnbracketedIpv6)),
            ("[2001:db8::1:443", |e| matches!(e, BadIpv6(_))),
            ("[10.0.0.1]:443", |e| matches!(e, BadIpv6(_))),
            ("[mirror]:443", |e| matches!(e, BadIpv6(_))),
            ("[]:443", |e| matches!(e, BadIpv6(_))),
            ("10.0.0.256:443", |e| matches!(e, BadIpv4(_))),
            ("10.0.0:443", |e| matches!(e, BadIpv4(_))),
            ("10.0.0.0/33:443", |e| matches!(e, BadPrefix(_))),
            ("10.0.0.0/:443", |e| matches!(e, BadPrefix(_))),
            ("10.0.0.0/+8:443", |e| matches!(e, BadPrefix(_))),
            ("[2001:db8::/129]:443", |e| matches!(e, BadPrefix(_))),
            ("10.0.0.5/24:443", |e| matches!(e, HostBitsSet(_))),
            ("[2001:db8::1/64]:443", |e| matches!(e, HostBitsSet(_))),
            ("mirror/24:443", |e| matches!(e, BadIpv4(_))),
            ("-bad.example:443", |e| matches!(e, BadName(_))),
            ("a..b:443", |e| matches!(e, BadName(_))),
            ("bad name:443", |e| matches!(e, BadName(_))),
            ("tcp::443", |e| matches!(e, BadName(_))),
            (":443", |e| matches!(e, BadName(_))),
        ];
        for (raw, expected) in cases {
            let err = NetworkEndpoint::parse(raw).expect_err(raw);
            assert!(expected(&err), "{raw}: unexpected error {err:?}");
        }
        let long = format!("{}.example:443", "a".repeat(250));
        assert!(matches!(
            NetworkEndpoint::parse(&long),
            Err(EndpointError::BadName(_))
        ));
        let label = format!("{}.example:443", "a".repeat(64));
        assert!(matches!(
            NetworkEndpoint::parse(&label),
            Err(EndpointError::BadName(_))
        ));
    }

    #[test]
    fn blocks_contain_their_addresses() {
        let n = IpNet::new("10.0.0.0".parse().unwrap(), 24).unwrap();
        assert!(n.contains("10.0.0.200".parse().unwrap()));
        assert!(!n.contains("10.0.1.1".parse().unwrap()));
        assert!(!n.contains("::1".parse().unwrap()));
        assert_eq!(n.mask_octets(), vec![255, 255, 255, 0]);
        let n = IpNet::new("2001:db8::".parse().unwrap(), 33).unwrap();
        assert_eq!(&n.mask_octets()[..6], &[255, 255, 255, 255, 0x80, 0]);
        assert_eq!(IpNet::host("::1".parse().unwrap()).prefix(), 128);
        let mapped = IpNet::parse("10.0.0.0/24").unwrap().to_ipv6_mapped();
        assert_eq!(mapped.to_string(), "::ffff:10.0.0.0/120");
        for text in ["10.0.0.0/24", "127.0.0.1", "2001:db8::/32", "::1"] {
            let net = IpNet::parse(text).unwrap();
            assert_eq!(net.to_string(), text);
            let json = serde_json::to_string(&net).unwrap();
            assert_eq!(serde_json::from_str::<IpNet>(&json).unwrap(), net);
        }
        assert!(serde_json::from_str::<IpNet>("\"10.0.0.1/24\"").is_err());
        assert!(IpNet::parse("[::1]").is_err());
    }
}
