//! `rollguard rollout ...` and `rollguard agents`: plan, start and follow
//! rollouts.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use rollguard_shared::protocol::{
    AgentInfo, AgentRemoved, BundleSummary, HaltRequest, Matchers, Plan, ResumeRequest,
    RetryRequest, RetryResponse, RolloutId, RolloutRequest, RolloutState, RolloutStatus, Sha256Hex,
    WavePhase, WaveSize,
};

use crate::client::{Client, ConnectArgs};
use rollguard_shared::targets::HostPattern;
use rollguard_shared::terminal::printable;

#[derive(Debug, Args)]
pub struct WaveArgs {
    /// Cumulative wave sizes: host counts or percentages of the in-scope
    /// hosts, e.g. 1,5%,25%,100%.
    #[arg(long, default_value = "1,5%,25%,100%", value_parser = parse_waves)]
    pub waves: Waves,
    /// How long to watch halt conditions after each wave before the next.
    #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
    pub bake: Duration,
    /// Failed hosts tolerated before the rollout halts.
    #[arg(long, default_value_t = 0)]
    pub max_failures: u32,
    /// Hosts that go first, in this order (comma-separated or repeated).
    #[arg(long = "canary", value_delimiter = ',')]
    pub canaries: Vec<String>,
    /// Alertmanager matchers of the alerts that halt this rollout (and, with
    /// the controller's [alertmanager] set, keep it from starting or going on),
    /// comma-separated: label=value, label!=value, label=~regex, label!~regex
    /// (regexes match whole values; quote values with commas), e.g.
    /// 'severity=critical,service=~"mail|web"' (default: severity=critical).
    #[arg(long, value_parser = parse_halt_on)]
    pub halt_on: Option<Matchers>,
    /// Allow a first wave that is every in-scope host (no canary).
    #[arg(long)]
    pub all_at_once: bool,
    /// Only the bundle's target hosts matching this glob (repeat for
    /// several). Narrows the targets, never widens them; each pattern must
    /// match one of them.
    #[arg(long, value_name = "GLOB", value_parser = HostPattern::parse)]
    pub limit: Vec<HostPattern>,
    /// Leave out the target hosts matching this glob (repeat for several);
    /// each pattern must match one of them.
    #[arg(long, value_name = "GLOB", value_parser = HostPattern::parse)]
    pub exclude: Vec<HostPattern>,
    /// Send to in-scope hosts that are not connected, too. By default they
    /// are left out with a warning: each would only time out and halt the
    /// rollout.
    #[arg(long)]
    pub include_offline: bool,
}

/// Previews: `rollout start --preview`, then `--after-preview ID`.
#[derive(Debug, Args)]
pub struct PreviewArgs {
    /// Run the bundle as a preview on every in-scope host at once: the real
    /// script against an overlay of each host, nothing changed anywhere, no
    /// service action; see the findings with `rollout changes ID`.
    #[arg(long, conflicts_with = "after_preview")]
    pub preview: bool,
    /// Start only if this preview rollout of the same bundle came out clean
    /// on every host of this rollout (no denial, no failure).
    #[arg(long, value_name = "ID")]
    pub after_preview: Option<String>,
    /// Start after an unclean preview anyway; the reason is logged.
    #[arg(long, value_name = "TEXT", requires = "after_preview")]
    pub override_reason: Option<String>,
}

#[derive(Debug, Clone)]
pub struct Waves(pub Vec<WaveSize>);

/// With the arguments, so a bad matcher is refused before the bundle is
/// uploaded.
fn parse_halt_on(raw: &str) -> Result<Matchers, String> {
    Matchers::parse(raw).map_err(|e| e.to_string())
}

fn parse_waves(raw: &str) -> Result<Waves, String> {
    WaveSize::parse_list(raw)
        .map(Waves)
        .map_err(|e| e.to_string())
}

