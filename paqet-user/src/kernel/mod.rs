//! The loader for paqet's XDP side (`paqet-ebpf`'s twin): load the embedded object,
//! attach `paqet_steer`, write the filter, pin the maps, read the counters, register
//! AF_XDP sockets, and take it all down again.
//!
//! ```no_run
//! use paqet::kernel::{AttachMode, AttachOptions, Steering};
//! use paqet_common::maps::{FilterConfig, Protocol};
//! # fn main() -> Result<(), paqet::kernel::KernelError> {
//! let steering = Steering::attach(AttachOptions {
//!     interface: "veth0".into(),
//!     instance: "server-veth0".into(),
//!     mode: AttachMode::Auto,
//!     filter: FilterConfig::new(Protocol::Udp, 4000),
//! })?;
//! println!("{:?}", steering.stats()?);
//! steering.detach()?; // or just drop it
//! # Ok(()) }
//! ```
//!
//! Maps are pinned under `/sys/fs/bpf/paqet/<instance>/` (`filter`, `stats`, `xsks`) so
//! `bpftool map dump pinned ...` and `paqet status` ([`read_pinned_stats`]) can see a
//! running instance. The attachment itself is a BPF link owned by this process: if the
//! process dies the kernel detaches the program, and the next start of the same
//! instance replaces the stale pins.

pub mod caps;
mod error;
mod logs;
mod pins;

pub use error::{KernelError, SETCAP_HINT};
pub use pins::{BPFFS, PIN_ROOT, instance_owners, is_bpffs, pin_dir, read_pinned_stats};

use aya::maps::{Array, Map, MapData, PerCpuArray, XskMap};
use aya::programs::{Xdp, XdpMode, xdp::XdpLinkId};
use aya::{Ebpf, EbpfLoader};
use paqet_common::Stats;
use paqet_common::maps::{FILTER_MAP, FilterConfig, PIN_FILTER, PIN_STATS, PIN_XSKS, PROGRAM_NAME, STATS_MAP, XSK_MAP};
use std::ffi::CString;
use std::os::fd::{AsFd, AsRawFd};
use std::path::{Path, PathBuf};

/// The object `cargo xtask build` made, embedded by build.rs (aligned: aya parses the
/// ELF in place).
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(env!("PAQET_EBPF_OBJ_PATH"));

/// How to attach: `Auto` tries the driver's native XDP and falls back to generic (SKB)
/// XDP, logging which one it got.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum AttachMode {
    #[default]
    Auto,
    Native,
    Generic,
}

impl std::str::FromStr for AttachMode {
    type Err = KernelError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(AttachMode::Auto),
            "native" => Ok(AttachMode::Native),
            "generic" => Ok(AttachMode::Generic),
            other => Err(KernelError::InvalidMode(other.to_string())),
        }
    }
}

/// The mode the program actually runs in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttachedMode {
    Native,
    Generic,
}

impl AttachedMode {
    pub fn as_str(self) -> &'static str {
        match self {
            AttachedMode::Native => "native",
            AttachedMode::Generic => "generic",
        }
    }
}

#[derive(Clone, Debug)]
pub struct AttachOptions {
    /// Interface name in the current network namespace.
    pub interface: String,
    /// Names the pin directory; role and interface (e.g. `server-veth0`) keep a client
    /// and a server on one host apart.
    pub instance: String,
    pub mode: AttachMode,
    pub filter: FilterConfig,
}

/// `paqet_steer` attached to one interface. Dropping it detaches the program and
/// removes the pins; [`Steering::detach`] does the same and reports errors.
pub struct Steering {
    // Field order is drop order for what `teardown` leaves: the log pump (which holds
    // the log map) goes after the program is detached.
    ebpf: Option<Ebpf>,
    link: Option<XdpLinkId>,
    logs: Option<logs::LogPump>,
    interface: String,
    ifindex: u32,
    instance: String,
    pin_dir: PathBuf,
    mode: AttachedMode,
}

