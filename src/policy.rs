//! The administrator's policy: which hosts a TasklistConnection may send requests (and
//! the credentials it reads) to, whether plain `http://` and `insecureSkipVerify` are
//! allowed, and the cap on the probe body.
//!
//! The decisions are pure functions of the URL and of the addresses its host resolved to.
//! They are made twice: before a reconcile sends anything (so that a violation becomes the
//! condition reason `NotAllowed` and no request leaves the operator), and again at connect
//! time by [`PolicyResolver`], the HTTP client's DNS resolver, so that a name that resolves
//! to an allowed address at the check and to a denied one a moment later (DNS rebinding)
//! is still refused.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::crd::TasklistConnection;
use crate::machinery::bounded::{Capacity, prune};
use crate::machinery::lock::lock;

/// The largest probe body sent, in bytes (the CRD also caps it at 4096 characters).
pub const MAX_PROBE_BODY_BYTES: usize = 4096;

/// The operator's flags that make up the policy. Every default is the safe setting: an
/// administrator lifts a rule with its flag, a tenant never can.
#[derive(Debug, Clone, clap::Args)]
pub struct PolicyArgs {
    /// Hosts that `url` and `tokenUrl` may name, comma separated: exact names
    /// (`tasklist.example.com`), name suffixes (`*.camunda.io`) and CIDRs (`10.0.0.0/8`).
    /// A host name also passes when every address it resolves to is in a listed CIDR.
    /// Empty: any host.
    #[arg(long, value_delimiter = ',', value_name = "PATTERNS")]
    pub allowed_hosts: Vec<String>,
    /// Refuse link-local addresses (169.254.0.0/16, fe80::/10) and the other cloud metadata
    /// addresses (fd00:ec2::254, 100.100.100.200), whatever `--allowed-hosts` says.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set, value_name = "BOOL")]
    pub deny_link_local: bool,
    /// Allow loopback (127.0.0.0/8, ::1) and unspecified (0.0.0.0/8, ::) addresses: the
    /// operator's own Pod. For local tests only.
    #[arg(long, default_value_t = false, action = clap::ArgAction::Set, value_name = "BOOL")]
    pub allow_loopback: bool,
    /// Allow the Kubernetes API server's own address and port (the operator would send it
    /// credentials and report its answers).
    #[arg(long, default_value_t = false, action = clap::ArgAction::Set, value_name = "BOOL")]
    pub allow_api_server: bool,
    /// Allow `tls.insecureSkipVerify: true`.
    #[arg(long, default_value_t = false, action = clap::ArgAction::Set, value_name = "BOOL")]
    pub allow_insecure_tls: bool,
    /// Allow `http://` URLs (credentials then travel unencrypted).
    #[arg(long, default_value_t = false, action = clap::ArgAction::Set, value_name = "BOOL")]
    pub allow_http: bool,
}

impl Default for PolicyArgs {
    fn default() -> Self {
        PolicyArgs {
            allowed_hosts: Vec::new(),
            deny_link_local: true,
            allow_loopback: false,
            allow_api_server: false,
            allow_insecure_tls: false,
            allow_http: false,
        }
    }
}

/// An IP network: an address and a prefix length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Network {
    address: IpAddr,
    prefix: u8,
}

impl Network {
    /// Parses `10.0.0.0/8`, `fd00::/8`, or a single address (a /32 or /128).
    pub fn parse(text: &str) -> Result<Network, String> {
        let (address, prefix) = match text.split_once('/') {
            Some((address, prefix)) => (address, Some(prefix)),
            None => (text, None),
        };
        let address: IpAddr = address.parse().map_err(|_| format!("{text:?} is not an IP address or CIDR"))?;
        let longest = if address.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            Some(prefix) => prefix
                .parse::<u8>()
                .ok()
                .filter(|prefix| *prefix <= longest)
                .ok_or_else(|| format!("{text:?} has an invalid prefix length (0 to {longest})"))?,
            None => longest,
        };
        Ok(Network { address, prefix })
    }

    pub fn contains(&self, address: IpAddr) -> bool {
        match (self.address, canonical(address)) {
            (IpAddr::V4(network), IpAddr::V4(address)) => prefix_matches(&network.octets(), &address.octets(), self.prefix),
            (IpAddr::V6(network), IpAddr::V6(address)) => prefix_matches(&network.octets(), &address.octets(), self.prefix),
            _ => false,
        }
    }
}

impl std::fmt::Display for Network {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.address, self.prefix)
    }
}

/// An IPv4 address written as IPv6 (`::ffff:169.254.169.254`) is checked as the IPv4
/// address it is, so that it cannot slip past an IPv4 CIDR.
fn canonical(address: IpAddr) -> IpAddr {
    match address {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(address, IpAddr::V4),
        v4 => v4,
    }
}

fn prefix_matches(network: &[u8], address: &[u8], prefix: u8) -> bool {
    let full_bytes = usize::from(prefix / 8);
    let rest_bits = prefix % 8;
    if network[..full_bytes] != address[..full_bytes] {
        return false;
    }
    if rest_bits == 0 {
        return true;
    }
    let mask = 0xffu8 << (8 - rest_bits);
    network[full_bytes] & mask == address[full_bytes] & mask
}

