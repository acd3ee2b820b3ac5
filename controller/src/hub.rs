//! The connected agents: one bounded channel per agent feeding its order
//! stream, plus kill acknowledgements.
//!
//! Sending never waits: an order line is serialized once and the same
//! reference-counted bytes are offered to every channel with `try_send`, so a
//! fleet-wide kill is a loop over a map, not 10,000 awaits. An agent whose
//! channel is full is too slow to be trusted with ordering; it is
//! disconnected and gets the full state again when it reconnects (pending
//! runs and the kill state are always re-sent on connect).

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use bytes::Bytes;
use rollguard_shared::protocol::Order;
use tokio::sync::{mpsc, watch};

use crate::presence::{Arrival, PresenceSink};
use crate::store::{now_ms, PresenceUpdate};

/// Capacity of one agent's order channel.
const CHANNEL_CAPACITY: usize = 256;

/// One connected agent.
struct Connection {
    id: u64,
    tx: mpsc::Sender<Bytes>,
    labels: BTreeMap<String, String>,
}

#[derive(Default)]
pub struct Hub {
    agents: RwLock<HashMap<String, Connection>>,
    next_id: AtomicU64,
    /// Highest kill generation each agent has acknowledged.
    kill_acks: Mutex<HashMap<String, u64>>,
    ack_changed: watch::Sender<u64>,
    /// Where connects and disconnects are reported for the inventory
    /// (unset in tests that need no inventory).
    presence: std::sync::OnceLock<PresenceSink>,
}

/// Handed to the order stream of one connection; removes the agent from the
/// hub when the stream is dropped (client gone), unless a newer connection
/// of the same agent replaced it.
pub struct Registration {
    hub: Arc<Hub>,
    name: String,
    id: u64,
    pub rx: mpsc::Receiver<Bytes>,
}

impl Drop for Registration {
    fn drop(&mut self) {
        let mut agents = self.hub.agents.write().unwrap_or_else(|e| e.into_inner());
        if agents.get(&self.name).is_some_and(|c| c.id == self.id) {
            agents.remove(&self.name);
            self.hub.report_gone(&self.name);
            tracing::info!(agent = %self.name, "agent disconnected");
        }
    }
}

pub fn encode(order: &Order) -> Bytes {
    let mut line = serde_json::to_vec(order).unwrap_or_default();
    line.push(b'\n');
    Bytes::from(line)
}

impl Hub {
    pub fn new() -> Arc<Self> {
        Arc::new(Hub::default())
    }

    /// Report connects and disconnects to `sink` from now on (once).
    pub fn report_presence(&self, sink: PresenceSink) {
        if self.presence.set(sink).is_err() {
            tracing::error!("the hub already reports presence elsewhere");
        }
    }

    /// Report that `name`'s stream here closed. Called with the agents map
    /// locked, so it is ordered with the connect that replaced it.
    fn report_gone(&self, name: &str) {
        if let Some(sink) = self.presence.get() {
            let _ = sink.tx.send(PresenceUpdate::Gone {
                name: name.to_string(),
                at: now_ms(),
                replica: sink.replica,
            });
        }
    }

    /// Register a new connection of `name`, replacing (and so closing) any
    /// previous one.
    pub fn connect(self: &Arc<Self>, name: &str, labels: BTreeMap<String, String>) -> Registration {
        self.connect_with(name, labels, None)
    }

    /// [`Hub::connect`], reporting `arrival` to the inventory.
    pub fn connect_with(
        self: &Arc<Self>,
        name: &str,
        labels: BTreeMap<String, String>,
        arrival: Option<Arrival>,
    ) -> Registration {
        let (tx, rx) = mpsc::channel(CHANNEL_CAPACITY);
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mut agents = self.agents.write().unwrap_or_else(|e| e.into_inner());
        if agents
            .insert(name.to_string(), Connection { id, tx, labels })
            .is_some()
        {
            tracing::info!(agent = %name, "agent reconnected; previous stream closed");
        }
        if let (Some(sink), Some(a)) = (self.presence.get(), arrival) {
            let _ = sink.tx.send(PresenceUpdate::Connected {
                name: name.to_string(),
                at: now_ms(),
                replica: sink.replica,
                agent_version: a.agent_version,
                kernel: a.kernel,
                landlock_abi: a.landlock_abi,
                cert_serial: a.cert_serial,
                cert_not_after: a.cert_not_after,
            });
        }
        Registration {
            hub: self.clone(),
            name: name.to_string(),
            id,
            rx,
        }
    }

    pub fn is_connected(&self, name: &str) -> bool {
        self.agents
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .contains_key(name)
    }

