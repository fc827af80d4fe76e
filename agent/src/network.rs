//! The guest's interfaces set up as the pod's are on the host: each virtio-net device (found by
//! the MAC the VMM gave it: the pod interface's, or a snapshot's placeholder in a restored VM)
//! gets that interface's MAC, name, MTU and addresses; the pod's routes follow. Everything in the request is checked first, so a bad
//! request changes nothing.

use std::net::IpAddr;

use futures_util::stream::TryStreamExt;
use husk_proto as pb;
use rtnetlink::{Handle, LinkUnspec, RouteMessageBuilder};

use crate::error::AgentError;

/// Bounds on one request: far beyond any pod, small enough that a hostile host cannot make the
/// agent do unbounded work.
const MAX_INTERFACES: usize = 16;
const MAX_ADDRESSES: usize = 64;
const MAX_ROUTES: usize = 256;

/// A checked interface.
#[derive(Debug, Clone, PartialEq)]
pub struct Iface {
    pub name: String,
    pub mac: [u8; 6],
    /// The MAC the device has now (`mac` unless the VM was restored from a snapshot).
    pub device_mac: [u8; 6],
    pub mtu: u32,
    pub addresses: Vec<(IpAddr, u8)>,
}

/// A checked route.
#[derive(Debug, Clone, PartialEq)]
pub struct Route {
    pub destination: IpAddr,
    pub prefix_len: u8,
    pub gateway: Option<IpAddr>,
    pub device: String,
}

fn invalid(msg: String) -> AgentError {
    AgentError::InvalidArgument(msg)
}

fn ifname(value: &str) -> Result<(), AgentError> {
    let ok = !value.is_empty()
        && value.len() <= 15
        && value != "lo"
        && value.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(invalid(format!("interface name {value:?}: 1-15 of [A-Za-z0-9_.-], not lo")))
    }
}

fn ip(what: &str, text: &str, prefix_len: u32) -> Result<(IpAddr, u8), AgentError> {
    let a: IpAddr = text.parse().map_err(|_| invalid(format!("{what} {text:?} is not an IP address")))?;
    let max = if a.is_ipv4() { 32 } else { 128 };
    if prefix_len > max {
        return Err(invalid(format!("{what} {text}/{prefix_len}: prefix longer than {max}")));
    }
    Ok((a, prefix_len as u8))
}

fn unicast_mac(name: &str, what: &str, bytes: &[u8]) -> Result<[u8; 6], AgentError> {
    let mac: [u8; 6] =
        bytes.try_into().map_err(|_| invalid(format!("interface {name}: {what} is not 6 bytes")))?;
    if mac[0] & 1 != 0 || mac == [0; 6] {
        return Err(invalid(format!("interface {name}: {what} is not a unicast address")));
    }
    Ok(mac)
}

/// Checks the request's network part.
pub fn check(ifaces: &[pb::Interface], routes: &[pb::Route]) -> Result<(Vec<Iface>, Vec<Route>), AgentError> {
    if ifaces.len() > MAX_INTERFACES || routes.len() > MAX_ROUTES {
        return Err(invalid(format!(
            "{} interfaces and {} routes: at most {MAX_INTERFACES} and {MAX_ROUTES}",
            ifaces.len(),
            routes.len()
        )));
    }
    let mut out = Vec::new();
    for i in ifaces {
        ifname(&i.name)?;
        let mac = unicast_mac(&i.name, "MAC", &i.mac)?;
        let device_mac =
            if i.device_mac.is_empty() { mac } else { unicast_mac(&i.name, "device MAC", &i.device_mac)? };
        if !(68..=65_535).contains(&i.mtu) {
            return Err(invalid(format!("interface {}: MTU {} is outside 68-65535", i.name, i.mtu)));
        }
        if i.addresses.len() > MAX_ADDRESSES {
            return Err(invalid(format!("interface {}: more than {MAX_ADDRESSES} addresses", i.name)));
        }
        let addresses = i
            .addresses
            .iter()
            .map(|a| ip("address", &a.address, a.prefix_len))
            .collect::<Result<Vec<_>, _>>()?;
        if out.iter().any(|o: &Iface| o.name == i.name || o.mac == mac || o.device_mac == device_mac) {
            return Err(invalid(format!("interface {} named twice or its MAC used twice", i.name)));
        }
        out.push(Iface { name: i.name.clone(), mac, device_mac, mtu: i.mtu, addresses });
    }
    let mut rs = Vec::new();
    for r in routes {
        let (destination, prefix_len) = ip("route destination", &r.destination, r.prefix_len)?;
        let gateway = match r.gateway.as_str() {
            "" => None,
            g => {
                let (g, _) = ip("gateway", g, 0)?;
                if g.is_ipv4() != destination.is_ipv4() {
                    return Err(invalid(format!("route {}: gateway {g} of the other family", r.destination)));
                }
                Some(g)
            }
        };
        if !out.iter().any(|i| i.name == r.device) {
            return Err(invalid(format!(
                "route {}: device {:?} is none of the interfaces",
                r.destination, r.device
            )));
        }
        rs.push(Route { destination, prefix_len, gateway, device: r.device.clone() });
    }
    Ok((out, rs))
}

