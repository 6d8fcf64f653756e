use std::path::PathBuf;

/// The command that gives a built binary what the xdp transport needs without root.
pub const SETCAP_HINT: &str =
    "sudo setcap cap_bpf,cap_perfmon,cap_net_admin,cap_net_raw,cap_ipc_lock+ep target/release/paqet (or run as root)";

#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error("missing capabilities {missing} to load and attach the XDP program; grant them with `{SETCAP_HINT}`")]
    MissingCapability { missing: String },

    #[error(
        "the BPF filesystem is not mounted at /sys/fs/bpf and mounting it needs root \
         (CAP_SYS_ADMIN); run `sudo mount -t bpf bpf /sys/fs/bpf`"
    )]
    BpffsNeedsRoot,

    #[error("mounting the BPF filesystem at /sys/fs/bpf failed")]
    MountBpffs(#[source] std::io::Error),

    #[error("no network interface named {name:?} in this network namespace")]
    NoSuchInterface { name: String },

    #[error("invalid instance name {name:?}: use 1 to 64 characters from A-Z a-z 0-9 . _ - (not . or ..)")]
    InvalidInstance { name: String },

    #[error("invalid XDP mode {0:?}: expected auto, native or generic")]
    InvalidMode(String),

    #[error("loading the embedded eBPF object failed")]
    Load(#[source] aya::EbpfError),

    #[error("the eBPF object has no {what} named {name}")]
    Missing { what: &'static str, name: &'static str },

    #[error("loading program paqet_steer into the kernel failed (verifier or permissions)")]
    ProgramLoad(#[source] aya::programs::ProgramError),

    #[error("querying the loaded program paqet_steer failed")]
    ProgramInfo(#[source] aya::programs::ProgramError),

    #[error("attaching paqet_steer to {interface} in {mode} mode failed")]
    Attach {
        interface: String,
        mode: &'static str,
        #[source]
        source: aya::programs::ProgramError,
    },

    #[error("detaching paqet_steer from {interface} failed")]
    Detach {
        interface: String,
        #[source]
        source: aya::programs::ProgramError,
    },

    #[error("starting the eBPF log reader failed")]
    Logger(#[source] aya_log::Error),

    #[error("map {map}: {op} failed")]
    Map {
        map: &'static str,
        op: &'static str,
        #[source]
        source: aya::maps::MapError,
    },

    #[error("pinning {path}")]
    Pin {
        path: PathBuf,
        #[source]
        source: aya::pin::PinError,
    },

    #[error(
        "another paqet {instance} is running (program {programs:?} uses the pins at {path}): one program per \
         interface and role; stop that one first, or give this one another INTERFACE"
    )]
    InstanceRunning {
        instance: String,
        path: PathBuf,
        programs: Vec<u32>,
    },

    #[error(
        "{interface} already carries paqet's XDP program for {instance} (program {programs:?}): one paqet per \
         interface on the xdp transport; run this one with TRANSPORT=udp (or auto, which falls back to udp) or on \
         another INTERFACE"
    )]
    InterfaceTaken {
        interface: String,
        instance: String,
        programs: Vec<u32>,
    },

    #[error(
        "cannot tell whether the paqet that made the pins at {path} still runs, so they are left alone; if no \
         paqet {instance} runs (see `paqet status` and `bpftool prog show name paqet_steer`), remove them by hand \
         with `rm -r {path}` and start again"
    )]
    PinOwnerUnknown {
        instance: String,
        path: PathBuf,
        #[source]
        source: Box<KernelError>,
    },

    #[error("no pinned paqet maps for instance {instance:?} at {path} (is paqet running?)")]
    NotPinned { instance: String, path: PathBuf },

    #[error("{what} {path}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}
