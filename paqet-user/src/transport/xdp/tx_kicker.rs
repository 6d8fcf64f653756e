//! A thread that makes the kernel transmit what the engine put on the TX ring.
//!
//! In copy mode the kernel transmits inside `sendto`, at most 32 frames a call: it
//! builds an skb per frame and runs the driver's transmit, and on a veth also the
//! receiving end's XDP program and its copy into the peer's socket. That is about half
//! of a sending relay's CPU. Done on the engine's thread, it serialises with sealing the
//! next packets on one core; done here, a bulk sender uses the second core as well.
//!
//! A lone packet (a request, an ACK) is still kicked by the engine thread itself: waking
//! this thread would cost more than the call (see [`Xsk::send`](super::xsk::Xsk::send)).

use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;

use s2n_quic_xdp::{socket, syscall};

/// Bounds the `sendto` calls of one drain (32 frames each).
pub const MAX_KICKS: usize = 256;

/// Calls `sendto` until the kernel has taken the whole TX ring: it answers EAGAIN while
/// more than one call's budget is queued. A busy or out-of-buffer device is no error:
/// its frames stay on the ring for the next kick.
pub fn drain_tx_ring(fd: &socket::Fd) -> io::Result<()> {
    for _ in 0..MAX_KICKS {
        match syscall::wake_tx(fd) {
            Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => continue,
            Err(e) if matches!(e.raw_os_error(), Some(libc::EBUSY | libc::ENOBUFS)) => return Ok(()),
            other => return other,
        }
    }
    Ok(())
}

#[derive(Default)]
struct Flags {
    /// The engine queued frames since the thread last looked.
    requested: AtomicBool,
    /// The thread is draining (or about to): a request needs no wake-up.
    busy: AtomicBool,
    stop: AtomicBool,
}

pub struct TxKicker {
    flags: Arc<Flags>,
    thread: Option<JoinHandle<()>>,
}

impl TxKicker {
    pub fn spawn(fd: socket::Fd, queue: u32) -> io::Result<TxKicker> {
        let flags = Arc::new(Flags::default());
        let thread = std::thread::Builder::new().name(format!("paqet-tx{queue}")).spawn({
            let flags = flags.clone();
            move || run(&fd, queue, &flags)
        })?;
        Ok(TxKicker {
            flags,
            thread: Some(thread),
        })
    }

    /// True while the thread is working through the ring.
    pub fn busy(&self) -> bool {
        self.flags.busy.load(Ordering::Acquire)
    }

    /// Asks the thread to drain the TX ring.
    pub fn request(&self) {
        self.flags.requested.store(true, Ordering::Release);
        if let Some(t) = &self.thread {
            // Only a parked thread costs a system call to wake.
            t.thread().unpark();
        }
    }
}

impl Drop for TxKicker {
    fn drop(&mut self) {
        self.flags.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            t.thread().unpark();
            if t.join().is_err() {
                tracing::warn!("the AF_XDP TX thread panicked");
            }
        }
    }
}

fn run(fd: &socket::Fd, queue: u32, flags: &Flags) {
    loop {
        flags.busy.store(true, Ordering::Release);
        while flags.requested.swap(false, Ordering::AcqRel) {
            if let Err(e) = drain_tx_ring(fd) {
                tracing::debug!(queue, "AF_XDP TX kick failed: {e}");
            }
        }
        flags.busy.store(false, Ordering::Release);
        // A request that came after the loop's last look: take it now rather than
        // park and be unparked at once.
        if flags.requested.load(Ordering::Acquire) {
            continue;
        }
        if flags.stop.load(Ordering::Acquire) {
            return;
        }
        // `request` unparks after setting the flag, so a request that lands between
        // the look above and this call makes `park` return at once.
        std::thread::park();
    }
}
