//! The AF_XDP sockets of one RX queue: their own UMEM and its four rings. Copy mode
//! puts the TX ring on a second socket that shares the first's UMEM (see [`Xsk`]).
//!
//! Built on s2n-quic-xdp's generic `umem`, `ring`, `socket` and `syscall` modules
//! (Apache-2.0, built on the same aya 0.14 as our loader, and verified on these
//! machines: its Fill/Rx rings took every frame of a 450 kpps copy-mode flood on a
//! veth). xdpilone, the other pure-Rust option, is EUPL-1.2, a copyleft we do not
//! want in an MIT OR Apache-2.0 binary; a ring of our own on `libc` would be the same
//! few hundred lines of unsafe pointer work that s2n-quic-xdp has already fuzzed.
//! Its QUIC-flavoured `io` module is not used.
//!
//! UMEM layout: the first half of the frames belong to RX (they circulate between the
//! fill ring, the kernel and the RX ring), the second half to TX (a free list here,
//! the TX ring, the kernel, the completion ring). Each half equals its rings' size, so
//! the fill and completion rings can never overflow.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Mutex;

use s2n_quic_xdp::if_xdp::{Address, DescriptorFlags, RxTxDescriptor, UmemDescriptor, XdpFlags};
use s2n_quic_xdp::{ring, socket, syscall, umem::Umem};

use super::tx_kicker::{self, TxKicker};

/// Bytes per UMEM frame: one Ethernet frame of a 1500-byte MTU plus the 256 bytes of
/// headroom the kernel keeps in front of received packets.
pub const FRAME_SIZE: u32 = 2048;
/// UMEM frames for all queues together without CAP_IPC_LOCK (4 MiB of locked memory):
/// RLIMIT_MEMLOCK is often 8 MiB, charged per user, and a client and a server on one
/// host share it.
pub const UMEM_FRAMES: u32 = 2048;
/// With CAP_IPC_LOCK (the service has it): 16 MiB, a 4,096-frame RX ring. A small ring
/// overflows whenever the receiving relay waits for a CPU longer than the ring lasts
/// (1,024 frames are ~3 ms of a download), and KCP resends what it dropped. 2,048
/// frames instead of 1,024 took the 1,000-stream test from ~7.5 to ~4.5 s and the lossy
/// download ~20 % faster; 4,096 instead of 2,048 cut the frames a one-stream download
/// lost at the ring from ~7 % to ~0.5 %: ~8 % more throughput at ~10 % less CPU per
/// GiB (BENCHMARKS.md).
pub const UMEM_FRAMES_LOCKED: u32 = 8192;
/// Fewest frames one queue gets when many queues split [`UMEM_FRAMES`].
const MIN_QUEUE_FRAMES: u32 = 256;
/// Headroom the kernel reserves before packet data in every RX frame.
const XDP_PACKET_HEADROOM: u32 = 256;
/// Largest frame this UMEM can carry (RX keeps the kernel's headroom; TX uses the same
/// bound so a frame we send is one we could receive).
pub const MAX_FRAME: usize = (FRAME_SIZE - XDP_PACKET_HEADROOM) as usize;
/// Most frames the engine's thread transmits itself when there is a TX thread: a lone
/// reply or ACK goes out without waking another thread, anything more is the thread's.
/// Each frame's `sendto` also runs a veth peer's XDP program and copy inline, so the
/// engine kicking up to one call's 32 frames itself cost it ~12 % of its CPU; at 2, one
/// stream over xdp moved ~8 % more at ~9 % less CPU per GiB (BENCHMARKS.md).
const ENGINE_KICKS_AT_MOST: usize = 2;

#[derive(Debug, thiserror::Error)]
pub enum XskError {
    #[error("{what} failed")]
    Setup {
        what: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("binding the AF_XDP socket to queue {queue} of interface #{ifindex} ({mode}) failed")]
    Bind {
        ifindex: u32,
        queue: u32,
        mode: &'static str,
        #[source]
        source: io::Error,
    },
}

fn setup(what: &'static str) -> impl FnOnce(io::Error) -> XskError {
    move |source| XskError::Setup { what, source }
}

