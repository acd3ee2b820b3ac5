//! Stage 2: the process that confines itself and becomes the bundle.
//!
//! Runs as `rollguard-sandbox-exec PLAN.json` (its own small program, see
//! `src/bin/rollguard-sandbox-exec.rs`), single-threaded, before anything
//! else in `main`. The order is fixed and each step
//! depends on the ones before:
//!
//! 0. checks: one thread (Landlock and seccomp apply per thread), PID 1
//!    of a new PID namespace, umask
//!    022, a new session (no controlling terminal), every inherited fd
//!    above 2 marked close-on-exec, plan valid;
//! 1. check membership of the run cgroup (the launcher starts us in it;
//!    join it otherwise), *first*, so nothing this process becomes can
//!    escape `cgroup.kill`;
//! 2. new audit session (needs CAP_AUDIT_CONTROL, dropped in 4), its id
//!    written to `<run_dir>/audit-session` and sent to the agent on the
//!    gate, which adds the session's audit syscall-exit rules before the
//!    release (`kernel_audit::exit_rules`; audit takes rule changes only
//!    from the initial PID namespace);
//! 3. `unshare(CLONE_NEWNS[|CLONE_NEWNET])`, `/` rprivate, `lo` up,
//!    everything outside the scopes read-only and nodev, protected paths
//!    covered (`readonly_mounts`), private
//!    `/tmp`, `/var/tmp`, `/run` (with the service-capture links and
//!    request directory, a small tmpfs whose descriptor goes to the agent
//!    on the gate), minimal `/dev` (needs CAP_SYS_ADMIN and
//!    CAP_MKNOD, dropped in 4; must precede 6 because Landlock rules attach
//!    to the inodes of these new mounts);
//! 4. capabilities cut to the keep-list;
//! 5. `PR_SET_NO_NEW_PRIVS` (required by 6 and 7 without CAP_SYS_ADMIN);
//! 6. Landlock, hard requirement;
//! 7. seccomp, last, so that nothing above is blocked by it (e.g. mount,
//!    unshare) and so the filter also covers everything that follows;
//! 8. verify in `/proc/self/status` (NoNewPrivs 1, Seccomp 2, no capability
//!    outside the keep-list);
//! 9. wait for the agent's release byte on the gate, a socket that arrives
//!    as stdin and is moved aside at the start (stdin becomes `/dev/null`
//!    before any confinement): the agent makes the run's start durable
//!    meanwhile; end-of-file means withdrawn, exit without executing
//!    anything;
//! 10. fork the bundle's main process (clean environment, `chdir` to the
//!     payload, `exec`); stage 2 stays as PID 1 of the run's PID namespace
//!     (the launcher cloned it with `CLONE_NEWPID`), reaps orphans, and
//!     exits with the main process's status ([`pid_init`]). The pid that
//!     created the Landlock domain is stage 2's, the one the agent knows.
//!
//! Any failure: a `setup-failed` status event, a message on stderr, exit
//! 125, and nothing executed.

use std::ffi::OsString;
use std::fs::{self, File};
use std::io::{self, Read};
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, ExitCode};

use nix::fcntl::{fcntl, FcntlArg, FdFlag};
use nix::sys::stat::{umask, Mode};

use super::cgroup::RunCgroup;
use super::spec::{SandboxSpec, Stage2Plan};
use super::status::{
    Confinement, Event, StatusWriter, Step, AUDIT_SESSION_FILE, EXIT_EXEC_FAILED, EXIT_NOT_FOUND,
    EXIT_SETUP_FAILED, RELEASE_BYTE, REQUESTS_DIR_BYTE,
};
use super::{
    audit_session, capabilities, cgroup_limits, landlock_rules, namespaces, pid_init,
    readonly_mounts, seccomp_filter, seccomp_install, STAGE2_PROGRAM,
};
use pid_init::Forked;

/// `PATH` of the bundle: the service-capture links first (see
/// `services::capture`), then the standard Debian root path.
pub const PATH: &str =
    "/run/rollguard/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

struct Failure {
    step: Step,
    error: String,
}

fn at<E: std::fmt::Display>(step: Step) -> impl FnOnce(E) -> Failure {
    move |e| Failure {
        step,
        error: e.to_string(),
    }
}