/// A network refused whatever `--allowed-hosts` says, and why (with the flag that lifts it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct DeniedNetwork {
    network: Network,
    why: &'static str,
}

fn denied(address: IpAddr, prefix: u8, why: &'static str) -> DeniedNetwork {
    DeniedNetwork {
        network: Network { address, prefix },
        why,
    }
}

const METADATA: &str = "link-local or cloud metadata, where instance credentials are served; --deny-link-local=false lifts this";
const LOOPBACK: &str = "loopback or unspecified, the operator's own Pod; --allow-loopback lifts this";

/// Where cloud metadata services answer: link-local (169.254.169.254 on most clouds, also
/// fe80::/10), AWS's IPv6 address fd00:ec2::254 and Alibaba Cloud's 100.100.100.200.
fn metadata_networks() -> [DeniedNetwork; 4] {
    [
        denied(IpAddr::V4(Ipv4Addr::new(169, 254, 0, 0)), 16, METADATA),
        denied(IpAddr::V6(Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 0)), 10, METADATA),
        denied(IpAddr::V6(Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254)), 128, METADATA),
        denied(IpAddr::V4(Ipv4Addr::new(100, 100, 100, 200)), 32, METADATA),
    ]
}

/// The operator's own Pod: loopback, and the unspecified addresses, which Linux connects
/// to the local host too (`http://0.0.0.0:8080`).
fn loopback_networks() -> [DeniedNetwork; 4] {
    [
        denied(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 0)), 8, LOOPBACK),
        denied(IpAddr::V6(Ipv6Addr::LOCALHOST), 128, LOOPBACK),
        denied(IpAddr::V4(Ipv4Addr::new(0, 0, 0, 0)), 8, LOOPBACK),
        denied(IpAddr::V6(Ipv6Addr::UNSPECIFIED), 128, LOOPBACK),
    ]
}

/// One entry of `--allowed-hosts`.
#[derive(Debug, Clone, PartialEq, Eq)]
enum HostPattern {
    /// `tasklist.example.com`: exactly this name.
    Name(String),
    /// `*.camunda.io`: any name ending in `.camunda.io` (not `camunda.io` itself).
    Suffix(String),
    /// `10.0.0.0/8`: literal addresses in it, and names that resolve only into it.
    Network(Network),
}

impl HostPattern {
    fn parse(text: &str) -> Result<HostPattern, String> {
        let text = text.trim().to_ascii_lowercase();
        if let Some(suffix) = text.strip_prefix("*.") {
            if suffix.is_empty() || suffix.contains('*') {
                return Err(format!("{text:?} is not a valid host pattern"));
            }
            return Ok(HostPattern::Suffix(format!(".{suffix}")));
        }
        let unbracketed = text.trim_start_matches('[').trim_end_matches(']');
        if text.contains('/') || unbracketed.parse::<IpAddr>().is_ok() {
            return Network::parse(unbracketed).map(HostPattern::Network);
        }
        if text.is_empty() || text.contains('*') || text.contains(':') || text.contains(char::is_whitespace) {
            return Err(format!("{text:?} is not a valid host pattern"));
        }
        Ok(HostPattern::Name(text.trim_end_matches('.').to_owned()))
    }

    fn matches_name(&self, name: &str) -> bool {
        match self {
            HostPattern::Name(exact) => name == exact,
            HostPattern::Suffix(suffix) => name.ends_with(suffix.as_str()),
            HostPattern::Network(_) => false,
        }
    }
}

/// What the policy says about one URL before anything is resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UrlVerdict {
    /// Allowed; no resolution needed.
    Allowed,
    /// A host name: allowed if each address it resolves to passes [`HostPolicy::address_allowed`].
    Resolve { host: String, port: u16, name_listed: bool },
    /// Not allowed, with the reason in words.
    NotAllowed(String),
}

/// The policy, as parsed from the flags.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostPolicy {
    /// Empty: any host.
    allowed: Vec<HostPattern>,
    denied: Vec<DeniedNetwork>,
    /// The API server's own addresses and ports (refused unless `--allow-api-server`).
    api_server: Vec<SocketAddr>,
    allow_http: bool,
    allow_insecure_tls: bool,
}

impl Default for HostPolicy {
    fn default() -> Self {
        HostPolicy {
            allowed: Vec::new(),
            denied: metadata_networks().into_iter().chain(loopback_networks()).collect(),
            api_server: Vec::new(),
            allow_http: false,
            allow_insecure_tls: false,
        }
    }
}