/// Frames per queue: an equal share of the `budget`, a power of two (ring sizes must
/// be), at least [`MIN_QUEUE_FRAMES`].
pub fn frames_per_queue(budget: u32, queues: u32) -> u32 {
    let share = (budget / queues.max(1)).max(MIN_QUEUE_FRAMES);
    1 << (31 - share.leading_zeros())
}

pub struct RxSide {
    rx: ring::Rx,
    fill: ring::Fill,
}

pub struct TxSide {
    tx: ring::Tx,
    completion: ring::Completion,
    /// TX frames owned by us, ready to be written.
    free: Vec<u64>,
}

pub struct Xsk {
    // Dropped first: the thread stops before the socket and the UMEM go.
    tx_thread: Option<TxKicker>,
    /// The socket in the XSKMAP, whose readiness the engine waits on: it owns the UMEM,
    /// the fill, completion and RX rings (and in zero-copy mode the TX ring too).
    fd: socket::Fd,
    /// The socket whose TX ring carries our frames. In copy mode a second socket on the
    /// same queue and UMEM: the kernel transmits a copy-mode socket's TX ring whenever
    /// the socket is polled, so with one socket every wake-up of the engine for received
    /// frames also ran the transmit path on the engine's thread, contending with the TX
    /// thread for the socket's mutex (BENCHMARKS.md). A socket with no RX ring is never
    /// polled, so only `sendto` transmits.
    tx_fd: socket::Fd,
    umem: Umem,
    queue: u32,
    zero_copy: bool,
    pub rx: Mutex<RxSide>,
    pub tx: Mutex<TxSide>,
}

impl Xsk {
    /// Opens a socket on `queue` of `ifindex`: zero-copy first when `try_zero_copy`
    /// (only drivers with native XDP support it; veth does not), else copy mode.
    pub fn open(ifindex: u32, queue: u32, frames: u32, try_zero_copy: bool) -> Result<Xsk, XskError> {
        if try_zero_copy {
            match Xsk::open_mode(ifindex, queue, frames, true) {
                Ok(x) => return Ok(x),
                Err(e) => tracing::info!(
                    queue,
                    "AF_XDP zero-copy unavailable ({}); using copy mode",
                    crate::kernel::error_chain(&e)
                ),
            }
        }
        Xsk::open_mode(ifindex, queue, frames, false)
    }

    fn open_mode(ifindex: u32, queue: u32, frames: u32, zero_copy: bool) -> Result<Xsk, XskError> {
        let ring_size = frames / 2;
        let umem = Umem::builder();
        let umem = s2n_quic_xdp::umem::Builder {
            frame_size: FRAME_SIZE,
            frame_count: frames,
            ..umem
        }
        .build()
        .map_err(setup("allocating the UMEM"))?;
        let fd = socket::Fd::open().map_err(setup("opening an AF_XDP socket"))?;
        fd.attach_umem(&umem).map_err(setup(
            "registering the UMEM (locked memory: RLIMIT_MEMLOCK or CAP_IPC_LOCK)",
        ))?;
        let offsets = syscall::offsets(&fd).map_err(setup("reading the ring offsets"))?;
        let mut fill = ring::Fill::new(fd.clone(), &offsets, ring_size).map_err(setup("creating the fill ring"))?;
        let completion =
            ring::Completion::new(fd.clone(), &offsets, ring_size).map_err(setup("creating the completion ring"))?;
        let rx = ring::Rx::new(fd.clone(), &offsets, ring_size).map_err(setup("creating the RX ring"))?;
        let tx_fd = if zero_copy {
            fd.clone()
        } else {
            socket::Fd::open().map_err(setup("opening the AF_XDP socket for TX"))?
        };
        let tx_offsets = syscall::offsets(&tx_fd).map_err(setup("reading the TX socket's ring offsets"))?;
        let tx = ring::Tx::new(tx_fd.clone(), &tx_offsets, ring_size).map_err(setup("creating the TX ring"))?;

        // Every RX frame goes to the kernel before the socket is bound, so the first
        // packets already have somewhere to land.
        fill.init(umem.frames().take(ring_size as usize));
        let free: Vec<u64> = umem.frames().skip(ring_size as usize).map(|d| d.address).collect();

        let mode = if zero_copy { "zero-copy" } else { "copy mode" };
        let bind_failed = |source| XskError::Bind {
            ifindex,
            queue,
            mode,
            source,
        };
        let mode_flag = if zero_copy { XdpFlags::ZEROCOPY } else { XdpFlags::COPY };
        let mut addr = Address {
            ifindex,
            queue_id: queue,
            flags: mode_flag | XdpFlags::USE_NEED_WAKEUP,
            ..Default::default()
        };
        syscall::bind(&fd, &mut addr).map_err(bind_failed)?;
        if !zero_copy {
            // Shares the first socket's UMEM, fill and completion rings; the mode and
            // the wake-up flag come with them (the kernel refuses them here).
            let mut shared = Address {
                ifindex,
                queue_id: queue,
                ..Default::default()
            };
            shared.set_shared_umem(&fd);
            syscall::bind(&tx_fd, &mut shared).map_err(bind_failed)?;
        }
        Ok(Xsk {
            tx_thread: None,
            fd,
            tx_fd,
            umem,
            queue,
            zero_copy,
            rx: Mutex::new(RxSide { rx, fill }),
            tx: Mutex::new(TxSide { tx, completion, free }),
        })
    }

