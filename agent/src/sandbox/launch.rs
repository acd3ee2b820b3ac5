//! The agent's side of a confined run: create the run cgroup, start stage 2,
//! release it, enforce the timeout, kill on demand, and account for every
//! process the bundle left behind.
//!
//! Stage 2 starts *held* ([`Launcher::spawn_held`]): it confines itself
//! (namespaces, mounts, capabilities, Landlock, seccomp: about 2 ms of CPU)
//! and then waits for the agent's release byte on a pipe (handed over as
//! its stdin, moved aside at its start) before it executes the bundle. The agent meanwhile unpacks the payload and
//! makes the run's start durable; only then does it release the run
//! ([`HeldChild::release`]). So the setup overlaps the agent's own work and
//! its disk flush instead of following them, while the rule "durable before
//! acted upon" still holds: nothing of the bundle executes before the
//! release. If the agent withdraws the run ([`HeldChild::withdraw`]), or
//! dies, stage 2 reads end-of-file and exits without executing anything.

use rollguard_shared::PathIoError;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use serde::Serialize;

use super::cgroup::{CgroupError, RunCgroup};
use super::cgroup_filters::{self, CgroupFilterError, CgroupFilters, FilterDenials};
use super::cgroup_limits::{self, Enforcement};
use super::clone_into_cgroup;
use super::limits::LimitHit;
use super::output::{self, Capture};
use super::spec::{SandboxSpec, SpecError, Stage2Plan};
use super::status::{
    self, Confinement, Event, Step, AUDIT_SESSION_FILE, RELEASE_BYTE, REQUESTS_DIR_BYTE,
};
use super::STAGE2_PROGRAM;

pub const PLAN_FILE: &str = "sandbox-plan.json";
pub const STDOUT_FILE: &str = "stdout";
pub const STDERR_FILE: &str = "stderr";