impl HostPolicy {
    pub fn from_args(args: &PolicyArgs) -> Result<HostPolicy, String> {
        let allowed = args
            .allowed_hosts
            .iter()
            .filter(|pattern| !pattern.trim().is_empty())
            .map(|pattern| HostPattern::parse(pattern))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|error| format!("--allowed-hosts: {error}"))?;
        let mut denied = Vec::new();
        if args.deny_link_local {
            denied.extend(metadata_networks());
        }
        if !args.allow_loopback {
            denied.extend(loopback_networks());
        }
        Ok(HostPolicy {
            allowed,
            denied,
            api_server: Vec::new(),
            allow_http: args.allow_http,
            allow_insecure_tls: args.allow_insecure_tls,
        })
    }

    /// The policy refusing, as well, the API server at `addresses` (the address and port the
    /// operator's own client uses, resolved), unless `--allow-api-server` was given.
    pub fn refusing_api_server(mut self, args: &PolicyArgs, addresses: Vec<SocketAddr>) -> HostPolicy {
        if !args.allow_api_server {
            self.api_server = addresses
                .into_iter()
                .map(|a| SocketAddr::new(canonical(a.ip()), a.port()))
                .collect();
        }
        self
    }

    /// A one-line summary for the log at start.
    pub fn describe(&self) -> String {
        let hosts = if self.allowed.is_empty() {
            "any host".to_owned()
        } else {
            let patterns: Vec<String> = self
                .allowed
                .iter()
                .map(|pattern| match pattern {
                    HostPattern::Name(name) => name.clone(),
                    HostPattern::Suffix(suffix) => format!("*{suffix}"),
                    HostPattern::Network(network) => network.to_string(),
                })
                .collect();
            patterns.join(",")
        };
        let denied: Vec<String> = self
            .denied
            .iter()
            .map(|denied| denied.network.to_string())
            .chain(self.api_server.iter().map(|address| format!("{address} (the API server)")))
            .collect();
        format!(
            "allowed hosts: {hosts}; denied: {}; http: {}; insecureSkipVerify: {}",
            if denied.is_empty() { "none".to_owned() } else { denied.join(",") },
            if self.allow_http { "allowed" } else { "forbidden" },
            if self.allow_insecure_tls { "allowed" } else { "forbidden" },
        )
    }

    /// What the policy says about `url` (named `field` in messages), from the URL alone.
    pub fn check_url(&self, field: &str, url: &str) -> UrlVerdict {
        let Ok(parsed) = reqwest::Url::parse(url) else {
            return UrlVerdict::NotAllowed(format!("{field} is not a valid URL"));
        };
        match parsed.scheme() {
            "https" => {}
            "http" if self.allow_http => {}
            "http" => {
                return UrlVerdict::NotAllowed(format!(
                    "{field} uses http://, which this operator does not allow (--allow-http=false); use https://"
                ));
            }
            other => return UrlVerdict::NotAllowed(format!("{field} uses the scheme {other:?}; only https and http are allowed")),
        }
        if !parsed.username().is_empty() || parsed.password().is_some() {
            return UrlVerdict::NotAllowed(format!(
                "{field} holds a username or password (user:password@host); put credentials in the Secret that auth references"
            ));
        }
        let port = parsed.port_or_known_default().unwrap_or(443);
        let Some(host) = parsed.host_str() else {
            return UrlVerdict::NotAllowed(format!("{field} has no host"));
        };
        // IPv6 literals come bracketed: `[fe80::1]`.
        let address = match host.trim_start_matches('[').trim_end_matches(']').parse::<IpAddr>() {
            Ok(address) => address,
            Err(_) => {
                let name = host.trim_end_matches('.').to_ascii_lowercase();
                let name_listed = self.allowed.iter().any(|pattern| pattern.matches_name(&name));
                let any_network = self.allowed.iter().any(|p| matches!(p, HostPattern::Network(_)));
                if !self.allowed.is_empty() && !name_listed && !any_network {
                    return UrlVerdict::NotAllowed(format!(
                        "{field} names the host {name:?}, which is not in the operator's allowed hosts"
                    ));
                }
                if self.denied.is_empty() && self.api_server.is_empty() && (self.allowed.is_empty() || name_listed) {
                    return UrlVerdict::Allowed;
                }
                return UrlVerdict::Resolve {
                    host: name,
                    port,
                    name_listed: name_listed || self.allowed.is_empty(),
                };
            }
        };
        match self.endpoint_allowed(false, SocketAddr::new(address, port)) {
            Ok(()) => UrlVerdict::Allowed,
            Err(why) => UrlVerdict::NotAllowed(format!("{field}: {why}")),
        }
    }

    /// [`HostPolicy::address_allowed`], and not the API server's own address and port.
    fn endpoint_allowed(&self, name_listed: bool, endpoint: SocketAddr) -> Result<(), String> {
        self.address_allowed(name_listed, endpoint.ip())?;
        let endpoint = SocketAddr::new(canonical(endpoint.ip()), endpoint.port());
        if self.api_server.contains(&endpoint) {
            return Err(format!(
                "{endpoint} is the Kubernetes API server's own address; --allow-api-server lifts this"
            ));
        }
        Ok(())
    }

    /// Whether a request may go to `address`. `name_listed`: the address came from
    /// resolving a host name that `--allowed-hosts` lists by name (or the list is empty), so
    /// only the denied networks apply to it.
    pub fn address_allowed(&self, name_listed: bool, address: IpAddr) -> Result<(), String> {
        let address = canonical(address);
        if let Some(denied) = self.denied.iter().find(|denied| denied.network.contains(address)) {
            return Err(format!(
                "the address {address} is in the denied network {} ({})",
                denied.network, denied.why
            ));
        }

        if name_listed || self.allowed.is_empty() {
            return Ok(());
        }
        let in_allowed_network = self
            .allowed
            .iter()
            .any(|pattern| matches!(pattern, HostPattern::Network(network) if network.contains(address)));
        if in_allowed_network {
            Ok(())
        } else {
            Err(format!("the address {address} is not in the operator's allowed hosts"))
        }
    }

    /// [`HostPolicy::address_allowed`] at connect time, where the port is not known (the
    /// HTTP client's resolver sees names only): an API server address is refused on every
    /// port, unless it is loopback, where local tests run other servers beside it.
    fn resolved_address_allowed(&self, name_listed: bool, address: IpAddr) -> Result<(), String> {
        self.address_allowed(name_listed, address)?;
        let address = canonical(address);
        if !address.is_loopback() && self.api_server.iter().any(|endpoint| endpoint.ip() == address) {
            return Err(format!(
                "the address {address} is the Kubernetes API server's own; --allow-api-server lifts this"
            ));
        }
        Ok(())
    }

    /// Whether a host name is listed by name (or any host is allowed), for the resolver.
    fn name_listed(&self, name: &str) -> bool {
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        self.allowed.is_empty() || self.allowed.iter().any(|pattern| pattern.matches_name(&name))
    }

    /// Everything that can be decided from the connection's spec alone: the URLs' schemes
    /// and hosts, `insecureSkipVerify` and the probe body. Returns the host names still to
    /// resolve, or the first violation.
    pub fn check_spec(&self, connection: &TasklistConnection) -> Result<Vec<UrlVerdict>, String> {
        let spec = &connection.spec;
        if !self.allow_insecure_tls && spec.tls.as_ref().is_some_and(|tls| tls.insecure_skip_verify) {
            return Err(
                "tls.insecureSkipVerify is true, which this operator does not allow (--allow-insecure-tls=false); trust the server's CA with tls.caSecretRef instead"
                    .to_owned(),
            );
        }
        if spec.probe.enabled && spec.probe.body.len() > MAX_PROBE_BODY_BYTES {
            return Err(format!(
                "probe.body is {} bytes; at most {MAX_PROBE_BODY_BYTES} are sent",
                spec.probe.body.len()
            ));
        }
        let mut urls = vec![("url", spec.url.as_str())];
        if let Some(oauth2) = &spec.auth.oauth2 {
            if let Some(token_url) = &oauth2.token_url {
                urls.push(("auth.oauth2.tokenUrl", token_url.as_str()));
            }
            if let Some(issuer_url) = &oauth2.issuer_url {
                urls.push(("auth.oauth2.issuerUrl", issuer_url.as_str()));
            }
        }
        let mut to_resolve = Vec::new();
        for (field, url) in urls {
            match self.check_url(field, url) {
                UrlVerdict::Allowed => {}
                UrlVerdict::NotAllowed(why) => return Err(why),
                resolve @ UrlVerdict::Resolve { .. } => to_resolve.push(resolve),
            }
        }
        Ok(to_resolve)
    }

    /// [`HostPolicy::check_spec`], then each host name resolved and every address it
    /// resolves to checked. A name that does not resolve passes here: the request then
    /// fails to connect, which is reported as such.
    pub async fn check_connection(&self, connection: &TasklistConnection) -> Result<(), String> {
        for verdict in self.check_spec(connection)? {
            self.check_resolved(verdict).await?;
        }
        Ok(())
    }

    /// One URL the connection did not name itself (the token endpoint an issuer's
    /// discovery document names), checked like the connection's own: scheme, host, and
    /// every address a host name resolves to. A literal IP address is never resolved, so
    /// the HTTP client's resolver would not see it: this check is the one that counts.
    pub async fn check_url_resolved(&self, field: &str, url: &str) -> Result<(), String> {
        self.check_resolved(self.check_url(field, url)).await
    }

    /// As [`HostPolicy::check_connection`], but a host name resolved less than the cache's
    /// time to live ago is not resolved again: a reconcile of a connection at rest makes no
    /// DNS lookup per connection. The HTTP client's resolver still checks every connect.
    pub async fn check_connection_cached(&self, connection: &TasklistConnection, cache: &ResolutionCache) -> Result<(), String> {
        for verdict in self.check_spec(connection)? {
            let UrlVerdict::Resolve { host, port, name_listed } = &verdict else {
                self.check_resolved(verdict).await?;
                continue;
            };
            let key = (host.clone(), *port, *name_listed);
            let answer = match cache.answer(&key, Instant::now()) {
                Some(answer) => answer,
                None => {
                    let answer = self.check_resolved(verdict).await;
                    cache.remember(key, Instant::now(), answer.clone());
                    answer
                }
            };
            answer?;
        }
        Ok(())
    }

    async fn check_resolved(&self, verdict: UrlVerdict) -> Result<(), String> {
        let (host, port, name_listed) = match verdict {
            UrlVerdict::Allowed => return Ok(()),
            UrlVerdict::NotAllowed(why) => return Err(why),
            UrlVerdict::Resolve { host, port, name_listed } => (host, port, name_listed),
        };
        let Ok(addresses) = tokio::net::lookup_host((host.as_str(), port)).await else {
            return Ok(());
        };
        for address in addresses {
            self.endpoint_allowed(name_listed, address)
                .map_err(|why| format!("the host {host:?} resolves to an address that is not allowed: {why}"))?;
        }
        Ok(())
    }
}

