//! `paqet_steer` on a real veth: attach it through `paqet::kernel` on the server side of
//! two namespaces, send real frames from the client side, and check the counters exactly.
//!
//! Exact counts need a silent link: IPv6 is off in the namespaces (no RS/MLD/ND) and
//! neighbours are permanent on both sides (no ARP), so every frame the program sees is
//! one the test sent. The program runs in NAPI context on veth, after the sender's
//! syscall returns, so each check first waits (bounded) for `seen` to reach its total
//! and then compares every counter.

use paqet::kernel::{AttachMode, AttachOptions, KernelError, Steering, pin_dir, read_pinned_stats};
use paqet_common::Stats;
use paqet_common::maps::{FilterConfig, PIN_STATS, Protocol};
use paqet_common::wire::Addr;
use paqet_tests::{TwoHosts, require_root, wait_for};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::process::Command;
use std::sync::{Mutex, Once};
use std::time::Duration;

const PORT: u16 = 4000;
const OTHER_PORT: u16 = 4001;
const WAIT: Duration = Duration::from_secs(10);

static LOGS: Mutex<Vec<u8>> = Mutex::new(Vec::new());

/// Tracing output goes to stderr and into LOGS, where tests look for the eBPF log lines.
struct Capture;

impl std::io::Write for Capture {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        LOGS.lock().unwrap_or_else(|e| e.into_inner()).extend_from_slice(b);
        eprint!("{}", String::from_utf8_lossy(b));
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn init_tracing() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let _ = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::DEBUG)
            .with_ansi(false)
            .with_writer(|| Capture)
            .try_init();
    });
}

fn logs_contain(needle: &str) -> bool {
    String::from_utf8_lossy(&LOGS.lock().unwrap_or_else(|e| e.into_inner())).contains(needle)
}

fn attach(hosts: &TwoHosts, instance: &str, mode: AttachMode, filter: FilterConfig) -> Steering {
    let opts = AttachOptions {
        interface: hosts.server_if.clone(),
        instance: instance.to_string(),
        mode,
        filter,
    };
    hosts
        .server
        .run(|| Steering::attach(opts))
        .expect("entering the server namespace")
        .expect("attaching paqet_steer")
}

fn server(port: u16) -> SocketAddr {
    SocketAddr::from((TwoHosts::SERVER_IP, port))
}

/// Sends `udp` datagrams to each (port, count), then one TCP SYN per (port, count); the
/// server has no listener, so its kernel answers each SYN with a RST and the connect
/// fails at once, after exactly one SYN.
fn send(hosts: &TwoHosts, udp: &[(u16, usize)], syns: &[(u16, usize)]) {
    hosts
        .client
        .run(|| {
            let sock = UdpSocket::bind((TwoHosts::CLIENT_IP, 0)).expect("bind UDP");
            for &(port, n) in udp {
                for i in 0..n {
                    sock.send_to(&[i as u8; 32], server(port)).expect("send UDP");
                }
            }
            for &(port, n) in syns {
                for _ in 0..n {
                    let r = TcpStream::connect_timeout(&server(port), Duration::from_secs(5));
                    let e = r.expect_err("nothing listens on the server");
                    assert_eq!(e.kind(), std::io::ErrorKind::ConnectionRefused, "{e}");
                }
            }
        })
        .expect("entering the client namespace");
}

/// Waits until `seen` reaches `want.seen`, then compares every counter.
fn expect_stats(s: &Steering, want: Stats) {
    let mut last = Stats::default();
    wait_for(
        || {
            last = s.stats().expect("reading stats");
            last.seen >= want.seen
        },
        WAIT,
    );
    assert_eq!(last, want);
}