    /// Moves copy-mode transmission to a thread of its own (see [`tx_kicker`]).
    pub fn start_tx_thread(&mut self) -> io::Result<()> {
        if !self.zero_copy && self.tx_thread.is_none() {
            self.tx_thread = Some(TxKicker::spawn(self.tx_fd.clone(), self.queue)?);
        }
        Ok(())
    }

    pub fn queue(&self) -> u32 {
        self.queue
    }

    pub fn zero_copy(&self) -> bool {
        self.zero_copy
    }

    pub fn fd(&self) -> &socket::Fd {
        &self.fd
    }

    /// The kernel's drop counters for this socket.
    pub fn statistics(&self) -> io::Result<s2n_quic_xdp::if_xdp::Statistics> {
        syscall::statistics(&self.fd)
    }

    /// A received frame's bytes, or `None` for a descriptor outside the UMEM (which a
    /// correct kernel never produces; checked because the slice must be in bounds).
    fn rx_frame(&self, d: RxTxDescriptor) -> Option<&[u8]> {
        let end = d.address.checked_add(u64::from(d.len))?;
        if end > self.umem.len() as u64 {
            return None;
        }
        // SAFETY: in bounds (checked above); the frame belongs to us from the moment
        // the RX ring hands it over until we put it back on the fill ring, and the
        // caller's borrow ends before that (see `drain_rx`).
        Some(unsafe { std::slice::from_raw_parts(self.umem.as_ptr().add(d.address as usize), d.len as usize) })
    }

    /// Hands up to `max` received frames to `each`, then returns their frames to the
    /// fill ring at once, so the kernel never runs short. Returns how many were taken.
    pub fn drain_rx(&self, side: &mut RxSide, max: u32, mut each: impl FnMut(Option<&[u8]>)) -> u32 {
        let n = side.rx.acquire(max).min(max);
        if n == 0 {
            return 0;
        }
        let room = side.fill.acquire(n);
        // RX frames number the fill ring's size, so it always has room for every frame
        // the RX ring hands back.
        debug_assert!(room >= n, "fill ring has room {room} for {n} frames");
        let n = n.min(room);
        {
            let (a, b) = side.rx.data();
            let (fa, fb) = side.fill.data();
            let fill_slots = fa.iter_mut().chain(fb.iter_mut());
            for (d, slot) in a.iter().chain(b.iter()).take(n as usize).zip(fill_slots) {
                each(self.rx_frame(*d));
                // Aligned-chunk UMEM: the kernel wants the frame's start back.
                *slot = UmemDescriptor {
                    address: d.address & !u64::from(FRAME_SIZE - 1),
                };
            }
        }
        side.rx.release(n);
        side.fill.release(n);
        // Drivers that sleep (zero-copy with need_wakeup) must be told the fill ring
        // has frames again; copy mode never asks.
        if side.fill.needs_wakeup() {
            let _ = syscall::busy_poll(&self.fd);
        }
        n
    }