/// The command line of `rollguard-sandbox-exec`: exactly one argument, the
/// plan. Returns only on failure (on success the process has become the
/// bundle).
pub fn stage2_command(mut args: impl Iterator<Item = OsString>) -> ExitCode {
    let _program = args.next();
    match (args.next(), args.next()) {
        (Some(plan), None) => stage2_main(Path::new(&plan)),
        _ => {
            eprintln!(
                "usage: {STAGE2_PROGRAM} PLAN.json (stage 2 of a confined run, started by rollguard-agent; not for use by hand)"
            );
            ExitCode::from(EXIT_SETUP_FAILED)
        }
    }
}

/// Stage 2 with the plan at `plan_path`. Returns only on failure (on
/// success the process has become the bundle).
fn stage2_main(plan_path: &Path) -> ExitCode {
    // Not dumpable, first of all: stage 2 stays for the whole run as its
    // init, holding descriptors opened before the run's mount namespace
    // existed (the status file in the state directory, its own program,
    // stdin). A dumpable init would let the bundle, same uid, reach them
    // through /proc/1/fd, /proc/1/exe or pidfd_getfd, outside the read-only
    // view. The bundle's own exec makes it dumpable again: that is its own.
    if let Err(e) = nix::sys::prctl::set_dumpable(false) {
        eprintln!("rollguard sandbox: cannot make stage 2 non-dumpable: {e}; nothing was run");
        return ExitCode::from(EXIT_SETUP_FAILED);
    }
    let plan = match load_plan(plan_path) {
        Ok(plan) => plan,
        Err(e) => {
            eprintln!(
                "rollguard sandbox: cannot load the plan {}: {e}; nothing was run",
                plan_path.display()
            );
            return ExitCode::from(EXIT_SETUP_FAILED);
        }
    };
    let mut status = match StatusWriter::create(&plan.spec.run_dir) {
        Ok(s) => s,
        Err(e) => {
            eprintln!(
                "rollguard sandbox: cannot open the status file in {}: {e}; nothing was run",
                plan.spec.run_dir.display()
            );
            return ExitCode::from(EXIT_SETUP_FAILED);
        }
    };
    // The release gate arrives as stdin. Move it to a close-on-exec
    // descriptor of its own and give stdin `/dev/null` right away, so the
    // confinement is built around the bundle's real stdin (Landlock lets
    // the bundle reopen its stdio by path, see `landlock_rules`).
    let gate = match take_gate() {
        Ok(gate) => gate,
        Err(Failure { step, error }) => return setup_failed(&mut status, step, error),
    };
    match confine(&plan, &gate).and_then(|c| wait_for_release(gate).map(|()| c)) {
        Ok(confinement) => fork_and_exec(&plan.spec, confinement, &mut status),
        Err(Failure { step, error }) => setup_failed(&mut status, step, error),
    }
}

/// Step 10: fork the bundle's main process, which execs the bundle; stay
/// behind as the namespace's init until it exits (see [`pid_init`]).
fn fork_and_exec(
    spec: &SandboxSpec,
    confinement: Confinement,
    status: &mut StatusWriter,
) -> ExitCode {
    match pid_init::fork_main() {
        Ok(Forked::Main) => exec(spec, confinement, status),
        Ok(Forked::Init { main }) => match pid_init::reap_until_main_exits(main) {
            Ok(exit) => {
                status.record(&Event::MainExited {
                    code: exit.code,
                    signal: exit.signal,
                    leftover_processes: exit.leftover_processes,
                    tmp_full: exit.tmp_full,
                });
                ExitCode::from(exit.init_exit_code())
            }
            Err(e) => {
                let error = format!("lost the main process {main}: {e}");
                eprintln!("rollguard sandbox: {error}");
                ExitCode::from(EXIT_SETUP_FAILED)
            }
        },
        Err(e) => setup_failed(status, Step::Exec, format!("fork of the main process: {e}")),
    }
}

