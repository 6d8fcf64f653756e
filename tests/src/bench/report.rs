//! The bench's results: rows as measured, the side-by-side table (markdown, printed on
//! stdout and written to `docs/bench/results.md`), and the targets as PASS/MISS.

use std::fmt::Write as _;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Ceiling,
    Paqet,
    Kcptun {
        encrypted: bool,
        socks: bool,
    },
    Tcp,
    /// Direct TCP through two plain forwarders: what a relay's two extra hops cost
    /// before it does any work (round trips only).
    Forwarders,
}

/// Test keys.
pub const CEILING: &str = "ceiling";
/// The raw packet paths' rows (see `paqet-blast`).
pub const CEILING_UDP: &str = "ceiling UDP";
pub const CEILING_XDP: &str = "ceiling AF_XDP";
pub const CEILING_UDP_SEGMENTED: &str = "ceiling UDP, GSO segmented before the wire";
pub const CEILING_PACKET_GSO: &str = "ceiling AF_PACKET GSO → AF_XDP";
/// Payloads per write in the segmented UDP ceiling: 45 × 1400 bytes, as paqet udp's
/// GSO batches come close to 64 KiB.
pub const CEILING_GSO_SEGMENTS: usize = 45;
pub const CLEAN1: &str = "clean-1";
pub const CLEAN8: &str = "clean-8";
pub const RR: &str = "rr";
pub const LOSSY: &str = "lossy";
pub const STREAMS: &str = "streams";

#[derive(Clone, Debug)]
pub struct Row {
    pub system: String,
    pub kind: Kind,
    pub test: &'static str,
    /// MB/s (10^6 bytes) for transfers; p50 µs for rr; wall seconds for streams.
    pub value: f64,
    /// p99 µs for rr; unused otherwise.
    pub value2: f64,
    pub cpu_per_gib: Option<f64>,
    pub note: String,
    /// The values of the rounds `value` is the median of ([`Results::keep_median`]);
    /// empty for a row measured once.
    pub rounds: Vec<f64>,
}

/// Relayed UDP at a fixed offered rate (iperf3 -u), as its receiver counted it.
#[derive(Clone, Debug)]
pub struct UdpRow {
    pub system: String,
    pub offered_mbit: f64,
    pub goodput_mbit: f64,
    pub loss_percent: f64,
}

/// A real client's downloads: curl through the SOCKS port, from nginx behind the server.
#[derive(Clone, Debug)]
pub struct RealRow {
    pub system: String,
    /// MB/s of each run, as curl measured it.
    pub runs: Vec<f64>,
    /// Frames the client's receive ring or socket dropped during the runs.
    pub receive_overflows: u64,
}

impl RealRow {
    pub fn best(&self) -> f64 {
        self.runs.iter().copied().fold(0.0, f64::max)
    }
}

/// What a paqet row cost in session upkeep: handshakes both ends completed and
/// keepalives both ends sent while the row was measured.
#[derive(Clone, Debug)]
pub struct Upkeep {
    pub system: String,
    pub test: &'static str,
    pub handshakes: u64,
    pub keepalives: u64,
    pub datagrams: u64,
}

impl Upkeep {
    /// Upkeep datagrams as a percentage of all the row's datagrams.
    pub fn share(&self) -> f64 {
        100.0 * (self.handshakes * 2 + self.keepalives) as f64 / self.datagrams.max(1) as f64
    }
}

/// Whether `a`'s value is at least the slowest of `b`'s rounds (false for a row
/// measured once).
fn within_rounds(a: &Row, b: &Row) -> bool {
    b.rounds
        .iter()
        .copied()
        .reduce(f64::min)
        .is_some_and(|lo| a.value >= lo)
}

/// A target's result: met, missed, or without the rows to tell.
fn verdict(ok: Option<bool>) -> &'static str {
    match ok {
        Some(true) => "PASS",
        Some(false) => "MISS",
        None => "NOT MEASURED",
    }
}

/// The direct UDP rows' system (iperf3 from the client namespace to the server's).
pub const UDP_DIRECT: &str = "UDP direct";

/// The xdp rows over the TCP-shaped wire (the default) are `paqet xdp`; the same over
/// the UDP wire are this system, to show what the TCP wire's opening and upkeep cost.
pub const XDP_UDP_WIRE: &str = "paqet xdp, udp wire";