    /// True when the RX ring holds frames (to decide whether readiness was real).
    pub fn rx_pending(side: &mut RxSide) -> bool {
        side.rx.acquire(1) > 0
    }

    /// Queues frames for items `0..count` in order: `write(i, frame)` fills frame `i`
    /// and returns its length, or `None` to skip item `i`. Stops when the TX ring or the
    /// free frames run out. Returns (frames queued, items processed): items from the
    /// second number on found no room.
    pub fn send(
        &self,
        side: &mut TxSide,
        count: usize,
        mut write: impl FnMut(usize, &mut [u8]) -> Option<usize>,
    ) -> (usize, usize) {
        reap_completions(side);
        if side.free.len() < count.min(side.tx.capacity()) && self.tx_thread.is_some() {
            // The TX thread has not caught up: wait for the kernel here rather than
            // drop what does not fit (KCP would have to resend it).
            self.kick_tx(side);
            reap_completions(side);
        }
        let room = (side.tx.acquire(count as u32) as usize).min(side.free.len());
        let mut queued = 0usize;
        let mut processed = 0usize;
        {
            let TxSide { tx, free, .. } = side;
            let (a, b) = tx.data();
            let mut slots = a.iter_mut().chain(b.iter_mut()).take(room);
            while processed < count && queued < room {
                let Some(&addr) = free.last() else { break };
                // SAFETY: `addr` is a TX frame on our free list: the kernel is not using
                // it, and its FRAME_SIZE bytes lie inside the UMEM (`frames()` made it).
                let frame = unsafe { std::slice::from_raw_parts_mut(self.umem.as_ptr().add(addr as usize), MAX_FRAME) };
                let i = processed;
                processed += 1;
                let Some(len) = write(i, frame) else { continue };
                let Some(slot) = slots.next() else { break };
                *slot = RxTxDescriptor {
                    address: addr,
                    len: len as u32,
                    options: DescriptorFlags::empty(),
                };
                free.pop();
                queued += 1;
            }
            // Items the loop could not reach (room ran out) are left unprocessed; an item
            // skipped by `write` still counts as processed.
        }
        side.tx.release(queued as u32);
        let pending = side.tx.capacity() - side.tx.acquire(u32::MAX) as usize;
        match &self.tx_thread {
            Some(t) if pending > ENGINE_KICKS_AT_MOST || (pending > 0 && t.busy()) => t.request(),
            _ if pending > 0 => self.kick_tx(side),
            _ => {}
        }
        (queued, processed)
    }

    /// Tells the kernel to transmit what is on the TX ring, when it asks to be told
    /// (copy mode always does). Busy or out-of-buffer devices keep the frames on the
    /// ring for the next kick.
    fn kick_tx(&self, side: &mut TxSide) {
        // Copy mode always transmits in `sendto` (a TX-only socket's ring need not say so).
        if self.zero_copy && !side.tx.needs_wakeup() {
            return;
        }
        if let Err(e) = tx_kicker::drain_tx_ring(&self.tx_fd) {
            tracing::debug!(queue = self.queue, "AF_XDP TX kick failed: {e}");
        }
    }
}

fn reap_completions(side: &mut TxSide) {
    let n = side.completion.acquire(u32::MAX);
    if n == 0 {
        return;
    }
    let (a, b) = side.completion.data();
    side.free
        .extend(a.iter().chain(b.iter()).take(n as usize).map(|d| d.address));
    side.completion.release(n);
}

impl AsRawFd for Xsk {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queue_shares_are_powers_of_two_within_budget() {
        assert_eq!(frames_per_queue(UMEM_FRAMES, 1), UMEM_FRAMES);
        assert_eq!(frames_per_queue(UMEM_FRAMES, 2), UMEM_FRAMES / 2);
        assert_eq!(frames_per_queue(UMEM_FRAMES, 3), 512);
        assert_eq!(frames_per_queue(UMEM_FRAMES_LOCKED, 3), 2048);
        assert_eq!(frames_per_queue(UMEM_FRAMES, 64), MIN_QUEUE_FRAMES);
        assert_eq!(frames_per_queue(UMEM_FRAMES, 0), UMEM_FRAMES);
    }
}