fn bpftool(args: &[&str]) -> (bool, String) {
    let out = Command::new("bpftool").args(args).output().expect("running bpftool");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[test]
fn counts_matched_and_passed_frames_exactly() {
    if !require_root("xdp_steer::counts_matched_and_passed_frames_exactly") {
        return;
    }
    init_tracing();
    let hosts = TwoHosts::new("xs").expect("two namespaces");
    hosts.pin_neighbours().expect("static neighbours");
    let instance = format!("test-xs-{}", std::process::id());
    let mut steering = attach(
        &hosts,
        &instance,
        AttachMode::Auto,
        FilterConfig::new(Protocol::Udp, PORT),
    );
    assert_eq!(steering.stats().unwrap(), Stats::default(), "the link must be silent");

    // UDP filter: only the datagrams to PORT match.
    send(&hosts, &[(PORT, 5), (OTHER_PORT, 3)], &[(PORT, 2), (OTHER_PORT, 2)]);
    let mut want = Stats {
        seen: 12,
        matched: 5,
        passed: 12,
        ..Stats::default()
    };
    expect_stats(&steering, want);

    // TCP filter: now the SYNs to PORT match, the datagrams to PORT do not.
    steering.set_filter(&FilterConfig::new(Protocol::Tcp, PORT)).unwrap();
    send(&hosts, &[(PORT, 2)], &[(PORT, 2), (OTHER_PORT, 1)]);
    want.seen += 5;
    want.passed += 5;
    want.matched += 2;
    expect_stats(&steering, want);

    // A peer that is not the client: nothing matches.
    let stranger = Addr::v4([198, 18, 0, 9]);
    steering
        .set_filter(&FilterConfig::new(Protocol::Udp, PORT).with_peer(stranger, 0))
        .unwrap();
    send(&hosts, &[(PORT, 2)], &[]);
    want.seen += 2;
    want.passed += 2;
    expect_stats(&steering, want);

    // Frames to the port on another of the server's addresses (or forwarded through
    // it) stay the kernel's: nothing matches a filter for one local address.
    let elsewhere = Addr::v4([198, 18, 0, 77]);
    steering
        .set_filter(&FilterConfig::new(Protocol::Udp, PORT).with_locals(&[elsewhere]))
        .unwrap();
    send(&hosts, &[(PORT, 2)], &[]);
    want.seen += 2;
    want.passed += 2;
    expect_stats(&steering, want);
    let here = Addr::v4(TwoHosts::SERVER_IP.octets());
    steering
        .set_filter(&FilterConfig::new(Protocol::Udp, PORT).with_locals(&[here]))
        .unwrap();
    send(&hosts, &[(PORT, 2)], &[]);
    want.seen += 2;
    want.passed += 2;
    want.matched += 2;
    expect_stats(&steering, want);

    // Redirect requested but no AF_XDP socket on the queue: counted, and passed.
    let me = Addr::v4(TwoHosts::CLIENT_IP.octets());
    steering
        .set_filter(
            &FilterConfig::new(Protocol::Udp, PORT)
                .with_peer(me, 0)
                .with_redirect(true),
        )
        .unwrap();
    send(&hosts, &[(PORT, 3), (OTHER_PORT, 1)], &[]);
    want.seen += 4;
    want.passed += 4;
    want.matched += 3;
    want.no_socket += 3;
    expect_stats(&steering, want);

    // What an operator sees.
    let id = steering.program_id().unwrap();
    let (ok, text) = bpftool(&["prog", "show", "name", "paqet_steer"]);
    assert!(ok, "bpftool prog show name paqet_steer failed: {text}");
    assert!(text.contains(&format!("{id}: xdp")), "program {id} not listed: {text}");
    let stats_pin = pin_dir(&instance).unwrap().join(PIN_STATS);
    let (ok, text) = bpftool(&["map", "dump", "pinned", stats_pin.to_str().unwrap()]);
    assert!(ok, "bpftool map dump failed: {text}");
    for field in ["seen", "matched", "passed", "redirected", "no_socket", "malformed"] {
        assert!(
            text.contains(&format!("\"{field}\": ")),
            "no named field {field} in: {text}"
        );
    }
    assert_eq!(read_pinned_stats(&instance).unwrap(), want);

    let dir = steering.pin_dir().to_path_buf();
    steering.detach().expect("detach");
    assert!(!dir.exists(), "{} still exists after detach", dir.display());
    let (ok, text) = bpftool(&["prog", "show", "id", &id.to_string()]);
    assert!(!ok, "program {id} still loaded after detach: {text}");
    assert!(matches!(
        read_pinned_stats(&instance),
        Err(KernelError::NotPinned { .. })
    ));
}

/// Sends one raw Ethernet frame out of `ifname` (AF_PACKET; protocol 0: send only).
fn send_raw(ifname: &str, frame: &[u8]) -> std::io::Result<()> {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    let name = std::ffi::CString::new(ifname).map_err(std::io::Error::other)?;
    // SAFETY: plain socket/sendto calls on a fd we own, with a zeroed sockaddr_ll that
    // we fill in completely for the fields the kernel reads.
    unsafe {
        let fd = libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0);
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let fd = OwnedFd::from_raw_fd(fd);
        let mut sll: libc::sockaddr_ll = std::mem::zeroed();
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_ifindex = libc::if_nametoindex(name.as_ptr()) as i32;
        sll.sll_halen = 6;
        sll.sll_addr[..6].copy_from_slice(&frame[..6]);
        let n = libc::sendto(
            fd.as_raw_fd(),
            frame.as_ptr().cast(),
            frame.len(),
            0,
            (&sll as *const libc::sockaddr_ll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        );
        if n < 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Ethernet + IPv4 (checksum left 0: XDP does not check it) + UDP to PORT, from the
/// client to the server; the caller corrupts it.
fn udp_frame(dst: [u8; 6], src: [u8; 6]) -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&0x0800u16.to_be_bytes());
    f.extend_from_slice(&[0x45, 0, 0, 36, 0, 1, 0x40, 0, 64, 17, 0, 0]);
    f.extend_from_slice(&TwoHosts::CLIENT_IP.octets());
    f.extend_from_slice(&TwoHosts::SERVER_IP.octets());
    f.extend_from_slice(&5000u16.to_be_bytes());
    f.extend_from_slice(&PORT.to_be_bytes());
    f.extend_from_slice(&16u16.to_be_bytes());
    f.extend_from_slice(&[0, 0]);
    f.extend_from_slice(b"12345678");
    f
}

#[test]
fn counts_and_logs_malformed_frames() {
    if !require_root("xdp_steer::counts_and_logs_malformed_frames") {
        return;
    }
    init_tracing();
    let hosts = TwoHosts::new("xm").expect("two namespaces");
    hosts.pin_neighbours().expect("static neighbours");
    let instance = format!("test-xm-{}", std::process::id());
    let steering = attach(
        &hosts,
        &instance,
        AttachMode::Generic,
        FilterConfig::new(Protocol::Udp, PORT),
    );
    assert_eq!(steering.mode().as_str(), "generic");

    let smac = hosts.server.mac(&hosts.server_if).unwrap();
    let cmac = hosts.client.mac(&hosts.client_if).unwrap();
    let good = udp_frame(smac, cmac);
    // IP total length 100, frame holds 36 bytes of IP: truncated.
    let mut long = good.clone();
    long[16..18].copy_from_slice(&100u16.to_be_bytes());
    // IHL 4 (16 bytes): malformed.
    let mut short_ihl = good.clone();
    short_ihl[14] = 0x44;
    // UDP length beyond the IP payload: malformed.
    let mut udp_len = good.clone();
    udp_len[38..40].copy_from_slice(&40u16.to_be_bytes());
    // Cut inside the UDP header: truncated.
    let cut = good[..14 + 20 + 4].to_vec();
    let client_if = hosts.client_if.clone();
    hosts
        .client
        .run(|| {
            for f in [&good, &long, &short_ihl, &udp_len, &cut] {
                send_raw(&client_if, f).expect("AF_PACKET send");
            }
        })
        .unwrap();
    expect_stats(
        &steering,
        Stats {
            seen: 5,
            matched: 1,
            passed: 5,
            malformed: 4,
            ..Stats::default()
        },
    );
    assert!(
        wait_for(|| logs_contain("paqet_steer: malformed frame"), WAIT),
        "the eBPF log line did not reach tracing"
    );
    drop(steering);
    assert!(!pin_dir(&instance).unwrap().exists());
}

#[test]
fn a_live_instances_pins_are_never_taken_over() {
    if !require_root("xdp_steer::a_live_instances_pins_are_never_taken_over") {
        return;
    }
    init_tracing();
    let hosts = TwoHosts::new("xp").expect("two namespaces");
    let instance = format!("test-xp-{}", std::process::id());
    let filter = FilterConfig::new(Protocol::Udp, PORT);
    let first = attach(&hosts, &instance, AttachMode::Generic, filter);
    // A second process of the same instance (a second copy of the service, or `paqet
    // check` beside a running client) must not take the live one's pins. Pins are
    // replaced only once no loaded program uses them (after a kill -9: the service
    // test `kill_9_then_start_again_replaces_stale_pins_and_relays`).
    let opts = AttachOptions {
        interface: hosts.client_if.clone(),
        instance: instance.clone(),
        mode: AttachMode::Generic,
        filter,
    };
    let second = hosts.client.run(|| Steering::attach(opts.clone())).unwrap();
    assert!(
        matches!(second, Err(KernelError::InstanceRunning { .. })),
        "a second owner attached over live pins"
    );
    hosts.pin_neighbours().unwrap();
    send(&hosts, &[], &[(PORT, 1)]);
    wait_for(|| first.stats().map(|s| s.seen >= 1).unwrap_or(false), WAIT);
    assert_eq!(
        read_pinned_stats(&instance).unwrap(),
        first.stats().unwrap(),
        "the live instance lost its pins"
    );
    drop(first);
    assert!(!pin_dir(&instance).unwrap().exists());
    let second = hosts
        .client
        .run(|| Steering::attach(opts))
        .unwrap()
        .expect("attach once the first owner is gone");
    drop(second);
    assert!(!pin_dir(&instance).unwrap().exists());
}
