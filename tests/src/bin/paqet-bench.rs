//! `cargo xtask bench`'s driver: paqet over `xdp` and `udp` side by side with the raw
//! packet ceilings, kcptun and direct TCP, all in one run on one machine.
//!
//! Usage: `paqet-bench --help` ([`USAGE`]). `--profile` runs one clean-link download
//! under `perf record` and writes the reports to DIR/profile-*.txt.
//!
//! Testbeds (each torn down before the next, so only one thing runs at a time):
//! - clean link: two namespaces joined by one veth pair, no emulator (paqet-linkem
//!   would put a copying bridge, and a third busy thread, on a two-core machine);
//! - lossy link: the same two namespaces through paqet-linkem in a middle namespace,
//!   20 ms each way (40 ms RTT), 1 % loss each way.
//!
//! The origin (GET /bytes/N) and the echo server run as threads of this process inside
//! the server namespace; the clients run as threads of this process inside the client
//! namespace. CPU and peak RSS are read from /proc for the relay processes only.

use std::io::{BufRead, BufReader};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use paqet_tests::bench::peers::{self, KcpConfig};
use paqet_tests::bench::report::{
    CEILING, CEILING_GSO_SEGMENTS, CEILING_PACKET_GSO, CEILING_UDP, CEILING_UDP_SEGMENTED, CEILING_XDP, CLEAN1, CLEAN8,
    Kind, LOSSY, RR, RealRow, Results, Row, STREAMS, UDP_CLIENT_TWO_ENGINES, UDP_CLIENTS, UDP_CLIENTS_ONE_ENGINE,
    UDP_DIRECT, UDP_SEGMENTED, UdpRow, Upkeep, XDP_UDP_WIRE,
};
use paqet_tests::bench::{
    self, Access, BENCH_ORIGIN_PORT, ECHO_PORT, FORWARD_PORT, GIB, MIB, Proc, SERVER_IP, Servers,
};
use paqet_tests::linkem::{Impairment, hosts_through_emulator};
use paqet_tests::netns::{ChildGuard, Netns, TwoHosts};
use paqet_tests::relay::{ORIGIN_IP, RelayBed, RelayOptions, ensure_bpffs, sibling_bin};

#[derive(Clone, Copy, Debug)]
struct Sizes {
    clean: u64,
    clean_cap: Duration,
    multi_each: u64,
    kcptun_sweep: u64,
    kcptun_cap: Duration,
    lossy: u64,
    lossy_cap: Duration,
    /// One-stream rows (clean and lossy) of the xdp transport's two wires, run
    /// alternately this many times each; each wire reports its median. One such row
    /// varies by ±20 % (clean) to ±40 % (lossy) from run to run on these machines.
    wire_rounds: usize,
    streams: usize,
    stream_len: u64,
    streams_cap: Duration,
    rr: usize,
    ceiling_secs: f64,
    /// The real client's download (curl from nginx), and how many runs.
    real_len: u64,
    real_runs: usize,
    /// iperf3 -u offered rates, Mbit/s, and how long each runs.
    udp_rates: &'static [u32],
    udp_secs: u32,
}

const FULL: Sizes = Sizes {
    clean: 1 << 30,
    clean_cap: Duration::from_secs(60),
    multi_each: 128 * MIB,
    kcptun_sweep: 1 << 30,
    kcptun_cap: Duration::from_secs(20),
    lossy: 128 * MIB,
    lossy_cap: Duration::from_secs(30),
    wire_rounds: 3,
    streams: 1000,
    stream_len: MIB,
    streams_cap: Duration::from_secs(180),
    rr: 2000,
    ceiling_secs: 5.0,
    real_len: 1 << 30,
    real_runs: 2,
    udp_rates: &[100, 400],
    udp_secs: 5,
};

const QUICK: Sizes = Sizes {
    clean: 64 * MIB,
    clean_cap: Duration::from_secs(20),
    multi_each: 8 * MIB,
    kcptun_sweep: 64 * MIB,
    kcptun_cap: Duration::from_secs(10),
    lossy: 8 * MIB,
    lossy_cap: Duration::from_secs(10),
    wire_rounds: 1,
    streams: 200,
    stream_len: 256 << 10,
    streams_cap: Duration::from_secs(60),
    rr: 300,
    ceiling_secs: 2.0,
    real_len: 64 * MIB,
    real_runs: 1,
    udp_rates: &[100],
    udp_secs: 2,
};

/// 40 ms RTT, 1 % loss (each way).
const LOSSY_LINK: Impairment = Impairment {
    delay_ms: 20.0,
    jitter_ms: 0.0,
    loss: 0.01,
    rate_mbit: 0.0,
};

struct Bench {
    s: Sizes,
    r: Results,
}

/// The bench's origin and echo servers listen on the server's own address, which the
/// server's default policy denies: open exactly those two services.
fn relay_options(transport: &'static str) -> anyhow::Result<RelayOptions> {
    let mut opts = RelayOptions::new(transport)?;
    opts.server_extra.push(format!(
        "ALLOW={SERVER_IP}/32:{BENCH_ORIGIN_PORT},{SERVER_IP}/32:{ECHO_PORT}"
    ));
    Ok(opts)
}

/// Both ends on the UDP wire (xdp builds TCP-shaped frames under the default `auto`).
fn udp_wire(mut opts: RelayOptions) -> RelayOptions {
    opts.server_extra.push("WIRE=udp".into());
    opts.client_extra.push("WIRE=udp".into());
    opts
}

/// One small download through `bed` before its rows are measured: a row then times a
/// transfer over an established session, not the client's start. (A client whose first
/// SYN left a moment before the server started, and reached it after, is refused as a
/// possible replay; its fresh SYN follows 2 s later, which was half of a lossy row.)
fn warm_up(bed: &RelayBed) -> Result<()> {
    let o = Access::Socks {
        proxy: bed.socks_addr(),
        target: origin(),
    };
    let t = bed
        .hosts
        .client
        .run(|| bench::download_many(&o, 1, 64 << 10, Duration::from_secs(20)))?;
    if !t.all_complete() {
        bail!(
            "the warm-up download through the relay did not complete:\n{}",
            bed.logs()
        );
    }
    Ok(())
}

/// Session upkeep so far, summed over the instances of the bed's paqet processes.
struct UpkeepReading {
    /// The client's completed handshakes (each is a message each way).
    handshakes: u64,
    keepalives: u64,
    datagrams: u64,
}

