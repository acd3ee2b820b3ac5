//! Cutting a report down to a size the controller accepts.
//!
//! The controller takes request bodies of at most
//! [`crate::protocol::MAX_JSON_BODY`]. Most of a report's lists are
//! bounded one by one (256 distinct denials, 256 captured requests, 1,000
//! preview changes with diffs of up to 16 KiB...), but not together, and a
//! hostile bundle controls much of what they hold (its paths are up to
//! 4 KiB each). A report too large to be accepted would be retried forever
//! and hold back every later report of the host, so a denial would never
//! halt the rollout. So the agent cuts the report before it records it:
//! first what is there for people to read (diffs, long strings, the
//! output tails), then the tails of the lists, never what decides the
//! rollout (status, exit code, refusal, the denial count, limits hit, one
//! denial and one denied request at least), and says in `reason` what it
//! cut.

use super::RunReport;

/// Strings a bundle controls (paths, program names) are cut to this many
/// bytes once the report is too large.
const LONG_STRING: usize = 512;
/// The output tails are cut to this many bytes, then dropped.
const SHORT_TAIL: usize = 1024;
/// Room kept for the note in `reason` saying what was cut.
const NOTE_ROOM: usize = 512;

impl RunReport {
    /// The report's size as the controller receives it (JSON).
    pub fn json_len(&self) -> usize {
        serde_json::to_vec(self).map_or(usize::MAX, |v| v.len())
    }

    /// Cut the report until its JSON takes at most `max` bytes (see the
    /// module docs), keeping [`RunReport::is_alert`] and the status as
    /// they were. Returns whether anything was cut; `reason` then says
    /// what.
    pub fn fit(&mut self, max: usize) -> bool {
        if self.json_len() <= max {
            return false;
        }
        let target = max.saturating_sub(NOTE_ROOM);
        let mut cut: Vec<&'static str> = Vec::new();
        // One serialization per cut, not two.
        let mut len = self.json_len();
        for (what, step) in STEPS {
            let mut any = false;
            while len > target && step(self) {
                any = true;
                len = self.json_len();
            }
            if any {
                cut.push(what);
            }
            if len <= target {
                break;
            }
        }
        // A preview cut is not a preview in full: the controller's gate
        // before a rollout must not take it for one.
        if let Some(p) = self.preview.as_mut() {
            p.complete = false;
        }
        let note = format!(
            "this report was cut to fit the controller's limit of {max} bytes: {}",
            cut.join(", ")
        );
        self.reason = Some(match self.reason.take() {
            Some(r) => format!("{}; {note}", cut_str(&r, LONG_STRING * 8)),
            None => note,
        });
        true
    }
}

/// One way of cutting, as often as it still cuts something: `false` when
/// it has nothing left to cut.
type Step = fn(&mut RunReport) -> bool;

/// In order: first what is there for people to read, last what is left of
/// the lists an alert rests on.
const STEPS: [(&str, Step); 11] = [
    ("the preview's diffs", drop_larger_diffs),
    ("long paths and names", cut_long_strings),
    ("the output tails", cut_tails),
    ("the reason", |r| match r.reason.as_mut() {
        Some(reason) if reason.len() > LONG_STRING * 8 + 3 => {
            *reason = cut_str(reason, LONG_STRING * 8);
            true
        }
        _ => false,
    }),
    ("the preview's list of changes", |r| {
        r.preview.as_mut().is_some_and(|p| {
            let n = halve(&mut p.changes, 0);
            p.changes_dropped += n as u64;
            n > 0
        })
    }),
    ("the stale services", |r| {
        halve(&mut r.stale_services, 0) > 0
    }),
    ("the expected denials", |r| {
        halve(&mut r.expected_denials, 0) > 0
    }),
    ("the packages and pending triggers", |r| {
        halve(&mut r.packages, 0) + halve(&mut r.triggers_pending, 0) + halve(&mut r.network, 0) > 0
    }),
    ("the captured service requests", cut_captured),
    ("the services' outcomes", |r| halve(&mut r.services, 1) > 0),
    (
        "the list of denials (denial_count stays exact)",
        cut_denials,
    ),
];

/// Drop the second half of `list`, keeping at least `keep`; how many went.
fn halve<T>(list: &mut Vec<T>, keep: usize) -> usize {
    let len = list.len();
    let new_len = (len / 2).max(keep).min(len);
    list.truncate(new_len);
    len - new_len
}

/// The larger half of the diffs (by length) go; each is one serialization
/// of the report, so halves, not one at a time.
fn drop_larger_diffs(r: &mut RunReport) -> bool {
    let Some(p) = r.preview.as_mut() else {
        return false;
    };
    let mut with_diff: Vec<(usize, usize)> = p
        .changes
        .iter()
        .enumerate()
        .filter_map(|(i, c)| c.diff.as_ref().map(|d| (d.len(), i)))
        .collect();
    if with_diff.is_empty() {
        return false;
    }
    with_diff.sort_unstable_by(|a, b| b.cmp(a));
    for &(_, i) in &with_diff[..with_diff.len().div_ceil(2)] {
        p.changes[i].diff = None;
    }
    true
}

/// `s` cut to at most `max` bytes on a character boundary, marked.
fn cut_str(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &s[..end])
}