/// How long the pre-check's answer for a host name is reused.
pub const RESOLUTION_TTL: Duration = Duration::from_secs(30);
/// Above this many hosts, answers past their time to live are dropped when one is added.
const RESOLUTION_CACHE_PRUNE_ABOVE: usize = 1024;

/// Host name, port, and whether the name is listed in `--allowed-hosts`.
type ResolutionKey = (String, u16, bool);
/// When the pre-check looked the host up, and its answer.
type ResolutionAnswer = (Instant, Result<(), String>);

/// The pre-check's answers per host name, for [`RESOLUTION_TTL`]: connections that share a
/// host share one lookup, and a connection at rest reuses it.
#[derive(Debug, Default)]
pub struct ResolutionCache {
    answers: Mutex<HashMap<ResolutionKey, ResolutionAnswer>>,
}

impl ResolutionCache {
    /// The answer for `key` if it is younger than [`RESOLUTION_TTL`] at `now`.
    fn answer(&self, key: &ResolutionKey, now: Instant) -> Option<Result<(), String>> {
        let answers = lock(&self.answers, "the policy's resolved host names");
        let (at, answer) = answers.get(key)?;
        (now.saturating_duration_since(*at) < RESOLUTION_TTL).then(|| answer.clone())
    }

    fn remember(&self, key: ResolutionKey, now: Instant, answer: Result<(), String>) {
        let mut answers = lock(&self.answers, "the policy's resolved host names");
        prune(
            &mut answers,
            Capacity::stale_only(RESOLUTION_CACHE_PRUNE_ABOVE),
            |_, (at, _)| now.saturating_duration_since(*at) >= RESOLUTION_TTL,
            |_, _| None::<()>,
        );
        answers.insert(key, (now, answer));
    }
}