/// How long processes get to die after `cgroup.kill` before we give up
/// (they can only outlive it in uninterruptible sleep).
const KILL_GRACE: Duration = Duration::from_secs(10);
/// How long the release waits for stage 2's audit session id. Stage 2
/// sends it within a millisecond or so of its start; this bounds a stage 2
/// stuck before (the run then goes ahead with its denials unknown).
const SESSION_WAIT: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error("invalid sandbox spec: {0}")]
    Spec(#[from] SpecError),
    #[error(transparent)]
    Cgroup(#[from] CgroupError),
    #[error(transparent)]
    Filters(#[from] CgroupFilterError),
    #[error(transparent)]
    Io(#[from] PathIoError),
    #[error("starting {program}: {source}")]
    Spawn { program: PathBuf, source: io::Error },
    #[error("the sandbox's stage-2 program {STAGE2_PROGRAM} is not installed beside {agent} (looked for {looked}); no bundle can be confined")]
    Stage2Missing { agent: PathBuf, looked: String },
    #[error("refusing the stage-2 program {path}: {why}")]
    Stage2Unsafe { path: PathBuf, why: String },
    /// The stage-2 program, or a directory above it, could be replaced by
    /// someone other than root.
    #[error(transparent)]
    Stage2Untrusted(#[from] crate::trust_path::TrustPathError),
    #[error("lost track of the run's main process: {0}")]
    Wait(String),
    #[error("processes of run {run_id} did not die within {KILL_GRACE:?} of cgroup.kill")]
    Unkillable { run_id: String },
}

/// Where the stage-2 program is looked for, relative to the directory of
/// the `rollguard-agent` binary: beside it (a build tree: `target/release/`),
/// then the packages' private directories (`/usr/sbin/../lib/rollguard/` for
/// the .deb, `/usr/sbin/../libexec/rollguard/` for the .rpm).
const STAGE2_DIRS: [&str; 3] = [".", "../lib/rollguard", "../libexec/rollguard"];

/// Every path the stage-2 program is looked for at, in order, for the
/// `rollguard-agent` binary `agent_exe` ([`STAGE2_DIRS`], `..` resolved
/// lexically). The host policy protects all of them, existing or not.
pub fn stage2_candidates(agent_exe: &Path) -> Vec<PathBuf> {
    let dir = agent_exe.parent().unwrap_or(Path::new("/"));
    STAGE2_DIRS
        .iter()
        .map(|d| match d.strip_prefix("../") {
            Some(sub) => dir.parent().unwrap_or(Path::new("/")).join(sub),
            None => dir.to_path_buf(),
        })
        .map(|d| d.join(STAGE2_PROGRAM))
        .collect()
}

/// Starts confined runs: executes the stage-2 program ([`STAGE2_PROGRAM`])
/// in each run's cgroup.
///
/// The program is opened once, checked through that descriptor, and every
/// run executes the descriptor (`execveat(fd, "", AT_EMPTY_PATH)`), never
/// the path: whatever happens to the path after the check (a rename over
/// it, a replaced directory) cannot change what runs. The daemon keeps one
/// `Launcher` for its lifetime, so the program it runs is the one it
/// checked at start (and the one built with it); each run checks the open
/// file again ([`Launcher::spawn_held`]), since its owner and mode can
/// still change.
#[derive(Debug, Clone)]
pub struct Launcher {
    stage2_exe: PathBuf,
    /// The checked program, opened `O_RDONLY | O_CLOEXEC` (close-on-exec is
    /// fine for `execveat` of an ELF binary, and keeps it out of bundles).
    stage2: Arc<File>,
}

impl Launcher {
    /// Open and check the stage-2 program at `stage2_exe` (tests pass
    /// `env!("CARGO_BIN_EXE_rollguard-sandbox-exec")`). It runs as root
    /// before any confinement, so it is refused unless it and every
    /// directory above it belong to root and are not writable by group or
    /// others ([`crate::trust_path`]).
    pub fn new(stage2_exe: impl Into<PathBuf>) -> Result<Self, SandboxError> {
        let stage2_exe = stage2_exe.into();
        let path = std::path::absolute(&stage2_exe).unwrap_or(stage2_exe);
        let file = File::open(&path).map_err(PathIoError::at("opening", &path))?;
        let meta = file
            .metadata()
            .map_err(PathIoError::at("inspecting", &path))?;
        if !meta.is_file() || meta.mode() & 0o111 == 0 {
            return Err(SandboxError::Stage2Unsafe {
                path,
                why: "not an executable regular file".into(),
            });
        }
        check_replaceable_only_by_us(&path, &meta)?;
        // Every directory above it too (whoever can write one can rename
        // another file over it before the next start), checked by path
        // after the open: the descriptor is what runs, so what matters is
        // that no one but root could have put it there.
        crate::trust_path::check(&path, "stage-2 program")?;
        Ok(Launcher {
            stage2_exe: path,
            stage2: Arc::new(file),
        })
    }

    /// The stage-2 program installed with the `rollguard-agent` binary
    /// `agent_exe` (see [`STAGE2_DIRS`]). It runs as root before any
    /// confinement, so one that another user could replace is refused, as
    /// is a missing one: without it nothing can be confined.
    pub fn beside(agent_exe: &Path) -> Result<Self, SandboxError> {
        let candidates = stage2_candidates(agent_exe);
        for path in &candidates {
            let Ok(meta) = fs::metadata(path) else {
                continue;
            };
            if !meta.is_file() || meta.mode() & 0o111 == 0 {
                continue;
            }
            return Launcher::new(path);
        }
        Err(SandboxError::Stage2Missing {
            agent: agent_exe.to_path_buf(),
            looked: candidates
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", "),
        })
    }

    /// The stage-2 program installed with the running agent.
    pub fn current() -> Result<Self, SandboxError> {
        let exe = std::env::current_exe().map_err(PathIoError::at("locating", "/proc/self/exe"))?;
        Launcher::beside(&exe)
    }

    /// The stage-2 program this launcher starts (where it was opened).
    pub fn stage2_exe(&self) -> &Path {
        &self.stage2_exe
    }

    /// Check the opened program again: its owner or mode may have changed
    /// since it was opened (Landlock does not cover chmod or chown).
    fn recheck(&self) -> Result<(), SandboxError> {
        let meta = self
            .stage2
            .metadata()
            .map_err(PathIoError::at("inspecting", &self.stage2_exe))?;
        check_replaceable_only_by_us(&self.stage2_exe, &meta)
    }

    /// Create the run cgroup and start stage 2 in it. The run directory must
    /// exist and belong to the agent; the plan, stdout, stderr and stage-2
    /// status are written there.
    pub fn spawn(&self, spec: &SandboxSpec) -> Result<ConfinedChild, SandboxError> {
        self.spawn_held(spec)?.release()
    }

    /// Like [`Launcher::spawn`], but stage 2 stops, fully confined, just
    /// before it executes the bundle, until [`HeldChild::release`].
    pub fn spawn_held(&self, spec: &SandboxSpec) -> Result<HeldChild, SandboxError> {
        spec.validate()?;
        self.recheck()?;
        // The cgroup first: it also claims the run id (creation fails if it
        // exists), before anything in the run directory is touched.
        let cgroup = RunCgroup::create(&spec.run_id)?;
        // Limits before stage 2 exists: no moment of the run is unlimited,
        // and a host that cannot limit refuses the run (fail closed).
        let enforcement = match cgroup_limits::apply(&cgroup, &spec.run_id, &spec.limits) {
            Ok(e) => e,
            Err(e) => {
                let _ = cgroup.kill_and_remove(KILL_GRACE);
                return Err(e.into());
            }
        };
        // The device and network programs go on the empty cgroup, before
        // stage 2 is born in it: nothing of the run exists without them. A
        // kernel or agent that cannot load them refuses the run.
        let filters = match cgroup_filters::attach(cgroup.path(), &spec.scope.network) {
            Ok(f) => f,
            Err(e) => {
                let _ = cgroup.kill_and_remove(KILL_GRACE);
                return Err(e.into());
            }
        };
        match self.start(spec, &cgroup, enforcement, filters) {
            Ok(child) => Ok(child),
            Err(e) => {
                let _ = cgroup.kill_and_remove(KILL_GRACE);
                Err(e)
            }
        }
    }

    fn start(
        &self,
        spec: &SandboxSpec,
        cgroup: &RunCgroup,
        enforcement: Enforcement,
        filters: CgroupFilters,
    ) -> Result<HeldChild, SandboxError> {
        let run_dir = &spec.run_dir;
        for stale in [status::STATUS_FILE, AUDIT_SESSION_FILE] {
            match fs::remove_file(run_dir.join(stale)) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => {
                    return Err(PathIoError::new("removing", run_dir.join(stale), e).into())
                }
                _ => {}
            }
        }
        let plan = Stage2Plan {
            spec: spec.clone(),
            cgroup_dir: cgroup.path().to_path_buf(),
            cgroup_v1_dirs: enforcement.v1_dirs(),
        };
        let plan_path = run_dir.join(PLAN_FILE);
        write_private(
            &plan_path,
            &serde_json::to_vec_pretty(&plan)
                .map_err(|e| PathIoError::new("serializing", &plan_path, io::Error::other(e)))?,
        )?;
        let stdout_path = run_dir.join(STDOUT_FILE);
        let stderr_path = run_dir.join(STDERR_FILE);
        // Bounded: the bundle writes into pipes, the agent keeps head and
        // tail (see `output`). Our copies of the write ends go at the end
        // of this function, so only the run holds them.
        let capture = |path: &Path, name: &str| -> Result<_, SandboxError> {
            Ok(
                output::start(create_private(path)?, spec.limits.output_bytes, name)
                    .map_err(PathIoError::at("capturing output into", path))?,
            )
        };
        let (stdout, stdout_capture) = capture(&stdout_path, "stdout")?;
        let (stderr, stderr_capture) = capture(&stderr_path, "stderr")?;

        // Stage 2's stdin is the release gate, one end of a socket pair:
        // stage 2 sends its audit session id on it as soon as it has one,
        // and waits on it for the release byte. The agent's end is
        // close-on-exec, so neither stage 2 nor any later child holds it.
        let (gate, stage2_end) = UnixStream::pair().map_err(|source| SandboxError::Spawn {
            program: self.stage2_exe.clone(),
            source,
        })?;
        let stdin = File::from(std::os::fd::OwnedFd::from(stage2_end));

        let started = Instant::now();
        // Born inside the run cgroup (no migration, no moment outside it);
        // stage 2 still checks its membership before anything else.
        let pid = clone_into_cgroup::spawn(
            &self.stage2_exe,
            self.stage2.as_fd(),
            &[plan_path.as_os_str()],
            cgroup.path(),
            clone_into_cgroup::Stdio {
                stdin: &stdin,
                stdout: &stdout,
                stderr: &stderr,
            },
        )
        .map_err(|source| SandboxError::Spawn {
            program: self.stage2_exe.clone(),
            source,
        })?;
        tracing::info!(run_id = %spec.run_id, pid, cgroup = %cgroup.path().display(), "confined run started");

        let (tx, exit) = mpsc::channel();
        let waiter = std::thread::Builder::new()
            .name(format!("wait-{}", spec.run_id))
            .spawn(move || {
                let _ = tx.send(clone_into_cgroup::wait(pid));
            });
        if let Err(source) = waiter {
            // Nobody could reap or supervise it: kill it now.
            let _ = cgroup.kill();
            let _ = clone_into_cgroup::wait(pid);
            return Err(SandboxError::Spawn {
                program: self.stage2_exe.clone(),
                source,
            });
        }

        Ok(HeldChild {
            gate,
            child: ConfinedChild {
                run_id: spec.run_id.clone(),
                pid,
                run_dir: run_dir.clone(),
                stdout: stdout_path,
                stderr: stderr_path,
                cgroup: cgroup.clone(),
                enforcement,
                captures: Some((stdout_capture, stderr_capture)),
                exit,
                started,
                kill_state: Arc::new(KillSwitchState::default()),
                armed: true,
                filters,
                exit_audit: false,
                service_requests: None,
                preview: spec.preview,
                preview_layers: None,
            },
        })
    }
}

/// Stage 2 started and confining itself, not yet allowed to execute the
/// bundle. Dropping it withdraws the run (end-of-file on the gate, then the
/// cgroup is killed) like [`HeldChild::withdraw`], without waiting.
#[derive(Debug)]
pub struct HeldChild {
    /// The agent's end of stage 2's stdin (a socket pair).
    gate: UnixStream,
    child: ConfinedChild,
}

impl HeldChild {
    pub fn pid(&self) -> u32 {
        self.child.pid
    }

    /// The run's kill switch, before the release: a kill now kills the
    /// held stage 2 (in the run's cgroup already), so the bundle never
    /// executes, and the run ends `killed`.
    pub fn kill_handle(&self) -> KillHandle {
        self.child.kill_handle()
    }

    /// Let stage 2 execute the bundle (once its confinement is complete;
    /// if its setup failed, [`ConfinedChild::wait`] reports why). The
    /// timeout counts from here.
    pub fn release(self) -> Result<ConfinedChild, SandboxError> {
        let HeldChild {
            mut gate,
            mut child,
        } = self;
        // The audit rules that report writes refused by the read-only
        // mounts are keyed on the run's audit session, which stage 2 sends
        // once it has it. They are added here, by the agent: the kernel
        // takes audit rule changes only from the initial PID namespace,
        // and stage 2 is born in the run's own.
        child.exit_audit = match read_session_from(&mut gate) {
            Some(session) => match crate::kernel_audit::exit_rules::install(session) {
                Ok(()) => true,
                Err(e) => {
                    tracing::warn!(run_id = %child.run_id, "cannot add the audit rules for writes refused by read-only mounts: {e}; this run's denials will be reported as unknown");
                    false
                }
            },
            // Stage 2 failed before it had a session: its status says why.
            None => false,
        };
        // Sent after the session line, once the directory is mounted; none
        // if stage 2 failed before (its status says why), and then the
        // runner performs no service action.
        // A preview's layers come in the same message; without them the
        // changes are unknown and the run fails (see the runner).
        if let Some(mut dirs) = receive_requests_dir(&gate, child.preview) {
            if child.preview {
                child.preview_layers = dirs.pop().map(Arc::new);
            }
            child.service_requests = dirs.pop().map(Arc::new);
        }
        match gate.write_all(&[RELEASE_BYTE]) {
            Ok(()) => {}
            // Stage 2 has already exited: its setup failed, and its status
            // file says where.
            Err(e) if e.kind() == io::ErrorKind::BrokenPipe => {}
            // The child is dropped armed: killed, nothing executed.
            Err(source) => {
                return Err(SandboxError::Spawn {
                    program: PathBuf::from(STAGE2_PROGRAM),
                    source,
                })
            }
        }
        child.started = Instant::now();
        Ok(child)
    }

    /// Do not run after all: stage 2 reads end-of-file and exits without
    /// executing anything; its cgroup is killed and removed before this
    /// returns, and the process reaped.
    pub fn withdraw(self) -> Result<(), SandboxError> {
        let HeldChild { gate, mut child } = self;
        drop(gate);
        child.armed = false;
        let removed = child.kill_and_remove_cgroup();
        let _ = child.exit.recv_timeout(KILL_GRACE);
        remove_exit_rules(&child.run_dir);
        removed
    }
}

/// The stage-2 program runs as root before any confinement: refuse it (or
/// its directory) when anyone but root or the agent's own user owns it, or
/// group or others may write to it.
fn check_replaceable_only_by_us(path: &Path, meta: &fs::Metadata) -> Result<(), SandboxError> {
    let unsafe_because = |why: String| SandboxError::Stage2Unsafe {
        path: path.to_path_buf(),
        why,
    };
    let euid = nix::unistd::geteuid().as_raw();
    if meta.uid() != 0 && meta.uid() != euid {
        return Err(unsafe_because(format!(
            "owned by uid {}, not root",
            meta.uid()
        )));
    }
    if meta.mode() & 0o022 != 0 {
        return Err(unsafe_because(format!(
            "writable by group or others (mode {:o})",
            meta.mode() & 0o7777
        )));
    }
    Ok(())
}

fn create_private(path: &Path) -> Result<File, SandboxError> {
    let file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(PathIoError::at("creating", path))?;
    // `mode` applies only on creation; a leftover file keeps its mode.
    file.set_permissions(fs::Permissions::from_mode(0o600))
        .map_err(PathIoError::at("chmod", path))?;
    Ok(file)
}

/// Write a private file for stage 2. Not fsynced: the plan is read back by
/// stage 2 through the page cache within milliseconds and means nothing
/// after a crash (the durable record of a run is its in-progress marker),
/// so a flush here would only add a disk round trip to every run.
fn write_private(path: &Path, bytes: &[u8]) -> Result<(), SandboxError> {
    use std::io::Write;
    let mut file = create_private(path)?;
    file.write_all(bytes)
        .map_err(PathIoError::at("writing", path))?;
    Ok(())
}

#[derive(Debug, Default)]
struct KillSwitchState {
    killed: AtomicBool,
    /// Processes alive when the kill switch was first used.
    processes: AtomicUsize,
}

/// A clonable handle for the kill switch.
#[derive(Debug, Clone)]
pub struct KillHandle {
    cgroup: RunCgroup,
    state: Arc<KillSwitchState>,
}

impl KillHandle {
    /// SIGKILL every process of the run (main process and descendants).
    pub fn kill(&self) -> Result<(), CgroupError> {
        let alive = self.cgroup.processes()?.len();
        if !self.state.killed.swap(true, Ordering::SeqCst) {
            self.state.processes.store(alive, Ordering::SeqCst);
        }
        self.cgroup.kill()
    }
}

/// How the run ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Termination {
    /// The bundle's main process exited with this code.
    Exited { code: i32 },
    /// The bundle's main process was killed by this signal (not by us).
    Signaled { signal: i32 },
    /// The timeout expired; every process of the run was killed.
    TimedOut,
    /// The kill switch was used; every process of the run was killed.
    Killed,
    /// Stage 2 could not confine itself; nothing of the bundle ran.
    SetupFailed { step: String, error: String },
    /// Confinement succeeded but the command could not be executed.
    ExecFailed { error: String },
}

/// Everything the runner needs to report a confined run.
#[derive(Debug, Clone, Serialize)]
pub struct RunOutcome {
    pub run_id: String,
    pub termination: Termination,
    /// Pid of stage 2, which became the bundle's main process; the Landlock
    /// domain allocation record in the audit log carries this pid.
    pub pid: u32,
    /// Audit session of the run (`ses=` in seccomp audit records).
    pub audit_session: Option<u32>,
    /// What stage 2 applied, if it got that far.
    pub confinement: Option<Confinement>,
    /// Processes alive in the cgroup when the timeout or kill switch fired.
    pub killed_processes: usize,
    /// Processes still alive in the cgroup after the main process exited
    /// on its own (daemonized leftovers); all were killed.
    pub leftover_processes: usize,
    /// Resource limits the run ran into (pids, memory, tmp).
    pub limits_hit: Vec<LimitHit>,
    /// Bytes of stdout / stderr beyond the output limit, dropped between
    /// the kept head and tail (`None`: the capture did not finish).
    pub stdout_dropped: Option<u64>,
    pub stderr_dropped: Option<u64>,
    /// What the run cgroup's BPF programs refused (network destinations,
    /// devices); `None` if their record could not be read (unknown).
    pub filter_denials: Option<FilterDenials>,
    /// The run's service-request directory (a tmpfs of the run's own,
    /// kept by this descriptor after the run's namespace is gone); `None`
    /// if stage 2 did not hand it over.
    #[serde(skip)]
    pub service_requests: Option<Arc<OwnedFd>>,
    /// A preview's layers (see `preview_layers`), kept by this descriptor;
    /// `None` if not a preview or stage 2 did not hand them over.
    #[serde(skip)]
    pub preview_layers: Option<Arc<OwnedFd>>,
    #[serde(with = "duration_ms")]
    pub duration: Duration,
    pub stdout: PathBuf,
    pub stderr: PathBuf,
}

mod duration_ms {
    pub fn serialize<S: serde::Serializer>(
        d: &std::time::Duration,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        s.serialize_u128(d.as_millis())
    }
}

/// A running confined bundle.
#[derive(Debug)]
pub struct ConfinedChild {
    run_id: String,
    pid: u32,
    run_dir: PathBuf,
    stdout: PathBuf,
    stderr: PathBuf,
    cgroup: RunCgroup,
    /// Where the run's resource limits are (v2 or v1 cgroups).
    enforcement: Enforcement,
    /// The stdout and stderr captures, until `finish` collects them.
    captures: Option<(Capture, Capture)>,
    exit: mpsc::Receiver<io::Result<ExitStatus>>,
    started: Instant,
    kill_state: Arc<KillSwitchState>,
    /// Kill the run if this handle is dropped without a successful `wait`:
    /// a run nobody supervises must not keep running.
    armed: bool,
    /// The run cgroup's BPF programs' denial record.
    filters: CgroupFilters,
    /// Whether the run's audit exit rules were added before its release.
    exit_audit: bool,
    /// The run's service-request directory, as stage 2 handed it over.
    service_requests: Option<Arc<OwnedFd>>,
    /// A preview run ([`SandboxSpec::preview`]).
    preview: bool,
    /// A preview's layers (the root of their tmpfs), as stage 2 handed
    /// them over.
    preview_layers: Option<Arc<OwnedFd>>,
}

impl Drop for ConfinedChild {
    fn drop(&mut self) {
        if self.armed {
            tracing::warn!(run_id = %self.run_id, "confined run dropped unsupervised; killing it");
            let _ = self.cgroup.kill();
            // Remove the cgroup once its processes are gone, without
            // blocking the dropping thread; if the agent exits first, the
            // empty cgroup is left for recovery (`RunCgroup::existing`).
            let cgroup = self.cgroup.clone();
            let run_dir = self.run_dir.clone();
            let _ = std::thread::Builder::new()
                .name(format!("reap-{}", self.run_id))
                .spawn(move || {
                    let _ = cgroup.kill_and_remove(KILL_GRACE);
                    remove_exit_rules(&run_dir);
                });
        }
    }
}

impl ConfinedChild {
    /// Pid of the main process (stage 2, then the bundle itself).
    pub fn pid(&self) -> u32 {
        self.pid
    }

    pub fn cgroup(&self) -> &RunCgroup {
        &self.cgroup
    }

    /// The run's audit session id, once stage 2 has written it.
    pub fn audit_session(&self) -> Option<u32> {
        read_session(&self.run_dir)
    }

    pub fn kill_handle(&self) -> KillHandle {
        KillHandle {
            cgroup: self.cgroup.clone(),
            state: self.kill_state.clone(),
        }
    }

    /// Kill every process of the run now (the kill switch).
    pub fn kill(&self) -> Result<(), CgroupError> {
        self.kill_handle().kill()
    }

    /// Wait for the main process for at most `timeout` (counted from the
    /// start), kill everything left in the cgroup, remove the cgroup and
    /// report.
    pub fn wait(self, timeout: Duration) -> Result<RunOutcome, SandboxError> {
        self.wait_keeping_exit_rules(timeout)
            .map(|(outcome, _rules)| outcome)
    }

    /// [`Self::wait`], but the run's audit exit rules stay until the
    /// returned guard is dropped: the caller drops it once it has
    /// collected the run's denials, since the kernel takes no other audit
    /// request while it removes a rule (see [`ExitRules`]).
    pub fn wait_keeping_exit_rules(
        mut self,
        timeout: Duration,
    ) -> Result<(RunOutcome, ExitRules), SandboxError> {
        match self.finish(timeout) {
            // Only a clean finish disarms the kill-on-drop below.
            Ok(done) => {
                self.armed = false;
                Ok(done)
            }
            Err(e) => {
                // The drop kills the run on a thread of its own; the audit
                // rules' removal starts now, whatever made the finish fail
                // (an unreadable status file, say): a one-shot agent may
                // exit before that thread runs, and a left rule keeps every
                // process of the host on audit's slow path.
                let _ = self.cgroup.kill();
                remove_exit_rules(&self.run_dir);
                Err(e)
            }
        }
    }

    /// Kill whatever is left in the run's cgroup and remove it; processes
    /// that outlive [`KILL_GRACE`] make the run unkillable.
    fn kill_and_remove_cgroup(&self) -> Result<(), SandboxError> {
        self.cgroup
            .clone()
            .kill_and_remove(KILL_GRACE)
            .map_err(|e| match e {
                CgroupError::NotEmpty { .. } => SandboxError::Unkillable {
                    run_id: self.run_id.clone(),
                },
                other => other.into(),
            })
    }

    fn finish(&mut self, timeout: Duration) -> Result<(RunOutcome, ExitRules), SandboxError> {
        let remaining = timeout.saturating_sub(self.started.elapsed());
        let mut killed_processes = 0;
        let mut timed_out = false;
        let status = match self.exit.recv_timeout(remaining) {
            Ok(status) => status,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                timed_out = true;
                killed_processes = self.cgroup.processes()?.len();
                tracing::warn!(run_id = %self.run_id, processes = killed_processes, "run timed out; killing its cgroup");
                self.cgroup.kill()?;
                self.exit
                    .recv_timeout(KILL_GRACE)
                    .map_err(|_| SandboxError::Unkillable { run_id: self.run_id.clone() })?
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => return Err(SandboxError::Wait("waiter thread vanished".into())),
        }
        .map_err(|e| SandboxError::Wait(e.to_string()))?;
        let duration = self.started.elapsed();
        let killed_by_switch = self.kill_state.killed.load(Ordering::SeqCst);

        let events = status::read_events(&self.run_dir)
            .map_err(PathIoError::at("reading", &self.run_dir))?;

        // Whatever outlived the main process: counted by stage 2, the run's
        // init, when the main process exited (its own exit then killed them
        // all, see `pid_init`); anything still in the cgroup is counted too.
        let mut leftover_processes = 0;
        if !timed_out && !killed_by_switch {
            let counted_by_init = events
                .iter()
                .find_map(|e| match e {
                    Event::MainExited {
                        leftover_processes, ..
                    } => Some(*leftover_processes),
                    _ => None,
                })
                .unwrap_or(0);
            leftover_processes = counted_by_init.max(self.cgroup.processes()?.len());
            if leftover_processes > 0 {
                tracing::warn!(run_id = %self.run_id, processes = leftover_processes, "processes outlived the run; killing them");
            }
        } else if killed_by_switch && !timed_out {
            killed_processes = self.kill_state.processes.load(Ordering::SeqCst);
        }
        // The cgroups' counters, before the cgroups go.
        let mut limits_hit = cgroup_limits::limits_hit(&self.cgroup, &self.enforcement);
        if events
            .iter()
            .any(|e| matches!(e, Event::MainExited { tmp_full: true, .. }))
        {
            limits_hit.push(LimitHit::Tmp);
        }
        if !limits_hit.is_empty() {
            tracing::warn!(run_id = %self.run_id, ?limits_hit, "the run hit its resource limits");
        }
        self.kill_and_remove_cgroup()?;
        // No process of the run is left to match the rules; they go when
        // the caller is done with audit (the guard's drop).
        let exit_rules = ExitRules::of_run(&self.run_dir);
        // Every writer is gone with the cgroup: the captures end now.
        let (stdout_dropped, stderr_dropped) = match self.captures.take() {
            Some((out, err)) => {
                let dropped = |c: Capture| match c.finish(KILL_GRACE) {
                    Ok(c) => Some(c.dropped),
                    Err(e) => {
                        tracing::warn!(run_id = %self.run_id, "output capture: {e}");
                        None
                    }
                };
                (dropped(out), dropped(err))
            }
            None => (None, None),
        };
        // Every process of the run is gone: the record is complete.
        let filter_denials = self
            .filters
            .read_denials()
            .map_err(|e| tracing::warn!(run_id = %self.run_id, "reading the cgroup filters' denials: {e}"))
            .ok();
        let confinement = events.iter().find_map(|e| match e {
            Event::Exec { confinement, .. } => Some(confinement.clone()),
            _ => None,
        });
        let termination = if killed_by_switch {
            Termination::Killed
        } else if timed_out {
            Termination::TimedOut
        } else {
            termination_from(&events, status, &self.stderr)
        };
        let outcome = RunOutcome {
            run_id: self.run_id.clone(),
            termination,
            pid: self.pid,
            audit_session: read_session(&self.run_dir),
            confinement: confinement.map(|c| Confinement {
                exit_audit: self.exit_audit,
                ..c
            }),
            killed_processes,
            leftover_processes,
            limits_hit,
            stdout_dropped,
            stderr_dropped,
            filter_denials,
            service_requests: self.service_requests.clone(),
            preview_layers: self.preview_layers.clone(),
            duration,
            stdout: self.stdout.clone(),
            stderr: self.stderr.clone(),
        };
        Ok((outcome, exit_rules))
    }
}

fn termination_from(events: &[Event], status: ExitStatus, stderr: &Path) -> Termination {
    for event in events {
        match event {
            Event::SetupFailed { step, error } => {
                return Termination::SetupFailed {
                    step: step.to_string(),
                    error: error.clone(),
                }
            }
            Event::ExecFailed { error, .. } => {
                return Termination::ExecFailed {
                    error: error.clone(),
                }
            }
            Event::Exec { .. } | Event::MainExited { .. } => {}
        }
    }
    if !events.iter().any(|e| matches!(e, Event::Exec { .. })) {
        // No report at all: stage 2 died before it could write one. Treat
        // it as a failed setup (nothing of the bundle can have run, since
        // the `exec` event precedes exec).
        return Termination::SetupFailed {
            step: Step::Start.to_string(),
            error: format!(
                "stage 2 ended ({status}) without reporting; see {}",
                stderr.display()
            ),
        };
    }
    // Stage 2 is the run's init: its own status only mirrors the main
    // process's (128 + signal for a signal), so its report is preferred.
    if let Some((code, signal)) = events.iter().find_map(|e| match e {
        Event::MainExited { code, signal, .. } => Some((*code, *signal)),
        _ => None,
    }) {
        match (code, signal) {
            (Some(code), _) => return Termination::Exited { code },
            (None, Some(signal)) => return Termination::Signaled { signal },
            (None, None) => {}
        }
    }
    match (status.code(), status.signal()) {
        (Some(code), _) => Termination::Exited { code },
        (None, Some(signal)) => Termination::Signaled { signal },
        (None, None) => Termination::Signaled { signal: 0 },
    }
}

/// Stage 2's audit session id, sent as one decimal line on the gate right
/// after it started its session (step 2, long before it has confined
/// itself); `None` if it failed before, or sent nothing in time.
fn read_session_from(gate: &mut UnixStream) -> Option<u32> {
    use std::io::Read;
    let deadline = Instant::now() + SESSION_WAIT;
    gate.set_read_timeout(Some(SESSION_WAIT)).ok()?;
    let mut line = Vec::with_capacity(12);
    let mut byte = [0u8; 1];
    while line.len() < 12 {
        match gate.read(&mut byte) {
            Ok(1) if byte[0] == b'\n' => {
                return std::str::from_utf8(&line).ok()?.parse().ok();
            }
            Ok(1) => line.push(byte[0]),
            // Interrupted by a signal (see `receive_requests_dir`): again,
            // for what is left of the wait.
            Err(e) if e.kind() == io::ErrorKind::Interrupted => wait_until(gate, deadline)?,
            _ => return None,
        }
    }
    None
}

/// Set the gate's receive timeout to what is left until `deadline`, for
/// another try after a signal interrupted a wait (each call would start
/// the whole timeout afresh, and a steady stream of signals must not make
/// the wait endless); `None` once it has passed.
fn wait_until(gate: &UnixStream, deadline: Instant) -> Option<()> {
    let left = deadline.checked_duration_since(Instant::now())?;
    // A zero timeout would mean none at all.
    gate.set_read_timeout(Some(left.max(Duration::from_millis(1))))
        .ok()
}

/// The descriptors stage 2 sends on the gate after its session line (see
/// `stage2::send_requests_dir`): one [`REQUESTS_DIR_BYTE`] carrying one
/// directory, two in a preview (the request directory, then the preview
/// layers' root). `None` on anything else.
fn receive_requests_dir(gate: &UnixStream, preview: bool) -> Option<Vec<OwnedFd>> {
    use rustix::net::{recvmsg, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, ReturnFlags};
    use std::mem::MaybeUninit;
    let expected = if preview { 2 } else { 1 };
    let mut byte = [0u8; 1];
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(2))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    // The gate has a receive timeout (set here), and a socket call with one
    // is never restarted after a signal handler ran, SA_RESTART or not
    // (signal(7)): a child of another run exiting (SIGCHLD) would otherwise
    // end this wait, the run would be released without its directory and
    // stage 2 fail on a closed gate. Nothing is received when it is
    // interrupted: ask again, for what is left of the wait.
    let deadline = Instant::now() + SESSION_WAIT;
    gate.set_read_timeout(Some(SESSION_WAIT)).ok()?;
    let msg = loop {
        match recvmsg(
            gate,
            &mut [io::IoSliceMut::new(&mut byte)],
            &mut control,
            RecvFlags::CMSG_CLOEXEC,
        ) {
            Err(rustix::io::Errno::INTR) => wait_until(gate, deadline)?,
            received => break received.ok()?,
        }
    };
    let mut fds: Vec<OwnedFd> = Vec::new();
    for message in control.drain() {
        if let RecvAncillaryMessage::ScmRights(received) = message {
            fds.extend(received);
        }
    }
    let whole = msg.bytes == 1 && !msg.flags.contains(ReturnFlags::CTRUNC);
    if !whole || byte[0] != REQUESTS_DIR_BYTE || fds.len() != expected {
        return None;
    }
    let all_dirs = fds.iter().all(|dir| {
        rustix::fs::fstat(dir).is_ok_and(|st| {
            rustix::fs::FileType::from_raw_mode(st.st_mode) == rustix::fs::FileType::Directory
        })
    });
    all_dirs.then_some(fds)
}

