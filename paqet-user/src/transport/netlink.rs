//! Routes, neighbours and links, asked of the kernel over rtnetlink (NETLINK_ROUTE):
//! the only place paqet reads the kernel's routing state; no `ip` from PATH (a child
//! process would inherit the service's ambient capabilities, and PATH is not ours).
//!
//! Crate choice: `netlink-packet-route` (messages) with `netlink-sys` (a plain blocking
//! socket), both MIT and from the rust-netlink project. They are the layers `rtnetlink`
//! itself is built on, without its async connection task: every caller here is
//! synchronous (the xdp transport's resolver thread and its open, `paqet check`,
//! `paqet status`), and lookups are rare (open, a cache miss, a 30 s refresh), so a
//! blocking request on the caller's own thread is simplest and needs no runtime. `neli`
//! (sync too) was the other candidate; its BSD-3 licence is fine, but its generic
//! builder API costs more code for these four requests, and rust-netlink's typed
//! messages (`LinkXdp`, `NeighbourState`, ...) are what `rtnetlink` users already know.
//!
//! Each request opens its own socket in the calling thread, so it sees that thread's
//! network namespace (tests run paqet under `nsenter --net=...`). Interface names go
//! through if_nametoindex/if_indextoname (ioctls in that namespace), never /sys.

use std::io;
use std::net::IpAddr;
use std::time::Duration;

use netlink_packet_core::{
    NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_REPLACE, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload,
};
use netlink_packet_route::address::{AddressAttribute, AddressMessage, AddressScope};
use netlink_packet_route::link::{LinkAttribute, LinkMessage, LinkXdp, XdpAttached};
use netlink_packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourMessage, NeighbourState,
};
use netlink_packet_route::route::{RouteAddress, RouteAttribute, RouteMessage, RouteVia};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use netlink_sys::protocols::NETLINK_ROUTE;
use netlink_sys::{Socket, SocketAddr};

/// The kernel answers rtnetlink requests synchronously; this only bounds a wedged socket.
const REPLY_WAIT: Duration = Duration::from_secs(5);

/// Where the kernel sends packets for one destination (`ip route get`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Route {
    /// The output interface's index (RTA_OIF).
    pub ifindex: u32,
    /// The gateway, when the destination is not on-link.
    pub gateway: Option<IpAddr>,
    /// The source address the kernel would pick (RTA_PREFSRC).
    pub prefsrc: Option<IpAddr>,
}

impl Route {
    /// The next hop: the gateway, or the destination itself when it is on-link.
    pub fn next_hop(&self, dst: IpAddr) -> IpAddr {
        self.gateway.unwrap_or(dst)
    }
}

/// One neighbour-table entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Neighbour {
    pub mac: Option<[u8; 6]>,
    /// NUD_* bits.
    pub state: u16,
}

const NUD_INCOMPLETE: u16 = 0x01;
const NUD_FAILED: u16 = 0x20;
const NUD_STATES: [(u16, &str); 8] = [
    (0x01, "INCOMPLETE"),
    (0x02, "REACHABLE"),
    (0x04, "STALE"),
    (0x08, "DELAY"),
    (0x10, "PROBE"),
    (0x20, "FAILED"),
    (0x40, "NOARP"),
    (0x80, "PERMANENT"),
];

impl Neighbour {
    /// Names the kernel's NUD state the way `ip neigh` does (REACHABLE, STALE, ...;
    /// NONE for none).
    pub fn state_name(&self) -> String {
        let names: Vec<&str> = NUD_STATES
            .iter()
            .filter(|(bit, _)| self.state & bit != 0)
            .map(|(_, n)| *n)
            .collect();
        if names.is_empty() {
            "NONE".into()
        } else {
            names.join(",")
        }
    }

    /// The MAC as `ip neigh` prints it; empty when the entry has none.
    pub fn lladdr(&self) -> String {
        self.mac
            .map(|m| m.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":"))
            .unwrap_or_default()
    }

    /// The MAC, if the entry names the right host: anything but INCOMPLETE or FAILED
    /// (a STALE entry is still correct, only unconfirmed).
    pub fn usable_mac(&self) -> Option<[u8; 6]> {
        if self.state & (NUD_INCOMPLETE | NUD_FAILED) != 0 {
            return None;
        }
        self.mac
    }
}

