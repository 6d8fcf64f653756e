//! Facts about the interface the transport sends on: its MAC, its MTU and how many RX
//! queues it has, read with ioctls on a socket opened in the calling thread's network
//! namespace (so they are right under `nsenter --net` and setns, where /sys shows the
//! host's interfaces).

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// `ETHTOOL_GCHANNELS` from linux/ethtool.h.
const ETHTOOL_GCHANNELS: u32 = 0x0000_003c;

#[repr(C)]
#[derive(Default)]
struct EthtoolChannels {
    cmd: u32,
    max_rx: u32,
    max_tx: u32,
    max_other: u32,
    max_combined: u32,
    rx_count: u32,
    tx_count: u32,
    other_count: u32,
    combined_count: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InterfaceInfo {
    pub mac: [u8; 6],
    pub mtu: u32,
    /// RX queues in use now (at least 1).
    pub rx_queues: u32,
}

pub fn query(name: &str) -> io::Result<InterfaceInfo> {
    let sock = control_socket()?;
    let mac = hwaddr(&sock, name)?;
    let mtu = mtu(&sock, name)?;
    let rx_queues = rx_queues(&sock, name);
    Ok(InterfaceInfo { mac, mtu, rx_queues })
}

fn control_socket() -> io::Result<OwnedFd> {
    // SAFETY: plain socket(2); the result is checked before use.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn ifreq_for(name: &str) -> io::Result<libc::ifreq> {
    // SAFETY: an all-zero ifreq is valid.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    let bytes = name.as_bytes();
    if bytes.is_empty() || bytes.len() >= req.ifr_name.len() || bytes.contains(&0) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("invalid interface name {name:?}"),
        ));
    }
    for (d, s) in req.ifr_name.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    Ok(req)
}

fn ioctl(sock: &OwnedFd, request: libc::c_ulong, req: &mut libc::ifreq) -> io::Result<()> {
    // SAFETY: `req` is a valid ifreq for these requests and outlives the call.
    let rc = unsafe { libc::ioctl(sock.as_raw_fd(), request as _, req as *mut libc::ifreq) };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn hwaddr(sock: &OwnedFd, name: &str) -> io::Result<[u8; 6]> {
    let mut req = ifreq_for(name)?;
    ioctl(sock, libc::SIOCGIFHWADDR, &mut req)?;
    // SAFETY: SIOCGIFHWADDR filled the hwaddr member of the union.
    let sa = unsafe { req.ifr_ifru.ifru_hwaddr };
    if sa.sa_family != libc::ARPHRD_ETHER {
        return Err(io::Error::new(
            io::ErrorKind::Unsupported,
            format!("{name} is not an Ethernet interface (ARPHRD {})", sa.sa_family),
        ));
    }
    let mut mac = [0u8; 6];
    for (m, b) in mac.iter_mut().zip(sa.sa_data.iter()) {
        *m = *b as u8;
    }
    Ok(mac)
}

fn mtu(sock: &OwnedFd, name: &str) -> io::Result<u32> {
    let mut req = ifreq_for(name)?;
    ioctl(sock, libc::SIOCGIFMTU, &mut req)?;
    // SAFETY: SIOCGIFMTU filled the mtu member of the union.
    let mtu = unsafe { req.ifr_ifru.ifru_mtu };
    u32::try_from(mtu).map_err(|_| io::Error::other(format!("{name} reports MTU {mtu}")))
}

/// Drivers report either separate RX channels or combined ones (or both); a driver
/// without the ethtool call has one queue.
fn rx_queues(sock: &OwnedFd, name: &str) -> u32 {
    let Ok(mut req) = ifreq_for(name) else { return 1 };
    let mut ch = EthtoolChannels {
        cmd: ETHTOOL_GCHANNELS,
        ..Default::default()
    };
    req.ifr_ifru.ifru_data = (&mut ch as *mut EthtoolChannels).cast();
    match ioctl(sock, libc::SIOCETHTOOL, &mut req) {
        Ok(()) => (ch.rx_count + ch.combined_count).max(1),
        Err(e) => {
            tracing::debug!(
                interface = name,
                "ETHTOOL_GCHANNELS failed ({e}); assuming one RX queue"
            );
            1
        }
    }
}

pub fn fmt_mac(m: [u8; 6]) -> String {
    format!(
        "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
        m[0], m[1], m[2], m[3], m[4], m[5]
    )
}

/// Only the tests read MACs from text now (neighbours come from rtnetlink as bytes).
#[cfg(test)]
pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = s.split(':');
    for m in &mut mac {
        *m = u8::from_str_radix(parts.next()?, 16).ok()?;
    }
    if parts.next().is_some() { None } else { Some(mac) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_is_not_ethernet_but_has_an_mtu() {
        let sock = control_socket().unwrap();
        assert!(mtu(&sock, "lo").unwrap() > 0);
        assert!(hwaddr(&sock, "lo").is_err());
        assert!(rx_queues(&sock, "lo") >= 1);
    }

    #[test]
    fn macs_roundtrip_as_text() {
        let m = [0x02, 0xab, 0, 0x10, 0xff, 1];
        assert_eq!(parse_mac(&fmt_mac(m)), Some(m));
        assert_eq!(parse_mac("02:ab:00:10:ff"), None);
        assert_eq!(parse_mac("02:ab:00:10:ff:01:02"), None);
        assert_eq!(parse_mac("zz:ab:00:10:ff:01"), None);
    }
}