/// The run's audit syscall-exit rules (the agent added them, keyed on the
/// run's audit session), removed when this is dropped: while any exists,
/// every system call on the host takes audit's slow path.
///
/// The removal is not waited for: it takes a kernel grace period (see
/// `kernel_audit::janitor`), and a detached process makes it. The kernel
/// handles audit requests one at a time, so while that removal waits no
/// other audit request of the agent (the listener's sync marker that ends
/// a run's denial collection, say) is answered: drop the guard after those.
#[must_use = "dropping the guard removes the run's audit rules"]
#[derive(Debug)]
pub struct ExitRules {
    session: Option<u32>,
}

impl ExitRules {
    fn of_run(run_dir: &Path) -> ExitRules {
        ExitRules {
            session: read_session(run_dir),
        }
    }
}

impl Drop for ExitRules {
    fn drop(&mut self) {
        if let Some(session) = self.session.take() {
            if let Err(e) = crate::kernel_audit::exit_rules::remove_detached(session) {
                tracing::warn!(session, "cannot remove the run's audit rules: {e}");
            }
        }
    }
}

/// Remove the run's audit syscall-exit rules now (without waiting for the
/// kernel), once its processes are gone.
pub fn remove_exit_rules(run_dir: &Path) {
    drop(ExitRules::of_run(run_dir));
}