impl UpkeepReading {
    /// `paqet status` reads what each instance published, once a second: a reading is
    /// taken only after a fresh one, so a row's counts are its own.
    fn now(procs: &[Proc]) -> Result<UpkeepReading> {
        let instances = fresh_status()?;
        let mut r = UpkeepReading {
            handshakes: 0,
            keepalives: 0,
            datagrams: 0,
        };
        let ours = |i: &&serde_json::Value| {
            let pid = i["live"]["pid"].as_u64();
            procs.iter().any(|p| Some(u64::from(p.pid)) == pid)
        };
        let mine: Vec<&serde_json::Value> = instances.iter().filter(ours).collect();
        anyhow::ensure!(
            !mine.is_empty(),
            "paqet status --json lists no instance of the bed's processes {:?}",
            procs.iter().map(|p| p.pid).collect::<Vec<_>>()
        );
        for i in mine {
            let live = &i["live"];
            let n = |key: &str| live[key].as_u64().with_context(|| format!("no live.{key} in {i}"));
            if i["role"] == "client" {
                r.handshakes += n("handshakes")?;
            }
            r.keepalives += n("keepalives")?;
            r.datagrams += n("datagrams_in")? + n("datagrams_out")?;
        }
        Ok(r)
    }

    fn since(&self, before: &UpkeepReading) -> UpkeepReading {
        UpkeepReading {
            handshakes: self.handshakes.saturating_sub(before.handshakes),
            keepalives: self.keepalives.saturating_sub(before.keepalives),
            datagrams: self.datagrams.saturating_sub(before.datagrams),
        }
    }
}

fn origin() -> SocketAddr {
    (SERVER_IP, BENCH_ORIGIN_PORT).into()
}

fn echo() -> SocketAddr {
    (SERVER_IP, ECHO_PORT).into()
}

fn mib(b: u64) -> String {
    if b < MIB {
        format!("{} KiB", b >> 10)
    } else {
        format!("{:.0} MiB", b as f64 / MIB as f64)
    }
}

impl Bench {
    /// Downloads (`streams` × `len_each`) from the client namespace, with the relay's CPU.
    #[allow(clippy::too_many_arguments)]
    fn transfer(
        &mut self,
        sys: &str,
        kind: Kind,
        test: &'static str,
        ns: &Netns,
        access: &Access,
        streams: usize,
        len_each: u64,
        cap: Duration,
        procs: &[Proc],
    ) -> Result<()> {
        let access = std::slice::from_ref(access);
        self.transfer_spread(sys, kind, test, ns, access, streams, len_each, cap, procs)
    }

    /// [`Self::transfer`] with the streams spread over several clients' access paths.
    /// Session upkeep is counted for one client only: several clients in one namespace
    /// publish to one status file, so their counts would not add up.
    #[allow(clippy::too_many_arguments)]
    fn transfer_spread(
        &mut self,
        sys: &str,
        kind: Kind,
        test: &'static str,
        ns: &Netns,
        accesses: &[Access],
        streams: usize,
        len_each: u64,
        cap: Duration,
        procs: &[Proc],
    ) -> Result<()> {
        let count_upkeep = kind == Kind::Paqet && accesses.len() == 1;
        let upkeep0 = count_upkeep.then(|| UpkeepReading::now(procs)).transpose()?;
        let c0 = bench::total_cpu(procs);
        let t = ns.run(|| bench::download_spread(accesses, streams, len_each, cap))?;
        let cpu = bench::total_cpu(procs) - c0;
        if let Some(before) = upkeep0 {
            let d = UpkeepReading::now(procs)?.since(&before);
            self.r.upkeep.push(Upkeep {
                system: sys.into(),
                test,
                handshakes: d.handshakes,
                keepalives: d.keepalives,
                datagrams: d.datagrams,
            });
        }
        let cpu_per_gib = (!procs.is_empty() && t.bytes > 0).then(|| cpu / (t.bytes as f64 / GIB));
        let note = if test == STREAMS {
            if t.all_complete() {
                format!("all {}", t.streams)
            } else {
                format!("{}/{} complete", t.complete, t.streams)
            }
        } else if !t.all_complete() {
            format!("{} in {:.0} s cap", mib(t.bytes), t.secs)
        } else {
            String::new()
        };
        let value = if test == STREAMS { t.secs } else { t.mb_per_s() };
        self.r.add(Row {
            system: sys.into(),
            kind,
            test,
            value,
            value2: 0.0,
            cpu_per_gib,
            note,
            rounds: Vec::new(),
        });
        Ok(())
    }

    fn rr(&mut self, sys: &str, kind: Kind, ns: &Netns, access: &Access) -> Result<()> {
        let n = self.s.rr;
        let (p50, p99) = ns.run(|| bench::round_trips(access, n))??;
        self.r.add(Row {
            system: sys.into(),
            kind,
            test: RR,
            value: p50,
            value2: p99,
            cpu_per_gib: None,
            note: String::new(),
            rounds: Vec::new(),
        });
        Ok(())
    }

    fn rss(&mut self, sys: &str, procs: &[Proc]) {
        for p in procs {
            if let Some(k) = bench::vm_hwm_kib(p.pid) {
                self.r.rss.push((sys.into(), p.label.clone(), k));
            }
        }
    }

    /// The four clean-link measurements through one access path.
    #[allow(clippy::too_many_arguments)]
    fn clean_suite(
        &mut self,
        sys: &str,
        kind: Kind,
        ns: &Netns,
        origin: &Access,
        echo: &Access,
        procs: &[Proc],
        streams_too: bool,
    ) -> Result<()> {
        let s = self.s;
        self.transfer(sys, kind, CLEAN1, ns, origin, 1, s.clean, s.clean_cap, procs)?;
        self.transfer(sys, kind, CLEAN8, ns, origin, 8, s.multi_each, s.clean_cap, procs)?;
        self.rr(sys, kind, ns, echo)?;
        if streams_too {
            self.transfer(
                sys,
                kind,
                STREAMS,
                ns,
                origin,
                s.streams,
                s.stream_len,
                s.streams_cap,
                procs,
            )?;
        }
        Ok(())
    }