impl Steering {
    pub fn attach(opts: AttachOptions) -> Result<Steering, KernelError> {
        if let Some(missing) = caps::missing_for_attach() {
            return Err(KernelError::MissingCapability { missing });
        }
        // Validate the instance name before touching anything.
        pins::pin_dir(&opts.instance)?;
        let ifindex = if_index(&opts.interface)?;
        pins::ensure_bpffs()?;
        // One XDP program per interface: a second one would replace or be refused by
        // the first, and the first's frames would go astray.
        if let Some((instance, programs)) = pins::live_instance_on(&opts.interface, &opts.instance)? {
            return Err(KernelError::InterfaceTaken {
                interface: opts.interface.clone(),
                instance,
                programs,
            });
        }

        let level = logs::aya_level();
        let mut ebpf = EbpfLoader::new()
            .override_global(aya_log::LEVEL, &level, false)
            .load(EBPF_OBJECT)
            .map_err(KernelError::Load)?;
        // Before the program loads: the logger owns the log map's fd, which the
        // program's instructions refer to.
        let logger = aya_log::EbpfLogger::init_with_logger(&mut ebpf, logs::ToTracing).map_err(KernelError::Logger)?;
        let logs = logs::LogPump::start(logger).map_err(|source| KernelError::Io {
            what: "starting the eBPF log thread for",
            path: PathBuf::from(&opts.interface),
            source,
        })?;

        let pin_dir = pins::fresh_pin_dir(&opts.instance, &opts.interface)?;
        let mut steering = Steering {
            ebpf: Some(ebpf),
            link: None,
            logs: Some(logs),
            interface: opts.interface.clone(),
            ifindex,
            instance: opts.instance.clone(),
            pin_dir,
            mode: AttachedMode::Generic,
        };
        // From here on, an error drops `steering`, which undoes whatever was done.
        steering.set_filter(&opts.filter)?;
        steering.pin_maps()?;
        steering.attach_program(opts.mode)?;
        tracing::info!(
            interface = %steering.interface,
            ifindex,
            mode = steering.mode.as_str(),
            pins = %steering.pin_dir.display(),
            "attached {PROGRAM_NAME}"
        );
        Ok(steering)
    }

    fn ebpf(&self) -> &Ebpf {
        // Only `teardown` takes it, and it consumes or drops `self`.
        self.ebpf.as_ref().expect("ebpf present until teardown")
    }

    fn ebpf_mut(&mut self) -> &mut Ebpf {
        self.ebpf.as_mut().expect("ebpf present until teardown")
    }

    fn pin_maps(&mut self) -> Result<(), KernelError> {
        for (name, file) in [(FILTER_MAP, PIN_FILTER), (STATS_MAP, PIN_STATS), (XSK_MAP, PIN_XSKS)] {
            let path = self.pin_dir.join(file);
            let map = self
                .ebpf()
                .map(name)
                .ok_or(KernelError::Missing { what: "map", name })?;
            map.pin(&path).map_err(|source| KernelError::Pin { path, source })?;
        }
        Ok(())
    }

    fn attach_program(&mut self, mode: AttachMode) -> Result<(), KernelError> {
        let interface = self.interface.clone();
        let ifindex = self.ifindex;
        let prog: &mut Xdp = self
            .ebpf_mut()
            .program_mut(PROGRAM_NAME)
            .ok_or(KernelError::Missing {
                what: "program",
                name: PROGRAM_NAME,
            })?
            .try_into()
            .map_err(KernelError::ProgramLoad)?;
        prog.load().map_err(KernelError::ProgramLoad)?;
        let attach = |prog: &mut Xdp, m: AttachedMode| {
            let xdp_mode = match m {
                AttachedMode::Native => XdpMode::Driver,
                AttachedMode::Generic => XdpMode::Skb,
            };
            prog.attach_to_if_index(ifindex, xdp_mode)
                .map_err(|source| KernelError::Attach {
                    interface: interface.clone(),
                    mode: m.as_str(),
                    source,
                })
        };
        let (link, got) = match mode {
            AttachMode::Native => (attach(prog, AttachedMode::Native)?, AttachedMode::Native),
            AttachMode::Generic => (attach(prog, AttachedMode::Generic)?, AttachedMode::Generic),
            AttachMode::Auto => match attach(prog, AttachedMode::Native) {
                Ok(l) => (l, AttachedMode::Native),
                Err(e) => {
                    tracing::info!(
                        interface = %interface,
                        "native XDP unavailable ({}); falling back to generic XDP",
                        error_chain(&e)
                    );
                    (attach(prog, AttachedMode::Generic)?, AttachedMode::Generic)
                }
            },
        };
        self.link = Some(link);
        self.mode = got;
        Ok(())
    }

