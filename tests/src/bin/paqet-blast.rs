//! The benchmark's raw packet ceilings: one sender and one receiver moving fixed-size
//! datagrams as fast as they can, with no KCP, no crypto and no flow control.
//!
//! - `udp-send DEST SECONDS PAYLOAD [SEGMENTS]` / `udp-recv BIND SECONDS [PAYLOAD]`:
//!   plain UDP sockets, `sendmmsg`/`recvmmsg` in batches of 64. With SEGMENTS the
//!   sender writes SEGMENTS payloads a call with UDP GSO (`UDP_SEGMENT`), and with
//!   PAYLOAD the receiver takes GRO-merged datagrams (`UDP_GRO`), counting PAYLOAD
//!   bytes as a frame: what paqet's udp transport does.
//! - `xdp-send IFACE LOCAL PEER SECONDS PAYLOAD` / `xdp-recv IFACE LOCAL SECONDS`:
//!   paqet's AF_XDP transport (`paqet::transport::xdp`, copy mode on veth, UDP-shaped
//!   frames, `paqet_steer` redirecting into the socket), driven directly: frames go
//!   straight from a reused batch to the TX ring, and the receiver only counts them.
//!
//! - `packet-send IFACE LOCAL PEER SECONDS PAYLOAD SEGMENTS`: UDP-shaped frames for
//!   `xdp-recv`, written SEGMENTS payloads at a time as one super-frame through the xdp
//!   transport's sender (`paqet::transport::xdp::gso`: AF_PACKET with
//!   `PACKET_VNET_HDR`), which the kernel cuts into frames at the device.
//!
//! A 1400-byte payload makes 1442-byte Ethernet frames (14 + 20 + 8 + 1400). The
//! receiver starts its clock at the first datagram and stops after SECONDS (or after
//! one idle second), then prints `frames=N bytes=B secs=S cpu=C` (payload bytes; C the
//! CPU seconds it used since the first datagram) on stdout. The sender prints
//! `sent=N cpu=C` for its first SECONDS after its first send, then goes on for
//! [`SENDER_TAIL`] so that the receiver's window is full. Every loop is bounded in time.

use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

const BATCH: usize = 64;
/// How long a sender goes on after its measured window.
const SENDER_TAIL: Duration = Duration::from_secs(3);
/// Largest datagram the GRO receiver takes in one piece.
const GRO_BUFFER: usize = 65535;

fn usage() -> ! {
    eprintln!(
        "usage: paqet-blast udp-send DEST SECONDS PAYLOAD [SEGMENTS] | udp-recv BIND SECONDS [PAYLOAD] |\n       \
         xdp-send IFACE LOCAL PEER SECONDS PAYLOAD | xdp-recv IFACE LOCAL SECONDS |\n       \
         packet-send IFACE LOCAL PEER SECONDS PAYLOAD SEGMENTS"
    );
    std::process::exit(2);
}

fn parse<T: std::str::FromStr>(s: Option<&String>) -> T {
    s.and_then(|s| s.parse().ok()).unwrap_or_else(|| usage())
}

/// CPU seconds (user and system, all threads) this process has used.
fn cpu_seconds() -> f64 {
    // SAFETY: getrusage writes into the struct we own.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: as above; RUSAGE_SELF always exists.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) };
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    secs(u.ru_utime) + secs(u.ru_stime)
}

/// A sender's window: the CPU it used in its first `window` after its first send.
struct SenderClock {
    started: Instant,
    cpu_at_start: f64,
    window: Duration,
    reported: bool,
}

impl SenderClock {
    fn start(secs: f64) -> SenderClock {
        SenderClock {
            started: Instant::now(),
            cpu_at_start: cpu_seconds(),
            window: Duration::from_secs_f64(secs),
            reported: false,
        }
    }

    /// Prints `sent=N cpu=C` once the window is over; false once the tail is over too.
    fn keep_sending(&mut self, sent: u64) -> bool {
        let elapsed = self.started.elapsed();
        if !self.reported && elapsed >= self.window {
            println!("sent={sent} cpu={:.3}", cpu_seconds() - self.cpu_at_start);
            use std::io::Write;
            let _ = std::io::stdout().flush();
            self.reported = true;
        }
        elapsed < self.window + SENDER_TAIL
    }
}