/// How an XDP program is attached to an interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum XdpMode {
    /// In the driver (XDP_FLAGS_DRV_MODE).
    Native,
    /// On the skb path (XDP_FLAGS_SKB_MODE).
    Generic,
    /// On the NIC (XDP_FLAGS_HW_MODE).
    Offload,
}

impl XdpMode {
    pub fn name(self) -> &'static str {
        match self {
            XdpMode::Native => "native",
            XdpMode::Generic => "generic",
            XdpMode::Offload => "offload",
        }
    }
}

/// The index of interface `name` in the calling thread's network namespace.
pub fn ifindex(name: &str) -> io::Result<u32> {
    let c = std::ffi::CString::new(name).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: `c` is a valid NUL-terminated string for the duration of the call.
    let index = unsafe { libc::if_nametoindex(c.as_ptr()) };
    if index == 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(index)
}

/// The name of interface `index` in the calling thread's network namespace.
pub fn ifname(index: u32) -> io::Result<String> {
    let mut buf = [0 as libc::c_char; libc::IF_NAMESIZE];
    // SAFETY: `buf` holds IF_NAMESIZE bytes, as if_indextoname requires.
    let p = unsafe { libc::if_indextoname(index, buf.as_mut_ptr()) };
    if p.is_null() {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: on success if_indextoname wrote a NUL-terminated name into `buf`.
    let name = unsafe { std::ffi::CStr::from_ptr(buf.as_ptr()) };
    Ok(name.to_string_lossy().into_owned())
}

fn family(ip: IpAddr) -> AddressFamily {
    if ip.is_ipv4() {
        AddressFamily::Inet
    } else {
        AddressFamily::Inet6
    }
}

/// RTM_GETROUTE for one destination: the route the kernel would use to send to `dst`.
pub fn route_get(dst: IpAddr) -> io::Result<Route> {
    let mut msg = RouteMessage::default();
    msg.header.address_family = family(dst);
    msg.header.destination_prefix_length = if dst.is_ipv4() { 32 } else { 128 };
    msg.attributes
        .push(RouteAttribute::Destination(RouteAddress::from(dst)));
    let replies = request(RouteNetlinkMessage::GetRoute(msg), 0)?;
    replies
        .iter()
        .find_map(|m| match m {
            RouteNetlinkMessage::NewRoute(r) => route_from(r),
            _ => None,
        })
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                "the kernel's route reply names no interface",
            )
        })
}

fn route_from(msg: &RouteMessage) -> Option<Route> {
    let mut ifindex = None;
    let mut gateway = None;
    let mut prefsrc = None;
    for a in &msg.attributes {
        match a {
            RouteAttribute::Oif(i) => ifindex = Some(*i),
            RouteAttribute::Gateway(g) => gateway = route_ip(g),
            // A gateway of the other family (RFC 5549: IPv4 via an IPv6 next hop).
            RouteAttribute::Via(RouteVia::Inet(g)) => gateway = Some(IpAddr::V4(*g)),
            RouteAttribute::Via(RouteVia::Inet6(g)) => gateway = Some(IpAddr::V6(*g)),
            RouteAttribute::PrefSource(s) => prefsrc = route_ip(s),
            _ => {}
        }
    }
    Some(Route {
        ifindex: ifindex?,
        gateway,
        prefsrc,
    })
}

fn route_ip(a: &RouteAddress) -> Option<IpAddr> {
    match a {
        RouteAddress::Inet(v4) => Some(IpAddr::V4(*v4)),
        RouteAddress::Inet6(v6) => Some(IpAddr::V6(*v6)),
        _ => None,
    }
}

