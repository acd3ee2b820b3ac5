//! The Prometheus Alertmanager webhook payload (version "4").
//!
//! This is someone else's format, which gains fields over time, so unknown
//! fields are ignored here (unlike our own formats); what we rely on is
//! typed and required: `version` must be "4", each alert has a `status` and
//! string `labels`.

use std::collections::BTreeMap;

use rollguard_shared::protocol::Matchers;
use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AlertmanagerPayload {
    pub version: String,
    #[serde(default)]
    pub status: String,
    #[serde(default)]
    pub receiver: String,
    #[serde(default)]
    pub group_key: String,
    #[serde(default)]
    pub common_labels: BTreeMap<String, String>,
    pub alerts: Vec<Alert>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AlertStatus {
    Firing,
    Resolved,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Alert {
    pub status: AlertStatus,
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
    #[serde(default)]
    pub starts_at: String,
    #[serde(default)]
    pub ends_at: String,
    #[serde(default)]
    pub fingerprint: String,
}

#[derive(Debug, thiserror::Error)]
pub enum AlertError {
    #[error("not an Alertmanager webhook payload: {0}")]
    Json(#[from] serde_json::Error),
    #[error("unsupported Alertmanager webhook version {0:?} (expected \"4\")")]
    Version(String),
}

impl AlertmanagerPayload {
    pub fn parse(body: &[u8]) -> Result<Self, AlertError> {
        let p: AlertmanagerPayload = serde_json::from_slice(body)?;
        if p.version != "4" {
            return Err(AlertError::Version(p.version));
        }
        Ok(p)
    }

    pub fn firing(&self) -> impl Iterator<Item = &Alert> {
        self.alerts
            .iter()
            .filter(|a| a.status == AlertStatus::Firing)
    }
}

impl Alert {
    /// True when the labels match every matcher of the selector (an empty
    /// selector matches nothing).
    pub fn matches(&self, selector: &Matchers) -> bool {
        selector.matches(&self.labels)
    }

    pub fn name(&self) -> &str {
        self.labels
            .get("alertname")
            .map(String::as_str)
            .unwrap_or("(unnamed)")
    }

    pub fn describe(&self) -> String {
        let labels: Vec<String> = self
            .labels
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        let summary = self
            .annotations
            .get("summary")
            .map(|s| format!(": {s}"))
            .unwrap_or_default();
        format!("{}{summary}", labels.join(","))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Recorded from Alertmanager 0.25's webhook (fields as it sends them).
    const FIRING: &str = r#"{
      "receiver": "rollguard",
      "status": "firing",
      "alerts": [
        {
          "status": "firing",
          "labels": {"alertname": "MailQueueStuck", "instance": "mail-01:9100", "service": "mail", "severity": "critical"},
          "annotations": {"summary": "mail queue is not draining"},
          "startsAt": "2026-11-23T17:40:00.000Z",
          "endsAt": "0001-01-01T00:00:00Z",
          "generatorURL": "http://prometheus:9090/graph?g0.expr=up",
          "fingerprint": "c0ffee1234567890"
        },
        {
          "status": "resolved",
          "labels": {"alertname": "DiskFull", "severity": "critical"},
          "annotations": {},
          "startsAt": "2026-11-23T17:00:00.000Z",
          "endsAt": "2026-11-23T17:30:00.000Z",
          "generatorURL": "",
          "fingerprint": "0123"
        }
      ],
      "groupLabels": {"alertname": "MailQueueStuck"},
      "commonLabels": {"severity": "critical"},
      "commonAnnotations": {},
      "externalURL": "http://alertmanager:9093",
      "version": "4",
      "groupKey": "{}:{alertname=\"MailQueueStuck\"}",
      "truncatedAlerts": 0
    }"#;

    fn sel(pairs: &[(&str, &str)]) -> Matchers {
        pairs
            .iter()
            .map(|(k, v)| rollguard_shared::alert_matcher::Matcher::equal(k, v))
            .collect()
    }

    #[test]
    fn recorded_payload_parses_and_only_firing_alerts_count() {
        let p = AlertmanagerPayload::parse(FIRING.as_bytes()).unwrap();
        let firing: Vec<_> = p.firing().collect();
        assert_eq!(firing.len(), 1);
        assert_eq!(firing[0].name(), "MailQueueStuck");
        assert!(firing[0].matches(&sel(&[("severity", "critical")])));
        assert!(firing[0].matches(&sel(&[("severity", "critical"), ("service", "mail")])));
        assert!(!firing[0].matches(&sel(&[("severity", "critical"), ("service", "web")])));
        assert!(
            !firing[0].matches(&sel(&[])),
            "an empty selector matches nothing"
        );
        assert!(firing[0].describe().contains("mail queue is not draining"));
    }

    #[test]
    fn bad_payloads_are_errors() {
        assert!(matches!(
            AlertmanagerPayload::parse(b"{"),
            Err(AlertError::Json(_))
        ));
        assert!(matches!(
            AlertmanagerPayload::parse(br#"{"version":"3","alerts":[]}"#),
            Err(AlertError::Version(_))
        ));
        assert!(AlertmanagerPayload::parse(
            br#"{"version":"4","alerts":[{"status":"exploded","labels":{}}]}"#
        )
        .is_err());
        assert!(AlertmanagerPayload::parse(
            br#"{"version":"4","alerts":[{"status":"firing","labels":{"a":1}}]}"#
        )
        .is_err());
    }
}
