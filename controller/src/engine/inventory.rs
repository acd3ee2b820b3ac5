//! The inventory: which agents are online, on which replica, what each said
//! of itself when it connected (`presence`), and removing one.

use rollguard_shared::protocol::{AgentInfo, AgentRemoved};

use super::{ClusterEvent, Engine, EngineError, Result};
use crate::store::{now_ms, rfc3339};

impl Engine {
    /// Agents whose order stream is open on this replica or on a live peer.
    /// This replica's own are its hub's (never behind); a peer's are what
    /// it recorded (`presence`), trusted only while the peer is alive.
    pub async fn online_agents(&self) -> std::collections::HashSet<String> {
        let mut online: std::collections::HashSet<String> =
            self.hub.connected().into_iter().map(|(n, _)| n).collect();
        let peers = self.cluster.live_peer_hosts().await;
        if !peers.is_empty() {
            match self.store.list_agents().await {
                Ok(agents) => online.extend(
                    agents
                        .into_iter()
                        .filter(|a| {
                            a.inventory
                                .connected_to
                                .is_some_and(|r| peers.contains_key(&r))
                        })
                        .map(|a| a.name),
                ),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read which agents other replicas hold")
                }
            }
        }
        online
    }

    /// The inventory: every registered agent, whether and where it is
    /// connected, and what it said of itself when it last was.
    pub async fn inventory(&self) -> Result<Vec<AgentInfo>> {
        let agents = self.store.list_agents().await?;
        let peers = self.cluster.live_peer_hosts().await;
        let me = self.cluster.name().to_string();
        let now = rfc3339(now_ms());
        Ok(agents
            .into_iter()
            .map(|a| {
                let inv = a.inventory;
                let controller = if self.hub.is_connected(&a.name) {
                    Some(me.clone())
                } else {
                    inv.connected_to
                        .filter(|r| *r != self.cluster.id())
                        .and_then(|r| peers.get(&r).cloned())
                };
                let connected = controller.is_some();
                AgentInfo {
                    name: a.name,
                    labels: a.labels,
                    connected,
                    controller,
                    first_seen: inv.first_seen.map(rfc3339),
                    last_seen: if connected {
                        Some(now.clone())
                    } else {
                        inv.last_seen.map(rfc3339)
                    },
                    agent_version: inv.agent_version,
                    kernel: inv.kernel.filter(|k| !k.is_empty()),
                    landlock_abi: inv.landlock_abi,
                    cert_expires: inv.cert_not_after.map(rfc3339),
                }
            })
            .collect())
    }

    /// Deregister `name` and revoke the certificate it last connected with
    /// (recorded in the database, so every replica refuses it within a
    /// second). The caller closes its stream here. Its run history stays.
    /// A name that never connected but was issued certificates here (an
    /// enrollment whose host never came up) has those revoked all the same.
    pub async fn remove_agent(&self, name: &str, actor: &str) -> Result<AgentRemoved> {
        let agents = self.store.list_agents().await?;
        let agent = agents.into_iter().find(|a| a.name == name);
        // The certificate it last connected with, and every one a serving
        // controller issued to it (enrollment, renewal).
        let mut serials: Vec<String> = agent
            .as_ref()
            .and_then(|a| a.inventory.cert_serial.clone())
            .into_iter()
            .collect();
        for s in self.store.issued_serials(name).await? {
            if !serials.contains(&s) {
                serials.push(s);
            }
        }
        if agent.is_none() && serials.is_empty() {
            return Err(EngineError::NotFound(format!(
                "no registered agent {name:?}, and no certificate issued to it here"
            )));
        }
        // Revoked first: a removed agent whose certificate still worked
        // would simply register again at its next connect.
        if !serials.is_empty() {
            self.store.add_revocations(name, &serials).await?;
        }
        // Again after revoking: a renewal that recorded its certificate
        // meanwhile is caught here (or, if it records later, sees its
        // caller revoked and revokes what it issued: `Enroller::renew`).
        let late: Vec<String> = self
            .store
            .issued_serials(name)
            .await?
            .into_iter()
            .filter(|s| !serials.contains(s))
            .collect();
        if !late.is_empty() {
            self.store.add_revocations(name, &late).await?;
            serials.extend(late);
        }
        self.store
            .append_operator_log(
                actor,
                "agent.remove",
                &serde_json::json!({ "agent": name, "revoked_serials": serials }),
            )
            .await?;
        self.store.remove_agent(name).await?;
        if let Some(cache) = self.known_agents.lock().await.as_mut() {
            cache.remove(name);
        }
        self.cluster
            .publish(ClusterEvent::Agent {
                name: name.to_string(),
            })
            .await;
        let was_connected = self.hub.disconnect(name);
        tracing::warn!(agent = %name, by = %actor, revoked = ?serials, "agent removed");
        Ok(AgentRemoved {
            name: name.to_string(),
            revoked_serials: serials,
            was_connected,
        })
    }
}