/// RTM_GETNEIGH for one address on one interface; `None` when the kernel has no entry.
pub fn neigh_get(dst: IpAddr, ifindex: u32) -> io::Result<Option<Neighbour>> {
    let mut msg = NeighbourMessage::default();
    msg.header.family = family(dst);
    msg.header.ifindex = ifindex;
    msg.attributes
        .push(NeighbourAttribute::Destination(NeighbourAddress::from(dst)));
    let replies = match request(RouteNetlinkMessage::GetNeighbour(msg), 0) {
        Ok(r) => r,
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(None),
        Err(e) => return Err(e),
    };
    Ok(replies.iter().find_map(|m| match m {
        RouteNetlinkMessage::NewNeighbour(n) => neighbour_from(dst, n),
        _ => None,
    }))
}

fn neighbour_from(dst: IpAddr, msg: &NeighbourMessage) -> Option<Neighbour> {
    let mut matches = false;
    let mut mac = None;
    for a in &msg.attributes {
        match a {
            NeighbourAttribute::Destination(NeighbourAddress::Inet(v4)) => matches = IpAddr::V4(*v4) == dst,
            NeighbourAttribute::Destination(NeighbourAddress::Inet6(v6)) => matches = IpAddr::V6(*v6) == dst,
            NeighbourAttribute::LinkLayerAddress(l) => mac = <[u8; 6]>::try_from(l.as_slice()).ok(),
            _ => {}
        }
    }
    matches.then_some(Neighbour {
        mac,
        state: u16::from(msg.header.state),
    })
}

/// Asks the kernel to resolve (or re-confirm) `dst` on `ifindex` now: RTM_NEWNEIGH with
/// NTF_USE, as `ip neigh replace ADDR dev DEV use` does. The kernel sends its own ARP
/// request / neighbour solicitation; nothing is sent to the peer's ports. Needs
/// CAP_NET_ADMIN.
pub fn neigh_use(dst: IpAddr, ifindex: u32) -> io::Result<()> {
    let mut msg = NeighbourMessage::default();
    msg.header.family = family(dst);
    msg.header.ifindex = ifindex;
    // NTF_USE only triggers resolution; the state is not applied. NONE (rather than
    // ip's PERMANENT) keeps an entry created here subject to the kernel's GC.
    msg.header.state = NeighbourState::None;
    msg.header.flags = NeighbourFlags::Use;
    msg.attributes
        .push(NeighbourAttribute::Destination(NeighbourAddress::from(dst)));
    request(
        RouteNetlinkMessage::NewNeighbour(msg),
        NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE,
    )
    .map(|_| ())
}

/// RTM_GETLINK for one interface: the XDP programs attached to it, by mode (empty when
/// none is).
pub fn link_xdp(ifindex: u32) -> io::Result<Vec<(XdpMode, u32)>> {
    let mut msg = LinkMessage::default();
    msg.header.index = ifindex;
    let replies = request(RouteNetlinkMessage::GetLink(msg), 0)?;
    Ok(replies
        .iter()
        .find_map(|m| match m {
            RouteNetlinkMessage::NewLink(l) if l.header.index == ifindex => Some(xdp_from(l)),
            _ => None,
        })
        .unwrap_or_default())
}

fn xdp_from(msg: &LinkMessage) -> Vec<(XdpMode, u32)> {
    let Some(xdp) = msg.attributes.iter().find_map(|a| match a {
        LinkAttribute::Xdp(x) => Some(x),
        _ => None,
    }) else {
        return Vec::new();
    };
    let mut attached = None;
    let mut prog = None;
    let mut per_mode = Vec::new();
    for x in xdp {
        match x {
            LinkXdp::Attached(a) => attached = Some(*a),
            LinkXdp::ProgId(id) => prog = Some(*id),
            LinkXdp::DrvProgId(id) => per_mode.push((XdpMode::Native, *id)),
            LinkXdp::SkbProgId(id) => per_mode.push((XdpMode::Generic, *id)),
            LinkXdp::HwProgId(id) => per_mode.push((XdpMode::Offload, *id)),
            _ => {}
        }
    }
    let single = |mode| {
        prog.filter(|id| *id != 0)
            .map(|id| vec![(mode, id)])
            .unwrap_or_default()
    };
    match attached {
        Some(XdpAttached::Driver) => single(XdpMode::Native),
        Some(XdpAttached::SocketBuffer) => single(XdpMode::Generic),
        Some(XdpAttached::Hardware) => single(XdpMode::Offload),
        // Several modes at once: the kernel names each mode's program.
        Some(XdpAttached::Multiple) => per_mode.into_iter().filter(|(_, id)| *id != 0).collect(),
        _ => Vec::new(),
    }
}