    pub fn interface(&self) -> &str {
        &self.interface
    }

    pub fn ifindex(&self) -> u32 {
        self.ifindex
    }

    pub fn instance(&self) -> &str {
        &self.instance
    }

    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    pub fn mode(&self) -> AttachedMode {
        self.mode
    }

    /// The kernel's id of the loaded program (what `bpftool prog show id N` takes).
    pub fn program_id(&self) -> Result<u32, KernelError> {
        let prog: &Xdp = self
            .ebpf()
            .program(PROGRAM_NAME)
            .ok_or(KernelError::Missing {
                what: "program",
                name: PROGRAM_NAME,
            })?
            .try_into()
            .map_err(KernelError::ProgramInfo)?;
        Ok(prog.info().map_err(KernelError::ProgramInfo)?.id())
    }

    /// Counters summed over all CPUs.
    pub fn stats(&self) -> Result<Stats, KernelError> {
        let map = self.ebpf().map(STATS_MAP).ok_or(KernelError::Missing {
            what: "map",
            name: STATS_MAP,
        })?;
        let array = PerCpuArray::<&MapData, Stats>::try_from(map).map_err(|source| KernelError::Map {
            map: STATS_MAP,
            op: "opening",
            source,
        })?;
        sum_stats(&array)
    }

    /// Replaces the filter; the program sees it from its next frame on.
    pub fn set_filter(&mut self, filter: &FilterConfig) -> Result<(), KernelError> {
        let map = self.ebpf_mut().map_mut(FILTER_MAP).ok_or(KernelError::Missing {
            what: "map",
            name: FILTER_MAP,
        })?;
        write_filter(&mut Array::try_from(map).map_err(filter_error("opening"))?, filter)
    }

    /// A handle on the filter map with its own descriptor, for a thread that keeps the
    /// filter current while this `Steering` stays with its owner. A write after the
    /// detach reaches a map no program reads any more: harmless.
    pub fn filter_writer(&self) -> Result<FilterWriter, KernelError> {
        let missing = KernelError::Missing {
            what: "map",
            name: FILTER_MAP,
        };
        let Some(Map::Array(data)) = self.ebpf().map(FILTER_MAP) else {
            return Err(missing);
        };
        let fd = data
            .fd()
            .as_fd()
            .try_clone_to_owned()
            .map_err(|source| KernelError::Io {
                what: "duplicating the filter map's descriptor for",
                path: self.pin_dir.join(PIN_FILTER),
                source,
            })?;
        let data = MapData::from_fd(fd).map_err(filter_error("duplicating"))?;
        Ok(FilterWriter(
            Array::try_from(Map::Array(data)).map_err(filter_error("opening"))?,
        ))
    }

    /// Registers the AF_XDP socket bound to RX queue `queue`: matched frames arriving
    /// on that queue go to it (when the filter has `FLAG_REDIRECT`).
    pub fn register_xsk(&mut self, queue: u32, socket: &impl AsRawFd) -> Result<(), KernelError> {
        let mut xsks = self.xsk_map()?;
        xsks.set(queue, socket.as_raw_fd(), 0)
            .map_err(|source| KernelError::Map {
                map: XSK_MAP,
                op: "registering a socket",
                source,
            })
    }

    pub fn unregister_xsk(&mut self, queue: u32) -> Result<(), KernelError> {
        let mut xsks = self.xsk_map()?;
        xsks.unset(queue).map_err(|source| KernelError::Map {
            map: XSK_MAP,
            op: "unregistering a socket",
            source,
        })
    }

