//! `rollguard-agent`: a thin binary over the `rollguard_agent` library.
#![forbid(unsafe_code)]

use std::path::Path;
use std::process::ExitCode;

use rollguard_agent::cli::{AgentCli, AgentCommand, RunLogCommand};
use rollguard_agent::policy::HostPolicy;
use rollguard_agent::runner::{run_bundle, RunOptions};
use rollguard_agent::sandbox::{KernelSupport, Launcher};
use rollguard_agent::{run_log, state::StateDir};
use rollguard_shared::exit::{self, Exit};
use rollguard_shared::report::{RunReport, RunStatus};
use rollguard_shared::terminal::printable;

fn main() -> ExitCode {
    let cli: AgentCli = exit::parse(rollguard_agent::cli::command());
    rollguard_shared::logging::init(cli.log_format, "warn");
    if matches!(cli.command, AgentCommand::Run(_) | AgentCommand::Serve(_)) {
        // Runs need the resource controllers beside the agent, not above
        // it (cgroup v2); a failure here shows as a refusal of each run
        // that cannot be limited.
        match rollguard_agent::sandbox::cgroup::enter_agent_leaf() {
            Ok(true) => {
                tracing::info!("moved into the cgroup leaf rollguard-agent, so runs can be limited")
            }
            Ok(false) => {}
            Err(e) => tracing::warn!("cannot move into the cgroup leaf rollguard-agent: {e}"),
        }
    }
    let result = match cli.command {
        AgentCommand::Run(args) => run(
            &args.policy.policy,
            &args.bundle,
            args.json,
            args.preview,
            args.retry,
        ),
        AgentCommand::Check(args) => check(&args.policy.policy, args.json),
        AgentCommand::Log(RunLogCommand::Verify { policy, json }) => {
            run_log_verify(&policy.policy, json)
        }
        AgentCommand::Serve(args) => rollguard_agent::daemon::serve_policy(
            &args.policy.policy,
            &rollguard_agent::daemon::DaemonOptions {
                socket: args.socket,
            },
        )
        .map(|()| ExitCode::SUCCESS),
        AgentCommand::Kill(args) => local_kill(args),
        AgentCommand::Enroll(args) => enroll(args),
    };
    match result {
        Ok(code) => code,
        Err(e) => exit::error(&e),
    }
}

fn load_policy(path: &Path) -> anyhow::Result<HostPolicy> {
    HostPolicy::load(path).map_err(|e| anyhow::anyhow!("policy {}: {e}", path.display()))
}

fn run(
    policy: &Path,
    bundle: &Path,
    json: bool,
    preview: bool,
    retry: bool,
) -> anyhow::Result<ExitCode> {
    let policy = load_policy(policy)?;
    let opts = RunOptions {
        preview,
        retry,
        ..RunOptions::current()?
    };
    let report = run_bundle(&policy, bundle, &opts);
    if json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print_report(&report);
    }
    Ok(match report.status {
        RunStatus::Succeeded if !report.is_alert() => Exit::Success,
        RunStatus::Refused => Exit::Refused,
        _ => Exit::Failed,
    }
    .into())
}

/// The human-readable report. Everything a bundle can influence (its
/// output, the paths it touched, reasons quoting them) is printed through
/// [`printable`], so no escape sequence in it can move the cursor over the
/// DENIED block or rewrite it.
fn print_report(r: &RunReport) {
    let bundle = r
        .bundle
        .as_ref()
        .map(|b| format!("{} v{}", b.name, b.version))
        .unwrap_or_else(|| "bundle".into());
    let status = serde_json::to_value(r.status)
        .ok()
        .and_then(|v| v.as_str().map(str::to_uppercase))
        .unwrap_or_default();
    println!(
        "{} on {}: {status} ({} ms)",
        printable(&bundle),
        printable(&r.host),
        r.duration_ms
    );
    if let Some(reason) = &r.reason {
        println!("  reason: {}", printable(reason));
    }
    if let Some(code) = r.exit_code {
        println!("  exit code: {code}");
    }
    if !r.signers.is_empty() {
        println!("  signed by: {}", printable(&r.signers.join(", ")));
    }
    match &r.denials {
        None => println!(
            "  denials: UNKNOWN (this host cannot observe every denial: kernel audit, Landlock or seccomp logging is missing)"
        ),
        Some(d) if d.is_empty() => println!("  denials: none"),
        Some(d) => {
            println!(
                "  DENIED ({} in total): the bundle attempted accesses outside its scope",
                r.denial_count.unwrap_or(d.len() as u64)
            );
            for denial in d {
                println!(
                    "    {} {}",
                    printable(&denial.access),
                    printable(denial.path.as_deref().unwrap_or(""))
                );
            }
        }
    }
    for c in &r.packages {
        println!("  package: {}", printable(&c.summary()));
    }
    if !r.triggers_pending.is_empty() {
        println!(
            "  triggers pending (not run; apt runs them at its end, or dpkg --triggers-only --pending): {}",
            printable(&r.triggers_pending.join(", "))
        );
    }
    for s in &r.services {
        let verb = if s.result == rollguard_shared::services::ServiceOutcome::PREVIEW {
            "would"
        } else {
            "performed:"
        };
        println!(
            "  service: {verb} {} {} ({})",
            s.action.as_str(),
            printable(s.unit.as_str()),
            printable(&s.result)
        );
    }
    if let Some(p) = &r.preview {
        print_preview(p);
    }
    for (name, text) in [("stdout", &r.stdout_tail), ("stderr", &r.stderr_tail)] {
        if !text.is_empty() {
            println!("  {name} (tail):");
            for line in text.lines() {
                println!("    | {}", printable(line));
            }
        }
    }
}