    /// The raw packet paths, no relay: plain UDP, paqet's AF_XDP transport, super-frames
    /// the kernel segments written to AF_PACKET and received by AF_XDP (a lever for the
    /// xdp transport's sending side), and UDP with GSO segmented before the wire and GRO
    /// at the receiver (the path paqet udp takes on a wire of 1,500-byte frames). Each row also has the CPU both ends used per GiB
    /// delivered: the floor under "xdp ≥ udp segmented at no more CPU".
    fn ceilings(&mut self) -> Result<()> {
        let hosts = TwoHosts::new("bc")?;
        hosts.pin_neighbours()?;
        ensure_bpffs()?;
        let blast = sibling_bin("paqet-blast").to_string_lossy().to_string();
        let secs = self.s.ceiling_secs.to_string();
        let server = format!("{SERVER_IP}:4000");
        let segments = CEILING_GSO_SEGMENTS.to_string();
        let rows: [(&str, Vec<&str>, Vec<&str>); 4] = [
            (
                CEILING_UDP,
                vec!["udp-recv", server.as_str(), &secs],
                vec!["udp-send", server.as_str(), &secs, "1400"],
            ),
            (
                CEILING_XDP,
                vec!["xdp-recv", &hosts.server_if, server.as_str(), &secs],
                vec![
                    "xdp-send",
                    &hosts.client_if,
                    "198.18.0.1:5000",
                    server.as_str(),
                    &secs,
                    "1400",
                ],
            ),
            (
                CEILING_PACKET_GSO,
                vec!["xdp-recv", &hosts.server_if, server.as_str(), &secs],
                vec![
                    "packet-send",
                    &hosts.client_if,
                    "198.18.0.1:5000",
                    server.as_str(),
                    &secs,
                    "1400",
                    &segments,
                ],
            ),
            (
                CEILING_UDP_SEGMENTED,
                vec!["udp-recv", server.as_str(), &secs, "1400"],
                vec!["udp-send", server.as_str(), &secs, "1400", &segments],
            ),
        ];
        for (name, recv_args, send_args) in rows {
            if name == CEILING_UDP_SEGMENTED {
                // Last, so that the rows before it keep the veth's default offloads.
                peers::set_offloads(&hosts, true)?;
                peers::segment_udp_before_the_wire(&hosts)?;
            }
            // An AF_XDP end keeps the caller's mount namespace (its pins live there).
            let mk = |ns: &Netns, xdp: bool| {
                if xdp {
                    ns.nsenter_command(&blast)
                } else {
                    ns.command(&blast)
                }
            };
            let mut rc = mk(&hosts.server, recv_args[0] == "xdp-recv");
            rc.args(&recv_args).stdin(Stdio::null()).stdout(Stdio::piped());
            let mut recv = ChildGuard::spawn(&mut rc)?;
            let mut out = BufReader::new(recv.0.stdout.take().context("receiver stdout")?);
            let mut line = String::new();
            out.read_line(&mut line)?;
            if line.trim() != "ready" {
                bail!("{name}: the receiver did not start ({line:?})");
            }
            let mut sc = mk(&hosts.client, send_args[0] == "xdp-send");
            sc.args(&send_args).stdin(Stdio::null()).stdout(Stdio::piped());
            let mut send = ChildGuard::spawn(&mut sc)?;
            let mut send_out = BufReader::new(send.0.stdout.take().context("sender stdout")?);
            let mut send_line = String::new();
            send_out.read_line(&mut send_line)?;
            line.clear();
            out.read_line(&mut line)?;
            // Both exit by themselves (the sender 3 s after its window), each dropping
            // its xdp transport: killed, they would leave their pins behind.
            recv.wait_exit(Duration::from_secs(10))?;
            send.wait_exit(Duration::from_secs(10))?;
            let field = |line: &str, k: &str| -> f64 {
                line.split_whitespace()
                    .find_map(|w| w.strip_prefix(k))
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0.0)
            };
            let (frames, bytes, secs_m) = (field(&line, "frames="), field(&line, "bytes="), field(&line, "secs="));
            if frames == 0.0 || secs_m == 0.0 {
                bail!("{name}: no frames arrived ({line:?})");
            }
            let sent = field(&send_line, "sent=");
            let cpu = field(&line, "cpu=") + field(&send_line, "cpu=");
            let pps = frames / secs_m;
            let lost = if sent > 0.0 {
                (1.0 - frames / sent).max(0.0) * 100.0
            } else {
                0.0
            };
            self.r.add(Row {
                system: name.into(),
                kind: Kind::Ceiling,
                test: CEILING,
                value: pps * 1442.0 / 1e6,
                value2: pps,
                cpu_per_gib: (cpu > 0.0).then(|| cpu / (bytes / GIB)),
                note: format!(
                    "{:.0} kpps, {:.0} MB/s payload, {lost:.0} % of sent frames lost",
                    pps / 1e3,
                    pps * 1400.0 / 1e6
                ),
                rounds: Vec::new(),
            });
        }
        Ok(())
    }

    fn paqet(&mut self, transport: &'static str) -> Result<()> {
        let sys = format!("paqet {transport}");
        let tag = if transport == "xdp" { "bx" } else { "bu" };
        let bed = RelayBed::start(tag, &relay_options(transport)?)?;
        self.paqet_clean(&sys, &bed, transport == "udp")?;
        if transport == "xdp" {
            drop(bed);
            return self.paqet_xdp_udp_wire();
        }
        self.paqet_udp_clients(&bed, UDP_CLIENTS)?;
        self.paqet_udp_segmented(&bed)?;
        drop(bed);
        let mut one_engine = relay_options(transport)?;
        one_engine.server_extra.push("THREADS=1".into());
        let bed = RelayBed::start("b1", &one_engine)?;
        self.paqet_udp_clients(&bed, UDP_CLIENTS_ONE_ENGINE)?;
        drop(bed);
        let mut two_engines = relay_options(transport)?;
        two_engines.client_extra.push("THREADS=2".into());
        let bed = RelayBed::start("b2", &two_engines)?;
        peers::set_offloads(&bed.hosts, true)?;
        let s = self.s;
        self.paqet_streams(UDP_CLIENT_TWO_ENGINES, &bed, CLEAN8, 8, s.multi_each, s.clean_cap)
    }

    /// Eight clients of one stream each through the one server (the udp transport: xdp
    /// clients in one namespace would share its interface), beside one client's eight
    /// streams: whether a server uses more than one core. `system` names the rows: the
    /// server runs its default engines, or one.
    fn paqet_udp_clients(&mut self, bed: &RelayBed, system: &'static str) -> Result<()> {
        let _servers = Servers::start(&bed.hosts.server)?;
        let more = bed.start_more_clients(7)?;
        let mut procs = paqet_procs(bed);
        procs.extend(more.iter().map(|(child, _)| Proc {
            label: "client".into(),
            pid: bench::find_comm(child.id(), "paqet"),
        }));
        let accesses: Vec<Access> = std::iter::once(bed.socks_addr())
            .chain(more.iter().map(|(_, socks)| *socks))
            .map(|proxy| Access::Socks {
                proxy,
                target: origin(),
            })
            .collect();
        for access in &accesses {
            let t = bed
                .hosts
                .client
                .run(|| bench::download_many(access, 1, 64 << 10, Duration::from_secs(20)))?;
            if !t.all_complete() {
                bail!(
                    "a warm-up download through one of 8 clients did not complete:\n{}",
                    bed.logs()
                );
            }
        }
        let s = self.s;
        let n = accesses.len();
        let server = bench::find_comm(bed.server.id(), "paqet");
        let (threads0, started) = (bench::thread_cpu_secs(server), Instant::now());
        self.transfer_spread(
            system,
            Kind::Paqet,
            CLEAN8,
            &bed.hosts.client,
            &accesses,
            n,
            s.multi_each,
            s.clean_cap,
            &procs,
        )?;
        // How much of the server's work one thread did: the 2-core machines cannot show
        // scaling, but they can show what stops it.
        let secs = started.elapsed().as_secs_f64();
        let busy: Vec<f64> = bench::thread_cpu_secs(server)
            .iter()
            .map(|(tid, c)| c - threads0.get(tid).copied().unwrap_or(0.0))
            .collect();
        let (busiest, all) = (busy.iter().copied().fold(0.0, f64::max), busy.iter().sum::<f64>());
        if let Some(row) = self.r.rows.last_mut()
            && all > 0.0
        {
            row.note = format!(
                "server: busiest thread {:.0} % of a core, {:.0} % of the server's CPU",
                100.0 * busiest / secs,
                100.0 * busiest / all
            );
            eprintln!("bench: {} {}: {}", row.system, row.test, row.note);
        }
        Ok(())
    }

    /// One stream over udp with every datagram segmented before the wire, as a NIC
    /// without UDP segmentation offload would have it: the suite's veth carries paqet's
    /// 64 KiB UDP-GSO datagrams whole, which no real wire does.
    fn paqet_udp_segmented(&mut self, bed: &RelayBed) -> Result<()> {
        peers::segment_udp_before_the_wire(&bed.hosts)?;
        let s = self.s;
        self.paqet_one_stream(UDP_SEGMENTED, bed, CLEAN1, s.clean, s.clean_cap)
    }

    /// One stream over xdp with the UDP wire, beside the default TCP-shaped wire's row
    /// (the suite's is the first of its rounds): what the TCP wire's opening and upkeep
    /// cost. The wires take turns, [`Sizes::wire_rounds`] rows each.
    fn paqet_xdp_udp_wire(&mut self) -> Result<()> {
        let s = self.s;
        for round in 0..s.wire_rounds {
            if round > 0 {
                let bed = RelayBed::start("bx", &relay_options("xdp")?)?;
                self.paqet_one_stream("paqet xdp", &bed, CLEAN1, s.clean, s.clean_cap)?;
            }
            let bed = RelayBed::start("bw", &udp_wire(relay_options("xdp")?))?;
            self.paqet_one_stream(XDP_UDP_WIRE, &bed, CLEAN1, s.clean, s.clean_cap)?;
        }
        self.r.keep_median("paqet xdp", CLEAN1);
        self.r.keep_median(XDP_UDP_WIRE, CLEAN1);
        Ok(())
    }

    /// One download of `len` through `bed`, as row `test` of `sys`.
    fn paqet_one_stream(
        &mut self,
        sys: &str,
        bed: &RelayBed,
        test: &'static str,
        len: u64,
        cap: Duration,
    ) -> Result<()> {
        self.paqet_streams(sys, bed, test, 1, len, cap)
    }

    /// `streams` downloads of `len` at once through the bed's client.
    fn paqet_streams(
        &mut self,
        sys: &str,
        bed: &RelayBed,
        test: &'static str,
        streams: usize,
        len: u64,
        cap: Duration,
    ) -> Result<()> {
        let _servers = Servers::start(&bed.hosts.server)?;
        warm_up(bed)?;
        let procs = paqet_procs(bed);
        let o = Access::Socks {
            proxy: bed.socks_addr(),
            target: origin(),
        };
        let res = self.transfer(sys, Kind::Paqet, test, &bed.hosts.client, &o, streams, len, cap, &procs);
        if res.is_err() {
            eprintln!("{}", bed.logs());
        }
        res
    }

    fn paqet_clean(&mut self, sys: &str, bed: &RelayBed, offloads: bool) -> Result<()> {
        if offloads {
            // As a host would run the udp transport (AF_XDP is what needs them off): UDP
            // GSO/GRO may then carry coalesced datagrams through the veth.
            peers::set_offloads(&bed.hosts, true)?;
        }
        let _servers = Servers::start(&bed.hosts.server)?;
        warm_up(bed)?;
        let procs = paqet_procs(bed);
        let socks = bed.socks_addr();
        let o = Access::Socks {
            proxy: socks,
            target: origin(),
        };
        let e = Access::Socks {
            proxy: socks,
            target: echo(),
        };
        let res = self.clean_suite(sys, Kind::Paqet, &bed.hosts.client, &o, &e, &procs, true);
        self.rss(sys, &procs);
        if res.is_err() {
            eprintln!("{}", bed.logs());
        }
        res
    }

    /// The lossy row of paqet over `transport`. Over xdp, the TCP-shaped and the UDP
    /// wire take turns, [`Sizes::wire_rounds`] rows each, so that the two medians
    /// compare the wires and not two moments of a noisy machine.
    fn paqet_lossy(&mut self, transport: &'static str) -> Result<()> {
        let sys = format!("paqet {transport}");
        if transport != "xdp" {
            return self.paqet_lossy_as(&sys, "blu", relay_options(transport)?);
        }
        for _ in 0..self.s.wire_rounds {
            self.paqet_lossy_as(&sys, "blx", relay_options(transport)?)?;
            self.paqet_lossy_as(XDP_UDP_WIRE, "blw", udp_wire(relay_options("xdp")?))?;
        }
        self.r.keep_median(&sys, LOSSY);
        self.r.keep_median(XDP_UDP_WIRE, LOSSY);
        Ok(())
    }

    fn paqet_lossy_as(&mut self, sys: &str, tag: &str, opts: RelayOptions) -> Result<()> {
        let bed = RelayBed::start_through(tag, &opts, LOSSY_LINK)?;
        let s = self.s;
        self.paqet_one_stream(sys, &bed, LOSSY, s.lossy, s.lossy_cap)
    }

    /// The kcptun sweep (port-forward), then the best encrypted configuration's full
    /// suite with microsocks behind it.
    fn kcptun(&mut self) -> Result<()> {
        let hosts = TwoHosts::new("bk")?;
        // kcptun uses UDP sockets: offloads on, as for paqet's udp transport.
        peers::set_offloads(&hosts, true)?;
        let _servers = Servers::start(&hosts.server)?;
        let microsocks = peers::start_microsocks(&hosts.server)?;
        let s = self.s;
        let mut best: Option<(KcpConfig, f64)> = None;
        for cfg in peers::kcptun_sweep() {
            let k = peers::start_kcptun(&hosts, &cfg, 29900, 12948, origin())?;
            let procs = kcp_procs(&k, None);
            let sys = cfg.name(false);
            self.transfer(
                &sys,
                Kind::Kcptun {
                    encrypted: cfg.encrypted(),
                    socks: false,
                },
                CLEAN1,
                &hosts.client,
                &Access::Direct(k.local),
                1,
                s.kcptun_sweep,
                s.kcptun_cap,
                &procs,
            )?;
            self.rss(&sys, &procs);
            let v = self.r.get(&sys, CLEAN1).map_or(0.0, |r| r.value);
            if cfg.encrypted() && best.is_none_or(|(_, b)| v > b) {
                best = Some((cfg, v));
            }
        }
        let Some((cfg, _)) = best else { return Ok(()) };
        // Port forward straight to the echo server: kcptun's own round trip.
        {
            let k = peers::start_kcptun(&hosts, &cfg, 29902, 12950, echo())?;
            self.rr(
                &cfg.name(false),
                Kind::Kcptun {
                    encrypted: true,
                    socks: false,
                },
                &hosts.client,
                &Access::Direct(k.local),
            )?;
        }
        let k = peers::start_kcptun(
            &hosts,
            &cfg,
            29901,
            12949,
            ([127, 0, 0, 1], peers::MICROSOCKS_PORT).into(),
        )?;
        let procs = kcp_procs(&k, Some(microsocks.id()));
        let sys = cfg.name(true);
        let o = Access::Socks {
            proxy: k.local,
            target: origin(),
        };
        let e = Access::Socks {
            proxy: k.local,
            target: echo(),
        };
        let res = self.clean_suite(
            &sys,
            Kind::Kcptun {
                encrypted: true,
                socks: true,
            },
            &hosts.client,
            &o,
            &e,
            &procs,
            true,
        );
        self.rss(&sys, &procs);
        res
    }

    fn tcp(&mut self) -> Result<()> {
        let hosts = TwoHosts::new("bt")?;
        // Direct TCP as a host would run it: with the veth's segmentation offloads.
        peers::set_offloads(&hosts, true)?;
        let _servers = Servers::start(&hosts.server)?;
        let avail = peers::available_cc();
        for cc in ["bbr", "cubic"] {
            if !avail.split_whitespace().any(|c| c == cc) {
                self.r.notes.push(format!(
                    "{cc} is not available here (tcp_available_congestion_control: {avail}); TCP {cc} was not measured"
                ));
                continue;
            }
            peers::set_cc(&hosts, cc)?;
            let sys = format!("TCP {cc}");
            let res = self.clean_suite(
                &sys,
                Kind::Tcp,
                &hosts.client,
                &Access::Direct(origin()),
                &Access::Direct(echo()),
                &[],
                cc == "bbr",
            );
            bench::set_origin_cc(None);
            res?;
        }
        self.forwarders_rr(&hosts)
    }

    /// Round trips to the echo server through a forwarder in each namespace, placed
    /// where paqet's client and server sit: the floor for any relay's latency here.
    fn forwarders_rr(&mut self, hosts: &TwoHosts) -> Result<()> {
        let at_server: SocketAddr = (SERVER_IP, FORWARD_PORT).into();
        let at_client: SocketAddr = (Ipv4Addr::LOCALHOST, FORWARD_PORT).into();
        let _server_side = Servers::forwarder(&hosts.server, at_server, echo())?;
        let _client_side = Servers::forwarder(&hosts.client, at_client, at_server)?;
        self.rr(
            "TCP via 2 forwarders",
            Kind::Forwarders,
            &hosts.client,
            &Access::Direct(at_client),
        )
    }

    /// Relayed UDP: iperf3 -u at fixed offered rates through a client's UDP forward over
    /// each transport, beside iperf3 straight across the same link.
    fn udp_datagrams(&mut self) -> Result<()> {
        {
            let hosts = TwoHosts::new("bd")?;
            peers::set_offloads(&hosts, true)?;
            let _iperf = iperf3_server(&hosts.server, SERVER_IP)?;
            for &rate in self.s.udp_rates {
                self.iperf3_udp(UDP_DIRECT, &hosts.client, SERVER_IP, rate)?;
            }
        }
        for transport in ["udp", "xdp"] {
            let mut opts = relay_options(transport)?;
            // iperf3 keeps its control connection on TCP, on the port of its UDP test.
            opts.client_extra.push(format!(
                "FORWARD=tcp/127.0.0.1:{IPERF3_PORT}={ORIGIN_IP}:{IPERF3_PORT},udp/127.0.0.1:{IPERF3_PORT}={ORIGIN_IP}:{IPERF3_PORT}"
            ));
            let bed = RelayBed::start(if transport == "udp" { "bdu" } else { "bdx" }, &opts)?;
            if transport == "udp" {
                peers::set_offloads(&bed.hosts, true)?;
            }
            let _iperf = iperf3_server(&bed.origin_host.ns, ORIGIN_IP)?;
            for &rate in self.s.udp_rates {
                let res = self.iperf3_udp(
                    &format!("paqet {transport}"),
                    &bed.hosts.client,
                    Ipv4Addr::LOCALHOST,
                    rate,
                );
                if res.is_err() {
                    eprintln!("{}", bed.logs());
                }
                res?;
            }
        }
        Ok(())
    }

    fn iperf3_udp(&mut self, sys: &str, ns: &Netns, to: Ipv4Addr, rate_mbit: u32) -> Result<()> {
        let out = ns
            .command("iperf3")
            .args([
                "-c",
                &to.to_string(),
                "-p",
                &IPERF3_PORT.to_string(),
                "-J",
                "--connect-timeout",
                "5000",
            ])
            .args([
                "-u",
                "-l",
                "1200",
                "-b",
                &format!("{rate_mbit}M"),
                "-t",
                &self.s.udp_secs.to_string(),
            ])
            .stdin(Stdio::null())
            .output()
            .context("running iperf3")?;
        let text = String::from_utf8_lossy(&out.stdout);
        anyhow::ensure!(out.status.success(), "iperf3 -u at {rate_mbit} Mbit/s failed: {text}");
        let report: serde_json::Value = serde_json::from_str(&text).context("iperf3's JSON report")?;
        // What the receiver (the iperf3 server) counted, as the client reports at the end.
        let received = &report["end"]["sum_received"];
        let n = |key: &str| {
            received[key]
                .as_f64()
                .with_context(|| format!("no end.sum_received.{key}: {text}"))
        };
        let row = UdpRow {
            system: sys.into(),
            offered_mbit: rate_mbit.into(),
            goodput_mbit: n("bits_per_second")? / 1e6,
            loss_percent: n("lost_percent")?,
        };
        eprintln!(
            "bench: {:<32} udp {:>5.0} Mbit/s offered: {:.1} Mbit/s, {:.2} % lost",
            row.system, row.offered_mbit, row.goodput_mbit, row.loss_percent
        );
        self.r.udp.push(row);
        Ok(())
    }

    /// The figure a user sees: real curl through the SOCKS port, fetching a file from
    /// nginx on the host behind the server, over each transport.
    fn real_clients(&mut self) -> Result<()> {
        let s = self.s;
        let www = RealSite::create(s.real_len)?;
        for transport in ["xdp", "udp"] {
            let bed = RelayBed::start(
                if transport == "xdp" { "brx" } else { "bru" },
                &relay_options(transport)?,
            )?;
            if transport == "udp" {
                peers::set_offloads(&bed.hosts, true)?;
            }
            let _nginx = www.serve(&bed.origin_host.ns)?;
            let res = self.real_client_runs(&format!("paqet {transport}"), &bed, &www);
            if res.is_err() {
                eprintln!("{}", bed.logs());
            }
            res?;
        }
        Ok(())
    }

    fn real_client_runs(&mut self, sys: &str, bed: &RelayBed, www: &RealSite) -> Result<()> {
        let s = self.s;
        // Warm: the session is up before the first timed run.
        curl_download(bed, RealSite::SMALL, RealSite::SMALL_LEN)?;
        let client = paqet_procs(bed)
            .into_iter()
            .filter(|p| p.label == "client")
            .collect::<Vec<_>>();
        let overflows_before = client_receive_overflows(&client)?;
        let mut runs = Vec::new();
        for _ in 0..s.real_runs {
            runs.push(curl_download(bed, RealSite::BODY, www.len)? / 1e6);
        }
        let receive_overflows = client_receive_overflows(&client)?.saturating_sub(overflows_before);
        let row = RealRow {
            system: sys.into(),
            runs,
            receive_overflows,
        };
        let runs = row
            .runs
            .iter()
            .map(|v| format!("{v:.1}"))
            .collect::<Vec<_>>()
            .join(", ");
        eprintln!(
            "bench: {:<32} real     {:>10.1} MB/s (runs {runs}), {} receive overflows",
            row.system,
            row.best(),
            row.receive_overflows
        );
        self.r.real.push(row);
        Ok(())
    }

    fn lossy_peers(&mut self) -> Result<()> {
        let (hosts, _link) = hosts_through_emulator("bl", LOSSY_LINK)?;
        let _servers = Servers::start(&hosts.server)?;
        let s = self.s;
        let avail = peers::available_cc();
        for cc in ["bbr", "cubic"] {
            if !avail.split_whitespace().any(|c| c == cc) {
                continue;
            }
            peers::set_cc(&hosts, cc)?;
            let res = self.transfer(
                &format!("TCP {cc}"),
                Kind::Tcp,
                LOSSY,
                &hosts.client,
                &Access::Direct(origin()),
                1,
                s.lossy,
                s.lossy_cap,
                &[],
            );
            bench::set_origin_cc(None);
            res?;
        }
        // Both windows (the clean link's best is not the lossy link's: a lost segment
        // holds a window's left edge for a round trip), encrypted with and without FEC
        // (FEC is what kcptun has for loss), plus FEC without encryption.
        let configs = [1024, 4096]
            .into_iter()
            .flat_map(|wnd| [("aes", true), ("aes", false), ("none", true)].map(|(crypt, fec)| (crypt, fec, wnd)));
        for (crypt, fec, wnd) in configs {
            let cfg = KcpConfig { crypt, fec, wnd };
            let k = peers::start_kcptun(&hosts, &cfg, 29900, 12948, origin())?;
            let procs = kcp_procs(&k, None);
            self.transfer(
                &cfg.name(false),
                Kind::Kcptun {
                    encrypted: cfg.encrypted(),
                    socks: false,
                },
                LOSSY,
                &hosts.client,
                &Access::Direct(k.local),
                1,
                s.lossy,
                s.lossy_cap,
                &procs,
            )?;
        }
        Ok(())
    }
}

