//! Client and server joined through a third namespace where `paqet-linkem` bridges the
//! two links with delay, loss, reordering and a rate limit.

use std::time::Duration;

use anyhow::{Result, bail};

use crate::netns::{ChildGuard, Netns, TwoHosts, interface_names, veth, wait_for};

#[derive(Clone, Copy, Debug, Default)]
pub struct Impairment {
    /// One way, each direction.
    pub delay_ms: f64,
    /// Extra uniform random delay per frame: reorders frames.
    pub jitter_ms: f64,
    /// Probability of dropping each frame, per direction.
    pub loss: f64,
    /// 0 = unlimited.
    pub rate_mbit: f64,
}

/// The middle of the link; dropping it stops the emulator and removes the namespace.
pub struct EmulatedLink {
    pub emulator: ChildGuard,
    pub mid: Netns,
}

pub fn linkem_bin() -> std::path::PathBuf {
    crate::relay::sibling_bin("paqet-linkem")
}

/// Two hosts as in [`TwoHosts`], but with the emulator between them.
pub fn hosts_through_emulator(tag: &str, imp: Impairment) -> Result<(TwoHosts, EmulatedLink)> {
    let client = Netns::new(&format!("pq{tag}c"))?;
    let server = Netns::new(&format!("pq{tag}s"))?;
    let mid = Netns::new(&format!("pq{tag}m"))?;
    // The middle ends get addresses outside the test subnet: the bridge is the emulator,
    // not the middle namespace's kernel (which does not forward).
    let (client_if, server_if) = interface_names(tag);
    veth(&client, &client_if, "198.18.0.1/24", &mid, "m-c", "198.19.255.1/32")?;
    veth(&server, &server_if, "198.18.0.2/24", &mid, "m-s", "198.19.255.2/32")?;
    mid.sysctl("net.ipv4.ip_forward", "0")?;
    let mut cmd = mid.command(&linkem_bin().to_string_lossy());
    cmd.args(["m-c", "m-s"])
        .args(["--delay-ms", &imp.delay_ms.to_string()])
        .args(["--jitter-ms", &imp.jitter_ms.to_string()])
        .args(["--loss", &imp.loss.to_string()])
        .args(["--rate-mbit", &imp.rate_mbit.to_string()])
        .args(["--max-seconds", "1800"]);
    let emulator = ChildGuard::spawn(&mut cmd)?;
    let hosts = TwoHosts {
        client,
        server,
        client_if,
        server_if,
    };
    // The path works once an ordinary datagram gets across (ARP through the emulator).
    let path_up = hosts.client.run(|| {
        wait_for(
            || {
                let Ok(sock) = std::net::UdpSocket::bind("198.18.0.1:0") else {
                    return false;
                };
                let _ = sock.set_read_timeout(Some(Duration::from_millis(200)));
                std::net::TcpStream::connect_timeout(
                    &"198.18.0.2:9".parse().expect("literal"),
                    Duration::from_millis(500),
                )
                .map(|_| true)
                .unwrap_or_else(|e| e.kind() == std::io::ErrorKind::ConnectionRefused)
            },
            Duration::from_secs(20),
        )
    })?;
    if !path_up {
        bail!("no path through the link emulator");
    }
    Ok((hosts, EmulatedLink { emulator, mid }))
}