#[derive(Debug, Subcommand)]
pub enum RolloutCommand {
    /// Show which hosts would get the bundle in which wave, its scopes and
    /// signers — the blast radius — without starting anything.
    Plan {
        bundle: PathBuf,
        #[command(flatten)]
        waves: WaveArgs,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        connect: ConnectArgs,
    },
    /// Upload the bundle and start rolling it out in waves (or, with
    /// --preview, run it as a preview on every in-scope host at once).
    Start {
        bundle: PathBuf,
        #[command(flatten)]
        waves: WaveArgs,
        #[command(flatten)]
        preview: PreviewArgs,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        connect: ConnectArgs,
    },
    /// A preview rollout's hosts grouped by identical findings: the
    /// changes each would make, its denials, its failure.
    Changes {
        id: String,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        connect: ConnectArgs,
    },
    /// One rollout's state and every host's result.
    Status {
        id: String,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        connect: ConnectArgs,
    },
    /// Follow a rollout live, wave by wave, until it completes or halts.
    Watch {
        id: String,
        /// Stream events instead, one JSON object per line: the rollout's
        /// and each host's changes, then the end.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        connect: ConnectArgs,
    },
    /// All rollouts.
    List {
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        connect: ConnectArgs,
    },
    /// Stop dispatching a rollout (running bundles finish; use `kill` to stop them).
    Halt {
        id: String,
        #[arg(long)]
        reason: String,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        connect: ConnectArgs,
    },
    /// Continue a halted rollout (failures and alarms so far are acknowledged).
    Resume {
        id: String,
        /// Why it may go on; kept in the operator log.
        #[arg(long)]
        reason: Option<String>,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        connect: ConnectArgs,
    },
    /// Send the same signed bundle again, as a new rollout, to the hosts of
    /// a finished (completed or halted) rollout whose run failed, timed
    /// out, was killed or was interrupted with no denial. Successes,
    /// refusals and denials are never retried; each agent runs the version
    /// again only if its own record says its last run there did not
    /// succeed, at most 3 runs of one version per host.
    Retry {
        id: String,
        /// Retry the hosts whose run failed or timed out (required).
        #[arg(long, required = true)]
        failed: bool,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        connect: ConnectArgs,
    },
}

/// `rollguard agents`: the inventory, or `agents remove NAME`.
#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct AgentsArgs {
    #[command(subcommand)]
    pub command: Option<AgentsCommand>,
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub connect: ConnectArgs,
}

#[derive(Debug, Subcommand)]
pub enum AgentsCommand {
    /// Deregister an agent and revoke the certificate it connected with
    /// (admin): it is refused from its next request on, by every
    /// controller replica. Its rollout history stays.
    Remove {
        name: String,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        connect: ConnectArgs,
    },
}

fn print_json<T: serde::Serialize>(v: &T) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

fn rollout_id(raw: &str) -> Result<RolloutId> {
    Ok(RolloutId::parse(raw)?)
}

fn upload(client: &Client, bundle: &Path) -> Result<BundleSummary> {
    let bytes = std::fs::read(bundle).with_context(|| format!("reading {}", bundle.display()))?;
    let sha = Sha256Hex::of(&bytes);
    client.put_bytes(&format!("/v1/bundles/{sha}"), bytes)
}

fn request(summary: &BundleSummary, w: &WaveArgs) -> Result<RolloutRequest> {
    let halt_on = w.halt_on.clone().unwrap_or_default();
    Ok(RolloutRequest {
        bundle_sha256: summary.sha256.clone(),
        waves: w.waves.0.clone(),
        bake_secs: w.bake.as_secs(),
        max_failures: w.max_failures,
        canaries: w.canaries.clone(),
        halt_on,
        all_at_once: w.all_at_once,
        limit: w.limit.clone(),
        exclude: w.exclude.clone(),
        include_offline: w.include_offline,
        preview: false,
        after_preview: None,
        override_reason: None,
    })
}

/// Strings of a JSON array (paths, patterns), or `network` endpoints.
fn list(v: &serde_json::Value) -> Vec<String> {
    v.as_array()
        .map(|a| {
            a.iter()
                .map(|x| match (x.as_str(), x.get("host"), x.get("port")) {
                    (Some(s), _, _) => s.to_string(),
                    (None, Some(h), Some(p)) => format!("{}:{p}", h.as_str().unwrap_or("?")),
                    _ => x.to_string(),
                })
                .collect()
        })
        .unwrap_or_default()
}

