//! The project's link emulator (these kernels have no netem): a two-port Ethernet
//! bridge in its own network namespace that delays, drops, reorders and rate-limits
//! frames, each direction on its own thread. Shared by the tests and the benchmarks.
//!
//! Usage: paqet-linkem IF_A IF_B [--delay-ms D] [--jitter-ms J] [--loss P] [--rate-mbit R]
//!                    [--queue-frames N] [--seed S] [--max-seconds T]
//!
//! - delay: one-way, each direction (RTT = 2 × delay).
//! - jitter: an extra uniform 0..J ms per frame, which reorders frames.
//! - loss: probability (0..1) that a frame is dropped, independently per frame.
//! - rate: a token bucket on each direction's output; frames beyond the queue limit are
//!   dropped at the tail, like a router's buffer.
//! - max-seconds: exits by itself after this long (every loop here is bounded).

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

#[derive(Clone, Copy, Debug)]
struct Impairment {
    delay: Duration,
    jitter: Duration,
    loss: f64,
    /// Bytes per second; 0 = unlimited.
    rate: f64,
    queue_frames: usize,
}

/// A small deterministic PRNG so a run can be repeated with the same seed.
struct Rng(u64);

impl Rng {
    fn next_f64(&mut self) -> f64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 >> 11) as f64 / (1u64 << 53) as f64
    }
}

fn packet_socket(ifname: &str) -> io::Result<OwnedFd> {
    let proto = (libc::ETH_P_ALL as u16).to_be();
    // SAFETY: plain socket(2); the fd is owned below.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, proto as i32) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh valid descriptor.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    let name = CString::new(ifname).map_err(|_| io::Error::other("interface name has a NUL"))?;
    // SAFETY: a valid C string.
    let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
    if ifindex == 0 {
        return Err(io::Error::other(format!("no interface {ifname}")));
    }
    // SAFETY: all-zero sockaddr_ll is valid; the fields that matter are set.
    let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    addr.sll_family = libc::AF_PACKET as u16;
    addr.sll_protocol = proto;
    addr.sll_ifindex = ifindex as i32;
    // SAFETY: addr is a valid sockaddr_ll of the given size.
    let rc = unsafe {
        libc::bind(
            sock.as_raw_fd(),
            (&addr as *const libc::sockaddr_ll).cast(),
            size_of::<libc::sockaddr_ll>() as u32,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // Frames this bridge sends out must not come back in as input.
    let one: libc::c_int = 1;
    // SAFETY: valid option pointer and length.
    unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_PACKET,
            libc::PACKET_IGNORE_OUTGOING,
            (&one as *const libc::c_int).cast(),
            4,
        );
    }
    // A deep socket buffer (64 MiB asked, which the kernel doubles): the emulated link
    // loses what `--loss` says, not whatever a burst finds no room for in the kernel's
    // default (~200 KiB, ~90 frames).
    for (force, plain) in [
        (libc::SO_RCVBUFFORCE, libc::SO_RCVBUF),
        (libc::SO_SNDBUFFORCE, libc::SO_SNDBUF),
    ] {
        if set_int(&sock, libc::SOL_SOCKET, force, SOCKET_BUFFER).is_err() {
            let _ = set_int(&sock, libc::SOL_SOCKET, plain, SOCKET_BUFFER);
        }
    }
    Ok(sock)
}

const SOCKET_BUFFER: libc::c_int = 64 << 20;

fn set_int(sock: &OwnedFd, level: libc::c_int, name: libc::c_int, value: libc::c_int) -> io::Result<()> {
    // SAFETY: valid option pointer and length.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            level,
            name,
            (&value as *const libc::c_int).cast(),
            size_of::<libc::c_int>() as u32,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Frames the kernel dropped before this bridge could read them (a full socket buffer).
fn kernel_drops(sock: &OwnedFd) -> u64 {
    let mut stats = libc::tpacket_stats {
        tp_packets: 0,
        tp_drops: 0,
    };
    let mut len = size_of::<libc::tpacket_stats>() as libc::socklen_t;
    // SAFETY: valid output pointer and length for PACKET_STATISTICS.
    let rc = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_PACKET,
            libc::PACKET_STATISTICS,
            (&mut stats as *mut libc::tpacket_stats).cast(),
            &mut len,
        )
    };
    if rc == 0 { stats.tp_drops as u64 } else { 0 }
}

struct Queued {
    due: Instant,
    seq: u64,
    frame: Vec<u8>,
}

impl PartialEq for Queued {
    fn eq(&self, o: &Self) -> bool {
        (self.due, self.seq) == (o.due, o.seq)
    }
}
impl Eq for Queued {}
impl PartialOrd for Queued {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Queued {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        (self.due, self.seq).cmp(&(o.due, o.seq))
    }
}

