//! A pod's network namespace (which CNI filled) wired to its VM, the way Kata's tc-filter mode
//! does it: for each interface CNI made there, a tap beside it in the same namespace, and TC
//! ingress redirects both ways between the two (no bridge, no address on the tap). husk-vmm runs
//! in that namespace and holds the taps; the guest gets each interface's MAC, addresses, MTU
//! and the namespace's routes, so the pod's CNI address is the guest's.
//!
//! All netlink work happens on a thread of its own that enters the namespace (setns applies to
//! the calling thread only), so nothing else in the process changes namespace.
//!
//! The namespace's loopback is carried to the guest's as well (CRI's PortForward dials
//! `localhost:<port>` there): a REDIRECT rule sends loopback TCP to husk-vmm's listener on
//! [`LOOPBACK_FORWARD_PORT`], which forwards each connection to the same port in the guest (see
//! husk-vmm's `loopback_forward`).

use std::fs::File;
use std::net::IpAddr;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};

use futures_util::stream::TryStreamExt;
use husk_proto as pb;
use rtnetlink::packet_route::address::AddressAttribute;
use rtnetlink::packet_route::link::{InfoKind, LinkAttribute, LinkFlags, LinkInfo};
use rtnetlink::packet_route::route::{RouteAddress, RouteAttribute, RouteProtocol, RouteType};
use rtnetlink::{Handle, LinkUnspec, RouteMessageBuilder};
use serde::{Deserialize, Serialize};

/// Taps husk makes are named `husk-tap<N>`, which also tells them apart from CNI's links.
const TAP_PREFIX: &str = "husk-tap";
/// The main routing table.
const RT_TABLE_MAIN: u8 = 254;
/// tc's ingress parent (`ffff:`) and "all protocols".
const TC_INGRESS: u32 = 0xffff_0000;
const ETH_P_ALL: u16 = 0x0003;

/// husk-vmm's listener in the pod namespace for its loopback connections.
pub const LOOPBACK_FORWARD_PORT: u16 = 15327;
/// The REDIRECT rule in the namespace's nat OUTPUT chain (after `-A`/`-D OUTPUT`), less its
/// port.
const LOOPBACK_RULE: [&str; 13] = [
    "-w",
    "-o",
    "lo",
    "-d",
    "127.0.0.1/32",
    "-p",
    "tcp",
    "-m",
    "comment",
    "--comment",
    "husk loopback forward",
    "-j",
    "REDIRECT",
];

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("network namespace {path}: {source}")]
    Namespace {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{what}: {source}")]
    Netlink {
        what: String,
        #[source]
        source: rtnetlink::Error,
    },
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Tap(#[from] husk_vmm::devices::virtio::net::tap::TapError),
    #[error("{0}")]
    Unsupported(String),
}

fn nl(what: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> NetError {
    let what = what.into();
    move |source| NetError::Netlink { what, source }
}

/// One pod interface and the tap that carries it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Link {
    /// Its name in the pod's namespace (`eth0`), which the guest's interface gets too.
    pub name: String,
    pub index: u32,
    pub tap: String,
    pub mac: [u8; 6],
    pub mtu: u32,
    pub addresses: Vec<(IpAddr, u8)>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Route {
    pub destination: IpAddr,
    pub prefix_len: u8,
    pub gateway: Option<IpAddr>,
    pub device: String,
}

/// A pod namespace wired to a VM: what husk-vmm and the agent are told, and what to undo.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Wired {
    pub netns: PathBuf,
    pub links: Vec<Link>,
    pub routes: Vec<Route>,
    /// husk-vmm's loopback listener port, when the REDIRECT rule to it is in place.
    #[serde(default)]
    pub loopback_forward: Option<u16>,
}

impl Wired {
    /// The agent's view of it.
    pub fn to_proto(&self) -> (Vec<pb::Interface>, Vec<pb::Route>) {
        let ifaces = self
            .links
            .iter()
            .map(|l| pb::Interface {
                name: l.name.clone(),
                mac: l.mac.to_vec(),
                mtu: l.mtu,
                addresses: l
                    .addresses
                    .iter()
                    .map(|(a, p)| pb::IpAddress { address: a.to_string(), prefix_len: (*p).into() })
                    .collect(),
                device_mac: Vec::new(),
            })
            .collect();
        let routes = self
            .routes
            .iter()
            .map(|r| pb::Route {
                destination: r.destination.to_string(),
                prefix_len: r.prefix_len.into(),
                gateway: r.gateway.map(|g| g.to_string()).unwrap_or_default(),
                device: r.device.clone(),
            })
            .collect();
        (ifaces, routes)
    }
}

/// Runs `f` on a new thread inside the network namespace at `netns`, with a netlink handle
/// made there.
fn in_netns<T: Send + 'static>(
    netns: &Path,
    f: impl FnOnce(Handle) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<T, NetError>>>>
        + Send
        + 'static,
) -> Result<T, NetError> {
    let ns = File::open(netns).map_err(|source| NetError::Namespace { path: netns.into(), source })?;
    let path = netns.to_path_buf();
    let worker = std::thread::Builder::new()
        .name("husk-netns".into())
        .spawn(move || {
            nix::sched::setns(ns.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)
                .map_err(|e| NetError::Namespace { path: path.clone(), source: e.into() })?;
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|source| NetError::Io { what: "a runtime for netlink".into(), source })?;
            rt.block_on(async move {
                let (conn, handle, _) = rtnetlink::new_connection()
                    .map_err(|source| NetError::Io { what: "netlink socket".into(), source })?;
                let conn = tokio::spawn(conn);
                let r = f(handle).await;
                conn.abort();
                r
            })
        })
        .map_err(|source| NetError::Io { what: "starting the netns thread".into(), source })?;
    worker.join().map_err(|_| NetError::Unsupported("the netns thread panicked".into()))?
}