fn cut_long_strings(r: &mut RunReport) -> bool {
    let mut any = false;
    let mut cut = |s: &mut String| {
        if s.len() > LONG_STRING + 3 {
            *s = cut_str(s, LONG_STRING);
            any = true;
        }
    };
    for d in r.denials.iter_mut().flatten() {
        d.path.iter_mut().chain(d.exe.iter_mut()).for_each(&mut cut);
    }
    for e in &mut r.expected_denials {
        e.denial
            .path
            .iter_mut()
            .chain(e.denial.exe.iter_mut())
            .for_each(&mut cut);
    }
    for s in &mut r.stale_services {
        cut(&mut s.exe);
        s.files.iter_mut().for_each(&mut cut);
    }
    for c in &mut r.services_captured {
        cut(&mut c.unit);
    }
    for p in &mut r.packages {
        p.error.iter_mut().for_each(&mut cut);
    }
    if let Some(p) = r.preview.as_mut() {
        for c in &mut p.changes {
            cut(&mut c.path);
        }
    }
    any
}

fn cut_tails(r: &mut RunReport) -> bool {
    let mut any = false;
    for tail in [&mut r.stdout_tail, &mut r.stderr_tail] {
        if tail.len() > SHORT_TAIL + 3 {
            // The end of the output is what a tail is for.
            let mut start = tail.len() - SHORT_TAIL;
            while !tail.is_char_boundary(start) {
                start += 1;
            }
            *tail = format!("...{}", &tail[start..]);
            any = true;
        } else if !tail.is_empty() {
            tail.clear();
            any = true;
        }
    }
    any
}

/// The requests that were not denied go first; of the denied ones, one at
/// least stays (it is what makes the report an alert without `denials`).
fn cut_captured(r: &mut RunReport) -> bool {
    let (mut denied, mut other): (Vec<_>, Vec<_>) = std::mem::take(&mut r.services_captured)
        .into_iter()
        .partition(|c| c.is_denied());
    let cut = if other.is_empty() {
        halve(&mut denied, 1)
    } else {
        halve(&mut other, 0)
    };
    denied.append(&mut other);
    r.services_captured = denied;
    cut > 0
}

/// The count stays as it was (at least the number listed before), and one
/// denial at least stays listed: a report with denials stays one.
fn cut_denials(r: &mut RunReport) -> bool {
    let Some(denials) = r.denials.as_mut() else {
        return false;
    };
    let listed = denials.len() as u64;
    let cut = halve(denials, 1);
    // Unknown stays unknown: only a known count is raised to what was
    // listed.
    if let Some(count) = r.denial_count.as_mut() {
        *count = (*count).max(listed);
    }
    cut > 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::{ChangeKind, Denial, PathChange, Preview, RunStatus};
    use crate::services::CapturedRequest;

    fn hostile() -> RunReport {
        let mut r = RunReport::new("web-01", RunStatus::Failed);
        let long = "/x".repeat(2000);
        r.denials = Some(
            (0..256)
                .map(|i| Denial {
                    access: "fs.write_file".into(),
                    path: Some(format!("{long}{i}")),
                    exe: Some(long.clone()),
                })
                .collect(),
        );
        r.denial_count = Some(300);
        r.services_captured = (0..256)
            .map(|i| CapturedRequest {
                unit: format!("u{i}.service"),
                verb: "restart".into(),
                via: "systemctl".into(),
                disposition: if i == 200 { "denied" } else { "ignored" }.into(),
            })
            .collect();
        r.stdout_tail = "é".repeat(3000);
        r.preview = Some(Preview {
            changes: (0..200)
                .map(|i| PathChange {
                    path: format!("/etc/f{i}"),
                    change: ChangeKind::Modified,
                    before: None,
                    after: None,
                    diff: Some("+line\n".repeat(2700)),
                    xattrs_changed: false,
                })
                .collect(),
            changes_dropped: 0,
            complete: true,
        });
        r
    }

    #[test]
    fn a_report_too_large_is_cut_to_fit_and_stays_an_alert() {
        let max = crate::protocol::MAX_JSON_BODY - 1024;
        let mut r = hostile();
        assert!(r.json_len() > 10 * max);
        assert!(r.is_alert());
        assert!(r.fit(max));
        assert!(r.json_len() <= max, "{}", r.json_len());
        assert!(r.is_alert());
        assert_eq!(r.status, RunStatus::Failed);
        assert_eq!(r.denial_count, Some(300));
        assert!(!r.denials.as_ref().unwrap().is_empty());
        assert!(r.services_captured.iter().any(|c| c.is_denied()));
        let p = r.preview.as_ref().unwrap();
        assert_eq!(p.changes.len() as u64 + p.changes_dropped, 200);
        assert!(!p.complete, "a cut preview is not complete");
        assert!(r.reason.as_deref().unwrap().contains("cut to fit"));
    }

    #[test]
    fn the_last_denied_request_stays_when_nothing_else_would_fit() {
        let mut r = hostile();
        r.denials = Some(vec![]);
        r.denial_count = Some(0);
        r.services_captured.retain(|c| c.is_denied());
        assert!(r.is_alert());
        assert!(r.fit(2048));
        assert!(r.is_alert(), "{r:?}");
        assert_eq!(r.services_captured.len(), 1);
    }

    #[test]
    fn a_report_that_fits_is_left_alone() {
        let mut r = RunReport::new("web-01", RunStatus::Succeeded);
        r.stdout_tail = "ok\n".into();
        let before = r.clone();
        assert!(!r.fit(crate::protocol::MAX_JSON_BODY));
        assert_eq!(r, before);
    }
}
