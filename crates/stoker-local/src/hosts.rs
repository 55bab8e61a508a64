//! Which host a local executor advertises and binds.
//!
//! Spark keys several rules on an executor's *host*, not on the executor: a decommissioned
//! executor's host is taken to go away with it, so a map task that finished there is run again
//! while its stage still runs unless its output moved to another **host**
//! (`TaskSetManager.executorLost`); locality and host-local disk reads go by host too. Executor
//! pods each have an address of their own. With [`ExecutorHosts::OwnLoopback`] each local
//! executor gets one as well: a loopback address no other live executor of this stoker has
//! (127.0.0.2, 127.0.0.3, …). Linux routes the whole of 127.0.0.0/8 to the loopback interface,
//! so every one of them can be bound without any set-up, and the driver (127.0.0.1) reaches it.

use std::net::Ipv4Addr;
use std::str::FromStr;
use std::sync::atomic::{AtomicU32, Ordering};

/// First address handed out: 127.0.0.1 stays the driver's and stoker's.
const FIRST: u32 = u32::from_be_bytes([127, 0, 0, 2]);
/// Last address handed out: 127.255.255.255 is the loopback network's broadcast address.
const LAST: u32 = u32::from_be_bytes([127, 255, 255, 254]);

/// How local executors get their host.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ExecutorHosts {
    /// Every executor a loopback address of its own, in turn (`loopback` on the command line).
    OwnLoopback,
    /// Every executor the same host name or address (for example the machine's address when
    /// drivers run elsewhere).
    Shared(String),
}

/// A host that is not a usable host name or address.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("executor host {0:?} is not `loopback`, an IP address or a host name")]
pub struct BadExecutorHost(pub String);

impl FromStr for ExecutorHosts {
    type Err = BadExecutorHost;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s == "loopback" {
            return Ok(Self::OwnLoopback);
        }
        let is_name = !s.is_empty()
            && s.len() <= 253
            && s.split('.').all(|label| {
                !label.is_empty()
                    && label.len() <= 63
                    && !label.starts_with('-')
                    && !label.ends_with('-')
                    && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
            });
        if is_name || s.parse::<std::net::IpAddr>().is_ok() {
            Ok(Self::Shared(s.to_owned()))
        } else {
            Err(BadExecutorHost(s.to_owned()))
        }
    }
}

/// The `n`-th loopback address handed out: 127.0.0.2 for 0, then upwards, round again after
/// 127.255.255.254 (16,777,213 addresses: an address comes back only after that many launches).
pub fn loopback_address(n: u32) -> Ipv4Addr {
    Ipv4Addr::from(FIRST + n % (LAST - FIRST + 1))
}

/// Hands out hosts to executors as they launch.
#[derive(Debug)]
pub struct HostPicker {
    hosts: ExecutorHosts,
    next: AtomicU32,
}

impl HostPicker {
    /// A picker that starts at the first loopback address.
    pub fn new(hosts: ExecutorHosts) -> Self {
        Self {
            hosts,
            next: AtomicU32::new(0),
        }
    }

    /// The host of the next executor to launch.
    pub fn next(&self) -> String {
        match &self.hosts {
            ExecutorHosts::Shared(host) => host.clone(),
            ExecutorHosts::OwnLoopback => {
                loopback_address(self.next.fetch_add(1, Ordering::Relaxed)).to_string()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn loopback_addresses_skip_the_drivers_and_the_broadcast_address_and_wrap_round() {
        assert_eq!(loopback_address(0), Ipv4Addr::new(127, 0, 0, 2));
        assert_eq!(loopback_address(1), Ipv4Addr::new(127, 0, 0, 3));
        assert_eq!(loopback_address(254), Ipv4Addr::new(127, 0, 1, 0));
        let span = LAST - FIRST + 1;
        assert_eq!(span, 16_777_213);
        assert_eq!(
            loopback_address(span - 1),
            Ipv4Addr::new(127, 255, 255, 254)
        );
        assert_eq!(loopback_address(span), Ipv4Addr::new(127, 0, 0, 2));
        assert_eq!(
            loopback_address(u32::MAX),
            loopback_address(u32::MAX % span)
        );
        for n in [0, 1, 1000, span - 1, span, u32::MAX] {
            let a = loopback_address(n);
            assert!(
                a.is_loopback()
                    && a != Ipv4Addr::LOCALHOST
                    && a != Ipv4Addr::new(127, 255, 255, 255),
                "{a}"
            );
        }
    }

    #[test]
    fn each_executor_gets_its_own_loopback_address_and_a_shared_host_is_shared() {
        let picker = HostPicker::new(ExecutorHosts::OwnLoopback);
        let hosts: Vec<String> = (0..1000).map(|_| picker.next()).collect();
        assert_eq!(hosts.iter().collect::<HashSet<_>>().len(), 1000);
        assert_eq!(hosts[0], "127.0.0.2");
        let shared = HostPicker::new(ExecutorHosts::Shared("10.1.2.3".into()));
        assert_eq!(
            (shared.next(), shared.next()),
            ("10.1.2.3".into(), "10.1.2.3".into())
        );
    }

    #[test]
    fn the_command_line_value_is_loopback_an_address_or_a_name_and_nothing_else() {
        assert_eq!("loopback".parse(), Ok(ExecutorHosts::OwnLoopback));
        for shared in [
            "127.0.0.1",
            "10.0.0.7",
            "::1",
            "node-1.example.com",
            "localhost",
        ] {
            assert_eq!(
                shared.parse(),
                Ok(ExecutorHosts::Shared(shared.into())),
                "{shared}"
            );
        }
        for bad in ["", "a b", "-x", "x..y", "host:7077", "http://x"] {
            assert_eq!(
                bad.parse::<ExecutorHosts>(),
                Err(BadExecutorHost(bad.into())),
                "{bad}"
            );
        }
    }
}