/// The HTTP client's DNS resolver: resolves with the system resolver and drops every
/// address the policy does not allow, so the check holds at connect time too.
#[derive(Debug, Clone)]
pub struct PolicyResolver {
    policy: Arc<HostPolicy>,
}

impl PolicyResolver {
    pub fn new(policy: Arc<HostPolicy>) -> Self {
        PolicyResolver { policy }
    }
}

impl reqwest::dns::Resolve for PolicyResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let policy = self.policy.clone();
        let host = name.as_str().to_owned();
        Box::pin(async move {
            let name_listed = policy.name_listed(&host);
            let resolved: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let allowed: Vec<SocketAddr> = resolved
                .iter()
                .copied()
                .filter(|address| policy.resolved_address_allowed(name_listed, address.ip()).is_ok())
                .collect();
            if allowed.is_empty() && !resolved.is_empty() {
                let error: Box<dyn std::error::Error + Send + Sync> =
                    format!("{host} resolves only to addresses the operator's policy does not allow").into();
                return Err(error);
            }
            let addresses: reqwest::dns::Addrs = Box::new(allowed.into_iter());
            Ok(addresses)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_resolved_host_is_answered_from_the_cache_for_its_time_to_live() {
        let cache = ResolutionCache::default();
        let key = ("tasklist.example".to_owned(), 443, false);
        let start = Instant::now();
        assert_eq!(cache.answer(&key, start), None, "never looked up");
        cache.remember(key.clone(), start, Err("link-local".into()));
        assert_eq!(cache.answer(&key, start + RESOLUTION_TTL / 2), Some(Err("link-local".into())));
        assert_eq!(
            cache.answer(&("tasklist.example".to_owned(), 8443, false), start),
            None,
            "another port"
        );
        assert_eq!(cache.answer(&key, start + RESOLUTION_TTL), None, "looked up again after the TTL");
    }

    #[test]
    fn the_cache_drops_old_answers_instead_of_growing() {
        let cache = ResolutionCache::default();
        let start = Instant::now();
        for n in 0..RESOLUTION_CACHE_PRUNE_ABOVE {
            cache.remember((format!("h{n}"), 443, false), start, Ok(()));
        }
        cache.remember(("new".to_owned(), 443, false), start + RESOLUTION_TTL, Ok(()));
        assert_eq!(cache.answers.lock().unwrap().len(), 1);
    }

    /// A policy listing `allowed`, with http and loopback allowed (as in local tests), so
    /// that the list alone decides.
    fn policy(allowed: &str) -> HostPolicy {
        HostPolicy::from_args(&PolicyArgs {
            allowed_hosts: allowed.split(',').map(str::to_owned).collect(),
            allow_http: true,
            allow_loopback: true,
            ..PolicyArgs::default()
        })
        .expect("valid patterns")
    }

    #[test]
    fn by_default_loopback_metadata_http_and_insecure_tls_are_refused() {
        let default = HostPolicy::default();
        assert_eq!(default, HostPolicy::from_args(&PolicyArgs::default()).unwrap());
        for url in [
            "https://127.0.0.1:8080/",
            "https://127.1.2.3/",
            "https://[::1]/",
            "https://0.0.0.0:8080/",
            "https://[::]/",
            "https://[::ffff:127.0.0.1]/",
        ] {
            let verdict = default.check_url("url", url);
            assert!(
                matches!(&verdict, UrlVerdict::NotAllowed(why) if why.contains("--allow-loopback")),
                "{url}: {verdict:?}"
            );
        }
        for url in [
            "https://169.254.169.254/",
            "https://[fd00:ec2::254]/",
            "https://100.100.100.200/",
            "https://[fe80::1]/",
        ] {
            let verdict = default.check_url("url", url);
            assert!(
                matches!(&verdict, UrlVerdict::NotAllowed(why) if why.contains("metadata")),
                "{url}: {verdict:?}"
            );
        }
        assert!(matches!(default.check_url("url", "http://10.0.0.1/"), UrlVerdict::NotAllowed(why) if why.contains("http://")));
        assert_eq!(default.check_url("url", "https://10.0.0.1/"), UrlVerdict::Allowed);
        let mut spec = oauth2("https://10.0.0.1", "https://10.0.0.2/token");
        spec["tls"] = serde_json::json!({"insecureSkipVerify": true});
        assert!(default.check_spec(&connection(spec)).is_err());
    }

    #[test]
    fn a_url_with_user_info_is_refused_without_quoting_it() {
        let verdict = policy("").check_url("url", "https://admin:hunter2@tasklist.example.com/");
        assert!(
            matches!(&verdict, UrlVerdict::NotAllowed(why) if why.contains("username or password") && !why.contains("hunter2") && !why.contains("admin")),
            "{verdict:?}"
        );
    }

    #[test]
    fn each_default_is_lifted_by_its_own_flag() {
        let lifted = HostPolicy::from_args(&PolicyArgs {
            allow_loopback: true,
            deny_link_local: false,
            allow_http: true,
            allow_insecure_tls: true,
            ..PolicyArgs::default()
        })
        .unwrap();
        for url in [
            "http://127.0.0.1:8080/",
            "http://[::1]/",
            "http://169.254.169.254/",
            "http://100.100.100.200/",
        ] {
            assert_eq!(lifted.check_url("url", url), UrlVerdict::Allowed, "{url}");
        }
        let loopback_only = HostPolicy::from_args(&PolicyArgs {
            allow_loopback: true,
            ..PolicyArgs::default()
        })
        .unwrap();
        assert!(matches!(
            loopback_only.check_url("url", "https://169.254.169.254/"),
            UrlVerdict::NotAllowed(_)
        ));
    }

    #[test]
    fn the_api_servers_own_address_and_port_are_refused_unless_allowed() {
        let args = PolicyArgs {
            allow_loopback: true,
            ..PolicyArgs::default()
        };
        let api_server: SocketAddr = "127.0.0.1:6443".parse().unwrap();
        let in_cluster: SocketAddr = "10.96.0.1:443".parse().unwrap();
        let policy = HostPolicy::from_args(&args)
            .unwrap()
            .refusing_api_server(&args, vec![api_server, in_cluster]);
        let verdict = policy.check_url("auth.oauth2.tokenUrl", "https://127.0.0.1:6443/api/v1/namespaces");
        assert!(
            matches!(&verdict, UrlVerdict::NotAllowed(why) if why.contains("API server") && why.contains("--allow-api-server")),
            "{verdict:?}"
        );
        // Another port of a loopback API server address is another server (local tests).
        assert_eq!(policy.check_url("url", "https://127.0.0.1:8443/"), UrlVerdict::Allowed);
        // Another port of a cluster address is refused when connecting (the resolver does not
        // know the port), not by the pre-check.
        assert_eq!(policy.check_url("url", "https://10.96.0.1:8443/"), UrlVerdict::Allowed);
        assert!(policy.resolved_address_allowed(true, ip("10.96.0.1")).is_err());
        assert!(policy.resolved_address_allowed(true, ip("127.0.0.1")).is_ok());
        let allowed_args = PolicyArgs {
            allow_api_server: true,
            ..args
        };
        let allowed = HostPolicy::from_args(&allowed_args)
            .unwrap()
            .refusing_api_server(&allowed_args, vec![api_server]);
        assert_eq!(allowed.check_url("url", "https://127.0.0.1:6443/"), UrlVerdict::Allowed);
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().expect("an IP address")
    }

    #[test]
    fn networks_contain_what_their_prefix_covers() {
        let ten = Network::parse("10.0.0.0/8").unwrap();
        assert!(ten.contains(ip("10.255.1.2")));
        assert!(!ten.contains(ip("11.0.0.1")));
        let odd = Network::parse("192.168.4.0/22").unwrap();
        assert!(odd.contains(ip("192.168.7.255")));
        assert!(!odd.contains(ip("192.168.8.0")));
        let single = Network::parse("127.0.0.1").unwrap();
        assert!(single.contains(ip("127.0.0.1")));
        assert!(!single.contains(ip("127.0.0.2")));
        assert!(Network::parse("0.0.0.0/0").unwrap().contains(ip("8.8.8.8")));
        assert!(Network::parse("fe80::/10").unwrap().contains(ip("febf::1")));
        assert!(!Network::parse("fe80::/10").unwrap().contains(ip("fec0::1")));
        assert!(!ten.contains(ip("::1")), "an IPv6 address is never in an IPv4 network");
    }

    #[test]
    fn rejects_malformed_patterns() {
        for bad in [
            "10.0.0.0/33",
            "fe80::/129",
            "10.0.0.0/x",
            "*.",
            "a*.example.com",
            "*.*.io",
            "host name",
        ] {
            let args = PolicyArgs {
                allowed_hosts: vec![bad.to_owned()],
                ..PolicyArgs::default()
            };
            assert!(HostPolicy::from_args(&args).is_err(), "{bad} should be rejected");
        }
    }

    #[test]
    fn link_local_is_denied_by_default_even_when_listed() {
        let any = HostPolicy::default();
        let verdict = any.check_url("url", "https://169.254.169.254/latest/meta-data");
        assert!(
            matches!(&verdict, UrlVerdict::NotAllowed(why) if why.contains("169.254.0.0/16")),
            "{verdict:?}"
        );
        assert!(matches!(any.check_url("url", "https://[fe80::1]/"), UrlVerdict::NotAllowed(_)));
        // IPv4 written as IPv6 is the same address.
        assert!(matches!(
            any.check_url("url", "https://[::ffff:169.254.169.254]/"),
            UrlVerdict::NotAllowed(_)
        ));
        let listed = policy("169.254.0.0/16");
        assert!(matches!(
            listed.check_url("url", "https://169.254.169.254/"),
            UrlVerdict::NotAllowed(_)
        ));
    }

    #[test]
    fn link_local_can_be_allowed_explicitly() {
        let args = PolicyArgs {
            deny_link_local: false,
            ..PolicyArgs::default()
        };
        let policy = HostPolicy::from_args(&args).unwrap();
        assert_eq!(policy.check_url("url", "https://169.254.169.254/"), UrlVerdict::Allowed);
        assert_eq!(policy.check_url("url", "https://100.100.100.200/"), UrlVerdict::Allowed);
    }

    #[test]
    fn literal_addresses_are_checked_against_the_listed_networks() {
        let policy = policy("*.camunda.io,10.0.0.0/8,tasklist.example.com");
        assert_eq!(policy.check_url("url", "http://10.1.2.3:8080/x"), UrlVerdict::Allowed);
        let verdict = policy.check_url("url", "http://127.0.0.1:8080/x");
        assert!(
            matches!(&verdict, UrlVerdict::NotAllowed(why) if why.contains("127.0.0.1") && why.contains("allowed hosts")),
            "{verdict:?}"
        );
    }

    #[test]
    fn names_match_exactly_or_by_suffix() {
        let policy = policy("*.camunda.io,tasklist.example.com");
        // Listed names still resolve, to check them against the denied networks.
        assert_eq!(
            policy.check_url("url", "https://bru-2.tasklist.camunda.io/abc"),
            UrlVerdict::Resolve {
                host: "bru-2.tasklist.camunda.io".into(),
                port: 443,
                name_listed: true
            }
        );
        assert!(matches!(
            policy.check_url("url", "https://Tasklist.Example.COM./"),
            UrlVerdict::Resolve { name_listed: true, .. }
        ));
        for denied in [
            "https://camunda.io/",
            "https://evilcamunda.io/",
            "https://camunda.io.evil.com/",
            "https://other.example.com/",
        ] {
            let verdict = policy.check_url("auth.oauth2.tokenUrl", denied);
            assert!(
                matches!(&verdict, UrlVerdict::NotAllowed(why) if why.starts_with("auth.oauth2.tokenUrl names the host")),
                "{denied}: {verdict:?}"
            );
        }
    }

    #[test]
    fn an_unlisted_name_passes_only_when_every_address_is_in_a_listed_network() {
        let policy = policy("10.0.0.0/8");
        assert_eq!(
            policy.check_url("url", "http://camunda-tasklist.camunda.svc:8080"),
            UrlVerdict::Resolve {
                host: "camunda-tasklist.camunda.svc".into(),
                port: 8080,
                name_listed: false
            }
        );
        assert!(policy.address_allowed(false, ip("10.96.0.12")).is_ok());
        assert!(policy.address_allowed(false, ip("192.168.0.1")).is_err());
        assert!(policy.address_allowed(true, ip("192.168.0.1")).is_ok());
        assert!(policy.address_allowed(true, ip("169.254.169.254")).is_err());
    }

    #[test]
    fn without_a_list_any_name_is_allowed_but_its_addresses_are_checked() {
        let policy = HostPolicy::default();
        assert_eq!(
            policy.check_url("url", "https://tasklist.example.com"),
            UrlVerdict::Resolve {
                host: "tasklist.example.com".into(),
                port: 443,
                name_listed: true
            }
        );
        assert!(matches!(policy.check_url("url", "https://127.0.0.1:1/"), UrlVerdict::NotAllowed(_)));
        assert_eq!(policy.check_url("url", "https://192.0.2.1:1/"), UrlVerdict::Allowed);
    }

    #[test]
    fn http_is_forbidden_when_the_flag_says_so() {
        let policy = HostPolicy::from_args(&PolicyArgs {
            allow_http: false,
            allow_loopback: true,
            ..PolicyArgs::default()
        })
        .unwrap();
        let verdict = policy.check_url("url", "http://127.0.0.1/");
        assert!(
            matches!(&verdict, UrlVerdict::NotAllowed(why) if why.contains("http://")),
            "{verdict:?}"
        );
        assert_eq!(policy.check_url("url", "https://127.0.0.1/"), UrlVerdict::Allowed);
        assert!(matches!(policy.check_url("url", "ftp://127.0.0.1/"), UrlVerdict::NotAllowed(_)));
    }

    fn connection(spec: serde_json::Value) -> TasklistConnection {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "tasklist.camunda.community/v1alpha1",
            "kind": "TasklistConnection",
            "metadata": {"name": "orders", "namespace": "team-a"},
            "spec": spec,
        }))
        .expect("a valid connection")
    }

    fn oauth2(url: &str, token_url: &str) -> serde_json::Value {
        serde_json::json!({
            "url": url,
            "auth": {"oauth2": {"tokenUrl": token_url, "clientSecretRef": {"name": "client"}}},
        })
    }

    #[test]
    fn checks_both_urls_of_a_connection() {
        let policy = policy("10.0.0.0/8");
        assert_eq!(
            policy.check_spec(&connection(oauth2("http://10.0.0.1", "http://10.0.0.2/token"))),
            Ok(Vec::new())
        );
        let token_elsewhere = policy.check_spec(&connection(oauth2("http://10.0.0.1", "http://192.168.1.1/token")));
        assert!(
            matches!(&token_elsewhere, Err(why) if why.starts_with("auth.oauth2.tokenUrl")),
            "{token_elsewhere:?}"
        );
    }

    #[test]
    fn insecure_tls_and_large_probe_bodies_are_refused_by_the_spec_check() {
        let strict = HostPolicy::default();
        let mut spec = oauth2("https://10.0.0.1", "https://10.0.0.2/token");
        spec["tls"] = serde_json::json!({"insecureSkipVerify": true});
        let verdict = strict.check_spec(&connection(spec.clone()));
        assert!(matches!(&verdict, Err(why) if why.contains("insecureSkipVerify")), "{verdict:?}");
        let lenient = HostPolicy::from_args(&PolicyArgs {
            allow_insecure_tls: true,
            ..PolicyArgs::default()
        })
        .unwrap();
        assert!(lenient.check_spec(&connection(spec)).is_ok());

        let mut spec = oauth2("https://10.0.0.1", "https://10.0.0.2/token");
        spec["probe"] = serde_json::json!({"body": "é".repeat(MAX_PROBE_BODY_BYTES / 2 + 1)});
        let verdict = HostPolicy::default().check_spec(&connection(spec));
        assert!(matches!(&verdict, Err(why) if why.contains("probe.body")), "{verdict:?}");
    }

    #[tokio::test]
    async fn resolved_addresses_are_checked_before_connecting() {
        // `localhost` resolves to loopback, which a list of 10.0.0.0/8 does not cover.
        let policy = policy("10.0.0.0/8");
        let verdict = policy
            .check_connection(&connection(oauth2("http://localhost:1", "http://10.0.0.2/t")))
            .await;
        assert!(
            matches!(&verdict, Err(why) if why.contains("\"localhost\" resolves to an address that is not allowed")),
            "{verdict:?}"
        );
        let resolver = PolicyResolver::new(Arc::new(policy));
        let name: reqwest::dns::Name = "localhost".parse().unwrap();
        assert!(reqwest::dns::Resolve::resolve(&resolver, name).await.is_err());

        let loopback = PolicyResolver::new(Arc::new(self::policy("127.0.0.0/8,::1")));
        let name: reqwest::dns::Name = "localhost".parse().unwrap();
        let addresses: Vec<SocketAddr> = reqwest::dns::Resolve::resolve(&loopback, name).await.unwrap().collect();
        assert!(
            !addresses.is_empty() && addresses.iter().all(|a| a.ip().is_loopback()),
            "{addresses:?}"
        );
    }
}