/// RTM_GETADDR: the addresses interface `ifindex` holds that a peer can send to, both
/// families, in the kernel's order. Link- and host-scoped ones (fe80::/10, 169.254/16
/// when so marked) are left out: frames paqet builds carry no scope.
pub fn addresses(ifindex: u32) -> io::Result<Vec<IpAddr>> {
    let replies = request(RouteNetlinkMessage::GetAddress(AddressMessage::default()), NLM_F_DUMP)?;
    Ok(replies
        .iter()
        .filter_map(|m| match m {
            RouteNetlinkMessage::NewAddress(a) if a.header.index == ifindex => address_from(a),
            _ => None,
        })
        .collect())
}

fn address_from(msg: &AddressMessage) -> Option<IpAddr> {
    if matches!(msg.header.scope, AddressScope::Link | AddressScope::Host) {
        return None;
    }
    // IFA_LOCAL is this host's end; IFA_ADDRESS is the peer's on a point-to-point link,
    // and the only one an IPv6 address carries.
    let find = |local: bool| {
        msg.attributes.iter().find_map(|a| match a {
            AddressAttribute::Local(ip) if local => Some(*ip),
            AddressAttribute::Address(ip) if !local => Some(*ip),
            _ => None,
        })
    };
    find(true).or_else(|| find(false))
}

/// A socket subscribed to the kernel's address notifications (RTNLGRP_IPV4_IFADDR and
/// RTNLGRP_IPV6_IFADDR) of the calling thread's network namespace.
pub struct AddressEvents {
    socket: Socket,
}

impl AddressEvents {
    /// Subscribes; [`AddressEvents::wait`] then returns at most `poll` apart.
    pub fn subscribe(poll: Duration) -> io::Result<AddressEvents> {
        let mut socket = Socket::new(NETLINK_ROUTE)?;
        socket.bind_auto()?;
        socket.add_membership(libc::RTNLGRP_IPV4_IFADDR)?;
        socket.add_membership(libc::RTNLGRP_IPV6_IFADDR)?;
        set_recv_timeout(&socket, poll)?;
        Ok(AddressEvents { socket })
    }

    /// Waits for notifications: true when an address of any interface was added or
    /// removed, false when `poll` passed (or a signal came) without one. Err(ENOBUFS) means the kernel
    /// dropped notifications: the caller must re-read what it follows.
    pub fn wait(&mut self) -> io::Result<bool> {
        let data = match self.socket.recv_from_full() {
            Ok((data, _)) => data,
            // A signal (the privilege drop signals every thread) ends a receive that has
            // a timeout even under SA_RESTART: as good as a timeout.
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut | io::ErrorKind::Interrupted
                ) =>
            {
                return Ok(false);
            }
            Err(e) => return Err(e),
        };
        Ok(names_an_address_change(&data))
    }
}

/// Whether a datagram of notifications adds or removes an address. One that does not
/// parse counts as a change: the caller then re-reads the state, which is always safe.
fn names_an_address_change(data: &[u8]) -> bool {
    let mut offset = 0;
    while let Some(rest) = data.get(offset..).filter(|r| !r.is_empty()) {
        let Ok(msg) = NetlinkMessage::<RouteNetlinkMessage>::deserialize(rest) else {
            return true;
        };
        if matches!(
            msg.payload,
            NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewAddress(_) | RouteNetlinkMessage::DelAddress(_))
        ) {
            return true;
        }
        let len = msg.header.length as usize;
        if len == 0 {
            break;
        }
        offset += (len + 3) & !3;
    }
    false
}

