//! `rollguard kill`: the fleet kill switch.

use std::process::ExitCode;

use anyhow::{bail, Result};
use clap::Args;
use rollguard_shared::exit::Exit;
use rollguard_shared::protocol::{
    KillRequest, KillResponse, KillScope, KillState, LiftRequest, RolloutId,
};

use crate::client::{Client, ConnectArgs};

/// Kill running bundles now and refuse new runs until lifted.
#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("what").required(true).args(["all", "rollout", "lift", "status"])))]
pub struct KillArgs {
    /// Every bundle on every agent.
    #[arg(long)]
    pub all: bool,
    /// Only this rollout's bundles (with --lift: lift only this rollout's kill).
    #[arg(long)]
    pub rollout: Option<String>,
    /// Why (recorded in the operator log and shown on every host).
    #[arg(long)]
    pub reason: Option<String>,
    /// End the kill order(s) in force.
    #[arg(long, conflicts_with = "all")]
    pub lift: bool,
    /// Show the kill orders in force.
    #[arg(long, conflicts_with_all = ["all", "lift", "rollout"])]
    pub status: bool,
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub connect: ConnectArgs,
}

fn print_response(r: &KillResponse, json: bool) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(r)?);
        return Ok(());
    }
    print_state(&r.state);
    for id in &r.halted_rollouts {
        println!("halted rollout {id}");
    }
    println!(
        "{} agent(s) confirmed, of {} connected",
        r.agents_acked, r.agents_sent
    );
    if !r.agents_pending.is_empty() {
        println!("NOT confirmed (yet): {}", r.agents_pending.join(", "));
    }
    if r.replicas_silent > 0 {
        println!(
            "{} controller replica(s) did not answer in time: their agents are not counted",
            r.replicas_silent
        );
    }
    for e in &r.halt_errors {
        println!("NOT halted (the kill is in force and was sent all the same): {e}");
    }
    Ok(())
}

fn print_state(s: &KillState) {
    if s.is_empty() {
        println!("no kill order in force");
    }
    if let Some(k) = &s.all {
        println!(
            "FLEET-WIDE KILL in force: {} (by {} at {})",
            k.reason, k.by, k.at
        );
    }
    for k in &s.rollouts {
        println!(
            "kill in force for rollout {}: {} (by {} at {})",
            k.rollout_id, k.order.reason, k.order.by, k.order.at
        );
    }
}

pub fn run(args: KillArgs) -> Result<ExitCode> {
    let rollout = args.rollout.as_deref().map(RolloutId::parse).transpose()?;
    let client = Client::connect(&args.connect)?;
    if args.status {
        let s: KillState = client.get("/v1/kill")?;
        if args.json {
            println!("{}", serde_json::to_string_pretty(&s)?);
        } else {
            print_state(&s);
        }
        return Ok(ExitCode::SUCCESS);
    }
    if args.lift {
        let req = LiftRequest {
            scope: rollout.map(KillScope::Rollout),
        };
        let r: KillResponse = client.post("/v1/kill/lift", &req)?;
        print_response(&r, args.json)?;
        return Ok(ExitCode::SUCCESS);
    }
    let Some(reason) = args.reason.filter(|r| !r.trim().is_empty()) else {
        bail!(
            "a kill needs --reason TEXT (it is shown on every host and kept in the operator log)"
        );
    };
    let scope = match (args.all, rollout) {
        (true, None) => KillScope::All,
        (false, Some(id)) => KillScope::Rollout(id),
        _ => bail!("use either --all or --rollout ID"),
    };
    let r: KillResponse = client.post("/v1/kill", &KillRequest { scope, reason })?;
    print_response(&r, args.json)?;
    Ok(
        if r.agents_pending.is_empty() && r.replicas_silent == 0 && r.halt_errors.is_empty() {
            ExitCode::SUCCESS
        } else {
            Exit::Failed.into()
        },
    )
}
