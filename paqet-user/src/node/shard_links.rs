//! How a sharded server's engines pass each other the datagrams of clients whose new
//! address hashed to another shard's socket (see `engine::shards`). Each shard's
//! thread reads its own inbox; any shard may post to any other.

use std::sync::Mutex;

use tokio::sync::mpsc;

use crate::engine::shards::Handoff;
use crate::sync::lock;

/// Datagrams waiting for one shard. A full inbox drops, as a full socket buffer would:
/// KCP resends, and a flood of replayed datagrams cannot grow memory.
const INBOX: usize = 4096;

pub struct ShardLinks {
    /// Every shard's inbox, by shard id.
    inboxes: Vec<mpsc::Sender<Handoff>>,
    own: Mutex<Option<mpsc::Receiver<Handoff>>>,
}

impl ShardLinks {
    /// The links of `count` shards, by shard id.
    pub fn connect(count: u8) -> Vec<ShardLinks> {
        let (senders, receivers): (Vec<_>, Vec<_>) = (0..count).map(|_| mpsc::channel(INBOX)).unzip();
        receivers
            .into_iter()
            .map(|own| ShardLinks {
                inboxes: senders.clone(),
                own: Mutex::new(Some(own)),
            })
            .collect()
    }

    /// Posts `handoff` to its shard; false when that inbox is full or gone.
    pub(super) fn post(&self, handoff: Handoff) -> bool {
        self.inboxes
            .get(usize::from(handoff.shard))
            .is_some_and(|inbox| inbox.try_send(handoff).is_ok())
    }

    /// This shard's inbox, for its one reader.
    pub(super) fn take_inbox(&self) -> Option<mpsc::Receiver<Handoff>> {
        lock(&self.own).take()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::PathId;

    fn handoff(shard: u8) -> Handoff {
        Handoff {
            shard,
            path: PathId(0),
            from: "198.18.0.1:40000".parse().unwrap(),
            datagram: vec![shard],
        }
    }

    #[test]
    fn a_handoff_reaches_the_shard_it_names_and_a_full_inbox_drops() {
        let links = ShardLinks::connect(2);
        assert!(links[0].post(handoff(1)));
        assert!(!links[0].post(handoff(7)), "there is no shard 7");
        let mut inbox = links[1].take_inbox().unwrap();
        assert_eq!(inbox.try_recv().unwrap().datagram, vec![1]);
        assert!(links[1].take_inbox().is_none(), "an inbox has one reader");
        for _ in 0..INBOX {
            assert!(links[1].post(handoff(0)));
        }
        assert!(!links[1].post(handoff(0)));
    }
}