/// Sends one request on a fresh NETLINK_ROUTE socket and collects the kernel's answer:
/// every message of a dump, the one reply of a get, or the ACK of an `NLM_F_ACK`
/// request. An error reply becomes the errno it carries.
fn request(payload: RouteNetlinkMessage, flags: u16) -> io::Result<Vec<RouteNetlinkMessage>> {
    let mut socket = Socket::new(NETLINK_ROUTE)?;
    socket.bind_auto()?;
    socket.connect(&SocketAddr::new(0, 0))?;
    set_recv_timeout(&socket, REPLY_WAIT)?;

    let seq = 1;
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST | flags;
    header.sequence_number = seq;
    let mut req = NetlinkMessage::new(header, NetlinkPayload::from(payload));
    req.finalize();
    let mut buf = vec![0u8; req.buffer_len()];
    req.serialize(&mut buf);
    socket.send(&buf, 0)?;

    let dump = flags & NLM_F_DUMP == NLM_F_DUMP;
    let wants_ack = flags & NLM_F_ACK != 0;
    let mut replies = Vec::new();
    loop {
        let (data, _) = socket.recv_from_full()?;
        if data.is_empty() {
            return Err(io::Error::from(io::ErrorKind::UnexpectedEof));
        }
        let mut offset = 0;
        while offset < data.len() {
            let msg: NetlinkMessage<RouteNetlinkMessage> = NetlinkMessage::deserialize(&data[offset..])
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("netlink reply: {e}")))?;
            let len = msg.header.length as usize;
            if msg.header.sequence_number == seq {
                match msg.payload {
                    NetlinkPayload::Error(e) if e.code.is_some() => return Err(e.to_io()),
                    // An ACK (error code 0) ends an NLM_F_ACK request.
                    NetlinkPayload::Error(_) | NetlinkPayload::Done(_) => return Ok(replies),
                    NetlinkPayload::InnerMessage(m) => {
                        replies.push(m);
                        if !dump && !wants_ack {
                            return Ok(replies);
                        }
                    }
                    _ => {}
                }
            }
            if len == 0 {
                break;
            }
            offset += (len + 3) & !3;
        }
    }
}