fn print_blast_radius(targets: &serde_json::Value, scope: &serde_json::Value) {
    let labels: Vec<String> = targets["labels"]
        .as_object()
        .map(|m| {
            m.iter()
                .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or("?")))
                .collect()
        })
        .unwrap_or_default();
    let or = |v: Vec<String>, none: &str| {
        if v.is_empty() {
            none.to_string()
        } else {
            v.join(", ")
        }
    };
    println!(
        "targets  hosts {}; labels {}",
        or(list(&targets["hosts"]), "(none)"),
        or(labels, "(any)")
    );
    println!("writes   {}", or(list(&scope["write"]), "nothing"));
    println!("deletes  {}", or(list(&scope["delete"]), "nothing"));
    println!(
        "reads    {}",
        or(list(&scope["read"]), "anything not protected by the host")
    );
    println!("network  {}", or(list(&scope["network"]), "none"));
    let packages = &scope["packages"];
    if packages.is_object() {
        let installs: Vec<String> = packages["install"]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|p| {
                        format!(
                            "{} {}",
                            p["name"].as_str().unwrap_or("?"),
                            p["version"].as_str().unwrap_or("?")
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        println!(
            "packages {} with {}; derived from them (signed):",
            or(installs, "(none)"),
            packages["kind"].as_str().unwrap_or("?")
        );
        println!("  writes   {}", or(list(&packages["write"]), "nothing"));
        println!("  deletes  {}", or(list(&packages["delete"]), "nothing"));
    }
}

fn print_plan(plan: &Plan) {
    println!(
        "bundle   {} version {} ({} bytes, sha256 {})",
        plan.bundle.name, plan.bundle.version, plan.bundle.size, plan.bundle.sha256
    );
    print_blast_radius(&plan.targets, &plan.scope);
    if !plan.services.is_null() {
        let names = |v: &serde_json::Value| {
            let l = list(v);
            if l.is_empty() {
                "(none)".to_string()
            } else {
                l.join(", ")
            }
        };
        println!(
            "services reload {}; restart {}; restart stale {} (by each agent after the run, if its policy allows each unit)",
            names(&plan.services["reload"]),
            names(&plan.services["restart"]),
            if plan.services["restart_stale"].as_bool() == Some(true) { "yes" } else { "no" }
        );
    }
    if plan.signers.is_empty() {
        println!("signers  NONE (every agent will refuse this bundle)");
    } else {
        println!(
            "signers  {} (not verified by the controller: each agent checks its own threshold)",
            plan.signers.join(", ")
        );
    }
    println!(
        "timeout  {}s per host; bake {}s after each wave; halt after {} failure(s)",
        plan.timeout_secs, plan.bake_secs, plan.max_failures
    );
    println!("halt on  firing alerts matching {}", plan.halt_on);
    let total: usize = plan.waves.iter().map(Vec::len).sum();
    println!(
        "hosts    {total} in scope, {} registered agent(s) out of scope",
        plan.out_of_scope
    );
    if !plan.left_out.is_empty() {
        println!(
            "left out {} in-scope host(s) by --limit/--exclude: {}",
            plan.left_out.len(),
            plan.left_out.join(", ")
        );
    }
    if !plan.offline.is_empty() {
        let what = if plan.include_offline {
            "included all the same (--include-offline); each will time out unless it connects"
        } else {
            "left out; pass --include-offline to send to them anyway"
        };
        eprintln!(
            "warning: {} in-scope host(s) offline, {what}: {}",
            plan.offline.len(),
            plan.offline.join(", ")
        );
    }
    for (i, wave) in plan.waves.iter().enumerate() {
        println!(
            "wave {}  ({} host(s)): {}",
            i + 1,
            wave.len(),
            wave.join(", ")
        );
    }
}

fn print_status(s: &RolloutStatus) {
    println!("rollout {}  {}", s.id, state_line(s));
    println!(
        "bundle  {} version {}",
        s.plan.bundle.name, s.plan.bundle.version
    );
    // Host names, reasons and halt reasons quote what hosts reported
    // (paths a bundle chose): printed escaped (see `terminal`).
    if let Some(r) = &s.halt_reason {
        println!("halted  {}", printable(r));
    }
    for (i, wave) in s.plan.waves.iter().enumerate() {
        println!("wave {} ({} host(s))", i + 1, wave.len());
        for h in s.hosts.iter().filter(|h| h.wave as usize == i) {
            let detail = h
                .report
                .as_ref()
                .and_then(|r| r.reason.as_deref())
                .map(|r| format!("  {}", printable(r)))
                .unwrap_or_default();
            println!(
                "  {:<32} {}{}",
                printable(&h.host),
                printable(&h.state),
                detail
            );
        }
    }
}

fn print_retry(a: &RetryResponse) {
    let plan = &a.rollout.plan;
    println!(
        "retrying {} host(s) of rollout {} with the same bundle ({} version {}, sha256 {})",
        a.retried.len(),
        a.retry_of,
        plan.bundle.name,
        plan.bundle.version,
        plan.bundle.sha256
    );
    for (i, wave) in plan.waves.iter().enumerate() {
        println!(
            "wave {}  ({} host(s)): {}",
            i + 1,
            wave.len(),
            wave.join(", ")
        );
    }
    if !a.skipped.is_empty() {
        println!("not retried: {} host(s)", a.skipped.len());
        for s in &a.skipped {
            println!(
                "  {:<32} {:<12} {}",
                printable(&s.host),
                printable(&s.state),
                printable(&s.why)
            );
        }
    }
    println!(
        "each agent runs it again only if its own record says its last run there did not succeed"
    );
    println!("started rollout {}", a.rollout.id);
    println!("follow it with: rollguard rollout watch {}", a.rollout.id);
}

fn state_line(s: &RolloutStatus) -> String {
    match s.state {
        RolloutState::Running => {
            let phase = match s.phase {
                WavePhase::Dispatching => "dispatching",
                WavePhase::Awaiting => "awaiting results",
                WavePhase::Baking => "baking",
            };
            format!(
                "running: wave {}/{} {phase}",
                s.current_wave + 1,
                s.wave_count
            )
        }
        RolloutState::Halted => "HALTED".to_string(),
        RolloutState::Completed => "completed".to_string(),
    }
}

pub fn run(cmd: RolloutCommand) -> Result<ExitCode> {
    match cmd {
        RolloutCommand::Plan {
            bundle,
            waves,
            json,
            connect,
        } => {
            let client = Client::connect(&connect)?;
            let summary = upload(&client, &bundle)?;
            let plan: Plan = client.post("/v1/rollouts/plan", &request(&summary, &waves)?)?;
            if json {
                print_json(&plan)?;
            } else {
                print_plan(&plan);
            }
            Ok(ExitCode::SUCCESS)
        }
        RolloutCommand::Start {
            bundle,
            waves,
            preview,
            json,
            connect,
        } => {
            let after_preview = preview
                .after_preview
                .as_deref()
                .map(rollout_id)
                .transpose()?;
            let client = Client::connect(&connect)?;
            let summary = upload(&client, &bundle)?;
            let req = RolloutRequest {
                preview: preview.preview,
                after_preview,
                override_reason: preview.override_reason,
                ..request(&summary, &waves)?
            };
            let status: RolloutStatus = client.post("/v1/rollouts", &req)?;
            if json {
                print_json(&status)?;
            } else {
                print_plan(&status.plan);
                if status.plan.preview {
                    println!(
                        "started preview rollout {} (nothing changes on any host)",
                        status.id
                    );
                    println!("its findings: rollguard rollout changes {}", status.id);
                } else {
                    println!("started rollout {}", status.id);
                }
                println!("follow it with: rollguard rollout watch {}", status.id);
            }
            Ok(ExitCode::SUCCESS)
        }
        RolloutCommand::Changes { id, json, connect } => {
            let client = Client::connect(&connect)?;
            let status: RolloutStatus =
                client.get(&format!("/v1/rollouts/{}", rollout_id(&id)?))?;
            if !status.plan.preview {
                anyhow::bail!(
                    "{} is not a preview rollout (start one with --preview)",
                    status.id
                );
            }
            let groups = crate::preview_groups::groups(&status);
            if json {
                print_json(&groups)?;
            } else {
                crate::preview_groups::print(&status, &groups);
            }
            // 0: every host clean and reported; 1: not (yet).
            let clean = status.state == RolloutState::Completed && groups.iter().all(|g| g.clean);
            Ok(if clean {
                rollguard_shared::exit::Exit::Success
            } else {
                rollguard_shared::exit::Exit::Failed
            }
            .into())
        }
        RolloutCommand::Status { id, json, connect } => {
            let client = Client::connect(&connect)?;
            let status: RolloutStatus =
                client.get(&format!("/v1/rollouts/{}", rollout_id(&id)?))?;
            if json {
                print_json(&status)?;
            } else {
                print_status(&status);
            }
            Ok(crate::rollout_events::exit_of(&status).into())
        }
        RolloutCommand::Watch { id, json, connect } => {
            let client = Client::connect(&connect)?;
            if json {
                watch_events(&client, &rollout_id(&id)?)
            } else {
                watch(&client, &rollout_id(&id)?)
            }
        }
        RolloutCommand::List { json, connect } => {
            let client = Client::connect(&connect)?;
            let list: Vec<RolloutStatus> = client.get("/v1/rollouts")?;
            if json {
                print_json(&list)?;
            } else {
                for s in &list {
                    println!(
                        "{:<36} {:<24} v{:<6} {}",
                        s.id,
                        s.plan.bundle.name,
                        s.plan.bundle.version,
                        state_line(s)
                    );
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        RolloutCommand::Halt {
            id,
            reason,
            json,
            connect,
        } => {
            let client = Client::connect(&connect)?;
            let status: RolloutStatus = client.post(
                &format!("/v1/rollouts/{}/halt", rollout_id(&id)?),
                &HaltRequest { reason },
            )?;
            if json {
                print_json(&status)?;
            } else {
                println!("rollout {} {}", status.id, state_line(&status));
            }
            Ok(ExitCode::SUCCESS)
        }
        RolloutCommand::Retry {
            id,
            failed,
            json,
            connect,
        } => {
            let client = Client::connect(&connect)?;
            let answer: RetryResponse = client.post(
                &format!("/v1/rollouts/{}/retry", rollout_id(&id)?),
                &RetryRequest { failed },
            )?;
            if json {
                print_json(&answer)?;
            } else {
                print_retry(&answer);
            }
            Ok(ExitCode::SUCCESS)
        }
        RolloutCommand::Resume {
            id,
            reason,
            json,
            connect,
        } => {
            if reason.as_ref().is_some_and(|r| r.trim().is_empty()) {
                anyhow::bail!("--reason is empty: say why the rollout may go on, or leave it out");
            }
            let client = Client::connect(&connect)?;
            let status: RolloutStatus = client.post(
                &format!("/v1/rollouts/{}/resume", rollout_id(&id)?),
                &ResumeRequest { reason },
            )?;
            if json {
                print_json(&status)?;
            } else {
                println!("rollout {} {}", status.id, state_line(&status));
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

pub fn agents(args: AgentsArgs) -> Result<ExitCode> {
    if let Some(AgentsCommand::Remove {
        name,
        json,
        connect,
    }) = args.command
    {
        return remove_agent(&name, json, &connect);
    }
    let client = Client::connect(&args.connect)?;
    let agents: Vec<AgentInfo> = client.get("/v1/agents")?;
    if args.json {
        print_json(&agents)?;
    } else {
        print_agents(&agents);
    }
    Ok(ExitCode::SUCCESS)
}

fn remove_agent(name: &str, json: bool, connect: &ConnectArgs) -> Result<ExitCode> {
    let client = Client::connect(connect)?;
    let removed: AgentRemoved = client.delete(&format!("/v1/agents/{}", agent_name(name)?))?;
    if json {
        print_json(&removed)?;
    } else {
        println!("removed agent {}", removed.name);
        if removed.revoked_serials.is_empty() {
            eprintln!(
                "warning: no certificate of {} is known to the controller (it has not connected since the inventory began); revoke it on the CA host: rollguard-controller revoke {}",
                removed.name, removed.name
            );
        }
        for s in &removed.revoked_serials {
            println!("revoked certificate serial {s}");
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// A host name as it may appear in a URL path (what agent certificates
/// allow), so a name cannot reach another endpoint.
fn agent_name(raw: &str) -> Result<&str> {
    let ok = !raw.is_empty()
        && raw.len() <= 253
        && !raw.starts_with(['-', '.'])
        && raw
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-._".contains(c));
    anyhow::ensure!(ok, "{raw:?} is not an agent name");
    Ok(raw)
}

/// The inventory as a table whose columns fit the longest values.
fn print_agents(agents: &[AgentInfo]) {
    use comfy_table::{presets::NOTHING, Table};
    let mut table = Table::new();
    table.load_preset(NOTHING).set_header(vec![
        "NAME",
        "STATE",
        "FIRST SEEN",
        "LAST SEEN",
        "VERSION",
        "KERNEL",
        "LANDLOCK",
        "CONTROLLER",
        "CERT EXPIRES",
        "LABELS",
    ]);
    let or_dash = |v: Option<&str>| v.unwrap_or("-").to_string();
    for a in agents {
        let labels: Vec<String> = a.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
        table.add_row(vec![
            printable(&a.name),
            if a.connected { "connected" } else { "OFFLINE" }.to_string(),
            or_dash(a.first_seen.as_deref().map(short_time)),
            if a.connected {
                "now".to_string()
            } else {
                or_dash(a.last_seen.as_deref().map(short_time))
            },
            // What the agent reported about itself: escaped.
            printable(&or_dash(a.agent_version.as_deref())),
            printable(&or_dash(a.kernel.as_deref())),
            match (a.landlock_abi, &a.agent_version) {
                (Some(v), _) => format!("ABI {v}"),
                (None, Some(_)) => "none".to_string(),
                (None, None) => "-".to_string(),
            },
            or_dash(a.controller.as_deref()),
            or_dash(a.cert_expires.as_deref().map(short_time)),
            labels.join(","),
        ]);
    }
    println!("{table}");
}

/// An RFC 3339 time to the minute, for a table.
fn short_time(t: &str) -> &str {
    t.get(..16).unwrap_or(t)
}

/// Live progress, one bar per wave (hosts with a result / hosts in the wave).
/// How often `watch` asks the controller.
const WATCH_POLL: Duration = Duration::from_millis(500);

/// `watch --json`: the changes as JSON lines ([`crate::rollout_events`]),
/// each flushed as it is seen, so a pipe reader gets it at once.
fn watch_events(client: &Client, id: &RolloutId) -> Result<ExitCode> {
    use std::io::Write;
    let mut prev: Option<RolloutStatus> = None;
    let mut stdout = std::io::stdout().lock();
    loop {
        let now: RolloutStatus = client.get(&format!("/v1/rollouts/{id}"))?;
        let at = jiff::Timestamp::now().to_string();
        for event in crate::rollout_events::events(prev.as_ref(), &now, &at) {
            writeln!(stdout, "{event}")?;
        }
        stdout.flush()?;
        if now.state != RolloutState::Running {
            return Ok(crate::rollout_events::exit_of(&now).into());
        }
        prev = Some(now);
        std::thread::sleep(WATCH_POLL);
    }
}

fn watch(client: &Client, id: &RolloutId) -> Result<ExitCode> {
    use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
    let first: RolloutStatus = client.get(&format!("/v1/rollouts/{id}"))?;
    let multi = MultiProgress::new();
    let style = ProgressStyle::with_template("{prefix:>8} [{bar:30}] {pos}/{len} {msg}")
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ");
    let bars: Vec<ProgressBar> = first
        .plan
        .waves
        .iter()
        .enumerate()
        .map(|(i, w)| {
            let bar = multi.add(ProgressBar::new(w.len() as u64));
            bar.set_style(style.clone());
            bar.set_prefix(format!("wave {}", i + 1));
            bar
        })
        .collect();
    let header = multi.insert(0, ProgressBar::new_spinner());
    loop {
        let s: RolloutStatus = client.get(&format!("/v1/rollouts/{id}"))?;
        header.set_message(format!(
            "{} {} v{}: {}",
            s.id,
            s.plan.bundle.name,
            s.plan.bundle.version,
            state_line(&s)
        ));
        for (i, bar) in bars.iter().enumerate() {
            let hosts: Vec<_> = s.hosts.iter().filter(|h| h.wave as usize == i).collect();
            let done = hosts
                .iter()
                .filter(|h| h.state != "pending" && h.state != "dispatched")
                .count();
            let bad: Vec<String> = hosts
                .iter()
                .filter(|h| !matches!(h.state.as_str(), "pending" | "dispatched" | "succeeded"))
                .map(|h| printable(&format!("{}={}", h.host, h.state)))
                .collect();
            bar.set_position(done as u64);
            let dispatched = hosts.iter().any(|h| h.state != "pending");
            bar.set_message(if !bad.is_empty() {
                bad.join(" ")
            } else if !dispatched {
                "waiting".to_string()
            } else {
                String::new()
            });
        }
        if s.state != RolloutState::Running {
            header.finish();
            for b in &bars {
                b.abandon();
            }
            match &s.halt_reason {
                Some(r) => eprintln!("rollout {} HALTED: {}", s.id, printable(r)),
                None => eprintln!("rollout {} completed", s.id),
            }
            return Ok(crate::rollout_events::exit_of(&s).into());
        }
        std::thread::sleep(WATCH_POLL);
    }
}