impl Bench {
    /// `--profile TRANSPORT`: one clean-link download with `perf record -e cpu-clock`
    /// and DWARF call graphs on the paqet client and server (these VMs have no hardware
    /// counters, so a sampled clock profile); writes `perf report` text into `out`, and
    /// leaves the recordings there for `perf report -G`.
    fn profile(&mut self, transport: &'static str, out: &std::path::Path) -> Result<()> {
        std::fs::create_dir_all(out)?;
        let bed = RelayBed::start("bp", &relay_options(transport)?)?;
        let _servers = Servers::start(&bed.hosts.server)?;
        let procs = paqet_procs(&bed);
        let mut perfs = Vec::new();
        for p in &procs {
            let data = out.join(format!("perf-{transport}-{}.data", p.label));
            let mut cmd = std::process::Command::new("perf");
            cmd.args([
                "record",
                "-q",
                "-e",
                "cpu-clock",
                "-F",
                "1999",
                "--call-graph",
                "dwarf,32768",
                "-p",
                &p.pid.to_string(),
                "-o",
            ])
            .arg(&data)
            .stdin(Stdio::null())
            .stdout(Stdio::null());
            perfs.push((ChildGuard::spawn(&mut cmd)?, data, p.label.clone()));
        }
        std::thread::sleep(Duration::from_millis(500));
        let o = Access::Socks {
            proxy: bed.socks_addr(),
            target: origin(),
        };
        let s = self.s;
        let res = self.transfer(
            &format!("paqet {transport}"),
            Kind::Paqet,
            CLEAN1,
            &bed.hosts.client,
            &o,
            1,
            s.clean,
            s.clean_cap,
            &procs,
        );
        eprintln!(
            "bench: the {transport} client counted {} receive overflows",
            client_receive_overflows(&procs)?
        );
        for (mut g, data, label) in perfs {
            // SAFETY: signalling our own child.
            unsafe { libc::kill(g.id() as i32, libc::SIGINT) };
            let _ = g.0.wait();
            let rep = std::process::Command::new("perf")
                .args([
                    "report",
                    "--stdio",
                    "--no-children",
                    "--sort",
                    "dso,symbol",
                    "--percent-limit",
                    "0.7",
                    "-i",
                ])
                .arg(&data)
                .output()?;
            let text = out.join(format!("profile-{transport}-{label}.txt"));
            std::fs::write(&text, &rep.stdout)?;
            eprintln!("bench: profile of the {transport} {label}: {}", text.display());
        }
        res
    }
}