/// A preview's changes: one line each, small text diffs beneath.
fn print_preview(p: &rollguard_shared::report::Preview) {
    use rollguard_shared::report::FileMeta;
    let meta = |m: &FileMeta| format!("{:o} {}:{} {} B", m.mode, m.uid, m.gid, m.size);
    println!(
        "  PREVIEW: nothing was changed on this host; the run would change {} path(s){}:",
        p.changes.len() as u64 + p.changes_dropped,
        if p.complete {
            ""
        } else {
            " (INCOMPLETE: see the reason)"
        }
    );
    for c in &p.changes {
        let detail = match (&c.before, &c.after) {
            (Some(b), Some(a)) => format!("{} -> {}", meta(b), meta(a)),
            (None, Some(a)) => meta(a),
            (Some(b), None) => format!("was {}", meta(b)),
            (None, None) => String::new(),
        };
        println!(
            "    {:<6} {} ({detail})",
            c.change.as_str(),
            printable(&c.path)
        );
        if let Some(diff) = &c.diff {
            for line in diff.lines() {
                println!("      {}", printable(line));
            }
        }
    }
    if p.changes_dropped > 0 {
        println!("    ... and {} more", p.changes_dropped);
    }
}

fn check(policy_path: &Path, json: bool) -> anyhow::Result<ExitCode> {
    let kernel = KernelSupport::probe();
    let policy = HostPolicy::load(policy_path);
    let kernel_ok = kernel.require(false);
    let state = policy.as_ref().ok().map(|p| StateDir::open(p.state_dir()));
    // The program every run is confined by, as a run would find it.
    let stage2 = Launcher::current();
    let ok = policy.is_ok() && kernel_ok.is_ok() && matches!(state, Some(Ok(_))) && stage2.is_ok();
    if json {
        let v = serde_json::json!({
            "ok": ok,
            "policy": policy_path,
            "policy_error": policy.as_ref().err().map(|e| e.to_string()),
            "host": policy.as_ref().ok().map(|p| p.identity()),
            "state_error": state.as_ref().and_then(|s| s.as_ref().err()).map(|e| e.to_string()),
            "kernel": kernel,
            "kernel_error": kernel_ok.as_ref().err().map(|e| e.to_string()),
            "stage2_program": stage2.as_ref().ok().map(|l| l.stage2_exe()),
            "stage2_error": stage2.as_ref().err().map(|e| e.to_string()),
        });
        println!("{v}");
    } else {
        match &policy {
            Ok(p) => {
                let id = p.identity();
                println!(
                    "policy {}: ok (host {}, {} protected paths)",
                    policy_path.display(),
                    id.name,
                    p.protected().len()
                );
            }
            Err(e) => println!("policy {}: ERROR: {e}", policy_path.display()),
        }
        if let Some(Err(e)) = &state {
            println!("state directory: ERROR: {e}");
        }
        match &stage2 {
            Ok(l) => println!("sandbox program {}: ok", l.stage2_exe().display()),
            Err(e) => println!("sandbox program: ERROR: {e}"),
        }
        println!("kernel {}:", kernel.kernel_release);
        println!(
            "  landlock ABI      {}",
            kernel
                .landlock_abi
                .map(|v| v.to_string())
                .unwrap_or_else(|| "unavailable".into())
        );
        println!("  seccomp filters   {}", yes(kernel.seccomp_filter));
        // Without it the sandbox still works, but refused syscalls leave no
        // record and every report's denials are unknown.
        println!(
            "  seccomp logging   {}{}",
            yes(kernel.seccomp_errno_logged),
            if kernel.seccomp_errno_logged {
                ""
            } else {
                " (add errno to /proc/sys/kernel/seccomp/actions_logged, or denials are unknown)"
            }
        );
        println!("  cgroup v2 + kill  {}", yes(kernel.cgroup_kill));
        println!("  audit sessions    {}", yes(kernel.audit_sessions));
        println!("  cgroup BPF        {}", yes(kernel.cgroup_bpf));
        match &kernel_ok {
            Ok(()) => println!("  => bundles can be confined"),
            Err(e) => println!("  => REFUSING to run bundles: {e}"),
        }
    }
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        Exit::Failed.into()
    })
}