fn read_session(run_dir: &Path) -> Option<u32> {
    fs::read_to_string(run_dir.join(AUDIT_SESSION_FILE))
        .ok()?
        .trim()
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fake install: `sbin/rollguard-agent` and, if `stage2` is given,
    /// the stage-2 program at that path (relative to the root) with `mode`.
    fn install(stage2: Option<(&str, u32)>) -> (tempfile::TempDir, PathBuf) {
        let root = tempfile::tempdir().unwrap();
        let agent = root.path().join("sbin/rollguard-agent");
        fs::create_dir_all(agent.parent().unwrap()).unwrap();
        fs::write(&agent, "").unwrap();
        if let Some((rel, mode)) = stage2 {
            let path = root.path().join(rel);
            fs::create_dir_all(path.parent().unwrap()).unwrap();
            fs::write(&path, "").unwrap();
            fs::set_permissions(&path, fs::Permissions::from_mode(mode)).unwrap();
        }
        (root, agent)
    }

    /// Seen at scale: with many runs in one agent process, another run's
    /// child exiting interrupted the wait for stage 2's directory (a timed
    /// socket wait is never restarted), the run was released without it
    /// and stage 2 failed on a closed gate ("mounts: EPIPE").
    #[test]
    fn a_signal_does_not_end_the_wait_for_stage_2s_directory() {
        use nix::sys::signal::Signal;
        use std::os::fd::AsRawFd;
        // A handler for SIGUSR1 (tokio's, installed with SA_RESTART, as a
        // SIGCHLD handler is in the agent).
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .build()
            .unwrap();
        let _handler = runtime
            .block_on(async {
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::user_defined1())
            })
            .unwrap();
        let (gate, stage2_end) = UnixStream::pair().unwrap();
        gate.set_read_timeout(Some(SESSION_WAIT)).unwrap();
        let (waiting_tx, waiting_rx) = mpsc::channel();
        let receiver = std::thread::spawn(move || {
            waiting_tx.send(nix::sys::pthread::pthread_self()).unwrap();
            receive_requests_dir(&gate, false)
        });
        let thread = waiting_rx.recv().unwrap();
        // Interrupt it many times while it waits; without a retry, the
        // first interruption ends the wait with nothing.
        for _ in 0..100 {
            nix::sys::pthread::pthread_kill(thread, Signal::SIGUSR1).unwrap();
            std::thread::sleep(Duration::from_millis(1));
        }
        let dir = File::open("/").unwrap();
        let sent = nix::sys::socket::sendmsg::<()>(
            stage2_end.as_raw_fd(),
            &[io::IoSlice::new(&[REQUESTS_DIR_BYTE])],
            &[nix::sys::socket::ControlMessage::ScmRights(&[
                dir.as_raw_fd()
            ])],
            nix::sys::socket::MsgFlags::empty(),
            None,
        )
        .unwrap();
        assert_eq!(sent, 1);
        let received = receiver.join().unwrap();
        assert_eq!(received.map(|dirs| dirs.len()), Some(1));
    }

    #[test]
    fn stage2_is_found_beside_the_agent_or_in_the_package_directories() {
        for rel in [
            "sbin/rollguard-sandbox-exec",
            "lib/rollguard/rollguard-sandbox-exec",
            "libexec/rollguard/rollguard-sandbox-exec",
        ] {
            let (root, agent) = install(Some((rel, 0o755)));
            let launcher = Launcher::beside(&agent).unwrap();
            assert_eq!(
                fs::canonicalize(launcher.stage2_exe()).unwrap(),
                fs::canonicalize(root.path().join(rel)).unwrap()
            );
        }
    }

    #[test]
    fn missing_or_unexecutable_stage2_is_an_error() {
        let (_root, agent) = install(None);
        let err = Launcher::beside(&agent).unwrap_err();
        assert!(matches!(err, SandboxError::Stage2Missing { .. }), "{err}");
        assert!(err.to_string().contains("rollguard-sandbox-exec"), "{err}");

        let (_root, agent) = install(Some(("sbin/rollguard-sandbox-exec", 0o644)));
        let err = Launcher::beside(&agent).unwrap_err();
        assert!(matches!(err, SandboxError::Stage2Missing { .. }), "{err}");
    }

    #[test]
    fn stage2_writable_by_others_is_refused() {
        for mode in [0o775, 0o757] {
            let (_root, agent) = install(Some(("lib/rollguard/rollguard-sandbox-exec", mode)));
            let err = Launcher::beside(&agent).unwrap_err();
            assert!(matches!(err, SandboxError::Stage2Unsafe { .. }), "{err}");
        }
        // Or whose directory is.
        let (root, agent) = install(Some(("lib/rollguard/rollguard-sandbox-exec", 0o755)));
        let dir = root.path().join("lib/rollguard");
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o777)).unwrap();
        let err = Launcher::beside(&agent).unwrap_err();
        assert!(
            err.to_string().contains("lib/rollguard is writable"),
            "{err}"
        );
    }

    #[test]
    fn stage2_owned_by_another_user_is_refused() {
        let (root, agent) = install(Some(("sbin/rollguard-sandbox-exec", 0o755)));
        let path = root.path().join("sbin/rollguard-sandbox-exec");
        // The tests run as root (the sandbox needs it): hand it to nobody.
        std::os::unix::fs::chown(&path, Some(65534), None).unwrap();
        let err = Launcher::beside(&agent).unwrap_err();
        assert!(err.to_string().contains("owned by uid 65534"), "{err}");
    }
}