/// The release gate (stdin as started), with `/dev/null` put in its place.
fn take_gate() -> Result<File, Failure> {
    let gate = io::stdin()
        .as_fd()
        .try_clone_to_owned()
        .map_err(at(Step::Start))?;
    let devnull = File::open("/dev/null").map_err(at(Step::Start))?;
    nix::unistd::dup2(devnull.as_raw_fd(), 0).map_err(at(Step::Start))?;
    Ok(File::from(gate))
}

/// Step 9: block until the agent releases the run (its start is durable).
fn wait_for_release(mut gate: File) -> Result<(), Failure> {
    let mut byte = [0u8; 1];
    match gate.read_exact(&mut byte) {
        Ok(()) if byte[0] == RELEASE_BYTE => Ok(()),
        Ok(()) => Err(Failure {
            step: Step::Release,
            error: format!("unexpected byte {:#04x} on the release gate", byte[0]),
        }),
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Err(Failure {
            step: Step::Release,
            error: "the agent withdrew the run before it started".to_string(),
        }),
        Err(e) => Err(at(Step::Release)(e)),
    }
}

fn setup_failed(status: &mut StatusWriter, step: Step, error: String) -> ExitCode {
    eprintln!("rollguard sandbox: {step}: {error}; nothing was run");
    status.record(&Event::SetupFailed { step, error });
    ExitCode::from(EXIT_SETUP_FAILED)
}

fn load_plan(path: &Path) -> Result<Stage2Plan, String> {
    let bytes = fs::read(path).map_err(|e| e.to_string())?;
    let plan: Stage2Plan = serde_json::from_slice(&bytes).map_err(|e| e.to_string())?;
    plan.spec.validate().map_err(|e| e.to_string())?;
    Ok(plan)
}