/// paqet udp's one-stream row with UDP segmented before the wire (no 64 KiB datagrams
/// crossing the veth whole).
pub const UDP_SEGMENTED: &str = "paqet udp, segmented";

/// Eight paqet udp clients of one stream each, through one server (its `clean-8` row).
pub const UDP_CLIENTS: &str = "paqet udp, 8 clients";

/// The same through a server held to one engine (`THREADS=1`), as before sharding.
pub const UDP_CLIENTS_ONE_ENGINE: &str = "paqet udp, 8 clients, THREADS=1";

/// One paqet udp client of two engines (`THREADS=2`), its 8 streams (`clean-8`).
pub const UDP_CLIENT_TWO_ENGINES: &str = "paqet udp, client THREADS=2";

#[derive(Default, Debug)]
pub struct Results {
    pub rows: Vec<Row>,
    /// (system, process, peak RSS KiB)
    pub rss: Vec<(String, String, u64)>,
    pub udp: Vec<UdpRow>,
    pub real: Vec<RealRow>,
    pub upkeep: Vec<Upkeep>,
    pub notes: Vec<String>,
    /// The machine's cores (the scaling targets need 8).
    pub cores: usize,
}

impl Results {
    pub fn add(&mut self, row: Row) {
        eprintln!(
            "bench: {:<32} {:<8} {:>10.1} {:>10} {}",
            row.system,
            row.test,
            row.value,
            row.cpu_per_gib.map_or("-".into(), |c| format!("{c:.2} s/GiB")),
            row.note
        );
        self.rows.push(row);
    }

    /// Replaces the rows of `system`'s `test` by their median (by value), noting every
    /// value: one short row on a lossy link varies by ±40 % from run to run, so a
    /// comparison between two such rows needs several of each.
    pub fn keep_median(&mut self, system: &str, test: &str) {
        let (mut same, rest): (Vec<Row>, Vec<Row>) = std::mem::take(&mut self.rows)
            .into_iter()
            .partition(|r| r.system == system && r.test == test);
        self.rows = rest;
        if same.len() > 1 {
            let values = same
                .iter()
                .map(|r| format!("{:.1}", r.value))
                .collect::<Vec<_>>()
                .join(", ");
            same.sort_by(|a, b| a.value.total_cmp(&b.value));
            let n = same.len();
            let rounds = same.iter().map(|r| r.value).collect();
            let mut median = same.swap_remove(n / 2);
            median.note = format!("median of {n}: {values}");
            median.rounds = rounds;
            eprintln!("bench: {system} {test}: {}", median.note);
            self.rows.push(median);
        } else {
            self.rows.extend(same);
        }
    }

    pub fn get(&self, system: &str, test: &str) -> Option<&Row> {
        self.rows.iter().find(|r| r.system == system && r.test == test)
    }

    fn systems(&self) -> Vec<(String, Kind)> {
        let mut v: Vec<(String, Kind)> = Vec::new();
        for r in &self.rows {
            if !v.iter().any(|(s, _)| *s == r.system) {
                v.push((r.system.clone(), r.kind));
            }
        }
        v
    }

    fn best(&self, test: &str, pred: impl Fn(Kind) -> bool, higher: bool) -> Option<&Row> {
        let it = self.rows.iter().filter(|r| r.test == test && pred(r.kind));
        if higher {
            it.max_by(|a, b| a.value.total_cmp(&b.value))
        } else {
            it.min_by(|a, b| a.value.total_cmp(&b.value))
        }
    }

    /// The floor under "xdp ≥ udp segmented": what each raw path costs per GiB with no
    /// relay on it. Where the raw AF_XDP path already costs more CPU per GiB than raw
    /// segmented UDP, paqet xdp cannot cost less than paqet udp on this machine: the
    /// engine above is the same.
    fn raw_path_floor(&self) -> (String, &'static str, String) {
        let xdp = self.get(CEILING_XDP, CEILING).and_then(|r| r.cpu_per_gib);
        let udp = self.get(CEILING_UDP_SEGMENTED, CEILING).and_then(|r| r.cpu_per_gib);
        let d = xdp.zip(udp).map_or(String::new(), |(x, u)| {
            format!(
                "raw AF_XDP {x:.2} vs raw UDP segmented {u:.2} CPU s/GiB = {:.2}×",
                x / u
            )
        });
        (
            "information: the floor under it, CPU per GiB of the raw paths (AF_XDP against UDP segmented)".to_string(),
            "INFO",
            d,
        )
    }