fn yes(b: bool) -> &'static str {
    if b {
        "yes"
    } else {
        "NO"
    }
}

fn run_log_verify(policy: &Path, json: bool) -> anyhow::Result<ExitCode> {
    let policy = load_policy(policy)?;
    let state = StateDir::open(policy.state_dir())?;
    let log = run_log::RunLog::new(&state);
    match run_log::verify(log.path()) {
        Ok(report) => {
            if json {
                println!(
                    "{}",
                    serde_json::json!({"ok": true, "entries": report.entries, "head": report.head})
                );
            } else {
                println!(
                    "run log {}: {} entries, chain intact",
                    log.path().display(),
                    report.entries
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            if json {
                println!(
                    "{}",
                    serde_json::json!({"ok": false, "error": e.to_string()})
                );
            } else {
                println!("run log {}: TAMPERED OR DAMAGED: {e}", log.path().display());
            }
            Ok(Exit::Failed.into())
        }
    }
}

/// `rollguard-agent enroll`: see `rollguard_agent::enroll`.
fn enroll(args: rollguard_agent::cli::EnrollArgs) -> anyhow::Result<ExitCode> {
    use rollguard_agent::enroll::{enroll, EnrollOptions};
    let out = enroll(&EnrollOptions {
        url: args.url,
        ca_fingerprint: args.ca_fingerprint,
        token: args.token,
        name: args.name.clone(),
        dir: args.dir,
        force: args.force,
    })?;
    if args.json {
        println!("{}", serde_json::to_string(&out)?);
    } else {
        println!("enrolled {}: the key never left this host", args.name);
        println!("  key:         {}", out.key.display());
        println!("  certificate: {}", out.cert.display());
        println!("  fleet CA:    {}", out.ca.display());
        println!("the host policy's [controller] section (url: the controller's main address, not the enrollment one):");
        println!("[controller]");
        println!("url = \"https://CONTROLLER:8443\"");
        println!("ca = {:?}", out.ca);
        println!("cert = {:?}", out.cert);
        println!("key = {:?}", out.key);
    }
    Ok(ExitCode::SUCCESS)
}

/// `rollguard-agent kill`: ask the running daemon over its local socket.
fn local_kill(args: rollguard_agent::cli::LocalKillArgs) -> anyhow::Result<ExitCode> {
    use rollguard_agent::daemon::local::{request, LocalError, LocalRequest};
    let req = match (args.reason, args.lift) {
        (_, true) => LocalRequest::Lift,
        (Some(reason), false) if !reason.trim().is_empty() => LocalRequest::Kill { reason },
        (Some(_), false) => anyhow::bail!("--reason must not be empty"),
        (None, false) => LocalRequest::Status,
    };
    let resp = match request(&args.socket, &req) {
        Ok(resp) => resp,
        // No daemon: the same request on the state directory's files, so
        // the kill switch works whatever state the daemon is in.
        Err(LocalError::Connect { path, error })
            if matches!(
                error.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
            ) =>
        {
            let policy = rollguard_agent::policy::HostPolicy::load(&args.policy)?;
            tracing::warn!(socket = %path.display(), %error, state = %policy.state_dir().display(), "no agent daemon answers; acting on the state directory's kill switch directly");
            rollguard_agent::kill_switch::offline::request(policy.state_dir(), &req)?
        }
        Err(e) => return Err(e.into()),
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&resp)?);
    } else {
        if let Some(e) = &resp.error {
            eprintln!("error: {e}");
        }
        if matches!(req, LocalRequest::Kill { .. }) {
            println!("killed {} running bundle(s); new runs are refused until `rollguard-agent kill --lift`", resp.killed);
        }
        match (&resp.kill.local, &resp.kill.fleet.all) {
            (None, None) if resp.kill.fleet.rollouts.is_empty() => {
                println!("no kill order in force")
            }
            _ => {}
        }
        if let Some(k) = &resp.kill.local {
            println!("local kill in force: {} (at {})", k.reason, k.at);
        }
        if let Some(k) = &resp.kill.fleet.all {
            println!(
                "fleet-wide kill in force: {} (by {} at {})",
                k.reason, k.by, k.at
            );
        }
        for k in &resp.kill.fleet.rollouts {
            println!(
                "kill in force for rollout {}: {}",
                k.rollout_id, k.order.reason
            );
        }
        if !resp.running.is_empty() {
            println!("running: {}", resp.running.join(", "));
        }
    }
    Ok(if resp.ok {
        ExitCode::SUCCESS
    } else {
        Exit::Error.into()
    })
}
