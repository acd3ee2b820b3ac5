//! The `rollguard-controller` command line: create the fleet CA, enroll and
//! revoke certificates, serve the controller, verify the operator log.
//!
//! Kept in the library (the binary is one line) so packaging generates the
//! man page and completions from these very definitions and checks the
//! systemd unit's command line against them.

use std::path::PathBuf;
use std::process::ExitCode;

use crate::config::ControllerConfig;
use crate::pki::{self, CaDir, InitOptions, Role};
use crate::store::verify_operator_log;
use anyhow::{Context, Result};
use clap::{Args, CommandFactory, Parser, Subcommand, ValueEnum};
use rollguard_shared::exit;
use rollguard_shared::logging::LogFormat;

#[derive(Debug, Parser)]
#[command(
    name = "rollguard-controller",
    version,
    about = "rollguard controller: fleet CA and rollout server"
)]
pub struct ControllerCli {
    /// Log format on stderr.
    #[arg(long, value_enum, default_value_t = LogFormat::Text, global = true)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: ControllerCommand,
}

/// The role a certificate is enrolled for (see `pki::Role`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum CertRole {
    /// A host's agent.
    Agent,
    /// A person or script that may read only.
    Viewer,
    /// May plan, start, halt, resume and kill.
    Operator,
    /// May do what an operator may, and lift kills.
    Admin,
    /// Alertmanager: may post alerts and read metrics.
    AlertSource,
}

/// `--dir`: where the fleet CA lives (the same for init, enroll, revoke).
#[derive(Debug, Args)]
pub struct CaDirArg {
    /// The CA directory (`init` creates it).
    #[arg(
        long,
        env = "ROLLGUARD_CONTROLLER_DIR",
        default_value = "/var/lib/rollguard-controller"
    )]
    dir: PathBuf,
}