/// Steps 0-8.
fn confine(plan: &Stage2Plan, gate: &File) -> Result<Confinement, Failure> {
    let spec = &plan.spec;

    // 0. Preconditions.
    require_single_thread().map_err(at(Step::Start))?;
    pid_init::require_pid1().map_err(at(Step::Start))?;
    umask(Mode::from_bits_truncate(0o022));
    // A new session without a controlling terminal: if the agent was
    // started from a terminal, the bundle must not reach it (/dev/tty,
    // TIOCSTI injection into the operator's shell).
    nix::unistd::setsid().map_err(at(Step::Start))?;
    close_inherited_fds().map_err(at(Step::Start))?;
    // Compile the filters now: a compile error should stop us before any
    // change to the process.
    let filters = seccomp_filter::all_filters().map_err(at(Step::Seccomp))?;

    // 1. cgroup.
    let cgroup = RunCgroup::open(&plan.cgroup_dir).map_err(at(Step::Cgroup))?;
    // The launcher starts us inside it (clone3 with CLONE_INTO_CGROUP); a
    // migration waits for an RCU grace period (~15 ms here), so only join
    // when we are somehow not a member, and then check again (each check
    // reads /proc/self/mountinfo and /proc/self/cgroup).
    if !cgroup.contains_self().map_err(at(Step::Cgroup))? {
        cgroup
            .add_process(std::process::id())
            .map_err(at(Step::Cgroup))?;
        if !cgroup.contains_self().map_err(at(Step::Cgroup))? {
            return Err(Failure {
                step: Step::Cgroup,
                error: format!(
                    "joined {} but /proc/self/cgroup says otherwise",
                    plan.cgroup_dir.display()
                ),
            });
        }
    }

    // The resource limits of hosts whose controllers live in cgroup v1,
    // before anything of the run can fork.
    cgroup_limits::join_v1(&plan.cgroup_v1_dirs).map_err(at(Step::Cgroup))?;

    // 2. Audit session.
    let session = audit_session::start_new().map_err(at(Step::AuditSession))?;
    fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(spec.run_dir.join(AUDIT_SESSION_FILE))
        .and_then(|mut f| io::Write::write_all(&mut f, session.to_string().as_bytes()))
        .map_err(at(Step::AuditSession))?;
    // The agent adds the audit rules that report what the read-only mounts
    // (step 3) refuse, keyed on this session (EROFS is decided before
    // Landlock, which never logs it): send it the id now. The kernel takes
    // rule changes only from the initial PID namespace, which stage 2 is
    // not in. MSG_NOSIGNAL: a withdrawn run must not die of SIGPIPE here.
    nix::sys::socket::send(
        gate.as_raw_fd(),
        format!("{session}\n").as_bytes(),
        nix::sys::socket::MsgFlags::MSG_NOSIGNAL,
    )
    .map_err(at(Step::AuditSession))?;

    // 3. Namespaces and private mounts.
    let private_network = spec.scope.network.is_empty();
    // This program, which the service-capture links point to.
    let stage2_exe = std::env::current_exe().map_err(at(Step::Namespaces))?;
    namespaces::enter(private_network).map_err(at(Step::Namespaces))?;
    // Everything outside the write/delete scopes read-only and nodev,
    // protected paths covered; then the private scratch mounts (and the
    // run's own /proc) on top.
    let mut read_only = readonly_mounts::apply(spec).map_err(at(Step::Mounts))?;
    namespaces::mount_private_dirs(!private_network, spec.limits.tmp_bytes)
        .map_err(at(Step::Mounts))?;
    let service_requests =
        namespaces::mount_service_capture(&stage2_exe).map_err(at(Step::Mounts))?;
    // The agent reads the requests through this descriptor after the run
    // (the namespace, and its path, are gone by then); sent now, before
    // the bundle exists.
    // A preview's layers go with it, for the agent to read the changes.
    let preview = read_only.preview.take();
    send_requests_dir(gate, &service_requests, preview.as_ref()).map_err(at(Step::Mounts))?;
    drop(service_requests);
    drop(preview);
    // The bundle's stdin: the private /dev's null, not the host's, which
    // was opened before this namespace (a descriptor keeps its mount, and
    // the host's is writable: fchmod on it would change the host's node).
    let null = File::open("/dev/null").map_err(at(Step::Mounts))?;
    nix::unistd::dup2(null.as_raw_fd(), 0).map_err(at(Step::Mounts))?;

    // 4. Capabilities.
    capabilities::drop_to_keep_list().map_err(at(Step::Capabilities))?;

    // 5. No new privileges.
    nix::sys::prctl::set_no_new_privs().map_err(at(Step::NoNewPrivs))?;

    // 6. Landlock.
    let enforced = landlock_rules::restrict_self(spec).map_err(at(Step::Landlock))?;

    // 7. seccomp, last.
    for filter in &filters {
        if filter.logged {
            seccomp_install::install_logged(&filter.program)
        } else {
            seccomp_install::install_unlogged(&filter.program)
        }
        .map_err(at(Step::Seccomp))?;
    }

    // 8. Verify what the kernel reports.
    verify_status().map_err(at(Step::Verify))?;

    Ok(Confinement {
        landlock_abi: enforced.abi,
        landlock_fs_rules: enforced.fs_rules,
        tcp_connect_ports: enforced.tcp_ports,
        landlock_scoped: enforced.scoped,
        landlock_log_new_exec: enforced.log_new_exec,
        private_network,
        seccomp_filters: filters.len(),
        audit_session: session,
        masked_paths: read_only.masked.len(),
        pinned_mounts: read_only.pinned,
        // Filled in by the agent, which adds the rules (see above).
        exit_audit: false,
    })
}

/// Hand the run's request directory (its own tmpfs) to the agent: one
/// byte, [`REQUESTS_DIR_BYTE`], carrying the descriptor (`SCM_RIGHTS`) on
/// the gate, after the audit session line; in a preview, the preview
/// layers' tmpfs root is the second descriptor of the same message.
fn send_requests_dir(
    gate: &File,
    dir: &File,
    preview: Option<&std::os::fd::OwnedFd>,
) -> Result<(), nix::Error> {
    use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
    let mut fds = vec![dir.as_raw_fd()];
    fds.extend(preview.map(|p| p.as_raw_fd()));
    let sent = sendmsg::<()>(
        gate.as_raw_fd(),
        &[io::IoSlice::new(&[REQUESTS_DIR_BYTE])],
        &[ControlMessage::ScmRights(&fds)],
        MsgFlags::MSG_NOSIGNAL,
        None,
    )?;
    if sent == 1 {
        Ok(())
    } else {
        Err(nix::Error::EIO)
    }
}

