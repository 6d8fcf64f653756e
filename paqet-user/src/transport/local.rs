//! Which interface and address paqet uses on this host, asked of the kernel without
//! forking and in the calling thread's network namespace (getifaddrs and a routing
//! lookup through an unconnected UDP socket), never through /sys.

use std::ffi::CStr;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};

/// Every (interface name, address) pair the kernel reports.
pub(crate) fn addresses() -> io::Result<Vec<(String, IpAddr)>> {
    Ok(addresses_with_flags()?
        .into_iter()
        .map(|(name, ip, _)| (name, ip))
        .collect())
}

/// Interfaces that are up and hold an address of the family, with that address: where
/// a server on an unspecified LISTEN_ADDR steers. Loopback is left out, and so are
/// point-to-point and ARP-less links (TUN, WireGuard), which carry no Ethernet header
/// for XDP to parse. One site per interface, its first global address.
pub fn steerable_interfaces(v6: bool) -> io::Result<Vec<(String, IpAddr)>> {
    let skip = (libc::IFF_LOOPBACK | libc::IFF_POINTOPOINT | libc::IFF_NOARP) as u32;
    let mut sites: Vec<(String, IpAddr)> = Vec::new();
    for (name, ip, flags) in addresses_with_flags()? {
        let usable = flags & libc::IFF_UP as u32 != 0 && flags & skip == 0;
        if usable && ip.is_ipv6() == v6 && !is_link_local(&ip) && !sites.iter().any(|(n, _)| *n == name) {
            sites.push((name, ip));
        }
    }
    Ok(sites)
}

fn addresses_with_flags() -> io::Result<Vec<(String, IpAddr, u32)>> {
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `head` with a list we free below.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let mut out = Vec::new();
    let mut cur = head;
    while !cur.is_null() {
        // SAFETY: `cur` is a node of the list getifaddrs returned, alive until freeifaddrs.
        let ifa = unsafe { &*cur };
        if let Some(ip) = sockaddr_ip(ifa.ifa_addr) {
            // SAFETY: ifa_name is a NUL-terminated string owned by the list.
            let name = unsafe { CStr::from_ptr(ifa.ifa_name) }.to_string_lossy().into_owned();
            out.push((name, ip, ifa.ifa_flags));
        }
        cur = ifa.ifa_next;
    }
    // SAFETY: `head` came from getifaddrs and is freed once.
    unsafe { libc::freeifaddrs(head) };
    Ok(out)
}

fn sockaddr_ip(sa: *const libc::sockaddr) -> Option<IpAddr> {
    if sa.is_null() {
        return None;
    }
    // SAFETY: the family tells which sockaddr variant the kernel wrote.
    unsafe {
        match (*sa).sa_family as libc::c_int {
            libc::AF_INET => {
                let sin = &*(sa as *const libc::sockaddr_in);
                Some(IpAddr::V4(Ipv4Addr::from(sin.sin_addr.s_addr.to_ne_bytes())))
            }
            libc::AF_INET6 => {
                let sin6 = &*(sa as *const libc::sockaddr_in6);
                Some(IpAddr::V6(Ipv6Addr::from(sin6.sin6_addr.s6_addr)))
            }
            _ => None,
        }
    }
}

/// The interface that holds `ip`.
pub fn interface_with(ip: IpAddr) -> io::Result<Option<String>> {
    Ok(addresses()?.into_iter().find(|(_, a)| *a == ip).map(|(name, _)| name))
}

/// The first address of the wanted family on `interface`.
pub fn address_of(interface: &str, v6: bool) -> io::Result<Option<IpAddr>> {
    Ok(addresses()?
        .into_iter()
        .find(|(n, a)| n == interface && a.is_ipv6() == v6 && !is_link_local(a))
        .map(|(_, a)| a))
}

fn is_link_local(ip: &IpAddr) -> bool {
    matches!(ip, IpAddr::V6(v6) if (v6.segments()[0] & 0xffc0) == 0xfe80)
}

/// The source address the kernel would use towards `peer` (connecting a UDP socket
/// sends nothing; it only consults the routing table).
pub fn route_source(peer: SocketAddr) -> io::Result<IpAddr> {
    let any: SocketAddr = if peer.is_ipv4() {
        (Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let sock = UdpSocket::bind(any)?;
    sock.connect(peer)?;
    Ok(sock.local_addr()?.ip())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_is_found_both_ways() {
        let lo = IpAddr::V4(Ipv4Addr::LOCALHOST);
        assert_eq!(interface_with(lo).unwrap().as_deref(), Some("lo"));
        assert_eq!(address_of("lo", false).unwrap(), Some(lo));
        assert_eq!(route_source("127.0.0.1:9".parse().unwrap()).unwrap(), lo);
        assert_eq!(interface_with("198.18.255.254".parse().unwrap()).unwrap(), None);
    }
}
