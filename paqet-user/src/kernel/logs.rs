//! Carries the XDP program's aya-log records into `tracing`, on a small thread that
//! owns the `EbpfLogger` (which must outlive the program: it holds the log map's fd).

use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;

/// Forwards `log` records (what aya-log produces) to `tracing`, under one target so
/// users can filter them: `RUST_LOG=paqet::ebpf=debug`.
pub struct ToTracing;

impl log::Log for ToTracing {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }

    fn log(&self, r: &log::Record<'_>) {
        match r.level() {
            log::Level::Error => tracing::error!(target: "paqet::ebpf", "{}", r.args()),
            log::Level::Warn => tracing::warn!(target: "paqet::ebpf", "{}", r.args()),
            log::Level::Info => tracing::info!(target: "paqet::ebpf", "{}", r.args()),
            log::Level::Debug => tracing::debug!(target: "paqet::ebpf", "{}", r.args()),
            log::Level::Trace => tracing::trace!(target: "paqet::ebpf", "{}", r.args()),
        }
    }

    fn flush(&self) {}
}

/// The most verbose level `tracing` will show, in aya-log's numbering (0 = off,
/// 1 = error ... 5 = trace), so the program does not even emit what nobody reads.
pub fn aya_level() -> u8 {
    use tracing::level_filters::LevelFilter;
    match LevelFilter::current() {
        LevelFilter::OFF => 0,
        LevelFilter::ERROR => 1,
        LevelFilter::WARN => 2,
        LevelFilter::INFO => 3,
        LevelFilter::DEBUG => 4,
        _ => 5,
    }
}

pub struct LogPump {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl LogPump {
    pub fn start(mut logger: aya_log::EbpfLogger<ToTracing>) -> std::io::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name("paqet-ebpf-log".into())
            .spawn(move || {
                let fd = logger.as_raw_fd();
                // Wakes on new records, and at least every 200 ms to see the stop flag.
                while !flag.load(Ordering::Relaxed) {
                    let mut pfd = libc::pollfd {
                        fd,
                        events: libc::POLLIN,
                        revents: 0,
                    };
                    // SAFETY: one valid pollfd; the fd stays open as long as `logger` lives.
                    unsafe { libc::poll(&mut pfd, 1, 200) };
                    logger.flush();
                }
                logger.flush();
            })?;
        Ok(LogPump {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for LogPump {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