/// Step 10: clean environment, payload as working directory, exec in place.
/// Returns only if `exec` failed.
fn exec(spec: &SandboxSpec, confinement: Confinement, status: &mut StatusWriter) -> ExitCode {
    if let Err(e) = nix::unistd::chdir(&spec.payload_dir) {
        return setup_failed(
            status,
            Step::Exec,
            format!("chdir to the payload {}: {e}", spec.payload_dir.display()),
        );
    }
    let program = spec.program();
    status.record(&Event::Exec {
        program: program.clone(),
        confinement,
    });
    let error = Command::new(&program)
        .arg0(&spec.command[0])
        .args(&spec.command[1..])
        .env_clear()
        .envs(clean_env(spec))
        .exec();
    // Confinement is complete here; a command that cannot start is the
    // bundle's problem, reported with the shell's conventional codes.
    let code = if error.kind() == io::ErrorKind::NotFound {
        EXIT_NOT_FOUND
    } else {
        EXIT_EXEC_FAILED
    };
    let message = format!("cannot execute {}: {error}", program.display());
    eprintln!("rollguard sandbox: {message}");
    status.record(&Event::ExecFailed {
        program,
        error: message,
    });
    ExitCode::from(code)
}

/// The bundle's whole environment. HOME is the private `/tmp`: tools that
/// write caches or dotfiles succeed, nothing written there persists, and
/// tools are not pointed at root's credential files.
fn clean_env(spec: &SandboxSpec) -> Vec<(String, String)> {
    let mut env = vec![
        ("PATH".to_string(), PATH.to_string()),
        ("TMPDIR".to_string(), "/tmp".to_string()),
        ("HOME".to_string(), "/tmp".to_string()),
        ("LANG".to_string(), "C.UTF-8".to_string()),
        ("ROLLGUARD_RUN_ID".to_string(), spec.run_id.clone()),
        (
            "ROLLGUARD_PAYLOAD_DIR".to_string(),
            spec.payload_dir.display().to_string(),
        ),
    ];
    env.extend(spec.env.iter().map(|(k, v)| (k.clone(), v.clone())));
    env
}

fn status_field(status: &str, name: &str) -> Option<String> {
    status
        .lines()
        .find_map(|l| l.strip_prefix(name))
        .map(|v| v.trim().to_string())
}

fn require_single_thread() -> Result<(), String> {
    let status = fs::read_to_string("/proc/self/status").map_err(|e| e.to_string())?;
    match status_field(&status, "Threads:").as_deref() {
        Some("1") => Ok(()),
        other => Err(format!(
            "stage 2 must be single-threaded, found Threads: {other:?}"
        )),
    }
}

/// Mark every fd above stderr close-on-exec, so nothing the agent leaked
/// (an audit socket, a state file) reaches the bundle.
fn close_inherited_fds() -> Result<(), String> {
    let fds: Vec<i32> = fs::read_dir("/proc/self/fd")
        .map_err(|e| e.to_string())?
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    for fd in fds.into_iter().filter(|fd| *fd > 2) {
        match fcntl(fd, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC)) {
            // The directory fd used for listing is already closed.
            Ok(_) | Err(nix::errno::Errno::EBADF) => {}
            Err(e) => return Err(format!("fd {fd}: {e}")),
        }
    }
    Ok(())
}

fn verify_status() -> Result<(), String> {
    let status = fs::read_to_string("/proc/self/status").map_err(|e| e.to_string())?;
    let nnp = status_field(&status, "NoNewPrivs:");
    let seccomp = status_field(&status, "Seccomp:");
    if nnp.as_deref() != Some("1") || seccomp.as_deref() != Some("2") {
        return Err(format!(
            "kernel reports NoNewPrivs {nnp:?}, Seccomp {seccomp:?}; expected 1 and 2"
        ));
    }
    let keep = capabilities::keep_mask();
    for name in ["CapBnd:", "CapPrm:", "CapEff:", "CapInh:", "CapAmb:"] {
        let value = status_field(&status, name)
            .and_then(|v| u64::from_str_radix(&v, 16).ok())
            .ok_or_else(|| format!("no {name} in /proc/self/status"))?;
        if value & !keep != 0 {
            return Err(format!(
                "{name} {value:016x} has capabilities outside the keep-list {keep:016x}"
            ));
        }
    }
    Ok(())
}
