//! Scale probe: N simulated agents on loopback, each with its own enrolled
//! certificate and its own mutual-TLS HTTP/2 connection carrying the order
//! stream, all in this one process. They acknowledge kill states like real
//! agents (without running anything), so an operator can measure the
//! controller's memory per connected agent and the kill fan-out:
//!
//! ```text
//! rollguard-controller init --dir /tmp/ctl --listen 127.0.0.1:8443
//! rollguard-controller serve --config /tmp/ctl/controller.toml &
//! cargo run --release -p rollguard-tests --example swarm -- /tmp/ctl https://127.0.0.1:8443 2000
//! grep VmRSS /proc/$(pidof rollguard-controller)/status
//! time rollguard kill --all --reason probe ...   # agents_acked == N?
//! ```

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http2;
use hyper::{Method, Request};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rollguard_controller::pki::{issue, CaDir, Role};
use rollguard_shared::protocol::{KillAck, Order, Register};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};

async fn agent(
    name: String,
    url: String,
    config: Arc<rustls::ClientConfig>,
    connected: Arc<AtomicUsize>,
    acks: Arc<AtomicUsize>,
) -> anyhow::Result<()> {
    let authority = url.trim_start_matches("https://").to_string();
    let tcp = tokio::net::TcpStream::connect(&authority).await?;
    let tls = tokio_rustls::TlsConnector::from(config)
        .connect(ServerName::try_from("127.0.0.1")?.to_owned(), tcp)
        .await?;
    let (mut sender, conn) = http2::handshake(TokioExecutor::new(), TokioIo::new(tls)).await?;
    tokio::spawn(conn);
    let body = serde_json::to_vec(&Register {
        name: name.clone(),
        labels: Default::default(),
        agent_version: "swarm".into(),
        kernel: String::new(),
        landlock_abi: None,
    })?;
    let req = Request::builder()
        .method(Method::POST)
        .uri(format!("{url}/v1/agent/connect"))
        .body(Full::new(Bytes::from(body)))?;
    let resp = sender.send_request(req).await?;
    anyhow::ensure!(resp.status().is_success(), "{name}: {}", resp.status());
    connected.fetch_add(1, Ordering::Relaxed);
    let mut stream = resp.into_body();
    let mut buf = Vec::new();
    while let Some(frame) = stream.frame().await {
        let Ok(data) = frame?.into_data() else {
            continue;
        };
        buf.extend_from_slice(&data);
        while let Some(pos) = buf.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = buf.drain(..=pos).collect();
            if let Ok(Order::KillState(k)) = serde_json::from_slice::<Order>(&line) {
                let ack = serde_json::to_vec(&KillAck {
                    generation: k.generation,
                    killed: 0,
                })?;
                let req = Request::builder()
                    .method(Method::POST)
                    .uri(format!("{url}/v1/agent/kill-ack"))
                    .body(Full::new(Bytes::from(ack)))?;
                let resp = sender.send_request(req).await?;
                if resp.status().is_success() && k.generation > 0 {
                    acks.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let (Some(dir), Some(url), Some(n)) = (args.next(), args.next(), args.next()) else {
        anyhow::bail!("usage: swarm CA_DIR URL AGENTS");
    };
    let n: usize = n.parse()?;
    let ca = CaDir::new(&dir);
    let root = rollguard_controller::tls::load_certs(&ca.root_cert())?;
    let mut configs = Vec::with_capacity(n);
    let started = Instant::now();
    for i in 0..n {
        let name = format!("swarm-{i:05}");
        let (cert, key) = issue(&ca, Role::Agent, &name)?;
        let certs: Vec<_> =
            CertificateDer::pem_slice_iter(cert.as_bytes()).collect::<Result<_, _>>()?;
        let key = PrivateKeyDer::from_pem_slice(key.as_bytes())?;
        let mut roots = rustls::RootCertStore::empty();
        for c in &root {
            roots.add(c.clone())?;
        }
        let mut config =
            rustls::ClientConfig::builder_with_provider(rollguard_controller::tls::provider())
                .with_protocol_versions(&[&rustls::version::TLS13])?
                .with_root_certificates(roots)
                .with_client_auth_cert(certs, key)?;
        config.alpn_protocols = vec![b"h2".to_vec()];
        configs.push((name, Arc::new(config)));
    }
    eprintln!("issued {n} certificates in {:?}", started.elapsed());
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let connected = Arc::new(AtomicUsize::new(0));
        let acks = Arc::new(AtomicUsize::new(0));
        let started = Instant::now();
        for (name, config) in configs {
            let (u, c, a) = (url.clone(), connected.clone(), acks.clone());
            tokio::spawn(async move {
                if let Err(e) = agent(name.clone(), u, config, c, a).await {
                    eprintln!("{name}: {e:#}");
                }
            });
            // Don't SYN-flood the accept queue.
            tokio::task::yield_now().await;
        }
        let mut last = (usize::MAX, usize::MAX);
        loop {
            let now = (
                connected.load(Ordering::Relaxed),
                acks.load(Ordering::Relaxed),
            );
            if now != last {
                eprintln!(
                    "{:>7.1}s connected {} kill acks {}",
                    started.elapsed().as_secs_f64(),
                    now.0,
                    now.1
                );
                last = now;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    })
}