    /// The side-by-side table, as markdown.
    pub fn table(&self) -> String {
        let mut t = String::new();
        let _ = writeln!(
            t,
            "| system | clean 1 stream MB/s | CPU s/GiB | clean 8 streams MB/s | CPU s/GiB | rr p50 µs | rr p99 µs | lossy MB/s | CPU s/GiB | 1000 streams s | CPU s/GiB | peak RSS MiB |"
        );
        let _ = writeln!(t, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
        let f = |v: Option<f64>, p: usize| v.map_or("–".to_string(), |v| format!("{v:.p$}"));
        for (sys, kind) in self.systems() {
            let g = |test| self.get(&sys, test);
            let xfer = |test| {
                let r = g(test);
                let mut v = f(r.map(|r| r.value), 1);
                if let Some(r) = r
                    && !r.note.is_empty()
                {
                    v.push_str(&format!(" ({})", r.note));
                }
                (v, f(r.and_then(|r| r.cpu_per_gib), 2))
            };
            let (c1, c1cpu) = if kind == Kind::Ceiling {
                xfer(CEILING)
            } else {
                xfer(CLEAN1)
            };
            let (c8, c8cpu) = xfer(CLEAN8);
            let rr = g(RR);
            let (lo, locpu) = xfer(LOSSY);
            let (st, stcpu) = xfer(STREAMS);
            let rss: Vec<u64> = self.rss.iter().filter(|(s, _, _)| *s == sys).map(|r| r.2).collect();
            let rss = if rss.is_empty() {
                "–".to_string()
            } else {
                rss.iter()
                    .map(|k| format!("{:.0}", *k as f64 / 1024.0))
                    .collect::<Vec<_>>()
                    .join(" + ")
            };
            let _ = writeln!(
                t,
                "| {sys} | {c1} | {c1cpu} | {c8} | {c8cpu} | {} | {} | {lo} | {locpu} | {st} | {stcpu} | {rss} |",
                f(rr.map(|r| r.value), 0),
                f(rr.map(|r| r.value2), 0)
            );
        }
        t
    }

    /// Each target, with PASS / MISS / NOT MEASURED and the numbers behind it.
    pub fn targets(&self) -> Vec<(String, &'static str, String)> {
        let mut out = Vec::new();
        let enc_kcp = |k: Kind| matches!(k, Kind::Kcptun { encrypted: true, .. });
        let any_kcp = |k: Kind| matches!(k, Kind::Kcptun { .. });
        let best_kcp_enc = self.best(CLEAN1, enc_kcp, true);
        for tr in ["xdp", "udp"] {
            let sys = format!("paqet {tr}");
            let c1 = self.get(&sys, CLEAN1);
            let k = if tr == "xdp" { 5.0 } else { 3.0 };
            let ok = c1.zip(best_kcp_enc).map(|(a, b)| a.value >= k * b.value);
            let d = c1.zip(best_kcp_enc).map_or(String::new(), |(a, b)| {
                format!(
                    "{:.1} vs {:.1} MB/s ({}) = {:.1}×",
                    a.value,
                    b.value,
                    b.system,
                    a.value / b.value
                )
            });
            out.push((
                format!("clean, 1 stream, {tr} ≥ {k}× kcptun's best encrypted"),
                verdict(ok),
                d,
            ));
        }
        for tr in ["xdp", "udp"] {
            let sys = format!("paqet {tr}");
            for test in [CLEAN1, CLEAN8, LOSSY, STREAMS] {
                let mine = self.get(&sys, test).and_then(|r| r.cpu_per_gib);
                let theirs = self
                    .rows
                    .iter()
                    .filter(|r| r.test == test && any_kcp(r.kind))
                    .filter_map(|r| r.cpu_per_gib.map(|c| (c, r.system.clone())))
                    .min_by(|a, b| a.0.total_cmp(&b.0));
                let ok = mine.zip(theirs.as_ref()).map(|(a, b)| a < b.0);
                let d = mine.zip(theirs.as_ref()).map_or(String::new(), |(a, b)| {
                    format!("{a:.2} vs {:.2} s/GiB (kcptun's lowest: {})", b.0, b.1)
                });
                out.push((
                    format!("CPU s/GiB, {tr}, {test}: below every kcptun configuration"),
                    verdict(ok),
                    d,
                ));
            }
        }
        let tcp_p50 = self.best(RR, |k| k == Kind::Tcp, false);
        let forwarders_p50 = self.best(RR, |k| k == Kind::Forwarders, false);
        let kcp_socks_p50 = self.best(RR, |k| matches!(k, Kind::Kcptun { socks: true, .. }), false);
        for tr in ["xdp", "udp"] {
            let sys = format!("paqet {tr}");
            let rr = self.get(&sys, RR);
            // Any two-hop relay pays the two forwarders' hops; the target is what the relay adds.
            let ok = rr.zip(forwarders_p50).map(|(a, b)| a.value <= 2.0 * b.value);
            let mut d = rr.zip(forwarders_p50).map_or(String::new(), |(a, b)| {
                format!("{:.0} vs {:.0} µs = {:.2}×", a.value, b.value, a.value / b.value)
            });
            if let Some((f, t)) = forwarders_p50.zip(tcp_p50) {
                d.push_str(&format!(
                    "; the floor is {:.2}× direct TCP ({:.0} µs)",
                    f.value / t.value,
                    t.value
                ));
            }
            out.push((format!("rr p50, {tr} ≤ 2× the two-forwarder floor"), verdict(ok), d));
            let ok = rr.zip(kcp_socks_p50).map(|(a, b)| a.value <= 0.5 * b.value);
            let d = rr.zip(kcp_socks_p50).map_or(String::new(), |(a, b)| {
                format!(
                    "{:.0} vs {:.0} µs ({}) = {:.2}×",
                    a.value,
                    b.value,
                    b.system,
                    a.value / b.value
                )
            });
            out.push((format!("rr p50, {tr} ≤ ½ kcptun + SOCKS5"), verdict(ok), d));
        }
        let kcp_lossy = self.best(LOSSY, any_kcp, true);
        let bbr_lossy = self.get("TCP bbr", LOSSY);
        for tr in ["xdp", "udp"] {
            let sys = format!("paqet {tr}");
            let lo = self.get(&sys, LOSSY);
            let ok = lo.zip(kcp_lossy).map(|(a, b)| a.value >= 1.5 * b.value);
            let d = lo.zip(kcp_lossy).map_or(String::new(), |(a, b)| {
                format!(
                    "{:.1} vs {:.1} MB/s ({}) = {:.2}×",
                    a.value,
                    b.value,
                    b.system,
                    a.value / b.value
                )
            });
            out.push((format!("lossy, {tr} ≥ 1.5× kcptun's best"), verdict(ok), d));
            let ok = lo.zip(bbr_lossy).map(|(a, b)| a.value >= b.value);
            let d = lo.zip(bbr_lossy).map_or(String::new(), |(a, b)| {
                format!("{:.1} vs {:.1} MB/s = {:.2}×", a.value, b.value, a.value / b.value)
            });
            out.push((format!("lossy, {tr} ≥ TCP with BBR"), verdict(ok), d));
        }
        // The TCP-shaped wire's frames carry 32 bytes of TCP header and timestamps where
        // UDP has 8, about 2 % of a full frame: more than that is what its opening and
        // upkeep would cost. One row of either varies by ±20-40 % between runs here, so a
        // median at or above the UDP wire's slowest round is within the noise too.
        for test in [CLEAN1, LOSSY] {
            let tcp_wire = self.get("paqet xdp", test);
            let udp_wire = self.get(XDP_UDP_WIRE, test);
            let ok = tcp_wire
                .zip(udp_wire)
                .map(|(a, b)| a.value >= 0.9 * b.value || within_rounds(a, b));
            let d = tcp_wire.zip(udp_wire).map_or(String::new(), |(a, b)| {
                let spread = match (
                    b.rounds.iter().copied().reduce(f64::min),
                    b.rounds.iter().copied().reduce(f64::max),
                ) {
                    (Some(lo), Some(hi)) => format!("; the UDP wire's rounds {lo:.1}–{hi:.1}"),
                    _ => String::new(),
                };
                format!(
                    "{:.1} vs {:.1} MB/s = {:.2}×{spread}",
                    a.value,
                    b.value,
                    a.value / b.value
                )
            });
            out.push((
                format!("{test}, xdp: the TCP-shaped wire ≥ 90 % of the UDP wire, or within its rounds' spread"),
                verdict(ok),
                d,
            ));
        }
        let xdp1 = self.get("paqet xdp", CLEAN1);
        let segmented = self.get(UDP_SEGMENTED, CLEAN1);
        let ok = xdp1
            .zip(segmented)
            .map(|(a, b)| a.value >= b.value && a.cpu_per_gib.zip(b.cpu_per_gib).is_some_and(|(x, u)| x <= u));
        let d = xdp1.zip(segmented).map_or(String::new(), |(a, b)| {
            let cpu = |r: &Row| r.cpu_per_gib.map_or("–".to_string(), |c| format!("{c:.2}"));
            format!(
                "{:.1} vs {:.1} MB/s = {:.2}×; {} vs {} CPU s/GiB",
                a.value,
                b.value,
                a.value / b.value,
                cpu(a),
                cpu(b)
            )
        });
        out.push((
            "clean, 1 stream: xdp ≥ udp segmented before the wire, at no more CPU s/GiB".to_string(),
            verdict(ok),
            d,
        ));
        out.push(self.raw_path_floor());
        out.extend(self.scaling_targets());
        let worst_upkeep = self.upkeep.iter().max_by(|a, b| a.share().total_cmp(&b.share()));
        out.push((
            "session upkeep (handshakes, keepalives) during any paqet row ≤ 0.1 % of its datagrams".to_string(),
            verdict(worst_upkeep.map(|u| u.share() <= 0.1)),
            worst_upkeep.map_or(String::new(), |u| {
                format!("at most {:.4} % ({}, {})", u.share(), u.system, u.test)
            }),
        ));
        for tr in ["xdp", "udp"] {
            let sys = format!("paqet {tr}");
            let st = self.get(&sys, STREAMS);
            let rss = self.rss.iter().filter(|(s, _, _)| *s == sys).map(|r| r.2).max();
            let ok = st.zip(rss).map(|(s, r)| s.note.starts_with("all ") && r < 256 * 1024);
            let d = st.zip(rss).map_or(String::new(), |(s, r)| {
                format!("{}, {:.1} s; peak RSS {:.0} MiB", s.note, s.value, r as f64 / 1024.0)
            });
            out.push((
                format!("1,000 streams, {tr}: all complete and RSS < 256 MiB"),
                verdict(ok),
                d,
            ));
        }
        out
    }

    /// A server's use of cores: 8 clients of one stream against one client's stream
    /// (≥ 3×), and one client's 8 streams against its one (≥ 2×). Both need ≥ 8 cores
    /// to show; on fewer the verdict is given with the machine's core count beside it.
    fn scaling_targets(&self) -> Vec<(String, &'static str, String)> {
        let cores = if self.cores >= 8 {
            String::new()
        } else {
            format!(" (this machine has {} cores; the target needs ≥ 8)", self.cores)
        };
        let ratio = |many: Option<&Row>, one: Option<&Row>, k: f64| {
            let ok = many.zip(one).map(|(a, b)| a.value >= k * b.value);
            let d = many.zip(one).map_or(String::new(), |(a, b)| {
                format!(
                    "{:.1} vs {:.1} MB/s = {:.2}×{cores}",
                    a.value,
                    b.value,
                    a.value / b.value
                )
            });
            (verdict(ok), d)
        };
        let udp1 = self.get("paqet udp", CLEAN1);
        let (v, d) = ratio(self.get(UDP_CLIENTS, CLEAN8), udp1, 3.0);
        let mut out = vec![(
            "8 clients × 1 stream through one server ≥ 3× one client's (udp)".to_string(),
            v,
            d,
        )];
        let (_, d) = ratio(
            self.get(UDP_CLIENTS, CLEAN8),
            self.get(UDP_CLIENTS_ONE_ENGINE, CLEAN8),
            1.0,
        );
        out.push((
            "information: 8 clients, THREADS=auto against THREADS=1 (udp)".to_string(),
            "INFO",
            d,
        ));
        let (_, d) = ratio(
            self.get(UDP_CLIENT_TWO_ENGINES, CLEAN8),
            self.get("paqet udp", CLEAN8),
            1.0,
        );
        out.push((
            "information: one client's 8 streams, client THREADS=2 against 1 (udp)".to_string(),
            "INFO",
            d,
        ));
        for tr in ["xdp", "udp"] {
            let sys = format!("paqet {tr}");
            let (v, d) = ratio(self.get(&sys, CLEAN8), self.get(&sys, CLEAN1), 2.0);
            out.push((format!("one client's 8 streams ≥ 2× its one stream ({tr})"), v, d));
        }
        out
    }

    /// Relayed UDP beside direct UDP at the same offered rate.
    pub fn udp_table(&self) -> String {
        let mut t = String::from(
            "| system | offered Mbit/s | goodput Mbit/s | loss % | goodput vs direct |\n|---|---:|---:|---:|---:|\n",
        );
        for r in &self.udp {
            let direct = self
                .udp
                .iter()
                .find(|d| d.system == UDP_DIRECT && d.offered_mbit == r.offered_mbit);
            let ratio = direct.map_or("–".to_string(), |d| {
                format!("{:.2}×", r.goodput_mbit / d.goodput_mbit)
            });
            let _ = writeln!(
                t,
                "| {} | {:.0} | {:.1} | {:.2} | {ratio} |",
                r.system, r.offered_mbit, r.goodput_mbit, r.loss_percent
            );
        }
        t
    }

    /// Real clients' downloads, best run first, beside paqet udp's.
    pub fn real_table(&self) -> String {
        let mut t = String::from(
            "| system | best MB/s | runs MB/s | vs paqet udp | client receive overflows |\n|---|---:|---:|---:|---:|\n",
        );
        let udp = self.real.iter().find(|r| r.system == "paqet udp").map(RealRow::best);
        for r in &self.real {
            let runs = r.runs.iter().map(|v| format!("{v:.1}")).collect::<Vec<_>>().join(", ");
            let ratio = udp
                .filter(|u| *u > 0.0)
                .map_or("–".to_string(), |u| format!("{:.2}×", r.best() / u));
            let _ = writeln!(
                t,
                "| {} | {:.1} | {runs} | {ratio} | {} |",
                r.system,
                r.best(),
                r.receive_overflows
            );
        }
        t
    }

    /// Handshakes and keepalives during each paqet row.
    pub fn upkeep_table(&self) -> String {
        let mut t = String::from(
            "| system | row | handshakes | keepalives | datagrams both ways | upkeep share |\n|---|---|---:|---:|---:|---:|\n",
        );
        for u in &self.upkeep {
            let _ = writeln!(
                t,
                "| {} | {} | {} | {} | {} | {:.4} % |",
                u.system,
                u.test,
                u.handshakes,
                u.keepalives,
                u.datagrams,
                u.share()
            );
        }
        t
    }

    pub fn targets_table(&self) -> String {
        let mut t = String::from("| target | result | numbers |\n|---|---|---|\n");
        for (what, v, d) in self.targets() {
            let _ = writeln!(t, "| {what} | **{v}** | {d} |");
        }
        t
    }

    /// Every row, tab-separated, for anyone who wants to redraw the charts.
    pub fn tsv(&self) -> String {
        let mut t = String::from("system\ttest\tvalue\tvalue2\tcpu_s_per_gib\tnote\n");
        for r in &self.rows {
            let _ = writeln!(
                t,
                "{}\t{}\t{:.3}\t{:.3}\t{}\t{}",
                r.system,
                r.test,
                r.value,
                r.value2,
                r.cpu_per_gib.map_or(String::new(), |c| format!("{c:.3}")),
                r.note
            );
        }
        for (s, p, k) in &self.rss {
            let _ = writeln!(t, "{s}\trss:{p}\t{k}\t\t\tKiB");
        }
        t
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(system: &str, test: &'static str, value: f64) -> Row {
        Row {
            system: system.into(),
            kind: Kind::Paqet,
            test,
            value,
            value2: 0.0,
            cpu_per_gib: None,
            note: String::new(),
            rounds: Vec::new(),
        }
    }

    #[test]
    fn keep_median_leaves_one_row_with_the_middle_value_and_every_value_noted() {
        let mut r = Results::default();
        for v in [90.0, 140.0, 60.0] {
            r.rows.push(row("paqet xdp", LOSSY, v));
        }
        r.rows.push(row("paqet xdp", CLEAN1, 400.0));
        r.rows.push(row("paqet udp", LOSSY, 150.0));
        r.keep_median("paqet xdp", LOSSY);
        let lossy: Vec<&Row> = r
            .rows
            .iter()
            .filter(|x| x.system == "paqet xdp" && x.test == LOSSY)
            .collect();
        assert_eq!(lossy.len(), 1);
        assert_eq!(lossy[0].value, 90.0);
        assert_eq!(lossy[0].note, "median of 3: 90.0, 140.0, 60.0");
        assert_eq!(lossy[0].rounds, vec![60.0, 90.0, 140.0]);
        assert!(within_rounds(&row("tcp", LOSSY, 60.0), lossy[0]));
        assert!(!within_rounds(&row("tcp", LOSSY, 59.9), lossy[0]));
        assert!(
            !within_rounds(lossy[0], &row("udp", LOSSY, 10.0)),
            "one round: no spread"
        );
        assert_eq!(r.get("paqet xdp", CLEAN1).map(|x| x.value), Some(400.0));
        assert_eq!(r.get("paqet udp", LOSSY).map(|x| x.value), Some(150.0));
    }

    #[test]
    fn the_real_client_table_compares_best_runs_with_paqet_udp() {
        let mut r = Results::default();
        for (system, runs, overflows) in [
            ("paqet xdp", vec![300.0, 324.0], 21_401),
            ("paqet udp", vec![580.0, 540.0], 0),
        ] {
            r.real.push(RealRow {
                system: system.into(),
                runs,
                receive_overflows: overflows,
            });
        }
        let t = r.real_table();
        assert!(
            t.contains("| paqet xdp | 324.0 | 300.0, 324.0 | 0.56× | 21401 |"),
            "{t}"
        );
        assert!(t.contains("| paqet udp | 580.0 | 580.0, 540.0 | 1.00× | 0 |"), "{t}");
    }

    fn target<'a>(t: &'a [(String, &'static str, String)], starts: &str) -> (&'a str, &'a str) {
        let (_, v, d) = t.iter().find(|(n, _, _)| n.starts_with(starts)).expect(starts);
        (v, d)
    }

    #[test]
    fn xdp_must_match_segmented_udp_in_goodput_and_cpu() {
        let mut r = Results::default();
        let with_cpu = |sys: &str, v: f64, cpu: f64| Row {
            cpu_per_gib: Some(cpu),
            ..row(sys, CLEAN1, v)
        };
        r.rows.push(with_cpu("paqet xdp", 400.0, 3.0));
        r.rows.push(with_cpu(UDP_SEGMENTED, 380.0, 2.5));
        let t = r.targets();
        let (v, d) = target(&t, "clean, 1 stream: xdp ≥ udp segmented");
        assert_eq!(v, "MISS", "faster but dearer: {d}");
        assert_eq!(d, "400.0 vs 380.0 MB/s = 1.05×; 3.00 vs 2.50 CPU s/GiB");
        r.rows[0].cpu_per_gib = Some(2.5);
        assert_eq!(target(&r.targets(), "clean, 1 stream: xdp ≥ udp segmented").0, "PASS");
    }

    #[test]
    fn scaling_targets_compare_many_with_one_and_name_the_cores() {
        let mut r = Results {
            cores: 2,
            ..Results::default()
        };
        r.rows.push(row("paqet udp", CLEAN1, 300.0));
        r.rows.push(row("paqet udp", CLEAN8, 620.0));
        r.rows.push(row(UDP_CLIENTS, CLEAN8, 330.0));
        let t = r.targets();
        let (v, d) = target(&t, "8 clients × 1 stream");
        assert_eq!(v, "MISS");
        assert_eq!(
            d,
            "330.0 vs 300.0 MB/s = 1.10× (this machine has 2 cores; the target needs ≥ 8)"
        );
        assert_eq!(target(&t, "one client's 8 streams ≥ 2× its one stream (udp)").0, "PASS");
        assert_eq!(
            target(&t, "one client's 8 streams ≥ 2× its one stream (xdp)").0,
            "NOT MEASURED"
        );
    }

    #[test]
    fn keep_median_of_one_row_changes_nothing() {
        let mut r = Results::default();
        r.rows.push(row("paqet xdp", LOSSY, 70.0));
        r.keep_median("paqet xdp", LOSSY);
        assert_eq!(r.rows.len(), 1);
        assert_eq!(r.rows[0].note, "");
    }
}