    fn xsk_map(&mut self) -> Result<XskMap<&mut MapData>, KernelError> {
        let map = self.ebpf_mut().map_mut(XSK_MAP).ok_or(KernelError::Missing {
            what: "map",
            name: XSK_MAP,
        })?;
        XskMap::try_from(map).map_err(|source| KernelError::Map {
            map: XSK_MAP,
            op: "opening",
            source,
        })
    }

    /// Detaches the program and removes the pins, reporting the first failure (the
    /// remaining steps still run).
    pub fn detach(mut self) -> Result<(), KernelError> {
        self.teardown()
    }

    fn teardown(&mut self) -> Result<(), KernelError> {
        let mut first_err = None;
        if let (Some(link), Some(ebpf)) = (self.link.take(), self.ebpf.as_mut()) {
            let prog: Option<&mut Xdp> = ebpf.program_mut(PROGRAM_NAME).and_then(|p| p.try_into().ok());
            if let Some(Err(source)) = prog.map(|p| p.detach(link)) {
                first_err.get_or_insert(KernelError::Detach {
                    interface: self.interface.clone(),
                    source,
                });
            }
        }
        // Unloads the program and closes the map fds (pinned maps live on until unpinned).
        self.ebpf = None;
        self.logs = None;
        if let Err(e) = pins::remove_pin_dir(&self.pin_dir) {
            first_err.get_or_insert(e);
        }
        tracing::info!(interface = %self.interface, instance = %self.instance, "detached {PROGRAM_NAME}");
        match first_err {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

impl Drop for Steering {
    fn drop(&mut self) {
        if self.ebpf.is_none() {
            return;
        }
        if let Err(e) = self.teardown() {
            tracing::warn!("while detaching {PROGRAM_NAME}: {}", error_chain(&e));
        }
    }
}

impl std::fmt::Debug for Steering {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Steering")
            .field("interface", &self.interface)
            .field("ifindex", &self.ifindex)
            .field("instance", &self.instance)
            .field("mode", &self.mode)
            .field("pin_dir", &self.pin_dir)
            .finish()
    }
}

/// See [`Steering::filter_writer`].
pub struct FilterWriter(Array<MapData, FilterConfig>);

impl FilterWriter {
    /// Replaces the filter; the program sees it from its next frame on.
    pub fn set(&mut self, filter: &FilterConfig) -> Result<(), KernelError> {
        write_filter(&mut self.0, filter)
    }
}

fn write_filter<T: std::borrow::BorrowMut<MapData>>(
    array: &mut Array<T, FilterConfig>,
    filter: &FilterConfig,
) -> Result<(), KernelError> {
    array.set(0, *filter, 0).map_err(filter_error("writing the filter"))
}

fn filter_error(op: &'static str) -> impl Fn(aya::maps::MapError) -> KernelError {
    move |source| KernelError::Map {
        map: FILTER_MAP,
        op,
        source,
    }
}

fn sum_stats<M: std::borrow::Borrow<MapData>>(array: &PerCpuArray<M, Stats>) -> Result<Stats, KernelError> {
    let per_cpu = array.get(&0, 0).map_err(|source| KernelError::Map {
        map: STATS_MAP,
        op: "reading",
        source,
    })?;
    let mut total = Stats::default();
    for s in per_cpu.iter() {
        total.accumulate(s);
    }
    Ok(total)
}

/// Resolves through the kernel (ioctl) in the current network namespace: /sys/class/net
/// would show the host's interfaces under `nsenter --net`.
fn if_index(name: &str) -> Result<u32, KernelError> {
    let missing = || KernelError::NoSuchInterface { name: name.to_string() };
    let c = CString::new(name).map_err(|_| missing())?;
    // SAFETY: c is a valid NUL-terminated string.
    let idx = unsafe { libc::if_nametoindex(c.as_ptr()) };
    if idx == 0 { Err(missing()) } else { Ok(idx) }
}

/// "error: cause: cause" on one line, for log messages.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}
