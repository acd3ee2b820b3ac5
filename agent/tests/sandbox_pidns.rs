//! The run's own PID namespace: host processes cannot be seen, signalled
//! or re-limited; `/proc` shows only the run; orphans are reaped inside.

mod sandbox_support;

use std::fs;
use std::process::{Child, Command};

use sandbox_support::{is_alive, Tree};

/// What a bundle could change about a process, read from the host.
#[derive(Debug, PartialEq, Eq)]
struct Observable {
    limits: String,
    nice: String,
    affinity: String,
}

fn observe(pid: u32) -> Observable {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Field 19 (nice), counted after the parenthesized command name.
    let nice = stat
        .rsplit_once(") ")
        .unwrap()
        .1
        .split(' ')
        .nth(16)
        .unwrap()
        .to_string();
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let affinity = status
        .lines()
        .find(|l| l.starts_with("Cpus_allowed_list:"))
        .unwrap()
        .to_string();
    Observable {
        limits: fs::read_to_string(format!("/proc/{pid}/limits")).unwrap(),
        nice,
        affinity,
    }
}

struct Sleeper(Child);

impl Drop for Sleeper {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn host_processes_cannot_be_signalled_relimited_reniced_or_pinned() {
    let t = Tree::new();
    let sleeper = Sleeper(Command::new("sleep").arg("3001").spawn().unwrap());
    let host = sleeper.0.id();
    // The agent itself: here, the test process that launched the run.
    let agent = std::process::id();
    let before = [observe(host), observe(agent)];

    let mut script = String::new();
    for (name, pid) in [("host", host), ("agent", agent)] {
        script.push_str(&format!(
            "prlimit --pid {pid} --nofile=3:3 --cpu=1:1 --fsize=0:0; echo {name}_prlimit=$?\n\
             renice -n 19 -p {pid}; echo {name}_renice=$?\n\
             taskset -p 1 {pid}; echo {name}_taskset=$?\n\
             kill -STOP {pid}; echo {name}_stop=$?\n\
             kill -9 {pid}; echo {name}_kill=$?\n\
             test -e /proc/{pid}/status; echo {name}_visible=$?\n"
        ));
    }
    // Nor the run's own init (stage 2), which writes the run's status.
    script.push_str(
        "prlimit --pid 1 --fsize=0:0; echo init_prlimit=$?\n\
         ulimit -n 64; echo own_ulimit=$?\n\
         echo init_fsize=$(grep 'Max file size' /proc/1/limits | awk '{print $4}')\n",
    );
    script.push_str("echo pids=$(ls /proc | grep -E '^[0-9]+$' | sort -n | tr '\\n' ' ')\n");
    let run = t.sh(&script);
    assert_eq!(run.exit_code(), 0, "{}", run.stderr);

    for name in ["host", "agent"] {
        for op in ["prlimit", "renice", "taskset", "stop", "kill"] {
            assert_ne!(
                run.value(&format!("{name}_{op}")),
                "0",
                "{op} on the {name} process succeeded:\n{}",
                run.stderr
            );
        }
        // Not even visible in the run's /proc.
        assert_eq!(run.value(&format!("{name}_visible")), "1");
    }
    assert_ne!(run.value("init_prlimit"), "0");
    assert_eq!(run.value("init_fsize"), "unlimited");
    // Limiting itself stays allowed.
    assert_eq!(run.value("own_ulimit"), "0");
    assert!(is_alive(host), "the host process was killed");
    assert_eq!([observe(host), observe(agent)], before);

    // Only the run's processes: init (1), the shell (2) and the pipeline's.
    let pids: Vec<u32> = run
        .value("pids")
        .split_whitespace()
        .map(|p| p.parse().unwrap())
        .collect();
    assert_eq!(&pids[..2], &[1, 2], "{pids:?}");
    // The run started a few dozen processes at most, numbered from 1 in
    // its own namespace; the host's are not listed at all.
    assert!(
        pids.iter().all(|p| *p < 64),
        "more than the run in /proc: {pids:?}"
    );
    let host_count = fs::read_dir("/proc")
        .unwrap()
        .filter(|e| {
            e.as_ref().is_ok_and(|e| {
                e.file_name()
                    .to_str()
                    .is_some_and(|n| n.parse::<u32>().is_ok())
            })
        })
        .count();
    assert!(pids.len() < host_count, "{pids:?}");
}

#[test]
fn orphans_are_reaped_inside_the_run() {
    let t = Tree::new();
    // An orphan re-parented to the run's init exits while the main process
    // keeps running; without a reaper it would stay a zombie (state Z).
    let run = t.sh("sh -c 'sh -c \"echo \\$\\$ > /tmp/orphan; exec true\" &'
         while [ ! -s /tmp/orphan ]; do sleep 0.01; done
         p=$(cat /tmp/orphan); state=none; i=0
         while [ -e /proc/$p ] && [ $i -lt 2000 ]; do
           state=$(cut -d' ' -f3 /proc/$p/stat 2>/dev/null); i=$((i+1)); sleep 0.01
         done
         [ -e /proc/$p ] && echo orphan=still-there-$state || echo orphan=reaped");
    assert_eq!(run.exit_code(), 0, "{}", run.stderr);
    assert_eq!(run.value("orphan"), "reaped");
}

#[test]
fn a_signal_from_the_main_process_is_reported_as_its_own() {
    // Stage 2 is the run's init: the main process's death by a signal must
    // still read as that signal, not as init's exit code.
    let t = Tree::new();
    let run = t.sh("kill -KILL $$");
    assert_eq!(
        run.outcome.termination,
        rollguard_agent::sandbox::Termination::Signaled { signal: 9 }
    );
    // And the bundle cannot kill its init (PID 1 ignores signals from
    // inside its namespace): the run ends normally.
    let run = t.sh("kill -KILL 1; kill -TERM 1; echo init_alive=yes");
    assert_eq!(run.exit_code(), 0);
    assert_eq!(run.value("init_alive"), "yes");
}
