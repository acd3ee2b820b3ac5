//! What the benches share: interleaved pairs of runs, their samples and
//! the figures printed from them. (Each bench is its own crate and uses a
//! part of this, hence the `dead_code` allowance.)
#![allow(dead_code)]

use std::time::Duration;

/// Interleaved sandboxed/bare pairs; even pairs run the sandboxed side
/// first, odd pairs the bare side.
pub struct Pairs {
    pub sandboxed: Vec<Sample>,
    pub bare: Vec<Sample>,
}

impl Pairs {
    pub fn measure(
        runs: usize,
        mut sandboxed: impl FnMut(usize) -> Sample,
        mut bare: impl FnMut(usize) -> Sample,
    ) -> Pairs {
        let mut p = Pairs {
            sandboxed: vec![],
            bare: vec![],
        };
        for i in 1..=runs {
            if i % 2 == 0 {
                p.sandboxed.push(sandboxed(i));
                p.bare.push(bare(i));
            } else {
                p.bare.push(bare(i));
                p.sandboxed.push(sandboxed(i));
            }
        }
        p
    }

    pub fn wall(side: &[Sample]) -> Vec<Duration> {
        side.iter().map(|s| s.wall).collect()
    }

    pub fn cpu(side: &[Sample]) -> Vec<Duration> {
        side.iter().map(|s| s.cpu).collect()
    }

    /// Per-pair ratios sandboxed / bare of `measure`.
    pub fn ratios(&self, measure: fn(&Sample) -> Duration) -> Vec<f64> {
        self.sandboxed
            .iter()
            .zip(&self.bare)
            .map(|(s, b)| measure(s).as_secs_f64() / measure(b).as_secs_f64())
            .collect()
    }

    /// Per-pair wall-clock differences sandboxed - bare, in ms.
    pub fn differences_ms(&self) -> Vec<f64> {
        self.sandboxed
            .iter()
            .zip(&self.bare)
            .map(|(s, b)| (s.wall.as_secs_f64() - b.wall.as_secs_f64()) * 1000.0)
            .collect()
    }
}

/// Wall-clock time, and CPU time (user + system) of the whole process
/// tree (the agent, stage 2 and the bundle, or the bare process).
#[derive(Clone, Copy)]
pub struct Sample {
    pub wall: Duration,
    pub cpu: Duration,
}

/// CPU time of every waited-for descendant so far.
pub fn children_cpu() -> Duration {
    use nix::sys::resource::{getrusage, UsageWho};
    let usage = getrusage(UsageWho::RUSAGE_CHILDREN).unwrap();
    let d =
        |t: nix::sys::time::TimeVal| Duration::new(t.tv_sec() as u64, t.tv_usec() as u32 * 1000);
    d(usage.user_time()) + d(usage.system_time())
}

pub fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    s[s.len() / 2]
}

pub fn stat(v: &[f64], unit: &str) -> String {
    let min = v.iter().copied().fold(f64::INFINITY, f64::min);
    let max = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    format!("{:.3}{unit} [{:.3} .. {:.3}]", median(v), min, max)
}

pub fn ms(v: &[Duration]) -> String {
    let v: Vec<f64> = v.iter().map(|d| d.as_secs_f64() * 1000.0).collect();
    stat(&v, " ms")
}

/// Run `cmd` (its stdout discarded), which must succeed, and time it.
pub fn timed(cmd: &mut std::process::Command) -> Sample {
    let cpu = children_cpu();
    let t = std::time::Instant::now();
    let status = cmd.stdout(std::process::Stdio::null()).status().unwrap();
    assert!(status.success());
    Sample {
        wall: t.elapsed(),
        cpu: children_cpu() - cpu,
    }
}