fn netlink(what: &str) -> impl FnOnce(rtnetlink::Error) -> AgentError + '_ {
    move |e| AgentError::Internal(format!("{what}: {e}"))
}

/// The index of the guest link with this MAC.
async fn link_by_mac(h: &Handle, mac: &[u8; 6]) -> Result<Option<u32>, AgentError> {
    use rtnetlink::packet_route::link::LinkAttribute;
    let mut links = h.link().get().execute();
    while let Some(l) = links.try_next().await.map_err(netlink("listing links"))? {
        if l.attributes.iter().any(|a| matches!(a, LinkAttribute::Address(m) if m.as_slice() == mac)) {
            return Ok(Some(l.header.index));
        }
    }
    Ok(None)
}

/// Configures the guest's links and routes (the agent is PID 1 in the guest's network
/// namespace, which the containers' pod namespace is made from).
/// Loopback up ([`loopback_up`] at boot) is all a sandbox without interfaces needs: no
/// netlink connection then.
pub async fn configure(ifaces: &[Iface], routes: &[Route]) -> Result<(), AgentError> {
    if ifaces.is_empty() && routes.is_empty() {
        return Ok(());
    }
    with_netlink(|h| async move { configure_with(&h, ifaces, routes).await }).await
}

/// Brings the guest's loopback up, once at boot, before the agent serves (so a VM snapshot
/// holds it up): containers in the pod's network namespace share the VM's, whose loopback a
/// pod needs (localhost between its containers).
pub async fn loopback_up() -> Result<(), AgentError> {
    with_netlink(|h| async move {
        let mut lo = h.link().get().match_name("lo".into()).execute();
        if let Some(l) = lo.try_next().await.map_err(netlink("finding lo"))? {
            h.link()
                .set(LinkUnspec::new_with_index(l.header.index).up().build())
                .execute()
                .await
                .map_err(netlink("lo up"))?;
        }
        Ok(())
    })
    .await
}

async fn with_netlink<F, Fut>(f: F) -> Result<(), AgentError>
where
    F: FnOnce(Handle) -> Fut,
    Fut: std::future::Future<Output = Result<(), AgentError>>,
{
    let (conn, h, _) = rtnetlink::new_connection().map_err(AgentError::io("netlink socket"))?;
    let conn = tokio::spawn(conn);
    let r = f(h).await;
    conn.abort();
    r
}