/// Makes a persistent tap named `name` (in the calling thread's namespace), with virtio-net
/// headers as husk-vmm will open it.
fn create_tap(name: &str) -> Result<(), NetError> {
    Ok(husk_vmm::devices::virtio::net::tap::Tap::open(name)?.persist()?)
}

fn link_name(l: &rtnetlink::packet_route::link::LinkMessage) -> Option<String> {
    l.attributes.iter().find_map(|a| match a {
        LinkAttribute::IfName(n) => Some(n.clone()),
        _ => None,
    })
}

fn is_tun(l: &rtnetlink::packet_route::link::LinkMessage) -> bool {
    l.attributes.iter().any(|a| match a {
        LinkAttribute::LinkInfo(infos) => infos.iter().any(|i| matches!(i, LinkInfo::Kind(InfoKind::Tun))),
        _ => false,
    })
}

fn route_addr(a: &RouteAddress) -> Option<IpAddr> {
    match a {
        RouteAddress::Inet(v4) => Some(IpAddr::V4(*v4)),
        RouteAddress::Inet6(v6) => Some(IpAddr::V6(*v6)),
        _ => None,
    }
}

/// Wires every interface CNI made in `netns` to a tap of its own. Fails with nothing left
/// behind if any step fails.
pub fn wire(netns: &Path) -> Result<Wired, NetError> {
    let path = netns.to_path_buf();
    in_netns(netns, move |h| Box::pin(async move { wire_in(&h, path).await }))
}

