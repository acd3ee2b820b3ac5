//! `/metrics` in the Prometheus text format (prometheus-client).

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use rollguard_shared::protocol::RolloutState;
use rollguard_shared::report::RunReport;

type Labels = Vec<(String, String)>;

pub struct Metrics {
    registry: Registry,
    pub connected_agents: Gauge,
    /// 1 while this replica drives rollouts (always, alone on SQLite).
    pub leader: Gauge,
    pub rollouts: Family<Labels, Gauge>,
    pub runs: Family<Labels, Counter>,
    pub denials: Counter,
    pub kill_orders: Counter,
    /// Questions to Alertmanager's API that got no usable answer.
    pub alert_gate_errors: Counter,
    /// Seconds until each agent's certificate expires (negative: expired).
    pub certificate_expiry: Family<Labels, Gauge>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("rollguard");
        let connected_agents = Gauge::default();
        let leader = Gauge::default();
        let rollouts = Family::<Labels, Gauge>::default();
        let runs = Family::<Labels, Counter>::default();
        let denials = Counter::default();
        let kill_orders = Counter::default();
        let alert_gate_errors = Counter::default();
        let certificate_expiry = Family::<Labels, Gauge>::default();
        registry.register(
            "connected_agents",
            "Agents with an open order stream",
            connected_agents.clone(),
        );
        registry.register(
            "leader",
            "Whether this controller replica drives rollouts (the leader: 1) or not (0)",
            leader.clone(),
        );
        registry.register("rollouts", "Rollouts by state", rollouts.clone());
        registry.register("runs", "Run reports received, by result", runs.clone());
        registry.register(
            "denials",
            "Kernel-denied accesses reported by agents",
            denials.clone(),
        );
        registry.register("kill_orders", "Kill orders issued", kill_orders.clone());
        registry.register(
            "alert_gate_errors",
            "Questions to Alertmanager's API for active alerts that got no usable answer",
            alert_gate_errors.clone(),
        );
        registry.register(
            "certificate_expiry_seconds",
            "Seconds until the certificate each agent last connected with expires (negative once it has)",
            certificate_expiry.clone(),
        );
        Metrics {
            registry,
            connected_agents,
            leader,
            rollouts,
            runs,
            denials,
            kill_orders,
            alert_gate_errors,
            certificate_expiry,
        }
    }

    pub fn observe_report(&self, r: &RunReport) {
        let status = serde_json::to_value(r.status)
            .ok()
            .and_then(|v| v.as_str().map(String::from))
            .unwrap_or_default();
        self.runs
            .get_or_create(&vec![("result".to_string(), status)])
            .inc();
        let n = r
            .denial_count
            .unwrap_or(0)
            .max(r.denials.as_ref().map_or(0, |d| d.len() as u64));
        self.denials.inc_by(n);
    }

    /// Render, after refreshing the gauges computed from state.
    pub fn render(
        &self,
        connected: usize,
        leader: bool,
        rollouts_by_state: &[(RolloutState, usize)],
        certificate_expiry: &[(String, i64)],
    ) -> String {
        // Rebuilt each time, so a removed agent's series goes away.
        self.certificate_expiry.clear();
        for (agent, secs) in certificate_expiry {
            self.certificate_expiry
                .get_or_create(&vec![("agent".to_string(), agent.clone())])
                .set(*secs);
        }
        self.connected_agents.set(connected as i64);
        self.leader.set(i64::from(leader));
        for (state, n) in rollouts_by_state {
            self.rollouts
                .get_or_create(&vec![("state".to_string(), state.as_str().to_string())])
                .set(*n as i64);
        }
        let mut out = String::new();
        if encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_prometheus_text() {
        let m = Metrics::new();
        m.kill_orders.inc();
        let text = m.render(
            3,
            true,
            &[(RolloutState::Running, 1), (RolloutState::Halted, 2)],
            &[("web-1".to_string(), 86_400)],
        );
        assert!(text.contains("rollguard_connected_agents 3"), "{text}");
        assert!(text.contains("rollguard_leader 1"), "{text}");
        assert!(
            text.contains("rollguard_rollouts{state=\"halted\"} 2"),
            "{text}"
        );
        assert!(text.contains("rollguard_kill_orders_total 1"), "{text}");
        assert!(
            text.contains("rollguard_certificate_expiry_seconds{agent=\"web-1\"} 86400"),
            "{text}"
        );
        assert!(text.ends_with("# EOF\n"));
    }
}
