//! `rollguard ui`: a live web view of the fleet and its rollouts, served on
//! the operator's machine with the operator's certificate.
//!
//! The browser never holds a certificate: it talks plain HTTP to this
//! process on loopback, through the [`gate`] (a one-time link that yields a
//! session secret sent in a header), and this process talks to the
//! controller over mutual TLS. The page, its script and its style are
//! embedded in the binary ([`assets`]): nothing is fetched from elsewhere
//! at run time.

pub mod assets;
pub mod gate;
mod server;
mod upstream;

use std::io::Write;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, Result};
use rollguard_shared::tls_client::Connector;

use crate::client::ConnectArgs;

#[derive(Debug, clap::Args)]
pub struct UiArgs {
    /// Address to serve on. Loopback unless told otherwise: whoever can
    /// reach it with the link acts with your operator certificate.
    #[arg(long, default_value = "127.0.0.1:0")]
    pub listen: SocketAddr,
    /// Print the link as JSON (`{"url": ..., "listen": ...}`) on one line.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub connect: ConnectArgs,
}

pub fn run(args: UiArgs) -> Result<ExitCode> {
    if args.listen.ip().is_unspecified() {
        anyhow::bail!(
            "--listen {}: name one address (the page answers only to the address it is served on); \
             to reach it from another machine, prefer an SSH tunnel to a loopback address: \
             ssh -L PORT:127.0.0.1:PORT",
            args.listen
        );
    }
    let (urls, tls) = args.connect.resolve()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let upstream = upstream::Upstream::new(Connector::new(urls, tls));
        // Fail now, with the controller's words, rather than in the page.
        let first = upstream
            .call(hyper::Method::GET, "/v1/agents", None)
            .await
            .context("is the operator certificate accepted?")?;
        if !first.status.is_success() {
            anyhow::bail!(
                "the controller refused GET /v1/agents ({}): {}",
                first.status,
                String::from_utf8_lossy(&first.body)
            );
        }
        let listener = tokio::net::TcpListener::bind(args.listen)
            .await
            .with_context(|| format!("listening on {}", args.listen))?;
        let addr = listener.local_addr()?;
        if !addr.ip().is_loopback() {
            tracing::warn!(
                %addr,
                "serving the web view beyond this machine over plain HTTP: anyone who can watch this \
                 network sees the link and the session, and acts with your operator certificate"
            );
        } else if addr.port() == args.listen.port() {
            // A fixed port: a page served earlier on it by another program
            // could have left a service worker there.
            tracing::warn!(%addr, "a fixed port: prefer the default, a new free port each time");
        }
        let (gate, token) = gate::Gate::new(addr);
        let url = format!("http://{addr}/?token={token}");
        let mut out = std::io::stdout().lock();
        if args.json {
            writeln!(
                out,
                "{}",
                serde_json::json!({ "url": url, "listen": addr.to_string() })
            )?;
        } else {
            writeln!(
                out,
                "Open this link in a browser (it works once, in one browser):\n\n    {url}\n\nServing until interrupted (Ctrl-C)."
            )?;
        }
        out.flush()?;
        drop(out);
        server::serve(listener, Arc::new(server::Ui::new(gate, upstream))).await;
        Ok(ExitCode::SUCCESS)
    })
}