async fn wire_in(h: &Handle, netns: PathBuf) -> Result<Wired, NetError> {
    let mut links = Vec::new();
    let mut all = h.link().get().execute();
    let mut found = Vec::new();
    while let Some(l) = all.try_next().await.map_err(nl("listing links"))? {
        found.push(l);
    }
    for l in &found {
        let Some(name) = link_name(l) else { continue };
        if l.header.flags.contains(LinkFlags::Loopback) || name.starts_with(TAP_PREFIX) || is_tun(l) {
            continue;
        }
        let mac: Option<[u8; 6]> = l.attributes.iter().find_map(|a| match a {
            LinkAttribute::Address(m) => m.as_slice().try_into().ok(),
            _ => None,
        });
        let Some(mac) = mac else {
            return Err(NetError::Unsupported(format!(
                "interface {name} has no Ethernet address (only Ethernet links can be wired to a VM)"
            )));
        };
        let mtu = l.attributes.iter().find_map(|a| match a {
            LinkAttribute::Mtu(m) => Some(*m),
            _ => None,
        });
        let mut addresses = Vec::new();
        let mut addrs = h.address().get().set_link_index_filter(l.header.index).execute();
        while let Some(a) = addrs.try_next().await.map_err(nl(format!("addresses of {name}")))? {
            let ip = a.attributes.iter().find_map(|x| match x {
                AddressAttribute::Address(ip) => Some(*ip),
                _ => None,
            });
            match ip {
                // The guest makes its own link-local address.
                Some(IpAddr::V6(v6)) if (v6.segments()[0] & 0xffc0) == 0xfe80 => {}
                Some(ip) => addresses.push((ip, a.header.prefix_len)),
                None => {}
            }
        }
        let tap = format!("{TAP_PREFIX}{}", links.len());
        links.push(Link { name, index: l.header.index, tap, mac, mtu: mtu.unwrap_or(1500), addresses });
    }
    let mut wired = Wired { netns, links, routes: Vec::new(), loopback_forward: None };
    for family in [false, true] {
        let msg = if family {
            RouteMessageBuilder::<std::net::Ipv6Addr>::new().build()
        } else {
            RouteMessageBuilder::<std::net::Ipv4Addr>::new().build()
        };
        let mut routes = h.route().get(msg).execute();
        while let Some(r) = routes.try_next().await.map_err(nl("listing routes"))? {
            // The kernel's own routes (a subnet's, link-local) come back in the guest by
            // themselves when the addresses do.
            if r.header.table != RT_TABLE_MAIN
                || r.header.protocol == RouteProtocol::Kernel
                || r.header.kind != RouteType::Unicast
            {
                continue;
            }
            let oif = r.attributes.iter().find_map(|a| match a {
                RouteAttribute::Oif(i) => Some(*i),
                _ => None,
            });
            let Some(device) = wired.links.iter().find(|l| Some(l.index) == oif).map(|l| l.name.clone())
            else {
                continue;
            };
            let gateway = r.attributes.iter().find_map(|a| match a {
                RouteAttribute::Gateway(g) => route_addr(g),
                _ => None,
            });
            let destination = r.attributes.iter().find_map(|a| match a {
                RouteAttribute::Destination(d) => route_addr(d),
                _ => None,
            });
            let destination = destination.unwrap_or(if family {
                IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED)
            } else {
                IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED)
            });
            wired.routes.push(Route {
                destination,
                prefix_len: r.header.destination_prefix_length,
                gateway,
                device,
            });
        }
    }
    if let Err(e) = plumb(h, &wired).await {
        unplumb(h, &wired).await;
        return Err(e);
    }
    // A namespace without interfaces (`--network none`) has nothing to forward for.
    if !wired.links.is_empty() {
        wired.loopback_forward = redirect_loopback(h).await;
    }
    Ok(wired)
}

/// iptables, where a node keeps it (CNI's portmap needs it too).
fn iptables() -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/bin"].map(PathBuf::from))
        .map(|d| d.join("iptables"))
        .find(|p| p.is_file())
}

/// Runs `iptables -t nat <op> OUTPUT <the loopback rule>` in the calling thread's namespace.
fn loopback_rule(op: &str) -> Result<(), String> {
    let bin = iptables().ok_or("iptables is not installed")?;
    let out = std::process::Command::new(&bin)
        .args(["-t", "nat", op, "OUTPUT"])
        .args(LOOPBACK_RULE)
        .args(["--to-ports", &LOOPBACK_FORWARD_PORT.to_string()])
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|e| format!("{}: {e}", bin.display()))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!("{}: {}", bin.display(), String::from_utf8_lossy(&out.stderr).trim()))
    }
}