async fn configure_with(h: &Handle, ifaces: &[Iface], routes: &[Route]) -> Result<(), AgentError> {
    let mut index = std::collections::HashMap::new();
    // Every device is found before any changes its MAC: a pod MAC may be another device's
    // placeholder.
    let mut found = Vec::new();
    for i in ifaces {
        let mac = i.device_mac.map(|b| format!("{b:02x}")).join(":");
        let idx = link_by_mac(h, &i.device_mac).await?.ok_or_else(|| {
            AgentError::NotFound(format!("no guest network device has MAC {mac} (for {})", i.name))
        })?;
        found.push(idx);
    }
    for (i, idx) in ifaces.iter().zip(found) {
        // A link is renamed while down.
        h.link()
            .set(LinkUnspec::new_with_index(idx).down().build())
            .execute()
            .await
            .map_err(netlink("taking the link down"))?;
        let mut set = LinkUnspec::new_with_index(idx).name(i.name.clone()).mtu(i.mtu);
        if i.device_mac != i.mac {
            set = set.address(i.mac.to_vec());
        }
        h.link().set(set.build()).execute().await.map_err(netlink("naming the link"))?;
        for (a, len) in &i.addresses {
            h.address().add(idx, *a, *len).execute().await.map_err(netlink("adding an address"))?;
        }
        h.link()
            .set(LinkUnspec::new_with_index(idx).up().build())
            .execute()
            .await
            .map_err(netlink("link up"))?;
        index.insert(i.name.clone(), idx);
    }
    for r in routes {
        let Some(&idx) = index.get(&r.device) else { continue };
        // check() made sure the gateway is of the destination's family.
        let bad = |e| AgentError::InvalidArgument(format!("route {}: {e}", r.destination));
        let mut b = RouteMessageBuilder::<IpAddr>::new()
            .destination_prefix(r.destination, r.prefix_len)
            .map_err(bad)?
            .output_interface(idx);
        if let Some(g) = r.gateway {
            b = b.gateway(g).map_err(bad)?;
        }
        let msg = b.build();
        match h.route().add(msg).execute().await {
            Ok(()) => {}
            // The subnet route the kernel adds with an address may be in the list too.
            Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::EEXIST => {}
            Err(e) => return Err(netlink("adding a route")(e)),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn iface(name: &str, mac: &[u8]) -> pb::Interface {
        pb::Interface {
            name: name.into(),
            mac: mac.to_vec(),
            mtu: 1500,
            addresses: vec![
                pb::IpAddress { address: "10.213.7.5".into(), prefix_len: 24 },
                pb::IpAddress { address: "fd00:213::5".into(), prefix_len: 64 },
            ],
            device_mac: vec![],
        }
    }

    const MAC: [u8; 6] = [2, 0, 10, 213, 7, 5];

    #[test]
    fn a_pod_network_is_checked_whole() {
        let route = pb::Route {
            destination: "0.0.0.0".into(),
            prefix_len: 0,
            gateway: "10.213.7.1".into(),
            device: "eth0".into(),
        };
        let (i, r) = check(&[iface("eth0", &MAC)], std::slice::from_ref(&route)).expect("good");
        assert_eq!(i[0].addresses.len(), 2);
        assert_eq!(i[0].device_mac, MAC, "no device MAC: the device has the pod's");
        let placeholder = [2, 0x68, 0x75, 0x73, 0x6b, 0];
        let restored = pb::Interface { device_mac: placeholder.to_vec(), ..iface("eth0", &MAC) };
        let (i, _) = check(std::slice::from_ref(&restored), &[]).expect("good");
        assert_eq!((i[0].mac, i[0].device_mac), (MAC, placeholder));
        assert_eq!(r[0].gateway, Some("10.213.7.1".parse().unwrap()));

        let bad_ifaces = [
            iface("", &MAC),
            iface("lo", &MAC),
            iface("a-name-too-long-16", &MAC),
            iface("eth0", &[2, 0, 0]),
            iface("eth0", &[1, 0, 0, 0, 0, 1]),
            iface("eth0", &[0; 6]),
            pb::Interface { device_mac: vec![2, 0], ..iface("eth0", &MAC) },
            pb::Interface { device_mac: vec![1, 0, 0, 0, 0, 1], ..iface("eth0", &MAC) },
            pb::Interface { mtu: 10, ..iface("eth0", &MAC) },
            pb::Interface {
                addresses: vec![pb::IpAddress { address: "10.0.0.300".into(), prefix_len: 8 }],
                ..iface("eth0", &MAC)
            },
            pb::Interface {
                addresses: vec![pb::IpAddress { address: "10.0.0.3".into(), prefix_len: 33 }],
                ..iface("eth0", &MAC)
            },
        ];
        for b in bad_ifaces {
            assert!(check(std::slice::from_ref(&b), &[]).is_err(), "{b:?}");
        }
        assert!(check(&[iface("eth0", &MAC), iface("eth0", &[2, 0, 0, 0, 0, 9])], &[]).is_err());
        assert!(check(&[iface("eth0", &MAC), iface("eth1", &MAC)], &[]).is_err());
        // Two interfaces cannot name one device.
        let on = |name: &str, mac: u8| pb::Interface {
            device_mac: placeholder.to_vec(),
            ..iface(name, &[2, 0, 0, 0, 0, mac])
        };
        assert!(check(&[on("eth0", 1), on("eth1", 2)], &[]).is_err());
        let bad_routes = [
            pb::Route { device: "eth9".into(), ..route.clone() },
            pb::Route { gateway: "fd00::1".into(), ..route.clone() },
            pb::Route { destination: "nope".into(), ..route.clone() },
            pb::Route { prefix_len: 40, ..route.clone() },
        ];
        for b in bad_routes {
            assert!(check(&[iface("eth0", &MAC)], std::slice::from_ref(&b)).is_err(), "{b:?}");
        }
        let many: Vec<pb::Interface> =
            (0..17).map(|n| iface(&format!("e{n}"), &[2, 0, 0, 0, 0, n as u8 + 1])).collect();
        assert!(check(&many, &[]).is_err());
    }
}
