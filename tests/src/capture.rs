//! Packet capture with tcpdump inside a test namespace, and just enough pcap reading to
//! count frames and take UDP payloads out of them.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result, bail};

use crate::netns::{ChildGuard, Netns, wait_for};

pub struct Capture {
    child: ChildGuard,
    path: PathBuf,
}

static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

impl Capture {
    /// Starts tcpdump on `iface` in `ns` with a BPF `filter`, writing every packet as
    /// it arrives (-U), and waits until it is capturing.
    pub fn start(ns: &Netns, iface: &str, filter: &str) -> Result<Capture> {
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!("paqet-cap-{}-{n}.pcap", std::process::id()));
        let mut cmd = ns.command("tcpdump");
        // --immediate-mode: without it packets wait in the kernel's capture buffer and a
        // capture stopped soon after them misses them (seen here: 0 of 5 written).
        cmd.args([
            "-i",
            iface,
            "-n",
            "-U",
            "--immediate-mode",
            "-Z",
            "root",
            "-s",
            "2048",
            "-w",
        ])
        .arg(&path)
        .arg(filter);
        cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null());
        let child = ChildGuard::spawn(&mut cmd)?;
        // tcpdump writes the pcap header once it is capturing.
        let ready = wait_for(
            || std::fs::metadata(&path).is_ok_and(|m| m.len() >= 24),
            Duration::from_secs(10),
        );
        if !ready {
            bail!("tcpdump did not start on {iface} in {}", ns.name());
        }
        Ok(Capture { child, path })
    }

    /// Stops the capture and returns the captured frames (Ethernet).
    pub fn stop(mut self) -> Result<Vec<Vec<u8>>> {
        // SIGINT lets tcpdump flush and close the file.
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGINT) };
        let _ = wait_for(
            || self.child.try_wait().is_ok_and(|s| s.is_some()),
            Duration::from_secs(5),
        );
        let bytes = std::fs::read(&self.path).with_context(|| format!("reading {}", self.path.display()))?;
        let _ = std::fs::remove_file(&self.path);
        parse_pcap(&bytes)
    }
}

/// Sends whole Ethernet frames out of `ifname` from an AF_PACKET socket, in the calling
/// thread's network namespace (run it inside [`Netns::run`]), `pause` apart.
pub fn inject(ifname: &str, frames: &[Vec<u8>], pause: Duration) {
    // SAFETY: plain socket(2); checked below. Protocol 0: send-only, receives nothing.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0) };
    assert!(fd >= 0, "AF_PACKET socket: {}", std::io::Error::last_os_error());
    let name = std::ffi::CString::new(ifname).expect("interface name");
    // SAFETY: a valid C string.
    let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
    assert!(ifindex > 0, "no interface {ifname}");
    for f in frames {
        // SAFETY: all-zero sockaddr_ll is valid; the fields are set here.
        let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_ifindex = ifindex as i32;
        sll.sll_halen = 6;
        if let Some(dst) = f.get(..6) {
            sll.sll_addr[..6].copy_from_slice(dst);
        }
        // SAFETY: the frame and the address outlive the call.
        let n = unsafe {
            libc::sendto(
                fd,
                f.as_ptr().cast(),
                f.len(),
                0,
                (&sll as *const libc::sockaddr_ll).cast(),
                size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        assert_eq!(n, f.len() as isize, "injecting: {}", std::io::Error::last_os_error());
        std::thread::sleep(pause);
    }
    // SAFETY: fd is ours and closed once.
    unsafe { libc::close(fd) };
}

fn parse_pcap(bytes: &[u8]) -> Result<Vec<Vec<u8>>> {
    if bytes.len() < 24 {
        bail!("pcap shorter than its header");
    }
    let le = match bytes[..4] {
        [0xd4, 0xc3, 0xb2, 0xa1] => true,
        [0xa1, 0xb2, 0xc3, 0xd4] => false,
        _ => bail!("not a pcap file"),
    };
    let u32_at = |off: usize| -> u32 {
        let b = [bytes[off], bytes[off + 1], bytes[off + 2], bytes[off + 3]];
        if le {
            u32::from_le_bytes(b)
        } else {
            u32::from_be_bytes(b)
        }
    };
    let mut frames = Vec::new();
    let mut off = 24;
    while off + 16 <= bytes.len() {
        let len = u32_at(off + 8) as usize;
        let start = off + 16;
        if start + len > bytes.len() {
            break;
        }
        frames.push(bytes[start..start + len].to_vec());
        off = start + len;
    }
    Ok(frames)
}

/// The UDP payload of an Ethernet + IPv4 + UDP frame.
pub fn udp_payload(frame: &[u8]) -> Option<&[u8]> {
    if frame.len() < 14 + 20 + 8 || frame[12..14] != [0x08, 0x00] || frame[14 + 9] != 17 {
        return None;
    }
    let ihl = (frame[14] & 0x0f) as usize * 4;
    frame.get(14 + ihl + 8..)
}