fn set_recv_timeout(socket: &Socket, wait: Duration) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let tv = libc::timeval {
        tv_sec: wait.as_secs() as libc::time_t,
        tv_usec: wait.subsec_micros() as libc::suseconds_t,
    };
    // SAFETY: a valid fd and a timeval of the size passed.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&tv as *const libc::timeval).cast(),
            size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use netlink_packet_core::{Emitable, Parseable};

    /// Emits `msg` to bytes and parses it back, as a kernel reply would arrive.
    fn round_trip_route(msg: &RouteMessage) -> RouteMessage {
        let mut buf = vec![0u8; msg.buffer_len()];
        msg.emit(&mut buf);
        RouteMessage::parse(&buf[..]).unwrap()
    }

    #[test]
    fn routes_with_and_without_a_gateway() {
        let mut onlink = RouteMessage::default();
        onlink.header.address_family = AddressFamily::Inet;
        onlink.attributes = vec![
            RouteAttribute::Destination(RouteAddress::Inet("198.18.0.2".parse().unwrap())),
            RouteAttribute::Oif(7),
            RouteAttribute::PrefSource(RouteAddress::Inet("198.18.0.1".parse().unwrap())),
        ];
        let r = route_from(&round_trip_route(&onlink)).unwrap();
        assert_eq!(
            r,
            Route {
                ifindex: 7,
                gateway: None,
                prefsrc: Some("198.18.0.1".parse().unwrap())
            }
        );
        let peer: IpAddr = "198.18.0.2".parse().unwrap();
        assert_eq!(r.next_hop(peer), peer);

        let mut via = onlink.clone();
        via.attributes.push(RouteAttribute::Gateway(RouteAddress::Inet(
            "198.18.1.1".parse().unwrap(),
        )));
        let r = route_from(&round_trip_route(&via)).unwrap();
        assert_eq!(r.next_hop(peer), "198.18.1.1".parse::<IpAddr>().unwrap());

        let mut v6 = RouteMessage::default();
        v6.header.address_family = AddressFamily::Inet6;
        v6.attributes = vec![
            RouteAttribute::Oif(3),
            RouteAttribute::Gateway(RouteAddress::Inet6("fe80::1".parse().unwrap())),
        ];
        let r = route_from(&round_trip_route(&v6)).unwrap();
        assert_eq!(r.gateway, Some("fe80::1".parse().unwrap()));

        assert_eq!(route_from(&RouteMessage::default()), None, "no RTA_OIF, no route");
    }

    fn neighbour_msg(dst: &str, mac: Option<[u8; 6]>, state: NeighbourState) -> NeighbourMessage {
        let mut m = NeighbourMessage::default();
        m.header.family = AddressFamily::Inet;
        m.header.ifindex = 7;
        m.header.state = state;
        m.attributes
            .push(NeighbourAttribute::Destination(NeighbourAddress::from(
                dst.parse::<IpAddr>().unwrap(),
            )));
        if let Some(mac) = mac {
            m.attributes.push(NeighbourAttribute::LinkLayerAddress(mac.to_vec()));
        }
        let mut buf = vec![0u8; m.buffer_len()];
        m.emit(&mut buf);
        NeighbourMessage::parse(&buf[..]).unwrap()
    }

    #[test]
    fn neighbours_and_their_states() {
        let hop: IpAddr = "198.18.0.2".parse().unwrap();
        let mac = [0x92, 0x2f, 0x98, 0xd1, 0x38, 0xdf];
        let stale = neighbour_from(hop, &neighbour_msg("198.18.0.2", Some(mac), NeighbourState::Stale)).unwrap();
        assert_eq!(stale.usable_mac(), Some(mac));
        assert_eq!(stale.state_name(), "STALE");
        assert_eq!(stale.lladdr(), "92:2f:98:d1:38:df");
        let failed = neighbour_from(hop, &neighbour_msg("198.18.0.2", None, NeighbourState::Failed)).unwrap();
        assert_eq!(failed.usable_mac(), None);
        assert_eq!(failed.state_name(), "FAILED");
        let incomplete =
            neighbour_from(hop, &neighbour_msg("198.18.0.2", Some(mac), NeighbourState::Incomplete)).unwrap();
        assert_eq!(incomplete.usable_mac(), None);
        assert_eq!(
            neighbour_from(hop, &neighbour_msg("198.18.0.3", Some(mac), NeighbourState::Reachable)),
            None,
            "another address's entry"
        );
        assert_eq!(Neighbour { mac: None, state: 0 }.state_name(), "NONE");
    }

    /// A kernel's RTM_NEWNEIGH as `ip -4 neighbour show` received it (172.17.2.1 on
    /// ifindex 3, REACHABLE; the bytes of netlink-packet-route's own test).
    #[test]
    fn a_kernel_neighbour_reply() {
        let raw = [
            0x02, 0x00, 0x00, 0x00, 0x03, 0x00, 0x00, 0x00, 0x02, 0x00, 0x00, 0x01, 0x08, 0x00, 0x01, 0x00, 0xac, 0x11,
            0x02, 0x01, 0x0a, 0x00, 0x02, 0x00, 0x1c, 0x69, 0x7a, 0x07, 0xc3, 0x36, 0x00, 0x00, 0x08, 0x00, 0x04, 0x00,
            0x01, 0x00, 0x00, 0x00, 0x14, 0x00, 0x03, 0x00, 0x71, 0x01, 0x00, 0x00, 0xcb, 0x0d, 0x1f, 0x00, 0xcb, 0x0d,
            0x1f, 0x00, 0x01, 0x00, 0x00, 0x00,
        ];
        let msg = NeighbourMessage::parse(&raw[..]).unwrap();
        assert_eq!(msg.header.ifindex, 3);
        let n = neighbour_from("172.17.2.1".parse().unwrap(), &msg).unwrap();
        assert_eq!(n.state_name(), "REACHABLE");
        assert_eq!(n.usable_mac(), Some([0x1c, 0x69, 0x7a, 0x07, 0xc3, 0x36]));
        assert_eq!(n.lladdr(), "1c:69:7a:07:c3:36");
    }

    fn link_with(xdp: Vec<LinkXdp>) -> LinkMessage {
        let mut m = LinkMessage::default();
        m.header.index = 7;
        m.attributes.push(LinkAttribute::IfName("veth-c".into()));
        m.attributes.push(LinkAttribute::Xdp(xdp));
        let mut buf = vec![0u8; m.buffer_len()];
        m.emit(&mut buf);
        LinkMessage::parse(&buf[..]).unwrap()
    }

    #[test]
    fn xdp_attachments() {
        let native = link_with(vec![LinkXdp::Attached(XdpAttached::Driver), LinkXdp::ProgId(42)]);
        assert_eq!(xdp_from(&native), vec![(XdpMode::Native, 42)]);
        let generic = link_with(vec![LinkXdp::Attached(XdpAttached::SocketBuffer), LinkXdp::ProgId(9)]);
        assert_eq!(xdp_from(&generic), vec![(XdpMode::Generic, 9)]);
        let multi = link_with(vec![
            LinkXdp::Attached(XdpAttached::Multiple),
            LinkXdp::DrvProgId(5),
            LinkXdp::SkbProgId(6),
        ]);
        assert_eq!(xdp_from(&multi), vec![(XdpMode::Native, 5), (XdpMode::Generic, 6)]);
        let none = link_with(vec![LinkXdp::Attached(XdpAttached::None)]);
        assert!(xdp_from(&none).is_empty());
        assert!(xdp_from(&LinkMessage::default()).is_empty());
    }

    fn address_msg(ip: &str, scope: AddressScope) -> AddressMessage {
        let ip: IpAddr = ip.parse().unwrap();
        let mut m = AddressMessage::default();
        m.header.family = family(ip);
        m.header.index = 7;
        m.header.scope = scope;
        m.attributes.push(AddressAttribute::Address(ip));
        if ip.is_ipv4() {
            m.attributes.push(AddressAttribute::Local(ip));
        }
        m
    }

    /// One netlink datagram holding `msgs`, as a notification socket receives it.
    fn datagram(msgs: Vec<RouteNetlinkMessage>) -> Vec<u8> {
        let mut out = Vec::new();
        for m in msgs {
            let mut msg = NetlinkMessage::new(NetlinkHeader::default(), NetlinkPayload::from(m));
            msg.finalize();
            let mut buf = vec![0u8; msg.buffer_len()];
            msg.serialize(&mut buf);
            out.extend_from_slice(&buf);
        }
        out
    }

    #[test]
    fn address_notifications_and_scopes() {
        let added = RouteNetlinkMessage::NewAddress(address_msg("198.18.0.20", AddressScope::Universe));
        let removed = RouteNetlinkMessage::DelAddress(address_msg("2001:2::2", AddressScope::Universe));
        let link = RouteNetlinkMessage::NewLink(LinkMessage::default());
        assert!(names_an_address_change(&datagram(vec![link.clone(), added])));
        assert!(names_an_address_change(&datagram(vec![removed])));
        assert!(!names_an_address_change(&datagram(vec![link])), "a link change only");
        assert!(names_an_address_change(&[0xff; 7]), "unparsable: re-read to be safe");

        let v4 = address_msg("198.18.0.20", AddressScope::Universe);
        assert_eq!(address_from(&v4), Some("198.18.0.20".parse().unwrap()));
        let v6 = address_msg("2001:2::2", AddressScope::Universe);
        assert_eq!(address_from(&v6), Some("2001:2::2".parse().unwrap()));
        assert_eq!(address_from(&address_msg("fe80::1", AddressScope::Link)), None);
        assert_eq!(address_from(&address_msg("127.0.0.1", AddressScope::Host)), None);
    }

    /// Against the running kernel, in this test's network namespace: loopback always
    /// exists, routes 127.0.0.1 to itself and carries no XDP program.
    #[test]
    fn asks_the_kernel() {
        let lo = ifindex("lo").unwrap();
        assert_eq!(ifname(lo).unwrap(), "lo");
        assert!(ifindex("paqet-no-such-if").is_err());
        let route = route_get("127.0.0.1".parse().unwrap()).unwrap();
        assert_eq!(route.ifindex, lo);
        assert_eq!(route.gateway, None);
        assert!(link_xdp(lo).unwrap().is_empty());
        assert!(link_xdp(u32::MAX - 1).is_err(), "no such interface");
        // Loopback keeps no neighbour entries: a clean "none", not an error.
        assert_eq!(neigh_get("127.0.0.2".parse().unwrap(), lo).unwrap(), None);
    }
}
