//! Per-run resource limits: what one run may consume of the host.
//!
//! The host policy sets them (`[resources]`, see `policy.rs`), a bundle may
//! ask for other values up to the host's ceiling (`[run.resources]` in its
//! manifest); the result is part of the [`super::SandboxSpec`]. Enforced by:
//!
//! - `pids`, `memory`, `cpu`: the run's cgroup ([`super::cgroup_limits`]);
//! - `tmp`: the `size=` of the private `/tmp` and `/var/tmp` tmpfs
//!   ([`super::namespaces`]); tmpfs pages are also charged to the run's
//!   memory cgroup;
//! - `output`: the agent's capture of stdout and stderr
//!   ([`super::output`]), which keeps the head and the tail.

use serde::{Deserialize, Serialize};

pub const KIB: u64 = 1024;
pub const MIB: u64 = 1024 * KIB;
pub const GIB: u64 = 1024 * MIB;

/// Fewer than this and `sh -c 'a | b'` cannot run.
pub const MIN_PIDS: u32 = 8;
/// Less than this and a shell cannot start under the memory limit.
pub const MIN_MEMORY: u64 = 16 * MIB;
/// A hundredth of a core.
pub const MIN_CPU_MILLICORES: u32 = 10;
pub const MIN_TMP: u64 = MIB;
pub const MIN_OUTPUT: u64 = 4 * KIB;

/// One run's limits, all enforced (there is no "unlimited").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunLimits {
    /// Tasks (processes and threads) alive at once: cgroup `pids.max`.
    pub pids: u32,
    /// Memory in bytes, page cache and tmpfs included: `memory.max`
    /// (swap: `memory.swap.max` 0).
    pub memory_bytes: u64,
    /// CPU bandwidth in thousandths of a core (1000 = one full core):
    /// `cpu.max`. Throttles; never fails a run by itself.
    pub cpu_millicores: u32,
    /// Size of each of the private `/tmp` and `/var/tmp` (tmpfs `size=`).
    pub tmp_bytes: u64,
    /// Bytes of each of stdout and stderr kept (head and tail halves).
    pub output_bytes: u64,
}

impl Default for RunLimits {
    fn default() -> Self {
        RunLimits {
            pids: 512,
            memory_bytes: GIB,
            cpu_millicores: 1000,
            tmp_bytes: 256 * MIB,
            output_bytes: MIB,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LimitsError {
    #[error("{name} {value} is below the minimum of {min}")]
    TooLow {
        name: &'static str,
        value: u64,
        min: u64,
    },
    #[error("{name} {asked} asked for by the bundle exceeds the host's ceiling of {ceiling}")]
    AboveCeiling {
        name: &'static str,
        asked: u64,
        ceiling: u64,
    },
}

impl RunLimits {
    /// Each limit by name with its value and floor, for checks and errors.
    fn fields(&self) -> [(&'static str, u64, u64); 5] {
        [
            ("pids", u64::from(self.pids), u64::from(MIN_PIDS)),
            ("memory", self.memory_bytes, MIN_MEMORY),
            (
                "cpu (millicores)",
                u64::from(self.cpu_millicores),
                u64::from(MIN_CPU_MILLICORES),
            ),
            ("tmp", self.tmp_bytes, MIN_TMP),
            ("output", self.output_bytes, MIN_OUTPUT),
        ]
    }

    /// Every limit at or above its floor.
    pub fn validate(&self) -> Result<(), LimitsError> {
        for (name, value, min) in self.fields() {
            if value < min {
                return Err(LimitsError::TooLow { name, value, min });
            }
        }
        Ok(())
    }

    /// Every limit at or below `ceiling`'s (the host outranks the bundle).
    pub fn within(&self, ceiling: &RunLimits) -> Result<(), LimitsError> {
        for ((name, asked, _), (_, max, _)) in self.fields().into_iter().zip(ceiling.fields()) {
            if asked > max {
                return Err(LimitsError::AboveCeiling {
                    name,
                    asked,
                    ceiling: max,
                });
            }
        }
        Ok(())
    }
}

/// A limit the run ran into, as named in the report's `limits_hit`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LimitHit {
    /// A fork or clone failed at `pids.max`.
    Pids,
    /// The OOM killer killed a process of the run at `memory.max`.
    Memory,
    /// `/tmp` or `/var/tmp` was full when the main process exited.
    Tmp,
}

impl LimitHit {
    pub fn as_str(self) -> &'static str {
        match self {
            LimitHit::Pids => "pids",
            LimitHit::Memory => "memory",
            LimitHit::Tmp => "tmp",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_ceilings_hold() {
        let d = RunLimits::default();
        d.validate().unwrap();
        d.within(&d).unwrap();
        let more = RunLimits { pids: 4096, ..d };
        assert!(matches!(
            more.within(&d),
            Err(LimitsError::AboveCeiling { name: "pids", .. })
        ));
        let tiny = RunLimits {
            memory_bytes: 1,
            ..d
        };
        assert!(matches!(
            tiny.validate(),
            Err(LimitsError::TooLow { name: "memory", .. })
        ));
    }
}