const IPERF3_PORT: u16 = 5201;

/// nginx's document root for the real-client row, in a scratch directory removed on drop.
struct RealSite {
    dir: PathBuf,
    len: u64,
}

impl RealSite {
    const PORT: u16 = 8090;
    const BODY: &str = "body";
    const SMALL: &str = "small";
    const SMALL_LEN: u64 = 64 << 10;

    /// A body of `len` bytes (sparse: nginx sends it with sendfile; paqet encrypts, so
    /// its content costs nothing special) and a small one for the warm-up.
    fn create(len: u64) -> Result<RealSite> {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("paqet-bench-real-{}", std::process::id()));
        let site = RealSite { dir, len };
        let www = site.dir.join("www");
        std::fs::create_dir_all(&www)?;
        for (name, len) in [(Self::BODY, len), (Self::SMALL, Self::SMALL_LEN)] {
            std::fs::File::create(www.join(name))?.set_len(len)?;
        }
        // nginx's workers run as nobody: everything readable.
        for p in [
            site.dir.clone(),
            www.clone(),
            www.join(Self::BODY),
            www.join(Self::SMALL),
        ] {
            let mode = if p.is_dir() { 0o755 } else { 0o644 };
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode))?;
        }
        Ok(site)
    }

    /// nginx on the origin address in `ns`, once it accepts connections.
    fn serve(&self, ns: &Netns) -> Result<ChildGuard> {
        let conf = self.dir.join("nginx.conf");
        std::fs::write(
            &conf,
            format!(
                "daemon off;\nworker_processes 1;\npid {dir}/nginx.pid;\nerror_log stderr;\n\
                 events {{ worker_connections 64; }}\n\
                 http {{ access_log off; sendfile on; server {{ listen {ORIGIN_IP}:{port}; root {dir}/www; }} }}\n",
                dir = self.dir.display(),
                port = Self::PORT
            ),
        )?;
        let nginx = ChildGuard::spawn(
            ns.command("nginx")
                .args(["-e", "stderr", "-p"])
                .arg(&self.dir)
                .arg("-c")
                .arg(&conf)
                .stdin(Stdio::null())
                .stdout(Stdio::null()),
        )?;
        let addr: SocketAddr = (ORIGIN_IP, Self::PORT).into();
        let up =
            ns.run(|| paqet_tests::wait_for(|| std::net::TcpStream::connect(addr).is_ok(), Duration::from_secs(10)))?;
        anyhow::ensure!(up, "nginx did not start listening on {addr}");
        Ok(nginx)
    }
}

