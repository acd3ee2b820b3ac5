//! `rollguard-controller`: create the fleet CA, enroll and revoke
//! certificates, and serve the controller.
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use rollguard_controller::config::{ControllerConfig, Storage};
use rollguard_controller::pki::{self, CaDir, InitOptions, Role};
use rollguard_controller::store::{verify_audit, Store};
use rollguard_shared::logging::LogFormat;

#[derive(Debug, Parser)]
#[command(
    name = "rollguard-controller",
    version,
    about = "rollguard controller: fleet CA and rollout server"
)]
struct Cli {
    /// Log format on stderr.
    #[arg(long, value_enum, default_value_t = LogFormat::Text, global = true)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum CertRole {
    Agent,
    Operator,
    AlertSource,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Create the CA hierarchy, the server certificate, the first operator
    /// certificate and a commented controller.toml in DIR.
    Init {
        /// The CA directory (`init` creates it).
        #[arg(
            long,
            env = "ROLLGUARD_CONTROLLER_DIR",
            default_value = "/var/lib/rollguard-controller"
        )]
        dir: PathBuf,
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
        /// The CA directory (`init` creates it).
        #[arg(
            long,
            env = "ROLLGUARD_CONTROLLER_DIR",
            default_value = "/var/lib/rollguard-controller"
        )]
        dir: PathBuf,
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
        /// The CA directory (`init` creates it).
        #[arg(
            long,
            env = "ROLLGUARD_CONTROLLER_DIR",
            default_value = "/var/lib/rollguard-controller"
        )]
        dir: PathBuf,
        name: String,
    },
    /// Serve agents and operators.
    Serve {
        #[arg(long, env = "ROLLGUARD_CONTROLLER_CONFIG")]
        config: PathBuf,
    },
    /// The operator audit log.
    #[command(subcommand)]
    Audit(AuditCommand),
}

#[derive(Debug, Subcommand)]
enum AuditCommand {
    /// Check the hash chain of the operator audit log.
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

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Init {
            dir,
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
            println!(
                "keep {} offline once the issuing CAs exist",
                dir.join("ca/root.key").display()
            );
        }
        Command::Enroll {
            dir,
            name,
            role,
            out,
        } => {
            let ca = CaDir::new(&dir);
            let role = match role {
                CertRole::Agent => Role::Agent,
                CertRole::Operator => Role::Operator,
                CertRole::AlertSource => Role::AlertSource,
            };
            let out = out.unwrap_or_else(|| dir.join("enrolled"));
            let (cert, key) = pki::issue_to(&ca, role, &name, &out)?;
            println!("{}", cert.display());
            println!("{}", key.display());
        }
        Command::Revoke { dir, name } => {
            let serials = pki::revoke(&CaDir::new(&dir), &name)?;
            for s in serials {
                println!("revoked {name} serial {s}");
            }
        }
        Command::Serve { config } => {
            rollguard_shared::logging::init(cli.log_format, "info");
            let config = ControllerConfig::load(&config)?;
            runtime()?.block_on(async move {
                let server = rollguard_controller::server::Server::bind(
                    &config,
                    rollguard_controller::bundle::inspect,
                )
                .await?;
                server.run().await?;
                anyhow::Ok(())
            })?;
        }
        Command::Audit(AuditCommand::Verify { config, json }) => {
            let config = ControllerConfig::load(&config)?;
            let entries = runtime()?.block_on(async move {
                let store = match &config.storage {
                    Storage::Sqlite(p) => {
                        rollguard_controller::store::sqlite::SqliteStore::open(p).await?
                    }
                };
                anyhow::Ok(store.audit_entries().await?)
            })?;
            let result = verify_audit(&entries);
            if json {
                println!(
                    "{}",
                    serde_json::json!({ "entries": entries.len(), "ok": result.is_ok(), "first_bad": result.err() })
                );
            } else {
                match result {
                    Ok(()) => println!("audit log intact: {} entries", entries.len()),
                    Err(seq) => println!("audit log BROKEN at entry {seq}"),
                }
            }
            if result.is_err() {
                anyhow::bail!("audit log hash chain is broken");
            }
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}