/// Counts what arrives; `None` from `next` means "nothing right now".
struct Tally {
    first: Option<Instant>,
    cpu_at_first: f64,
    last: Instant,
    frames: u64,
    bytes: u64,
    window: Duration,
}

impl Tally {
    fn new(secs: f64) -> Tally {
        Tally {
            first: None,
            cpu_at_first: 0.0,
            last: Instant::now(),
            frames: 0,
            bytes: 0,
            window: Duration::from_secs_f64(secs),
        }
    }
    fn add(&mut self, frames: u64, bytes: u64) {
        let now = Instant::now();
        if self.first.is_none() {
            self.first = Some(now);
            self.cpu_at_first = cpu_seconds();
        }
        self.last = now;
        self.frames += frames;
        self.bytes += bytes;
    }
    /// True when the measurement is over.
    fn done(&self, started: Instant) -> bool {
        let now = Instant::now();
        match self.first {
            None => now.duration_since(started) > Duration::from_secs(20),
            Some(f) => now.duration_since(f) >= self.window || now.duration_since(self.last) > Duration::from_secs(1),
        }
    }
    fn report(&self) {
        let secs = self.first.map_or(0.0, |f| self.last.duration_since(f).as_secs_f64());
        let cpu = if self.first.is_some() {
            cpu_seconds() - self.cpu_at_first
        } else {
            0.0
        };
        println!(
            "frames={} bytes={} secs={secs:.6} cpu={cpu:.3}",
            self.frames, self.bytes
        );
    }
}

fn set_udp_option(sock: &UdpSocket, option: libc::c_int, value: libc::c_int) {
    // SAFETY: valid option pointer and length.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_UDP,
            option,
            (&value as *const libc::c_int).cast(),
            4,
        )
    };
    assert_eq!(rc, 0, "setsockopt {option}: {}", std::io::Error::last_os_error());
}

/// `segments` > 1: each datagram written is `segments` payloads that the kernel cuts
/// into `payload`-sized ones (UDP GSO).
fn udp_send(dest: SocketAddr, secs: f64, payload: usize, segments: usize) {
    let sock = UdpSocket::bind(if dest.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" }).expect("bind");
    sock.connect(dest).expect("connect");
    if segments > 1 {
        set_udp_option(&sock, libc::UDP_SEGMENT, payload as libc::c_int);
    }
    let buf = vec![0x5au8; payload * segments];
    let mut iov: Vec<libc::iovec> = (0..BATCH)
        .map(|_| libc::iovec {
            iov_base: buf.as_ptr() as *mut _,
            iov_len: buf.len(),
        })
        .collect();
    // SAFETY: all-zero mmsghdr is valid; each points at one iovec that outlives the calls.
    let mut msgs: Vec<libc::mmsghdr> = (0..BATCH).map(|_| unsafe { std::mem::zeroed() }).collect();
    for (m, v) in msgs.iter_mut().zip(iov.iter_mut()) {
        m.msg_hdr.msg_iov = v;
        m.msg_hdr.msg_iovlen = 1;
    }
    let mut clock = SenderClock::start(secs);
    let mut sent = 0u64;
    while clock.keep_sending(sent) {
        // SAFETY: msgs is valid for BATCH entries.
        let n = unsafe { libc::sendmmsg(sock.as_raw_fd(), msgs.as_mut_ptr(), BATCH as u32, 0) };
        if n > 0 {
            sent += n as u64 * segments as u64;
        }
    }
    eprintln!("paqet-blast: udp-send sent {sent} datagrams");
}

/// `gro_payload`: take GRO-merged datagrams, each `gro_payload` bytes of one a frame.
fn udp_recv(bind: SocketAddr, secs: f64, gro_payload: Option<usize>) {
    let sock = UdpSocket::bind(bind).expect("bind");
    if gro_payload.is_some() {
        set_udp_option(&sock, libc::UDP_GRO, 1);
    }
    let size: libc::c_int = 8 << 20;
    // SAFETY: valid option pointer and length.
    unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUF,
            (&size as *const libc::c_int).cast(),
            4,
        );
    }
    sock.set_read_timeout(Some(Duration::from_millis(200)))
        .expect("timeout");
    let mut bufs = vec![vec![0u8; if gro_payload.is_some() { GRO_BUFFER } else { 2048 }]; BATCH];
    let mut iov: Vec<libc::iovec> = bufs
        .iter_mut()
        .map(|b| libc::iovec {
            iov_base: b.as_mut_ptr().cast(),
            iov_len: b.len(),
        })
        .collect();
    // SAFETY: as in udp_send.
    let mut msgs: Vec<libc::mmsghdr> = (0..BATCH).map(|_| unsafe { std::mem::zeroed() }).collect();
    for (m, v) in msgs.iter_mut().zip(iov.iter_mut()) {
        m.msg_hdr.msg_iov = v;
        m.msg_hdr.msg_iovlen = 1;
    }
    println!("ready");
    let started = Instant::now();
    let mut tally = Tally::new(secs);
    while !tally.done(started) {
        // SAFETY: msgs is valid for BATCH entries; the socket has a read timeout.
        let n = unsafe {
            libc::recvmmsg(
                sock.as_raw_fd(),
                msgs.as_mut_ptr(),
                BATCH as u32,
                libc::MSG_WAITFORONE,
                std::ptr::null_mut(),
            )
        };
        if n > 0 {
            let lens = msgs[..n as usize].iter().map(|m| m.msg_len as u64);
            let bytes: u64 = lens.clone().sum();
            let frames = match gro_payload {
                Some(p) => lens.map(|l| l.div_ceil(p as u64)).sum(),
                None => n as u64,
            };
            tally.add(frames, bytes);
        }
    }
    tally.report();
}

