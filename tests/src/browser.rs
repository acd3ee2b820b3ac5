//! A real headless Chromium for tests of the web view: Debian's `chromium`
//! driven over WebDriver by its `chromedriver`, through `fantoccini`.
//!
//! The tests are plain `#[test]` fns, so [`Browser`] owns its own tokio
//! runtime and offers blocking helpers that panic (with context) on failure.

use std::future::Future;
use std::io::Read;
use std::net::{TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fantoccini::{Client, ClientBuilder, Locator};
use hyper_util::client::legacy::connect::HttpConnector;
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use serde_json::{json, Value};

const CHROMIUM: &str = "/usr/bin/chromium";
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
/// Generous: a loaded CI machine may take seconds to start Chromium or to
/// render a page.
const TIMEOUT: Duration = Duration::from_secs(60);

/// One chromedriver with one Chromium session; both go away on drop.
pub struct Browser {
    /// `Option` so that `Drop` can take it to close the session.
    client: Option<Client>,
    /// fantoccini's session task runs on it, i.e. only inside `block_on`.
    rt: tokio::runtime::Runtime,
    driver: Child,
    /// TMPDIR of chromedriver and Chromium, so that their profile (~2 MB)
    /// and sockets go away with it even when they are killed; it also holds
    /// their stdout and stderr (`chromedriver.log`), for panic messages.
    tmp: tempfile::TempDir,
}

impl Browser {
    /// Start chromedriver on a free loopback port and open a session.
    pub fn start() -> Browser {
        for path in [CHROMIUM, CHROMEDRIVER] {
            assert!(
                Path::new(path).exists(),
                "{path} is missing: run scripts/install-deps (Debian's chromium and chromium-driver)"
            );
        }
        // The port may be taken again between this drop and chromedriver's
        // bind; unlikely enough on loopback, and the wait below would say so.
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free loopback port")
            .port();
        let tmp = tempfile::tempdir().expect("temporary directory");
        let log = std::fs::File::create(tmp.path().join("chromedriver.log")).expect("log file");
        let out = || Stdio::from(log.try_clone().expect("log file"));
        let driver = Command::new(CHROMEDRIVER)
            .arg(format!("--port={port}"))
            // Its own process group, so that Drop can kill Chromium (and its
            // zygote, renderers, ...) too if chromedriver could not.
            .process_group(0)
            .env("TMPDIR", tmp.path())
            .stdin(Stdio::null())
            .stdout(out())
            .stderr(out())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {CHROMEDRIVER}: {e}"));

        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("tokio runtime");
        let mut browser = Browser {
            client: None,
            rt,
            driver,
            tmp,
        };

        let deadline = Instant::now() + TIMEOUT;
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Ok(Some(status)) = browser.driver.try_wait() {
                panic!("chromedriver exited ({status}):\n{}", browser.log_tail());
            }
            assert!(
                Instant::now() < deadline,
                "chromedriver not listening on {port}:\n{}",
                browser.log_tail()
            );
            std::thread::sleep(Duration::from_millis(20));
        }

        let mut caps = serde_json::Map::new();
        caps.insert(
            "goog:chromeOptions".into(),
            json!({
                "binary": CHROMIUM,
                "args": [
                    "--headless=new",
                    // We run as root, where Chromium refuses its sandbox.
                    "--no-sandbox",
                    "--disable-gpu",
                    // /dev/shm is tiny in containers (64 MB in Docker's default).
                    "--disable-dev-shm-usage",
                    "--window-size=1280,1000",
                ],
            }),
        );
        let url = format!("http://127.0.0.1:{port}");
        let mut builder = ClientBuilder::new(HttpConnector::new());
        builder.capabilities(caps);
        let client = browser
            .rt
            .block_on(builder.connect(&url))
            .unwrap_or_else(|e| panic!("WebDriver session: {e}\n{}", browser.log_tail()));
        browser.client = Some(client);
        browser
    }

    /// The fantoccini client, for what the helpers below don't cover (with
    /// [`Browser::block_on`]).
    pub fn client(&self) -> &Client {
        self.client.as_ref().expect("session is open")
    }

    /// Run a future (e.g. on [`Browser::client`]) to completion.
    pub fn block_on<F: Future>(&self, future: F) -> F::Output {
        self.rt.block_on(future)
    }

    #[track_caller]
    pub fn goto(&self, url: &str) {
        self.block_on(self.client().goto(url))
            .unwrap_or_else(|e| panic!("goto {url}: {e}"));
    }

    #[track_caller]
    pub fn current_url(&self) -> String {
        self.block_on(self.client().current_url())
            .expect("current url")
            .to_string()
    }

    /// The rendered (visible) text of the first element matching `css`.
    #[track_caller]
    pub fn text_of(&self, css: &str) -> String {
        self.block_on(async { self.client().find(Locator::Css(css)).await?.text().await })
            .unwrap_or_else(|e| panic!("text of {css}: {e}"))
    }

    #[track_caller]
    pub fn click(&self, css: &str) {
        self.block_on(async { self.client().find(Locator::Css(css)).await?.click().await })
            .unwrap_or_else(|e| panic!("click {css}: {e}"));
    }

    /// Replace the value of the input matching `css` by typing `text`.
    #[track_caller]
    pub fn fill(&self, css: &str, text: &str) {
        self.block_on(async {
            let input = self.client().find(Locator::Css(css)).await?;
            input.clear().await?;
            input.send_keys(text).await
        })
        .unwrap_or_else(|e| panic!("fill {css}: {e}"));
    }

    /// Wait until the text of `css` contains `needle` (the page updates
    /// itself: polling, fetches). `what` says what is awaited, for the panic.
    #[track_caller]
    pub fn wait_for_text(&self, css: &str, needle: &str, what: &str) {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            // The element may not exist yet: that's a "not yet", not an error.
            let text =
                self.block_on(async { self.client().find(Locator::Css(css)).await?.text().await });
            let last = match text {
                Ok(text) if text.contains(needle) => return,
                Ok(text) => text,
                Err(e) => format!("<{e}>"),
            };
            if Instant::now() > deadline {
                let source = self.source();
                let tail = tail(&source);
                panic!(
                    "timed out after {TIMEOUT:?} waiting for {what}: {css} never contained {needle:?}; \
                     last text: {last:?}\npage source (tail):\n{tail}"
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Run `js` as a function body in the page (`return` gives the value).
    #[track_caller]
    pub fn eval(&self, js: &str) -> Value {
        self.block_on(self.client().execute(js, vec![]))
            .unwrap_or_else(|e| panic!("eval {js}: {e}"))
    }

    /// Save a PNG of the viewport, e.g. for a human to look at after a run.
    #[track_caller]
    pub fn screenshot(&self, path: &Path) {
        let png = self
            .block_on(self.client().screenshot())
            .expect("screenshot");
        std::fs::write(path, png).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    }

    /// The page's current DOM, serialized.
    #[track_caller]
    pub fn source(&self) -> String {
        self.block_on(self.client().source()).expect("page source")
    }

    fn log_tail(&self) -> String {
        let mut log = String::new();
        let _ = std::fs::File::open(self.tmp.path().join("chromedriver.log"))
            .and_then(|mut f| f.read_to_string(&mut log));
        tail(&log).to_string()
    }
}

/// The last few KB of `s` (a page source, a log), for panic messages.
fn tail(s: &str) -> &str {
    let mut start = s.len().saturating_sub(3000);
    while !s.is_char_boundary(start) {
        start += 1;
    }
    &s[start..]
}

impl Drop for Browser {
    fn drop(&mut self) {
        // Closing the session makes chromedriver quit Chromium (its profile
        // stays: `tmp` removes it); bounded, in case Chromium hangs.
        if let Some(client) = self.client.take() {
            let _ = self.rt.block_on(async {
                tokio::time::timeout(Duration::from_secs(10), client.close()).await
            });
        }
        // Then whatever is left of the group: chromedriver, and Chromium
        // processes if the close failed.
        let _ = killpg(Pid::from_raw(self.driver.id() as i32), Signal::SIGKILL);
        let _ = self.driver.wait();
    }
}