    pub fn connected_count(&self) -> usize {
        self.agents.read().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Names and labels of connected agents.
    pub fn connected(&self) -> Vec<(String, BTreeMap<String, String>)> {
        let agents = self.agents.read().unwrap_or_else(|e| e.into_inner());
        agents
            .iter()
            .map(|(n, c)| (n.clone(), c.labels.clone()))
            .collect()
    }

    /// Offer an order line to one agent. Returns whether it was queued.
    pub fn send(&self, name: &str, line: Bytes) -> bool {
        let result = {
            let agents = self.agents.read().unwrap_or_else(|e| e.into_inner());
            match agents.get(name) {
                None => return false,
                Some(c) => c.tx.try_send(line),
            }
        };
        match result {
            Ok(()) => true,
            Err(_) => {
                self.drop_agent(name);
                false
            }
        }
    }

    /// Offer an order line to every connected agent; returns the names it
    /// was queued for.
    pub fn broadcast(&self, line: Bytes) -> Vec<String> {
        let mut sent = Vec::new();
        let mut slow = Vec::new();
        {
            let agents = self.agents.read().unwrap_or_else(|e| e.into_inner());
            for (name, c) in agents.iter() {
                match c.tx.try_send(line.clone()) {
                    Ok(()) => sent.push(name.clone()),
                    Err(_) => slow.push(name.clone()),
                }
            }
        }
        for name in slow {
            self.drop_agent(&name);
        }
        sent
    }

    fn drop_agent(&self, name: &str) {
        tracing::warn!(agent = %name, "agent's order channel is full or closed; disconnecting it");
        self.disconnect(name);
    }

    /// Close `name`'s order stream here, if it has one; returns whether it had.
    pub fn disconnect(&self, name: &str) -> bool {
        let mut agents = self.agents.write().unwrap_or_else(|e| e.into_inner());
        let had = agents.remove(name).is_some();
        if had {
            self.report_gone(name);
        }
        had
    }

    pub fn record_kill_ack(&self, name: &str, generation: u64) {
        let mut acks = self.kill_acks.lock().unwrap_or_else(|e| e.into_inner());
        let entry = acks.entry(name.to_string()).or_insert(0);
        *entry = (*entry).max(generation);
        drop(acks);
        self.ack_changed.send_modify(|n| *n += 1);
    }

    /// Of `names`, those that have not acknowledged `generation` yet.
    pub fn unacked(&self, names: &[String], generation: u64) -> Vec<String> {
        let acks = self.kill_acks.lock().unwrap_or_else(|e| e.into_inner());
        names
            .iter()
            .filter(|n| acks.get(*n).copied().unwrap_or(0) < generation)
            .cloned()
            .collect()
    }

    /// Wait until every agent in `names` acknowledged `generation`, or the
    /// timeout passes; returns those still pending.
    pub async fn wait_acks(
        &self,
        names: &[String],
        generation: u64,
        timeout: std::time::Duration,
    ) -> Vec<String> {
        let mut changed = self.ack_changed.subscribe();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let pending = self.unacked(names, generation);
            if pending.is_empty() {
                return pending;
            }
            tokio::select! {
                r = changed.changed() => if r.is_err() { return pending },
                _ = tokio::time::sleep_until(deadline) => return self.unacked(names, generation),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn reconnect_replaces_and_old_stream_drop_keeps_new() {
        let hub = Hub::new();
        let first = hub.connect("a", BTreeMap::new());
        let mut second = hub.connect("a", BTreeMap::new());
        drop(first);
        assert!(
            hub.is_connected("a"),
            "dropping the replaced stream must not unregister the new one"
        );
        assert!(hub.send("a", encode(&Order::Ping)));
        assert_eq!(second.rx.recv().await.unwrap(), encode(&Order::Ping));
        drop(second);
        assert!(!hub.is_connected("a"));
        assert!(!hub.send("a", encode(&Order::Ping)));
    }

    #[tokio::test]
    async fn acks_are_awaited() {
        let hub = Hub::new();
        let _a = hub.connect("a", BTreeMap::new());
        let _b = hub.connect("b", BTreeMap::new());
        let sent = hub.broadcast(encode(&Order::Ping));
        assert_eq!(sent.len(), 2);
        hub.record_kill_ack("a", 5);
        let h2 = hub.clone();
        let waiter = tokio::spawn(async move {
            h2.wait_acks(
                &["a".into(), "b".into()],
                5,
                std::time::Duration::from_secs(30),
            )
            .await
        });
        hub.record_kill_ack("b", 4);
        hub.record_kill_ack("b", 5);
        assert!(waiter.await.unwrap().is_empty());
        let pending = hub
            .wait_acks(
                &["a".into(), "c".into()],
                5,
                std::time::Duration::from_millis(10),
            )
            .await;
        assert_eq!(pending, vec!["c".to_string()]);
    }
}