#[derive(Default, Debug)]
struct Tally {
    forwarded: u64,
    lost: u64,
    tail_dropped: u64,
    /// Dropped by the kernel before the bridge read them: should stay 0.
    kernel_dropped: u64,
}

/// Forwards frames from `input` to `output` with the impairment, until `until`.
fn pump(input: &OwnedFd, output: &OwnedFd, imp: Impairment, seed: u64, until: Instant) -> Tally {
    let mut rng = Rng(seed | 1);
    let mut queue: BinaryHeap<Reverse<Queued>> = BinaryHeap::new();
    let mut tally = Tally::default();
    let mut seq = 0u64;
    // When the emulated wire finishes sending what is already scheduled.
    let mut wire_free = Instant::now();
    let mut buf = vec![0u8; 65536];
    while Instant::now() < until {
        let now = Instant::now();
        let wait_ms = queue.peek().map_or(50, |Reverse(q)| {
            q.due.saturating_duration_since(now).as_millis().min(50) as i32
        });
        let mut pfd = libc::pollfd {
            fd: input.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        unsafe { libc::poll(&mut pfd, 1, wait_ms) };
        loop {
            // SAFETY: buf is valid for its length.
            let n = unsafe {
                libc::recv(
                    input.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    libc::MSG_DONTWAIT,
                )
            };
            if n <= 0 {
                break;
            }
            if rng.next_f64() < imp.loss {
                tally.lost += 1;
                continue;
            }
            if queue.len() >= imp.queue_frames {
                tally.tail_dropped += 1;
                continue;
            }
            let now = Instant::now();
            let mut due = now + imp.delay + imp.jitter.mul_f64(rng.next_f64());
            if imp.rate > 0.0 {
                let serialise = Duration::from_secs_f64(n as f64 / imp.rate);
                wire_free = wire_free.max(now) + serialise;
                due = due.max(wire_free + imp.delay);
            }
            seq += 1;
            queue.push(Reverse(Queued {
                due,
                seq,
                frame: buf[..n as usize].to_vec(),
            }));
        }
        let now = Instant::now();
        while queue.peek().is_some_and(|Reverse(q)| q.due <= now) {
            let Some(Reverse(q)) = queue.pop() else { break };
            // SAFETY: the frame buffer is valid for its length.
            let sent = unsafe { libc::send(output.as_raw_fd(), q.frame.as_ptr().cast(), q.frame.len(), 0) };
            if sent > 0 {
                tally.forwarded += 1;
            }
        }
        tally.kernel_dropped += kernel_drops(input);
    }
    tally
}

fn arg<T: std::str::FromStr>(args: &[String], name: &str, default: T) -> T {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .map(|v| {
            v.parse()
                .unwrap_or_else(|_| usage(&format!("bad value for {name}: {v}")))
        })
        .unwrap_or(default)
}

fn usage(why: &str) -> ! {
    eprintln!(
        "paqet-linkem: {why}\nusage: paqet-linkem IF_A IF_B [--delay-ms D] [--jitter-ms J] [--loss P] [--rate-mbit R] [--queue-frames N] [--seed S] [--max-seconds T]"
    );
    std::process::exit(2);
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (Some(if_a), Some(if_b)) = (args.first().cloned(), args.get(1).cloned()) else {
        usage("two interfaces are required")
    };
    let imp = Impairment {
        delay: Duration::from_secs_f64(arg(&args, "--delay-ms", 0.0) / 1000.0),
        jitter: Duration::from_secs_f64(arg(&args, "--jitter-ms", 0.0) / 1000.0),
        loss: arg(&args, "--loss", 0.0),
        rate: arg(&args, "--rate-mbit", 0.0) * 1e6 / 8.0,
        queue_frames: arg(&args, "--queue-frames", 20_000),
    };
    if !(0.0..=1.0).contains(&imp.loss) {
        usage("--loss is a probability between 0 and 1");
    }
    let seed: u64 = arg(&args, "--seed", 1);
    let until = Instant::now() + Duration::from_secs(arg(&args, "--max-seconds", 3600));
    let (a, b) = match (packet_socket(&if_a), packet_socket(&if_b)) {
        (Ok(a), Ok(b)) => (a, b),
        (Err(e), _) | (_, Err(e)) => {
            eprintln!("paqet-linkem: cannot open packet sockets ({e}); it needs CAP_NET_RAW and the two interfaces");
            std::process::exit(1);
        }
    };
    eprintln!("paqet-linkem: {if_a} <-> {if_b} {imp:?}");
    let (ab, ba) = std::thread::scope(|s| {
        let ab = s.spawn(|| pump(&a, &b, imp, seed, until));
        let ba = s.spawn(|| pump(&b, &a, imp, seed.wrapping_mul(31), until));
        (ab.join(), ba.join())
    });
    eprintln!("paqet-linkem: done: {if_a}->{if_b} {ab:?}, {if_b}->{if_a} {ba:?}");
}
