//! Per-run resource limits: pids, memory, the private /tmp's size and the
//! output capture, each hit by a real bundle, contained to the run, and
//! reported.

mod sandbox_support;

use std::fs;

use rollguard_agent::sandbox::limits::{LimitHit, KIB, MIB};
use rollguard_agent::sandbox::Termination;
use sandbox_support::{processes_with_cmdline, Tree};

#[test]
fn a_fork_bomb_stops_at_pids_max() {
    let t = Tree::new();
    let mut spec =
        t.spec("i=0; while [ $i -lt 200 ]; do sleep 3101 & i=$((i+1)); done; echo launched=$i");
    spec.limits.pids = 32;
    let run = t.run(&spec);
    assert!(
        run.outcome.limits_hit.contains(&LimitHit::Pids),
        "{:?}\n{}",
        run.outcome,
        run.stderr
    );
    // Never more than the limit at once; all of them gone afterwards.
    assert!(
        run.outcome.leftover_processes < 32,
        "{}",
        run.outcome.leftover_processes
    );
    assert!(processes_with_cmdline(&["sleep", "3101"]).is_empty());
}

#[test]
fn writing_beyond_the_tmp_size_gets_enospc_and_is_reported() {
    let t = Tree::new();
    let mut spec = t.spec(
        "err=$(dd if=/dev/zero of=/tmp/big bs=1M count=64 2>&1); echo dd=$?; \
         case \"$err\" in *'No space left'*) echo enospc=1;; *) echo enospc=0;; esac; \
         echo size=$(df -k /tmp | awk 'NR==2 {print $2}')",
    );
    spec.limits.tmp_bytes = 4 * MIB;
    let run = t.run(&spec);
    assert_eq!(run.exit_code(), 0, "{}", run.stderr);
    assert_ne!(run.value("dd"), "0");
    assert_eq!(run.value("enospc"), "1");
    assert_eq!(run.value("size"), "4096");
    assert_eq!(run.outcome.limits_hit, vec![LimitHit::Tmp]);

    // Under the limit: nothing reported.
    let mut spec = t.spec("dd if=/dev/zero of=/tmp/small bs=1M count=1 2>/dev/null");
    spec.limits.tmp_bytes = 4 * MIB;
    let run = t.run(&spec);
    assert_eq!(run.exit_code(), 0);
    assert!(run.outcome.limits_hit.is_empty(), "{:?}", run.outcome);
}

#[test]
fn a_memory_hog_is_oom_killed_inside_its_run_only() {
    let t = Tree::new();
    let mut spec =
        t.spec("/usr/bin/python3 -c 'a = b\"x\" * (512 << 20); print(len(a))'; echo python=$?");
    spec.limits.memory_bytes = 64 * MIB;
    let run = t.run(&spec);
    // The shell (and the test process, the "agent") survived; python was
    // killed by SIGKILL (137).
    assert_eq!(run.exit_code(), 0, "{}", run.stderr);
    assert_eq!(run.value("python"), "137");
    assert!(
        run.outcome.limits_hit.contains(&LimitHit::Memory),
        "{:?}",
        run.outcome
    );
}

#[test]
fn an_output_flood_keeps_head_and_tail_and_counts_the_rest() {
    let t = Tree::new();
    let mut spec = t.spec("echo FIRST-LINE; yes flood | head -c 1000000; echo; echo LAST-LINE");
    spec.limits.output_bytes = 8 * KIB;
    let run = t.run(&spec);
    assert_eq!(run.exit_code(), 0);
    let kept = fs::metadata(&run.outcome.stdout).unwrap().len();
    assert!(kept < 8 * KIB + 100, "kept {kept} bytes");
    assert!(
        run.stdout.starts_with("FIRST-LINE\nflood\n"),
        "{}",
        &run.stdout[..64]
    );
    // `head -c` cut the last "flood" short; the echo ended the line.
    assert!(run.stdout.ends_with("flood\nfloo\nLAST-LINE\n"));
    let dropped = run.outcome.stdout_dropped.unwrap();
    // Everything written (11 + 1000000 + 1 + 10 bytes) minus what was kept.
    assert_eq!(dropped, 1_000_022 - 8 * KIB);
    assert!(run.stdout.contains(&format!(
        "[rollguard: {dropped} bytes of output dropped here]"
    )));
    assert_eq!(run.outcome.stderr_dropped, Some(0));
    // Output is not a limit that fails the run.
    assert!(run.outcome.limits_hit.is_empty());
    assert!(matches!(
        run.outcome.termination,
        Termination::Exited { code: 0 }
    ));
}
