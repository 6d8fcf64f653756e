//! A relay's engines: the first on the main thread's runtime, any others each on a
//! thread of its own with a current-thread runtime. One engine per thread keeps the
//! packet path free of any lock another thread takes (see `engine::shards` for a
//! server's, `client.rs` for a client's).

use std::io;
use std::sync::Arc;

use anyhow::{Context, Result, anyhow};
use tokio::net::TcpListener;
use tokio::runtime::Handle;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use super::{ServerCounters, StopSignals, drain, live_source, receiver_outcome, report, wait_for_stop};
use crate::node::{Node, Runner};
use crate::transport::any::AnyTransport;

pub(super) type RelayNode = Node<AnyTransport>;

/// What an engine serves beside its receivers and timers: the tasks that take new
/// streams (a server's dialing and UDP flows, a client's listeners). They stop first
/// when the relay stops; open streams go on while it drains.
pub(super) type Opening = Vec<JoinHandle<()>>;

/// How an engine thread's start goes: its node and opening tasks, made on its runtime.
pub(super) type Start = Box<dyn FnOnce() -> Result<(Arc<RelayNode>, Opening)> + Send>;

type Engine = Runner<AnyTransport>;

pub(super) struct Engines {
    engines: Vec<Engine>,
    receiver: JoinHandle<io::Result<()>>,
    timers: JoinHandle<()>,
    opening: Opening,
    stop: watch::Sender<bool>,
    failed: mpsc::UnboundedSender<anyhow::Error>,
    failures: mpsc::UnboundedReceiver<anyhow::Error>,
}

impl Engines {
    /// The first engine, on the runtime this runs in.
    pub fn on_main(node: Arc<RelayNode>, opening: Opening) -> Engines {
        let (failed, failures) = mpsc::unbounded_channel();
        Engines {
            receiver: tokio::spawn(node.clone().run_receivers()),
            timers: tokio::spawn(node.clone().run_timers()),
            engines: vec![Engine {
                node,
                runtime: Handle::current(),
            }],
            opening,
            stop: watch::channel(false).0,
            failed,
            failures,
        }
    }

    pub fn list(&self) -> &[Engine] {
        &self.engines
    }

    /// More tasks that take new streams, on the main runtime (a client's listeners,
    /// which need every engine to exist first).
    pub fn add_opening(&mut self, opening: Opening) {
        self.opening.extend(opening);
    }

    pub fn nodes(&self) -> Vec<Arc<RelayNode>> {
        self.engines.iter().map(|e| e.node.clone()).collect()
    }

    /// Another engine, on a thread of its own, made there by `start`; returns once it
    /// serves. A failure before that is returned; one after it stops the relay.
    pub fn spawn_thread(&mut self, id: u8, start: Start) -> Result<()> {
        let (started, engine) = std::sync::mpsc::sync_channel(1);
        let (stopped, failed) = (self.stop.subscribe(), self.failed.clone());
        std::thread::Builder::new()
            .name(format!("paqet-engine-{id}"))
            .spawn(move || run_thread(id, start, started, stopped, failed))
            .with_context(|| format!("cannot start engine thread {id}"))?;
        let engine = engine
            .recv()
            .map_err(|_| anyhow!("engine thread {id} ended before it served"))??;
        self.engines.push(engine);
        Ok(())
    }

    /// Publishes the live status (and metrics) of every engine, then runs until a
    /// signal or a failed engine; stops taking new streams, drains and returns.
    pub async fn run(
        mut self,
        mut signals: StopSignals,
        role: &'static str,
        server: Option<ServerCounters>,
        instance: String,
        metrics: Option<TcpListener>,
    ) -> Result<()> {
        let nodes = self.nodes();
        let mut reporting = report(live_source(nodes.clone(), role, server), instance, metrics);
        let failed = async {
            tokio::select! {
                outcome = receiver_outcome(&mut self.receiver) => outcome,
                Some(e) = self.failures.recv() => Err(e),
            }
        };
        let outcome = wait_for_stop(&mut signals, failed).await;
        self.opening.iter().for_each(JoinHandle::abort);
        self.stop.send_replace(true);
        drain(&nodes, &mut signals).await;
        self.timers.abort();
        reporting.abort_all();
        outcome
    }
}

/// An engine thread: serves until the relay stops taking new streams, then keeps
/// relaying the open ones while the main thread drains; the process ends it.
fn run_thread(
    id: u8,
    start: Start,
    started: std::sync::mpsc::SyncSender<Result<Engine>>,
    mut stopped: watch::Receiver<bool>,
    failed: mpsc::UnboundedSender<anyhow::Error>,
) {
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            let _ = started.send(Err(
                anyhow!(e).context(format!("cannot start engine thread {id}'s runtime"))
            ));
            return;
        }
    };
    runtime.block_on(async move {
        let (node, opening) = match start() {
            Ok(started) => started,
            Err(e) => {
                let _ = started.send(Err(e.context(format!("engine thread {id}"))));
                return;
            }
        };
        let mut receiver = tokio::spawn(node.clone().run_receivers());
        let _timers = tokio::spawn(node.clone().run_timers());
        let _ = started.send(Ok(Engine {
            node,
            runtime: Handle::current(),
        }));
        tokio::select! {
            outcome = receiver_outcome(&mut receiver) => {
                let e = outcome.err().unwrap_or_else(|| anyhow!("its receivers ended"));
                let _ = failed.send(e.context(format!("engine thread {id}")));
                return;
            }
            _ = stopped.changed() => opening.iter().for_each(JoinHandle::abort),
        }
        std::future::pending::<()>().await;
    });
}
