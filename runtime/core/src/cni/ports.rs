//! Port mappings (`-p [HOSTIP:]HOSTPORT:CONTAINERPORT[/tcp|/udp]`), in the shape CNI's
//! `portMappings` capability passes to plugins such as `portmap`.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use super::CniError;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Tcp,
    Udp,
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PortMapping {
    pub host_port: u16,
    pub container_port: u16,
    pub protocol: Protocol,
    /// Only this host address (all of them when absent).
    #[serde(rename = "hostIP", default, skip_serializing_if = "Option::is_none")]
    pub host_ip: Option<IpAddr>,
}

impl FromStr for PortMapping {
    type Err = CniError;

    fn from_str(spec: &str) -> Result<Self, CniError> {
        let bad = |reason: &str| CniError::BadPortMapping { spec: spec.into(), reason: reason.into() };
        let expected = "expected [HOSTIP:]HOSTPORT:CONTAINERPORT[/tcp|/udp]";
        let (addr, protocol) = match spec.rsplit_once('/') {
            None => (spec, Protocol::Tcp),
            Some((a, "tcp")) => (a, Protocol::Tcp),
            Some((a, "udp")) => (a, Protocol::Udp),
            Some(_) => return Err(bad("the protocol must be tcp or udp")),
        };
        // An IPv6 host address is bracketed: [::1]:8080:80.
        let (host_ip, ports) = if let Some(rest) = addr.strip_prefix('[') {
            let (ip, ports) = rest.split_once("]:").ok_or_else(|| bad(expected))?;
            let ip: std::net::Ipv6Addr = ip.parse().map_err(|_| bad("bad IPv6 host address"))?;
            (Some(IpAddr::V6(ip)), ports)
        } else {
            match addr.matches(':').count() {
                1 => (None, addr),
                2 => {
                    let (ip, ports) = addr.split_once(':').ok_or_else(|| bad(expected))?;
                    let ip: std::net::Ipv4Addr =
                        ip.parse().map_err(|_| bad("bad host address (bracket an IPv6 one: [::1]:80:80)"))?;
                    (Some(IpAddr::V4(ip)), ports)
                }
                _ => return Err(bad(expected)),
            }
        };
        let (host, container) = ports.split_once(':').ok_or_else(|| bad(expected))?;
        let port = |p: &str, what: &str| -> Result<u16, CniError> {
            match p.parse::<u16>() {
                Ok(n) if n > 0 && p.bytes().all(|b| b.is_ascii_digit()) => Ok(n),
                _ => Err(bad(&format!("the {what} port {p:?} is not 1-65535"))),
            }
        };
        Ok(PortMapping {
            host_port: port(host, "host")?,
            container_port: port(container, "container")?,
            protocol,
            host_ip,
        })
    }
}

impl fmt::Display for PortMapping {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.host_ip {
            Some(IpAddr::V6(ip)) => write!(f, "[{ip}]:")?,
            Some(IpAddr::V4(ip)) => write!(f, "{ip}:")?,
            None => {}
        }
        write!(f, "{}:{}/{}", self.host_port, self.container_port, self.protocol)
    }
}

/// Two mappings of one host port (same address and protocol) cannot both hold.
pub fn check_unique(maps: &[PortMapping]) -> Result<(), CniError> {
    for (i, a) in maps.iter().enumerate() {
        let clash = maps[..i].iter().any(|b| {
            a.host_port == b.host_port
                && a.protocol == b.protocol
                && (a.host_ip.is_none() || b.host_ip.is_none() || a.host_ip == b.host_ip)
        });
        if clash {
            return Err(CniError::BadPortMapping {
                spec: a.to_string(),
                reason: format!("host port {}/{} is published twice", a.host_port, a.protocol),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Result<PortMapping, CniError> {
        s.parse()
    }

    #[test]
    fn publish_specs() {
        let m = p("8080:80").expect("plain");
        assert_eq!((m.host_port, m.container_port, m.protocol, m.host_ip), (8080, 80, Protocol::Tcp, None));
        let m = p("127.0.0.1:53:5353/udp").expect("ip and udp");
        assert_eq!(m.host_ip, Some("127.0.0.1".parse().expect("ip")));
        assert_eq!((m.host_port, m.container_port, m.protocol), (53, 5353, Protocol::Udp));
        let m = p("[::1]:443:8443/tcp").expect("ipv6");
        assert_eq!(m.host_ip, Some("::1".parse().expect("ip")));
        assert_eq!(m.to_string(), "[::1]:443:8443/tcp");
        assert_eq!(p("1:65535").expect("bounds").to_string(), "1:65535/tcp");
        for bad in [
            "",
            "80",
            "0:80",
            "80:0",
            "65536:80",
            "80:65536",
            "-1:80",
            "+80:80",
            "80:80/sctp",
            "80:80/",
            "a:80",
            "1.2.3:80:80",
            "::1:80:80",
            "[::1]80:80",
            "[1.2.3.4]:80:80",
            "1:2:3:4",
            "80:80:80",
        ] {
            assert!(p(bad).is_err(), "{bad:?} should be refused");
        }
        let e = p("80:80/sctp").expect_err("sctp").to_string();
        assert!(e.contains("tcp or udp"), "{e}");
    }

    #[test]
    fn the_capability_json_is_portmaps() {
        let m = p("10.0.0.1:8080:80/udp").expect("parse");
        let v = serde_json::to_value(&m).expect("json");
        assert_eq!(
            v,
            serde_json::json!({"hostPort": 8080, "containerPort": 80, "protocol": "udp", "hostIP": "10.0.0.1"})
        );
        let v = serde_json::to_value(p("8080:80").expect("parse")).expect("json");
        assert!(v.get("hostIP").is_none());
    }

    #[test]
    fn a_host_port_is_published_once() {
        let maps = |s: &[&str]| s.iter().map(|x| p(x).expect("parse")).collect::<Vec<_>>();
        assert!(
            check_unique(&maps(&["80:80", "81:80", "80:80/udp", "127.0.0.1:82:1", "127.0.0.2:82:1"])).is_ok()
        );
        assert!(check_unique(&maps(&["80:80", "80:81"])).is_err());
        assert!(check_unique(&maps(&["127.0.0.1:80:80", "80:81"])).is_err());
    }
}