fn read_mac(text: &str) -> [u8; 6] {
    let mut mac = [0u8; 6];
    for (byte, part) in mac.iter_mut().zip(text.trim().split(':')) {
        *byte = u8::from_str_radix(part, 16).expect("a MAC address");
    }
    mac
}

/// The MAC `/proc/net/arp` holds for `ip` (the bench pins its neighbours).
fn neighbour_mac(ip: std::net::Ipv4Addr) -> [u8; 6] {
    let arp = std::fs::read_to_string("/proc/net/arp").expect("/proc/net/arp");
    let line = arp
        .lines()
        .find(|l| l.split_whitespace().next() == Some(ip.to_string().as_str()))
        .unwrap_or_else(|| panic!("no neighbour entry for {ip}"));
    read_mac(line.split_whitespace().nth(3).expect("an ARP line's MAC"))
}

/// Super-frames through paqet's own AF_PACKET sender (`paqet::transport::xdp::gso`).
fn packet_send(iface: &str, local: SocketAddr, peer: SocketAddr, secs: f64, payload: usize, segments: usize) {
    use paqet::transport::xdp::gso::{PacketTx, SendError};
    use paqet_common::wire::{Addr, Headers, ipproto};
    let ifindex = {
        let name = std::ffi::CString::new(iface).expect("an interface name");
        // SAFETY: a NUL-terminated name.
        unsafe { libc::if_nametoindex(name.as_ptr()) }
    };
    assert!(ifindex > 0, "no interface {iface}");
    let tx = PacketTx::open(ifindex).expect("an AF_PACKET socket");
    let SocketAddr::V4(p) = peer else {
        panic!("packet-send takes IPv4 addresses");
    };
    let mac_file = format!("/sys/class/net/{iface}/address");
    let headers = Headers {
        dst_mac: neighbour_mac(*p.ip()),
        src_mac: read_mac(&std::fs::read_to_string(&mac_file).expect("the interface's MAC")),
        src: Addr::from(local.ip()),
        dst: Addr::from(peer.ip()),
        protocol: ipproto::UDP,
        src_port: local.port(),
        dst_port: peer.port(),
        ttl: 64,
        ..Headers::default()
    };
    let body = vec![0x5au8; payload];
    let payloads: Vec<&[u8]> = (0..segments).map(|_| &body[..]).collect();
    let mut clock = SenderClock::start(secs);
    let (mut sent, mut full) = (0u64, 0u64);
    while clock.keep_sending(sent) {
        match tx.send(&headers, &payloads) {
            Ok(()) => sent += segments as u64,
            Err(SendError::Full) => full += 1,
            Err(SendError::Invalid(why)) => panic!("packet-send: {why}"),
        }
    }
    eprintln!("paqet-blast: packet-send sent {sent} frames, {full} writes found the device full");
}