impl Drop for RealSite {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// curl through the bed's SOCKS port, `name` from nginx to /dev/null: bytes per second
/// as curl measured them, after checking the length.
fn curl_download(bed: &RelayBed, name: &str, len: u64) -> Result<f64> {
    let url = format!("http://{ORIGIN_IP}:{}/{name}", RealSite::PORT);
    let out = bed
        .hosts
        .client
        .command("curl")
        .args([
            "-sS",
            "-o",
            "/dev/null",
            "--max-time",
            "120",
            "-w",
            "%{speed_download} %{size_download}",
        ])
        .arg("--socks5-hostname")
        .arg(bed.socks_addr().to_string())
        .arg(&url)
        .stdin(Stdio::null())
        .output()
        .context("running curl")?;
    let text = String::from_utf8_lossy(&out.stdout);
    anyhow::ensure!(
        out.status.success(),
        "curl {url}: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    let mut fields = text.split_whitespace().map(str::parse::<f64>);
    let (Some(Ok(speed)), Some(Ok(size))) = (fields.next(), fields.next()) else {
        bail!("curl {url}: unexpected -w output {text:?}");
    };
    anyhow::ensure!(size as u64 == len, "curl {url}: {size} bytes, not {len}");
    Ok(speed)
}

/// Every instance `paqet status --json` lists. Instances publish once a second, so this
/// waits for a fresh publication first: a reading after a row is the row's own.
fn fresh_status() -> Result<Vec<serde_json::Value>> {
    std::thread::sleep(Duration::from_millis(1_200));
    let out = std::process::Command::new(paqet_tests::paqet_bin())
        .args(["status", "--json"])
        .output()
        .context("running paqet status --json")?;
    anyhow::ensure!(
        out.status.success(),
        "paqet status: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    match serde_json::from_slice(&out.stdout).context("paqet status --json")? {
        serde_json::Value::Array(instances) => Ok(instances),
        other => bail!("paqet status --json: not a list: {other}"),
    }
}

/// The receive overflows the client in `procs` has published (after a fresh reading).
fn client_receive_overflows(procs: &[Proc]) -> Result<u64> {
    let pid = procs.first().map(|p| u64::from(p.pid)).context("no client process")?;
    fresh_status()?
        .iter()
        .find(|i| i["live"]["pid"].as_u64() == Some(pid))
        .and_then(|i| i["live"]["receive_overflows"].as_u64())
        .with_context(|| format!("paqet status --json has no receive_overflows of pid {pid}"))
}

/// `iperf3 -s` on `ip` in `ns`, once it accepts connections.
fn iperf3_server(ns: &Netns, ip: Ipv4Addr) -> Result<ChildGuard> {
    let server = ChildGuard::spawn(
        ns.command("iperf3")
            .args(["-s", "-B", &ip.to_string(), "-p", &IPERF3_PORT.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    )?;
    let up = ns.run(|| {
        paqet_tests::wait_for(
            || std::net::TcpStream::connect((ip, IPERF3_PORT)).is_ok(),
            Duration::from_secs(10),
        )
    })?;
    anyhow::ensure!(up, "iperf3 -s on {ip}:{IPERF3_PORT} did not start");
    // iperf3 counts that probe as a client; let it see the close before the test's.
    std::thread::sleep(Duration::from_millis(300));
    Ok(server)
}

/// The paqet client and server of a bed, whose CPU and RSS count as paqet's.
fn paqet_procs(bed: &RelayBed) -> Vec<Proc> {
    [("client", &bed.client), ("server", &bed.server)]
        .into_iter()
        .map(|(label, child)| Proc {
            label: label.into(),
            pid: bench::find_comm(child.id(), "paqet"),
        })
        .collect()
}

fn kcp_procs(k: &peers::Kcptun, microsocks: Option<u32>) -> Vec<Proc> {
    let mut v = vec![
        Proc {
            label: "client".into(),
            pid: bench::find_comm(k.client.id(), "kcptun-client"),
        },
        Proc {
            label: "server".into(),
            pid: bench::find_comm(k.server.id(), "kcptun-server"),
        },
    ];
    if let Some(pid) = microsocks {
        v.push(Proc {
            label: "microsocks".into(),
            pid,
        });
    }
    v
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|s| s.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let kcptun = std::process::Command::new("dpkg-query")
        .args(["-W", "-f=${Version}", "kcptun"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).to_string())
        .unwrap_or_default();
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    format!(
        "{cpu}, {cores} cores, Linux {}; kcptun {kcptun} (Debian); load average at the start: {}",
        kernel.trim(),
        load.split_whitespace().take(3).collect::<Vec<_>>().join(" ")
    )
}

const USAGE: &str = "usage: paqet-bench [--quick] [--out DIR] [--only SECTIONS]
       paqet-bench [--quick] --profile xdp|udp --out DIR
SECTIONS: comma-separated of ceilings, paqet-xdp, paqet-udp, kcptun, tcp, lossy, udp, real";
const SECTIONS: [&str; 8] = [
    "ceilings",
    "paqet-xdp",
    "paqet-udp",
    "kcptun",
    "tcp",
    "lossy",
    "udp",
    "real",
];

struct Args {
    quick: bool,
    out: PathBuf,
    profile: Option<&'static str>,
    /// Sections to run; all when `None`.
    only: Option<Vec<&'static str>>,
}

/// Refuses what it does not know: a typo must not start a ten-minute run of everything.
/// `Err("")` is a request for the usage.
fn parse_args(args: &[String]) -> std::result::Result<Args, String> {
    let mut parsed = Args {
        quick: false,
        out: PathBuf::from("docs/bench"),
        profile: None,
        only: None,
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--quick" => parsed.quick = true,
            "--out" => parsed.out = it.next().ok_or("--out needs a directory")?.into(),
            "--profile" => {
                parsed.profile = match it.next().map(String::as_str) {
                    Some("xdp") => Some("xdp"),
                    Some("udp") => Some("udp"),
                    _ => return Err("--profile takes xdp or udp".into()),
                }
            }
            "--only" => {
                let list = it.next().ok_or("--only needs a list of sections")?;
                let sections = list.split(',').map(|name| {
                    SECTIONS
                        .into_iter()
                        .find(|s| *s == name)
                        .ok_or_else(|| format!("unknown section {name:?}"))
                });
                parsed.only = Some(sections.collect::<std::result::Result<_, _>>()?);
            }
            "-h" | "--help" => return Err(String::new()),
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    Ok(parsed)
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Args {
        quick,
        out,
        profile,
        only,
    } = match parse_args(&args) {
        Ok(parsed) => parsed,
        Err(why) => {
            if !why.is_empty() {
                eprintln!("paqet-bench: {why}");
            }
            eprintln!("{USAGE}");
            std::process::exit(if why.is_empty() { 0 } else { 2 });
        }
    };
    if let Some(tr) = profile {
        bench::raise_nofile();
        let mut b = Bench {
            s: if quick { QUICK } else { FULL },
            r: Results::default(),
        };
        if let Err(e) = b.profile(tr, &out) {
            eprintln!("paqet-bench: profile failed: {e:#}");
            std::process::exit(1);
        }
        return;
    }
    let want = |s: &str| only.as_ref().is_none_or(|o| o.contains(&s));
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("paqet-bench: needs root (network namespaces, XDP)");
        std::process::exit(2);
    }
    let nofile = bench::raise_nofile();
    let started = Instant::now();
    let machine = machine();
    eprintln!(
        "paqet-bench: {machine}; RLIMIT_NOFILE {nofile}; {}",
        if quick { "quick run" } else { "full run" }
    );
    let mut b = Bench {
        s: if quick { QUICK } else { FULL },
        r: Results {
            cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
            ..Results::default()
        },
    };

    let section = |b: &mut Bench, name: &str, f: &dyn Fn(&mut Bench) -> Result<()>| {
        if !want(name) {
            return;
        }
        let t = Instant::now();
        eprintln!("==> bench: {name}");
        if let Err(e) = f(b) {
            eprintln!("bench: {name} FAILED: {e:#}");
            b.r.notes.push(format!("section {name} failed: {e:#}"));
        }
        eprintln!("    ({name}: {:.0} s)", t.elapsed().as_secs_f64());
    };
    section(&mut b, "ceilings", &|b| b.ceilings());
    section(&mut b, "paqet-xdp", &|b| b.paqet("xdp"));
    section(&mut b, "paqet-udp", &|b| b.paqet("udp"));
    section(&mut b, "kcptun", &|b| b.kcptun());
    section(&mut b, "tcp", &|b| b.tcp());
    section(&mut b, "lossy", &|b| {
        let r1 = b.paqet_lossy("xdp");
        let r2 = b.paqet_lossy("udp");
        let r3 = b.lossy_peers();
        r1.and(r2).and(r3)
    });
    section(&mut b, "udp", &|b| b.udp_datagrams());
    section(&mut b, "real", &|b| b.real_clients());

    let s = b.s;
    let sizes = format!(
        "clean link: 1 stream × {} (cap {} s; kcptun's port-forward sweep {} capped at {} s), 8 streams × {}; rr: {} round trips of 64 bytes; \
         lossy link (40 ms RTT, 1 % loss each way): {} (cap {} s); {} concurrent streams × {}; ceilings: {} s of 1442-byte frames",
        mib(s.clean),
        s.clean_cap.as_secs(),
        mib(s.kcptun_sweep),
        s.kcptun_cap.as_secs(),
        mib(s.multi_each),
        s.rr,
        mib(s.lossy),
        s.lossy_cap.as_secs(),
        s.streams,
        mib(s.stream_len),
        s.ceiling_secs
    );
    let table = b.r.table();
    let targets = b.r.targets_table();
    let mut md = format!(
        "Machine: {machine}\n\nSizes: {sizes}\n\nTotal bench time: {:.0} s\n\n{table}\n{targets}",
        started.elapsed().as_secs_f64()
    );
    if !b.r.upkeep.is_empty() {
        md.push_str(&format!(
            "\nSession upkeep during each paqet row (handshakes the client completed, keepalives both ends sent; a handshake is a datagram each way):\n\n{}",
            b.r.upkeep_table()
        ));
    }
    if !b.r.udp.is_empty() {
        md.push_str(&format!(
            "\nRelayed UDP (iperf3 -u, 1200-byte datagrams, {} s per rate, through a UDP forward; as the receiver counted):\n\n{}",
            s.udp_secs,
            b.r.udp_table()
        ));
    }
    if !b.r.real.is_empty() {
        md.push_str(&format!(
            "\nReal clients (curl through the SOCKS port, {} from nginx behind the server to /dev/null, best of {}):\n\n{}",
            mib(s.real_len),
            s.real_runs,
            b.r.real_table()
        ));
    }
    if !b.r.notes.is_empty() {
        md.push_str("\nNotes:\n");
        for n in &b.r.notes {
            md.push_str(&format!("- {n}\n"));
        }
    }
    println!("\n{md}");
    if let Err(e) = std::fs::create_dir_all(&out)
        .and_then(|_| std::fs::write(out.join("results.md"), &md))
        .and_then(|_| std::fs::write(out.join("results.tsv"), b.r.tsv()))
    {
        eprintln!("paqet-bench: writing {}: {e}", out.display());
    }
    match bench::charts::draw_all(&b.r, &out) {
        Ok(files) => eprintln!(
            "paqet-bench: wrote results.md and charts {} in {}",
            files.join(", "),
            out.display()
        ),
        Err(e) => eprintln!("paqet-bench: charts: {e:#}"),
    }
}
