//! A server split across threads: one engine per thread (a *shard*), each holding the
//! clients whose handshakes reached it. The kernel spreads datagrams over the shards'
//! sockets by their addresses (SO_REUSEPORT hashes the 4-tuple), so a client stays on
//! its shard for as long as its address does. A client whose address changed (a NAT
//! rebinding, a roam) reaches another shard: that shard hands the datagram to the
//! owner, found in the [`Directory`] all shards share. The directory is read only for a
//! datagram that names no session of the shard it reached, and written only when a
//! session or a client comes or goes: never per packet of a settled flow.

use std::net::SocketAddr;
use std::sync::{Arc, RwLock};

use super::{EngineConfig, FastMap, PathId, PeerId};
use crate::sync::{read, write};

/// Which of a sharded server's engines this is, and the directory they share.
#[derive(Clone, Debug)]
pub struct Shard {
    pub id: u8,
    pub count: u8,
    pub directory: Arc<Directory>,
}

impl Shard {
    /// `count` shards over one new directory.
    pub fn split(count: u8) -> Vec<Shard> {
        let directory = Arc::new(Directory::default());
        (0..count)
            .map(|id| Shard {
                id,
                count,
                directory: directory.clone(),
            })
            .collect()
    }

    /// The shard that owns `index`, when another one does.
    pub(super) fn foreign_session(&self, index: u32) -> Option<u8> {
        self.elsewhere(read(&self.directory.0).sessions.get(&index))
    }

    /// The shard that holds client `instance`, when another one does.
    pub(super) fn foreign_instance(&self, instance: PeerId) -> Option<u8> {
        self.elsewhere(read(&self.directory.0).instances.get(&instance))
    }

    fn elsewhere(&self, owner: Option<&u8>) -> Option<u8> {
        owner.copied().filter(|&owner| owner != self.id)
    }

    /// Takes `index` for this shard: false when any shard already holds it.
    pub(super) fn claim_session(&self, index: u32) -> bool {
        let mut owners = write(&self.directory.0);
        if owners.sessions.contains_key(&index) {
            return false;
        }
        owners.sessions.insert(index, self.id);
        true
    }

    pub(super) fn claim_instance(&self, instance: PeerId) {
        write(&self.directory.0).instances.insert(instance, self.id);
    }

    /// Gives back what this shard held of `instance` and `indices`.
    pub(super) fn release(&self, instance: Option<PeerId>, indices: &[u32]) {
        let mut owners = write(&self.directory.0);
        for index in indices {
            if owners.sessions.get(index) == Some(&self.id) {
                owners.sessions.remove(index);
            }
        }
        if let Some(instance) = instance
            && owners.instances.get(&instance) == Some(&self.id)
        {
            owners.instances.remove(&instance);
        }
    }
}

/// Who holds each session index and each client instance, across the shards. Read
/// for every datagram that misses a shard's own index (a flood of garbage does), so
/// readers do not wait for each other.
#[derive(Default, Debug)]
pub struct Directory(RwLock<Owners>);

#[derive(Default, Debug)]
struct Owners {
    sessions: FastMap<u32, u8>,
    instances: FastMap<PeerId, u8>,
}

/// A datagram that reached a shard other than its owner, for the edge to carry there.
#[derive(Debug)]
pub struct Handoff {
    pub shard: u8,
    pub path: PathId,
    pub from: SocketAddr,
    pub datagram: Vec<u8>,
}

impl EngineConfig {
    /// This configuration for one of `shard.count` shards. The server-wide limits are
    /// split between them (rounded up), except that every shard keeps enough window
    /// budget for one lone stream's full window in both directions: a client lands on
    /// one shard, and its single download must not be slower on a server with more
    /// cores. The memory bound is therefore the larger of the budget and that floor
    /// times the shards.
    pub fn for_shard(mut self, shard: Shard) -> EngineConfig {
        let count = usize::from(shard.count.max(1));
        let lone_stream = 2 * usize::from(self.max_window) * self.max_datagram;
        self.window_budget = (self.window_budget / count).max(lone_stream.min(self.window_budget));
        self.max_peers = self.max_peers.div_ceil(count);
        self.handshakes_before_cookies = self.handshakes_before_cookies.div_ceil(count as u32);
        self.shard = Some(shard);
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::crypto::Psk;
    use crate::engine::{EngineConfig, Role};

    #[test]
    fn a_session_index_has_one_owner_and_is_foreign_to_the_others() {
        let shards = Shard::split(3);
        assert!(shards[1].claim_session(7));
        assert!(!shards[2].claim_session(7), "two shards took one index");
        assert_eq!(shards[0].foreign_session(7), Some(1));
        assert_eq!(shards[1].foreign_session(7), None, "an own index is not foreign");
        assert_eq!(shards[0].foreign_session(8), None);
        shards[1].release(None, &[7]);
        assert_eq!(shards[0].foreign_session(7), None);
    }

    #[test]
    fn a_shard_releases_only_what_it_holds() {
        let shards = Shard::split(2);
        shards[0].claim_instance(42);
        assert!(shards[0].claim_session(5));
        shards[1].release(Some(42), &[5]);
        assert_eq!(shards[1].foreign_instance(42), Some(0));
        assert_eq!(shards[1].foreign_session(5), Some(0));
        shards[0].release(Some(42), &[5]);
        assert_eq!(shards[1].foreign_instance(42), None);
    }

    #[test]
    fn limits_are_split_but_a_lone_stream_keeps_its_window() {
        let base = EngineConfig::new(Role::Server, Psk([1; 32]), [0; 32]);
        let lone_stream = 2 * usize::from(base.max_window) * base.max_datagram;
        let one = base.clone().for_shard(Shard::split(1).remove(0));
        assert_eq!(one.window_budget, base.window_budget);
        assert_eq!(one.max_peers, base.max_peers);
        let eighth = base.clone().for_shard(Shard::split(8).remove(0));
        assert_eq!(eighth.max_peers, base.max_peers.div_ceil(8));
        assert_eq!(
            eighth.handshakes_before_cookies,
            base.handshakes_before_cookies.div_ceil(8)
        );
        assert!(
            base.window_budget / 8 < lone_stream,
            "the floor is what this test is about"
        );
        assert_eq!(eighth.window_budget, lone_stream);
    }
}