fn xdp_opts(iface: &str, local: SocketAddr, peer: Option<SocketAddr>, role: &str) -> paqet::transport::xdp::XdpOptions {
    use paqet::transport::xdp::{AttachMode, Follow, WireShape, XdpOptions};
    XdpOptions {
        interface: iface.to_string(),
        instance: format!("bench-blast-{role}-{}", std::process::id()),
        local,
        local_other_family: None,
        follow: Follow::Fixed,
        peer,
        wire: WireShape::Udp,
        mode: AttachMode::Auto,
        // Any key, the same at both ends: the TCP-shaped wire's SYNs must carry its tag.
        syn_key: [7; 32],
    }
}

fn xdp_send(iface: &str, local: SocketAddr, peer: SocketAddr, secs: f64, payload: usize) {
    use paqet::engine::Transmit;
    use paqet::transport::Transport;
    use paqet::transport::xdp::XdpTransport;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    rt.block_on(async move {
        let t = XdpTransport::open(xdp_opts(iface, local, Some(peer), "send")).expect("opening the xdp transport");
        let batch: Vec<Transmit> = (0..256)
            .map(|_| Transmit {
                peer,
                path: paqet::engine::PathId(0),
                payload: vec![0x5a; payload],
            })
            .collect();
        let mut clock = SenderClock::start(secs);
        let mut rounds = 0u64;
        while clock.keep_sending(t.counters().snapshot().tx_frames) {
            t.send_batch(&batch).expect("send_batch");
            rounds += 1;
            if rounds.is_multiple_of(64) {
                // Lets the runtime run anything it has (nothing, normally).
                tokio::task::yield_now().await;
            }
        }
        eprintln!("paqet-blast: xdp-send: {:?}", t.counters().snapshot());
    });
}

fn xdp_recv(iface: &str, local: SocketAddr, secs: f64) {
    use paqet::transport::xdp::XdpTransport;
    use paqet::transport::{RecvBatch, Transport};
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    rt.block_on(async move {
        let t = XdpTransport::open(xdp_opts(iface, local, None, "recv")).expect("opening the xdp transport");
        println!("ready");
        let mut batch = RecvBatch::new(256, 2048);
        let started = Instant::now();
        let mut tally = Tally::new(secs);
        while !tally.done(started) {
            match tokio::time::timeout(Duration::from_millis(200), t.recv_batch(&mut batch)).await {
                Ok(Ok(())) => {
                    let bytes: u64 = batch.iter().map(|(_, p)| p.len() as u64).sum();
                    tally.add(batch.len() as u64, bytes);
                }
                Ok(Err(e)) => panic!("recv_batch: {e}"),
                Err(_) => {}
            }
        }
        tally.report();
        eprintln!(
            "paqet-blast: xdp-recv: {:?} socket drops {:?}",
            t.counters().snapshot(),
            t.socket_drops()
        );
    });
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    use std::io::Write;
    match args.first().map(String::as_str) {
        Some("udp-send") => udp_send(
            parse(args.get(1)),
            parse(args.get(2)),
            parse(args.get(3)),
            args.get(4).map_or(1, |_| parse(args.get(4))),
        ),
        Some("udp-recv") => udp_recv(
            parse(args.get(1)),
            parse(args.get(2)),
            args.get(3).map(|_| parse(args.get(3))),
        ),
        Some("xdp-send") => xdp_send(
            &args.get(1).cloned().unwrap_or_else(|| usage()),
            parse(args.get(2)),
            parse(args.get(3)),
            parse(args.get(4)),
            parse(args.get(5)),
        ),
        Some("packet-send") => packet_send(
            &args.get(1).cloned().unwrap_or_else(|| usage()),
            parse(args.get(2)),
            parse(args.get(3)),
            parse(args.get(4)),
            parse(args.get(5)),
            parse(args.get(6)),
        ),
        Some("xdp-recv") => xdp_recv(
            &args.get(1).cloned().unwrap_or_else(|| usage()),
            parse(args.get(2)),
            parse(args.get(3)),
        ),
        _ => usage(),
    }
    let _ = std::io::stdout().flush();
}
