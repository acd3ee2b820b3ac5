//! A bundle's `scope.network` made concrete for one run: every host name
//! resolved (by the agent, in the host's network namespace, when the run
//! starts) into the address rules the kernel enforces, and the grants the
//! report shows (each entry with the addresses it allowed).
//!
//! A name that does not resolve refuses the run: running with less network
//! than the bundle was signed for is not this module's decision to make,
//! and running with more is impossible by construction. Resolution is done
//! once: if the name's addresses change during the run, the run keeps the
//! ones it started with.

use std::io;
use std::net::{IpAddr, ToSocketAddrs};

use rollguard_shared::endpoint::{EndpointHost, IpNet, NetworkEndpoint};
use rollguard_shared::report::NetworkGrant;

use super::spec::{NetRule, MAX_NET_RULES};

#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    #[error("scope.network entry {entry}: cannot resolve {name}: {error}")]
    Lookup {
        entry: String,
        name: String,
        error: io::Error,
    },
    #[error("scope.network entry {entry}: {name} resolves to no address")]
    NoAddress { entry: String, name: String },
    #[error("scope.network resolves to more than {MAX_NET_RULES} address rules")]
    TooMany,
}

/// The run's rules and the report's view of them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Resolved {
    /// What the kernel enforces (each rule once).
    pub rules: Vec<NetRule>,
    /// Each entry with its addresses, for the report.
    pub grants: Vec<NetworkGrant>,
    /// Each entry (canonical text) with each rule it yields, for the host
    /// policy's ceiling check ([`crate::policy::HostPolicy::check_network`]).
    pub by_entry: Vec<(String, NetRule)>,
}

/// The system resolver (`getaddrinfo`: `/etc/hosts`, then DNS).
pub fn system_lookup(name: &str, port: u16) -> io::Result<Vec<IpAddr>> {
    Ok((name, port).to_socket_addrs()?.map(|a| a.ip()).collect())
}

/// Resolve `endpoints` with `lookup` (the system resolver in the agent;
/// tests pass their own).
pub fn resolve(
    endpoints: &[NetworkEndpoint],
    lookup: impl Fn(&str, u16) -> io::Result<Vec<IpAddr>>,
) -> Result<Resolved, ResolveError> {
    let mut out = Resolved::default();
    for endpoint in endpoints {
        let entry = endpoint.to_string();
        let mut nets = match &endpoint.host {
            EndpointHost::Net(net) => vec![*net],
            EndpointHost::Name(name) => {
                let addrs =
                    lookup(name.as_str(), endpoint.port).map_err(|error| ResolveError::Lookup {
                        entry: entry.clone(),
                        name: name.to_string(),
                        error,
                    })?;
                addrs.into_iter().map(IpNet::host).collect()
            }
        };
        nets.sort();
        nets.dedup();
        if nets.is_empty() {
            if let EndpointHost::Name(name) = &endpoint.host {
                return Err(ResolveError::NoAddress {
                    entry,
                    name: name.to_string(),
                });
            }
        }
        for net in &nets {
            let rule = NetRule {
                protocol: endpoint.protocol,
                net: *net,
                port: endpoint.port,
            };
            out.by_entry.push((entry.clone(), rule.clone()));
            if !out.rules.contains(&rule) {
                out.rules.push(rule);
            }
        }
        if out.rules.len() > MAX_NET_RULES {
            return Err(ResolveError::TooMany);
        }
        if let EndpointHost::Name(name) = &endpoint.host {
            tracing::info!(%entry, %name, addresses = ?nets.iter().map(|n| n.to_string()).collect::<Vec<_>>(), "resolved a network scope name");
        }
        out.grants.push(NetworkGrant {
            entry,
            addresses: nets.iter().map(|n| n.to_string()).collect(),
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rollguard_shared::endpoint::Protocol;

    fn parse(entries: &[&str]) -> Vec<NetworkEndpoint> {
        entries
            .iter()
            .map(|e| NetworkEndpoint::parse(e).unwrap())
            .collect()
    }

    fn fake(name: &str, _port: u16) -> io::Result<Vec<IpAddr>> {
        match name {
            "mirror.internal" => Ok(vec![
                "10.0.0.7".parse().unwrap(),
                "2001:db8::7".parse().unwrap(),
                "10.0.0.7".parse().unwrap(),
            ]),
            "empty.internal" => Ok(vec![]),
            _ => Err(io::Error::new(io::ErrorKind::NotFound, "no such host")),
        }
    }

    #[test]
    fn names_become_address_rules_and_grants() {
        let r = resolve(
            &parse(&[
                "tcp:mirror.internal:80",
                "udp:10.0.0.0/24:53",
                "127.0.0.1:8080",
            ]),
            fake,
        )
        .unwrap();
        assert_eq!(r.rules.len(), 4);
        assert_eq!(r.rules[0].net.to_string(), "10.0.0.7");
        assert_eq!(r.rules[2].protocol, Protocol::Udp);
        assert_eq!(r.grants[0].entry, "tcp:mirror.internal:80");
        assert_eq!(r.grants[0].addresses, ["10.0.0.7", "2001:db8::7"]);
        assert_eq!(r.grants[1].addresses, ["10.0.0.0/24"]);
    }

    #[test]
    fn unresolvable_names_refuse_the_run() {
        let err = resolve(&parse(&["tcp:nowhere.internal:80"]), fake).unwrap_err();
        assert!(err.to_string().contains("nowhere.internal"), "{err}");
        let err = resolve(&parse(&["tcp:empty.internal:80"]), fake).unwrap_err();
        assert!(matches!(err, ResolveError::NoAddress { .. }), "{err}");
    }
}