#[derive(Debug, Subcommand)]
pub enum ControllerCommand {
    /// Create the CA hierarchy, the server certificate, the first operator
    /// certificate and a commented controller.toml in DIR.
    Init {
        #[command(flatten)]
        ca: CaDirArg,
        /// Print the result as one JSON object.
        #[arg(long)]
        json: bool,
        /// Extra DNS name or IP address of the controller (repeatable).
        #[arg(long = "san")]
        sans: Vec<String>,
        /// Address the server will listen on.
        #[arg(long, default_value = "127.0.0.1:8443")]
        listen: String,
        /// Name of the first operator certificate.
        #[arg(long, default_value = "admin")]
        operator: String,
    },
    /// Issue a certificate and key: for an agent (CN = SAN = host name) by
    /// default, or an operator or an alert source (e.g. Alertmanager).
    Enroll {
        #[command(flatten)]
        ca: CaDirArg,
        /// Print the result as one JSON object.
        #[arg(long)]
        json: bool,
        /// Host name (agents) or person/service name.
        name: String,
        #[arg(long, value_enum, default_value_t = CertRole::Agent)]
        role: CertRole,
        /// Where to write NAME.crt and NAME.key (default DIR/enrolled).
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Revoke every certificate issued to NAME; the running controller
    /// refuses them from its next request on.
    Revoke {
        #[command(flatten)]
        ca: CaDirArg,
        /// Also record the revocation in this controller's database, so
        /// every replica sharing it refuses the certificates within a
        /// second (each replica's own revoked.list is not shared).
        #[arg(long, env = "ROLLGUARD_CONTROLLER_CONFIG")]
        config: Option<PathBuf>,
        /// Print the result as one JSON object.
        #[arg(long)]
        json: bool,
        name: String,
    },
    /// Serve agents and operators.
    Serve {
        #[arg(long, env = "ROLLGUARD_CONTROLLER_CONFIG")]
        config: PathBuf,
    },
    /// The hash-chained operator log: every operator action and every
    /// automatic halt. (`audit` is the name it had before; kept as an
    /// alias so existing scripts still work.)
    #[command(subcommand, alias = "audit")]
    Log(OperatorLogCommand),
    /// One-time enrollment tokens: a host with one generates its own key
    /// and gets its certificate from the enrollment listener
    /// (`rollguard-agent enroll`).
    #[command(subcommand)]
    Token(TokenCommand),
}

#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Create a token for host NAME, usable once before it expires; it is
    /// printed once and only its hash is stored (in the configuration's
    /// database, which every replica shares).
    Create {
        #[arg(long, env = "ROLLGUARD_CONTROLLER_CONFIG")]
        config: PathBuf,
        /// The host's name: its certificate's name.
        #[arg(long)]
        host: String,
        /// How long the token may be used (at most 30d).
        #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
        ttl: std::time::Duration,
        /// Print the result as one JSON object.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum OperatorLogCommand {
    /// Check the hash chain of the operator log.
    Verify {
        #[arg(long, env = "ROLLGUARD_CONTROLLER_CONFIG")]
        config: PathBuf,
        #[arg(long)]
        json: bool,
    },
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}

/// Carry out one parsed command line.
pub fn run(cli: ControllerCli) -> Result<()> {
    match cli.command {
        ControllerCommand::Init {
            ca: CaDirArg { dir },
            json,
            sans,
            listen,
            operator,
        } => {
            let ca = CaDir::new(&dir);
            pki::init(
                &ca,
                &InitOptions {
                    extra_sans: sans,
                    listen,
                    operator_name: operator,
                },
            )?;
            let root_key = dir.join("ca/root.key");
            let fingerprint = pki::fingerprint_of_pem(&dir.join("ca.crt"))?;
            if json {
                println!(
                    "{}",
                    serde_json::json!({
                        "dir": dir,
                        "ca": dir.join("ca.crt"),
                        "operator_cert": ca.operator_cert(),
                        "operator_key": ca.operator_key(),
                        "config": ca.config(),
                        "root_key": root_key,
                        "ca_fingerprint": fingerprint,
                    })
                );
            } else {
                println!("created the fleet CA in {}", dir.display());
                println!(
                    "  agents and operators trust: {}",
                    dir.join("ca.crt").display()
                );
                println!(
                    "  operator certificate:      {} / {}",
                    ca.operator_cert().display(),
                    ca.operator_key().display()
                );
                println!("  server configuration:      {}", ca.config().display());
                println!("  CA fingerprint (for `rollguard-agent enroll --ca-fingerprint`): {fingerprint}");
                println!(
                    "keep {} offline once the issuing CAs exist",
                    root_key.display()
                );
            }
        }
        ControllerCommand::Enroll {
            ca: CaDirArg { dir },
            json,
            name,
            role,
            out,
        } => {
            let ca = CaDir::new(&dir);
            let role = match role {
                CertRole::Agent => Role::Agent,
                CertRole::Viewer => Role::Viewer,
                CertRole::Operator => Role::Operator,
                CertRole::Admin => Role::Admin,
                CertRole::AlertSource => Role::AlertSource,
            };
            let out = out.unwrap_or_else(|| dir.join("enrolled"));
            let (cert, key) = pki::issue_to(&ca, role, &name, &out)?;
            if json {
                println!(
                    "{}",
                    serde_json::json!({ "name": name, "cert": cert, "key": key })
                );
            } else {
                println!("{}", cert.display());
                println!("{}", key.display());
            }
        }
        ControllerCommand::Revoke {
            ca: CaDirArg { dir },
            config,
            json,
            name,
        } => {
            // Certificates issued from the CA directory, and (with
            // --config) those a serving controller issued for signing
            // requests, which only its database records. Without
            // --config, the CA directory's own controller.toml when it
            // enables enrollment: renewed certificates are only there.
            let config = config.or_else(|| {
                let own = CaDir::new(&dir).config();
                ControllerConfig::load(&own)
                    .ok()
                    .filter(|c| c.enrollment.is_some())
                    .map(|_| own)
            });
            if config.is_none() {
                eprintln!(
                    "note: certificates a serving controller issued itself (token enrollment, renewals) are recorded only in its database: pass --config to revoke those too"
                );
            }
            // With the database to revoke in too, a CA directory that
            // fails (an unreadable revoked.list) does not hold that back:
            // its error is returned once the database's revocations are in.
            let mut file_error = None;
            let mut serials = match pki::revoke(&CaDir::new(&dir), &name) {
                Ok(s) => s,
                Err(pki::PkiError::UnknownHost(..)) if config.is_some() => Vec::new(),
                Err(e) if config.is_some() => {
                    file_error = Some(e);
                    Vec::new()
                }
                Err(e) => return Err(e.into()),
            };
            if let Some(config) = config {
                let config = ControllerConfig::load(&config)?;
                let local = serials.clone();
                let name2 = name.clone();
                let issued = runtime()?.block_on(async move {
                    let store = crate::store::open(&config.storage).await?.store;
                    let mut all = local;
                    for s in store.issued_serials(&name2).await? {
                        if !all.contains(&s) {
                            all.push(s);
                        }
                    }
                    if all.is_empty() {
                        anyhow::bail!("no certificate was issued to {name2:?}");
                    }
                    store.add_revocations(&name2, &all).await?;
                    // A renewal signed meanwhile recorded its serial before
                    // checking its caller, who was not revoked yet: read
                    // again now (as `agents remove` does), or it escapes.
                    let late: Vec<String> = store
                        .issued_serials(&name2)
                        .await?
                        .into_iter()
                        .filter(|s| !all.contains(s))
                        .collect();
                    if !late.is_empty() {
                        store.add_revocations(&name2, &late).await?;
                        all.extend(late);
                    }
                    anyhow::Ok(all)
                });
                serials = match (issued, file_error.take()) {
                    (Ok(s), None) => s,
                    (Ok(s), Some(e)) => {
                        return Err(anyhow::Error::new(e).context(format!(
                            "revoked in the database ({}), but the CA directory's revoked.list was not updated",
                            s.join(", ")
                        )))
                    }
                    (Err(db), Some(e)) => {
                        return Err(anyhow::Error::new(e)
                            .context(format!("nothing revoked; the database: {db:#}")))
                    }
                    (Err(db), None) => return Err(db),
                };
            }
            if json {
                println!(
                    "{}",
                    serde_json::json!({ "name": name, "revoked_serials": serials })
                );
            } else {
                for s in serials {
                    println!("revoked {name} serial {s}");
                }
            }
        }
        ControllerCommand::Serve { config } => {
            rollguard_shared::logging::init(cli.log_format, "info");
            let config = ControllerConfig::load(&config)?;
            runtime()?.block_on(async move {
                let server = crate::server::Server::bind(&config, crate::bundle::inspect).await?;
                // Listening and the store open: ready (Type=notify units
                // start dependants only now). Outside systemd this does
                // nothing; failing to notify is not a reason to stop serving.
                if let Err(e) = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]) {
                    tracing::warn!(error = %e, "could not notify the service manager");
                }
                server.run().await?;
                anyhow::Ok(())
            })?;
        }
        ControllerCommand::Token(TokenCommand::Create {
            config,
            host,
            ttl,
            json,
        }) => {
            let config = ControllerConfig::load(&config)?;
            let host2 = host.clone();
            let (token, expires) = runtime()?.block_on(async move {
                let store = crate::store::open(&config.storage).await?.store;
                anyhow::Ok(crate::enroll::create_token(store.as_ref(), &host2, ttl).await?)
            })?;
            let expires = crate::store::rfc3339(expires);
            if json {
                println!(
                    "{}",
                    serde_json::json!({ "host": host, "token": token, "expires_at": expires })
                );
            } else {
                println!("{token}");
                eprintln!("one-time enrollment token for {host}, valid until {expires}");
            }
        }
        ControllerCommand::Log(OperatorLogCommand::Verify { config, json }) => {
            let config = ControllerConfig::load(&config)?;
            let entries = runtime()?.block_on(async move {
                let store = crate::store::open(&config.storage).await?.store;
                anyhow::Ok(store.operator_log_entries().await?)
            })?;
            let result = verify_operator_log(&entries);
            if json {
                println!(
                    "{}",
                    serde_json::json!({ "entries": entries.len(), "ok": result.is_ok(), "first_bad": result.err() })
                );
            } else {
                match result {
                    Ok(()) => println!("operator log intact: {} entries", entries.len()),
                    Err(seq) => println!("operator log BROKEN at entry {seq}"),
                }
            }
            if result.is_err() {
                anyhow::bail!("operator log hash chain is broken");
            }
        }
    }
    Ok(())
}

/// The clap command of `rollguard-controller`, for man pages and completions.
pub fn command() -> clap::Command {
    exit::document(ControllerCli::command())
}

/// `rollguard-controller`'s `main`: parse, run, print the error chain, exit
/// with [`exit::Exit::Error`] on failure.
pub fn main() -> ExitCode {
    let cli: ControllerCli = exit::parse(command());
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => exit::error(&e),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn cli_definition_is_consistent() {
        super::command().debug_assert();
    }
}
