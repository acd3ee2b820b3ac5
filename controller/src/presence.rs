//! Agents' comings and goings, written to the inventory (`rollguard
//! agents`) in batches.
//!
//! The hub reports each order stream that opens or closes on one channel
//! ([`PresenceSink`]), in the order it happened on this replica, and
//! [`writer`] stores what accumulated in one transaction: a reconnect storm
//! of 10,000 agents is a few dozen writes, not 10,000. Nothing waits for
//! these writes; they are what other replicas and later plans read, while
//! this replica's own answer to "is it connected" is its hub, which is
//! never behind.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;

use crate::store::{PresenceUpdate, Store};

/// Updates stored in one transaction, at most.
const BATCH: usize = 1000;
/// Tries to store one batch before it is given up (logged): presence is a
/// record of the past, and the next connect or disconnect rewrites it.
const TRIES: u32 = 5;

/// Where the hub reports presence, with the replica it happens on.
#[derive(Clone)]
pub struct PresenceSink {
    pub replica: u64,
    pub tx: mpsc::UnboundedSender<PresenceUpdate>,
}

/// What an agent says of itself when its order stream opens.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Arrival {
    pub agent_version: String,
    pub kernel: String,
    pub landlock_abi: Option<u32>,
    pub cert_serial: String,
    pub cert_not_after: Option<crate::store::Millis>,
}

/// Store presence updates as they come, batched, until every sender is gone.
pub async fn writer(store: Arc<dyn Store>, mut rx: mpsc::UnboundedReceiver<PresenceUpdate>) {
    let mut batch = Vec::with_capacity(BATCH);
    while rx.recv_many(&mut batch, BATCH).await > 0 {
        let mut tries = 0;
        loop {
            tries += 1;
            match store.record_presence(&batch).await {
                Ok(()) => break,
                Err(e) if tries < TRIES => {
                    tracing::warn!(error = %e, updates = batch.len(), "cannot record agents' presence; retrying");
                    tokio::time::sleep(Duration::from_millis(200 * u64::from(tries))).await;
                }
                Err(e) => {
                    tracing::error!(error = %e, updates = batch.len(), "cannot record agents' presence; the inventory is behind until they reconnect");
                    break;
                }
            }
        }
        batch.clear();
    }
}

/// This machine's host name, part of how the inventory names a controller
/// (empty if unreadable).
pub fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}