/// The namespace's loopback up and its TCP redirected to husk-vmm's listener. Without it the
/// pod works, but not port forwarding: that is logged, not an error.
async fn redirect_loopback(h: &Handle) -> Option<u16> {
    let mut los = h.link().get().match_name("lo".into()).execute();
    if let Ok(Some(lo)) = los.try_next().await {
        if let Err(e) = h.link().set(LinkUnspec::new_with_index(lo.header.index).up().build()).execute().await
        {
            tracing::warn!("setting the pod's loopback up: {e}");
        }
    }
    match loopback_rule("-A") {
        Ok(()) => Some(LOOPBACK_FORWARD_PORT),
        Err(e) => {
            tracing::warn!("the pod's loopback is not forwarded to its VM (no port forwarding): {e}");
            None
        }
    }
}

/// The taps and the redirects between each and its pod interface.
async fn plumb(h: &Handle, w: &Wired) -> Result<(), NetError> {
    for l in &w.links {
        create_tap(&l.tap)?;
        let mut taps = h.link().get().match_name(l.tap.clone()).execute();
        let tap = taps
            .try_next()
            .await
            .map_err(nl(format!("finding tap {}", l.tap)))?
            .ok_or_else(|| NetError::Unsupported(format!("tap {} vanished", l.tap)))?;
        let tap_index = tap.header.index;
        h.link()
            .set(LinkUnspec::new_with_index(tap_index).mtu(l.mtu).up().build())
            .execute()
            .await
            .map_err(nl(format!("setting tap {} up", l.tap)))?;
        for (from, to, what) in [(l.index, tap_index, &l.name), (tap_index, l.index, &l.tap)] {
            let mut qdisc = h.qdisc();
            qdisc
                .add(from as i32)
                .ingress()
                .execute()
                .await
                .map_err(nl(format!("ingress qdisc on {what}")))?;
            h.traffic_filter(from as i32)
                .add()
                .parent(TC_INGRESS)
                // The kernel reads the protocol in network byte order, and rtnetlink passes
                // it through as given: in host order ETH_P_ALL would match nothing.
                .protocol(ETH_P_ALL.to_be())
                .redirect(to)
                .map_err(nl(format!("redirect filter on {what}")))?
                .execute()
                .await
                .map_err(nl(format!("redirect filter on {what}")))?;
        }
    }
    Ok(())
}

/// Undoes [`plumb`]: the taps go (their qdiscs and filters with them), and the pod
/// interfaces' ingress qdiscs, and the loopback rule. Errors are logged: whatever is gone is
/// gone already.
async fn unplumb(h: &Handle, w: &Wired) {
    if w.loopback_forward.is_some() {
        if let Err(e) = loopback_rule("-D") {
            tracing::debug!("loopback forward rule: {e}");
        }
    }
    for l in &w.links {
        let mut taps = h.link().get().match_name(l.tap.clone()).execute();
        if let Ok(Some(tap)) = taps.try_next().await {
            if let Err(e) = h.link().del(tap.header.index).execute().await {
                tracing::warn!("deleting tap {}: {e}", l.tap);
            }
        }
        let mut qdisc = h.qdisc();
        let mut del = qdisc.del(l.index as i32);
        del.message_mut().header.parent = TC_INGRESS.into();
        if let Err(e) = del.execute().await {
            tracing::debug!("ingress qdisc of {}: {e}", l.name);
        }
    }
}

/// Undoes [`wire`], if the namespace is still there (CNI DEL may have removed it first, which
/// takes the taps and filters with it).
pub fn unwire(w: &Wired) {
    if !w.netns.exists() {
        return;
    }
    let w2 = w.clone();
    if let Err(e) = in_netns(&w.netns, move |h| {
        Box::pin(async move {
            unplumb(&h, &w2).await;
            Ok(())
        })
    }) {
        tracing::warn!("unwiring {}: {e}", w.netns.display());
    }
}
