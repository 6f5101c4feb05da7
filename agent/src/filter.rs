//! Which connections are reported.
use std::net::IpAddr;

use crate::config::FilterConfig;

/// A connection is reported when it passes every configured test.
#[derive(Clone, Debug, Default)]
pub struct Filter {
    cfg: FilterConfig,
}

impl Filter {
    pub const fn new(cfg: FilterConfig) -> Self {
        Self { cfg }
    }

    pub fn admits(&self, local_port: u16, remote: IpAddr) -> bool {
        if !self.cfg.include_loopback && remote.is_loopback() {
            return false;
        }
        if !self.cfg.local_ports.is_empty() && !self.cfg.local_ports.contains(&local_port) {
            return false;
        }
        self.cfg.remote_cidrs.is_empty()
            || self.cfg.remote_cidrs.iter().any(|n| n.contains(&remote))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("ip")
    }

    #[test]
    fn loopback_is_excluded_unless_included() {
        let f = Filter::default();
        assert!(!f.admits(80, ip("127.0.0.1")));
        assert!(!f.admits(80, ip("::1")));
        assert!(f.admits(80, ip("198.18.0.2")));
        let f = Filter::new(FilterConfig {
            include_loopback: true,
            ..FilterConfig::default()
        });
        assert!(f.admits(80, ip("127.0.0.1")));
    }

    #[test]
    fn ports_and_cidrs_narrow() {
        let f = Filter::new(FilterConfig {
            local_ports: vec![8000],
            remote_cidrs: vec![
                "198.18.0.0/24".parse().expect("net"),
                "2001:db8::/32".parse().expect("net"),
            ],
            include_loopback: false,
        });
        assert!(f.admits(8000, ip("198.18.0.2")));
        assert!(f.admits(8000, ip("2001:db8::2")));
        assert!(!f.admits(8001, ip("198.18.0.2")));
        assert!(!f.admits(8000, ip("198.19.0.2")));
    }
}
