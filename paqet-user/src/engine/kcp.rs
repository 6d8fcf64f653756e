//! One KCP conversation per stream ([`super::arq`]), tuned the way kcptun tunes its modes.

use std::io;

use super::arq::Arq;

/// kcptun's named parameter sets: (nodelay, interval ms, fast resend, no congestion control).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KcpProfile {
    Normal,
    Fast,
    Fast2,
    Fast3,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KcpTuning {
    pub nodelay: bool,
    pub interval_ms: u32,
    pub resend: i32,
    pub no_congestion_control: bool,
}

impl KcpProfile {
    /// The values kcptun's `-mode` flag selects (kcptun client/main.go).
    pub fn tuning(self) -> KcpTuning {
        let (nodelay, interval_ms, resend, nc) = match self {
            KcpProfile::Normal => (false, 40, 2, true),
            KcpProfile::Fast => (false, 30, 2, true),
            KcpProfile::Fast2 => (true, 20, 2, true),
            KcpProfile::Fast3 => (true, 10, 2, true),
        };
        KcpTuning {
            nodelay,
            interval_ms,
            resend,
            no_congestion_control: nc,
        }
    }
}

/// Where the engine has conversations write their output packets (`Arq::flush` and
/// `Arq::update` take it as their sink); the engine seals them right after each KCP call,
/// while it still knows which peer they are for.
/// Packets are stored back to back in one reused buffer: no allocation per packet.
#[derive(Default)]
pub struct OutputPackets {
    data: Vec<u8>,
    ends: Vec<usize>,
}

impl OutputPackets {
    pub fn iter(&self) -> impl Iterator<Item = &[u8]> {
        let starts = std::iter::once(0).chain(self.ends.iter().copied());
        starts.zip(self.ends.iter().copied()).map(|(a, b)| &self.data[a..b])
    }

    pub fn is_empty(&self) -> bool {
        self.ends.is_empty()
    }

    pub fn clear(&mut self) {
        self.data.clear();
        self.ends.clear();
    }
}

impl io::Write for OutputPackets {
    fn write(&mut self, packet: &[u8]) -> io::Result<usize> {
        self.data.extend_from_slice(packet);
        self.ends.push(self.data.len());
        Ok(packet.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

pub type Conversation = Arq;

/// A message-mode conversation, so every stream message keeps its boundaries.
/// A stream message is at most eight segments (`mux`), so twice that always fits; the
/// ARQ's own floor (128, for ikcp's 127-fragment messages) made each of a thousand
/// streams hold four times the receive memory its share of the budget allows. Windows
/// come from the budget (`mux::window_for`, at least 32), so this only keeps the ARQ
/// from raising them.
const MIN_RCV_WINDOW: u16 = 16;

pub fn new_conversation(conv: u32, tuning: KcpTuning, mtu: usize, window: u16, now_ms: u32) -> Conversation {
    let mut kcp = Arq::new(conv);
    kcp.set_nodelay(
        tuning.nodelay,
        tuning.interval_ms as i32,
        tuning.resend,
        tuning.no_congestion_control,
    );
    // MTU is fixed by the engine from constants well above KCP's minimum; a failure here
    // would be a programming error, and KCP keeps its default MTU in that case.
    let _ = kcp.set_mtu(mtu);
    kcp.set_min_rcv_wnd(MIN_RCV_WINDOW);
    kcp.set_wndsize(window, window);
    // Starts the flush schedule; a new conversation has nothing to send yet.
    let _ = kcp.update(now_ms, &mut io::sink());
    kcp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fast3_matches_kcptun() {
        let t = KcpProfile::Fast3.tuning();
        assert_eq!(
            (t.nodelay, t.interval_ms, t.resend, t.no_congestion_control),
            (true, 10, 2, true)
        );
        let n = KcpProfile::Normal.tuning();
        assert_eq!((n.nodelay, n.interval_ms), (false, 40));
    }

    #[test]
    fn message_crosses_two_conversations() {
        let tuning = KcpProfile::Fast3.tuning();
        let mut a = new_conversation(7, tuning, 1400, 128, 0);
        let mut b = new_conversation(7, tuning, 1400, 128, 0);
        let msg = vec![0xabu8; 5000];
        a.send(&msg).unwrap();
        let mut packets = OutputPackets::default();
        a.flush(&mut packets).unwrap();
        for pkt in packets.iter() {
            b.input(pkt).unwrap();
        }
        let mut buf = vec![0u8; 8192];
        let n = b.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], &msg[..]);
    }
}
